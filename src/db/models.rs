//! Rows as stored, and the values to insert them. Query functions live in the per-aggregate modules.

use chrono::NaiveDateTime;
use diesel::prelude::*;
use serde::Serialize;

use super::schema::*;
use super::vocab::{
    CandidateSource, MessageRole, NullableText, Outcome, RevisionAuthor, SessionState,
};

#[derive(Debug, Clone, Queryable, Selectable, Serialize, PartialEq)]
#[diesel(table_name = studies)]
pub struct Study {
    pub id: i64,
    pub slug: String,
    pub title: String,
    pub status: String,
    pub created_at: NaiveDateTime,
}

#[derive(Debug, Clone, Queryable, Selectable, Serialize, PartialEq)]
#[diesel(table_name = study_versions)]
pub struct StudyVersion {
    pub id: i64,
    pub study_id: i64,
    pub version: i32,
    pub label: String,
    pub protocol_text: String,
    pub protocol_sha256: String,
    pub source_path: String,
    pub imported_at: NaiveDateTime,
}

#[derive(Debug, Clone, Queryable, Selectable, Serialize, PartialEq)]
#[diesel(table_name = arms)]
pub struct Arm {
    pub id: i64,
    pub study_version_id: i64,
    pub name: String,
    pub model_id: String,
    pub weight: f64,
    pub quota: Option<i32>,
    /// The arm's policy (system prompt, sampling, adapters) as JSON, as imported.
    pub policy_json: String,
}

#[derive(Debug, Clone, Queryable, Selectable, Serialize, PartialEq)]
#[diesel(table_name = participants)]
pub struct Participant {
    pub id: i64,
    pub study_id: i64,
    pub pseudonym: String,
    pub external_id_hmac: Option<String>,
    pub simulated: bool,
    pub created_at: NaiveDateTime,
}

#[derive(Debug, Clone, Queryable, Selectable, Serialize, PartialEq)]
#[diesel(table_name = sessions)]
pub struct Session {
    pub id: i64,
    pub public_id: String,
    pub participant_id: i64,
    pub study_version_id: i64,
    /// Arm, task and topic are drawn at consent.
    pub arm_id: Option<i64>,
    pub task_id: Option<String>,
    pub topic_id: Option<String>,
    /// sha256 of the participant's session token (the token itself is never stored).
    pub token_hash: String,
    #[diesel(deserialize_as = String)]
    pub state: SessionState,
    #[diesel(deserialize_as = NullableText)]
    pub outcome: Option<Outcome>,
    pub completion_code: Option<String>,
    pub consent_sha256: Option<String>,
    pub consented_at: Option<NaiveDateTime>,
    pub started_at: NaiveDateTime,
    pub first_message_at: Option<NaiveDateTime>,
    pub finished_at: Option<NaiveDateTime>,
    pub last_activity_at: NaiveDateTime,
    /// The highest client frame number applied: resent frames at or below it are duplicates.
    pub last_client_seq: i64,
    /// HMAC of the Prolific `SESSION_ID` the session started with: the proof that lets the same
    /// participant resume it in another browser.
    pub resume_proof_hmac: Option<String>,
    /// A researcher allowed the next entry with this participant's id to take the session over.
    pub handover_allowed: bool,
    /// Raised by every `hello`: the socket that said it last may write (see `sessions::claim`).
    pub owner_epoch: i64,
    /// A simulated participant's seed, from which its replies' seeds are drawn (people: none).
    pub simulation_seed: Option<i64>,
}

#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = sessions)]
pub struct NewSession<'a> {
    pub public_id: &'a str,
    pub participant_id: i64,
    pub study_version_id: i64,
    pub arm_id: Option<i64>,
    pub task_id: Option<&'a str>,
    pub topic_id: Option<&'a str>,
    pub token_hash: &'a str,
    #[diesel(serialize_as = String)]
    pub state: SessionState,
    pub resume_proof_hmac: Option<&'a str>,
    pub started_at: NaiveDateTime,
    pub last_activity_at: NaiveDateTime,
    pub simulation_seed: Option<i64>,
}

#[derive(Debug, Clone, Queryable, Selectable, Serialize, PartialEq)]
#[diesel(table_name = messages)]
pub struct Message {
    pub id: i64,
    pub session_id: i64,
    pub seq: i32,
    #[diesel(deserialize_as = String)]
    pub role: MessageRole,
    pub content: String,
    pub created_at: NaiveDateTime,
    pub ttft_ms: Option<i32>,
    pub gen_ms: Option<i32>,
    pub prompt_tokens: Option<i32>,
    pub gen_tokens: Option<i32>,
    pub finish_reason: Option<String>,
    pub policy_json: Option<String>,
}

impl Message {
    /// Whether this message completes a turn: an assistant reply the participant did not stop
    /// (finish reason `cancelled`). Stopping is no way to reach the protocol's minimum of turns,
    /// and pages, console, results and exports all count turns this way.
    pub fn is_turn(&self) -> bool {
        self.role == MessageRole::Assistant && !Self::was_stopped(self.finish_reason.as_deref())
    }

    /// Whether a reply with this finish reason was stopped by the participant.
    pub fn was_stopped(finish_reason: Option<&str>) -> bool {
        finish_reason == Some("cancelled")
    }
}

/// A message to append; `seq` is assigned by [`super::messages::append`].
#[derive(Debug, Clone)]
pub struct NewMessage<'a> {
    pub role: MessageRole,
    pub content: &'a str,
    pub ttft_ms: Option<i32>,
    pub gen_ms: Option<i32>,
    pub prompt_tokens: Option<i32>,
    pub gen_tokens: Option<i32>,
    pub finish_reason: Option<&'a str>,
    pub policy_json: Option<&'a str>,
}

