//! `bench load`: simulated participants over the participant's own protocol — the study link,
//! consent, then on the websocket document saves, messages, ratings, finish and the final
//! answers — all at once, against a server whose model answers at once (so the platform, not
//! inference, is measured) or a server given by URL. A frame's server overhead is the time until
//! its acknowledgement (no frame waits for the model before it is acknowledged); a reply's time
//! is from the message to `assistant_done`. Afterwards every session is checked in the database:
//! each frame stored exactly once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

use crate::db::vocab::{MessageRole, SessionState};
use crate::db::{self, DbConn, DbResult};
use crate::engine::{
    ChatRequest, Completion, Engine, EngineError, EngineStatus, FinishReason, Generation,
};
use crate::study::client::{Browser, ClientError, Connection};
use crate::study::frames::{ClientFrame, ServerFrame};

/// Longest wait for any one answer of the server.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a participant waits to send a frame again that the server could not store, and how
/// often (a minute in all: a database that is back by then loses nothing).
const UNAVAILABLE_PAUSE: Duration = Duration::from_millis(250);
const UNAVAILABLE_ATTEMPTS: u32 = 240;

/// A model that answers every request at once with the same few sentences, streamed a word at
/// a time.
pub struct InstantEngine;

/// What [`InstantEngine`] answers.
const REPLY: &str = "Here is a first draft. Tell me who it is for and what tone you want, and I \
                     will make it fit.";

impl Engine for InstantEngine {
    fn start(&self, request: ChatRequest) -> Result<Generation, EngineError> {
        let (generation, events, _) = Generation::channel();
        for word in REPLY.split_inclusive(' ') {
            let _ = events.send(crate::engine::EngineEvent::Token(word.to_string()));
        }
        let _ = events.send(crate::engine::EngineEvent::Done(Completion {
            text: REPLY.to_string(),
            finish_reason: FinishReason::Stop,
            prompt_tokens: 0,
            prompt_tokens_processed: 0,
            generated_tokens: REPLY.split(' ').count() as u32,
            ttft_ms: 0,
            total_ms: 0,
            seed: request.sampling.seed.unwrap_or(0),
            logprobs: Vec::new(),
        }));
        Ok(generation)
    }

    fn status(&self) -> EngineStatus {
        EngineStatus {
            model: "instant".into(),
            backend: "instant",
            running: true,
            ..EngineStatus::default()
        }
    }

    fn fingerprint(&self) -> String {
        "instant".into()
    }
}

#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub participants: usize,
    /// Messages each participant sends (at least the study's minimum, so it can finish).
    pub turns: usize,
    pub study: String,
    /// The server, e.g. `http://127.0.0.1:8080`.
    pub base: String,
    /// A participant's mean pause before each frame (reading, typing); each pause is drawn
    /// between half and one and a half times it, so participants drift apart as people do
    /// instead of moving in lockstep.
    pub pause: Duration,
    /// How long to keep the load up: each participant who finishes is followed by a new one in
    /// their place until then. None: each participant goes through once.
    pub duration: Option<Duration>,
}

/// What one simulated participant did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sent {
    pub messages: usize,
    pub doc_updates: usize,
    /// Periodic and final ratings.
    pub ratings: usize,
    pub answers: usize,
    pub completed: bool,
}

#[derive(Debug, Default)]
pub struct LoadReport {
    pub participants: usize,
    pub errors: Vec<String>,
    /// Milliseconds from a frame to its acknowledgement.
    pub ack_ms: Vec<f64>,
    /// Milliseconds from a message to the reply's end.
    pub reply_ms: Vec<f64>,
    pub sent: Vec<Sent>,
    /// Pages loaded and frames sent again after the server answered 503 or `unavailable` (it
    /// could not store what they carried).
    pub retried: u64,
    pub elapsed: Duration,
}

/// Runs every participant at once (and, for a duration, their successors); `progress` hears
/// (participants finished, all) or, for a duration, (seconds gone, all).
pub async fn run(options: &LoadOptions, progress: &(dyn Fn(u64, u64) + Sync)) -> LoadReport {
    let started = Instant::now();
    let slots = options.participants;
    let done = std::sync::atomic::AtomicU64::new(0);
    let tell = |finished: u64| match options.duration {
        Some(d) => progress(started.elapsed().min(d).as_secs(), d.as_secs()),
        None => progress(finished, slots as u64),
    };
    tell(0);
    let runs = (0..slots).map(|slot| {
        let (done, tell) = (&done, &tell);
        async move {
            let mut runs = Vec::new();
            // Participant numbers are distinct across slots and successors (their external ids).
            for i in (slot..).step_by(slots.max(1)) {
                let mut timings = Timings::default();
                let outcome = participant(options, i, &mut timings).await;
                runs.push((outcome, timings));
                tell(done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1);
                if options.duration.is_none_or(|d| started.elapsed() >= d) {
                    break;
                }
            }
            runs
        }
    });
    let mut report = LoadReport {
        participants: slots,
        ..LoadReport::default()
    };
    for (outcome, timings) in futures_util::future::join_all(runs)
        .await
        .into_iter()
        .flatten()
    {
        report.ack_ms.extend(timings.ack_ms);
        report.reply_ms.extend(timings.reply_ms);
        report.retried += timings.retried;
        match outcome {
            Ok(sent) => report.sent.push(sent),
            Err(e) => report.errors.push(e),
        }
    }
    report.elapsed = started.elapsed();
    report
}

