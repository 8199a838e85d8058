//! `collabllm pairs`: multiturn-aware preference pairs from the recorded sessions of a study. For
//! every assistant turn, the reply actually given and K−1 fresh candidates of the same policy are
//! rolled forward and scored; the candidate with the highest MR becomes `chosen`, the lowest
//! `rejected`, when the gap reaches the margin. The output is TRL's conversational DPO format
//! (`prompt` with the system prompt first, `chosen`, `rejected`) with the scores, the metric means
//! and the provenance of every row.
//!
//! Candidates, rollouts and rewards are stored as they are made, under the sha256 of the settings
//! that produced them, so a run that is interrupted resumes where it stopped and the console shows
//! MR per turn.

use crate::db::vocab::{CandidateSource, MessageRole};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::reward::{self, Candidate, Metrics, MrOverrides, MrSettings, Reward, RolloutKey, Scene};
use super::{start_policy, CollabError, Goal, JsonlWriter, Policy, Roles, Task};
use crate::db::models::{Message, NewCandidate, NewReward, NewRollout, Session, StudyVersion};
use crate::db::provenance::{Provenance, Usage};
use crate::db::{self, DbConn, DbPool};
use crate::engine::{ChatMessage, Engines, Role};
use crate::protocol::{sha256_hex, Protocol};

/// Which sessions to score.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionKind {
    Human,
    Simulated,
    All,
}

impl SessionKind {
    pub fn admits(self, simulated: bool) -> bool {
        match self {
            SessionKind::Human => !simulated,
            SessionKind::Simulated => simulated,
            SessionKind::All => true,
        }
    }
}

