//! Faults injected while participants work: the database's connections killed under a load of
//! a hundred participants. The promise checked (docs/reliability.md): every acknowledged frame is
//! stored once, a frame the database could not store is answered `unavailable` and sent again,
//! and the node serves on afterwards.

use std::time::Duration;

use collabllm::bench::load::{self, LoadOptions};
use collabllm::db::{self, DbConn};
use collabllm::protocol::{LoadedProtocol, Protocol, EXAMPLE_PROTOCOL, EXAMPLE_PROTOCOL_PATH};
use collabllm::study::client::Browser;
use collabllm::study::frames::{ClientFrame, ServerFrame};
use collabllm::web::{limits::Limits, AppState};
use diesel::prelude::*;

use crate::common::{models_dir, postgres_base_url, TestDb, TestServer};

/// The example study without its message rate limit, served by a model that answers at once, so
/// a hundred participants from one address go as fast as the server lets them.
fn load_server(db: &TestDb) -> TestServer {
    let text = EXAMPLE_PROTOCOL.replacen("messages_per_minute = 10", "messages_per_minute = 0", 1);
    let loaded = LoadedProtocol {
        sha256: collabllm::protocol::sha256_hex(text.as_bytes()),
        protocol: Protocol::from_stored(&text).expect("the example protocol"),
        text,
        source: EXAMPLE_PROTOCOL_PATH.into(),
    };
    let pool = db.pool();
    db::studies::import(&mut pool.get().unwrap(), &loaded).unwrap();
    let engines = load::instant_engines(&loaded.protocol);
    let mut state = AppState::new(pool, engines, models_dir()).unwrap();
    state.limits = std::sync::Arc::new(Limits::new(0, false));
    TestServer::start(state)
}

#[derive(QueryableByName)]
struct Killed {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    killed: i64,
}

/// Terminates every server process of the connections named `application_name`, as an
/// administrator or a failover would; returns how many there were.
fn kill_connections(application_name: &str) -> i64 {
    let DbConn::Postgres(mut conn) = db::connect(&postgres_base_url()).unwrap() else {
        unreachable!("a PostgreSQL URL")
    };
    diesel::sql_query(
        "SELECT count(pg_terminate_backend(pid)) AS killed FROM pg_stat_activity \
         WHERE application_name = $1",
    )
    .bind::<diesel::sql_types::Text, _>(application_name)
    .get_result::<Killed>(&mut conn)
    .unwrap()
    .killed
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_connections_killed_under_a_load_lose_and_double_nothing() {
    let db = TestDb::postgres();
    let server = load_server(&db);
    let options = LoadOptions {
        participants: 100,
        turns: 3,
        study: "doc-cocreation".into(),
        base: server.url(""),
        pause: Duration::from_millis(150),
        duration: None,
    };
    let name = db
        .application_name()
        .expect("a PostgreSQL test database")
        .to_string();
    // Three times while the participants work, every connection of the node goes.
    let killer = tokio::task::spawn_blocking(move || {
        (0..3)
            .map(|_| {
                std::thread::sleep(Duration::from_millis(600));
                kill_connections(&name)
            })
            .sum::<i64>()
    });
    let report = load::run(&options, &|_, _| {}).await;
    let killed = killer.await.unwrap();
    assert!(
        killed > 0,
        "no connection was killed: the fault did not happen"
    );
    assert!(
        report.errors.is_empty(),
        "{} participants failed, e.g. {:?}",
        report.errors.len(),
        &report.errors[..report.errors.len().min(3)]
    );
    assert_eq!(report.sent.len(), 100);
    assert!(report.sent.iter().all(|s| s.completed));
    let problems = load::check_stored(&mut db.conn(), "doc-cocreation", &report.sent).unwrap();
    assert!(problems.is_empty(), "{problems:?}");

    // The node serves on: healthy, and a new participant gets through a whole session.
    let health = reqwest::get(server.url("/healthz")).await.unwrap();
    assert_eq!(health.status(), 200);
    let mut browser = Browser::new(&server.url(""));
    browser
        .join("doc-cocreation", "PROLIFIC_PID=after")
        .await
        .unwrap();
    let mut socket = browser
        .connect("doc-cocreation", Duration::from_secs(60))
        .await
        .unwrap();
    socket.state().await.unwrap();
    let (reply, _) = socket
        .request(
            ClientFrame::UserMessage {
                client_seq: 1,
                text: "Are you still there?".into(),
            },
            |f| matches!(f, ServerFrame::AssistantDone { .. }),
        )
        .await
        .unwrap();
    assert!(matches!(reply, ServerFrame::AssistantDone { ref text, .. } if !text.is_empty()));
    eprintln!(
        "connections killed: {killed}; pages loaded and frames sent again: {}",
        report.retried
    );
}