/// An empty participant message without generation details; set what you have.
impl Default for NewMessage<'_> {
    fn default() -> Self {
        Self {
            role: MessageRole::User,
            content: "",
            ttft_ms: None,
            gen_ms: None,
            prompt_tokens: None,
            gen_tokens: None,
            finish_reason: None,
            policy_json: None,
        }
    }
}

#[derive(Debug, Clone, Queryable, Selectable, Serialize, PartialEq)]
#[diesel(table_name = candidates)]
pub struct Candidate {
    pub id: i64,
    pub session_id: i64,
    pub after_seq: i32,
    #[diesel(deserialize_as = String)]
    pub source: CandidateSource,
    pub content: String,
    pub chosen: Option<bool>,
    pub policy_json: String,
    pub created_at: NaiveDateTime,
}

#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = candidates)]
pub struct NewCandidate<'a> {
    pub session_id: i64,
    pub after_seq: i32,
    #[diesel(serialize_as = String)]
    pub source: CandidateSource,
    pub content: &'a str,
    pub chosen: Option<bool>,
    pub policy_json: &'a str,
    pub created_at: NaiveDateTime,
}

#[derive(Debug, Clone, Queryable, Selectable, Serialize, PartialEq)]
#[diesel(table_name = document_revisions)]
pub struct DocumentRevision {
    pub id: i64,
    pub session_id: i64,
    pub rev: i32,
    #[diesel(deserialize_as = String)]
    pub author: RevisionAuthor,
    /// For an insert from the chat: the assistant message inserted.
    pub message_seq: Option<i32>,
    pub content: String,
    pub created_at: NaiveDateTime,
}

#[derive(Debug, Clone, Queryable, Selectable, Serialize, PartialEq)]
#[diesel(table_name = ratings)]
pub struct Rating {
    pub id: i64,
    pub session_id: i64,
    pub after_turn: i32,
    pub rating_key: String,
    pub value: i32,
    pub created_at: NaiveDateTime,
}

#[derive(Debug, Clone, Queryable, Selectable, Serialize, PartialEq)]
#[diesel(table_name = questionnaire_answers)]
pub struct Answer {
    pub id: i64,
    pub session_id: i64,
    pub question_key: String,
    pub answer: String,
    pub created_at: NaiveDateTime,
}

#[derive(Debug, Clone, Queryable, Selectable, Serialize, PartialEq)]
#[diesel(table_name = events)]
pub struct Event {
    pub id: i64,
    pub session_id: i64,
    pub client_seq: i64,
    pub kind: String,
    pub payload_json: String,
    pub created_at: NaiveDateTime,
}

#[derive(Debug, Clone, Queryable, Selectable, Serialize, PartialEq)]
#[diesel(table_name = assignments)]
pub struct Assignment {
    pub id: i64,
    pub study_version_id: i64,
    pub participant_id: i64,
    pub draw_index: i32,
    pub method: String,
    pub arm_id: i64,
    pub task_id: String,
    pub topic_id: String,
    /// What the draw saw (counts, block position, seed), so the sequence can be audited.
    pub inputs_json: String,
    pub created_at: NaiveDateTime,
}

#[derive(Debug, Clone)]
pub struct NewAssignment<'a> {
    pub study_version_id: i64,
    pub participant_id: i64,
    pub method: &'a str,
    pub arm_id: i64,
    pub task_id: &'a str,
    pub topic_id: &'a str,
    pub inputs_json: &'a str,
}

#[derive(Debug, Clone, Queryable, Selectable, Serialize, PartialEq)]
#[diesel(table_name = rewards)]
pub struct Reward {
    pub id: i64,
    pub session_id: i64,
    pub turn: i32,
    pub candidate_id: Option<i64>,
    pub mr: f64,
    pub mr_std: f64,
    pub components_json: String,
    pub created_at: NaiveDateTime,
    pub config_sha256: String,
}

#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = rewards)]
pub struct NewReward<'a> {
    pub session_id: i64,
    pub turn: i32,
    pub candidate_id: Option<i64>,
    pub mr: f64,
    pub mr_std: f64,
    pub components_json: &'a str,
    pub created_at: NaiveDateTime,
    pub config_sha256: &'a str,
}

#[derive(Debug, Clone, Queryable, Selectable, Serialize, PartialEq)]
#[diesel(table_name = rollouts)]
pub struct Rollout {
    pub id: i64,
    pub session_id: i64,
    pub turn: i32,
    pub candidate_id: Option<i64>,
    pub sample: i32,
    pub config_sha256: String,
    pub seed: i64,
    pub conversation_json: String,
    pub metrics_json: String,
    pub score: f64,
    pub created_at: NaiveDateTime,
}

#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = rollouts)]
pub struct NewRollout<'a> {
    pub session_id: i64,
    pub turn: i32,
    pub candidate_id: Option<i64>,
    pub sample: i32,
    pub config_sha256: &'a str,
    pub seed: i64,
    pub conversation_json: &'a str,
    pub metrics_json: &'a str,
    pub score: f64,
    pub created_at: NaiveDateTime,
}

/// An evaluation of a study's arms with simulated users (`collabllm eval`).
#[derive(Debug, Clone, Queryable, Selectable, Serialize, PartialEq)]
#[diesel(table_name = evaluations)]
pub struct Evaluation {
    pub id: i64,
    pub study_id: i64,
    pub users: i32,
    pub table_json: String,
    pub provenance_json: String,
    pub created_at: NaiveDateTime,
}