/// Settings of a run; the ones left empty come from the protocol's `[collab]` section.
#[derive(Debug, Clone)]
pub struct PairsOptions {
    pub study: String,
    pub sessions: SessionKind,
    /// Reward settings that replace each protocol version's own.
    pub mr: MrOverrides,
    /// Base of every seed of the run.
    pub seed: u64,
    pub models_dir: PathBuf,
    /// A model of the protocol that judges instead of its `[collab]` judge, to compare judges on
    /// the same sessions (their rollouts and rewards are stored apart, by configuration).
    pub judge_model: Option<String>,
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PairsSummary {
    /// Assistant turns of the chosen sessions.
    pub turns: u64,
    /// Turns with a reward for every candidate.
    pub scored: u64,
    /// Turns left out (no user message before the reply, or a rollout that failed).
    pub skipped: u64,
    /// Why each skipped turn was left out ("session/turn: why").
    pub skip_reasons: Vec<String>,
    pub pairs: u64,
    pub rollouts_run: u64,
    pub rollouts_reused: u64,
    /// Fresh candidates left out because they still repeated another reply after resampling.
    pub identical_candidates: u64,
    /// Turns whose gap reached the margin (the paper's rule), and of those the ones whose gap is
    /// at least 2 standard errors of itself: how many pairs are clear of the reward's noise.
    pub over_margin: u64,
    pub clear_of_noise: u64,
    /// Turns over the margin left out by the noise-aware rule (`min_gap_se`).
    pub below_noise: u64,
}

/// A session with what scoring it needs.
struct SessionWork {
    session: Session,
    pseudonym: String,
    simulated: bool,
    arm: String,
    messages: Vec<Message>,
    task: Task,
    goal: Goal,
}

/// Everything of one study version that a run shares between its sessions.
struct VersionWork {
    row: StudyVersion,
    protocol: Protocol,
    roles: Roles,
    policies: HashMap<String, Policy>,
}

/// Scores every assistant turn of the chosen sessions of a study and writes the pairs to `out`.
/// `progress` hears (turns done, turns in all).
pub async fn run(
    pool: &DbPool,
    engines: &Engines,
    options: &PairsOptions,
    out: &Path,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<PairsSummary, CollabError> {
    let slug = options.study.clone();
    let kind = options.sessions;
    let (versions, sessions) =
        db::run_blocking::<_, CollabError, _>(pool, move |conn| load(conn, &slug, kind)).await?;
    let mut summary = PairsSummary {
        turns: sessions
            .iter()
            .map(|s| {
                s.messages
                    .iter()
                    .filter(|m| m.role == MessageRole::Assistant)
                    .count() as u64
            })
            .sum(),
        ..Default::default()
    };
    let mut work: HashMap<i64, VersionWork> = HashMap::new();
    let mut file = JsonlWriter::create(out)?;
    let mut done = 0;
    progress(done, summary.turns);
    for s in &sessions {
        let version_id = s.session.study_version_id;
        if let std::collections::hash_map::Entry::Vacant(entry) = work.entry(version_id) {
            let (row, mut protocol) = versions[&version_id].clone();
            if let Some(judge) = &options.judge_model {
                if protocol.model(judge).is_none() {
                    return Err(CollabError::Invalid(format!(
                        "--judge-model {judge:?} is not a [[models]] id of study {:?} version {}",
                        options.study, row.version
                    )));
                }
                protocol.collab.judge_model = Some(judge.clone());
            }
            let roles = Roles::start(
                engines,
                &protocol,
                Path::new(&row.source_path),
                &options.models_dir,
                settings(&protocol, options)?.rollouts_per_turn(),
            )?;
            entry.insert(VersionWork {
                row,
                protocol,
                roles,
                policies: HashMap::new(),
            });
        }
        let version = work.get_mut(&version_id).expect("inserted above");
        let settings = settings(&version.protocol, options)?;
        if !version.policies.contains_key(&s.arm) {
            let arm = version.protocol.arm(&s.arm).ok_or_else(|| {
                CollabError::Invalid(format!("the protocol has no arm {:?}", s.arm))
            })?;
            let policy = start_policy(
                engines,
                &version.protocol,
                arm,
                &options.models_dir,
                settings.rollouts_per_turn(),
            )?;
            version.policies.insert(s.arm.clone(), policy);
        }
        let version = &work[&version_id];
        let policy = &version.policies[&s.arm];
        let config = config_sha256(&settings, &version.roles, policy);
        let mut any_turn = false;
        for (index, message) in s.messages.iter().enumerate() {
            if message.role != MessageRole::Assistant {
                continue;
            }
            any_turn = true;
            let turn = Turn {
                study: &options.study,
                session: s,
                version,
                policy,
                settings: &settings,
                config: &config,
                message,
                number: s.messages[..index]
                    .iter()
                    .filter(|m| m.role == MessageRole::Assistant)
                    .count()
                    + 1,
            };
            match score_turn(pool, &turn, &mut summary).await {
                Ok(Some(row)) => {
                    file.write(&row)?;
                    summary.pairs += 1;
                    summary.scored += 1;
                }
                Ok(None) => summary.scored += 1,
                Err(TurnError::Skip(why)) => {
                    tracing::warn!(session = %s.session.public_id, turn = turn.number, "turn skipped: {why}");
                    summary.skipped += 1;
                    summary
                        .skip_reasons
                        .push(format!("{}/{}: {why}", s.session.public_id, turn.number));
                }
                Err(TurnError::Fatal(e)) => return Err(e),
            }
            done += 1;
            progress(done, summary.turns);
        }
        if !any_turn {
            tracing::info!(session = %s.session.public_id, "session has no assistant turns; skipped");
        }
    }
    file.finish()?;
    Ok(summary)
}

/// The study's versions (with their protocols) and the chosen sessions, with what scoring needs.
#[allow(clippy::type_complexity)]
fn load(
    conn: &mut DbConn,
    slug: &str,
    kind: SessionKind,
) -> Result<(HashMap<i64, (StudyVersion, Protocol)>, Vec<SessionWork>), CollabError> {
    let study = db::studies::find_by_slug(conn, slug)?
        .ok_or_else(|| CollabError::Invalid(format!("there is no study {slug:?}")))?;
    let mut versions = HashMap::new();
    let mut sessions = Vec::new();
    for row in db::studies::versions(conn, study.id)? {
        let protocol = Protocol::from_stored(&row.protocol_text)
            .map_err(|e| CollabError::Invalid(e.to_string()))?;
        let arms: HashMap<i64, String> = db::studies::arms_of(conn, row.id)?
            .into_iter()
            .map(|a| (a.id, a.name))
            .collect();
        for session in db::sessions::list_for_version(conn, row.id)? {
            let participant = db::participants::get(conn, session.participant_id)?;
            if !kind.admits(participant.simulated) {
                continue;
            }
            let Some(arm) = session.arm_id.and_then(|a| arms.get(&a)).cloned() else {
                continue;
            };
            let task = session.task_id.as_deref().and_then(|id| protocol.task(id));
            let Some((task, topic)) = task
                .zip(session.topic_id.as_deref())
                .and_then(|(t, id)| Some((t, t.topic(id)?)))
            else {
                continue;
            };
            let messages = db::messages::list_for_session(conn, session.id)?;
            // People are scored against what they ended up writing; simulated participants
            // against the intent they were given.
            let document = if participant.simulated {
                String::new()
            } else {
                db::revisions::latest(conn, session.id)?
                    .map(|r| r.content)
                    .unwrap_or_default()
            };
            sessions.push(SessionWork {
                pseudonym: participant.pseudonym,
                simulated: participant.simulated,
                arm,
                messages,
                task: Task::of(task, topic),
                goal: Goal {
                    intent: topic.hidden_intent.clone(),
                    document,
                },
                session,
            });
        }
        versions.insert(row.id, (row, protocol));
    }
    Ok((versions, sessions))
}

/// The settings of a run for one protocol.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
struct Settings {
    #[serde(flatten)]
    mr: MrSettings,
    seed: u64,
}

impl Settings {
    fn rollouts_per_turn(&self) -> u32 {
        self.mr.candidates * self.mr.samples
    }
}

fn settings(protocol: &Protocol, options: &PairsOptions) -> Result<Settings, CollabError> {
    let mr = options
        .mr
        .resolve(&protocol.collab)
        .map_err(|e| CollabError::Invalid(format!("study {}: {e}", protocol.study.slug)))?;
    Ok(Settings {
        mr,
        seed: options.seed,
    })
}

/// sha256 of everything that shapes a rollout: settings, weights, prompts, models and policies.
/// The margin and the noise rule only filter pairs and are left out.
fn config_sha256(settings: &Settings, roles: &Roles, policy: &Policy) -> String {
    let mut config = super::rollout_identity(roles, policy);
    config["candidates"] = json!(settings.mr.candidates);
    config["samples"] = json!(settings.mr.samples);
    config["window"] = json!(settings.mr.window);
    config["seed"] = json!(settings.seed);
    // Rollouts scored before BLEU needed a goal document are not reused.
    config["scoring"] = json!("bleu-needs-goal-document");
    // Only when set, so the runs stored before the option existed stay reusable.
    if roles.spec.proactive_share > 0.0 {
        config["proactive_share"] = json!(roles.spec.proactive_share);
    }
    sha256_hex(config.to_string().as_bytes())
}

struct Turn<'a> {
    study: &'a str,
    session: &'a SessionWork,
    version: &'a VersionWork,
    policy: &'a Policy,
    settings: &'a Settings,
    config: &'a str,
    /// The assistant message whose context is scored.
    message: &'a Message,
    /// 1 for the first assistant reply of the session.
    number: usize,
}

impl Turn<'_> {
    /// The conversation the reply answered, which must end with the participant's message.
    fn context(&self) -> Result<Vec<ChatMessage>, TurnError> {
        let context: Vec<ChatMessage> = self
            .session
            .messages
            .iter()
            .filter(|m| m.seq < self.message.seq)
            .map(|m| crate::study::chat_message(m.role, &m.content))
            .collect();
        if context.last().is_none_or(|m| m.role != Role::User) {
            return Err(TurnError::Skip(
                "the reply does not follow a user message".into(),
            ));
        }
        Ok(context)
    }

