//! The CollabLLM core (Wu et al., ICML 2025): a user simulator that plays the participant, an LLM
//! judge, the conversation metrics, and the multiturn-aware reward (MR) — the value of a reply is
//! how the conversation goes after it, estimated by rolling it forward with the simulator and
//! scoring the rollouts. On top: simulated pilots, MR-scored preference pairs of recorded sessions,
//! and synthetic conversations grown from single-turn tasks.
//!
//! Everything here talks to models through [`crate::engine`] only, so the simulator and the judge
//! run on the local llama.cpp workers (batched with each other and with the arms) or on any remote
//! OpenAI-compatible backend named in the protocol.

pub mod judge;
pub mod metrics;
pub mod pairs;
mod prompts;
pub mod reward;
pub mod simulate;
pub mod simulator;
mod structured;
pub mod synth;

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use sha2::{Digest, Sha256};

pub use prompts::Prompts;

use crate::engine::{
    registry::engine_name, ChatMessage, ChatRequest, Engine, EngineError, Engines, Role,
};
use crate::protocol::{ArmSpec, CollabSpec, Protocol, TaskSpec, TopicSpec};

#[derive(Debug, thiserror::Error)]
pub enum CollabError {
    #[error("the {0} model failed: {1}")]
    Engine(String, EngineError),
    #[error("the {who} gave no usable answer twice: {problem}")]
    Unparseable { who: String, problem: String },
    #[error("prompt {name}: {reason}")]
    Prompt { name: String, reason: String },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Db(#[from] crate::db::DbError),
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

impl From<diesel::result::Error> for CollabError {
    fn from(e: diesel::result::Error) -> Self {
        CollabError::Db(e.into())
    }
}

impl CollabError {
    /// Whether the work of one turn or participant failed on its own (logged and skipped) rather
    /// than the run as a whole (the database, a stopped engine).
    pub fn is_local(&self) -> bool {
        match self {
            CollabError::Engine(_, EngineError::Stopped) => false,
            CollabError::Engine(..) | CollabError::Unparseable { .. } => true,
            _ => false,
        }
    }
}

/// What the participant was asked to write.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    pub kind: String,
    pub title: String,
    pub instructions: String,
}

impl Task {
    pub fn of(task: &TaskSpec, topic: &TopicSpec) -> Self {
        Self {
            kind: task.kind.clone(),
            title: topic.title.clone(),
            instructions: task.instructions.trim().to_string(),
        }
    }
}

/// What the simulated user wants, hidden from the assistant: the intent, and the document the
/// conversation should end with (the participant's final document for recorded sessions, the
/// reference for synthetic tasks; empty when there is only an intent).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Goal {
    pub intent: String,
    pub document: String,
}

impl Goal {
    /// What the simulator is told.
    fn describe(&self) -> String {
        match (self.intent.trim(), self.document.trim()) {
            (intent, "") => intent.to_string(),
            ("", document) => format!("The document you want to end up with:\n{document}"),
            (intent, document) => {
                format!("{intent}\n\nThe document you want to end up with:\n{document}")
            }
        }
    }

    /// What BLEU compares the final document with: the goal document, else the intent.
    pub fn reference(&self) -> &str {
        if self.document.trim().is_empty() {
            &self.intent
        } else {
            &self.document
        }
    }
}

/// An arm's policy: the assistant of rollouts and fresh candidates.
#[derive(Clone)]
pub struct Policy {
    pub engine: Arc<dyn Engine>,
    pub arm: ArmSpec,
}

impl Policy {
    /// The system prompt and the conversation, as the arm's model receives them.
    pub fn messages(&self, conversation: &[ChatMessage]) -> Vec<ChatMessage> {
        let mut messages = vec![ChatMessage::new(
            Role::System,
            self.arm.system_prompt.clone(),
        )];
        messages.extend_from_slice(conversation);
        messages
    }
}

/// The simulator and the judge of one protocol, with their prompts and settings.
#[derive(Clone)]
pub struct Roles {
    pub simulator: Arc<dyn Engine>,
    pub judge: Arc<dyn Engine>,
    pub prompts: Arc<Prompts>,
    pub spec: CollabSpec,
}

impl Roles {
    /// Starts (or finds) the engines of the simulator and the judge of `protocol`, with at least
    /// `slots` sequence slots so the rollouts of a turn run in one batch. `protocol_path` is
    /// where a relative `prompts` folder is found.
    pub fn start(
        engines: &Engines,
        protocol: &Protocol,
        protocol_path: &Path,
        models_dir: &Path,
        slots: u32,
    ) -> Result<Self, CollabError> {
        let (simulator, judge) = protocol.collab_models();
        let mut started = Vec::new();
        for id in [&simulator, &judge] {
            let spec = protocol.model(id).ok_or_else(|| {
                CollabError::Invalid(format!("the protocol has no model {id:?} for [collab]"))
            })?;
            engines
                .start(spec, models_dir, None, protocol.slots_for(id).max(slots))
                .map_err(|e| CollabError::Engine(id.clone(), e))?;
            started.push(
                engines
                    .get(&engine_name(id, None))
                    .map_err(|e| CollabError::Engine(id.clone(), e))?,
            );
        }
        let dir = protocol
            .collab
            .prompts
            .as_ref()
            .map(|d| protocol_path.parent().unwrap_or(Path::new(".")).join(d));
        Ok(Self {
            judge: started.pop().expect("two engines"),
            simulator: started.pop().expect("two engines"),
            prompts: Arc::new(Prompts::load(dir.as_deref())?),
            spec: protocol.collab.clone(),
        })
    }
}

