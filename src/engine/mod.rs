//! Inference. Every arm, the user simulator and the judge are served through the [`Engine`]
//! trait: a request in, a stream of [`EngineEvent`]s out. Two backends implement it: a llama.cpp
//! worker thread per local model ([`llama`]) and a client of an OpenAI-compatible server
//! ([`remote`]). This module knows nothing of HTTP serving, studies or the database.

pub mod chat_template;
pub mod fetch;
pub mod llama;
pub mod registry;
pub mod remote;
mod text;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// The sampling settings a protocol's arm sets are the ones a request carries.
pub use crate::protocol::Sampling;
pub use registry::Engines;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: Role,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
        }
    }
}

/// Output restricted to a formal language, so callers can always parse it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Constraint {
    /// A JSON schema; converted to a GBNF grammar by llama.cpp.
    JsonSchema(serde_json::Value),
    /// A GBNF grammar with a `root` rule.
    Grammar(String),
}

/// One generation: the whole conversation so far (system prompt included) and how to sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<ChatMessage>,
    pub sampling: Sampling,
    pub constraint: Option<Constraint>,
    /// Keeps a conversation on the slot that already holds its earlier turns.
    pub conversation: Option<String>,
    /// Generate `max_tokens` even past end-of-generation tokens (benchmarks).
    #[serde(default)]
    pub ignore_eos: bool,
    /// Compute the whole prompt afresh, so the reply does not depend on what a slot cached
    /// before: same seed, same text, whatever ran earlier. The CollabLLM core asks for this;
    /// chats prefer prefix reuse.
    #[serde(default)]
    pub reproducible: bool,
    /// Who waits for the reply; decides the order of the queue and its bounds.
    #[serde(default)]
    pub priority: Priority,
    /// Report, for every generated token, its log-probability and this many of the likeliest
    /// tokens at its position (at most [`MAX_TOP_LOGPROBS`]). The judge reads its scores from
    /// them.
    #[serde(default)]
    pub top_logprobs: Option<u32>,
}

/// The most alternatives a request may ask for at each position (OpenAI's bound).
pub const MAX_TOP_LOGPROBS: u32 = 20;

/// The classes of work an engine serves, most urgent first. A participant is watching the reply;
/// an API client can retry; background work (multiturn-aware rewards, simulation, evaluation) can
/// wait. Each class has its own bounded queue, and a full queue answers "busy" at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    #[default]
    Participant,
    Api,
    Background,
}

impl Priority {
    pub const ALL: [Priority; 3] = [Priority::Participant, Priority::Api, Priority::Background];

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn name(self) -> &'static str {
        match self {
            Priority::Participant => "participant",
            Priority::Api => "api",
            Priority::Background => "background",
        }
    }

    /// Requests of the class that may wait in one engine's queue.
    pub fn queue_limit(self) -> usize {
        match self {
            Priority::Participant => 1024,
            Priority::Api => 64,
            Priority::Background => 4096,
        }
    }

    /// How long a request of the class may wait for a slot before it fails as busy.
    pub fn deadline(self) -> Option<std::time::Duration> {
        match self {
            Priority::Api => Some(std::time::Duration::from_secs(60)),
            Priority::Participant | Priority::Background => None,
        }
    }
}

/// Bounds on a constraint, checked with bounded work before llama.cpp parses it: its parser and
/// grammar engine recurse along rules and nesting, so a grammar of 50,000 chained rules or a
/// deeply nested schema would overflow the worker's stack and take the process down.
const MAX_GRAMMAR_BYTES: usize = 32 * 1024;
const MAX_GRAMMAR_RULES: usize = 256;
const MAX_GRAMMAR_NESTING: usize = 32;
const MAX_SCHEMA_BYTES: usize = 16 * 1024;
const MAX_SCHEMA_NESTING: usize = 16;

