//! The websocket protocol between the participant's browser and the server: JSON frames with a
//! `type`. Client frames that change something carry a `client_seq`; the server applies each at
//! most once and acknowledges it, so a client resends unacknowledged frames after a reconnect.
//! The server answers `hello` with the full `state`, which is how a reconnecting client catches up
//! (a reply still streaming is part of it).
//!
//! Nothing here names the arm, the model, the system prompt or the sampling settings: the
//! participant only ever sees "Assistant".

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::db::vocab::{MessageRole, SessionState};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientFrame {
    /// First frame of a connection. The session is the one of the browser's cookie, sent with
    /// the websocket upgrade; a token given here must be that same one.
    Hello {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        session_token: Option<String>,
    },
    UserMessage {
        client_seq: i64,
        text: String,
    },
    /// Stop the reply that is streaming.
    Stop {
        client_seq: i64,
    },
    /// The whole document after an edit, based on revision `base_rev` (0 before the first).
    /// `inserted_message` names the assistant message the change inserted, if it was an insert.
    DocUpdate {
        client_seq: i64,
        base_rev: i32,
        content: String,
        #[serde(default)]
        inserted_message: Option<i32>,
    },
    Rating {
        client_seq: i64,
        key: String,
        value: i32,
    },
    /// Ask to end the conversation (allowed after the minimum number of turns).
    Finish {
        client_seq: i64,
    },
    /// Final ratings and questionnaire answers; ends the session.
    FinalAnswers {
        client_seq: i64,
        ratings: BTreeMap<String, i32>,
        answers: BTreeMap<String, String>,
    },
    /// Ask for another reply to the last message; the participant then keeps one of the two.
    /// After `assistant_failed`: try the reply again.
    Regenerate {
        client_seq: i64,
    },
    /// The participant's pick between two candidate replies: `a`, `b`, `tie` or `both_bad`.
    Choose {
        client_seq: i64,
        choice: String,
    },
    /// A browser event (focus, blur, visibility, …) for active-time measures.
    Event {
        client_seq: i64,
        kind: String,
        #[serde(default)]
        data: serde_json::Value,
    },
}

impl ClientFrame {
    /// The frame's `type`.
    pub fn kind(&self) -> &'static str {
        match self {
            ClientFrame::Hello { .. } => "hello",
            ClientFrame::UserMessage { .. } => "user_message",
            ClientFrame::Stop { .. } => "stop",
            ClientFrame::DocUpdate { .. } => "doc_update",
            ClientFrame::Rating { .. } => "rating",
            ClientFrame::Finish { .. } => "finish",
            ClientFrame::FinalAnswers { .. } => "final_answers",
            ClientFrame::Regenerate { .. } => "regenerate",
            ClientFrame::Choose { .. } => "choose",
            ClientFrame::Event { .. } => "event",
        }
    }

    pub fn client_seq(&self) -> Option<i64> {
        match self {
            ClientFrame::Hello { .. } => None,
            ClientFrame::UserMessage { client_seq, .. }
            | ClientFrame::Stop { client_seq }
            | ClientFrame::DocUpdate { client_seq, .. }
            | ClientFrame::Rating { client_seq, .. }
            | ClientFrame::Finish { client_seq }
            | ClientFrame::FinalAnswers { client_seq, .. }
            | ClientFrame::Choose { client_seq, .. }
            | ClientFrame::Regenerate { client_seq }
            | ClientFrame::Event { client_seq, .. } => Some(*client_seq),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    State(Box<StateView>),
    AssistantStart {
        msg_seq: i32,
        /// Two candidates stream at once (a comparison turn).
        #[serde(default)]
        comparison: bool,
    },
    Token {
        msg_seq: i32,
        /// The number of token frames of this reply (candidate) before this one: a client that
        /// already has the text up to a later point (from a `state` frame) skips it.
        index: usize,
        delta: String,
        /// In a comparison turn: which candidate (0 = A, 1 = B).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        candidate: Option<usize>,
    },
    /// The reply waits for the engine with `ahead` replies before it (0: next), sent when that
    /// changes; `null` once it has its turn and is being written.
    Queued {
        msg_seq: i32,
        ahead: Option<usize>,
    },
    /// Both candidates of a comparison turn are ready; the participant picks with `choose`.
    Comparison(ComparisonView),
    /// Sent after any `rating_request` the reply makes due, so a client that acts on it is in
    /// step with the server; `phase` is what the session moved on to.
    AssistantDone {
        msg_seq: i32,
        text: String,
        finish_reason: String,
        phase: SessionState,
    },
    Ack {
        client_seq: i64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rev: Option<i32>,
    },
    RatingRequest {
        after_turn: i32,
        ratings: Vec<RatingView>,
    },
    Error {
        code: String,
        message: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client_seq: Option<i64>,
    },
    Completed(CompletedView),
}

impl ServerFrame {
    pub fn error(code: &str, message: impl Into<String>, client_seq: Option<i64>) -> Self {
        ServerFrame::Error {
            code: code.into(),
            message: message.into(),
            client_seq,
        }
    }
}

/// Everything the participant's page shows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateView {
    pub phase: SessionState,
    /// Completed turns (assistant replies).
    pub turn: i32,
    pub min_turns: u32,
    pub max_turns: u32,
    pub can_finish: bool,
    pub task: TaskView,
    pub messages: Vec<MessageView>,
    /// A reply still being generated, with its text so far.
    pub streaming: Option<MessageView>,
    /// Token frames of the streaming reply that its text so far already contains.
    pub streaming_tokens: usize,
    /// The streaming reply's place in the engine's queue while it waits to be written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queued_ahead: Option<usize>,
    pub document: DocumentView,
    pub pending_ratings: Vec<RatingView>,
    pub final_ratings: Vec<RatingView>,
    pub questionnaire: Vec<QuestionView>,
    pub max_message_bytes: usize,
    pub max_document_bytes: usize,
    /// The highest client frame applied: frames at or below it need no resend.
    pub last_client_seq: i64,
    pub completed: Option<CompletedView>,
    /// Candidates waiting for the participant's pick.
    pub comparison: Option<ComparisonView>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComparisonView {
    pub msg_seq: i32,
    /// Reply A and reply B.
    pub candidates: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskView {
    pub kind: String,
    pub title: String,
    pub instructions: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MessageView {
    pub seq: i32,
    pub role: MessageRole,
    pub content: String,
    /// How a reply ended (`stop`, `length`, `cancelled`), so the page can say that it was cut.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DocumentView {
    pub rev: i32,
    pub content: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RatingView {
    pub key: String,
    pub question: String,
    pub min: i32,
    pub max: i32,
    pub min_label: String,
    pub max_label: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuestionView {
    pub key: String,
    pub prompt: String,
    pub required: bool,
    pub max_chars: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletedView {
    pub code: String,
    pub redirect: Option<String>,
    pub message: String,
}
