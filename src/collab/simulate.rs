//! `collabllm simulate`: simulated participants run a whole protocol through the same machinery
//! as people — assignment, the websocket session (as a real websocket client), turns, document
//! edits, inserted replies, regenerations, comparison picks, periodic and final ratings — with
//! the user simulator deciding what to write, what to do with each reply and how to rate. They
//! are stored flagged `simulated`, so a researcher can pilot a study (and its pairs export)
//! before paying anyone and filter them out of the analysis.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;

use super::simulator::{self, Question};
use super::{derive_seed, CollabError, Goal, Roles, Task};
use crate::db::vocab::{MessageRole, SessionState};
use crate::db::{self, DbPool};
use crate::engine::{ChatMessage, Engines};
use crate::protocol::Protocol;
use crate::study::client::{session_cookie, Connection};
use crate::study::frames::{ClientFrame, RatingView, ServerFrame, StateView};
use crate::study::Studio;

#[derive(Debug, Clone)]
pub struct SimulateOptions {
    pub study: String,
    /// Put every simulated participant in this arm instead of drawing one.
    pub arm: Option<String>,
    pub participants: usize,
    /// Participants in flight at once.
    pub concurrency: usize,
    pub seed: u64,
    pub models_dir: std::path::PathBuf,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SimulateSummary {
    /// Public ids of the sessions that were completed.
    pub completed: Vec<String>,
    /// Participants that failed, with why.
    pub failed: Vec<String>,
    /// Public ids of the sessions ended as abandoned: those of failed participants, and those in
    /// flight when the run was stopped.
    pub abandoned: Vec<String>,
    /// The run was stopped before every participant finished.
    pub stopped: bool,
}

/// What a run has done so far; reported after every turn and every participant.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tally {
    pub participants: u64,
    pub completed: u64,
    pub failed: u64,
    /// Turns (a simulated message and its reply) of every participant so far.
    pub turns: u64,
    /// Wall time of those turns, summed (the simulator's writing and the reply).
    pub turn_seconds: f64,
    pub regenerated: u64,
    pub inserted: u64,
}

impl Tally {
    /// Participants that completed or failed.
    pub fn done(&self) -> u64 {
        self.completed + self.failed
    }

    /// One line for a progress display: turns, time per turn, failures and actions.
    pub fn describe(&self) -> String {
        let mut line = format!("{} turns", self.turns);
        if self.turns > 0 {
            line += &format!(" ({:.1} s a turn)", self.turn_seconds / self.turns as f64);
        }
        if self.failed > 0 {
            line += &format!(", {} failed", self.failed);
        }
        line + &format!(
            ", {} regenerated, {} inserted",
            self.regenerated, self.inserted
        )
    }
}

/// What a simulated participant can do with a reply; the first is doing nothing.
const ACTIONS: [&str; 3] = ["keep", "insert", "regenerate"];

/// How long one server frame may take (a reply of a slow model included).
const FRAME_TIMEOUT: Duration = Duration::from_secs(300);