    /// Names the turn in its seeds: the session and the reply's seq. A simulated participant's
    /// session is named by its seed, so the same pilot run again is scored the same.
    fn label(&self) -> String {
        let session = &self.session.session;
        match session.simulation_seed {
            Some(seed) => format!("simulated {seed}/{}", self.message.seq),
            None => format!("{}/{}", session.public_id, self.message.seq),
        }
    }
}

enum TurnError {
    /// This turn cannot be scored; the run goes on.
    Skip(String),
    Fatal(CollabError),
}

impl From<CollabError> for TurnError {
    fn from(e: CollabError) -> Self {
        if e.is_local() {
            TurnError::Skip(e.to_string())
        } else {
            TurnError::Fatal(e)
        }
    }
}

/// Standard errors a pair's gap is reported against in every run's summary, whatever rule
/// keeps the pairs: a gap of two is clear of the reward's own noise.
const NOISE_REPORT_SE: f64 = 2.0;

/// A number as JSON, or null where it is not finite (JSON has no infinity).
fn finite_or_null(x: f64) -> Value {
    if x.is_finite() {
        json!(x)
    } else {
        Value::Null
    }
}

/// A candidate of a turn: its text, its stored row (none for the reply given) and its seed.
struct Scored {
    candidate: Candidate,
    id: Option<i64>,
    seed: Option<u32>,
}

