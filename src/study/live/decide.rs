//! What a frame may do, decided from a snapshot of the session alone: no database, no engine, no
//! clock. A frame the session has applied before (its `client_seq` is not past the last one) is
//! let through unchecked, so a client that resends after a reconnect is acknowledged rather
//! than refused; storing it again is what the handlers' `apply_frame` prevents.

use std::collections::BTreeMap;

use super::{refuse, Refusal};
use crate::db::models::Session;
use crate::db::vocab::SessionState;
use crate::protocol::{Protocol, RatingSpec};
use crate::study::frames::ClientFrame;

/// Longest kind of a browser event, and largest event payload.
pub(super) const MAX_EVENT_KIND_BYTES: usize = 64;
pub(super) const MAX_EVENT_DATA_BYTES: usize = 4096;

/// The session as a frame finds it, loaded once per frame.
#[derive(Debug, Clone)]
pub(super) struct Snapshot {
    pub session: Session,
    /// Completed turns ([`crate::db::models::Message::is_turn`]).
    pub turn: i32,
    /// Keys of the periodic ratings recorded after `turn`.
    pub recorded: Vec<String>,
    /// A reply is being generated.
    pub busy: bool,
}

impl Snapshot {
    /// Whether the frame numbered `client_seq` is new to the session (else it is a resend).
    pub fn is_new(&self, client_seq: i64) -> bool {
        client_seq > self.session.last_client_seq
    }

    /// The periodic ratings due now and not recorded yet.
    pub fn pending_ratings<'p>(&self, protocol: &'p Protocol) -> Vec<&'p RatingSpec> {
        pending_ratings(protocol, self.turn, &self.recorded)
    }
}

/// A frame that may be applied, with what its handler needs.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Command {
    Message {
        client_seq: i64,
        text: String,
    },
    Stop {
        client_seq: i64,
    },
    Document {
        client_seq: i64,
        base_rev: i32,
        content: String,
        inserted_message: Option<i32>,
    },
    Rating {
        client_seq: i64,
        key: String,
        value: i32,
        /// The last rating due: the conversation goes on after it.
        completes: bool,
    },
    Finish {
        client_seq: i64,
    },
    FinalAnswers {
        client_seq: i64,
        ratings: BTreeMap<String, i32>,
        answers: BTreeMap<String, String>,
    },
    Regenerate {
        client_seq: i64,
    },
    /// Whether each of the two candidates was chosen; the conversation goes on with `keep`.
    Choose {
        client_seq: i64,
        chosen: [bool; 2],
        keep: usize,
    },
    Event {
        client_seq: i64,
        kind: String,
        payload: String,
    },
}

