//! Faults injected while participants work: the database's connections killed under a load of
//! a hundred participants, a remote model endpoint that fails mid-reply, a full disk and a
//! read-only database file under SQLite. The promises checked (docs/reliability.md): every
//! acknowledged frame is stored once, a frame the database could not store is answered
//! `unavailable` and sent again, a reply that fails ends with a clear message the participant
//! can retry, and the node serves on afterwards.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use collabllm::bench::load::{self, LoadOptions};
use collabllm::db::{self, DbConn};
use collabllm::engine::remote::RemoteEngine;
use collabllm::protocol::{LoadedProtocol, Protocol, EXAMPLE_PROTOCOL, EXAMPLE_PROTOCOL_PATH};
use collabllm::study::client::Browser;
use collabllm::study::frames::{ClientFrame, ServerFrame};
use collabllm::web::{limits::Limits, AppState};
use diesel::prelude::*;

use crate::common::{models_dir, postgres_base_url, TestApp, TestDb, TestServer, TEST_API_KEY};
use crate::participant::{free_port, Browser as TestBrowser, ServeProcess};

/// The longest wait for a frame.
const WAIT: Duration = Duration::from_secs(30);

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

/// How the fake inference endpoint answers: every request streams one token ("Partial"), then
/// does what its mode says.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Endpoint {
    /// Goes on to a whole reply, as a working server does.
    Answers,
    /// Stays silent with the connection open.
    Hangs,
    /// Resets the connection.
    Resets,
    /// Sends an event that is not JSON.
    Garbage,
    /// Streams without a line break.
    NoLineBreaks,
}

/// An OpenAI-compatible endpoint on a loopback port that fails as it is told to.
struct FakeEndpoint {
    url: String,
    mode: Arc<Mutex<Endpoint>>,
}

impl FakeEndpoint {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/v1", listener.local_addr().unwrap());
        let mode = Arc::new(Mutex::new(Endpoint::Answers));
        let shared = mode.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let mode = *shared.lock().unwrap();
                tokio::spawn(respond(socket, mode));
            }
        });
        Self { url, mode }
    }

    fn set(&self, mode: Endpoint) {
        *self.mode.lock().unwrap() = mode;
    }
}

