//! `collabllm bench engine` and `bench mr`: throughput and latency of the engine against a naive baseline
//! measured in the same run (one request at a time, the whole prompt recomputed every turn), so
//! the printed ratios do not depend on the machine.

use std::time::Instant;

use futures_util::future::join_all;
use indicatif::ProgressBar;
use serde::Serialize;

use std::path::Path;

use crate::collab::reward::{rollouts, Candidate, RolloutKey, Scene};
use crate::collab::{start_policy, CollabError, Goal, Roles, Task};
use crate::engine::{
    ChatMessage, ChatRequest, Completion, Engine, EngineError, Engines, Role, Sampling,
};
use crate::protocol::LoadedProtocol;

#[derive(Debug, Clone)]
pub struct EngineBenchOptions {
    /// Tokens generated per request (end-of-generation ignored).
    pub tokens: u32,
    pub concurrency: Vec<usize>,
    /// Turns of the conversation whose time to first token is measured.
    pub turns: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    pub name: String,
    pub engine: f64,
    pub baseline: f64,
    pub unit: &'static str,
}

impl Figure {
    pub fn ratio(&self) -> f64 {
        if self.baseline > 0.0 {
            self.engine / self.baseline
        } else {
            0.0
        }
    }
}

/// Runs every measurement on `engine` and on `baseline`; `progress` ticks once per measurement.
pub async fn engine_bench(
    engine: &dyn Engine,
    baseline: &dyn Engine,
    options: &EngineBenchOptions,
    progress: &ProgressBar,
) -> Result<Vec<Figure>, EngineError> {
    let mut figures = Vec::new();
    let single = |e| decode_rate(e, options.tokens);
    figures.push(Figure {
        name: "single-stream decode".into(),
        engine: single(engine).await?,
        baseline: single(baseline).await?,
        unit: "tok/s",
    });
    progress.inc(1);
    for &n in &options.concurrency {
        figures.push(Figure {
            name: format!("aggregate, {n} concurrent chats"),
            engine: aggregate(engine, n, options.tokens, true).await?,
            baseline: aggregate(baseline, n, options.tokens, false).await?,
            unit: "tok/s",
        });
        progress.inc(1);
    }
    let (engine_first, engine_last) = ttft(engine, options).await?;
    let (base_first, base_last) = ttft(baseline, options).await?;
    progress.inc(1);
    figures.push(Figure {
        name: "time to first token, turn 1".into(),
        engine: engine_first,
        baseline: base_first,
        unit: "ms",
    });
    figures.push(Figure {
        name: format!("time to first token, turn {}", options.turns),
        engine: engine_last,
        baseline: base_last,
        unit: "ms",
    });
    Ok(figures)
}

/// Number of measurements `engine_bench` makes (for the progress bar).
pub fn steps(options: &EngineBenchOptions) -> u64 {
    2 + options.concurrency.len() as u64
}

/// A chat request; `fixed_length` generates exactly `tokens` (end-of-generation ignored).
fn request(topic: usize, history: &[ChatMessage], tokens: u32, fixed_length: bool) -> ChatRequest {
    // Each conversation has its own system prompt, so no request finds another's prefix cached.
    let mut messages = vec![ChatMessage::new(
        Role::System,
        format!("Session {topic}. You are a helpful writing assistant. Answer in full sentences."),
    )];
    messages.extend_from_slice(history);
    if history.is_empty() {
        messages.push(ChatMessage::new(
            Role::User,
            format!(
                "Write a paragraph about topic number {topic}: the history of bridges and ships."
            ),
        ));
    }
    let mut r = ChatRequest::new(
        messages,
        Sampling {
            temperature: 0.7,
            seed: Some(topic as u32),
            max_tokens: tokens,
            ..Sampling::default()
        },
    );
    r.ignore_eos = fixed_length;
    r
}

async fn complete(engine: &dyn Engine, r: ChatRequest) -> Result<Completion, EngineError> {
    engine.start(r)?.finish().await
}

/// Decode speed of one request alone: generated tokens over the time after the first token.
async fn decode_rate(engine: &dyn Engine, tokens: u32) -> Result<f64, EngineError> {
    let mut rates = Vec::new();
    for topic in 0..3 {
        let c = complete(engine, request(1000 + topic, &[], tokens, true)).await?;
        let decode_ms = c.total_ms.saturating_sub(c.ttft_ms).max(1);
        rates.push(f64::from(c.generated_tokens.saturating_sub(1)) * 1000.0 / decode_ms as f64);
    }
    Ok(median(rates))
}

/// Generated tokens per second over `n` chats, together or one after another (median of 3).
async fn aggregate(
    engine: &dyn Engine,
    n: usize,
    tokens: u32,
    together: bool,
) -> Result<f64, EngineError> {
    let mut rates = Vec::new();
    for round in 0..3 {
        let first = 100 * (round + 1);
        rates.push(aggregate_once(engine, first..first + n, tokens, together).await?);
    }
    Ok(median(rates))
}