/// The command a frame asks for, or why the session cannot take it now. `hello` belongs to the
/// connection, not the session, and is refused here.
pub(super) fn decide(
    snapshot: &Snapshot,
    protocol: &Protocol,
    frame: ClientFrame,
) -> Result<Command, Refusal> {
    let state = snapshot.session.state;
    if state.has_ended() {
        return refuse("finished", "this session has ended");
    }
    let limits = &protocol.session;
    match frame {
        ClientFrame::Hello { .. } => refuse("bad_frame", "hello is sent once, first"),
        ClientFrame::UserMessage { client_seq, text } => {
            if snapshot.is_new(client_seq) {
                if state == SessionState::Rating {
                    return refuse(
                        "rating_due",
                        "please rate the conversation so far before you continue",
                    );
                }
                if state != SessionState::Chatting {
                    return refuse("not_allowed", "the conversation has ended");
                }
                if snapshot.busy {
                    return refuse("busy", "wait for the reply, or press stop");
                }
                if text.trim().is_empty() {
                    return refuse("empty", "the message is empty");
                }
                if text.len() > limits.max_message_bytes {
                    return refuse(
                        "too_large",
                        format!("messages may be at most {} bytes", limits.max_message_bytes),
                    );
                }
            }
            Ok(Command::Message { client_seq, text })
        }
        ClientFrame::Stop { client_seq } => Ok(Command::Stop { client_seq }),
        ClientFrame::DocUpdate {
            client_seq,
            base_rev,
            content,
            inserted_message,
        } => {
            let max = limits.max_document_bytes;
            if snapshot.is_new(client_seq) && content.len() > max {
                return refuse(
                    "too_large",
                    format!("the document may be at most {max} bytes"),
                );
            }
            Ok(Command::Document {
                client_seq,
                base_rev,
                content,
                inserted_message,
            })
        }
        ClientFrame::Rating {
            client_seq,
            key,
            value,
        } => {
            let pending = snapshot.pending_ratings(protocol);
            if snapshot.is_new(client_seq) {
                let Some(spec) = pending.iter().find(|r| r.id == key) else {
                    return refuse("invalid_rating", format!("no rating {key:?} is due now"));
                };
                check_scale(spec, value)?;
            }
            Ok(Command::Rating {
                client_seq,
                key,
                value,
                completes: pending.len() <= 1,
            })
        }
        ClientFrame::Finish { client_seq } => {
            if snapshot.is_new(client_seq) {
                if snapshot.busy {
                    return refuse("busy", "wait for the reply to finish");
                }
                if state != SessionState::Chatting {
                    return refuse(
                        "not_allowed",
                        "finish is possible while chatting, after any rating",
                    );
                }
                if snapshot.turn < limits.min_turns as i32 {
                    return refuse(
                        "too_early",
                        format!(
                            "please continue for at least {} turns (now {})",
                            limits.min_turns, snapshot.turn
                        ),
                    );
                }
            }
            Ok(Command::Finish { client_seq })
        }
        ClientFrame::FinalAnswers {
            client_seq,
            ratings,
            answers,
        } => {
            if snapshot.is_new(client_seq) {
                if state != SessionState::Final {
                    return refuse(
                        "not_allowed",
                        "the final questions come after the conversation",
                    );
                }
                check_final(protocol, &ratings, &answers)?;
            }
            Ok(Command::FinalAnswers {
                client_seq,
                ratings,
                answers,
            })
        }
        ClientFrame::Regenerate { client_seq } => {
            if snapshot.is_new(client_seq) && (snapshot.busy || state != SessionState::Chatting) {
                return refuse(
                    "not_allowed",
                    "another reply can be asked for while chatting, after any rating",
                );
            }
            Ok(Command::Regenerate { client_seq })
        }
        ClientFrame::Choose { client_seq, choice } => {
            let chosen = match choice.as_str() {
                "a" => Some([true, false]),
                "b" => Some([false, true]),
                "tie" => Some([true, true]),
                "both_bad" => Some([false, false]),
                _ => None,
            };
            if snapshot.is_new(client_seq) {
                if state != SessionState::Choosing {
                    return refuse("not_allowed", "there are no replies to choose between");
                }
                if chosen.is_none() {
                    return refuse("bad_choice", "choose a, b, tie or both_bad");
                }
            }
            // A resend is acknowledged without being applied again, whatever it says.
            let chosen = chosen.unwrap_or([false, false]);
            Ok(Command::Choose {
                client_seq,
                chosen,
                // The conversation goes on with the reply picked (A on a tie or when both are bad).
                keep: usize::from(chosen == [false, true]),
            })
        }
        ClientFrame::Event {
            client_seq,
            kind,
            data,
        } => {
            let payload = data.to_string();
            if kind.is_empty()
                || kind.len() > MAX_EVENT_KIND_BYTES
                || payload.len() > MAX_EVENT_DATA_BYTES
            {
                return refuse(
                    "bad_event",
                    format!(
                        "events need a kind of 1–{MAX_EVENT_KIND_BYTES} bytes and data under \
                         {MAX_EVENT_DATA_BYTES} bytes"
                    ),
                );
            }
            Ok(Command::Event {
                client_seq,
                kind,
                payload,
            })
        }
    }
}

/// Periodic ratings due after `turn` that are not recorded yet.
pub(super) fn pending_ratings<'p>(
    protocol: &'p Protocol,
    turn: i32,
    recorded: &[String],
) -> Vec<&'p RatingSpec> {
    protocol
        .periodic_ratings_due(turn.max(0) as u32)
        .into_iter()
        .filter(|r| !recorded.contains(&r.id))
        .collect()
}

fn check_scale(spec: &RatingSpec, value: i32) -> Result<(), Refusal> {
    if value < spec.min || value > spec.max {
        return refuse(
            "invalid_rating",
            format!(
                "{:?} takes a value from {} to {}",
                spec.id, spec.min, spec.max
            ),
        );
    }
    Ok(())
}