/// Runs `options.participants` simulated participants against the server at `ws_base`
/// (`ws://host:port`) that serves `studio`, until they are done or `stop` resolves. `progress`
/// hears the tally after every turn and every participant. Sessions left open — a failed
/// participant's, or one in flight when stopped — are ended as abandoned.
pub async fn run(
    studio: &Arc<Studio>,
    pool: &DbPool,
    engines: &Engines,
    ws_base: &str,
    options: &SimulateOptions,
    progress: &(dyn Fn(&Tally) + Sync),
    stop: impl std::future::Future<Output = ()>,
) -> Result<SimulateSummary, CollabError> {
    let slug = options.study.clone();
    let (protocol, source) = db::run_blocking::<_, CollabError, _>(pool, move |conn| {
        let study = db::studies::find_by_slug(conn, &slug)?
            .ok_or_else(|| CollabError::Invalid(format!("there is no study {slug:?}")))?;
        let version = db::studies::current_version(conn, study.id)?;
        let protocol = Protocol::from_stored(&version.protocol_text)
            .map_err(|e| CollabError::Invalid(e.to_string()))?;
        Ok((protocol, version.source_path))
    })
    .await?;
    if let Some(arm) = &options.arm {
        if protocol.arm(arm).is_none() {
            return Err(CollabError::Invalid(format!(
                "study {:?} has no arm {arm:?}; its arms are: {}",
                options.study,
                protocol
                    .arms
                    .iter()
                    .map(|a| a.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
    }
    let concurrency = options.concurrency.max(1);
    let roles = Roles::start(
        engines,
        &protocol,
        Path::new(&source),
        &options.models_dir,
        concurrency as u32,
    )?;
    let tally = Mutex::new(Tally {
        participants: options.participants as u64,
        ..Tally::default()
    });
    let entered = Mutex::new(Vec::new());
    // Participants enter in their order, whatever runs at once: the draws of arms and topics
    // then fall to the same participants on every run.
    let (next_to_enter, _) = tokio::sync::watch::channel(0usize);
    progress(&tally.lock().expect("tally lock"));
    let mut summary = SimulateSummary::default();
    let mut runs = futures_util::stream::iter(0..options.participants)
        .map(|i| {
            let participant = Participant {
                studio,
                roles: &roles,
                protocol: &protocol,
                ws_base,
                options,
                index: i,
                tally: &tally,
                progress,
                entered: &entered,
                next_to_enter: &next_to_enter,
            };
            async move { participant.run().await }
        })
        .buffer_unordered(concurrency);
    let work = async {
        while let Some(result) = runs.next().await {
            match result {
                Ok(session) => {
                    summary.completed.push(session);
                    tally.lock().expect("tally lock").completed += 1;
                }
                Err(e) if e.is_local() || matches!(e, CollabError::Invalid(_)) => {
                    tracing::warn!(error = %e, "a simulated participant failed");
                    summary.failed.push(e.to_string());
                    tally.lock().expect("tally lock").failed += 1;
                }
                Err(e) => return Err(e),
            }
            progress(&tally.lock().expect("tally lock"));
        }
        Ok(())
    };
    let outcome = tokio::select! {
        result = work => Some(result),
        () = stop => None,
    };
    // Participants still in flight are dropped here, their sockets closed.
    drop(runs);
    summary.stopped = outcome.is_none();
    let sessions = std::mem::take(&mut *entered.lock().expect("entered lock"));
    summary.abandoned = db::run_blocking::<_, CollabError, _>(pool, move |conn| {
        let mut abandoned = Vec::new();
        for (id, public_id) in sessions {
            if db::sessions::abandon(conn, id)? {
                abandoned.push(public_id);
            }
        }
        Ok(abandoned)
    })
    .await?;
    outcome.unwrap_or(Ok(())).map(|()| summary)
}

struct Participant<'a> {
    studio: &'a Arc<Studio>,
    roles: &'a Roles,
    protocol: &'a Protocol,
    ws_base: &'a str,
    options: &'a SimulateOptions,
    index: usize,
    tally: &'a Mutex<Tally>,
    progress: &'a (dyn Fn(&Tally) + Sync),
    /// Every session this run entered (id, public id), to end those left open.
    entered: &'a Mutex<Vec<(i64, String)>>,
    /// The index of the participant whose turn it is to enter.
    next_to_enter: &'a tokio::sync::watch::Sender<usize>,
}

/// One simulated participant's connection, and the session it is in for messages.
struct Client {
    connection: Connection,
    session: String,
}

impl Client {
    fn failed(&self, why: impl std::fmt::Display) -> CollabError {
        CollabError::Invalid(format!("simulated session {}: {why}", self.session))
    }

    /// The session's full state, as a reconnecting browser gets it.
    async fn state(&mut self) -> Result<StateView, CollabError> {
        self.connection.state().await.map_err(|e| self.failed(e))
    }

    /// The next client sequence number.
    fn seq(&mut self) -> i64 {
        self.connection.next_seq()
    }

    /// Sends a frame and reads until `done` says so; a refusal is an error.
    async fn request(
        &mut self,
        frame: ClientFrame,
        done: impl Fn(&ServerFrame) -> bool,
    ) -> Result<(), CollabError> {
        match self.connection.request(frame, done).await {
            Ok(_) => Ok(()),
            Err(e) => Err(self.failed(e)),
        }
    }

    /// Sends a frame and waits for its acknowledgement.
    async fn acked(&mut self, frame: ClientFrame) -> Result<(), CollabError> {
        let seq = frame.client_seq();
        self.request(
            frame,
            |f| matches!(f, ServerFrame::Ack { client_seq, .. } if Some(*client_seq) == seq),
        )
        .await
    }

    /// Waits for the reply that is streaming to end (or to turn into a comparison).
    async fn wait_for_reply(&mut self) -> Result<(), CollabError> {
        let settled = self.connection.until(reply_settled).await;
        let last = settled.map_err(|e| self.failed(e))?.0;
        self.try_again_if_failed(last).await
    }

    /// Sends a frame that asks for a reply (a message, a regeneration) and waits for the reply.
    async fn replied(&mut self, frame: ClientFrame) -> Result<(), CollabError> {
        let last = self.settled(frame).await?;
        self.try_again_if_failed(last).await
    }

    /// Sends a frame and returns the frame that settled the reply it asked for.
    async fn settled(&mut self, frame: ClientFrame) -> Result<ServerFrame, CollabError> {
        match self.connection.request(frame, reply_settled).await {
            Ok((last, _)) => Ok(last),
            Err(e) => Err(self.failed(e)),
        }
    }

    /// After a reply failed (or could not start), presses Try again as the page asks, up to
    /// twice; then the participant gives up.
    async fn try_again_if_failed(&mut self, mut last: ServerFrame) -> Result<(), CollabError> {
        for _ in 0..2 {
            if !is_assistant_failure(&last) {
                return Ok(());
            }
            tokio::time::sleep(TRY_AGAIN_AFTER).await;
            let seq = self.seq();
            last = self
                .settled(ClientFrame::Regenerate { client_seq: seq })
                .await?;
        }
        match last {
            ServerFrame::Error { message, .. } => Err(self.failed(format!(
                "the assistant failed three times in a row: {message}"
            ))),
            _ => Ok(()),
        }
    }
}

impl Participant<'_> {
    fn seed(&self, what: &str, step: usize) -> u32 {
        derive_seed(
            self.options.seed,
            &[&self.index.to_string(), what, &step.to_string()],
        )
    }

    /// Enters, chats until satisfied or the turn cap, rates and finishes; the session's public id.
    async fn run(&self) -> Result<String, CollabError> {
        let mut turn = self.next_to_enter.subscribe();
        // The earlier participants were started first, so the wait ends.
        let _ = turn.wait_for(|&next| next == self.index).await;
        let replies_seed = u64::from(self.seed("replies", 0));
        let entered = self
            .studio
            .enter_simulated(
                self.options.study.clone(),
                self.options.arm.clone(),
                replies_seed,
            )
            .await;
        self.next_to_enter.send_modify(|next| *next += 1);
        let (session, token) =
            entered.map_err(|e| CollabError::Invalid(format!("cannot enter the study: {e}")))?;
        self.entered
            .lock()
            .expect("entered lock")
            .push((session.id, session.public_id.clone()));
        let task_spec = session
            .task_id
            .as_deref()
            .and_then(|id| self.protocol.task(id));
        let topic = task_spec
            .zip(session.topic_id.as_deref())
            .and_then(|(t, id)| t.topic(id));
        let (Some(task_spec), Some(topic)) = (task_spec, topic) else {
            return Err(CollabError::Invalid(format!(
                "session {} has no task",
                session.public_id
            )));
        };
        let task = Task::of(task_spec, topic);
        let goal = Goal {
            intent: topic.hidden_intent.clone(),
            document: String::new(),
        };
        let url = format!("{}/s/{}/ws", self.ws_base, self.options.study);
        // As a browser does: the session is the cookie's.
        let connection = Connection::open(&url, Some(&session_cookie(&token)), FRAME_TIMEOUT)
            .await
            .map_err(|e| CollabError::Invalid(e.to_string()))?
            .retrying(&["rate_limited", "unavailable"], Duration::from_secs(5), 60);
        let mut client = Client {
            connection,
            session: session.public_id.clone(),
        };
        let rules = &self.protocol.session;
        let mut cap = self.roles.spec.max_turns.max(rules.min_turns);
        if rules.max_turns > 0 {
            cap = cap.min(rules.max_turns);
        }
        // Every step moves the session on; this bounds a session that would not.
        let most_steps = cap as usize * 6 + 20;
        let mut st = client.state().await?;
        // The last turn whose reply the participant has decided what to do with.
        let mut decided_turn = 0;
        for step in 0..most_steps {
            let at = Step {
                task: &task,
                goal: &goal,
                conversation: conversation_of(&st),
                st: &st,
                step,
            };
            match st.phase {
                SessionState::Finished => {
                    client.connection.close().await;
                    return Ok(session.public_id);
                }
                SessionState::Chatting if st.streaming.is_some() => {
                    client.wait_for_reply().await?;
                }
                SessionState::Chatting if st.turn > decided_turn => {
                    decided_turn = st.turn;
                    self.act_on_reply(&mut client, &at).await?;
                }
                SessionState::Chatting => self.chat(&mut client, &at, cap).await?,
                SessionState::Choosing => self.choose(&mut client, &at).await?,
                SessionState::Rating => {
                    for rating in &st.pending_ratings {
                        let value = self.rate(&at, rating).await?;
                        let seq = client.seq();
                        client
                            .acked(ClientFrame::Rating {
                                client_seq: seq,
                                key: rating.key.clone(),
                                value,
                            })
                            .await?;
                    }
                }
                SessionState::Final => self.answer_final(&mut client, &at).await?,
                SessionState::Consent
                | SessionState::Declined
                | SessionState::TimedOut
                | SessionState::Abandoned => {
                    return Err(client.failed(format!("the session is {}", st.phase)));
                }
            }
            drop(at);
            st = client.state().await?;
        }
        Err(client.failed(format!("not finished after {most_steps} steps")))
    }

    /// A turn of the chat: the simulator writes its next message (saving its draft first), or
    /// ends the chat once it is satisfied or the turn cap is reached.
    async fn chat(&self, client: &mut Client, at: &Step<'_>, cap: u32) -> Result<(), CollabError> {
        let st = at.st;
        let started = Instant::now();
        let message = if st.turn as u32 >= cap {
            None
        } else {
            Some(
                simulator::next_message(
                    self.roles,
                    at.task,
                    at.goal,
                    &at.conversation,
                    simulator::Draft::Keep,
                    self.seed("message", at.step),
                )
                .await?,
            )
        };
        match message {
            Some(m) if !(m.terminates && st.can_finish) => {
                let draft = truncate(&m.current_answer, st.max_document_bytes);
                if !draft.trim().is_empty() && draft != st.document.content {
                    let seq = client.seq();
                    client
                        .acked(ClientFrame::DocUpdate {
                            client_seq: seq,
                            base_rev: st.document.rev,
                            content: draft,
                            inserted_message: None,
                        })
                        .await?;
                }
                let seq = client.seq();
                let text = truncate(&sendable(&m.response), st.max_message_bytes);
                client
                    .replied(ClientFrame::UserMessage {
                        client_seq: seq,
                        text,
                    })
                    .await?;
                self.count(|t| {
                    t.turns += 1;
                    t.turn_seconds += started.elapsed().as_secs_f64();
                });
                Ok(())
            }
            _ if st.can_finish => {
                let seq = client.seq();
                client.acked(ClientFrame::Finish { client_seq: seq }).await
            }
            _ => Err(client.failed(format!(
                "the turn cap ({cap}) is reached but the session cannot finish"
            ))),
        }
    }

    /// A comparison turn: the simulator picks between the two candidate replies.
    async fn choose(&self, client: &mut Client, at: &Step<'_>) -> Result<(), CollabError> {
        let Some(comparison) = &at.st.comparison else {
            return Err(client.failed("choosing without candidates"));
        };
        let question = Question::Choice {
            question: format!(
                "Which reply do you prefer?\n\nReply A:\n{}\n\nReply B:\n{}\n\n(tie: both are good; both_bad: neither is)",
                comparison.candidates.first().map_or("", |c| c.as_str()),
                comparison.candidates.get(1).map_or("", |c| c.as_str()),
            ),
            choices: ["a", "b", "tie", "both_bad"].map(String::from).to_vec(),
        };
        let choice = self.ask(at, &question, "choice").await?;
        let seq = client.seq();
        client
            .acked(ClientFrame::Choose {
                client_seq: seq,
                choice: choice.as_str().unwrap_or("tie").to_string(),
            })
            .await
    }

    /// The end of the session: the final ratings and the questionnaire's answers.
    async fn answer_final(&self, client: &mut Client, at: &Step<'_>) -> Result<(), CollabError> {
        let st = at.st;
        let mut ratings = BTreeMap::new();
        for rating in &st.final_ratings {
            ratings.insert(rating.key.clone(), self.rate(at, rating).await?);
        }
        let mut answers = BTreeMap::new();
        for (i, q) in st.questionnaire.iter().enumerate() {
            let question = Question::Text {
                question: q.prompt.clone(),
                max_chars: q.max_chars.min(600) as u32,
            };
            let answer = self.ask(at, &question, &format!("question-{i}")).await?;
            let text = answer.as_str().unwrap_or_default().trim().to_string();
            let text = if text.is_empty() && q.required {
                "no comment".to_string()
            } else {
                text
            };
            answers.insert(q.key.clone(), text);
        }
        let seq = client.seq();
        client
            .request(
                ClientFrame::FinalAnswers {
                    client_seq: seq,
                    ratings,
                    answers,
                },
                |f| matches!(f, ServerFrame::Completed(_)),
            )
            .await
    }

    /// The simulated user's answer to `question` at this step, seeded by `what` it is.
    async fn ask(
        &self,
        at: &Step<'_>,
        question: &Question,
        what: &str,
    ) -> Result<serde_json::Value, CollabError> {
        simulator::answer(
            self.roles,
            at.task,
            at.goal,
            &at.conversation,
            &at.st.document.content,
            question,
            self.seed(what, at.step),
        )
        .await
    }

    /// Adds to the run's tally and reports it.
    fn count(&self, add: impl FnOnce(&mut Tally)) {
        let mut tally = self.tally.lock().expect("tally lock");
        add(&mut tally);
        (self.progress)(&tally);
    }

    /// What a participant does with a new reply, as the simulator decides: goes on, inserts it
    /// into the document (to edit it later), or asks for another reply and then picks one of the
    /// two — so a pilot exercises every signal the pairs export reads.
    async fn act_on_reply(&self, client: &mut Client, at: &Step<'_>) -> Result<(), CollabError> {
        let st = at.st;
        let Some(reply) = st
            .messages
            .last()
            .filter(|m| m.role == MessageRole::Assistant)
        else {
            return Ok(());
        };
        let question = Question::Choice {
            question: "What do you do with the assistant's latest reply? keep: go on with the \
                       conversation; insert: put the reply into your document as it is, to edit \
                       it later; regenerate: ask for a different reply instead of this one."
                .into(),
            choices: ACTIONS.map(String::from).to_vec(),
        };
        let action = self.ask(at, &question, "action").await?;
        match action.as_str() {
            Some("insert") => {
                let document = &st.document.content;
                let separator = if document.is_empty() || document.ends_with('\n') {
                    ""
                } else {
                    "\n\n"
                };
                let content = truncate(
                    &format!("{document}{separator}{}", reply.content),
                    st.max_document_bytes,
                );
                let seq = client.seq();
                client
                    .acked(ClientFrame::DocUpdate {
                        client_seq: seq,
                        base_rev: st.document.rev,
                        content,
                        inserted_message: Some(reply.seq),
                    })
                    .await?;
                self.count(|t| t.inserted += 1);
            }
            Some("regenerate") => {
                let seq = client.seq();
                client
                    .replied(ClientFrame::Regenerate { client_seq: seq })
                    .await?;
                self.count(|t| t.regenerated += 1);
            }
            _ => {}
        }
        Ok(())
    }

    /// The simulated user's rating on `rating`'s scale (its lowest if the answer is not one).
    async fn rate(&self, at: &Step<'_>, rating: &RatingView) -> Result<i32, CollabError> {
        let question = Question::Scale {
            question: rating.question.clone(),
            min: rating.min,
            max: rating.max,
            min_label: rating.min_label.clone(),
            max_label: rating.max_label.clone(),
        };
        let value = self
            .ask(at, &question, &format!("rating-{}", rating.key))
            .await?;
        Ok(value
            .as_i64()
            .and_then(|v| i32::try_from(v).ok())
            .unwrap_or(rating.min))
    }
}

/// Where a simulated participant is: the task, its hidden goal, and the session as the last
/// `state` showed it, at this step of the run (steps seed the simulator).
struct Step<'a> {
    task: &'a Task,
    goal: &'a Goal,
    conversation: Vec<ChatMessage>,
    st: &'a StateView,
    step: usize,
}

/// Whether a frame ends the reply the participant waits for: it is done, it is a pick between
/// candidates, or it failed.
fn reply_settled(frame: &ServerFrame) -> bool {
    matches!(
        frame,
        ServerFrame::AssistantDone { .. } | ServerFrame::Comparison(_)
    ) || is_assistant_failure(frame)
}

/// How long a simulated participant waits before pressing Try again.
const TRY_AGAIN_AFTER: std::time::Duration = std::time::Duration::from_millis(500);

/// The reply failed, or the assistant could not start it: nothing of it is kept.
fn is_assistant_failure(frame: &ServerFrame) -> bool {
    matches!(
        frame,
        ServerFrame::Error { code, .. } if code == "assistant_failed" || code == "assistant_unavailable"
    )
}

/// The chat of a state, as the simulator sees it.
fn conversation_of(st: &StateView) -> Vec<ChatMessage> {
    st.messages
        .iter()
        .map(|m| crate::study::chat_message(m.role, &m.content))
        .collect()
}

/// What a simulated participant sends: its response, or a short nudge when it only wanted to end
/// the chat before the protocol allows it.
fn sendable(response: &str) -> String {
    if response.trim().is_empty() {
        "ok, anything else?".into()
    } else {
        response.to_string()
    }
}

/// `text` cut to at most `max_bytes` bytes on a character boundary.
fn truncate(text: &str, max_bytes: usize) -> String {
    let mut end = text.len().min(max_bytes);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}
