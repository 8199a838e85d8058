//! Study protocol files (`study-protocols/*.toml`): the serde types a researcher writes, and the checks
//! that turn a protocol into a valid [`Protocol`] or a list of [`Diagnostic`]s naming file, line and fix.
//!
//! This module reads files and nothing else: it knows no database, no engine and no HTTP.

mod diagnostic;
mod sampling;
mod validate;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use diagnostic::{Diagnostic, ProtocolError};
pub use sampling::Sampling;

/// Where the example protocol lives in the repository; `serve` falls back to the embedded copy.
pub const EXAMPLE_PROTOCOL_PATH: &str = "study-protocols/doc-cocreation.toml";
/// The example protocol, compiled into the binary so `serve` runs from any directory.
pub const EXAMPLE_PROTOCOL: &str = include_str!("../../study-protocols/doc-cocreation.toml");

/// A study protocol as written in a TOML file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Protocol {
    pub study: StudyInfo,
    pub consent: Consent,
    #[serde(default)]
    pub session: SessionRules,
    pub models: Vec<ModelSpec>,
    pub arms: Vec<ArmSpec>,
    pub tasks: Vec<TaskSpec>,
    #[serde(default)]
    pub ratings: Vec<RatingSpec>,
    #[serde(default)]
    pub questionnaire: Vec<QuestionSpec>,
    pub outcomes: Outcomes,
    /// How the CollabLLM core simulates participants and scores replies.
    #[serde(default)]
    pub collab: CollabSpec,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StudyInfo {
    /// URL-safe identifier: participants enter at `/s/{slug}`.
    pub slug: String,
    pub title: String,
    /// The researcher's own version label of this protocol (stored with every import).
    pub version: String,
    #[serde(default)]
    pub description: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Consent {
    /// Version label of the consent text; its sha256 is stored with each agreement.
    pub version: String,
    pub text: String,
}

/// How a session runs: turn counts, input limits, assignment.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SessionRules {
    /// Turns (user message + assistant reply) before the participant may finish.
    pub min_turns: u32,
    /// Hard cap on turns; 0 means no cap.
    pub max_turns: u32,
    pub max_message_bytes: usize,
    pub max_document_bytes: usize,
    pub messages_per_minute: u32,
    /// A session without activity for this long ends as `timed_out`; 0 means never.
    pub idle_timeout_minutes: u32,
    pub assignment: AssignmentMethod,
    /// Seed of the permuted-block sequence; recorded so the sequence can be audited and replayed.
    pub assignment_seed: u64,
    /// Every this many turns the participant sees two candidate replies and picks one (tie and
    /// both-bad allowed): the preference pairs of the study. 0 turns comparisons off.
    pub compare_every_turns: u32,
}