/// Candidates, rollouts and rewards of one turn; the pair row when there is one.
///
/// The stages: the context the reply answered, the candidates, their rollouts (those stored by
/// an earlier run reused, the rest run now and stored), the rewards stored, and the pick.
async fn score_turn(
    pool: &DbPool,
    turn: &Turn<'_>,
    summary: &mut PairsSummary,
) -> Result<Option<Value>, TurnError> {
    let context = turn.context()?;
    let candidates = candidates(pool, turn, &context, &mut summary.identical_candidates).await?;
    if candidates.len() < 2 {
        return Err(TurnError::Skip(format!(
            "every fresh candidate repeated the reply given, after {} resampling rounds",
            crate::engine::CANDIDATE_RESAMPLE_ROUNDS
        )));
    }
    let mut results = stored_rollouts(pool, turn, &candidates, summary).await?;
    run_rollouts(pool, turn, &context, &candidates, &mut results, summary).await?;
    let rewards: Vec<Reward> = results
        .iter()
        .map(|samples| Reward::of(&samples.iter().flatten().cloned().collect::<Vec<_>>()))
        .collect();
    store_rewards(pool, turn, &candidates, &rewards).await?;

    let Some(picked) = reward::pick_with_noise(&rewards, turn.settings.mr.margin) else {
        return Ok(None);
    };
    summary.over_margin += 1;
    if picked.clears(NOISE_REPORT_SE) {
        summary.clear_of_noise += 1;
    }
    if !picked.clears(turn.settings.mr.min_gap_se) {
        summary.below_noise += 1;
        return Ok(None);
    }
    Ok(Some(pair_row(
        turn,
        &context,
        &candidates,
        &rewards,
        &picked,
    )))
}

/// Each candidate's rollouts by sample: score and metrics, `None` where none is stored yet.
type Rollouts = Vec<Vec<Option<(f64, Metrics)>>>;

