//! The participant's study over HTTP and a real websocket client, with the real model: the whole
//! session, reconnects, resends, isolation, blinding, bad input, assignment and restarts.

use std::collections::BTreeMap;
use std::time::Duration;

use collabllm::db;
use collabllm::db::vocab::{MessageRole, SessionState};
use collabllm::protocol::LoadedProtocol;
use collabllm::study::client::{self, ClientError, Connection};
use collabllm::study::frames::{ClientFrame, ServerFrame, StateView};
use collabllm::web::AppState;
use tokio_tungstenite::tungstenite::Message;

use crate::common::{models_dir, repo_root, state_with_model, TestApp, TestDb, TestServer};

const WAIT: Duration = Duration::from_secs(120);

/// The library's participant client for tests: a failure to talk to the server is the test's
/// failure.
pub struct Browser(pub client::Browser);

impl std::ops::Deref for Browser {
    type Target = client::Browser;
    fn deref(&self) -> &client::Browser {
        &self.0
    }
}

impl Browser {
    /// A browser of the server at `base` (`http://host:port`).
    pub fn new(base: &str) -> Self {
        Self(client::Browser::new(base))
    }

    /// Opens the study link (with a Prolific id, if given); keeps the cookie it sets.
    pub async fn enter(&mut self, slug: &str, pid: Option<&str>) -> reqwest::Response {
        let query = pid
            .map(|pid| format!("PROLIFIC_PID={pid}&STUDY_ID=s1&SESSION_ID=x1"))
            .unwrap_or_default();
        self.0.enter(slug, &query).await.unwrap()
    }

    pub async fn page(&self, slug: &str) -> String {
        self.0.page(slug).await.unwrap()
    }

    pub async fn consent(&self, slug: &str, decision: &str) -> reqwest::Response {
        self.0.consent(slug, decision).await.unwrap()
    }
}

/// A websocket of the library's participant client, with the checks tests make on top.
pub struct Socket(pub Connection);

impl std::ops::Deref for Socket {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        &self.0
    }
}

impl std::ops::DerefMut for Socket {
    fn deref_mut(&mut self) -> &mut Connection {
        &mut self.0
    }
}

impl Socket {
    /// Connects to the server at `host` (`host:port`) as a browser with this session cookie.
    pub async fn connect(host: &str, slug: &str, token: Option<&str>) -> Self {
        let cookie = token.map(client::session_cookie);
        Self::connect_to(&format!("ws://{host}/s/{slug}/ws"), cookie.as_deref()).await
    }

    /// Connects to the websocket at `url` with this `cookie` header.
    pub async fn connect_to(url: &str, cookie: Option<&str>) -> Self {
        Self(
            Connection::open(url, cookie, WAIT)
                .await
                .expect("websocket connects"),
        )
    }

    pub async fn raw(&mut self, text: &str) {
        self.0.send_raw(Message::text(text)).await.unwrap();
    }

    pub async fn send(&mut self, frame: &ClientFrame) {
        self.0.send(frame).await.unwrap();
    }

    /// `hello`: the session is the one of the connection's cookie.
    pub async fn hello(&mut self) -> ServerFrame {
        self.send(&ClientFrame::Hello {
            session_token: None,
        })
        .await;
        self.next().await
    }

    /// `hello` naming a session token, which must be the cookie's.
    pub async fn hello_with(&mut self, token: &str) -> ServerFrame {
        self.send(&ClientFrame::Hello {
            session_token: Some(token.into()),
        })
        .await;
        self.next().await
    }

    /// Sends a user message; returns its client sequence number.
    pub async fn say(&mut self, text: &str) -> i64 {
        let seq = self.next_seq();
        self.send(&ClientFrame::UserMessage {
            client_seq: seq,
            text: text.into(),
        })
        .await;
        seq
    }

    /// Sends a rating; returns its client sequence number.
    pub async fn rate(&mut self, key: &str, value: i32) -> i64 {
        let seq = self.next_seq();
        self.send(&ClientFrame::Rating {
            client_seq: seq,
            key: key.into(),
            value,
        })
        .await;
        seq
    }

    pub async fn next(&mut self) -> ServerFrame {
        self.0.next().await.expect("a frame arrives in time")
    }

    /// How the server closed the connection, once the frames before are read.
    pub async fn closed(&mut self) -> ClientError {
        loop {
            match self.0.next().await {
                Ok(_) => continue,
                Err(e) => return e,
            }
        }
    }

    /// Frames until one matches; returns it and what came before.
    pub async fn until(
        &mut self,
        wanted: impl Fn(&ServerFrame) -> bool,
    ) -> (ServerFrame, Vec<ServerFrame>) {
        self.0.until(wanted).await.expect("a frame arrives in time")
    }