impl Constraint {
    /// Refuses a constraint too large or too deep to hand to llama.cpp safely.
    pub fn check(&self) -> Result<(), EngineError> {
        match self {
            Constraint::Grammar(g) => check_grammar(g),
            Constraint::JsonSchema(schema) => {
                let size = schema.to_string().len();
                if size > MAX_SCHEMA_BYTES {
                    return Err(EngineError::Grammar(format!(
                        "the JSON schema has {size} bytes; at most {MAX_SCHEMA_BYTES} are accepted"
                    )));
                }
                if json_depth(schema) > MAX_SCHEMA_NESTING {
                    return Err(EngineError::Grammar(format!(
                        "the JSON schema nests deeper than {MAX_SCHEMA_NESTING} levels"
                    )));
                }
                Ok(())
            }
        }
    }
}

/// Size, rule count and nesting of a GBNF grammar, counted in one pass.
fn check_grammar(grammar: &str) -> Result<(), EngineError> {
    let refuse = |why: String| Err(EngineError::Grammar(why));
    if grammar.len() > MAX_GRAMMAR_BYTES {
        return refuse(format!(
            "the grammar has {} bytes; at most {MAX_GRAMMAR_BYTES} are accepted",
            grammar.len()
        ));
    }
    let rules = grammar.matches("::=").count();
    if rules > MAX_GRAMMAR_RULES {
        return refuse(format!(
            "the grammar has {rules} rules; at most {MAX_GRAMMAR_RULES} are accepted"
        ));
    }
    // Nesting of groups, outside string literals, character classes and comments.
    let (mut depth, mut deepest) = (0usize, 0usize);
    let mut chars = grammar.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' | '[' => {
                let close = if c == '"' { '"' } else { ']' };
                while let Some(inner) = chars.next() {
                    if inner == '\\' {
                        chars.next();
                    } else if inner == close {
                        break;
                    }
                }
            }
            '#' => {
                for inner in chars.by_ref() {
                    if inner == '\n' {
                        break;
                    }
                }
            }
            '(' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            ')' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    if deepest > MAX_GRAMMAR_NESTING {
        return refuse(format!(
            "the grammar nests groups {deepest} deep; at most {MAX_GRAMMAR_NESTING} are accepted"
        ));
    }
    Ok(())
}

fn json_depth(value: &serde_json::Value) -> usize {
    match value {
        serde_json::Value::Array(items) => 1 + items.iter().map(json_depth).max().unwrap_or(0),
        serde_json::Value::Object(map) => 1 + map.values().map(json_depth).max().unwrap_or(0),
        _ => 0,
    }
}

impl ChatRequest {
    /// What every backend refuses before queueing.
    pub fn check(&self) -> Result<(), EngineError> {
        if self.messages.is_empty() {
            return Err(EngineError::EmptyMessages);
        }
        if let Some(constraint) = &self.constraint {
            constraint.check()?;
        }
        if let Some(n) = self.top_logprobs.filter(|&n| n > MAX_TOP_LOGPROBS) {
            return Err(EngineError::InvalidRequest(format!(
                "top_logprobs is {n}; at most {MAX_TOP_LOGPROBS}"
            )));
        }
        self.sampling.check().map_err(EngineError::InvalidRequest)
    }