/// The rollouts an earlier run stored for this turn under its configuration.
async fn stored_rollouts(
    pool: &DbPool,
    turn: &Turn<'_>,
    candidates: &[Scored],
    summary: &mut PairsSummary,
) -> Result<Rollouts, TurnError> {
    let (session_id, seq, config) = (
        turn.session.session.id,
        turn.message.seq,
        turn.config.to_string(),
    );
    let stored = db::run_blocking::<_, CollabError, _>(pool, move |conn| {
        Ok(db::rollouts::list_for_turn(conn, session_id, seq, &config)?)
    })
    .await?;
    let mut results: Rollouts =
        vec![vec![None; turn.settings.mr.samples as usize]; candidates.len()];
    for r in &stored {
        let Some(c) = candidates.iter().position(|c| c.id == r.candidate_id) else {
            continue;
        };
        let (Ok(sample), Ok(metrics)) = (
            usize::try_from(r.sample),
            serde_json::from_str::<Metrics>(&r.metrics_json),
        ) else {
            continue;
        };
        if let Some(slot) = results[c].get_mut(sample) {
            *slot = Some((r.score, metrics));
            summary.rollouts_reused += 1;
        }
    }
    Ok(results)
}

/// Runs the rollouts `results` lacks, all at once, and stores those that finished before
/// looking at what failed, so the next run only redoes the rest.
async fn run_rollouts(
    pool: &DbPool,
    turn: &Turn<'_>,
    context: &[ChatMessage],
    candidates: &[Scored],
    results: &mut Rollouts,
    summary: &mut PairsSummary,
) -> Result<(), TurnError> {
    let label = turn.label();
    let todo: Vec<RolloutKey> = results
        .iter()
        .enumerate()
        .flat_map(|(c, samples)| {
            samples
                .iter()
                .enumerate()
                .filter(|(_, r)| r.is_none())
                .map(move |(sample, _)| (c, sample))
        })
        .map(|(candidate, sample)| RolloutKey {
            base_seed: turn.settings.seed,
            context: label.clone(),
            candidate,
            sample,
        })
        .collect();
    let s = turn.session;
    let scene = Scene {
        roles: &turn.version.roles,
        policy: turn.policy,
        task: &s.task,
        goal: &s.goal,
        context,
        keep_document: false,
    };
    let plain: Vec<Candidate> = candidates.iter().map(|c| c.candidate.clone()).collect();
    let ran = reward::rollouts(&scene, &plain, &todo, turn.settings.mr.window).await;
    let finished: Vec<(Option<i64>, i32, u32, String, String, f64)> = todo
        .iter()
        .zip(&ran)
        .filter_map(|(key, r)| {
            let r = r.as_ref().ok()?;
            let conversation = json!({"continuation": r.continuation, "document": r.document});
            Some((
                candidates[key.candidate].id,
                key.sample as i32,
                key.rollout_seed(),
                conversation.to_string(),
                serde_json::to_string(&r.metrics).expect("metrics serialise"),
                r.score,
            ))
        })
        .collect();
    let (session_id, seq, config) = (s.session.id, turn.message.seq, turn.config.to_string());
    db::run_blocking::<_, CollabError, _>(pool, move |conn| {
        db::write_transaction(conn, |conn| {
            for (candidate_id, sample, seed, conversation, metrics, score) in &finished {
                db::rollouts::insert(
                    conn,
                    &NewRollout {
                        session_id,
                        turn: seq,
                        candidate_id: *candidate_id,
                        sample: *sample,
                        config_sha256: &config,
                        seed: i64::from(*seed),
                        conversation_json: conversation,
                        metrics_json: metrics,
                        score: *score,
                        created_at: db::now(),
                    },
                )?;
            }
            Ok::<_, CollabError>(())
        })
    })
    .await?;
    let mut failure = None;
    for (key, result) in todo.iter().zip(ran) {
        match result {
            Ok(r) => {
                results[key.candidate][key.sample] = Some((r.score, r.metrics));
                summary.rollouts_run += 1;
            }
            Err(e) if e.is_local() => failure = Some(e),
            Err(e) => return Err(TurnError::Fatal(e)),
        }
    }
    match failure {
        Some(e) => Err(TurnError::Skip(format!(
            "a rollout failed ({e}); the finished ones are stored and the next run retries the rest"
        ))),
        None => Ok(()),
    }
}