    /// Sends a message and waits for the reply to finish; returns the reply text.
    pub async fn chat(&mut self, text: &str) -> String {
        let seq = self.say(text).await;
        let (done, before) = self
            .until(|f| matches!(f, ServerFrame::AssistantDone { .. }))
            .await;
        assert!(
            before
                .iter()
                .any(|f| matches!(f, ServerFrame::Ack { client_seq, .. } if *client_seq == seq)),
            "the message was acknowledged: {before:?}"
        );
        let ServerFrame::AssistantDone { text, .. } = done else {
            unreachable!()
        };
        // A rating request comes before the reply's `assistant_done`: a test may still wait for it.
        self.keep(
            before
                .iter()
                .filter(|f| matches!(f, ServerFrame::RatingRequest { .. } | ServerFrame::State(_)))
                .cloned(),
        );
        let streamed: String = before
            .iter()
            .filter_map(|f| match f {
                ServerFrame::Token { delta, .. } => Some(delta.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(streamed, text, "the streamed tokens add up to the reply");
        text
    }

    pub async fn expect_ack(&mut self, seq: i64) -> Option<i32> {
        match self
            .until(|f| matches!(f, ServerFrame::Ack { .. } | ServerFrame::Error { .. }))
            .await
            .0
        {
            ServerFrame::Ack { client_seq, rev } => {
                assert_eq!(client_seq, seq);
                rev
            }
            other => panic!("expected ack {seq}, got {other:?}"),
        }
    }

    pub async fn expect_error(&mut self, code: &str) -> ServerFrame {
        let (f, _) = self.until(|f| matches!(f, ServerFrame::Error { .. })).await;
        match &f {
            ServerFrame::Error { code: c, .. } => assert_eq!(c, code, "{f:?}"),
            _ => unreachable!(),
        }
        f
    }
}

/// The one session of the quick pilot's current version.
fn only_session(conn: &mut db::DbConn) -> db::models::Session {
    let study = db::studies::find_by_slug(conn, "quick-pilot")
        .unwrap()
        .unwrap();
    let version = db::studies::current_version(conn, study.id).unwrap();
    let mut sessions = db::sessions::list_for_version(conn, version.id).unwrap();
    assert_eq!(sessions.len(), 1);
    sessions.remove(0)
}

pub fn state_of(frame: ServerFrame) -> StateView {
    match frame {
        ServerFrame::State(s) => *s,
        other => panic!("expected state, got {other:?}"),
    }
}

/// A participant who consented, with an open socket that said hello.
async fn consented(server: &TestServer, slug: &str, pid: &str) -> (Browser, Socket, StateView) {
    let mut browser = Browser::new(&server.url(""));
    let r = browser.enter(slug, Some(pid)).await;
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], format!("/s/{slug}/p?entered=1"));
    assert!(browser.page(slug).await.contains("I agree"));
    assert_eq!(browser.consent(slug, "agree").await.status(), 303);
    let mut socket =
        Socket::connect(&server.addr.to_string(), slug, browser.token.as_deref()).await;
    let state = state_of(socket.hello().await);
    (browser, socket, state)
}

/// Another socket of the browser's quick-pilot session (a reconnect, a second tab).
async fn socket_of(server: &TestServer, browser: &Browser) -> Socket {
    Socket::connect(
        &server.addr.to_string(),
        "quick-pilot",
        browser.token.as_deref(),
    )
    .await
}

/// The quick pilot with a protocol change applied, imported as the study's current version.
fn pilot_with(state: &AppState, change: impl Fn(String) -> String) {
    let path = repo_root().join("study-protocols/quick-pilot.toml");
    let text = change(std::fs::read_to_string(&path).unwrap());
    let loaded = LoadedProtocol::from_text(&path, text, &models_dir()).unwrap();
    db::studies::import(&mut state.pool.get().unwrap(), &loaded).unwrap();
}

crate::on_both_backends_async!(a_whole_session_from_consent_to_completion_code);

async fn a_whole_session_from_consent_to_completion_code(db: TestDb) {
    let state = state_with_model(&db);
    let pool = state.pool.clone();
    let server = TestServer::start(state);
    let (browser, mut ws, s) = consented(&server, "quick-pilot", "pid-full").await;
    assert_eq!((s.phase.as_str(), s.turn, s.min_turns), ("chatting", 0, 2));
    assert!(!s.task.title.is_empty() && !s.task.instructions.is_empty());
    assert!(!s.can_finish);

    // Turn 1, then the periodic rating (every turn in the pilot) before anything else.
    let reply = ws
        .chat("Help me thank my neighbour for watering the plants.")
        .await;
    let (request, _) = ws
        .until(|f| matches!(f, ServerFrame::RatingRequest { .. }))
        .await;
    let ServerFrame::RatingRequest {
        after_turn,
        ratings,
    } = request
    else {
        unreachable!()
    };
    assert_eq!((after_turn, ratings[0].key.as_str()), (1, "interaction"));
    ws.say("too soon").await;
    ws.expect_error("rating_due").await;
    let seq = ws.rate("interaction", 7).await;
    ws.expect_ack(seq).await;
    assert_eq!(state_of(ws.next().await).phase, SessionState::Chatting);

    // The document: the reply inserted, then edited by hand.
    let seq = ws.next_seq();
    ws.send(&ClientFrame::DocUpdate {
        client_seq: seq,
        base_rev: 0,
        content: reply.clone(),
        inserted_message: Some(2),
    })
    .await;
    assert_eq!(ws.expect_ack(seq).await, Some(1));
    let seq = ws.next_seq();
    let edited = format!("{reply}\nThank you so much! — Sam");
    ws.send(&ClientFrame::DocUpdate {
        client_seq: seq,
        base_rev: 1,
        content: edited.clone(),
        inserted_message: None,
    })
    .await;
    assert_eq!(ws.expect_ack(seq).await, Some(2));

    // Finishing before the minimum is refused; after turn 2 it is allowed.
    let seq = ws.next_seq();
    ws.send(&ClientFrame::Finish { client_seq: seq }).await;
    ws.expect_error("too_early").await;
    ws.chat("Make it shorter please.").await;
    ws.until(|f| matches!(f, ServerFrame::RatingRequest { .. }))
        .await;
    let seq = ws.rate("interaction", 9).await;
    ws.expect_ack(seq).await;
    let s = state_of(ws.next().await);
    assert!(s.can_finish);
    let seq = ws.next_seq();
    ws.send(&ClientFrame::Finish { client_seq: seq }).await;
    ws.expect_ack(seq).await;
    let s = state_of(ws.next().await);
    assert_eq!(s.phase, SessionState::Final);
    assert_eq!(s.final_ratings[0].key, "document_quality");

    // Incomplete final answers are refused; complete ones end the session with the code.
    let seq = ws.next_seq();
    ws.send(&ClientFrame::FinalAnswers {
        client_seq: seq,
        ratings: BTreeMap::new(),
        answers: BTreeMap::new(),
    })
    .await;
    ws.expect_error("incomplete").await;
    let seq = ws.next_seq();
    ws.send(&ClientFrame::FinalAnswers {
        client_seq: seq,
        ratings: BTreeMap::from([("document_quality".to_string(), 8)]),
        answers: BTreeMap::from([(
            "comments".to_string(),
            "Nice, \"quick\", helpful.\nThanks".to_string(),
        )]),
    })
    .await;
    ws.expect_ack(seq).await;
    match ws.next().await {
        ServerFrame::Completed(c) => assert_eq!(c.code, "PILOT-DONE"),
        other => panic!("expected completed, got {other:?}"),
    }
    assert!(browser.page("quick-pilot").await.contains("PILOT-DONE"));

    // Everything is stored, with server-side timings.
    let mut conn = pool.get().unwrap();
    let study = db::studies::find_by_slug(&mut conn, "quick-pilot")
        .unwrap()
        .unwrap();
    let version = db::studies::current_version(&mut conn, study.id).unwrap();
    let sessions = db::sessions::list_for_version(&mut conn, version.id).unwrap();
    assert_eq!(sessions.len(), 1);
    let session = &sessions[0];
    assert_eq!(
        (session.state.as_str(), session.outcome),
        ("finished", Some(collabllm::db::vocab::Outcome::Completed))
    );
    assert!(
        session.consented_at.is_some()
            && session.first_message_at.is_some()
            && session.finished_at.is_some()
    );
    assert_eq!(session.consent_sha256.as_ref().map(String::len), Some(64));
    let messages = db::messages::list_for_session(&mut conn, session.id).unwrap();
    let roles: Vec<&str> = messages.iter().map(|m| m.role.as_str()).collect();
    assert_eq!(roles, ["user", "assistant", "user", "assistant"]);
    let reply = &messages[1];
    assert!(reply.ttft_ms.is_some() && reply.gen_ms.is_some() && reply.gen_tokens.unwrap() > 0);
    let policy: serde_json::Value =
        serde_json::from_str(reply.policy_json.as_ref().unwrap()).unwrap();
    assert_eq!(
        policy["fingerprint"],
        collabllm::engine::fetch::DEFAULT_MODEL_SHA256
    );
    assert!(policy["sampling"]["seed"].is_u64());
    let ratings = db::ratings::list_for_session(&mut conn, session.id).unwrap();
    let ratings: Vec<(i32, &str, i32)> = ratings
        .iter()
        .map(|r| (r.after_turn, r.rating_key.as_str(), r.value))
        .collect();
    assert_eq!(
        ratings,
        [
            (1, "interaction", 7),
            (2, "document_quality", 8),
            (2, "interaction", 9)
        ]
    );
    let revisions = db::revisions::list_for_session(&mut conn, session.id).unwrap();
    let authors: Vec<&str> = revisions.iter().map(|r| r.author.as_str()).collect();
    assert_eq!(authors, ["assistant_insert", "user"]);
    assert_eq!(revisions[1].content, edited);
    let answers = db::answers::list_for_session(&mut conn, session.id).unwrap();
    assert_eq!(answers[0].answer, "Nice, \"quick\", helpful.\nThanks");
    let ledger = db::assignments::list_for_version(&mut conn, version.id).unwrap();
    assert_eq!(ledger.len(), 1);
    assert_eq!(Some(ledger[0].arm_id), session.arm_id);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reply_interrupted_by_a_reconnect_completes_and_is_shown() {
    let db = TestDb::sqlite();
    let server = TestServer::start(state_with_model(&db));
    let (browser, mut ws, _) = consented(&server, "quick-pilot", "pid-reconnect").await;
    let seq = ws.say("Write a note about moving a meeting.").await;
    ws.until(|f| matches!(f, ServerFrame::Token { .. })).await;
    drop(ws); // the page is refreshed mid-stream

    let mut ws = socket_of(&server, &browser).await;
    let s = state_of(ws.hello().await);
    let stored = s.messages.iter().any(|m| m.role == MessageRole::Assistant);
    assert!(
        stored || s.streaming.is_some(),
        "the reply is shown after reconnect: {s:?}"
    );
    if !stored {
        ws.until(|f| matches!(f, ServerFrame::AssistantDone { .. }))
            .await;
    }
    let mut again = socket_of(&server, &browser).await;
    let s = state_of(again.hello().await);
    assert_eq!(s.messages.len(), 2);
    assert_eq!(s.last_client_seq, seq);
    assert!(!s.messages[1].content.is_empty());
}

crate::on_both_backends_async!(a_resent_frame_is_applied_once);

async fn a_resent_frame_is_applied_once(db: TestDb) {
    let state = TestApp::new(&db).state();
    let pool = state.pool.clone();
    let server = TestServer::start(state);
    let (_, mut ws, _) = consented(&server, "quick-pilot", "pid-resend").await;
    let doc = ClientFrame::DocUpdate {
        client_seq: 1,
        base_rev: 0,
        content: "Draft".into(),
        inserted_message: None,
    };
    ws.send(&doc).await;
    assert_eq!(ws.expect_ack(1).await, Some(1));
    ws.send(&doc).await;
    assert_eq!(
        ws.expect_ack(1).await,
        None,
        "a resend is acknowledged, not applied"
    );
    let message = ClientFrame::UserMessage {
        client_seq: 2,
        text: "Hello".into(),
    };
    ws.send(&message).await;
    ws.until(|f| matches!(f, ServerFrame::AssistantDone { .. }))
        .await;
    ws.send(&message).await;
    ws.expect_ack(2).await;
    ws.send(&ClientFrame::Event {
        client_seq: 3,
        kind: "blur".into(),
        data: serde_json::json!({"at": 1}),
    })
    .await;
    ws.expect_ack(3).await;
    ws.send(&ClientFrame::Event {
        client_seq: 3,
        kind: "blur".into(),
        data: serde_json::json!({"at": 1}),
    })
    .await;
    ws.expect_ack(3).await;

    let mut conn = pool.get().unwrap();
    let session = only_session(&mut conn);
    let users = db::messages::list_for_session(&mut conn, session.id)
        .unwrap()
        .into_iter()
        .filter(|m| m.role == MessageRole::User)
        .count();
    assert_eq!(users, 1);
    assert_eq!(
        db::revisions::list_for_session(&mut conn, session.id)
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        db::events::list_for_session(&mut conn, session.id)
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn two_participants_see_only_their_own_session() {
    let db = TestDb::sqlite();
    let server = TestApp::new(&db).start();
    let (a, mut ws_a, _) = consented(&server, "quick-pilot", "pid-a").await;
    let (b, mut ws_b, _) = consented(&server, "quick-pilot", "pid-b").await;
    assert_ne!(a.token, b.token);
    ws_a.chat("Secret of A: the tomatoes.").await;
    // B's socket got nothing of A's conversation, and B's state has none of it.
    let s = state_of(ws_b.hello().await);
    assert!(s.messages.is_empty(), "{s:?}");
    // A's token named on B's connection is refused; the connection stays B's.
    let refused = ws_b.hello_with(a.token.as_ref().unwrap()).await;
    assert!(
        matches!(refused, ServerFrame::Error { ref code, .. } if code == "wrong_session"),
        "{refused:?}"
    );
    // A's token alone, on a connection without A's cookie, opens nothing.
    let mut stranger = Socket::connect(&server.addr.to_string(), "quick-pilot", None).await;
    let refused = stranger.hello_with(a.token.as_ref().unwrap()).await;
    assert!(
        matches!(refused, ServerFrame::Error { ref code, .. } if code == "unauthorized"),
        "{refused:?}"
    );
    stranger
        .send(&ClientFrame::UserMessage {
            client_seq: 1,
            text: "Let me in".into(),
        })
        .await;
    stranger.expect_error("not_authenticated").await;
    // With B's cookie, naming A's token gets B nothing of A's either.
    let mut b_naming_a = socket_of(&server, &b).await;
    let refused = b_naming_a.hello_with(a.token.as_ref().unwrap()).await;
    assert!(
        matches!(refused, ServerFrame::Error { ref code, .. } if code == "wrong_session"),
        "{refused:?}"
    );
    // B's page is B's: a browser without A's cookie never sees A's workspace.
    assert!(!b
        .page("quick-pilot")
        .await
        .contains(a.token.as_ref().unwrap()));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_client_never_learns_the_arm_model_or_prompt() {
    let db = TestDb::sqlite();
    let server = TestApp::new(&db).start();
    let (browser, mut ws, _) = consented(&server, "quick-pilot", "pid-blind").await;
    let page = browser.page("quick-pilot").await;
    let mut seen = page.clone();
    ws.say("Hi").await;
    let (_, frames) = ws
        .until(|f| matches!(f, ServerFrame::AssistantDone { .. }))
        .await;
    for f in frames {
        seen.push_str(&serde_json::to_string(&f).unwrap());
    }
    ws.send(&ClientFrame::Hello {
        session_token: None,
    })
    .await;
    let (again, frames) = ws.until(|f| matches!(f, ServerFrame::State(_))).await;
    for f in frames.iter().chain([&again]) {
        seen.push_str(&serde_json::to_string(f).unwrap());
    }
    let js = reqwest::get(server.url("/static/workspace.js"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    seen.push_str(&js);
    for secret in [
        "proactive",
        "smollm2",
        "SmolLM2",
        "Ask one clarifying question",
        "temperature",
        "sampling",
        ".gguf",
    ] {
        assert!(!seen.contains(secret), "the client saw {secret:?}");
    }
    let headers = Browser::new(&server.url(""))
        .enter("quick-pilot", None)
        .await;
    let csp = headers
        .headers()
        .get("content-security-policy")
        .unwrap()
        .to_str()
        .unwrap();
    assert!(csp.contains("script-src 'self'"), "{csp}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_frames_get_error_frames_and_the_connection_survives() {
    let db = TestDb::sqlite();
    let state = TestApp::new(&db).state();
    pilot_with(&state, |t| {
        t.replace("messages_per_minute = 30", "messages_per_minute = 1")
    });
    let pool = state.pool.clone();
    let server = TestServer::start(state);
    let (_, mut ws, _) = consented(&server, "quick-pilot", "pid-bad").await;

    let mut fresh = Socket::connect(&server.addr.to_string(), "quick-pilot", None).await;
    fresh.send(&ClientFrame::Stop { client_seq: 1 }).await;
    fresh.expect_error("not_authenticated").await;
    assert!(
        matches!(fresh.hello().await, ServerFrame::Error { ref code, .. } if code == "unauthorized")
    );
    let mut forged =
        Socket::connect(&server.addr.to_string(), "quick-pilot", Some("not-a-token")).await;
    assert!(
        matches!(forged.hello().await, ServerFrame::Error { ref code, .. } if code == "unauthorized")
    );

    ws.raw("this is not json").await;
    ws.expect_error("bad_frame").await;
    ws.raw(r#"{"type":"user_message","client_seq":"one"}"#)
        .await;
    ws.expect_error("bad_frame").await;
    ws.raw(r#"{"type":"launch_missiles","client_seq":1}"#).await;
    ws.expect_error("bad_frame").await;
    ws.send_raw(Message::binary(vec![0u8, 159, 146, 150]))
        .await
        .unwrap();
    ws.expect_error("bad_frame").await;
    // The NUL character, which PostgreSQL cannot store, in a message and in a document; an
    // escaped backslash before "u0000" is text like any other.
    for text in [r"hi\u0000there", r"x\\\u0000"] {
        let seq = ws.next_seq();
        ws.raw(&format!(
            r#"{{"type":"user_message","client_seq":{seq},"text":"{text}"}}"#
        ))
        .await;
        ws.expect_error("bad_frame").await;
    }
    let seq = ws.next_seq();
    ws.send(&ClientFrame::DocUpdate {
        client_seq: seq,
        base_rev: 0,
        content: "Dear Jo,\0".into(),
        inserted_message: None,
    })
    .await;
    ws.expect_error("bad_frame").await;
    let seq = ws.next_seq();
    ws.send(&ClientFrame::UserMessage {
        client_seq: seq,
        text: "x".repeat(8 * 1024 + 1),
    })
    .await;
    ws.expect_error("too_large").await;
    let seq = ws.next_seq();
    ws.send(&ClientFrame::DocUpdate {
        client_seq: seq,
        base_rev: 0,
        content: "y".repeat(200 * 1024 + 1),
        inserted_message: None,
    })
    .await;
    ws.expect_error("too_large").await;
    let seq = ws.next_seq();
    ws.send(&ClientFrame::DocUpdate {
        client_seq: seq,
        base_rev: 5,
        content: "stale".into(),
        inserted_message: None,
    })
    .await;
    ws.expect_error("conflict").await;
    ws.rate("interaction", 5).await;
    ws.expect_error("invalid_rating").await;
    let seq = ws.next_seq();
    ws.send(&ClientFrame::Event {
        client_seq: seq,
        kind: "k".repeat(65),
        data: serde_json::Value::Null,
    })
    .await;
    ws.expect_error("bad_event").await;

    // Rate limit: one message per minute in this protocol.
    ws.chat("First message.").await;
    ws.until(|f| matches!(f, ServerFrame::RatingRequest { .. }))
        .await;
    ws.rate("interaction", 11).await;
    ws.expect_error("invalid_rating").await;
    let seq = ws.rate("interaction", 5).await;
    ws.expect_ack(seq).await;
    ws.say("Second, too soon.").await;
    ws.expect_error("rate_limited").await;

    // After all that the connection still works and nothing stored was lost.
    let s = state_of(ws.hello().await);
    assert_eq!(s.messages.len(), 2);
    let mut conn = pool.get().unwrap();
    let session = only_session(&mut conn);
    assert_eq!(
        db::messages::list_for_session(&mut conn, session.id)
            .unwrap()
            .len(),
        2
    );
    assert!(db::revisions::list_for_session(&mut conn, session.id)
        .unwrap()
        .is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn declining_consent_ends_with_the_no_consent_code() {
    let db = TestDb::sqlite();
    let server = TestApp::new(&db).start();
    let mut browser = Browser::new(&server.url(""));
    browser.enter("quick-pilot", Some("pid-no")).await;
    browser.consent("quick-pilot", "decline").await;
    assert!(browser
        .page("quick-pilot")
        .await
        .contains("PILOT-NOCONSENT"));
    // Coming back with the same PID shows the same outcome, not a new session.
    let mut again = Browser::new(&server.url(""));
    again.enter("quick-pilot", Some("pid-no")).await;
    assert!(again.page("quick-pilot").await.contains("PILOT-NOCONSENT"));
    let unknown = Browser::new(&server.url(""))
        .enter("no-such-study", None)
        .await;
    assert_eq!(unknown.status(), 404);
    let page = unknown.text().await.unwrap();
    assert!(
        page.contains("there is no study"),
        "participants get a page, not JSON: {page}"
    );
    // A browser that refuses cookies is told so instead of being sent round in circles.
    let no_cookies = reqwest::get(server.url("/s/quick-pilot")).await.unwrap();
    assert!(no_cookies
        .text()
        .await
        .unwrap()
        .contains("Cookies are needed"));
}

crate::on_both_backends!(balanced_assignment_of_300_entries, |db: &TestDb| {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let pool = db.pool();
        let loaded = crate::common::example_protocol();
        db::studies::import(&mut pool.get().unwrap(), &loaded).unwrap();
        let studio =
            collabllm::study::Studio::new(pool.clone(), collabllm::engine::Engines::new()).unwrap();
        let mut first_arm = None;
        for i in 0..300 {
            let entry = studio
                .enter(
                    "doc-cocreation".into(),
                    collabllm::study::Arrival {
                        external_id: Some(format!("pid-{i}")),
                        resume_proof: Some(format!("ps-{i}")),
                    },
                    None,
                    true,
                )
                .await
                .unwrap();
            let session = studio.agree(entry.session.id).await.unwrap();
            if i == 0 {
                first_arm = session.arm_id;
            }
        }
        let mut conn = pool.get().unwrap();
        let study = db::studies::find_by_slug(&mut conn, "doc-cocreation")
            .unwrap()
            .unwrap();
        let version = db::studies::current_version(&mut conn, study.id).unwrap();
        let ledger = db::assignments::list_for_version(&mut conn, version.id).unwrap();
        assert_eq!(ledger.len(), 300);
        let mut counts = std::collections::HashMap::new();
        for a in &ledger {
            *counts.entry(a.arm_id).or_insert(0) += 1;
        }
        let (min, max) = (
            counts.values().min().unwrap(),
            counts.values().max().unwrap(),
        );
        assert_eq!(counts.len(), 3);
        assert!(
            max - min <= 3,
            "arm counts differ by more than one block: {counts:?}"
        );
        let mut topics = std::collections::HashMap::new();
        for a in &ledger {
            *topics.entry(a.task_id.clone()).or_insert(0) += 1;
        }
        assert!(topics.values().all(|n| *n == 100), "{topics:?}");
        let inputs: serde_json::Value = serde_json::from_str(&ledger[5].inputs_json).unwrap();
        assert_eq!(inputs["arm"]["seed"], 20250713);
        // A returning participant (with Prolific's session id) keeps their session and arm.
        let arrival = collabllm::study::Arrival {
            external_id: Some("pid-0".into()),
            resume_proof: Some("ps-0".into()),
        };
        let back = studio
            .enter("doc-cocreation".into(), arrival, None, true)
            .await
            .unwrap();
        assert_eq!(back.session.arm_id, first_arm);
        assert_eq!(
            db::sessions::list_for_version(&mut conn, version.id)
                .unwrap()
                .len(),
            300
        );
    });
});

/// Consents that arrive together, on several nodes, take consecutive places in the seeded
/// sequence of draws: each draw reads the ledger only once it holds the ledger's lock. The
/// consents are let in together by holding that lock from another connection while they start
/// (on SQLite: the database's write lock).
async fn simultaneous_consents_on_several_nodes_take_consecutive_places(db: TestDb) {
    use diesel::connection::SimpleConnection;
    let pool = db.pool();
    db::studies::import(&mut pool.get().unwrap(), &crate::common::example_protocol()).unwrap();
    let nodes: Vec<_> = (0..3)
        .map(|_| {
            collabllm::study::Studio::new(pool.clone(), collabllm::engine::Engines::new()).unwrap()
        })
        .collect();
    let mut sessions = Vec::new();
    for i in 0..12 {
        let arrival = collabllm::study::Arrival {
            external_id: Some(format!("pid-{i}")),
            resume_proof: None,
        };
        let entry = nodes[0]
            .enter("doc-cocreation".into(), arrival, None, true)
            .await
            .unwrap();
        sessions.push(entry.session.id);
    }
    let mut conn = db.conn();
    let study = db::studies::find_by_slug(&mut conn, "doc-cocreation")
        .unwrap()
        .unwrap();
    let version = db::studies::current_version(&mut conn, study.id).unwrap();
    let hold = match &conn {
        db::DbConn::Postgres(_) => format!(
            "BEGIN; SELECT 1 FROM study_versions WHERE id = {} FOR UPDATE",
            version.id
        ),
        db::DbConn::Sqlite(_) => "BEGIN IMMEDIATE".to_string(),
    };
    conn.batch_execute(&hold).unwrap();
    let consents: Vec<_> = sessions
        .iter()
        .enumerate()
        .map(|(i, &id)| {
            let node = nodes[i % nodes.len()].clone();
            tokio::spawn(async move { node.agree(id).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    conn.batch_execute("COMMIT").unwrap();
    for consent in consents {
        consent.await.unwrap().unwrap();
    }
    let ledger = db::assignments::list_for_version(&mut conn, version.id).unwrap();
    assert_eq!(ledger.len(), 12);
    for a in &ledger {
        let inputs: serde_json::Value = serde_json::from_str(&a.inputs_json).unwrap();
        assert_eq!(
            inputs["arm"]["draw_index"], a.draw_index,
            "draw {} chose its arm for another place in the sequence: {inputs}",
            a.draw_index
        );
    }
    for block in ledger.chunks(3) {
        let arms: std::collections::HashSet<_> = block.iter().map(|a| a.arm_id).collect();
        assert_eq!(arms.len(), 3, "a block of three lacks an arm: {block:?}");
    }
}
crate::on_both_backends_async!(simultaneous_consents_on_several_nodes_take_consecutive_places);

/// The `collabllm serve` binary on a free port, over `database`.
pub struct ServeProcess {
    child: std::process::Child,
    pub host: String,
}

/// A loopback port nothing listens on, below the ephemeral range where the servers of this
/// process take theirs (one of them could take a port between this check and the child's bind).
pub fn free_port() -> u16 {
    loop {
        let port = rand::random_range(20_000..30_000);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

impl ServeProcess {
    /// The quick pilot over `database`.
    fn start(database: &str, port: u16) -> Self {
        Self::start_with(
            database,
            port,
            &repo_root().join("study-protocols/quick-pilot.toml"),
            &[],
        )
    }

    /// The study of `protocol` over `database`, with these environment variables.
    pub fn start_with(
        database: &str,
        port: u16,
        protocol: &std::path::Path,
        env: &[(&str, &str)],
    ) -> Self {
        crate::common::needs_full_tier("a serve process with the real model");
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_collabllm"));
        // A write past a file size limit (`limit_file_size`) fails with EFBIG, as on a full
        // disk, instead of ending the process.
        // SAFETY: signal(2) is async-signal-safe; an ignored signal stays ignored across exec.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut command, || {
                libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                Ok(())
            });
        }
        let child = command
            .args([
                "--database-url",
                database,
                "--models-dir",
                models_dir().to_str().unwrap(),
            ])
            .args(["serve", "--bind", &format!("127.0.0.1:{port}")])
            .arg("--protocol")
            .arg(protocol)
            .env("COLLABLLM_LOG", "warn")
            .envs(env.iter().copied())
            // Through a pipe, so that a file size limit never applies to the log (the test's own
            // output may be a file), and shown with the test's output.
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start collabllm serve");
        let mut child = child;
        let log = child.stderr.take().expect("piped stderr");
        std::thread::spawn(move || {
            for line in std::io::BufRead::lines(std::io::BufReader::new(log)).map_while(Result::ok)
            {
                eprintln!("serve: {line}");
            }
        });
        let host = format!("127.0.0.1:{port}");
        let mut server = Self { child, host };
        let started = std::time::Instant::now();
        while std::net::TcpStream::connect(&server.host).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "serve did not start"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        // What answers is this process (it did not exit, e.g. because the port was taken).
        std::thread::sleep(Duration::from_millis(200));
        if let Some(status) = server.child.try_wait().unwrap() {
            panic!("serve exited ({status}) after starting");
        }
        server
    }

    /// No file of the process may grow past `bytes` (`None`: no limit), as on a disk that is
    /// full: the limit is the process's own RLIMIT_FSIZE, changed while it runs.
    pub fn limit_file_size(&self, bytes: Option<u64>) {
        let limit = libc::rlimit {
            rlim_cur: bytes.unwrap_or(libc::RLIM_INFINITY),
            rlim_max: libc::RLIM_INFINITY,
        };
        let pid = libc::pid_t::try_from(self.child.id()).unwrap();
        // SAFETY: prlimit(2) reads `limit` and writes nothing (no old limit asked for).
        let done = unsafe { libc::prlimit(pid, libc::RLIMIT_FSIZE, &limit, std::ptr::null_mut()) };
        assert_eq!(done, 0, "prlimit: {}", std::io::Error::last_os_error());
    }

    /// Asks the process to stop, as systemd, Kubernetes or Ctrl-C do (SIGTERM).
    pub fn terminate(&self) {
        let pid = libc::pid_t::try_from(self.child.id()).unwrap();
        // SAFETY: kill(2) with a signal number only sends the signal.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0, "SIGTERM sent");
    }

    /// Waits for the process to exit by itself, at most `within`.
    pub fn wait(mut self, within: Duration) -> std::process::ExitStatus {
        let started = std::time::Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                started.elapsed() < within,
                "serve did not exit within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Ends the process at once, as a crash or `kill -9` would.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for ServeProcess {
    /// A test that fails leaves no server behind.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_server_loses_nothing_that_was_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let database = format!("sqlite://{}", dir.path().join("study.sqlite3").display());
    let port = free_port();
    let server = ServeProcess::start(&database, port);
    let base = format!("http://{}", server.host);
    let mut browser = Browser::new(&base);
    browser.enter("quick-pilot", Some("pid-crash")).await;
    browser.consent("quick-pilot", "agree").await;
    let mut ws = Socket::connect(&server.host, "quick-pilot", browser.token.as_deref()).await;
    state_of(ws.hello().await);
    ws.send(&ClientFrame::DocUpdate {
        client_seq: 1,
        base_rev: 0,
        content: "Saved draft".into(),
        inserted_message: None,
    })
    .await;
    assert_eq!(ws.expect_ack(1).await, Some(1));
    ws.send(&ClientFrame::UserMessage {
        client_seq: 2,
        text: "Please write the note.".into(),
    })
    .await;
    ws.expect_ack(2).await;
    server.kill(); // in the middle of the reply

    let server = ServeProcess::start(&database, port);
    let mut ws = Socket::connect(&server.host, "quick-pilot", browser.token.as_deref()).await;
    let s = state_of(ws.hello().await);
    assert_eq!(s.document.content, "Saved draft");
    assert_eq!(s.messages[0].content, "Please write the note.");
    assert_eq!(s.last_client_seq, 2);
    // The reply that was cut off is generated again.
    if s.messages.len() < 2 {
        ws.until(|f| matches!(f, ServerFrame::AssistantDone { .. }))
            .await;
    }
    let mut check = Socket::connect(&server.host, "quick-pilot", browser.token.as_deref()).await;
    let s = state_of(check.hello().await);
    assert_eq!(s.messages.len(), 2);
    server.kill();
}

crate::on_both_backends_async!(idle_sessions_end_with_the_timed_out_code);

async fn idle_sessions_end_with_the_timed_out_code(db: TestDb) {
    let state = TestApp::new(&db).state();
    let studio = state.studio.clone();
    let pool = state.pool.clone();
    let server = TestServer::start(state);
    let (browser, _ws, _) = consented(&server, "quick-pilot", "pid-idle").await;
    let now = db::now();
    assert_eq!(
        studio.expire_idle_sessions(now).await.unwrap(),
        0,
        "an active session stays"
    );
    // The pilot allows the default 60 idle minutes.
    let later = now + chrono::Duration::minutes(61);
    // Two nodes sweeping at the same moment end it once.
    let other_node =
        collabllm::study::Studio::new(pool.clone(), collabllm::engine::Engines::new()).unwrap();
    let (here, there) = tokio::join!(
        studio.expire_idle_sessions(later),
        other_node.expire_idle_sessions(later)
    );
    assert_eq!(here.unwrap() + there.unwrap(), 1);
    let session = only_session(&mut pool.get().unwrap());
    assert_eq!(
        (session.state.as_str(), session.completion_code.as_deref()),
        ("timed_out", Some("PILOT-TIMEOUT"))
    );
    assert!(browser.page("quick-pilot").await.contains("PILOT-TIMEOUT"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_shared_browser_follows_the_participant_id_in_the_link() {
    let db = TestDb::sqlite();
    let server = TestApp::new(&db).start();
    let mut browser = Browser::new(&server.url(""));
    browser.enter("quick-pilot", Some("first-person")).await;
    let first = browser.token.clone();
    browser.consent("quick-pilot", "agree").await;
    // Same browser (cookie kept), another participant's link: a session of their own.
    browser.enter("quick-pilot", Some("second-person")).await;
    assert_ne!(browser.token, first);
    assert!(
        browser.page("quick-pilot").await.contains("I agree"),
        "the second person starts at consent"
    );
    // The cookie alone, without a link id, resumes whoever used the browser last.
    let response = browser.enter("quick-pilot", None).await;
    assert_eq!(response.status(), 303);
    assert!(browser.page("quick-pilot").await.contains("I agree"));
}

#[tokio::test(flavor = "multi_thread")]
async fn comparison_turns_offer_two_replies_and_record_the_pick() {
    let db = TestDb::sqlite();
    let state = state_with_model(&db);
    pilot_with(&state, |t| {
        t.replace(
            "assignment = \"least_filled\"",
            "assignment = \"least_filled\"\ncompare_every_turns = 1",
        )
    });
    let pool = state.pool.clone();
    let server = TestServer::start(state);
    let (_, mut ws, _) = consented(&server, "quick-pilot", "pid-compare").await;
    let seq = ws.next_seq();
    ws.send(&ClientFrame::Choose {
        client_seq: seq,
        choice: "a".into(),
    })
    .await;
    ws.expect_error("not_allowed").await;

    let mut picked = Vec::new();
    for (turn, choice) in [(1, "b"), (2, "tie")] {
        let seq = ws.next_seq();
        ws.send(&ClientFrame::UserMessage {
            client_seq: seq,
            text: format!("Turn {turn}: write the note."),
        })
        .await;
        let (start, _) = ws
            .until(|f| matches!(f, ServerFrame::AssistantStart { .. }))
            .await;
        assert!(matches!(
            start,
            ServerFrame::AssistantStart {
                comparison: true,
                ..
            }
        ));
        let (offer, before) = ws.until(|f| matches!(f, ServerFrame::Comparison(_))).await;
        let ServerFrame::Comparison(offer) = offer else {
            unreachable!()
        };
        assert_eq!(offer.candidates.len(), 2);
        let streamed: Vec<String> = (0..2)
            .map(|i| {
                before
                    .iter()
                    .filter_map(|f| match f {
                        ServerFrame::Token {
                            delta, candidate, ..
                        } if *candidate == Some(i) => Some(delta.as_str()),
                        _ => None,
                    })
                    .collect()
            })
            .collect();
        assert_eq!(
            streamed[0], offer.candidates[0],
            "candidate 0 streams its own text"
        );
        // Candidate 1 streams its own text too, unless it repeated candidate 0: then it was
        // sampled again (unseeded here, so a short reply may repeat in every round; the
        // resampling itself is checked with a scripted model by
        // `simulate::a_comparison_never_offers_the_same_reply_twice`).
        if !collabllm::engine::same_reply(&streamed[0], &streamed[1]) {
            assert_eq!(
                streamed[1], offer.candidates[1],
                "candidate 1 streams its own text"
            );
        }
        // Sending while the pick is due is refused; a bad pick too.
        ws.say("wait").await;
        ws.expect_error("not_allowed").await;
        let seq = ws.next_seq();
        ws.send(&ClientFrame::Choose {
            client_seq: seq,
            choice: "c".into(),
        })
        .await;
        ws.expect_error("bad_choice").await;
        let seq = ws.next_seq();
        ws.send(&ClientFrame::Choose {
            client_seq: seq,
            choice: choice.into(),
        })
        .await;
        ws.expect_ack(seq).await;
        let s = state_of(ws.next().await);
        let kept = if choice == "b" {
            &offer.candidates[1]
        } else {
            &offer.candidates[0]
        };
        assert_eq!(&s.messages.last().unwrap().content, kept);
        assert_eq!(s.phase, SessionState::Rating);
        assert!(s.comparison.is_none());
        let seq = ws.rate("interaction", 6).await;
        ws.expect_ack(seq).await;
        ws.until(|f| matches!(f, ServerFrame::State(_))).await;
        picked.push(offer);
    }

    let mut conn = pool.get().unwrap();
    let session = only_session(&mut conn);
    let chosen: Vec<Option<bool>> = db::candidates::list_for_session(&mut conn, session.id)
        .unwrap()
        .iter()
        .map(|c| c.chosen)
        .collect();
    assert_eq!(chosen, [Some(false), Some(true), Some(true), Some(true)]);
    let dir = tempfile::tempdir().unwrap();
    let options = collabllm::export::pairs::PairOptions {
        edit_threshold: 0.2,
        eval_share: 0.0,
    };
    let counts =
        collabllm::export::pairs::export(&mut conn, "quick-pilot", &options, dir.path()).unwrap();
    // A pick between replies of the same text (a short answer sampled twice) is no preference,
    // and a tie of two equal texts labels one reply.
    let same = |offer: &collabllm::study::frames::ComparisonView| {
        collabllm::engine::same_reply(&offer.candidates[0], &offer.candidates[1])
    };
    let expected_pairs = u64::from(!same(&picked[0]));
    let expected_kto = if same(&picked[1]) { 1 } else { 2 };
    assert_eq!(
        (counts.train, counts.kto_train),
        (expected_pairs, expected_kto)
    );
    let train = std::fs::read_to_string(dir.path().join("train.jsonl")).unwrap();
    if let Some(line) = train.lines().next() {
        let row: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(
            row["chosen"][0]["content"],
            picked[0].candidates[1].as_str()
        );
        assert_eq!(
            row["rejected"][0]["content"],
            picked[0].candidates[0].as_str()
        );
        assert_eq!(row["metadata"]["source"], "compare");
        assert_eq!(
            row["prompt"].as_array().unwrap().last().unwrap()["role"],
            "user"
        );
    }
    let kto = std::fs::read_to_string(dir.path().join("kto_train.jsonl")).unwrap();
    for line in kto.lines() {
        let row: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(row["label"], true, "a tie labels both replies good");
        assert_eq!(row["completion"][0]["role"], "assistant");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn asking_for_another_reply_lets_the_participant_keep_one() {
    let db = TestDb::sqlite();
    let state = state_with_model(&db);
    let pool = state.pool.clone();
    let server = TestServer::start(state);
    let (browser, mut ws, _) = consented(&server, "quick-pilot", "pid-regenerate").await;
    let seq = ws.next_seq();
    ws.send(&ClientFrame::Regenerate { client_seq: seq }).await;
    ws.expect_error("not_allowed").await;
    let first = ws.chat("Write a note about the plants.").await;
    ws.until(|f| matches!(f, ServerFrame::RatingRequest { .. }))
        .await;
    let seq = ws.next_seq();
    ws.send(&ClientFrame::Regenerate { client_seq: seq }).await;
    ws.expect_error("not_allowed").await; // the rating comes first
    let seq = ws.rate("interaction", 4).await;
    ws.expect_ack(seq).await;
    ws.until(|f| matches!(f, ServerFrame::State(_))).await;

    let seq = ws.next_seq();
    ws.send(&ClientFrame::Regenerate { client_seq: seq }).await;
    ws.expect_ack(seq).await;
    let (offer, _) = ws.until(|f| matches!(f, ServerFrame::Comparison(_))).await;
    let ServerFrame::Comparison(offer) = offer else {
        unreachable!()
    };
    assert_eq!(
        offer.candidates[0], first,
        "the earlier reply is candidate A"
    );
    // While choosing, the reply asked to be replaced still counts as a turn, and the page is the
    // workspace: no completion code for a session that has not finished.
    let mut other_tab = socket_of(&server, &browser).await;
    let choosing = state_of(other_tab.hello().await);
    assert_eq!(
        (choosing.phase, choosing.turn, &choosing.completed),
        (SessionState::Choosing, 1, &None)
    );
    let page = browser.page("quick-pilot").await;
    assert!(
        page.contains("id=\"app\"") && !page.contains("PILOT-DONE"),
        "{page}"
    );
    // The tab that took over goes on with the page's frame numbers.
    other_tab.seq = ws.seq;
    ws = other_tab;
    let seq = ws.next_seq();
    ws.send(&ClientFrame::Choose {
        client_seq: seq,
        choice: "a".into(),
    })
    .await;
    ws.expect_ack(seq).await;
    let s = state_of(ws.next().await);
    assert_eq!(
        s.phase,
        SessionState::Chatting,
        "the turn was rated already"
    );
    assert_eq!(s.messages.len(), 2);
    assert_eq!(s.messages[1].content, first);

    let mut conn = pool.get().unwrap();
    let session = only_session(&mut conn);
    let candidates = db::candidates::list_for_session(&mut conn, session.id).unwrap();
    let flags: Vec<(&str, Option<bool>)> = candidates
        .iter()
        .map(|c| (c.source.as_str(), c.chosen))
        .collect();
    assert_eq!(
        flags,
        [("regenerate", Some(true)), ("regenerate", Some(false))]
    );
    let messages = db::messages::list_for_session(&mut conn, session.id).unwrap();
    assert!(
        messages[1].ttft_ms.is_some(),
        "the kept reply keeps its timings"
    );
    let dir = tempfile::tempdir().unwrap();
    let options = collabllm::export::pairs::PairOptions {
        edit_threshold: 0.2,
        eval_share: 0.0,
    };
    let counts =
        collabllm::export::pairs::export(&mut conn, "quick-pilot", &options, dir.path()).unwrap();
    assert_eq!(counts.train, 1);
    let row: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(dir.path().join("train.jsonl"))
            .unwrap()
            .trim(),
    )
    .unwrap();
    assert_eq!(row["metadata"]["source"], "regenerate");
    assert_eq!(row["chosen"][0]["content"], first.as_str());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_tab_takes_the_session_over_and_no_frame_is_applied_twice() {
    let db = TestDb::sqlite();
    let state = TestApp::new(&db).state();
    let pool = state.pool.clone();
    let server = TestServer::start(state);
    let (browser, mut first, s) = consented(&server, "quick-pilot", "pid-tabs").await;
    let mut second = socket_of(&server, &browser).await;
    let s2 = state_of(second.hello().await);
    assert_eq!(s2.last_client_seq, s.last_client_seq);
    // The first tab is told, then closed: it cannot write with numbers the second one uses.
    first.expect_error("taken_over").await;
    let closed = first.closed().await;
    assert!(matches!(closed, ClientError::Closed(_)), "{closed:?}");
    // Both tabs numbered their next frame 1; only the owner's is applied, once.
    second.seq = s2.last_client_seq;
    second.chat("From the second tab.").await;
    let mut stale = socket_of(&server, &browser).await;
    state_of(stale.hello().await); // takes over from the second tab
    second.expect_error("taken_over").await;
    let mut conn = pool.get().unwrap();
    let session = only_session(&mut conn);
    let users: Vec<String> = db::messages::list_for_session(&mut conn, session.id)
        .unwrap()
        .into_iter()
        .filter(|m| m.role == MessageRole::User)
        .map(|m| m.content)
        .collect();
    assert_eq!(users, ["From the second tab."]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_frame_too_large_to_read_is_answered_before_the_socket_closes() {
    let db = TestDb::sqlite();
    let server = TestApp::new(&db).start();
    let (_, mut ws, _) = consented(&server, "quick-pilot", "pid-huge").await;
    let huge = format!(
        r#"{{"type":"event","client_seq":1,"kind":"x","data":"{}"}}"#,
        "a".repeat(5 * 1024 * 1024)
    );
    ws.raw(&huge).await;
    let error = ws.expect_error("too_large").await;
    assert!(format!("{error:?}").contains("closed"), "{error:?}");
    match ws.closed().await {
        ClientError::Closed(Some((code, _))) => assert_eq!(code, 1009),
        other => panic!("expected a close frame, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_rating_request_comes_before_assistant_done() {
    let db = TestDb::sqlite();
    let server = TestApp::new(&db).start();
    let (_, mut ws, _) = consented(&server, "quick-pilot", "pid-order").await;
    ws.say("A note for my neighbour.").await;
    let (done, before) = ws
        .until(|f| matches!(f, ServerFrame::AssistantDone { .. }))
        .await;
    assert!(
        before
            .iter()
            .any(|f| matches!(f, ServerFrame::RatingRequest { after_turn: 1, .. })),
        "{before:?}"
    );
    assert!(
        matches!(
            done,
            ServerFrame::AssistantDone {
                phase: SessionState::Rating,
                ..
            }
        ),
        "{done:?}"
    );
    // A client that rates as soon as the reply is done is in step with the server.
    let seq = ws.rate("interaction", 5).await;
    ws.expect_ack(seq).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reconnect_mid_reply_gets_each_token_exactly_once() {
    let db = TestDb::sqlite();
    let server = TestServer::start(state_with_model(&db));
    let (browser, mut ws, _) = consented(&server, "quick-pilot", "pid-tokens").await;
    ws.say("Write a long note about the garden, please.").await;
    ws.until(|f| matches!(f, ServerFrame::Token { index: 2.., .. }))
        .await;
    let mut again = socket_of(&server, &browser).await;
    let s = state_of(again.hello().await);
    let (done, frames) = again
        .until(|f| matches!(f, ServerFrame::AssistantDone { .. }))
        .await;
    let ServerFrame::AssistantDone { text, .. } = done else {
        unreachable!()
    };
    // Text of the snapshot, plus the tokens it did not have yet, is the reply: as a client that
    // skips indices below `streaming_tokens` builds it.
    let (mut shown, mut next) = match &s.streaming {
        Some(m) => (m.content.clone(), s.streaming_tokens),
        None => (String::new(), 0),
    };
    let mut skipped = 0;
    for f in &frames {
        if let ServerFrame::Token { index, delta, .. } = f {
            if *index < next {
                skipped += 1;
                continue;
            }
            assert_eq!(*index, next, "no token is missing");
            shown.push_str(delta);
            next += 1;
        }
    }
    if s.streaming.is_some() {
        assert_eq!(shown, text, "skipped {skipped} tokens the snapshot had");
    } else {
        assert!(
            s.messages.iter().any(|m| m.content == text),
            "the reply had finished: {s:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn document_saves_and_browser_events_are_limited_per_session() {
    let db = TestDb::sqlite();
    let state = TestApp::new(&db).state();
    let pool = state.pool.clone();
    let server = TestServer::start(state);
    let (_, mut ws, _) = consented(&server, "quick-pilot", "pid-flood").await;
    let mut rev = 0;
    let mut limited = None;
    for i in 0..100 {
        let seq = ws.next_seq();
        ws.send(&ClientFrame::DocUpdate {
            client_seq: seq,
            base_rev: rev,
            content: format!("draft {i}"),
            inserted_message: None,
        })
        .await;
        match ws
            .until(|f| matches!(f, ServerFrame::Ack { .. } | ServerFrame::Error { .. }))
            .await
            .0
        {
            ServerFrame::Ack { rev: Some(r), .. } => rev = r,
            ServerFrame::Error { code, .. } => {
                assert_eq!(code, "rate_limited");
                limited = Some(i);
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(limited, Some(90), "90 saves a minute, then a refusal");
    let mut events_limited = None;
    for i in 0..150 {
        let seq = ws.next_seq();
        ws.send(&ClientFrame::Event {
            client_seq: seq,
            kind: "focus".into(),
            data: serde_json::json!({"i": i}),
        })
        .await;
        if let ServerFrame::Error { code, .. } = ws
            .until(|f| matches!(f, ServerFrame::Ack { .. } | ServerFrame::Error { .. }))
            .await
            .0
        {
            assert_eq!(code, "rate_limited");
            events_limited = Some(i);
            break;
        }
    }
    assert_eq!(events_limited, Some(120));
    // Refused frames were not stored; the session goes on.
    let mut conn = pool.get().unwrap();
    let session = only_session(&mut conn);
    assert_eq!(
        db::revisions::list_for_session(&mut conn, session.id)
            .unwrap()
            .len(),
        90
    );
    assert_eq!(
        db::events::count_for_session(&mut conn, session.id).unwrap(),
        120
    );
    ws.chat("Still here.").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn new_sessions_per_address_are_limited_and_returning_browsers_are_not() {
    let db = TestDb::sqlite();
    let mut state = TestApp::new(&db).state();
    state.limits = std::sync::Arc::new(collabllm::web::limits::Limits::new(3, false));
    let studio = state.studio.clone();
    let server = TestServer::start(state);
    let mut browsers = Vec::new();
    for i in 0..3 {
        let mut b = Browser::new(&server.url(""));
        assert_eq!(
            b.enter("quick-pilot", Some(&format!("pid-{i}")))
                .await
                .status(),
            303
        );
        browsers.push(b);
    }
    let mut fourth = Browser::new(&server.url(""));
    let refused = fourth.enter("quick-pilot", Some("pid-3")).await;
    assert_eq!(refused.status(), 429);
    let page = refused.text().await.unwrap();
    assert!(page.contains("Too many sessions"), "{page}");
    // A returning browser is not a new session and still gets in.
    let back = browsers[0].enter("quick-pilot", Some("pid-0")).await;
    assert_eq!(back.status(), 303);
    assert!(browsers[0].page("quick-pilot").await.contains("I agree"));
    // Sockets that close leave nothing behind in memory.
    browsers[0].consent("quick-pilot", "agree").await;
    let mut ws = socket_of(&server, &browsers[0]).await;
    state_of(ws.hello().await);
    assert_eq!(studio.live_sessions(), 1);
    drop(ws);
    let started = std::time::Instant::now();
    while studio.live_sessions() > 0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the live session stays in memory"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_prolific_id_alone_does_not_open_a_session_in_another_browser() {
    let db = TestDb::sqlite();
    let state = TestApp::new(&db).state();
    let pool = state.pool.clone();
    let server = TestServer::start(state);
    let (owner, mut ws, _) = consented(&server, "quick-pilot", "pid-owned").await;
    ws.chat("My private draft.").await;
    ws.until(|f| matches!(f, ServerFrame::RatingRequest { .. }))
        .await;
    let seq = ws.rate("interaction", 6).await;
    ws.expect_ack(seq).await;
    let intruder = Browser::new(&server.url(""));
    let url = server.url("/s/quick-pilot?PROLIFIC_PID=pid-owned");
    let refused = intruder.http.get(url).send().await.unwrap();
    assert_eq!(refused.status(), 409);
    assert!(refused.headers().get("set-cookie").is_none());
    let page = refused.text().await.unwrap();
    assert!(
        page.contains("open in another browser") && !page.contains("private draft"),
        "{page}"
    );
    assert!(intruder.token.is_none());
    // A guessed Prolific session id is no proof either.
    let refused = intruder
        .http
        .get(server.url("/s/quick-pilot?PROLIFIC_PID=pid-owned&SESSION_ID=x2"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 409);
    // The owner's socket and page work as before, and pages carrying a session are not cached.
    ws.chat("Still mine.").await;
    let page = owner
        .http
        .get(server.url("/s/quick-pilot/p"))
        .header("cookie", owner.cookie())
        .send()
        .await
        .unwrap();
    assert_eq!(page.headers()["cache-control"], "no-store");
    assert!(!page
        .text()
        .await
        .unwrap()
        .contains(owner.token.as_ref().unwrap()));
    // The same participant with Prolific's session id resumes in a second browser.
    let mut own_second = Browser::new(&server.url(""));
    assert_eq!(
        own_second
            .enter("quick-pilot", Some("pid-owned"))
            .await
            .status(),
        303
    );
    let mut conn = pool.get().unwrap();
    let session = only_session(&mut conn);
    let kinds: Vec<String> = db::audit::list_for_session(&mut conn, session.id)
        .unwrap()
        .into_iter()
        .map(|a| a.kind)
        .collect();
    assert_eq!(
        kinds,
        ["entry_refused", "entry_refused", "moved_to_new_browser"]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_closing_page_beacon_applies_its_frames_once() {
    let db = TestDb::sqlite();
    let state = TestApp::new(&db).state();
    let pool = state.pool.clone();
    let server = TestServer::start(state);
    let (browser, _ws, s) = consented(&server, "quick-pilot", "pid-beacon").await;
    let frames = serde_json::json!([
        {"type": "doc_update", "client_seq": s.last_client_seq + 1, "base_rev": 0, "content": "Last words."},
        {"type": "event", "client_seq": s.last_client_seq + 2, "kind": "pagehide", "data": {}},
    ]);
    let send = |cookie: Option<String>, origin: &str| {
        let mut r = browser
            .http
            .post(server.url("/s/quick-pilot/frames"))
            .header("content-type", "text/plain")
            .header("origin", origin)
            .body(frames.to_string());
        if let Some(c) = cookie {
            r = r.header("cookie", c);
        }
        async move {
            let r = r.send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    let own = server.url("");
    // Another site's page, or no cookie: nothing is applied.
    assert_eq!(
        send(Some(browser.cookie()), "http://evil.example").await.0,
        401
    );
    assert_eq!(send(None, &own).await.0, 401);
    // The page's own beacon, sent twice (the socket may have delivered it too): applied once.
    for _ in 0..2 {
        let (status, body) = send(Some(browser.cookie()), &own).await;
        assert_eq!(status, 200, "{body}");
        let answers: Vec<ServerFrame> = serde_json::from_str(&body).unwrap();
        assert!(
            answers.iter().all(|f| matches!(f, ServerFrame::Ack { .. })),
            "{answers:?}"
        );
        assert_eq!(answers.len(), 2);
    }
    let mut conn = pool.get().unwrap();
    let session = only_session(&mut conn);
    let revisions = db::revisions::list_for_session(&mut conn, session.id).unwrap();
    assert_eq!(revisions.len(), 1);
    assert_eq!(revisions[0].content, "Last words.");
    assert_eq!(
        db::events::count_for_session(&mut conn, session.id).unwrap(),
        1
    );
}

/// A reply the participant stops is kept, marked as stopped, and is not a turn: stopping is no
/// way to reach the protocol's minimum. A scripted model writes until it is stopped.
#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_reply_is_kept_but_is_not_a_turn() {
    let db = TestDb::sqlite();
    let engine = crate::common::ScriptedEngine::holding(|_| "unused".into(), |_| true);
    let server = TestApp::new(&db)
        .scripted(std::sync::Arc::new(engine))
        .start();
    let (_, mut ws, _) = consented(&server, "quick-pilot", "pid-stop").await;
    ws.say("write me a note").await;
    ws.until(|f| matches!(f, ServerFrame::Token { .. })).await;
    let stop = ws.next_seq();
    ws.send(&ClientFrame::Stop { client_seq: stop }).await;
    let (done, _) = ws
        .until(|f| matches!(f, ServerFrame::AssistantDone { .. }))
        .await;
    let ServerFrame::AssistantDone {
        finish_reason,
        phase,
        ..
    } = done
    else {
        unreachable!()
    };
    assert_eq!(
        (finish_reason.as_str(), phase),
        ("cancelled", SessionState::Chatting),
        "no rating is due after a stopped reply"
    );
    let s = state_of(ws.hello().await);
    assert_eq!(s.turn, 0);
    let reply = s.messages.last().unwrap();
    assert_eq!(
        (
            reply.role,
            reply.content.as_str(),
            reply.finish_reason.as_deref()
        ),
        (MessageRole::Assistant, "Partial", Some("cancelled"))
    );
    assert!(!s.can_finish);
    // The export counts turns the same way.
    let dir = tempfile::tempdir().unwrap();
    collabllm::export::csv::export(
        &mut db.pool().get().unwrap(),
        "quick-pilot",
        &Default::default(),
        dir.path(),
        &|_, _| {},
    )
    .unwrap();
    let mut sessions = csv::Reader::from_path(dir.path().join("sessions.csv")).unwrap();
    let turns = sessions
        .headers()
        .unwrap()
        .iter()
        .position(|h| h == "turns")
        .unwrap();
    let row = sessions.records().next().unwrap().unwrap();
    assert_eq!(&row[turns], "0");
}

/// A reply that waits for the engine tells the participant its place in line as it moves up,
/// again after a reconnect, and says when it is being written.
#[tokio::test(flavor = "multi_thread")]
async fn a_queued_reply_shows_its_place_in_line() {
    let db = TestDb::sqlite();
    let engine = crate::common::ScriptedEngine::holding(
        |_| "Here is a draft.".into(),
        |r| {
            r.messages
                .last()
                .is_some_and(|m| m.content == "wait in line")
        },
    )
    .waiting_in_line(vec![2, 1, 0]);
    let server = TestApp::new(&db)
        .scripted(std::sync::Arc::new(engine))
        .start();
    let (_, mut ws, _) = consented(&server, "quick-pilot", "pid-queue").await;
    let places = |frames: &[ServerFrame]| -> Vec<Option<usize>> {
        frames
            .iter()
            .filter_map(|f| match f {
                ServerFrame::Queued { ahead, .. } => Some(*ahead),
                _ => None,
            })
            .collect()
    };

    ws.say("wait in line").await;
    let (last, before) = ws
        .until(|f| matches!(f, ServerFrame::Queued { ahead: Some(0), .. }))
        .await;
    let mut seen = places(&before);
    seen.extend(places(&[last]));
    assert_eq!(seen, [Some(2), Some(1), Some(0)]);
    let s = state_of(ws.hello().await);
    assert_eq!(s.queued_ahead, Some(0), "a reconnect shows the place");
    assert_eq!(s.streaming.map(|m| m.content), Some(String::new()));
    let stop = ws.next_seq();
    ws.send(&ClientFrame::Stop { client_seq: stop }).await;
    ws.until(|f| matches!(f, ServerFrame::AssistantDone { .. }))
        .await;

    ws.say("write it").await;
    let (_, before) = ws.until(|f| matches!(f, ServerFrame::Token { .. })).await;
    assert_eq!(
        places(&before),
        [Some(2), Some(1), Some(0), None],
        "the place counts down, then the reply is being written"
    );
    let (_, rest) = ws
        .until(|f| matches!(f, ServerFrame::AssistantDone { .. }))
        .await;
    assert!(places(&rest).is_empty());
    assert_eq!(state_of(ws.hello().await).queued_ahead, None);
}

/// A metric of the text format, by name and labels (in any order), e.g.
/// `collabllm_sessions{state="rating"}`.
pub(crate) fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let wanted: BTreeMap<&str, &str> = labels.iter().copied().collect();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let (key, value) = line.rsplit_once(' ')?;
            let (metric, labels) = match key.split_once('{') {
                Some((m, rest)) => (m, rest.strip_suffix('}')?),
                None => (key, ""),
            };
            let found: BTreeMap<&str, &str> = labels
                .split(',')
                .filter(|l| !l.is_empty())
                .filter_map(|l| {
                    let (k, v) = l.split_once('=')?;
                    Some((k, v.trim_matches('"')))
                })
                .collect();
            (metric == name && found == wanted).then(|| value.parse().ok())?
        })
}

/// Prometheus scrapes `/metrics` with a `/v1` key (it names arms and engines): the frames a
/// participant sent and the errors they got, by type; their reply's latencies under its arm;
/// sessions by state; the engine's queues, slots and tokens; and the database's work.
#[tokio::test(flavor = "multi_thread")]
async fn metrics_show_frames_replies_sessions_and_engines() {
    let db = TestDb::sqlite();
    let engine = crate::common::ScriptedEngine::new(|_| "A short draft for Jo.".into()).reporting(
        collabllm::engine::EngineStatus {
            slots: 4,
            active: 1,
            paused: 1,
            queued_by_priority: [2, 0, 1],
            generated_tokens: 120,
            prompt_tokens_processed: 40,
            prompt_tokens_reused: 360,
            running: true,
            ..Default::default()
        },
    );
    let server = TestApp::new(&db)
        .scripted(std::sync::Arc::new(engine))
        .start();
    let scrape = |key: Option<&'static str>| {
        let mut request = reqwest::Client::new().get(server.url("/metrics"));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        request.send()
    };
    assert_eq!(scrape(None).await.unwrap().status(), 401);
    assert_eq!(scrape(Some("wrong")).await.unwrap().status(), 401);

    let (_, mut ws, _) = consented(&server, "quick-pilot", "pid-metrics").await;
    ws.chat("A note for Jo, please.").await;
    ws.raw("not a frame").await;
    ws.expect_error("bad_frame").await;
    let seq = ws.next_seq();
    ws.send(&ClientFrame::Finish { client_seq: seq }).await;
    ws.expect_error("not_allowed").await;

    let response = scrape(Some(crate::common::TEST_API_KEY)).await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    let text = response.text().await.unwrap();
    let at_least = |name: &str, labels: &[(&str, &str)], n: f64| {
        let v = metric(&text, name, labels).unwrap_or_else(|| panic!("no {name} {labels:?}"));
        assert!(v >= n, "{name} {labels:?} = {v}, expected at least {n}");
    };
    at_least("collabllm_frames_total", &[("type", "user_message")], 1.0);
    at_least("collabllm_frames_total", &[("type", "invalid")], 1.0);
    at_least(
        "collabllm_frame_errors_total",
        &[("type", "finish"), ("code", "not_allowed")],
        1.0,
    );
    // The quick pilot asks for a rating after every turn: the only session waits for one.
    assert_eq!(
        metric(&text, "collabllm_sessions", &[("state", "rating")]),
        Some(1.0)
    );
    assert_eq!(
        metric(&text, "collabllm_sessions", &[("state", "finished")]),
        Some(0.0)
    );
    let session = only_session(&mut db.conn());
    let arm = db::studies::arms_of(&mut db.conn(), session.study_version_id)
        .unwrap()
        .into_iter()
        .find(|a| Some(a.id) == session.arm_id)
        .unwrap()
        .name;
    for histogram in [
        "collabllm_reply_queue_seconds_count",
        "collabllm_reply_first_token_seconds_count",
        "collabllm_reply_seconds_count",
    ] {
        at_least(histogram, &[("arm", &arm)], 1.0);
    }
    at_least("collabllm_db_work_seconds_count", &[], 1.0);
    let engine = |name: &str, extra: &[(&str, &str)]| {
        let mut labels = vec![("engine", "scripted")];
        labels.extend_from_slice(extra);
        metric(&text, name, &labels)
    };
    assert_eq!(engine("collabllm_engine_slots", &[]), Some(4.0));
    assert_eq!(engine("collabllm_engine_slots_active", &[]), Some(1.0));
    assert_eq!(engine("collabllm_engine_replies_paused", &[]), Some(1.0));
    assert_eq!(engine("collabllm_engine_running", &[]), Some(1.0));
    assert_eq!(
        engine("collabllm_engine_queued", &[("class", "participant")]),
        Some(2.0)
    );
    assert_eq!(
        engine("collabllm_engine_queued", &[("class", "background")]),
        Some(1.0)
    );
    assert!(
        engine(
            "collabllm_engine_tokens_total",
            &[("kind", "prompt_reused")]
        ) >= Some(360.0)
    );
    assert!(engine("collabllm_engine_tokens_total", &[("kind", "generated")]) >= Some(120.0));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_draining_node_finishes_its_replies_and_turns_new_messages_away() {
    let db = TestDb::sqlite();
    let reply = "One two three four five six seven eight nine ten.";
    // A's reply is written a word at a time; B's never ends.
    let engine = std::sync::Arc::new(
        crate::common::ScriptedEngine::holding(
            move |_| reply.into(),
            |r| crate::common::request_text(r).contains("take forever"),
        )
        .paced(Duration::from_millis(60)),
    );
    let state = TestApp::new(&db).scripted(engine.clone()).state();
    let studio = state.studio.clone();
    let server = TestServer::start(state);
    let (browser, mut a, _) = consented(&server, "quick-pilot", "pid-drain-a").await;
    let (_, mut b, _) = consented(&server, "quick-pilot", "pid-drain-b").await;
    let first = a.say("Please write the note.").await;
    a.expect_ack(first).await;
    a.until(|f| matches!(f, ServerFrame::Token { .. })).await;
    let seq = b.say("Please take forever.").await;
    b.expect_ack(seq).await;

    let drain = tokio::spawn(async move { studio.drain(Duration::from_secs(2)).await });
    let (done, _) = a
        .until(|f| matches!(f, ServerFrame::AssistantDone { .. }))
        .await;
    let ServerFrame::AssistantDone { text, .. } = done else {
        unreachable!()
    };
    assert_eq!(text, reply, "the reply in flight was finished");
    // A reply that does not end within the drain's time is left to the next node.
    assert_eq!(drain.await.unwrap(), 1, "B's reply was still in flight");

    let refused = a.say("And a shorter one?").await;
    let ServerFrame::Error { client_seq, .. } = a.expect_error("unavailable").await else {
        unreachable!()
    };
    assert_eq!(
        client_seq,
        Some(refused),
        "the page knows which frame to send again"
    );
    let s = state_of(socket_of(&server, &browser).await.hello().await);
    assert_eq!(s.messages.len(), 2, "the refused message was not stored");
    assert_eq!(s.messages[1].content, reply);
    assert_eq!(s.last_client_seq, first);
    assert_eq!(engine.requests.load(std::sync::atomic::Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_that_panics_mid_reply_restarts_and_the_reply_can_be_tried_again() {
    let dir = tempfile::tempdir().unwrap();
    let database = format!("sqlite://{}", dir.path().join("study.sqlite3").display());
    let server = ServeProcess::start_with(
        &database,
        free_port(),
        &repo_root().join("study-protocols/quick-pilot.toml"),
        &[
            ("COLLABLLM_FAULT_WORKER_PANIC", "PANIC-THE-WORKER"),
            ("COLLABLLM_API_KEYS", crate::common::TEST_API_KEY),
        ],
    );
    let mut browser = Browser::new(&format!("http://{}", server.host));
    browser.enter("quick-pilot", Some("pid-panic")).await;
    browser.consent("quick-pilot", "agree").await;
    let mut ws = Socket::connect(&server.host, "quick-pilot", browser.token.as_deref()).await;
    state_of(ws.hello().await);
    let seq = ws.say("Please write the note. PANIC-THE-WORKER").await;
    ws.expect_ack(seq).await;
    let (failed, before) = ws
        .until(|f| {
            matches!(
                f,
                ServerFrame::Error { .. } | ServerFrame::AssistantDone { .. }
            )
        })
        .await;
    assert!(
        matches!(&failed, ServerFrame::Error { code, .. } if code == "assistant_failed"),
        "{failed:?}"
    );
    assert!(
        before
            .iter()
            .any(|f| matches!(f, ServerFrame::Token { .. })),
        "the worker failed mid-reply"
    );

    // The worker restarted, and says so (the reply fails as the worker dies; the restart is
    // counted once its supervisor has seen it go, a moment later on a loaded machine).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let health = loop {
        let health: serde_json::Value = reqwest::get(format!("http://{}/healthz", server.host))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let counted = health["engines"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["restarts"] == 1);
        if counted || std::time::Instant::now() > deadline {
            break health;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(health["status"], "ok", "{health}");
    let restarted: Vec<_> = health["engines"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["restarts"] == 1)
        .collect();
    assert_eq!(restarted.len(), 1, "{health}");
    assert!(
        restarted[0]["last_failure"]
            .as_str()
            .unwrap()
            .contains("injected fault"),
        "{health}"
    );
    let metrics = reqwest::Client::new()
        .get(format!("http://{}/metrics", server.host))
        .bearer_auth(crate::common::TEST_API_KEY)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let arm = [("arm", "proactive")];
    assert_eq!(
        metric(&metrics, "collabllm_reply_failures_total", &arm),
        Some(1.0)
    );

    // "Try again": the restarted worker writes the reply.
    let seq = ws.next_seq();
    ws.send(&ClientFrame::Regenerate { client_seq: seq }).await;
    let (done, _) = ws
        .until(|f| matches!(f, ServerFrame::AssistantDone { .. }))
        .await;
    let ServerFrame::AssistantDone { text, .. } = done else {
        unreachable!()
    };
    assert!(!text.is_empty());
    let mut again = Socket::connect(&server.host, "quick-pilot", browser.token.as_deref()).await;
    let s = state_of(again.hello().await);
    assert_eq!(s.messages.len(), 2);
    assert_eq!(s.messages[1].content, text);
}
