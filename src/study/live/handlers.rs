//! One handler per command [`decide`](super::decide) lets through: each stores its frame in one
//! transaction with the frame's number (`apply_frame`: a resend is stored once) and says what to
//! send back. Limits that need the clock or the database (rates, counts) are checked here.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::decide::{Command, Snapshot};
use super::reply::{pending_candidates, store_reply};
use super::{refuse, LiveSession, Refusal};
use crate::db;
use crate::db::models::NewCandidate;
use crate::db::provenance::{Provenance, Usage};
use crate::db::sessions::Applied;
use crate::db::vocab::{CandidateSource, MessageRole, Outcome, RevisionAuthor, SessionState};
use crate::protocol::Protocol;
use crate::study::entry::completed_view;
use crate::study::frames::ServerFrame;
use crate::study::Studio;
use crate::throttle::Throttle;

/// Most document revisions and browser events a session keeps.
const MAX_REVISIONS_PER_SESSION: i32 = 5_000;
const MAX_EVENTS_PER_SESSION: i64 = 10_000;

type Frames = Result<Vec<ServerFrame>, Refusal>;

fn ack(client_seq: i64) -> Vec<ServerFrame> {
    vec![ServerFrame::Ack {
        client_seq,
        rev: None,
    }]
}

/// Everything a handler works on.
pub(super) struct Context<'a> {
    pub studio: &'a Arc<Studio>,
    pub live: &'a Arc<LiveSession>,
    pub snapshot: Snapshot,
    pub protocol: &'a Protocol,
}

impl Context<'_> {
    fn session_id(&self) -> i64 {
        self.snapshot.session.id
    }

    /// The acknowledgement followed by the session's whole state (the page moves on).
    async fn ack_with_state(&self, client_seq: i64) -> Frames {
        let mut frames = ack(client_seq);
        frames.push(
            self.studio
                .state_frame(self.session_id(), self.live)
                .await?,
        );
        Ok(frames)
    }
}

pub(super) async fn handle(cx: Context<'_>, command: Command) -> Frames {
    match command {
        Command::Message { client_seq, text } => message(&cx, client_seq, text).await,
        Command::Stop { client_seq } => stop(&cx, client_seq).await,
        Command::Document {
            client_seq,
            base_rev,
            content,
            inserted_message,
        } => document(&cx, client_seq, base_rev, content, inserted_message).await,
        Command::Rating {
            client_seq,
            key,
            value,
            completes,
        } => rating(&cx, client_seq, key, value, completes).await,
        Command::Finish { client_seq } => finish(&cx, client_seq).await,
        Command::FinalAnswers {
            client_seq,
            ratings,
            answers,
        } => final_answers(&cx, client_seq, ratings, answers).await,
        Command::Regenerate { client_seq } => regenerate(&cx, client_seq).await,
        Command::Choose {
            client_seq,
            chosen,
            keep,
        } => choose(&cx, client_seq, chosen, keep).await,
        Command::Event {
            client_seq,
            kind,
            payload,
        } => event(&cx, client_seq, kind, payload).await,
    }
}

/// A user message: stored, then the reply starts.
async fn message(cx: &Context<'_>, client_seq: i64, text: String) -> Frames {
    let session_id = cx.session_id();
    let studio = cx.studio.clone();
    let per_minute = i64::from(cx.protocol.session.messages_per_minute);
    let applied = cx
        .studio
        .write(move |conn| {
            db::sessions::apply_frame(conn, session_id, client_seq, |conn, _| {
                let since = db::now() - chrono::Duration::seconds(60);
                let recent = db::messages::user_messages_since(conn, session_id, since)?;
                if per_minute > 0 && recent >= per_minute {
                    return refuse(
                        "rate_limited",
                        "you are sending messages too quickly; wait a moment",
                    );
                }
                // One reply at a time across every node: refused while one is leased.
                if !studio.take_reply_lease(conn, session_id)? {
                    return refuse("busy", "wait for the reply, or press stop");
                }
                let message = db::messages::append(
                    conn,
                    session_id,
                    &db::models::NewMessage {
                        role: MessageRole::User,
                        content: &text,
                        ..Default::default()
                    },
                )?;
                db::sessions::mark_first_message(conn, session_id, message.created_at)?;
                Ok(db::messages::list_for_session(conn, session_id)?)
            })
        })
        .await?;
    if let Applied::New(history) = applied {
        cx.studio
            .start_reply(&cx.snapshot.session, cx.live, history, false)
            .await?;
    }
    Ok(ack(client_seq))
}