/// Stores each candidate's reward (replacing what an earlier run stored for the turn).
async fn store_rewards(
    pool: &DbPool,
    turn: &Turn<'_>,
    candidates: &[Scored],
    rewards: &[Reward],
) -> Result<(), TurnError> {
    let rows: Vec<(Option<i64>, Reward)> = candidates
        .iter()
        .zip(rewards)
        .map(|(c, r)| (c.id, r.clone()))
        .collect();
    let (session_id, seq) = (turn.session.session.id, turn.message.seq);
    let (settings, config) = (turn.settings.clone(), turn.config.to_string());
    db::run_blocking::<_, CollabError, _>(pool, move |conn| {
        let components: Vec<String> = rows
            .iter()
            .map(|(_, r)| {
                json!({
                    "means": r.means,
                    "rollouts": r.rollouts,
                    "samples": settings.mr.samples,
                    "window": settings.mr.window,
                })
                .to_string()
            })
            .collect();
        let new: Vec<NewReward> = rows
            .iter()
            .zip(&components)
            .map(|((candidate_id, r), components)| NewReward {
                session_id,
                turn: seq,
                candidate_id: *candidate_id,
                mr: r.mr,
                mr_std: r.std,
                components_json: components,
                created_at: db::now(),
                config_sha256: &config,
            })
            .collect();
        db::rewards::replace_turn(conn, session_id, seq, &config, &new)?;
        Ok(())
    })
    .await?;
    Ok(())
}

/// The reply given plus K−1 fresh candidates of the same policy: those an earlier run stored
/// under this configuration, and new ones for the rest, generated at once.
async fn candidates(
    pool: &DbPool,
    turn: &Turn<'_>,
    context: &[ChatMessage],
    identical: &mut u64,
) -> Result<Vec<Scored>, TurnError> {
    let s = turn.session;
    let (session_id, after_seq) = (s.session.id, turn.message.seq - 1);
    let config = turn.config.to_string();
    let stored = db::run_blocking::<_, CollabError, _>(pool, move |conn| {
        Ok(db::candidates::list_for_session(conn, session_id)?
            .into_iter()
            .filter(|c| c.source == CandidateSource::Mr && c.after_seq == after_seq)
            .filter_map(|c| {
                let policy = Provenance::parse(&c.policy_json)?;
                (policy.config_sha256.as_deref() == Some(config.as_str())).then_some((c, policy))
            })
            .collect::<Vec<_>>())
    })
    .await?;
    let mut out = vec![Scored {
        candidate: Candidate {
            text: turn.message.content.clone(),
            tokens: turn
                .message
                .gen_tokens
                .and_then(|t| u32::try_from(t).ok())
                .unwrap_or_else(|| super::estimated_tokens(&turn.message.content)),
        },
        id: None,
        seed: turn
            .message
            .policy_json
            .as_deref()
            .and_then(Provenance::parse)
            .and_then(|p| p.sampling.seed),
    }];
    let wanted = turn.settings.mr.candidates as usize - 1;
    // A stored candidate repeats no reply (they are checked before they are stored); one of an
    // older run might, and is passed over.
    for (c, policy) in stored {
        if out.len() > wanted {
            break;
        }
        if out
            .iter()
            .any(|o| crate::engine::same_reply(&o.candidate.text, &c.content))
        {
            continue;
        }
        out.push(Scored {
            candidate: Candidate {
                text: c.content,
                tokens: policy
                    .gen_tokens()
                    .map_or(0, |t| u32::try_from(t).unwrap_or(u32::MAX)),
            },
            id: Some(c.id),
            seed: policy.sampling.seed,
        });
    }
    let missing: Vec<usize> = (out.len()..=wanted).collect();
    let label = turn.label();
    let taken: Vec<String> = out.iter().map(|o| o.candidate.text.clone()).collect();
    let all_fresh: Vec<usize> = (1..=wanted).collect();
    let proactive = super::Proactive::of(&turn.version.roles, &all_fresh)?;
    let fresh = super::fresh_candidates(
        turn.policy,
        context,
        &missing,
        &taken,
        &proactive,
        |k, round| super::candidate_seed(turn.settings.seed, &label, k, round),
    )
    .await?;
    *identical += (missing.len() - fresh.len()) as u64;
    for super::Fresh {
        sampling,
        completion,
        proactive,
        ..
    } in fresh
    {
        let policy = Provenance {
            arm: turn.policy.arm.id.clone(),
            fingerprint: turn.policy.engine.fingerprint(),
            sampling,
            usage: Some(Usage {
                gen_tokens: Some(u64::from(completion.generated_tokens)),
                finish_reason: Some(completion.finish_reason.as_str().to_string()),
                ..Usage::default()
            }),
            proactive: Some(proactive),
            config_sha256: Some(turn.config.to_string()),
            ..Provenance::default()
        };
        let text = completion.text.clone();
        let stored = db::run_blocking::<_, CollabError, _>(pool, move |conn| {
            Ok(db::candidates::insert(
                conn,
                &NewCandidate {
                    session_id,
                    after_seq,
                    source: CandidateSource::Mr,
                    content: &text,
                    chosen: None,
                    policy_json: &policy.to_json(),
                    created_at: db::now(),
                },
            )?)
        })
        .await?;
        out.push(Scored {
            candidate: Candidate {
                text: completion.text,
                tokens: completion.generated_tokens,
            },
            id: Some(stored.id),
            seed: Some(completion.seed),
        });
    }
    Ok(out)
}

