//! What the participant's page shows, built from what is stored plus the reply in flight: the
//! `state` frame a socket gets on `hello`, after a rating or a pick, and when it fell behind.

use std::sync::Arc;

use super::cluster::Progress;
use super::decide::pending_ratings;
use super::reply::pending_candidates;
use super::LiveSession;
use crate::db::models::Session;
use crate::db::vocab::{CandidateSource, MessageRole, SessionState};
use crate::db::{self, DbConn};
use crate::protocol::{Protocol, RatingSpec};
use crate::study::entry::completed_view;
use crate::study::frames::{
    ComparisonView, DocumentView, MessageView, QuestionView, RatingView, ServerFrame, StateView,
    TaskView,
};
use crate::study::{Studio, StudyError};

/// A reply in flight as a `state` frame shows it.
struct Streaming {
    view: MessageView,
    /// Token frames its text already holds.
    tokens: usize,
    /// Its place in the engine's queue while it waits for a slot.
    waiting: Option<usize>,
}

impl From<Progress> for Streaming {
    /// A state frame shows the first candidate's text as the reply in flight.
    fn from(p: Progress) -> Self {
        Streaming {
            view: MessageView {
                seq: p.msg_seq,
                role: MessageRole::Assistant,
                content: p.texts.into_iter().next().unwrap_or_default(),
                finish_reason: None,
            },
            tokens: p.tokens.first().copied().unwrap_or(0),
            waiting: p.waiting,
        }
    }
}

impl Studio {
    pub(super) async fn state_frame(
        self: &Arc<Self>,
        session_id: i64,
        live: &LiveSession,
    ) -> Result<ServerFrame, StudyError> {
        let here = live
            .reply
            .lock()
            .expect("reply lock")
            .as_ref()
            .map(|r| r.progress());
        let this = self.clone();
        self.db(move |conn| {
            let session = db::sessions::get(conn, session_id)?;
            let protocol = this.protocol(conn, session.study_version_id)?;
            // The reply of this node, else one that another node generates, as far as it got.
            let streaming = match here {
                Some(p) => Some(p),
                None => Studio::leased_reply(conn, session_id)?,
            }
            .map(Streaming::from);
            Ok(ServerFrame::State(Box::new(view(
                conn, &protocol, &session, streaming,
            )?)))
        })
        .await
    }
}

pub(super) fn rating_view(r: &RatingSpec) -> RatingView {
    RatingView {
        key: r.id.clone(),
        question: r.question.clone(),
        min: r.min,
        max: r.max,
        min_label: r.min_label.clone(),
        max_label: r.max_label.clone(),
    }
}

/// What the participant's page shows, from what is stored.
fn view(
    conn: &mut DbConn,
    protocol: &Protocol,
    session: &Session,
    streaming: Option<Streaming>,
) -> Result<StateView, StudyError> {
    let messages = db::messages::list_for_session(conn, session.id)?;
    let candidates = if session.state == SessionState::Choosing {
        pending_candidates(conn, session.id)?
    } else {
        Vec::new()
    };
    let turn = messages.iter().filter(|m| m.is_turn()).count() as i32;
    // A reply the participant asked to replace still counts as their turn while they choose.
    let shown_turn = turn
        + i32::from(
            candidates
                .first()
                .is_some_and(|c| c.source == CandidateSource::Regenerate),
        );
    let document = db::revisions::latest(conn, session.id)?;
    let task = session.task_id.as_deref().and_then(|id| protocol.task(id));
    let topic = task
        .zip(session.topic_id.as_deref())
        .and_then(|(t, id)| t.topic(id));
    let pending = if session.state == SessionState::Rating {
        let recorded = db::ratings::keys_after_turn(conn, session.id, turn)?;
        pending_ratings(protocol, turn, &recorded)
    } else {
        Vec::new()
    };
    Ok(StateView {
        phase: session.state,
        turn: shown_turn,
        min_turns: protocol.session.min_turns,
        max_turns: protocol.session.max_turns,
        can_finish: session.state == SessionState::Chatting
            && turn >= protocol.session.min_turns as i32,
        task: TaskView {
            kind: task.map(|t| t.kind.clone()).unwrap_or_default(),
            title: topic.map(|p| p.title.clone()).unwrap_or_default(),
            instructions: task.map(|t| t.instructions.clone()).unwrap_or_default(),
        },
        messages: messages
            .into_iter()
            .map(|m| MessageView {
                seq: m.seq,
                role: m.role,
                content: m.content,
                finish_reason: m.finish_reason,
            })
            .collect(),
        streaming_tokens: streaming.as_ref().map_or(0, |s| s.tokens),
        queued_ahead: streaming.as_ref().and_then(|s| s.waiting),
        streaming: streaming.map(|s| s.view),
        document: DocumentView {
            rev: document.as_ref().map_or(0, |d| d.rev),
            content: document.map(|d| d.content).unwrap_or_default(),
        },
        pending_ratings: pending.into_iter().map(rating_view).collect(),
        final_ratings: protocol
            .final_ratings()
            .into_iter()
            .map(rating_view)
            .collect(),
        questionnaire: protocol
            .questionnaire
            .iter()
            .map(|q| QuestionView {
                key: q.id.clone(),
                prompt: q.prompt.clone(),
                required: q.required,
                max_chars: q.max_chars,
            })
            .collect(),
        max_message_bytes: protocol.session.max_message_bytes,
        max_document_bytes: protocol.session.max_document_bytes,
        last_client_seq: session.last_client_seq,
        comparison: candidates.first().map(|c| ComparisonView {
            msg_seq: c.after_seq + 1,
            candidates: candidates.iter().map(|c| c.content.clone()).collect(),
        }),
        completed: (session.state == SessionState::Finished)
            .then(|| completed_view(&protocol.outcomes.completed)),
    })
}