#[derive(Default)]
struct Timings {
    ack_ms: Vec<f64>,
    reply_ms: Vec<f64>,
    /// Pages loaded and frames sent again after the server could not store what they carried.
    retried: u64,
}

/// A participant's connection with the pauses of a person between frames.
struct Client {
    connection: Connection,
    who: String,
    pause: Duration,
    /// Draws the pauses (seeded by the participant's number: runs repeat).
    rng: rand::rngs::StdRng,
}

impl Client {
    fn failed(&self, e: ClientError) -> String {
        format!("{}: {e}", self.who)
    }

    /// Frames until one `matches`, which is returned with those before it. A load without
    /// mistakes gets no error frame at all: one is this participant's failure.
    async fn until(
        &mut self,
        matches: impl Fn(&ServerFrame) -> bool,
    ) -> Result<(ServerFrame, Vec<ServerFrame>), String> {
        let (frame, before) = self
            .connection
            .until(|f| matches!(f, ServerFrame::Error { .. }) || matches(f))
            .await
            .map_err(|e| self.failed(e))?;
        self.no_error(std::slice::from_ref(&frame))?;
        Ok((frame, before))
    }

    fn no_error(&self, frames: &[ServerFrame]) -> Result<(), String> {
        match frames
            .iter()
            .find(|f| matches!(f, ServerFrame::Error { .. }))
        {
            Some(ServerFrame::Error { code, message, .. }) => {
                Err(format!("{}: error {code}: {message}", self.who))
            }
            _ => Ok(()),
        }
    }

    /// After the participant's pause, sends a frame numbered next and waits for its
    /// acknowledgement; returns the revision a document save made, the frames that came before
    /// the acknowledgement, and when the frame was sent.
    async fn acked(
        &mut self,
        frame: impl FnOnce(i64) -> ClientFrame,
        timings: &mut Timings,
    ) -> Result<(Option<i32>, Vec<ServerFrame>, Instant), String> {
        let pause = self.pause.mul_f64(self.rng.random_range(0.5..1.5));
        tokio::time::sleep(pause).await;
        let sent = Instant::now();
        let (rev, before) = self
            .connection
            .acked(frame)
            .await
            .map_err(|e| self.failed(e))?;
        timings.ack_ms.push(sent.elapsed().as_secs_f64() * 1000.0);
        self.no_error(&before)?;
        Ok((rev, before, sent))
    }
}

