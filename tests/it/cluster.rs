//! Several `serve` nodes on one PostgreSQL database, as behind a load balancer: a participant who
//! moves to another node mid-reply sees the reply go on there, and a node killed mid-reply has its
//! reply finished by the other; every reply is stored once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use collabllm::db;
use collabllm::db::vocab::MessageRole;
use collabllm::study::frames::{ClientFrame, ServerFrame};

use crate::common::{repo_root, ScriptedEngine, TestApp, TestDb, TestServer, TEST_API_KEY};
use crate::participant::{free_port, metric, state_of, Browser, ServeProcess, Socket};

/// How many words each reply has, and how long the model takes per word.
const WORDS: usize = 40;
const PACE: Duration = Duration::from_millis(100);

fn reply_text() -> String {
    words(WORDS)
}

fn words(n: usize) -> String {
    (1..=n)
        .map(|i| format!("w{i}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The quick pilot with its model served over `/v1` at `endpoint`, as by a fleet of inference
/// servers.
fn remote_protocol(dir: &std::path::Path, endpoint: &str) -> std::path::PathBuf {
    let text = std::fs::read_to_string(repo_root().join("study-protocols/quick-pilot.toml"))
        .unwrap()
        .replace(
            "file = \"SmolLM2-135M-Instruct.Q4_1.gguf\"\nsha256 = \"b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53\"\n",
            &format!(
                "endpoint = \"{endpoint}\"\nremote_model = \"smollm2-135m\"\napi_key_env = \"INFERENCE_KEY\"\ntimeout_seconds = 30\n"
            ),
        );
    assert!(
        text.contains("endpoint"),
        "the protocol's model was replaced"
    );
    let path = dir.join("cluster.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Reads frames until the reply is done, adding the streamed tokens to what the page showed
/// (`text`, holding `tokens` token frames), as the page does; returns the text and when each
/// token frame arrived.
async fn follow_reply(
    ws: &mut Socket,
    mut text: String,
    mut tokens: usize,
) -> (String, String, Vec<(usize, Instant)>) {
    let mut arrivals = Vec::new();
    loop {
        match ws.next().await {
            ServerFrame::Token { index, delta, .. } => {
                arrivals.push((index, Instant::now()));
                if index >= tokens {
                    assert_eq!(index, tokens, "no token frame is missed");
                    tokens += 1;
                    text.push_str(&delta);
                }
            }
            ServerFrame::State(s) => {
                // The reply was started afresh (taken over): the page shows it as stored.
                text = s.streaming.map(|m| m.content).unwrap_or_default();
                tokens = s.streaming_tokens;
            }
            ServerFrame::AssistantDone { text: done, .. } => return (text, done, arrivals),
            ServerFrame::Error { code, message, .. } => panic!("{code}: {message}"),
            _ => {}
        }
    }
}

/// The node id `/healthz` gives, once it says the node listens for the others.
async fn listening(host: &str) -> String {
    let health = health_until(host, |h| h["relay"] == "listening").await;
    health["node"].as_str().unwrap().to_string()
}

/// What `/healthz` says once `wanted` holds of it (within 30 s).
async fn health_until(
    host: &str,
    wanted: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let started = Instant::now();
    loop {
        let health: serde_json::Value = reqwest::get(format!("http://{host}/healthz"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if wanted(&health) {
            return health;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "{health}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The node's notifications to the others that carried frames, as `/metrics` counts them.
async fn frames_relayed(host: &str) -> f64 {
    let text = reqwest::Client::new()
        .get(format!("http://{host}/metrics"))
        .bearer_auth(TEST_API_KEY)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    metric(
        &text,
        "collabllm_relay_notices_total",
        &[("kind", "frames")],
    )
    .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread")]
async fn two_nodes_on_one_postgres_move_a_participant_mid_reply_and_survive_a_killed_node() {
    // The inference server both nodes use: a scripted model, slow enough to move mid-reply.
    let inference_db = TestDb::sqlite();
    let engine = Arc::new(ScriptedEngine::new(|_| reply_text()).paced(PACE));
    let inference = TestApp::new(&inference_db).scripted(engine.clone()).start();
    let dir = tempfile::tempdir().unwrap();
    let protocol = remote_protocol(dir.path(), &inference.url("/v1"));

    let database = TestDb::postgres();
    let env = [("INFERENCE_KEY", TEST_API_KEY)];
    let a = ServeProcess::start_with(&database.url, free_port(), &protocol, &env);
    let b = ServeProcess::start_with(&database.url, free_port(), &protocol, &env);
    let (node_a, node_b) = (listening(&a.host).await, listening(&b.host).await);
    assert_ne!(node_a, node_b, "each process is a node of its own");

    let mut browser = Browser::new(&format!("http://{}", a.host));
    browser.enter("quick-pilot", Some("pid-cluster")).await;
    browser.consent("quick-pilot", "agree").await;
    let token = browser.token.clone();

    // The participant asks on node A and, once the reply is under way, lands on node B.
    let mut on_a = Socket::connect(&a.host, "quick-pilot", token.as_deref()).await;
    state_of(on_a.hello().await);
    let seq = on_a.say("Please write the note.").await;
    on_a.expect_ack(seq).await;
    on_a.until(|f| matches!(f, ServerFrame::Token { index: 3, .. }))
        .await;
    drop(on_a);
    let mut on_b = Socket::connect(&b.host, "quick-pilot", token.as_deref()).await;
    on_b.seq = seq;
    let s = state_of(on_b.hello().await);
    // What node A stored with its lease (up to one relay interval behind node A's own socket).
    let shown = s
        .streaming
        .expect("node B shows the reply that node A generates");
    assert!(
        reply_text().starts_with(&shown.content) && s.streaming_tokens >= 1,
        "the text so far: {shown:?} ({} tokens)",
        s.streaming_tokens
    );
    let (streamed, done, arrivals) =
        follow_reply(&mut on_b, shown.content, s.streaming_tokens).await;
    assert_eq!(done, reply_text());
    assert_eq!(
        streamed, done,
        "the tokens relayed to node B add up to the reply"
    );
    assert_eq!(engine.requests.load(std::sync::atomic::Ordering::SeqCst), 1);

    // How long a token took from the model to a socket on the other node.
    let written = engine.written.lock().unwrap()[0].clone();
    let mut delays: Vec<Duration> = arrivals
        .iter()
        .filter_map(|(i, at)| Some(at.saturating_duration_since(*written.get(*i)?)))
        .collect();
    delays.sort();
    eprintln!(
        "relay to another node: {} tokens, min {:?}, p50 {:?}, max {:?}",
        delays.len(),
        delays[0],
        delays[delays.len() / 2],
        delays.last().unwrap()
    );

    // The rating the reply made due (asked before `assistant_done`), on node B; then node B
    // generates the next reply and dies.
    let seq = on_b.rate("interaction", 7).await;
    on_b.expect_ack(seq).await;
    let seq = on_b.say("Make it warmer.").await;
    on_b.expect_ack(seq).await;
    on_b.until(|f| matches!(f, ServerFrame::Token { index: 3, .. }))
        .await;
    b.kill();
    drop(on_b);

    // Back on node A: it takes the reply over once node B's lease expires, and finishes it.
    let mut on_a = Socket::connect(&a.host, "quick-pilot", token.as_deref()).await;
    let s = state_of(on_a.hello().await);
    assert_eq!(s.messages.len(), 3, "{:?}", s.messages);
    let (streamed, done, _) = follow_reply(
        &mut on_a,
        s.streaming.map(|m| m.content).unwrap_or_default(),
        s.streaming_tokens,
    )
    .await;
    assert_eq!(done, reply_text());
    assert_eq!(streamed, done);

    // Stored: two messages and two replies, each once.
    let mut conn = database.conn();
    let session = db::sessions::find_by_token_hash(
        &mut conn,
        &collabllm::study::token_hash(token.as_deref().unwrap()),
    )
    .unwrap()
    .unwrap();
    let messages = db::messages::list_for_session(&mut conn, session.id).unwrap();
    let roles: Vec<MessageRole> = messages.iter().map(|m| m.role).collect();
    assert_eq!(
        roles,
        [
            MessageRole::User,
            MessageRole::Assistant,
            MessageRole::User,
            MessageRole::Assistant
        ]
    );
    assert!(messages
        .iter()
        .filter(|m| m.role == MessageRole::Assistant)
        .all(|m| m.content == reply_text()));
    assert!(
        db::leases::get(&mut conn, &db::leases::reply_name(session.id))
            .unwrap()
            .is_none(),
        "no reply is left leased"
    );
    a.kill();
}

/// Two nodes in this process over one PostgreSQL database, each listening for the other.
fn two_nodes(db: &TestDb, engine: Arc<ScriptedEngine>) -> (TestServer, TestServer) {
    let node = || {
        let state = TestApp::new(db).scripted(engine.clone()).state();
        state.studio.run_cluster(Duration::from_secs(60));
        TestServer::start(state)
    };
    (node(), node())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tab_on_another_node_takes_the_session_over_and_stops_its_reply() {
    let db = TestDb::postgres();
    // Replies write "Partial" and go on until stopped.
    let engine = Arc::new(ScriptedEngine::holding(|_| String::new(), |_| true));
    let (a, b) = two_nodes(&db, engine.clone());
    let mut browser = Browser::new(&a.url(""));
    browser.enter("quick-pilot", Some("pid-two-tabs")).await;
    browser.consent("quick-pilot", "agree").await;
    let token = browser.token.clone();
    let host = |s: &TestServer| s.addr.to_string();

    let mut on_a = Socket::connect(&host(&a), "quick-pilot", token.as_deref()).await;
    state_of(on_a.hello().await);
    let seq = on_a.say("Please write the note.").await;
    on_a.expect_ack(seq).await;
    on_a.until(|f| matches!(f, ServerFrame::Token { .. })).await;

    // A second tab, on node B: the tab on node A is told, and node B shows the reply so far.
    let mut on_b = Socket::connect(&host(&b), "quick-pilot", token.as_deref()).await;
    on_b.seq = seq;
    let s = state_of(on_b.hello().await);
    assert!(s.streaming.is_some(), "{s:?}");
    on_a.expect_error("taken_over").await;
    drop(on_a);

    // Stop, pressed on node B, ends the reply node A generates; node B's tab gets its end.
    let stop = on_b.next_seq();
    on_b.send(&ClientFrame::Stop { client_seq: stop }).await;
    on_b.expect_ack(stop).await;
    let (done, _) = on_b
        .until(|f| matches!(f, ServerFrame::AssistantDone { .. }))
        .await;
    let ServerFrame::AssistantDone {
        text,
        finish_reason,
        ..
    } = done
    else {
        unreachable!()
    };
    assert_eq!(
        (text.as_str(), finish_reason.as_str()),
        ("Partial", "cancelled")
    );
}

/// A node alone on PostgreSQL relays no frames (each `NOTIFY` would make its commits wait on one
/// lock of the whole database for nobody). A node that joins is heard within a beat: the reply
/// under way is relayed from then on, with a resync first, and a socket on the new node shows
/// the whole reply.
#[tokio::test(flavor = "multi_thread")]
async fn a_node_alone_relays_nothing_until_another_joins_mid_reply() {
    let long = words(80);
    let inference_db = TestDb::sqlite();
    let text = long.clone();
    let engine = Arc::new(ScriptedEngine::new(move |_| text.clone()).paced(PACE));
    let inference = TestApp::new(&inference_db).scripted(engine).start();
    let dir = tempfile::tempdir().unwrap();
    let protocol = remote_protocol(dir.path(), &inference.url("/v1"));
    let database = TestDb::postgres();
    let env = [
        ("INFERENCE_KEY", TEST_API_KEY),
        ("COLLABLLM_API_KEYS", TEST_API_KEY),
    ];
    let a = ServeProcess::start_with(&database.url, free_port(), &protocol, &env);
    listening(&a.host).await;
    health_until(&a.host, |h| h["relaying"] == false && h["peers"] == 0).await;

    let mut browser = Browser::new(&format!("http://{}", a.host));
    browser.enter("quick-pilot", Some("pid-alone")).await;
    browser.consent("quick-pilot", "agree").await;
    let token = browser.token.clone();
    let mut on_a = Socket::connect(&a.host, "quick-pilot", token.as_deref()).await;
    state_of(on_a.hello().await);
    on_a.say("Please write the note.").await;
    let (streamed, done, _) = follow_reply(&mut on_a, String::new(), 0).await;
    assert_eq!(
        (streamed.as_str(), done.as_str()),
        (long.as_str(), long.as_str())
    );
    assert_eq!(
        frames_relayed(&a.host).await,
        0.0,
        "a node alone relays no frames"
    );

    // The next reply is under way on node A when node B starts; the participant moves to it.
    let seq = on_a.rate("interaction", 7).await;
    on_a.expect_ack(seq).await;
    let seq = on_a.say("Make it warmer.").await;
    on_a.until(|f| matches!(f, ServerFrame::Token { index: 3, .. }))
        .await;
    let b = ServeProcess::start_with(&database.url, free_port(), &protocol, &env);
    let health = health_until(&a.host, |h| h["peers"] == 1).await;
    assert_eq!(health["relaying"], true, "{health}");
    drop(on_a);
    let mut on_b = Socket::connect(&b.host, "quick-pilot", token.as_deref()).await;
    on_b.seq = seq;
    let s = state_of(on_b.hello().await);
    let (streamed, done, _) = follow_reply(
        &mut on_b,
        s.streaming.map(|m| m.content).unwrap_or_default(),
        s.streaming_tokens,
    )
    .await;
    assert_eq!(done, long);
    assert_eq!(streamed, done, "node B showed the whole reply");
    assert!(frames_relayed(&a.host).await > 0.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_node_finishes_the_reply_in_flight_before_it_exits() {
    let inference_db = TestDb::sqlite();
    let engine = Arc::new(ScriptedEngine::new(|_| reply_text()).paced(PACE));
    let inference = TestApp::new(&inference_db).scripted(engine.clone()).start();
    let dir = tempfile::tempdir().unwrap();
    let protocol = remote_protocol(dir.path(), &inference.url("/v1"));
    let database = format!("sqlite://{}", dir.path().join("study.sqlite3").display());
    let env = [("INFERENCE_KEY", TEST_API_KEY)];
    let port = free_port();
    let node = ServeProcess::start_with(&database, port, &protocol, &env);

    let mut browser = Browser::new(&format!("http://{}", node.host));
    browser.enter("quick-pilot", Some("pid-sigterm")).await;
    browser.consent("quick-pilot", "agree").await;
    let mut ws = Socket::connect(&node.host, "quick-pilot", browser.token.as_deref()).await;
    state_of(ws.hello().await);
    let seq = ws.say("Please write the note.").await;
    ws.expect_ack(seq).await;
    ws.until(|f| matches!(f, ServerFrame::Token { index: 3, .. }))
        .await;
    node.terminate(); // as systemd, Kubernetes or Ctrl-C stop it
    let (done, _) = ws
        .until(|f| matches!(f, ServerFrame::AssistantDone { .. }))
        .await;
    let ServerFrame::AssistantDone { text, .. } = done else {
        unreachable!()
    };
    assert_eq!(text, reply_text(), "the reply in flight was finished");
    let status = tokio::task::spawn_blocking(move || node.wait(Duration::from_secs(30)))
        .await
        .unwrap();
    assert!(status.success(), "serve exits cleanly: {status}");

    // The next node has the whole reply, generated once, and the participant goes on.
    let node = ServeProcess::start_with(&database, port, &protocol, &env);
    let mut ws = Socket::connect(&node.host, "quick-pilot", browser.token.as_deref()).await;
    let s = state_of(ws.hello().await);
    assert_eq!(s.messages.len(), 2);
    assert_eq!(s.messages[1].content, reply_text());
    assert!(s.streaming.is_none(), "no reply is left half-written");
    assert_eq!(engine.requests.load(std::sync::atomic::Ordering::SeqCst), 1);
    ws.seq = s.last_client_seq;
    let rated = ws.rate("interaction", 8).await; // the pilot's rating after every turn
    ws.expect_ack(rated).await;
    assert_eq!(ws.chat("Thank you, a shorter one?").await, reply_text());
}