/// Reads one request (its headers and `content-length` bytes of body), then streams as `mode`
/// says.
async fn respond(mut socket: tokio::net::TcpStream, mode: Endpoint) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut request = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match socket.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
        let Some(end) = request.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&request[..end]).to_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        if request.len() >= end + 4 + length {
            break;
        }
    }
    let chunk = |data: &str| format!("{:x}\r\n{data}\r\n", data.len());
    let event = |v: serde_json::Value| chunk(&format!("data: {v}\n\n"));
    let token = |t: &str| event(serde_json::json!({"choices": [{"delta": {"content": t}}]}));
    let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                transfer-encoding: chunked\r\n\r\n";
    if socket
        .write_all(format!("{head}{}", token("Partial")).as_bytes())
        .await
        .is_err()
    {
        return;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let rest = match mode {
        Endpoint::Answers => format!(
            "{}{}{}0\r\n\r\n",
            token(" answer, whole."),
            event(serde_json::json!({"choices": [{"delta": {}, "finish_reason": "stop"}]})),
            chunk("data: [DONE]\n\n")
        ),
        Endpoint::Hangs => {
            tokio::time::sleep(Duration::from_secs(600)).await;
            return;
        }
        Endpoint::Resets => {
            // Closing with a zero linger sends a reset, not an orderly end.
            let _ = socket.set_zero_linger();
            return;
        }
        Endpoint::Garbage => format!("{}0\r\n\r\n", chunk("data: {\"choices\": [oops\n\n")),
        Endpoint::NoLineBreaks => {
            let block = chunk(&"x".repeat(64 << 10));
            for _ in 0..64 {
                if socket.write_all(block.as_bytes()).await.is_err() {
                    return;
                }
            }
            return;
        }
    };
    let _ = socket.write_all(rest.as_bytes()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_remote_endpoint_that_fails_mid_reply_ends_the_reply_and_try_again_works() {
    let endpoint = FakeEndpoint::start().await;
    let remote = RemoteEngine::new(&endpoint.url, "fake", None)
        .unwrap()
        .with_timeout(Duration::from_secs(1));
    let db = TestDb::sqlite();
    let server = TestApp::new(&db).serving(Arc::new(remote)).start();
    let failures = |text: &str| {
        let arm = [("arm", "proactive")];
        crate::participant::metric(text, "collabllm_reply_failures_total", &arm).unwrap_or(0.0)
    };
    let metrics = || async {
        reqwest::Client::new()
            .get(server.url("/metrics"))
            .bearer_auth(TEST_API_KEY)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let failed_before = failures(&metrics().await);
    let faults = [
        Endpoint::Hangs,
        Endpoint::Resets,
        Endpoint::Garbage,
        Endpoint::NoLineBreaks,
    ];
    for (i, fault) in faults.into_iter().enumerate() {
        endpoint.set(fault);
        let mut browser = TestBrowser::new(&server.url(""));
        browser
            .enter("quick-pilot", Some(&format!("pid-endpoint-{i}")))
            .await;
        browser.consent("quick-pilot", "agree").await;
        let mut ws = browser.connect("quick-pilot", WAIT).await.unwrap();
        ws.state().await.unwrap();
        let seq = ws.next_seq();
        ws.send(&ClientFrame::UserMessage {
            client_seq: seq,
            text: "Please write the note.".into(),
        })
        .await
        .unwrap();
        let (failed, before) = ws
            .until(|f| {
                matches!(
                    f,
                    ServerFrame::Error { .. } | ServerFrame::AssistantDone { .. }
                )
            })
            .await
            .unwrap();
        let ServerFrame::Error { code, message, .. } = &failed else {
            panic!("{fault:?}: the reply should fail, got {failed:?}");
        };
        assert_eq!(code, "assistant_failed", "{fault:?}: {message}");
        assert!(message.contains("Try again"), "{message}");
        assert!(
            before
                .iter()
                .any(|f| matches!(f, ServerFrame::Token { delta, .. } if delta == "Partial")),
            "{fault:?}: the failure came mid-reply: {before:?}"
        );

        // The endpoint is back: "Try again" gets the whole reply, and only it is kept.
        endpoint.set(Endpoint::Answers);
        let seq = ws.next_seq();
        ws.send(&ClientFrame::Regenerate { client_seq: seq })
            .await
            .unwrap();
        let (done, _) = ws
            .until(|f| matches!(f, ServerFrame::AssistantDone { .. }))
            .await
            .unwrap();
        let ServerFrame::AssistantDone { text, .. } = done else {
            unreachable!()
        };
        assert_eq!(text, "Partial answer, whole.", "{fault:?}");
        let mut again = browser.connect("quick-pilot", WAIT).await.unwrap();
        let state = again.state().await.unwrap();
        let contents: Vec<_> = state.messages.iter().map(|m| m.content.as_str()).collect();
        assert_eq!(
            contents,
            ["Please write the note.", "Partial answer, whole."],
            "{fault:?}"
        );
    }
    // Other tests of this process may fail replies of the same arm too.
    assert!(
        failures(&metrics().await) - failed_before >= faults.len() as f64,
        "/metrics counts the failed replies"
    );
    let health: serde_json::Value = reqwest::get(server.url("/healthz"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "ok", "{health}");
}

/// What makes the SQLite file under a running server refuse writes.
#[derive(Debug, Clone, Copy)]
enum StorageFault {
    /// The disk is full: no file of the server may grow past its first page.
    FullDisk,
    /// The database file and its write-ahead log are made read-only. They are made immutable
    /// (`chattr +i`), since file modes do not stop root, whom the test suite runs as.
    ReadOnlyFile,
}

impl StorageFault {
    /// Imposes the fault on the server and its database file, until the returned value drops.
    fn impose<'a>(self, server: &'a ServeProcess, file: &'a Path) -> Imposed<'a> {
        self.set(server, file, true);
        Imposed {
            fault: self,
            server,
            file,
        }
    }

    fn set(self, server: &ServeProcess, file: &Path, on: bool) {
        match self {
            Self::FullDisk => server.limit_file_size(on.then_some(4096)),
            Self::ReadOnlyFile => {
                let wal = file.with_extension("sqlite3-wal");
                let flag = if on { "+i" } else { "-i" };
                let status = std::process::Command::new("chattr")
                    .arg(flag)
                    .args([file, wal.as_path()])
                    .status()
                    .expect("chattr (e2fsprogs) runs");
                // Not checked while a failed assertion unwinds: its message is the one to see.
                assert!(
                    status.success() || std::thread::panicking(),
                    "chattr {flag} on {}: {status}; the test needs root and a filesystem with \
                     the immutable attribute (ext4, xfs, btrfs)",
                    file.display()
                );
            }
        }
    }
}

/// A storage fault in force; dropping it lifts the fault (also when an assertion fails, so the
/// temporary folder can be removed).
struct Imposed<'a> {
    fault: StorageFault,
    server: &'a ServeProcess,
    file: &'a Path,
}

impl Drop for Imposed<'_> {
    fn drop(&mut self) {
        self.fault.set(self.server, self.file, false);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_under_sqlite_loses_nothing_acknowledged_and_recovers_when_space_returns() {
    refused_writes_lose_nothing_acknowledged_and_recover(StorageFault::FullDisk).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_read_only_database_file_loses_nothing_acknowledged_and_recovers_when_writable() {
    refused_writes_lose_nothing_acknowledged_and_recover(StorageFault::ReadOnlyFile).await;
}

/// A participant saves, the fault comes, their next save and a newcomer are refused with a
/// retryable error, and once it is lifted the save sent again is stored once and survives a
/// crash.
async fn refused_writes_lose_nothing_acknowledged_and_recover(fault: StorageFault) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("study.sqlite3");
    let database = format!("sqlite://{}", file.display());
    let protocol = crate::common::repo_root().join("study-protocols/quick-pilot.toml");
    let port = free_port();
    let server = ServeProcess::start_with(&database, port, &protocol, &[]);
    let base = format!("http://{}", server.host);
    let mut browser = TestBrowser::new(&base);
    browser.enter("quick-pilot", Some("pid-disk")).await;
    browser.consent("quick-pilot", "agree").await;
    let mut ws = browser.connect("quick-pilot", WAIT).await.unwrap();
    ws.state().await.unwrap();
    let save = |client_seq, base_rev, content: &str| ClientFrame::DocUpdate {
        client_seq,
        base_rev,
        content: content.into(),
        inserted_message: None,
    };
    ws.acked(|seq| save(seq, 0, "Saved before writes were refused."))
        .await
        .unwrap();

    let imposed = fault.impose(&server, &file);
    let seq = ws.next_seq();
    ws.send(&save(seq, 1, "Written while writes were refused."))
        .await
        .unwrap();
    let (refused, _) = ws
        .until(|f| matches!(f, ServerFrame::Error { .. } | ServerFrame::Ack { .. }))
        .await
        .unwrap();
    let ServerFrame::Error {
        code, client_seq, ..
    } = &refused
    else {
        panic!("a write refused by the disk ({fault:?}) is not acknowledged: {refused:?}");
    };
    assert_eq!(
        (code.as_str(), *client_seq),
        ("unavailable", Some(seq)),
        "{fault:?}: {refused:?}"
    );
    // A newcomer is told to try again, and nothing of them is half-written.
    let mut newcomer = TestBrowser::new(&base);
    let entered = newcomer.enter("quick-pilot", Some("pid-disk-2")).await;
    assert_eq!(entered.status(), 503);
    assert!(entered.text().await.unwrap().contains("please try again"));
    assert!(newcomer.token.is_none(), "no session was started");
    let health = reqwest::get(format!("{base}/healthz")).await.unwrap();
    assert_eq!(health.status(), 200, "reading still works");

    // Space returns (the file is writable again): the frame sent again is stored, once.
    drop(imposed);
    ws.send(&save(seq, 1, "Written while writes were refused."))
        .await
        .unwrap();
    let (ack, _) = ws
        .until(|f| matches!(f, ServerFrame::Ack { .. } | ServerFrame::Error { .. }))
        .await
        .unwrap();
    assert!(
        matches!(ack, ServerFrame::Ack { client_seq, rev: Some(2) } if client_seq == seq),
        "{ack:?}"
    );
    let entered = newcomer.enter("quick-pilot", Some("pid-disk-2")).await;
    assert_eq!(
        entered.status(),
        303,
        "a newcomer can start once space returns"
    );

    // And all of it survives a crash.
    server.kill();
    let server = ServeProcess::start_with(&database, port, &protocol, &[]);
    let mut ws = browser.connect("quick-pilot", WAIT).await.unwrap();
    let state = ws.state().await.unwrap();
    assert_eq!(state.document.content, "Written while writes were refused.");
    assert_eq!((state.document.rev, state.last_client_seq), (2, seq));
    server.kill();
}

/// A TCP proxy to the PostgreSQL server that can be cut, as a network or a database host that
/// goes away: while cut, its connections are closed and new ones are closed as they come.
struct Proxy {
    addr: std::net::SocketAddr,
    up: Arc<std::sync::atomic::AtomicBool>,
    links: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Proxy {
    async fn start(upstream: String) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let links: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let (is_up, held) = (up.clone(), links.clone());
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !is_up.load(std::sync::atomic::Ordering::SeqCst) {
                    continue; // dropped: closed at once
                }
                let upstream = upstream.clone();
                held.lock().unwrap().push(tokio::spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                }));
            }
        });
        Self { addr, up, links }
    }

    /// The database goes away: every connection through the proxy is closed.
    fn cut(&self) {
        self.up.store(false, std::sync::atomic::Ordering::SeqCst);
        for link in self.links.lock().unwrap().drain(..) {
            link.abort();
        }
    }

    fn restore(&self) {
        self.up.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Where the host and port of a database URL are in it.
fn host_of(url: &str) -> std::ops::Range<usize> {
    let start = url.find("://").unwrap() + 3;
    let host = url[start..].rfind('@').map_or(start, |at| start + at + 1);
    let end = url[host..].find(['/', '?']).map_or(url.len(), |i| host + i);
    host..end
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_unreachable_during_a_study_says_so_and_loses_nothing() {
    let mut db = TestDb::postgres();
    let host = host_of(&db.url);
    let proxy = Proxy::start(db.url[host.clone()].to_string()).await;
    db.url.replace_range(host, &proxy.addr.to_string());
    let server = TestApp::new(&db).start();
    let base = server.url("");
    let mut browser = TestBrowser::new(&base);
    browser.enter("quick-pilot", Some("pid-pg-down")).await;
    browser.consent("quick-pilot", "agree").await;
    let mut ws = browser.connect("quick-pilot", WAIT).await.unwrap();
    ws.state().await.unwrap();
    let save = |client_seq, base_rev, content: &str| ClientFrame::DocUpdate {
        client_seq,
        base_rev,
        content: content.into(),
        inserted_message: None,
    };
    ws.acked(|seq| save(seq, 0, "Saved before the database went away."))
        .await
        .unwrap();

    proxy.cut();
    let seq = ws.next_seq();
    let mut newcomer = TestBrowser::new(&base);
    // What a participant's frame, a newcomer and a load balancer get meanwhile, together.
    let (refused, entered, health) = tokio::join!(
        async {
            ws.send(&save(seq, 1, "Written while the database is away."))
                .await
                .unwrap();
            ws.until(|f| matches!(f, ServerFrame::Error { .. } | ServerFrame::Ack { .. }))
                .await
                .unwrap()
                .0
        },
        async {
            let r = newcomer.enter("quick-pilot", Some("pid-pg-down-2")).await;
            (r.status(), r.text().await.unwrap())
        },
        async {
            let r = reqwest::get(server.url("/healthz")).await.unwrap();
            (r.status(), r.text().await.unwrap())
        },
    );
    let ServerFrame::Error {
        code, client_seq, ..
    } = &refused
    else {
        panic!("nothing is acknowledged while the database is away: {refused:?}");
    };
    assert_eq!((code.as_str(), *client_seq), ("unavailable", Some(seq)));
    assert_eq!(entered.0, 503);
    assert!(entered.1.contains("please try again"), "{}", entered.1);
    assert!(newcomer.token.is_none(), "no session was started");
    assert_eq!(health.0, 503, "{}", health.1);
    assert!(health.1.contains("database"), "{}", health.1);

    // The database is back: the frame sent again is stored once, and newcomers start.
    proxy.restore();
    ws.send(&save(seq, 1, "Written while the database is away."))
        .await
        .unwrap();
    let (ack, before) = ws
        .until(|f| matches!(f, ServerFrame::Ack { .. } | ServerFrame::Error { .. }))
        .await
        .unwrap();
    assert!(
        matches!(ack, ServerFrame::Ack { client_seq, rev: Some(2) } if client_seq == seq),
        "{ack:?} {before:?}"
    );
    let entered = newcomer.enter("quick-pilot", Some("pid-pg-down-2")).await;
    assert_eq!(entered.status(), 303);
    let health = reqwest::get(server.url("/healthz")).await.unwrap();
    assert_eq!(health.status(), 200);
    let state = browser
        .connect("quick-pilot", WAIT)
        .await
        .unwrap()
        .state()
        .await
        .unwrap();
    assert_eq!(
        state.document.content,
        "Written while the database is away."
    );
    assert_eq!((state.document.rev, state.last_client_seq), (2, seq));
}