async fn aggregate_once(
    engine: &dyn Engine,
    topics: std::ops::Range<usize>,
    tokens: u32,
    together: bool,
) -> Result<f64, EngineError> {
    let started = Instant::now();
    let completions: Vec<Completion> = if together {
        join_all(topics.map(|i| complete(engine, request(i, &[], tokens, true))))
            .await
            .into_iter()
            .collect::<Result<_, _>>()?
    } else {
        let mut all = Vec::new();
        for i in topics {
            all.push(complete(engine, request(i, &[], tokens, true)).await?);
        }
        all
    };
    let generated: u32 = completions.iter().map(|c| c.generated_tokens).sum();
    Ok(f64::from(generated) / started.elapsed().as_secs_f64())
}

/// Median time to first token at turn 1 and at the last turn of a few conversations.
async fn ttft(
    engine: &dyn Engine,
    options: &EngineBenchOptions,
) -> Result<(f64, f64), EngineError> {
    let mut first = Vec::new();
    let mut last = Vec::new();
    for conversation in 10..13 {
        let mut history = Vec::new();
        for turn in 1..=options.turns {
            history.push(ChatMessage::new(
                Role::User,
                format!(
                    "Turn {turn}: please continue the story and add one detail about turn {turn}."
                ),
            ));
            // Replies end as in a real chat, so the next turn's prompt matches what was cached.
            let mut r = request(conversation, &history, options.tokens, false);
            r.conversation = Some(format!("bench-{conversation}"));
            let c = complete(engine, r).await?;
            if turn == 1 {
                first.push(c.ttft_ms as f64);
            }
            if turn == options.turns {
                last.push(c.ttft_ms as f64);
            }
            history.push(ChatMessage::new(Role::Assistant, c.text));
        }
    }
    Ok((median(first), median(last)))
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

/// Peak resident memory of this process in MiB (Linux), if known.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Fills a database with a study of `sessions` finished sessions of `messages` messages each
/// (with a document revision and ratings), for the export benchmark.
pub fn seed_study(
    url: &str,
    sessions: usize,
    messages: usize,
    progress: &ProgressBar,
) -> Result<(), crate::db::DbError> {
    use crate::config::{EXAMPLE_PROTOCOL, EXAMPLE_PROTOCOL_PATH};
    use crate::db::vocab::{MessageRole, Outcome, RevisionAuthor, SessionState};
    use crate::db::{self, models::NewMessage, models::NewSession};
    use crate::protocol::{sha256_hex, LoadedProtocol, Protocol};

    let mut conn = db::connect(url)?;
    db::migrate(&mut conn)?;
    let protocol =
        Protocol::from_stored(EXAMPLE_PROTOCOL).map_err(|e| db::DbError::Invalid(e.to_string()))?;
    let loaded = LoadedProtocol {
        protocol,
        text: EXAMPLE_PROTOCOL.to_string(),
        sha256: sha256_hex(EXAMPLE_PROTOCOL.as_bytes()),
        source: EXAMPLE_PROTOCOL_PATH.into(),
    };
    let imported = db::studies::import(&mut conn, &loaded)?;
    let arms = db::studies::arms_of(&mut conn, imported.version.id)?;
    let text =
        "A sentence of a typical chat message, about as long as the ones in the study. ".repeat(4);
    for i in 0..sessions {
        db::write_transaction(&mut conn, |conn| {
            let external = format!("bench-{i}");
            let (participant, _) =
                db::participants::find_or_create(conn, imported.study.id, Some(&external), false)?;
            let now = db::now();
            let public_id = uuid::Uuid::new_v4().to_string();
            let session = db::sessions::create(
                conn,
                &NewSession {
                    public_id: &public_id,
                    participant_id: participant.id,
                    study_version_id: imported.version.id,
                    arm_id: Some(arms[i % arms.len()].id),
                    task_id: Some("blog-post"),
                    topic_id: Some("remote-work"),
                    token_hash: &public_id,
                    state: SessionState::Finished,
                    resume_proof_hmac: None,
                    started_at: now,
                    last_activity_at: now,
                },
            )?;
            for m in 0..messages {
                let role = if m % 2 == 0 {
                    MessageRole::User
                } else {
                    MessageRole::Assistant
                };
                db::messages::append(
                    conn,
                    session.id,
                    &NewMessage {
                        role,
                        content: &text,
                        ..Default::default()
                    },
                )?;
            }
            db::revisions::append(conn, session.id, RevisionAuthor::User, None, &text)?;
            db::ratings::record(conn, session.id, 3, "interaction", 7)?;
            db::sessions::finish(conn, session.id, Outcome::Completed, "CODE")?;
            Ok::<_, db::DbError>(())
        })?;
        progress.inc(1);
    }
    Ok(())
}

/// Runs `command` and returns its peak resident memory in MiB (Linux), polling `/proc`.
pub fn peak_rss_of(mut command: std::process::Command) -> std::io::Result<(bool, f64)> {
    let mut child = command.spawn()?;
    let status_path = format!("/proc/{}/status", child.id());
    let mut peak_kib = 0.0f64;
    loop {
        if let Ok(status) = std::fs::read_to_string(&status_path) {
            if let Some(kib) = status
                .lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
            {
                peak_kib = peak_kib.max(kib);
            }
        }
        if let Some(status) = child.try_wait()? {
            return Ok((status.success(), peak_kib / 1024.0));
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// `collabllm bench mr`: one turn's multiturn-aware rewards (K candidates × S rollouts × w turn
/// pairs) with every rollout in flight at once, against the same rollouts (same seeds, so the
/// same work) run one after another. Each mode runs on engines of its own, so neither starts with
/// the other's cache.
pub async fn mr_bench(
    loaded: &LoadedProtocol,
    models_dir: &Path,
    candidates: u32,
    samples: u32,
    window: u32,
) -> Result<String, CollabError> {
    let p = &loaded.protocol;
    let slots = candidates * samples;
    let arm = p
        .arms
        .first()
        .ok_or_else(|| CollabError::Invalid("the protocol has no arms".into()))?;
    let (task_spec, topic) = p
        .tasks
        .first()
        .and_then(|t| t.topics.first().map(|topic| (t, topic)))
        .ok_or_else(|| CollabError::Invalid("the protocol has no task with a topic".into()))?;
    let task = Task::of(task_spec, topic);
    let goal = Goal {
        intent: topic.hidden_intent.clone(),
        document: String::new(),
    };
    let context = vec![ChatMessage::new(
        Role::User,
        format!("hi, can you help me with a {}? {}", task.kind, task.title),
    )];
    let keys: Vec<RolloutKey> = (0..candidates as usize)
        .flat_map(|candidate| {
            (0..samples as usize).map(move |sample| RolloutKey {
                base_seed: 7,
                context: "bench".into(),
                candidate,
                sample,
            })
        })
        .collect();
    let mut timings = Vec::new();
    for batched in [true, false] {
        let engines = Engines::new();
        let roles = Roles::start(&engines, p, &loaded.source, models_dir, slots)?;
        let policy = start_policy(&engines, p, arm, models_dir, slots)?;
        let mut replies = Vec::new();
        for k in 0..candidates {
            let mut sampling = arm.sampling.clone();
            sampling.seed = Some(1000 + k);
            let c = policy
                .engine
                .start(crate::collab::request(policy.messages(&context), sampling))
                .map_err(|e| CollabError::Engine("policy".into(), e))?
                .finish()
                .await
                .map_err(|e| CollabError::Engine("policy".into(), e))?;
            replies.push(Candidate {
                text: c.text,
                tokens: c.generated_tokens,
            });
        }
        let scene = Scene {
            roles: &roles,
            policy: &policy,
            task: &task,
            goal: &goal,
            context: &context,
        };
        let started = Instant::now();
        let groups: Vec<&[RolloutKey]> = if batched {
            vec![&keys]
        } else {
            keys.chunks(1).collect()
        };
        for group in groups {
            for r in rollouts(&scene, &replies, group, window).await {
                r?;
            }
        }
        let statuses = engines.statuses();
        let generated: u64 = statuses.iter().map(|s| s.generated_tokens).sum();
        let prompt: u64 = statuses.iter().map(|s| s.prompt_tokens_processed).sum();
        timings.push((started.elapsed().as_secs_f64(), generated, prompt));
    }
    let ((batched, gen_b, prompt_b), (sequential, gen_s, prompt_s)) = (timings[0], timings[1]);
    let n = keys.len() as f64;
    Ok(format!(
        "one turn's MRs: {candidates} candidates x {samples} rollouts x {window} turn pairs = {} rollouts ({} threads)\n\
         {:<12} {:>8.1} s {:>8.1} rollouts/min {:>8} tokens generated {:>8} prompt tokens\n\
         {:<12} {:>8.1} s {:>8.1} rollouts/min {:>8} tokens generated {:>8} prompt tokens\n\
         batched vs one after another: {:.2}x faster, {:.2}x the generated tokens per second (target >= 1.6x)",
        keys.len(),
        crate::engine::llama::thread_count(),
        "batched",
        batched,
        n * 60.0 / batched,
        gen_b,
        prompt_b,
        "sequential",
        sequential,
        n * 60.0 / sequential,
        gen_s,
        prompt_s,
        sequential / batched,
        (gen_b as f64 / batched) / (gen_s as f64 / sequential).max(f64::MIN_POSITIVE)
    ))
}
