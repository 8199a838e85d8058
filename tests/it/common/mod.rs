//! Helpers shared by the integration tests: a fresh database per test on either backend, the
//! real default model, and the real router served on a loopback port.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use collabllm::db::{self, DbConn, DbPool};
use collabllm::engine::fetch::default_model_path;
use collabllm::engine::{
    ChatRequest, Completion, Engine, EngineError, EngineEvent, EngineStatus, Engines, FinishReason,
    Generation,
};
use collabllm::protocol::LoadedProtocol;
use collabllm::protocol::EXAMPLE_PROTOCOL_PATH;
use collabllm::web::AppState;
use diesel::connection::SimpleConnection;

mod tiny_model;
pub use tiny_model::write_tiny_model;

/// The PostgreSQL server the tests use (a database where we may create schemas).
pub fn postgres_base_url() -> String {
    std::env::var("COLLABLLM_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A database of its own for one test; dropped (schema or file) at the end.
pub struct TestDb {
    pub url: String,
    schema: Option<String>,
    _dir: Option<tempfile::TempDir>,
}

impl TestDb {
    pub fn sqlite() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}", dir.path().join("test.sqlite3").display());
        Self {
            url,
            schema: None,
            _dir: Some(dir),
        }
    }

    /// A fresh schema on the test PostgreSQL server; every connection of the URL uses it.
    pub fn postgres() -> Self {
        let base = postgres_base_url();
        let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
        let mut conn = db::connect(&base).unwrap_or_else(|e| {
            panic!("the PostgreSQL tests need a server at {base} (set COLLABLLM_TEST_POSTGRES_URL): {e}")
        });
        if let DbConn::Postgres(c) = &mut conn {
            c.batch_execute(&format!("CREATE SCHEMA {schema}"))
                .expect("create schema");
        }
        let sep = if base.contains('?') { '&' } else { '?' };
        // Its connections are named after the schema, so a test can find (and kill) them.
        Self {
            url: format!("{base}{sep}options=-csearch_path%3D{schema}&application_name={schema}"),
            schema: Some(schema),
            _dir: None,
        }
    }

    /// The `application_name` of the test's PostgreSQL connections.
    pub fn application_name(&self) -> Option<&str> {
        self.schema.as_deref()
    }

    pub fn conn(&self) -> DbConn {
        let mut conn = db::connect(&self.url).expect("connect");
        db::migrate(&mut conn).expect("migrate");
        conn
    }

    pub fn pool(&self) -> DbPool {
        db::open(&self.url, 4).expect("pool")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some(schema) = &self.schema {
            if let Ok(DbConn::Postgres(mut c)) = db::connect(&postgres_base_url()) {
                let _ = c.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"));
            }
        }
    }
}

/// Runs a test body once on SQLite and once on PostgreSQL, each with a fresh database.
#[macro_export]
macro_rules! on_both_backends {
    ($name:ident, $body:expr) => {
        mod $name {
            use super::*;
            #[test]
            fn sqlite() {
                let db = $crate::common::TestDb::sqlite();
                ($body)(&db);
            }
            #[test]
            fn postgres() {
                let db = $crate::common::TestDb::postgres();
                ($body)(&db);
            }
        }
    };
}