    pub fn new(messages: Vec<ChatMessage>, sampling: Sampling) -> Self {
        Self {
            messages,
            sampling,
            constraint: None,
            conversation: None,
            ignore_eos: false,
            reproducible: false,
            priority: Priority::Participant,
            top_logprobs: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// End-of-generation token or a stop string.
    Stop,
    /// `max_tokens` or the context was reached.
    Length,
    /// The caller cancelled or went away.
    Cancelled,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

/// The end of a generation, with what it cost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    pub text: String,
    pub finish_reason: FinishReason,
    /// Tokens of the whole prompt.
    pub prompt_tokens: u32,
    /// Prompt tokens that had to be computed (the rest were reused from the slot's cache).
    pub prompt_tokens_processed: u32,
    pub generated_tokens: u32,
    /// From the request's arrival to its first generated token.
    pub ttft_ms: u64,
    /// From the request's arrival to its end.
    pub total_ms: u64,
    /// The seed the sampler used (drawn when the request had none).
    pub seed: u32,
    /// One entry per generated token when the request asked for `top_logprobs`, else empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub logprobs: Vec<TokenLogprob>,
}

/// A generated token with its log-probability under the model (before sampling settings and
/// constraints), and the likeliest tokens at its position, most likely first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    /// The token's bytes (a token may hold part of a character).
    pub bytes: Vec<u8>,
    pub logprob: f32,
    pub top: Vec<(Vec<u8>, f32)>,
}

impl TokenLogprob {
    /// The entry of OpenAI's `logprobs.content` list: `token`, `logprob`, `bytes` and
    /// `top_logprobs`, as llama-server writes it too.
    pub fn to_openai(&self) -> serde_json::Value {
        let entry = |bytes: &[u8], logprob: f32| {
            serde_json::json!({
                "token": String::from_utf8_lossy(bytes),
                "logprob": logprob,
                "bytes": bytes,
            })
        };
        let mut value = entry(&self.bytes, self.logprob);
        value["top_logprobs"] = self.top.iter().map(|(b, lp)| entry(b, *lp)).collect();
        value
    }