/// One participant from the study link to the completion code.
async fn participant(
    options: &LoadOptions,
    i: usize,
    timings: &mut Timings,
) -> Result<Sent, String> {
    let who = format!("participant {i}");
    let study = &options.study;
    let mut browser = Browser::new(&options.base);
    let query = format!("PROLIFIC_PID=load-{i}&SESSION_ID=load-{i}");
    // A page the server could not make (503: the database is away) is loaded again, as the
    // participant would after its "try again".
    let mut attempts = 0;
    loop {
        match browser.join(study, &query).await {
            Ok(()) => break,
            Err(ClientError::Status { status: 503, .. }) if attempts < UNAVAILABLE_ATTEMPTS => {
                attempts += 1;
                timings.retried += 1;
                tokio::time::sleep(UNAVAILABLE_PAUSE).await;
            }
            Err(e) => return Err(format!("{who}: {e}")),
        }
    }
    // As the page does: a frame the database could not store is sent again.
    let mut connection = browser
        .connect(study, ANSWER_TIMEOUT)
        .await
        .map_err(|e| format!("{who}: {e}"))?
        .retrying(&["unavailable"], UNAVAILABLE_PAUSE, UNAVAILABLE_ATTEMPTS);
    let state = connection
        .state()
        .await
        .map_err(|e| format!("{who}: {e}"))?;
    connection.seq = state.last_client_seq;
    let mut client = Client {
        connection,
        who,
        pause: options.pause,
        rng: rand::rngs::StdRng::seed_from_u64(i as u64),
    };
    let turns = options.turns.max(state.min_turns as usize);
    let mut sent = Sent::default();
    let mut rev = state.document.rev;
    let mut phase = state.phase;
    for turn in 1..=turns {
        if phase != SessionState::Chatting {
            break;
        }
        let (saved, _, _) = client
            .acked(
                |seq| ClientFrame::DocUpdate {
                    client_seq: seq,
                    base_rev: rev,
                    content: format!("Draft {turn}: a note of thanks."),
                    inserted_message: None,
                },
                timings,
            )
            .await?;
        rev = saved.unwrap_or(rev);
        sent.doc_updates += 1;
        let (_, mut before, asked) = client
            .acked(
                |seq| ClientFrame::UserMessage {
                    client_seq: seq,
                    text: format!("Message {turn}: make it warmer."),
                },
                timings,
            )
            .await?;
        sent.messages += 1;
        let done = if let Some(i) = before
            .iter()
            .position(|f| matches!(f, ServerFrame::AssistantDone { .. }))
        {
            before.remove(i)
        } else {
            let (done, more) = client
                .until(|f| matches!(f, ServerFrame::AssistantDone { .. }))
                .await?;
            before.extend(more);
            done
        };
        timings
            .reply_ms
            .push(asked.elapsed().as_secs_f64() * 1000.0);
        let ServerFrame::AssistantDone { phase: next, .. } = done else {
            unreachable!("matched assistant_done")
        };
        phase = next;
        if phase == SessionState::Rating {
            let due: Vec<String> = before
                .iter()
                .filter_map(|f| match f {
                    ServerFrame::RatingRequest { ratings, .. } => Some(ratings),
                    _ => None,
                })
                .flatten()
                .map(|r| r.key.clone())
                .collect();
            for key in due {
                client
                    .acked(
                        |seq| ClientFrame::Rating {
                            client_seq: seq,
                            key,
                            value: 7,
                        },
                        timings,
                    )
                    .await?;
                sent.ratings += 1;
            }
            phase = SessionState::Chatting;
        }
    }
    if phase == SessionState::Chatting {
        client
            .acked(|seq| ClientFrame::Finish { client_seq: seq }, timings)
            .await?;
    }
    let ratings: std::collections::BTreeMap<String, i32> = state
        .final_ratings
        .iter()
        .map(|r| (r.key.clone(), (r.min + r.max) / 2))
        .collect();
    let answers: std::collections::BTreeMap<String, String> = state
        .questionnaire
        .iter()
        .map(|q| (q.key.clone(), "It asked what I meant.".to_string()))
        .collect();
    sent.ratings += ratings.len();
    sent.answers = answers.len();
    let (_, before, _) = client
        .acked(
            |seq| ClientFrame::FinalAnswers {
                client_seq: seq,
                ratings,
                answers,
            },
            timings,
        )
        .await?;
    if !before
        .iter()
        .any(|f| matches!(f, ServerFrame::Completed(_)))
    {
        client
            .until(|f| matches!(f, ServerFrame::Completed(_)))
            .await?;
    }
    sent.completed = true;
    timings.retried += client.connection.retried;
    client.connection.close().await;
    Ok(sent)
}

/// Whether the database holds exactly what the participants sent: per session, one user message
/// and one reply per message sent, one revision per document save, every rating and answer, the
/// session completed. Returns the mismatches.
pub fn check_stored(conn: &mut DbConn, study: &str, sent: &[Sent]) -> DbResult<Vec<String>> {
    let study_row = db::studies::find_by_slug(conn, study)?
        .ok_or_else(|| db::DbError::Invalid(format!("there is no study {study:?}")))?;
    let mut sessions = Vec::new();
    for version in db::studies::versions(conn, study_row.id)? {
        sessions.extend(db::sessions::list_for_version(conn, version.id)?);
    }
    let mut stored = Vec::new();
    let mut problems = Vec::new();
    for s in &sessions {
        let messages = db::messages::list_for_session(conn, s.id)?;
        let users = messages
            .iter()
            .filter(|m| m.role == MessageRole::User)
            .count();
        let replies = messages.len() - users;
        if users != replies {
            problems.push(format!(
                "session {}: {users} messages but {replies} replies",
                s.public_id
            ));
        }
        stored.push(Sent {
            messages: users,
            doc_updates: db::revisions::list_for_session(conn, s.id)?.len(),
            ratings: db::ratings::list_for_session(conn, s.id)?.len(),
            answers: db::answers::list_for_session(conn, s.id)?.len(),
            completed: s.state == SessionState::Finished,
        });
    }
    // Sessions cannot be matched to participants by id (the platform keeps no external id), so
    // the two sides are compared as multisets.
    let key = |s: &Sent| (s.messages, s.doc_updates, s.ratings, s.answers, s.completed);
    let mut wanted: Vec<_> = sent.iter().map(key).collect();
    let mut found: Vec<_> = stored.iter().map(key).collect();
    wanted.sort_unstable();
    found.sort_unstable();
    if wanted != found {
        problems.push(format!(
            "the {} sessions stored differ from what {} participants sent (messages, saves, \
             ratings, answers, completed): stored {found:?}, sent {wanted:?}",
            stored.len(),
            sent.len()
        ));
    }
    Ok(problems)
}

/// The engines of a load test: every model id of the protocol answered by [`InstantEngine`].
pub fn instant_engines(protocol: &crate::protocol::Protocol) -> crate::engine::Engines {
    let engines = crate::engine::Engines::new();
    let engine: Arc<dyn Engine> = Arc::new(InstantEngine);
    for arm in &protocol.arms {
        let name = crate::engine::registry::engine_name(&arm.model, arm.lora.first());
        engines.insert(&name, engine.clone());
    }
    engines
}