/// Stop: the reply in flight ends where it is (and is stored as it is).
/// A reply generated on another node is asked to stop through its lease.
async fn stop(cx: &Context<'_>, client_seq: i64) -> Frames {
    let session_id = cx.session_id();
    let here = match cx.live.reply.lock().expect("reply lock").as_ref() {
        Some(reply) => {
            for cancel in &reply.cancels {
                cancel.store(true, Ordering::Relaxed);
            }
            true
        }
        None => false,
    };
    cx.studio
        .write(move |conn| {
            db::sessions::apply_frame(conn, session_id, client_seq, |conn, _| {
                if !here {
                    db::leases::request_cancel(conn, &db::leases::reply_name(session_id))?;
                }
                Ok::<_, Refusal>(())
            })
        })
        .await?;
    Ok(ack(client_seq))
}

/// The document after an edit, on top of the revision the page had.
async fn document(
    cx: &Context<'_>,
    client_seq: i64,
    base_rev: i32,
    content: String,
    inserted_message: Option<i32>,
) -> Frames {
    if cx.snapshot.is_new(client_seq) {
        throttled(&cx.live.doc_updates, "document saves")?;
    }
    let session_id = cx.session_id();
    let applied = cx
        .studio
        .write(move |conn| {
            db::sessions::apply_frame(conn, session_id, client_seq, |conn, _| {
                let latest = db::revisions::latest(conn, session_id)?.map_or(0, |r| r.rev);
                if latest >= MAX_REVISIONS_PER_SESSION {
                    return refuse(
                        "too_many",
                        format!(
                            "a session keeps at most {MAX_REVISIONS_PER_SESSION} document revisions"
                        ),
                    );
                }
                if base_rev != latest {
                    return refuse(
                        "conflict",
                        format!(
                            "the document changed elsewhere (now revision {latest}); reloading"
                        ),
                    );
                }
                let author = if inserted_message.is_some() {
                    RevisionAuthor::AssistantInsert
                } else {
                    RevisionAuthor::User
                };
                Ok(
                    db::revisions::append(conn, session_id, author, inserted_message, &content)?
                        .rev,
                )
            })
        })
        .await?;
    let rev = match applied {
        Applied::New(rev) => Some(rev),
        Applied::Duplicate => None,
    };
    Ok(vec![ServerFrame::Ack { client_seq, rev }])
}

/// A periodic rating; the last one due lets the conversation go on.
async fn rating(
    cx: &Context<'_>,
    client_seq: i64,
    key: String,
    value: i32,
    completes: bool,
) -> Frames {
    let (session_id, turn) = (cx.session_id(), cx.snapshot.turn);
    cx.studio
        .write(move |conn| {
            db::sessions::apply_frame(conn, session_id, client_seq, |conn, s| {
                db::ratings::record(conn, session_id, turn, &key, value)?;
                if completes && s.state == SessionState::Rating {
                    db::sessions::set_state(conn, session_id, SessionState::Chatting)?;
                }
                Ok::<_, Refusal>(())
            })
        })
        .await?;
    cx.ack_with_state(client_seq).await
}

/// The participant ends the conversation: the final questions come next.
async fn finish(cx: &Context<'_>, client_seq: i64) -> Frames {
    let session_id = cx.session_id();
    cx.studio
        .write(move |conn| {
            db::sessions::apply_frame(conn, session_id, client_seq, |conn, _| {
                db::sessions::set_state(conn, session_id, SessionState::Final)?;
                Ok::<_, Refusal>(())
            })
        })
        .await?;
    cx.ack_with_state(client_seq).await
}

/// The final ratings and answers: the session is completed, and only then is the code shown.
async fn final_answers(
    cx: &Context<'_>,
    client_seq: i64,
    ratings: std::collections::BTreeMap<String, i32>,
    answers: std::collections::BTreeMap<String, String>,
) -> Frames {
    let (session_id, turn) = (cx.session_id(), cx.snapshot.turn);
    let code = cx.protocol.outcomes.completed.code.clone();
    cx.studio
        .write(move |conn| {
            db::sessions::apply_frame(conn, session_id, client_seq, |conn, _| {
                for (key, value) in &ratings {
                    db::ratings::record(conn, session_id, turn, key, *value)?;
                }
                for (key, answer) in &answers {
                    db::answers::record(conn, session_id, key, answer)?;
                }
                db::sessions::finish(conn, session_id, Outcome::Completed, &code)?;
                Ok::<_, Refusal>(())
            })
        })
        .await?;
    let mut frames = ack(client_seq);
    frames.push(ServerFrame::Completed(completed_view(
        &cx.protocol.outcomes.completed,
    )));
    Ok(frames)
}