    /// An entry of OpenAI's `logprobs.content` list; None when it lacks the token or its
    /// log-probability.
    pub fn from_openai(value: &serde_json::Value) -> Option<Self> {
        let entry = |v: &serde_json::Value| -> Option<(Vec<u8>, f32)> {
            let bytes = match v["bytes"].as_array() {
                Some(b) => b
                    .iter()
                    .map(|x| x.as_u64().and_then(|n| u8::try_from(n).ok()))
                    .collect::<Option<Vec<u8>>>()?,
                None => v["token"].as_str()?.as_bytes().to_vec(),
            };
            Some((bytes, v["logprob"].as_f64()? as f32))
        };
        let (bytes, logprob) = entry(value)?;
        let top = value["top_logprobs"]
            .as_array()
            .map(|t| t.iter().filter_map(entry).collect())
            .unwrap_or_default();
        Some(Self {
            bytes,
            logprob,
            top,
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum EngineEvent {
    /// The next piece of text: valid UTF-8, never part of a stop string.
    Token(String),
    /// A participant's request waits for a slot with `ahead` requests before it; sent when it
    /// starts waiting and whenever that number changes, so the page can show the place.
    Queued {
        ahead: usize,
    },
    /// A request that was reported as queued has its slot: its prompt is being read.
    Started,
    Done(Completion),
    Error(EngineError),
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EngineError {
    #[error("the request has no messages")]
    EmptyMessages,
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("the prompt has {tokens} tokens but a conversation may use at most {limit}; shorten the conversation or raise context_tokens")]
    PromptTooLong { tokens: usize, limit: usize },
    #[error("unknown model {model:?}; available: {available}")]
    UnknownModel { model: String, available: String },
    #[error("invalid grammar or schema: {0}")]
    Grammar(String),
    #[error("chat template failed: {0}")]
    Template(String),
    #[error("cannot load model {path}: {reason}")]
    Load { path: String, reason: String },
    #[error("llama.cpp failed: {0}")]
    Inference(String),
    #[error("remote backend {endpoint}: {reason}")]
    Remote { endpoint: String, reason: String },
    #[error("the engine has stopped")]
    Stopped,
    #[error("the engine is busy: {queued} {class} requests are waiting; try again shortly")]
    Busy { class: &'static str, queued: usize },
}

/// A running generation. Dropping it cancels the generation.
pub struct Generation {
    events: mpsc::UnboundedReceiver<EngineEvent>,
    cancel: Arc<AtomicBool>,
}

impl Generation {
    /// A generation, with the sender its producer feeds and the flag the producer watches.
    pub fn channel() -> (Self, mpsc::UnboundedSender<EngineEvent>, Arc<AtomicBool>) {
        let (events, rx) = mpsc::unbounded_channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let generation = Self {
            events: rx,
            cancel: cancel.clone(),
        };
        (generation, events, cancel)
    }

    /// Asks the producer to stop; it reports `Done` with finish reason `cancelled`.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }

    /// A flag that cancels this generation when set, for whoever else may need to stop it.
    pub fn canceller(&self) -> Arc<AtomicBool> {
        self.cancel.clone()
    }

    /// The next event; `None` once the generation has ended.
    pub async fn next(&mut self) -> Option<EngineEvent> {
        self.events.recv().await
    }

    /// Waits for the end and returns the completion (the text is in `Completion::text`).
    pub async fn finish(mut self) -> Result<Completion, EngineError> {
        while let Some(event) = self.events.recv().await {
            match event {
                EngineEvent::Token(_) | EngineEvent::Queued { .. } | EngineEvent::Started => {}
                EngineEvent::Done(c) => return Ok(c),
                EngineEvent::Error(e) => return Err(e),
            }
        }
        Err(EngineError::Stopped)
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        self.cancel();
    }
}

/// Load and throughput of one backend, for the console and `/healthz`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct EngineStatus {
    pub model: String,
    pub backend: &'static str,
    pub queued: usize,
    /// Queued requests by class, in the order of [`Priority::ALL`].
    pub queued_by_priority: [usize; 3],
    pub active: usize,
    pub slots: usize,
    pub generated_tokens: u64,
    pub prompt_tokens_processed: u64,
    pub prompt_tokens_reused: u64,
    /// Conversations whose cache was put back from RAM after another had taken their slot.
    pub caches_restored: u64,
    /// Replies paused now, and paused so far, for participants waiting for a first token.
    pub paused: usize,
    pub replies_paused: u64,
    /// Whether the engine can take requests (a local worker thread is alive).
    pub running: bool,
    /// Times the worker failed and was started again, and why it last failed.
    pub restarts: u32,
    pub last_failure: Option<String>,
    /// Generated tokens per second over the recent past.
    pub tokens_per_second: f64,
}

impl EngineStatus {
    /// The share of prompt tokens taken from a cache rather than computed, once there were any.
    pub fn prompt_reuse(&self) -> Option<f64> {
        let all = self.prompt_tokens_processed + self.prompt_tokens_reused;
        (all > 0).then(|| self.prompt_tokens_reused as f64 / all as f64)
    }
}

/// Something that turns chat requests into streams of events.
pub trait Engine: Send + Sync {
    /// Queues a request. Errors found before queueing come back here; later ones as events.
    fn start(&self, request: ChatRequest) -> Result<Generation, EngineError>;

    /// Queues several requests at once. A local engine admits them in the same step and in this
    /// order, so a group of reproducible requests meets the same batches on every run (llama.cpp's
    /// logits depend, in the last bits, on what else is in the batch).
    fn start_group(&self, requests: Vec<ChatRequest>) -> Vec<Result<Generation, EngineError>> {
        requests.into_iter().map(|r| self.start(r)).collect()
    }

    fn status(&self) -> EngineStatus;

    /// sha256 of the weights (local) or the endpoint and model name (remote): what produced a reply.
    fn fingerprint(&self) -> String;
}

/// Rounds in which a candidate reply that repeats another is sampled again with a new seed.
pub const CANDIDATE_RESAMPLE_ROUNDS: u32 = 3;

/// Whether two replies are the same text but for white space: as a pair they would teach nothing,
/// and the gap between their rewards is noise alone.
pub fn same_reply(a: &str, b: &str) -> bool {
    a.split_whitespace().eq(b.split_whitespace())
}
