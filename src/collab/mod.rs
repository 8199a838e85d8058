//! The CollabLLM core (Wu et al., ICML 2025): a user simulator that plays the participant, an LLM
//! judge, the conversation metrics, and the multiturn-aware reward (MR) — the value of a reply is
//! how the conversation goes after it, estimated by rolling it forward with the simulator and
//! scoring the rollouts. On top: simulated pilots, MR-scored preference pairs of recorded sessions,
//! and synthetic conversations grown from single-turn tasks.
//!
//! Everything here talks to models through [`crate::engine`] only, so the simulator and the judge
//! run on the local llama.cpp workers (batched with each other and with the arms) or on any remote
//! OpenAI-compatible backend named in the protocol.

pub mod asking;
pub mod contrast;
pub mod evaluate;
pub mod fidelity;
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
    registry::engine_name, same_reply, ChatMessage, ChatRequest, Engine, EngineError, Engines,
    Role, CANDIDATE_RESAMPLE_ROUNDS,
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
    #[error("{0}: the policy wrote the same reply for every candidate, also after resampling")]
    SameCandidates(String),
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
            CollabError::Engine(..)
            | CollabError::Unparseable { .. }
            | CollabError::SameCandidates(_) => true,
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

    /// What BLEU compares the final document with: the goal document. Without one there is
    /// nothing to compare with: a one-line intent shares almost no n-grams with any document, so
    /// BLEU against it measures length, not quality.
    pub fn reference(&self) -> Option<&str> {
        Some(self.document.as_str()).filter(|d| !d.trim().is_empty())
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
/// engine's slots cached before: same seeds, same build, same rollouts. Queued as background work,
/// behind participants' replies.
pub fn request(messages: Vec<ChatMessage>, sampling: crate::engine::Sampling) -> ChatRequest {
    let mut request = ChatRequest::new(messages, sampling);
    request.priority = crate::engine::Priority::Background;
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

/// What shapes a rollout besides a run's own counts and seed: the reward's weights and document
/// limit, and the simulator's, judge's and policy's models, sampling and prompts. Part of the key
/// of every stored result (`pairs`' rollouts, `synth`'s turns), so results of another model or
/// prompt are never reused as if they were these.
pub fn rollout_identity(roles: &Roles, policy: &Policy) -> serde_json::Value {
    serde_json::json!({
        "weights": roles.spec.weights,
        "max_document_chars": roles.spec.max_document_chars,
        "reasons": [roles.spec.judge_reasons, roles.spec.simulator_reasons],
        "simulator": [roles.simulator.fingerprint(), &roles.spec.simulator_sampling],
        "judge": [roles.judge.fingerprint(), &roles.spec.judge_sampling],
        "prompts": roles.prompts.sha256(),
        "policy": [policy.engine.fingerprint(), &policy.arm.system_prompt, &policy.arm.sampling],
    })
}

/// Tokens of a reply whose count was not recorded (written or edited by a person, or written for
/// a contrast set): about four characters a token, an estimate that does not depend on the
/// tokenizer. Counting it as 0 would exempt exactly those replies from MR's token penalty.
pub fn estimated_tokens(text: &str) -> u32 {
    u32::try_from(text.chars().count().div_ceil(4)).unwrap_or(u32::MAX)
}

/// A fresh candidate: which one of the turn it is, the sampling that made it (seed included),
/// whether the proactive instruction was added, and what the policy wrote.
pub struct Fresh {
    pub index: usize,
    pub sampling: crate::engine::Sampling,
    pub proactive: bool,
    pub completion: crate::engine::Completion,
}

/// The paper's `proact_prompt_ratio`: the first `round(share × n)` of a turn's n fresh candidates
/// are generated with the proactive instruction (`proactive.md`) after the arm's system prompt.
pub struct Proactive {
    instruction: String,
    indices: Vec<usize>,
}

impl Proactive {
    /// For a turn whose fresh candidates are `fresh` (all of them, also those already stored).
    pub fn of(roles: &Roles, fresh: &[usize]) -> Result<Self, CollabError> {
        let share = roles.spec.proactive_share.clamp(0.0, 1.0);
        let n = ((share * fresh.len() as f64).round() as usize).min(fresh.len());
        let instruction = if n > 0 {
            roles
                .prompts
                .render("proactive.md", minijinja::context! {})?
        } else {
            String::new()
        };
        Ok(Proactive {
            instruction: instruction.trim().to_string(),
            indices: fresh[..n].to_vec(),
        })
    }

    fn applies(&self, index: usize) -> bool {
        self.indices.contains(&index)
    }
}

/// Fresh candidates of `policy` after `context`, one for each of `wanted`, each different from
/// the replies in `taken` and from one another. A candidate that repeats a reply is sampled again
/// with the seed `seed(index, round)` of the next round, at most [`CANDIDATE_RESAMPLE_ROUNDS`]
/// times; one still repeating then is left out, so fewer than `wanted` may come back (in the order
/// of `wanted`). Every round is one group on the engine. The candidates `proactive` names get its
/// instruction after the system prompt.
pub async fn fresh_candidates(
    policy: &Policy,
    context: &[ChatMessage],
    wanted: &[usize],
    taken: &[String],
    proactive: &Proactive,
    seed: impl Fn(usize, u32) -> u32,
) -> Result<Vec<Fresh>, CollabError> {
    let mut texts: Vec<String> = taken.to_vec();
    let mut kept: Vec<Fresh> = Vec::new();
    let mut todo: Vec<usize> = wanted.to_vec();
    for round in 0..=CANDIDATE_RESAMPLE_ROUNDS {
        if todo.is_empty() {
            break;
        }
        let samplings: Vec<_> = todo
            .iter()
            .map(|&index| {
                let mut sampling = policy.arm.sampling.clone();
                sampling.seed = Some(seed(index, round));
                sampling
            })
            .collect();
        let requests = todo
            .iter()
            .zip(&samplings)
            .map(|(&index, s)| {
                let mut messages = policy.messages(context);
                if proactive.applies(index) {
                    messages[0].content =
                        format!("{}\n\n{}", messages[0].content, proactive.instruction);
                }
                request(messages, s.clone())
            })
            .collect();
        let generated = generate_all(&*policy.engine, "policy", requests).await;
        let mut again = Vec::new();
        for ((index, mut sampling), completion) in todo.into_iter().zip(samplings).zip(generated) {
            let completion = completion?;
            if texts.iter().any(|t| same_reply(t, &completion.text)) {
                again.push(index);
                continue;
            }
            sampling.seed = Some(completion.seed);
            texts.push(completion.text.clone());
            kept.push(Fresh {
                index,
                sampling,
                proactive: proactive.applies(index),
                completion,
            });
        }
        if !again.is_empty() {
            tracing::debug!(
                round,
                repeated = again.len(),
                "fresh candidates repeated a reply"
            );
        }
        todo = again;
    }
    kept.sort_by_key(|f| f.index);
    Ok(kept)
}

/// The seed of fresh candidate `index` of the turn `label` in resampling `round` (round 0 is the
/// first draw).
pub fn candidate_seed(base: u64, label: &str, index: usize, round: u32) -> u32 {
    let index = index.to_string();
    if round == 0 {
        derive_seed(base, &[label, "candidate", &index])
    } else {
        derive_seed(
            base,
            &[label, "candidate", &index, "resample", &round.to_string()],
        )
    }
}

/// Longest transcript (characters) put into a simulator or judge prompt; older messages go first.
const MAX_TRANSCRIPT_CHARS: usize = 6000;

/// The conversation as text for the simulator's and the judge's prompts.
pub fn transcript(conversation: &[ChatMessage]) -> String {
    let text = newest_first(conversation, MAX_TRANSCRIPT_CHARS);
    if text.is_empty() {
        "(nothing yet: you write first)".into()
    } else {
        text
    }
}

/// A judged conversation as two texts: the history before the message at `from` (context only)
/// and what is judged, from that message on. Shortening never drops the judged message itself
/// (the candidate): it is kept whole up to half the budget; the history gets up to a quarter,
/// newest first; the messages after the candidate get the rest, newest first.
pub fn judged_transcript(conversation: &[ChatMessage], from: usize) -> (String, String) {
    let from = from.min(conversation.len());
    let (history, judged) = conversation.split_at(from);
    let history_text = if history.is_empty() {
        "(none: the judged part opens the conversation)".to_string()
    } else {
        newest_first(history, MAX_TRANSCRIPT_CHARS / 4)
    };
    let Some((first, later)) = judged.split_first() else {
        return (history_text, String::new());
    };
    let first = labelled(first, MAX_TRANSCRIPT_CHARS / 2).unwrap_or_default();
    let left = MAX_TRANSCRIPT_CHARS.saturating_sub(first.len() + history_text.len());
    let later = newest_first(later, left.max(1));
    let judged_text = [first, later]
        .into_iter()
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join("\n\n");
    (history_text, judged_text)
}

/// "Who: text", cut to `limit` bytes (at a character boundary); none for a system message.
fn labelled(m: &ChatMessage, limit: usize) -> Option<String> {
    let who = match m.role {
        Role::User => "User",
        Role::Assistant => "Assistant",
        Role::System => return None,
    };
    const CUT: &str = " […]";
    let mut part = format!("{who}: {}", m.content.trim());
    if part.len() > limit {
        let mut cut = limit.saturating_sub(CUT.len());
        while !part.is_char_boundary(cut) {
            cut -= 1;
        }
        part.truncate(cut);
        part.push_str(CUT);
    }
    Some(part)
}

/// The messages as text within `budget` bytes, keeping the newest: older ones are left out
/// (and said to be), never the newest one, which is cut instead.
fn newest_first(messages: &[ChatMessage], budget: usize) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut used = 0;
    for m in messages.iter().rev() {
        let Some(part) = labelled(m, budget) else {
            continue;
        };
        used += part.len();
        if used > budget && !parts.is_empty() {
            parts.push("[earlier messages left out]".into());
            break;
        }
        parts.push(part);
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

/// A JSONL file written through a temporary name (`NAME.jsonl.partial`), so a file with the final
/// name is complete. Every row is flushed as a whole line: a run that stops early leaves a partial
/// file of complete rows, which any JSONL reader loads. A file that would hold no rows is not
/// written at all (an empty file is not a data set).
pub struct JsonlWriter {
    path: std::path::PathBuf,
    tmp: std::path::PathBuf,
    file: std::io::BufWriter<std::fs::File>,
    rows: u64,
}

impl JsonlWriter {
    pub fn create(path: &Path) -> Result<Self, CollabError> {
        let tmp = partial_path(path);
        let file = std::fs::File::create(&tmp).map_err(|e| write_error(&tmp, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            tmp,
            file: std::io::BufWriter::new(file),
            rows: 0,
        })
    }

    pub fn write(&mut self, row: &serde_json::Value) -> Result<(), CollabError> {
        let mut line = serde_json::to_vec(row).map_err(|e| write_error(&self.tmp, e.into()))?;
        line.push(b'\n');
        self.file
            .write_all(&line)
            .and_then(|()| self.file.flush())
            .map_err(|e| write_error(&self.tmp, e))?;
        self.rows += 1;
        Ok(())
    }

    /// Gives the file its final name and returns its rows; with no rows, removes it (and any
    /// older file of that name, which would otherwise pass for this run's output).
    pub fn finish(mut self) -> Result<u64, CollabError> {
        self.file.flush().map_err(|e| write_error(&self.tmp, e))?;
        if self.rows == 0 {
            std::fs::remove_file(&self.tmp).map_err(|e| write_error(&self.tmp, e))?;
            return match std::fs::remove_file(&self.path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(write_error(&self.path, e))
                }
                _ => Ok(0),
            };
        }
        std::fs::rename(&self.tmp, &self.path).map_err(|e| write_error(&self.path, e))?;
        Ok(self.rows)
    }
}

/// Where [`JsonlWriter`] keeps the rows of `path` until the run ends.
pub fn partial_path(path: &Path) -> std::path::PathBuf {
    path.with_extension("jsonl.partial")
}

fn write_error(path: &Path, source: std::io::Error) -> CollabError {
    CollabError::Write {
        path: path.display().to_string(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stopped_run_leaves_complete_rows_and_an_empty_one_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("pairs.jsonl");
        let mut writer = JsonlWriter::create(&out).unwrap();
        writer.write(&serde_json::json!({"turn": 1})).unwrap();
        writer
            .write(&serde_json::json!({"turn": 2, "text": "a\nb"}))
            .unwrap();
        drop(writer); // stopped before the end
        let partial = std::fs::read_to_string(partial_path(&out)).unwrap();
        let rows: Vec<serde_json::Value> = partial
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(
            rows.len(),
            2,
            "every finished row is a whole line: {partial:?}"
        );
        assert!(!out.exists());

        // A run without rows writes no file, and removes an older one of that name.
        std::fs::write(&out, "{\"old\": true}\n").unwrap();
        let empty = JsonlWriter::create(&out).unwrap();
        assert_eq!(empty.finish().unwrap(), 0);
        assert!(!out.exists() && !partial_path(&out).exists());

        let mut writer = JsonlWriter::create(&out).unwrap();
        writer.write(&serde_json::json!({"turn": 1})).unwrap();
        assert_eq!(writer.finish().unwrap(), 1);
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "{\"turn\":1}\n");
    }

    #[test]
    fn the_judged_part_keeps_the_candidate_whatever_the_length() {
        let m = |role, text: String| ChatMessage::new(role, text);
        // `n` exchanges of a user and an assistant message of `len` characters each.
        let exchanges = |label: &str, n: usize, len: usize| -> Vec<ChatMessage> {
            (0..n)
                .flat_map(|i| {
                    [
                        m(
                            Role::User,
                            format!("{label} question {i} {}", "u".repeat(len)),
                        ),
                        m(
                            Role::Assistant,
                            format!("{label} answer {i} {}", "a".repeat(len)),
                        ),
                    ]
                })
                .collect()
        };
        let mut conversation = exchanges("old", 10, 900);
        let from = conversation.len();
        conversation.push(m(
            Role::Assistant,
            "THE CANDIDATE asks: who is it for?".into(),
        ));
        conversation.extend(exchanges("rollout", 6, 1500));
        // The whole transcript, newest first within its budget, loses the candidate...
        assert!(!transcript(&conversation).contains("THE CANDIDATE"));
        // ...the judged one never does, and shows the history only as context.
        let (history, judged) = judged_transcript(&conversation, from);
        assert!(
            judged.starts_with("Assistant: THE CANDIDATE"),
            "{judged:.80}"
        );
        assert!(judged.contains("[earlier messages left out]"));
        assert!(!judged.contains("old answer"));
        assert!(
            history.contains("old answer 9"),
            "the newest history is there"
        );
        assert!(!history.contains("old answer 0") && history.starts_with("[earlier"));
        assert!(history.len() + judged.len() <= MAX_TRANSCRIPT_CHARS + 64);
        // A candidate longer than half the budget is cut, not dropped.
        let long = [
            m(Role::User, "hi".into()),
            m(Role::Assistant, "z".repeat(20_000)),
        ];
        let (history, judged) = judged_transcript(&long, 1);
        assert_eq!(history, "User: hi");
        assert!(judged.starts_with("Assistant: zzz") && judged.ends_with("[…]"));
        assert!(judged.len() <= MAX_TRANSCRIPT_CHARS / 2);
    }

    #[test]
    fn replies_that_differ_only_in_white_space_are_the_same() {
        assert!(same_reply("Hello  there.\n", " Hello there."));
        assert!(!same_reply("Hello there.", "Hello there!"));
        assert_ne!(
            candidate_seed(1, "s/1", 0, 0),
            candidate_seed(1, "s/1", 0, 1),
            "a resampled candidate has a seed of its own"
        );
        assert_eq!(
            candidate_seed(7, "s/2", 1, 0),
            derive_seed(7, &["s/2", "candidate", "1"]),
            "the first draw keeps the seed runs before resampling used"
        );
    }
}