impl Default for SessionRules {
    fn default() -> Self {
        Self {
            min_turns: 8,
            max_turns: 0,
            max_message_bytes: 8 * 1024,
            max_document_bytes: 200 * 1024,
            messages_per_minute: 10,
            idle_timeout_minutes: 60,
            assignment: AssignmentMethod::PermutedBlocks,
            assignment_seed: 1,
            compare_every_turns: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AssignmentMethod {
    /// Blocks holding every arm in proportion to its weight, shuffled with a recorded seed.
    PermutedBlocks,
    /// The arm with the fewest active + completed sessions relative to its weight.
    LeastFilled,
}

/// A model the arms can use: a local GGUF file or a remote OpenAI-compatible endpoint.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub id: String,
    /// GGUF file; a relative path is resolved against the models directory (`--models-dir`).
    pub file: Option<PathBuf>,
    /// Expected sha256 of `file`; checked when the model is loaded.
    pub sha256: Option<String>,
    /// Base URL of an OpenAI-compatible server (`…/v1`), instead of `file`.
    pub endpoint: Option<String>,
    /// Model name sent to `endpoint`.
    pub remote_model: Option<String>,
    /// Environment variable holding the bearer token for `endpoint`.
    pub api_key_env: Option<String>,
    /// How long `endpoint` may stay silent (before its response or between two streamed chunks)
    /// before the request fails.
    #[serde(default = "default_remote_timeout")]
    pub timeout_seconds: u32,
    #[serde(default = "default_context_tokens")]
    pub context_tokens: u32,
    /// Sequence slots of the worker; default: sized to the protocol.
    pub slots: Option<u32>,
    /// MiB of RAM for the caches of conversations that lost their slot to another, so their next
    /// turn is restored instead of computed again; 0 turns this off.
    #[serde(default = "default_saved_cache_mib")]
    pub saved_cache_mib: u32,
    /// Tokens a reply streams after taking a slot before a participant waiting for the first
    /// token of theirs may pause it, when every slot is busy; the paused reply goes on from where
    /// it stopped when a slot frees. 0: replies are never paused (participants wait for a slot).
    #[serde(default = "default_time_slice_tokens")]
    pub time_slice_tokens: u32,
    /// ggml's flash-attention kernel: faster for short chats and many at once (the `/v1`
    /// workload), but a conversation's later turns cost more with every cached token; off keeps
    /// them as fast as its first (docs/benchmarks.md).
    #[serde(default)]
    pub flash_attention: bool,
}

/// Default of [`ModelSpec::timeout_seconds`].
pub const DEFAULT_REMOTE_TIMEOUT_SECONDS: u32 = 120;

fn default_remote_timeout() -> u32 {
    DEFAULT_REMOTE_TIMEOUT_SECONDS
}

fn default_context_tokens() -> u32 {
    8192
}

/// Default of [`ModelSpec::time_slice_tokens`]: about two seconds of a reply with every slot busy
/// on two cores.
pub const DEFAULT_TIME_SLICE_TOKENS: u32 = 16;

fn default_time_slice_tokens() -> u32 {
    DEFAULT_TIME_SLICE_TOKENS
}

fn default_saved_cache_mib() -> u32 {
    1024
}

/// One arm of the study: a policy the participant chats with.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ArmSpec {
    pub id: String,
    pub model: String,
    #[serde(default = "default_weight")]
    pub weight: f64,
    /// Stop assigning this arm after this many active + completed sessions.
    pub quota: Option<u32>,
    pub system_prompt: String,
    #[serde(default)]
    pub sampling: Sampling,
    #[serde(default)]
    pub lora: Vec<LoraSpec>,
    /// Shown to researchers only.
    #[serde(default)]
    pub description: String,
}

fn default_weight() -> f64 {
    1.0
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LoraSpec {
    /// GGUF adapter file; relative paths resolve against the models directory.
    pub file: PathBuf,
    #[serde(default = "default_lora_scale")]
    pub scale: f32,
}

fn default_lora_scale() -> f32 {
    1.0
}

/// A document type with its bank of topics.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    pub id: String,
    /// "blog post", "creative writing", …
    pub kind: String,
    pub instructions: String,
    pub topics: Vec<TopicSpec>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TopicSpec {
    pub id: String,
    pub title: String,
    /// What the participant is asked to aim for; stored, never sent to the assistant.
    #[serde(default)]
    pub hidden_intent: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RatingSpec {
    pub id: String,
    pub question: String,
    pub when: RatingWhen,
    /// With `when = "periodic"`: ask after every this many turns.
    pub every_turns: Option<u32>,
    #[serde(default = "default_scale_min")]
    pub min: i32,
    #[serde(default = "default_scale_max")]
    pub max: i32,
    #[serde(default)]
    pub min_label: String,
    #[serde(default)]
    pub max_label: String,
}

fn default_scale_min() -> i32 {
    1
}

fn default_scale_max() -> i32 {
    10
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RatingWhen {
    Periodic,
    Final,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct QuestionSpec {
    pub id: String,
    pub prompt: String,
    #[serde(default = "default_true")]
    pub required: bool,
    #[serde(default = "default_answer_chars")]
    pub max_chars: usize,
}

fn default_true() -> bool {
    true
}

fn default_answer_chars() -> usize {
    4000
}

/// Completion codes and redirects for each way a session can end.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Outcomes {
    pub completed: OutcomeSpec,
    pub no_consent: OutcomeSpec,
    pub timed_out: OutcomeSpec,
    /// A screening outcome earlier protocols had to declare: still accepted, so those files and
    /// the versions stored from them load, and ignored, since no session ends this way.
    #[serde(default, rename = "screened_out", skip_serializing)]
    retired_screened_out: Option<toml::Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OutcomeSpec {
    pub code: String,
    /// URL shown after the code; `{code}` is replaced by the code (e.g. a Prolific completion URL).
    pub redirect: Option<String>,
    #[serde(default)]
    pub message: String,
}

/// The CollabLLM core's settings: who plays the participant and who judges, the multiturn-aware
/// reward's rollouts and weights, and where the prompts live.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CollabSpec {
    /// Model id (of `[[models]]`) of the user simulator; default: the first arm's model.
    pub simulator_model: Option<String>,
    /// Model id of the judge; default: the simulator's model.
    pub judge_model: Option<String>,
    /// Folder of prompt files, relative to the protocol file. A file it lacks falls back to the
    /// built-in prompt of the same name (`study-protocols/prompts/`).
    pub prompts: Option<PathBuf>,
    /// Rollouts per candidate reply (S).
    pub samples: u32,
    /// Turn pairs (user, assistant) each rollout runs past the candidate (w); 0 judges the
    /// candidate in its context alone (the paper's single-turn ablation).
    pub window: u32,
    /// Replies compared per turn: the one given and `candidates - 1` fresh ones (K).
    pub candidates: u32,
    /// Smallest reward gap between chosen and rejected for a pair to be kept.
    pub margin: f64,
    /// Share of a turn's fresh candidates generated with the proactive instruction
    /// (`proactive.md`) added to the arm's system prompt: the paper's `proact_prompt_ratio`. The
    /// pairs keep the arm's own prompt; the instruction only widens what is sampled.
    pub proactive_share: f64,
    /// The noise-aware rule: keep a pair only when its gap is at least this many standard errors
    /// of the gap (from the rollouts' spread); 0 keeps the paper's margin alone.
    pub min_gap_se: f64,
    /// Turn cap of a simulated participant (the protocol's `max_turns` caps it too).
    pub max_turns: u32,
    /// Longest document (characters) the judge extracts from a conversation.
    pub max_document_chars: u32,
    /// The interactivity judge writes a short `thought` before its rating. `false` leaves it
    /// out (fewer tokens; the rating is still read from the judge's token probabilities), but
    /// the reason can be what makes a judge agree: run `eval reward` before relying on it.
    pub judge_reasons: bool,
    /// The simulated user writes a short `thought` before each message; `false` leaves it out
    /// (most of the tokens a rollout's simulator generates); check it with `eval simulator`.
    pub simulator_reasons: bool,
    pub weights: RewardWeights,
    /// Sampling of the simulator (its `max_tokens` is set from the reply's length limits).
    pub simulator_sampling: Sampling,
    /// Sampling of the judge.
    pub judge_sampling: Sampling,
}

impl Default for CollabSpec {
    fn default() -> Self {
        Self {
            simulator_model: None,
            judge_model: None,
            prompts: None,
            samples: 3,
            window: 2,
            candidates: 2,
            margin: 0.02,
            proactive_share: 0.0,
            min_gap_se: 0.0,
            max_turns: 10,
            max_document_chars: 2000,
            judge_reasons: true,
            simulator_reasons: true,
            weights: RewardWeights::default(),
            simulator_sampling: Sampling {
                temperature: 0.8,
                ..Sampling::default()
            },
            judge_sampling: Sampling {
                temperature: 0.0,
                ..Sampling::default()
            },
        }
    }
}

/// Weights of a rollout's metrics in its score. Without a table they are the
/// `collabllm-recipe` preset; a table may name a preset and override any weight of it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(from = "WeightsTable")]
pub struct RewardWeights {
    /// Sentence BLEU of the final document against the goal (0–1).
    pub bleu: f64,
    /// Assistant tokens of the conversation, in thousands.
    pub tokens: f64,
    /// The judge's interactivity score (0–1).
    pub interactivity: f64,
    /// The judge's document quality, 1–10 mapped to 0–1; 0 skips the judge call.
    pub quality: f64,
    /// The preset the weights start from, when one is named.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preset: Option<WeightsPreset>,
}

/// Named weights, so a protocol says which setting it follows.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum WeightsPreset {
    /// The metric weights of the CollabLLM training recipe: task metric (BLEU for documents) 1,
    /// interactivity 1, −1e-4 per token (−0.1 per thousand).
    CollabllmRecipe,
    /// The paper's released document configuration: BLEU and tokens as the recipe, no
    /// interactivity.
    CollabllmDocument,
    /// Ours, for studies whose sessions rarely end with a goal document (BLEU then drops out of
    /// the score): the recipe plus the judge's document quality at 0.5, so a rollout's score
    /// still says something about the document and not only about the conversation.
    Studio,
}

impl WeightsPreset {
    pub fn weights(self) -> RewardWeights {
        let (interactivity, quality) = match self {
            WeightsPreset::CollabllmRecipe => (1.0, 0.0),
            WeightsPreset::CollabllmDocument => (0.0, 0.0),
            WeightsPreset::Studio => (1.0, 0.5),
        };
        RewardWeights {
            interactivity,
            quality,
            preset: Some(self),
            ..RewardWeights::default()
        }
    }
}

/// The `collabllm-recipe` weights, without naming the preset.
impl Default for RewardWeights {
    fn default() -> Self {
        RewardWeights {
            bleu: 1.0,
            tokens: -0.1,
            interactivity: 1.0,
            quality: 0.0,
            preset: None,
        }
    }
}

/// `[collab.weights]` as written: an optional preset and the weights that override it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WeightsTable {
    preset: Option<WeightsPreset>,
    bleu: Option<f64>,
    tokens: Option<f64>,
    interactivity: Option<f64>,
    quality: Option<f64>,
}

impl From<WeightsTable> for RewardWeights {
    fn from(t: WeightsTable) -> Self {
        let base = t
            .preset
            .map_or_else(RewardWeights::default, WeightsPreset::weights);
        RewardWeights {
            bleu: t.bleu.unwrap_or(base.bleu),
            tokens: t.tokens.unwrap_or(base.tokens),
            interactivity: t.interactivity.unwrap_or(base.interactivity),
            quality: t.quality.unwrap_or(base.quality),
            preset: t.preset,
        }
    }
}

impl Protocol {
    /// The model ids of the user simulator and the judge.
    pub fn collab_models(&self) -> (String, String) {
        let first_arm = self
            .arms
            .first()
            .map(|a| a.model.clone())
            .unwrap_or_default();
        let simulator = self.collab.simulator_model.clone().unwrap_or(first_arm);
        let judge = self
            .collab
            .judge_model
            .clone()
            .unwrap_or_else(|| simulator.clone());
        (simulator, judge)
    }
}

/// A protocol that passed every check, with the exact text it came from.
#[derive(Debug, Clone)]
pub struct LoadedProtocol {
    pub protocol: Protocol,
    pub text: String,
    pub sha256: String,
    pub source: PathBuf,
}

impl LoadedProtocol {
    /// Reads and checks a protocol file. Relative model paths resolve against `models_dir`.
    pub fn load(path: &Path, models_dir: &Path) -> Result<Self, ProtocolError> {
        let text = std::fs::read_to_string(path).map_err(|source| ProtocolError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_text(path, text, models_dir)
    }

    /// Checks protocol text; `path` is only used in messages.
    pub fn from_text(path: &Path, text: String, models_dir: &Path) -> Result<Self, ProtocolError> {
        let protocol = validate::check(path, &text, models_dir)?;
        Ok(Self {
            protocol,
            sha256: sha256_hex(text.as_bytes()),
            text,
            source: path.to_path_buf(),
        })
    }
}

impl Protocol {
    /// Parses the text of a protocol that was checked when it was imported (model files are not
    /// looked at again).
    pub fn from_stored(text: &str) -> Result<Self, ProtocolError> {
        toml::from_str(text).map_err(|e| {
            ProtocolError::Invalid(vec![Diagnostic::at(
                Path::new("stored protocol"),
                text,
                e.span().map_or(0, |s| s.start),
                e.message().trim(),
                "re-import the protocol file",
            )])
        })
    }

    pub fn model(&self, id: &str) -> Option<&ModelSpec> {
        self.models.iter().find(|m| m.id == id)
    }

    pub fn arm(&self, id: &str) -> Option<&ArmSpec> {
        self.arms.iter().find(|a| a.id == id)
    }

    pub fn task(&self, id: &str) -> Option<&TaskSpec> {
        self.tasks.iter().find(|t| t.id == id)
    }

    /// Sequence slots a model's worker needs so every arm using it can serve its share of
    /// concurrent participants: at least 4, or what the protocol sets.
    pub fn slots_for(&self, model_id: &str) -> u32 {
        self.model(model_id)
            .and_then(|m| m.slots)
            .unwrap_or(DEFAULT_SLOTS_PER_MODEL)
    }

    /// The periodic ratings due after `turn` completed turns.
    pub fn periodic_ratings_due(&self, turn: u32) -> Vec<&RatingSpec> {
        self.ratings
            .iter()
            .filter(|r| r.when == RatingWhen::Periodic)
            .filter(|r| matches!(r.every_turns, Some(n) if n > 0 && turn > 0 && turn % n == 0))
            .collect()
    }

    pub fn final_ratings(&self) -> Vec<&RatingSpec> {
        self.ratings
            .iter()
            .filter(|r| r.when == RatingWhen::Final)
            .collect()
    }
}

impl TaskSpec {
    pub fn topic(&self, id: &str) -> Option<&TopicSpec> {
        self.topics.iter().find(|p| p.id == id)
    }
}

/// Sequence slots per model when the protocol does not say.
pub const DEFAULT_SLOTS_PER_MODEL: u32 = 8;

impl ModelSpec {
    /// The GGUF path with a relative `file` resolved against `models_dir`.
    pub fn resolved_file(&self, models_dir: &Path) -> Option<PathBuf> {
        self.file.as_ref().map(|f| {
            if f.is_absolute() {
                f.clone()
            } else {
                models_dir.join(f)
            }
        })
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}