/// Runs an async test body `async fn $name(db: TestDb)` on SQLite and on PostgreSQL.
#[macro_export]
macro_rules! on_both_backends_async {
    ($name:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread")]
            async fn sqlite() {
                super::$name($crate::common::TestDb::sqlite()).await;
            }
            #[tokio::test(flavor = "multi_thread")]
            async fn postgres() {
                super::$name($crate::common::TestDb::postgres()).await;
            }
        }
    };
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn models_dir() -> PathBuf {
    std::env::var_os("COLLABLLM_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("models"))
}

/// Set by `scripts/test --fast`: the tier without the real models and the browser.
const TIER: &str = "COLLABLLM_TEST_TIER";

/// Fails at once, naming the test, when it runs in the fast tier but needs `what` (the real
/// model, the judge, a browser), which that tier leaves out: `scripts/test` lists the tests of
/// the full tier only, and a test missing from that list shows up here instead of slowing the
/// fast tier down.
pub fn needs_full_tier(what: &str) {
    if std::env::var(TIER).as_deref() == Ok("fast") {
        let test = std::thread::current()
            .name()
            .unwrap_or("this test")
            .to_string();
        panic!("{test} needs {what}, which the fast tier leaves out: list it in scripts/test's FULL_ONLY");
    }
}

/// The models directory, for a test that runs the models in it (loads a protocol's engines,
/// the simulator or the judge).
pub fn real_models() -> PathBuf {
    needs_full_tier("the real models");
    models_dir()
}

/// The real default model; a test that needs it fails loudly when it is missing.
pub fn model_path() -> PathBuf {
    needs_full_tier("the real model");
    let path = default_model_path(&models_dir());
    assert!(
        path.exists(),
        "the default model is missing at {}: run `cargo run -- models fetch` first",
        path.display()
    );
    path
}

pub fn protocol(name: &str) -> LoadedProtocol {
    let path = repo_root().join("study-protocols").join(name);
    LoadedProtocol::load(&path, &models_dir()).unwrap_or_else(|e| panic!("{e}"))
}

/// The quick pilot's text as the tests run it: the CollabLLM core's judge and simulated user are
/// the default model, fast enough for the suite (the judge the protocol names is tested by
/// `collab::the_fetched_judge_rates_a_reply_in_shape`). The text ends in its `[collab]` table, so
/// keys appended to it are CollabLLM settings.
pub fn pilot_text() -> String {
    let text = std::fs::read_to_string(repo_root().join("study-protocols/quick-pilot.toml"))
        .expect("the quick pilot");
    let mut fast = text.clone();
    for role in ["simulator_model", "judge_model"] {
        let named = format!("{role} = \"{JUDGE_MODEL_ID}\"");
        fast = fast.replace(&named, &format!("{role} = \"smollm2-135m\""));
    }
    assert!(
        fast != text && fast.trim_end().ends_with("judge_model = \"smollm2-135m\""),
        "the quick pilot ends with its [collab] roles"
    );
    fast + "\n"
}

/// The id of the judge and simulator model in the example protocols.
pub const JUDGE_MODEL_ID: &str = "qwen2.5-coder-1.5b";

pub fn example_protocol() -> LoadedProtocol {
    LoadedProtocol::load(&repo_root().join(EXAMPLE_PROTOCOL_PATH), &models_dir())
        .unwrap_or_else(|e| panic!("{e}"))
}

/// The real router on a loopback port, in a thread of its own; stops when dropped.
pub struct TestServer {
    pub addr: SocketAddr,
    handle: actix_web::dev::ServerHandle,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestServer {
    pub fn start(state: AppState) -> Self {
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::spawn(move || {
            actix_web::rt::System::new().block_on(async move {
                let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
                let (addr, server) = collabllm::web::bind(state, loopback, Some(2)).expect("bind");
                tx.send((addr, server.handle())).expect("send addr");
                server.await.expect("server");
            });
        });
        let (addr, handle) = rx.recv().expect("server started");
        Self {
            addr,
            handle,
            thread: Some(thread),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let handle = self.handle.clone();
        std::thread::spawn(move || {
            actix_web::rt::System::new().block_on(handle.stop(false));
        })
        .join()
        .ok();
        if let Some(t) = self.thread.take() {
            t.join().ok();
        }
    }
}

/// The `/v1` API key of the test servers.
pub const TEST_API_KEY: &str = "test-api-key";

/// The app under test, over a database of its own: the quick-pilot protocol imported and a
/// scripted model that answers at once (nothing loads llama.cpp), unless the test asks for
/// another protocol, another script, the real default model, or a researcher account. `/v1` takes
/// [`TEST_API_KEY`].
pub struct TestApp<'a> {
    db: &'a TestDb,
    protocol: LoadedProtocol,
    engine: Option<std::sync::Arc<dyn Engine>>,
    researcher: bool,
}

/// What the default scripted model answers.
const SCRIPTED_REPLY: &str = "Here is a first draft: Dear Jo, thank you for the tomatoes.";

impl<'a> TestApp<'a> {
    pub fn new(db: &'a TestDb) -> Self {
        Self {
            db,
            protocol: protocol("quick-pilot.toml"),
            engine: Some(std::sync::Arc::new(ScriptedEngine::new(|_| {
                SCRIPTED_REPLY.to_string()
            }))),
            researcher: false,
        }
    }

    /// Another protocol than the quick pilot (a shipped one, or one with a change).
    pub fn loaded(mut self, loaded: LoadedProtocol) -> Self {
        self.protocol = loaded;
        self
    }

    /// This scripted model instead of the default one.
    pub fn scripted(self, engine: std::sync::Arc<ScriptedEngine>) -> Self {
        self.serving(engine)
    }

    /// This engine (e.g. a remote one) instead of the default model.
    pub fn serving(mut self, engine: std::sync::Arc<dyn Engine>) -> Self {
        self.engine = Some(engine);
        self
    }

    /// The protocol's own models: the real default model, through llama.cpp.
    pub fn real_model(mut self) -> Self {
        needs_full_tier("the real model");
        self.engine = None;
        self
    }

    /// With [`RESEARCHER`]'s console account.
    pub fn researcher(mut self) -> Self {
        self.researcher = true;
        self
    }

    pub fn state(self) -> AppState {
        let pool = self.db.pool();
        db::studies::import(&mut pool.get().expect("conn"), &self.protocol).expect("import");
        if self.researcher {
            add_researcher(&pool);
        }
        let engines = match self.engine {
            Some(engine) => scripted_engines(engine),
            None => {
                let engines = Engines::new();
                engines
                    .load_protocol(&self.protocol.protocol, &models_dir())
                    .expect("engines start");
                engines
            }
        };
        let mut state = AppState::new(pool, engines, models_dir()).expect("app state");
        state.api_keys =
            std::sync::Arc::new(vec![collabllm::web::openai::key_sha256(TEST_API_KEY)]);
        state
    }

    /// The app served on a loopback port.
    pub fn start(self) -> TestServer {
        TestServer::start(self.state())
    }
}

/// App state over `db` with the engines of the quick-pilot protocol (the real model).
pub fn state_with_model(db: &TestDb) -> AppState {
    TestApp::new(db).real_model().state()
}

/// The researcher the console tests log in as.
pub const RESEARCHER: (&str, &str) = ("ada", "lovelace-1815");

/// Adds [`RESEARCHER`] to the database.
pub fn add_researcher(pool: &DbPool) {
    let (name, password) = RESEARCHER;
    db::researchers::set(
        &mut pool.get().expect("conn"),
        name,
        &collabllm::web::auth::hash_password(password).expect("hash"),
    )
    .expect("researcher");
}

/// Engines whose default model (every arm, the simulator and the judge of the shipped protocols)
/// is `engine`: nothing loads llama.cpp.
pub fn scripted_engines(engine: std::sync::Arc<dyn Engine>) -> Engines {
    let engines = Engines::new();
    engines.insert(
        &collabllm::engine::registry::engine_name("smollm2-135m", None),
        engine,
    );
    engines
}

pub fn write_temp(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write temp file");
    path
}

/// A row in TRL's conversational preference format: `prompt` (system first, then alternating
/// user and assistant messages, ending with the user's), `chosen` and `rejected` (one assistant
/// message each).
pub fn assert_trl_pair(row: &serde_json::Value) {
    let prompt = row["prompt"]
        .as_array()
        .expect("prompt is a list of messages");
    assert_eq!(prompt[0]["role"], "system", "{row}");
    for (i, m) in prompt[1..].iter().enumerate() {
        let expected = if i % 2 == 0 { "user" } else { "assistant" };
        assert_eq!(
            m["role"], expected,
            "roles alternate from the user's: {row}"
        );
        assert!(m["content"].is_string(), "{row}");
    }
    assert_eq!(
        prompt.last().unwrap()["role"],
        "user",
        "the prompt ends with a user message"
    );
    for side in ["chosen", "rejected"] {
        let messages = row[side].as_array().expect("a list of messages");
        assert_eq!(messages.len(), 1, "{row}");
        assert_eq!(messages[0]["role"], "assistant");
        assert!(messages[0]["content"].is_string());
    }
}

/// An engine whose replies a test writes: `reply` gets each request and returns the text.
/// Replies are instant and counted, so tests about what the platform does with replies need no
/// model.
pub struct ScriptedEngine {
    reply: Box<dyn Fn(&ChatRequest) -> String + Send + Sync>,
    /// Requests for which `hold` says so never finish unless stopped.
    hold: Box<dyn Fn(&ChatRequest) -> bool + Send + Sync>,
    /// Places in the queue every request reports before it is written.
    places: Vec<usize>,
    /// What `status` reports besides the name.
    status: EngineStatus,
    /// Replies are written a word at a time, one every this long, as a slow model would.
    pace: Option<std::time::Duration>,
    /// When each word of a paced reply was written, by request.
    pub written: std::sync::Arc<std::sync::Mutex<Vec<Vec<std::time::Instant>>>>,
    pub requests: std::sync::atomic::AtomicUsize,
}

impl ScriptedEngine {
    /// What this engine answers `request`, without generating it.
    pub fn answer(&self, request: &ChatRequest) -> String {
        (self.reply)(request)
    }

    pub fn new(reply: impl Fn(&ChatRequest) -> String + Send + Sync + 'static) -> Self {
        Self::holding(reply, |_| false)
    }

    /// An engine that answers like `new`, except that the requests `hold` picks write one token
    /// ("Partial") and never finish, as a reply of a slow model still being generated, until
    /// they are stopped: then they end as cancelled.
    pub fn holding(
        reply: impl Fn(&ChatRequest) -> String + Send + Sync + 'static,
        hold: impl Fn(&ChatRequest) -> bool + Send + Sync + 'static,
    ) -> Self {
        Self {
            reply: Box::new(reply),
            hold: Box::new(hold),
            places: Vec::new(),
            status: EngineStatus {
                running: true,
                ..Default::default()
            },
            pace: None,
            written: Default::default(),
            requests: Default::default(),
        }
    }

    /// Writes each reply a word at a time, one every `pace` (until stopped: then it ends as
    /// cancelled with the words so far), and notes when each word was written.
    pub fn paced(mut self, pace: std::time::Duration) -> Self {
        self.pace = Some(pace);
        self
    }

    /// Every request first waits in line at these places, as on a busy engine; a held one stays
    /// in line (at the last place) until it is stopped.
    pub fn waiting_in_line(mut self, places: Vec<usize>) -> Self {
        self.places = places;
        self
    }

    /// Reports this load (slots, queues, counters) as its status.
    pub fn reporting(mut self, status: EngineStatus) -> Self {
        self.status = status;
        self
    }
}

impl Engine for ScriptedEngine {
    fn start(&self, request: ChatRequest) -> Result<Generation, EngineError> {
        self.requests
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let (generation, events, cancel) = Generation::channel();
        for &ahead in &self.places {
            let _ = events.send(EngineEvent::Queued { ahead });
        }
        let held = (self.hold)(&request);
        if !self.places.is_empty() && !held {
            let _ = events.send(EngineEvent::Started);
        }
        if held {
            let partial = if self.places.is_empty() {
                "Partial"
            } else {
                ""
            };
            if !partial.is_empty() {
                let _ = events.send(EngineEvent::Token(partial.into()));
            }
            std::thread::spawn(move || {
                while !events.is_closed() {
                    if cancel.load(std::sync::atomic::Ordering::Relaxed) {
                        let _ = events.send(EngineEvent::Done(Completion {
                            text: partial.into(),
                            generated_tokens: u32::from(!partial.is_empty()),
                            finish_reason: FinishReason::Cancelled,
                            prompt_tokens: 0,
                            prompt_tokens_processed: 0,
                            ttft_ms: 0,
                            total_ms: 0,
                            seed: 0,
                            logprobs: Vec::new(),
                        }));
                        return;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
            });
            return Ok(generation);
        }
        let text = (self.reply)(&request);
        if let Some(pace) = self.pace {
            let written = self.written.clone();
            std::thread::spawn(move || {
                let request = {
                    let mut written = written.lock().unwrap();
                    written.push(Vec::new());
                    written.len() - 1
                };
                let mut so_far = String::new();
                let mut finish_reason = FinishReason::Stop;
                for (i, word) in text.split(' ').enumerate() {
                    std::thread::sleep(pace);
                    if cancel.load(std::sync::atomic::Ordering::Relaxed) || events.is_closed() {
                        finish_reason = FinishReason::Cancelled;
                        break;
                    }
                    let delta = if i == 0 {
                        word.to_string()
                    } else {
                        format!(" {word}")
                    };
                    so_far.push_str(&delta);
                    written.lock().unwrap()[request].push(std::time::Instant::now());
                    let _ = events.send(EngineEvent::Token(delta));
                }
                let _ = events.send(EngineEvent::Done(Completion {
                    generated_tokens: so_far.split_whitespace().count() as u32,
                    text: so_far,
                    finish_reason,
                    prompt_tokens: 0,
                    prompt_tokens_processed: 0,
                    ttft_ms: 0,
                    total_ms: 0,
                    seed: 0,
                    logprobs: Vec::new(),
                }));
            });
            return Ok(generation);
        }
        let _ = events.send(EngineEvent::Token(text.clone()));
        let _ = events.send(EngineEvent::Done(Completion {
            generated_tokens: text.split_whitespace().count() as u32,
            text,
            finish_reason: FinishReason::Stop,
            prompt_tokens: 0,
            prompt_tokens_processed: 0,
            ttft_ms: 0,
            total_ms: 0,
            seed: request.sampling.seed.unwrap_or(0),
            logprobs: Vec::new(),
        }));
        Ok(generation)
    }

    fn status(&self) -> EngineStatus {
        EngineStatus {
            model: "scripted".into(),
            backend: "scripted",
            ..self.status.clone()
        }
    }

    fn fingerprint(&self) -> String {
        "scripted".into()
    }
}

/// An engine whose first `fails` replies to the requests `picked` fail, by turns: the first
/// breaks off after a word, as a remote server that goes away would; the second is refused before
/// it starts; and so on. The others are `then`'s.
pub struct FailingFirst {
    pub then: std::sync::Arc<dyn Engine>,
    pub fails: usize,
    pub picked: Box<dyn Fn(&ChatRequest) -> bool + Send + Sync>,
    failed: std::sync::atomic::AtomicUsize,
}

impl FailingFirst {
    pub fn new(
        then: std::sync::Arc<dyn Engine>,
        fails: usize,
        picked: impl Fn(&ChatRequest) -> bool + Send + Sync + 'static,
    ) -> Self {
        Self {
            then,
            fails,
            picked: Box::new(picked),
            failed: Default::default(),
        }
    }
}

impl Engine for FailingFirst {
    fn start(&self, request: ChatRequest) -> Result<Generation, EngineError> {
        use std::sync::atomic::Ordering::SeqCst;
        let next = |failed: usize| (failed < self.fails).then_some(failed + 1);
        if !(self.picked)(&request) {
            return self.then.start(request);
        }
        match self.failed.fetch_update(SeqCst, SeqCst, next) {
            Ok(failed) if failed % 2 == 0 => {
                let (generation, events, _) = Generation::channel();
                let _ = events.send(EngineEvent::Token("Partial".into()));
                let _ = events.send(EngineEvent::Error(EngineError::Remote {
                    endpoint: "http://inference.example/v1".into(),
                    reason: "the stream broke".into(),
                }));
                Ok(generation)
            }
            Ok(_) => Err(EngineError::Inference("refused by the test".into())),
            Err(_) => self.then.start(request),
        }
    }

    fn status(&self) -> EngineStatus {
        self.then.status()
    }

    fn fingerprint(&self) -> String {
        self.then.fingerprint()
    }
}

/// All the text of a request, for a scripted model that answers by what it is asked.
pub fn request_text(r: &ChatRequest) -> String {
    r.messages
        .iter()
        .map(|m| m.content.as_str())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Who of the CollabLLM core a request comes from, told by its built-in prompt.
pub enum Asker<'a> {
    /// The interactivity judge, with the part it rates.
    Interactivity(&'a str),
    Document,
    Quality,
    Simulator,
    /// Anything else: an arm's policy.
    Policy,
}

pub fn asker(text: &str) -> Asker<'_> {
    if text.contains("judge of how well an AI assistant collaborated") {
        Asker::Interactivity(text.split("What you rate:").nth(1).unwrap_or_default())
    } else if text.contains("Extract the final version") {
        Asker::Document
    } else if text.contains("impartial judge of writing") {
        Asker::Quality
    } else if text.contains("role-playing a person") {
        Asker::Simulator
    } else {
        Asker::Policy
    }
}