fn pair_row(
    turn: &Turn<'_>,
    context: &[ChatMessage],
    candidates: &[Scored],
    rewards: &[Reward],
    picked: &reward::Picked,
) -> Value {
    let (chosen, rejected) = (picked.chosen, picked.rejected);
    let s = turn.session;
    let roles = &turn.version.roles;
    let metrics = |i: usize| {
        let mut m = serde_json::to_value(&rewards[i].means).expect("metrics serialise");
        m["mr_std"] = json!(rewards[i].std);
        m["rollouts"] = json!(rewards[i].rollouts);
        m["scores"] = json!(rewards[i].scores);
        m
    };
    let assistant =
        |i: usize| json!([{"role": "assistant", "content": candidates[i].candidate.text}]);
    json!({
        "prompt": turn.policy.messages(context),
        "chosen": assistant(chosen),
        "rejected": assistant(rejected),
        "score_chosen": rewards[chosen].mr,
        "score_rejected": rewards[rejected].mr,
        "metrics_chosen": metrics(chosen),
        "metrics_rejected": metrics(rejected),
        "metadata": {
            "source": "mr",
            "study": turn.study,
            "study_version": turn.version.row.version,
            "protocol_sha256": turn.version.row.protocol_sha256,
            "arm": s.arm,
            "session": s.session.public_id,
            "participant": s.pseudonym,
            "simulated": s.simulated,
            "turn": turn.number,
            "chosen_is_given": candidates[chosen].id.is_none(),
            "rejected_is_given": candidates[rejected].id.is_none(),
            "candidates": candidates.len(),
            "samples": turn.settings.mr.samples,
            "window": turn.settings.mr.window,
            "margin": turn.settings.mr.margin,
            "min_gap_se": turn.settings.mr.min_gap_se,
            "gap_se": finite_or_null(picked.gap_se),
            "seed": turn.settings.seed,
            "seed_chosen": candidates[chosen].seed,
            "seed_rejected": candidates[rejected].seed,
            "policy_model_sha256": turn.policy.engine.fingerprint(),
            "simulator_model_sha256": roles.simulator.fingerprint(),
            "judge_model_sha256": roles.judge.fingerprint(),
            "prompts_sha256": roles.prompts.sha256(),
            "weights": roles.spec.weights,
            "bleu_reference": if s.goal.reference().is_some() {
                "goal document"
            } else {
                "none: no goal document, BLEU left out of the score"
            },
            "config_sha256": turn.config,
        },
    })
}