/// Another reply to the last message: the one given is kept as a candidate, with what produced
/// it, and the participant later picks between the two. After a reply that failed (the last
/// message is the participant's, with no candidates waiting) it is "try again": the reply is
/// simply generated again.
async fn regenerate(cx: &Context<'_>, client_seq: i64) -> Frames {
    let session_id = cx.session_id();
    let studio = cx.studio.clone();
    let applied = cx
        .studio
        .write(move |conn| {
            db::sessions::apply_frame(conn, session_id, client_seq, |conn, _| {
                let Some(last) = db::messages::last(conn, session_id)? else {
                    return refuse("not_allowed", "there is no reply to replace");
                };
                if last.role == MessageRole::User {
                    // The failed reply may itself have been a replacement (its first candidate
                    // is kept): it is generated as one again.
                    let pending = pending_candidates(conn, session_id)?;
                    if pending.len() > 1 {
                        return refuse("not_allowed", "pick one of the two replies first");
                    }
                    if !studio.take_reply_lease(conn, session_id)? {
                        return refuse("busy", "wait for the reply to finish");
                    }
                    let replacing = pending
                        .iter()
                        .any(|c| c.source == CandidateSource::Regenerate);
                    let history = db::messages::list_for_session(conn, session_id)?;
                    return Ok((history, replacing));
                }
                if !studio.take_reply_lease(conn, session_id)? {
                    return refuse("busy", "wait for the reply to finish");
                }
                let mut policy = last
                    .policy_json
                    .as_deref()
                    .and_then(Provenance::parse)
                    .unwrap_or_default();
                let count = |n: Option<i32>| n.and_then(|v| u64::try_from(v).ok());
                policy.usage = Some(Usage {
                    ttft_ms: count(last.ttft_ms),
                    gen_ms: count(last.gen_ms),
                    prompt_tokens: count(last.prompt_tokens),
                    gen_tokens: count(last.gen_tokens),
                    finish_reason: last.finish_reason.clone(),
                });
                db::candidates::insert(
                    conn,
                    &NewCandidate {
                        session_id,
                        after_seq: last.seq - 1,
                        source: CandidateSource::Regenerate,
                        content: &last.content,
                        chosen: None,
                        policy_json: &policy.to_json(),
                        created_at: db::now(),
                    },
                )?;
                db::messages::remove(conn, last.id)?;
                Ok((db::messages::list_for_session(conn, session_id)?, true))
            })
        })
        .await?;
    if let Applied::New((history, replacing)) = applied {
        cx.studio
            .start_reply(&cx.snapshot.session, cx.live, history, replacing)
            .await?;
    }
    Ok(ack(client_seq))
}

/// The pick between two candidates; the conversation goes on with the one kept.
async fn choose(cx: &Context<'_>, client_seq: i64, chosen: [bool; 2], keep: usize) -> Frames {
    let session_id = cx.session_id();
    let studio = cx.studio.clone();
    cx.studio
        .write(move |conn| {
            db::sessions::apply_frame(conn, session_id, client_seq, |conn, s| {
                let candidates = pending_candidates(conn, session_id)?;
                if candidates.len() != 2 {
                    return refuse("not_allowed", "there are no replies to choose between");
                }
                for (candidate, chosen) in candidates.iter().zip(chosen) {
                    db::candidates::set_chosen(conn, candidate.id, chosen)?;
                }
                let kept = &candidates[keep];
                let policy = Provenance::parse(&kept.policy_json).unwrap_or_default();
                let protocol = studio.protocol(conn, s.study_version_id)?;
                store_reply(conn, &protocol, session_id, &kept.content, &policy)?;
                Ok::<_, Refusal>(())
            })
        })
        .await?;
    cx.ack_with_state(client_seq).await
}

/// A browser event, for active-time measures.
async fn event(cx: &Context<'_>, client_seq: i64, kind: String, payload: String) -> Frames {
    if cx.snapshot.is_new(client_seq) {
        throttled(&cx.live.browser_events, "browser events")?;
    }
    let session_id = cx.session_id();
    cx.studio
        .write(move |conn| {
            db::sessions::apply_frame(conn, session_id, client_seq, |conn, _| {
                if db::events::count_for_session(conn, session_id)? >= MAX_EVENTS_PER_SESSION {
                    return refuse(
                        "too_many",
                        format!("a session keeps at most {MAX_EVENTS_PER_SESSION} browser events"),
                    );
                }
                db::events::record(conn, session_id, client_seq, &kind, &payload)?;
                Ok::<_, Refusal>(())
            })
        })
        .await?;
    Ok(ack(client_seq))
}

/// Counts a frame against a per-minute limit of the session; refuses it (not applied, so the
/// client may send it again later under a new number) when the limit is reached.
fn throttled(throttle: &Throttle, what: &str) -> Result<(), Refusal> {
    if let Some(wait) = throttle.wait("") {
        return refuse(
            "rate_limited",
            format!(
                "too many {what} in a minute; try again in {} s",
                wait.as_secs() + 1
            ),
        );
    }
    throttle.hit("");
    Ok(())
}