fn check_final(
    protocol: &Protocol,
    ratings: &BTreeMap<String, i32>,
    answers: &BTreeMap<String, String>,
) -> Result<(), Refusal> {
    let finals = protocol.final_ratings();
    for spec in &finals {
        match ratings.get(&spec.id) {
            Some(v) => check_scale(spec, *v)?,
            None => return refuse("incomplete", format!("please answer: {}", spec.question)),
        }
    }
    if let Some(key) = ratings.keys().find(|k| !finals.iter().any(|r| &r.id == *k)) {
        return refuse(
            "invalid_rating",
            format!("there is no final rating {key:?}"),
        );
    }
    for q in &protocol.questionnaire {
        let answer = answers.get(&q.id).map(|a| a.trim()).unwrap_or("");
        if q.required && answer.is_empty() {
            return refuse("incomplete", format!("please answer: {}", q.prompt));
        }
        if answer.chars().count() > q.max_chars {
            return refuse(
                "too_large",
                format!(
                    "answers to {:?} may be at most {} characters",
                    q.id, q.max_chars
                ),
            );
        }
    }
    if let Some(key) = answers
        .keys()
        .find(|k| !protocol.questionnaire.iter().any(|q| &q.id == *k))
    {
        return refuse("invalid_answer", format!("there is no question {key:?}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::EXAMPLE_PROTOCOL;

    /// The example protocol: at least 8 turns, a periodic rating every 3, two final ratings and
    /// two required questions.
    fn protocol() -> Protocol {
        Protocol::from_stored(EXAMPLE_PROTOCOL).unwrap()
    }

    fn snapshot(state: SessionState, turn: i32) -> Snapshot {
        let at = chrono::NaiveDate::from_ymd_opt(2026, 1, 1)
            .unwrap()
            .and_hms_opt(0, 0, 0)
            .unwrap();
        Snapshot {
            session: Session {
                id: 1,
                public_id: "s".into(),
                participant_id: 1,
                study_version_id: 1,
                arm_id: Some(1),
                task_id: None,
                topic_id: None,
                token_hash: String::new(),
                state,
                outcome: None,
                completion_code: None,
                consent_sha256: None,
                consented_at: Some(at),
                started_at: at,
                first_message_at: None,
                finished_at: None,
                last_activity_at: at,
                last_client_seq: 10,
                resume_proof_hmac: None,
                handover_allowed: false,
                owner_epoch: 0,
                simulation_seed: None,
            },
            turn,
            recorded: Vec::new(),
            busy: false,
        }
    }

    fn code(result: Result<Command, Refusal>) -> &'static str {
        match result {
            Ok(_) => "ok",
            Err(Refusal::Frame(code, _)) => code,
            Err(Refusal::Study(e)) => panic!("a pure decision failed on storage: {e}"),
        }
    }

    fn message(client_seq: i64, text: &str) -> ClientFrame {
        ClientFrame::UserMessage {
            client_seq,
            text: text.into(),
        }
    }

    #[test]
    fn a_message_needs_a_chatting_idle_session_and_a_sized_text() {
        let p = protocol();
        let chatting = snapshot(SessionState::Chatting, 2);
        assert_eq!(code(decide(&chatting, &p, message(11, "hi"))), "ok");
        assert_eq!(code(decide(&chatting, &p, message(11, " \n"))), "empty");
        let long = "x".repeat(p.session.max_message_bytes + 1);
        assert_eq!(code(decide(&chatting, &p, message(11, &long))), "too_large");
        let busy = Snapshot {
            busy: true,
            ..chatting.clone()
        };
        assert_eq!(code(decide(&busy, &p, message(11, "hi"))), "busy");
        let rating = snapshot(SessionState::Rating, 3);
        assert_eq!(code(decide(&rating, &p, message(11, "hi"))), "rating_due");
        let ended = snapshot(SessionState::Finished, 8);
        assert_eq!(code(decide(&ended, &p, message(11, "hi"))), "finished");
    }

    /// A frame already applied is acknowledged again, not refused: the client resends what it
    /// has no acknowledgement for after a reconnect, whatever the session did meanwhile.
    #[test]
    fn a_resent_frame_is_let_through_unchecked() {
        let p = protocol();
        let rating = snapshot(SessionState::Rating, 3);
        assert_eq!(code(decide(&rating, &p, message(10, "hi"))), "ok");
        let final_ = snapshot(SessionState::Final, 8);
        let choose = ClientFrame::Choose {
            client_seq: 9,
            choice: "nonsense".into(),
        };
        assert_eq!(code(decide(&final_, &p, choose)), "ok");
    }

    #[test]
    fn ratings_must_be_due_and_on_their_scale() {
        let p = protocol();
        let due = snapshot(SessionState::Rating, 3);
        let rate = |key: &str, value| ClientFrame::Rating {
            client_seq: 11,
            key: key.into(),
            value,
        };
        assert_eq!(
            decide(&due, &p, rate("interaction", 7)).ok(),
            Some(Command::Rating {
                client_seq: 11,
                key: "interaction".into(),
                value: 7,
                completes: true,
            })
        );
        assert_eq!(
            code(decide(&due, &p, rate("interaction", 11))),
            "invalid_rating"
        );
        // Not due after turn 2, and a final rating is not a periodic one.
        let early = snapshot(SessionState::Rating, 2);
        assert_eq!(
            code(decide(&early, &p, rate("interaction", 7))),
            "invalid_rating"
        );
        assert_eq!(
            code(decide(&due, &p, rate("document_quality", 7))),
            "invalid_rating"
        );
        // Recorded already: no longer due.
        let recorded = Snapshot {
            recorded: vec!["interaction".into()],
            ..due
        };
        assert_eq!(
            code(decide(&recorded, &p, rate("interaction", 7))),
            "invalid_rating"
        );
    }

    #[test]
    fn finish_needs_the_minimum_of_turns_and_no_reply_in_flight() {
        let p = protocol();
        let finish = || ClientFrame::Finish { client_seq: 11 };
        let min = p.session.min_turns as i32;
        assert_eq!(
            code(decide(
                &snapshot(SessionState::Chatting, min - 1),
                &p,
                finish()
            )),
            "too_early"
        );
        assert_eq!(
            code(decide(&snapshot(SessionState::Chatting, min), &p, finish())),
            "ok"
        );
        let busy = Snapshot {
            busy: true,
            ..snapshot(SessionState::Chatting, min)
        };
        assert_eq!(code(decide(&busy, &p, finish())), "busy");
        assert_eq!(
            code(decide(&snapshot(SessionState::Rating, min), &p, finish())),
            "not_allowed"
        );
    }

    #[test]
    fn final_answers_must_answer_every_question_and_nothing_else() {
        let p = protocol();
        let final_ = snapshot(SessionState::Final, 8);
        let answers =
            |ratings: &[(&str, i32)], answers: &[(&str, &str)]| ClientFrame::FinalAnswers {
                client_seq: 11,
                ratings: ratings.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
                answers: answers
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            };
        let ratings = [("document_quality", 8), ("overall_interaction", 9)];
        let full = [("strengths", "asked"), ("weaknesses", "slow")];
        assert_eq!(code(decide(&final_, &p, answers(&ratings, &full))), "ok");
        assert_eq!(
            code(decide(&final_, &p, answers(&ratings[..1], &full))),
            "incomplete"
        );
        assert_eq!(
            code(decide(&final_, &p, answers(&ratings, &full[..1]))),
            "incomplete"
        );
        let blank = [("strengths", "  "), ("weaknesses", "slow")];
        assert_eq!(
            code(decide(&final_, &p, answers(&ratings, &blank))),
            "incomplete"
        );
        let extra = [("strengths", "a"), ("weaknesses", "b"), ("other", "c")];
        assert_eq!(
            code(decide(&final_, &p, answers(&ratings, &extra))),
            "invalid_answer"
        );
        let chatting = snapshot(SessionState::Chatting, 8);
        assert_eq!(
            code(decide(&chatting, &p, answers(&ratings, &full))),
            "not_allowed"
        );
    }

    #[test]
    fn a_choice_names_what_is_kept() {
        let p = protocol();
        let choosing = snapshot(SessionState::Choosing, 4);
        let choose = |choice: &str| {
            decide(
                &choosing,
                &p,
                ClientFrame::Choose {
                    client_seq: 11,
                    choice: choice.into(),
                },
            )
        };
        let kept = |choice| match choose(choice) {
            Ok(Command::Choose { chosen, keep, .. }) => (chosen, keep),
            _ => panic!("{choice} refused"),
        };
        assert_eq!(kept("a"), ([true, false], 0));
        assert_eq!(kept("b"), ([false, true], 1));
        assert_eq!(kept("tie"), ([true, true], 0));
        assert_eq!(kept("both_bad"), ([false, false], 0));
        assert_eq!(code(choose("c")), "bad_choice");
        let chatting = snapshot(SessionState::Chatting, 4);
        let frame = ClientFrame::Choose {
            client_seq: 11,
            choice: "a".into(),
        };
        assert_eq!(code(decide(&chatting, &p, frame)), "not_allowed");
    }

    #[test]
    fn events_are_bounded_even_when_resent() {
        let p = protocol();
        let chatting = snapshot(SessionState::Chatting, 1);
        let event = |kind: &str, data| ClientFrame::Event {
            client_seq: 1,
            kind: kind.into(),
            data,
        };
        assert_eq!(
            code(decide(&chatting, &p, event("blur", serde_json::json!({})))),
            "ok"
        );
        assert_eq!(
            code(decide(&chatting, &p, event("", serde_json::Value::Null))),
            "bad_event"
        );
        let big = serde_json::json!("x".repeat(MAX_EVENT_DATA_BYTES));
        assert_eq!(code(decide(&chatting, &p, event("blur", big))), "bad_event");
    }
}