/// Starts the engine of an arm (with at least `slots` slots) and returns its policy.
pub fn start_policy(
    engines: &Engines,
    protocol: &Protocol,
    arm: &ArmSpec,
    models_dir: &Path,
    slots: u32,
) -> Result<Policy, CollabError> {
    let spec = protocol
        .model(&arm.model)
        .ok_or_else(|| CollabError::Invalid(format!("arm {:?} has no model", arm.id)))?;
    let lora = arm.lora.first();
    engines
        .start(
            spec,
            models_dir,
            lora,
            protocol.slots_for(&arm.model).max(slots),
        )
        .map_err(|e| CollabError::Engine(arm.model.clone(), e))?;
    let engine = engines
        .get(&engine_name(&arm.model, lora))
        .map_err(|e| CollabError::Engine(arm.model.clone(), e))?;
    Ok(Policy {
        engine,
        arm: arm.clone(),
    })
}

/// A request whose reply depends only on its messages, sampling and seed, never on what the
/// engine's slots cached before: same seeds, same build, same rollouts.
pub fn request(messages: Vec<ChatMessage>, sampling: crate::engine::Sampling) -> ChatRequest {
    let mut request = ChatRequest::new(messages, sampling);
    request.reproducible = true;
    request
}

/// Starts every request as one group and waits for all of them.
pub async fn generate_all(
    engine: &dyn Engine,
    who: &str,
    requests: Vec<ChatRequest>,
) -> Vec<Result<crate::engine::Completion, CollabError>> {
    let generations = engine.start_group(requests);
    futures_util::future::join_all(generations.into_iter().map(|g| async move {
        g.map_err(|e| CollabError::Engine(who.to_string(), e))?
            .finish()
            .await
            .map_err(|e| CollabError::Engine(who.to_string(), e))
    }))
    .await
}

/// Longest transcript (characters) put into a simulator or judge prompt; older messages go first.
const MAX_TRANSCRIPT_CHARS: usize = 6000;

/// The conversation as text for the simulator's and the judge's prompts.
pub fn transcript(conversation: &[ChatMessage]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut used = 0;
    for m in conversation.iter().rev() {
        let who = match m.role {
            Role::User => "User",
            Role::Assistant => "Assistant",
            Role::System => continue,
        };
        let part = format!("{who}: {}", m.content.trim());
        used += part.len();
        if used > MAX_TRANSCRIPT_CHARS && !parts.is_empty() {
            parts.push("[earlier messages left out]".into());
            break;
        }
        parts.push(part);
    }
    if parts.is_empty() {
        return "(nothing yet: you write first)".into();
    }
    parts.reverse();
    parts.join("\n\n")
}

/// A 32-bit seed derived from a base seed and a path of labels, so every generation of a run has
/// its own seed and the same run gives the same seeds.
pub fn derive_seed(base: u64, path: &[&str]) -> u32 {
    let mut hasher = Sha256::new();
    hasher.update(base.to_le_bytes());
    for part in path {
        hasher.update(part.as_bytes());
        hasher.update([0]);
    }
    let digest = hasher.finalize();
    u32::from_le_bytes([digest[0], digest[1], digest[2], digest[3]])
}

/// A JSONL file written through a temporary name, so a file with the final name is complete.
pub struct JsonlWriter {
    path: std::path::PathBuf,
    tmp: std::path::PathBuf,
    file: std::io::BufWriter<std::fs::File>,
}

impl JsonlWriter {
    pub fn create(path: &Path) -> Result<Self, CollabError> {
        let tmp = path.with_extension("jsonl.partial");
        let file = std::fs::File::create(&tmp).map_err(|e| write_error(&tmp, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            tmp,
            file: std::io::BufWriter::new(file),
        })
    }

    pub fn write(&mut self, row: &serde_json::Value) -> Result<(), CollabError> {
        serde_json::to_writer(&mut self.file, row).map_err(|e| write_error(&self.tmp, e.into()))?;
        self.file
            .write_all(b"\n")
            .map_err(|e| write_error(&self.tmp, e))
    }

    pub fn finish(mut self) -> Result<(), CollabError> {
        self.file.flush().map_err(|e| write_error(&self.tmp, e))?;
        std::fs::rename(&self.tmp, &self.path).map_err(|e| write_error(&self.path, e))
    }
}

fn write_error(path: &Path, source: std::io::Error) -> CollabError {
    CollabError::Write {
        path: path.display().to_string(),
        source,
    }
}
