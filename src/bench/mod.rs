//! `collabllm bench engine` and `bench mr`: throughput and latency of the engine against a naive baseline
//! measured in the same run (one request at a time, the whole prompt recomputed every turn), so
//! the printed ratios do not depend on the machine. `bench load` ([`load`]) measures the platform
//! under many participants; [`api`] what an OpenAI client gets from `/v1`.

pub mod api;
pub mod load;

use std::time::Instant;

use futures_util::future::join_all;
use indicatif::ProgressBar;
use serde::Serialize;

use std::path::Path;

use crate::collab::reward::{rollouts, Candidate, RolloutKey, Scene};
use crate::collab::{start_policy, CollabError, Goal, Roles, Task};
use crate::engine::{
    ChatMessage, ChatRequest, Completion, Engine, EngineError, EngineEvent, Engines, Role, Sampling,
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

/// The study's own workload: participants chatting at once, several turns each, pausing between
/// a reply and their next message as people do; and one conversation alone, turn after turn.
#[derive(Debug, Clone)]
pub struct StudyWorkload {
    pub participants: usize,
    pub turns: usize,
    /// Tokens of every reply (end-of-generation ignored, so every engine does the same work).
    pub tokens: u32,
    /// Tokens of every reply of the conversation alone.
    pub alone_tokens: u32,
    /// Seconds between a reply and the participant's next message, drawn uniformly.
    pub think_seconds: (f64, f64),
    /// The engine's time slice (the reference has none): tokens a reply streams before a
    /// participant waiting for a first token may pause it.
    pub time_slice_tokens: u32,
}

/// What the study workload measured on one engine.
#[derive(Debug, Clone, Serialize)]
pub struct StudyFigures {
    /// The conversation alone: seconds per turn and time to first token per turn (ms).
    pub alone_turn_s: Vec<f64>,
    pub alone_ttft_ms: Vec<f64>,
    /// The participants together: wall time, generated tokens per second over it, and time to
    /// first token over every turn (median, 90th percentile) and per turn (median).
    pub wall_s: f64,
    pub tokens_per_s: f64,
    pub ttft_p50_ms: f64,
    pub ttft_p90_ms: f64,
    pub ttft_by_turn_ms: Vec<f64>,
    /// The participants together: time to a reply's last token (median, 90th percentile), and the
    /// longest wait between two pieces of one reply's text (90th percentile over replies).
    pub reply_p50_ms: f64,
    pub reply_p90_ms: f64,
    pub stall_p90_ms: f64,
}

/// Runs the study workload on `engine`; `progress` ticks once per reply.
pub async fn study_bench(
    engine: &dyn Engine,
    workload: &StudyWorkload,
    progress: &ProgressBar,
) -> Result<StudyFigures, EngineError> {
    let mut alone_turn_s = Vec::new();
    let mut alone_ttft_ms = Vec::new();
    let mut history = Vec::new();
    for turn in 1..=workload.turns {
        history.push(participant_message(0, turn));
        let mut r = request(9000, &history, workload.alone_tokens, true);
        r.conversation = Some("study-alone".into());
        let started = Instant::now();
        let c = complete(engine, r).await?;
        alone_turn_s.push(started.elapsed().as_secs_f64());
        alone_ttft_ms.push(c.ttft_ms as f64);
        history.push(ChatMessage::new(Role::Assistant, c.text));
        progress.inc(1);
    }

    let started = Instant::now();
    let runs =
        join_all((1..=workload.participants).map(|p| participant(engine, workload, p, progress)))
            .await;
    let wall_s = started.elapsed().as_secs_f64();
    let mut generated = 0u64;
    let mut all = Vec::new();
    let mut by_turn = vec![Vec::new(); workload.turns];
    let mut replies = Vec::new();
    let mut stalls = Vec::new();
    for run in runs {
        for (turn, (c, stall_ms)) in run?.into_iter().enumerate() {
            generated += u64::from(c.generated_tokens);
            all.push(c.ttft_ms as f64);
            by_turn[turn].push(c.ttft_ms as f64);
            replies.push(c.total_ms as f64);
            stalls.push(stall_ms);
        }
    }
    Ok(StudyFigures {
        alone_turn_s,
        alone_ttft_ms,
        wall_s,
        tokens_per_s: generated as f64 / wall_s,
        ttft_p50_ms: percentile(all.clone(), 0.5),
        ttft_p90_ms: percentile(all, 0.9),
        ttft_by_turn_ms: by_turn.into_iter().map(median).collect(),
        reply_p50_ms: percentile(replies.clone(), 0.5),
        reply_p90_ms: percentile(replies, 0.9),
        stall_p90_ms: percentile(stalls, 0.9),
    })
}

/// The study workload's figures of the engine against the reference's.
pub fn study_figures(engine: &StudyFigures, reference: &StudyFigures) -> Vec<Figure> {
    let turns = engine.alone_turn_s.len();
    let first_last = |v: &[f64]| (v.first().copied(), v.last().copied());
    let mut figures = Vec::new();
    let mut push = |name: String, engine: f64, reference: f64, unit| {
        figures.push(Figure {
            name,
            engine,
            baseline: reference,
            unit,
        })
    };
    for (label, unit, ours, theirs) in [
        ("time", "s", &engine.alone_turn_s, &reference.alone_turn_s),
        (
            "first token",
            "ms",
            &engine.alone_ttft_ms,
            &reference.alone_ttft_ms,
        ),
    ] {
        let (ours_first, ours_last) = first_last(ours);
        let (theirs_first, theirs_last) = first_last(theirs);
        push(
            format!("alone, {label}, turn 1"),
            ours_first.unwrap_or(0.0),
            theirs_first.unwrap_or(0.0),
            unit,
        );
        push(
            format!("alone, {label}, turn {turns}"),
            ours_last.unwrap_or(0.0),
            theirs_last.unwrap_or(0.0),
            unit,
        );
    }
    push(
        "together, wall time".into(),
        engine.wall_s,
        reference.wall_s,
        "s",
    );
    push(
        "together, throughput".into(),
        engine.tokens_per_s,
        reference.tokens_per_s,
        "tok/s",
    );
    push(
        "together, first token p50".into(),
        engine.ttft_p50_ms,
        reference.ttft_p50_ms,
        "ms",
    );
    push(
        "together, first token p90".into(),
        engine.ttft_p90_ms,
        reference.ttft_p90_ms,
        "ms",
    );
    push(
        "together, whole reply p50".into(),
        engine.reply_p50_ms,
        reference.reply_p50_ms,
        "ms",
    );
    push(
        "together, whole reply p90".into(),
        engine.reply_p90_ms,
        reference.reply_p90_ms,
        "ms",
    );
    push(
        "together, longest stall in a reply p90".into(),
        engine.stall_p90_ms,
        reference.stall_p90_ms,
        "ms",
    );
    for (turn, (ours, theirs)) in engine
        .ttft_by_turn_ms
        .iter()
        .zip(&reference.ttft_by_turn_ms)
        .enumerate()
    {
        push(
            format!("together, first token p50, turn {}", turn + 1),
            *ours,
            *theirs,
            "ms",
        );
    }
    figures
}

/// llama.cpp's `llama-server` started as the study workload's reference, with the engine's
/// model, slots, context and threads; stopped when dropped.
pub struct LlamaServer {
    child: std::process::Child,
    /// Its OpenAI-compatible base URL.
    pub url: String,
}

impl LlamaServer {
    /// Starts the server on a free local port and waits until it answers `/health`.
    pub async fn start(
        binary: &Path,
        model: &Path,
        slots: u32,
        context_tokens: u32,
        threads: i32,
    ) -> std::io::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let log_path = std::env::temp_dir().join(format!("collabllm-llama-server-{port}.log"));
        let log = std::fs::File::create(&log_path)?;
        let child = std::process::Command::new(binary)
            .args(["--model", &model.display().to_string()])
            .args(["--ctx-size", &(context_tokens * slots).to_string()])
            .args(["--parallel", &slots.to_string()])
            .args(["--threads", &threads.to_string()])
            .args(["--threads-batch", &threads.to_string()])
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let mut server = Self {
            child,
            url: format!("http://127.0.0.1:{port}/v1"),
        };
        let health = format!("http://127.0.0.1:{port}/health");
        let client = reqwest::Client::new();
        let deadline = Instant::now() + std::time::Duration::from_secs(120);
        loop {
            if let Some(status) = server.child.try_wait()? {
                return Err(std::io::Error::other(format!(
                    "llama-server exited ({status}) before it was ready; its log is {}",
                    log_path.display()
                )));
            }
            let ready = client
                .get(&health)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ready {
                return Ok(server);
            }
            if Instant::now() > deadline {
                return Err(std::io::Error::other(format!(
                    "llama-server did not answer {health} within 120 s; its log is {}",
                    log_path.display()
                )));
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A participant's message at `turn`: about 27 tokens, as in the study's chats.
fn participant_message(participant: usize, turn: usize) -> ChatMessage {
    ChatMessage::new(
        Role::User,
        format!(
            "Turn {turn} from writer {participant}: please revise the paragraph, keep it short, \
             and add one concrete detail about the harbour."
        ),
    )
}

/// A reply as its reader sees it: the completion, and the longest wait between two pieces of its
/// text in ms (a paused reply's pause shows here).
async fn complete_streamed(
    engine: &dyn Engine,
    r: ChatRequest,
) -> Result<(Completion, f64), EngineError> {
    let mut generation = engine.start(r)?;
    let mut last_piece: Option<Instant> = None;
    let mut longest = std::time::Duration::ZERO;
    while let Some(event) = generation.next().await {
        match event {
            EngineEvent::Token(_) => {
                let now = Instant::now();
                if let Some(last) = last_piece {
                    longest = longest.max(now - last);
                }
                last_piece = Some(now);
            }
            EngineEvent::Queued { .. } | EngineEvent::Started => {}
            EngineEvent::Done(c) => return Ok((c, longest.as_secs_f64() * 1000.0)),
            EngineEvent::Error(e) => return Err(e),
        }
    }
    Err(EngineError::Stopped)
}

/// One participant's whole conversation; the completions (with their longest stall) in turn
/// order.
async fn participant(
    engine: &dyn Engine,
    workload: &StudyWorkload,
    p: usize,
    progress: &ProgressBar,
) -> Result<Vec<(Completion, f64)>, EngineError> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(p as u64);
    let (low, high) = workload.think_seconds;
    let mut history = Vec::new();
    let mut completions = Vec::new();
    for turn in 1..=workload.turns {
        if turn > 1 {
            let pause = if high > low {
                rng.random_range(low..high)
            } else {
                low
            };
            tokio::time::sleep(std::time::Duration::from_secs_f64(pause)).await;
        }
        history.push(participant_message(p, turn));
        let mut r = request(p, &history, workload.tokens, true);
        r.conversation = Some(format!("study-{p}"));
        let (c, stall_ms) = complete_streamed(engine, r).await?;
        history.push(ChatMessage::new(Role::Assistant, c.text.clone()));
        completions.push((c, stall_ms));
        progress.inc(1);
    }
    Ok(completions)
}

pub fn percentile(mut values: Vec<f64>, q: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    if values.is_empty() {
        return 0.0;
    }
    let at = ((values.len() - 1) as f64 * q).round() as usize;
    values[at]
}

fn median(values: Vec<f64>) -> f64 {
    percentile(values, 0.5)
}

/// Fills a database with a study of `sessions` finished sessions of `messages` messages each
/// (with a document revision and ratings), for the export benchmark.
pub fn seed_study(
    url: &str,
    sessions: usize,
    messages: usize,
    progress: &ProgressBar,
) -> Result<(), crate::db::DbError> {
    use crate::db::vocab::{MessageRole, Outcome, RevisionAuthor, SessionState};
    use crate::db::{self, models::NewMessage, models::NewSession};
    use crate::protocol::{sha256_hex, LoadedProtocol, Protocol};
    use crate::protocol::{EXAMPLE_PROTOCOL, EXAMPLE_PROTOCOL_PATH};

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
                    simulation_seed: None,
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

/// What `bench mr` measures: one turn of K candidates × S rollouts × w turn pairs.
pub struct MrBenchOptions {
    pub candidates: u32,
    pub samples: u32,
    pub window: u32,
    /// The model that plays the simulator and the judge in the reference run.
    pub reference: String,
    /// Also run the protocol's rollouts one after another, against all at once.
    pub sequential: bool,
}

/// One measured run of the turn's MR.
struct MrRun {
    label: String,
    seconds: f64,
    /// (engine, generated tokens, prompt tokens computed) of each engine the run used.
    engines: Vec<(String, u64, u64)>,
}

/// `collabllm bench mr`: one turn's multiturn-aware rewards with the protocol's simulator and
/// judge against the same turn with `reference` in both roles (the default model: what the
/// platform is measured against), and optionally the protocol's rollouts one after another
/// instead of all in flight at once. Each run is on engines of its own, so none starts with
/// another's cache; the tokens each engine generated and computed say where the time went.
pub async fn mr_bench(
    loaded: &LoadedProtocol,
    models_dir: &Path,
    options: &MrBenchOptions,
) -> Result<String, CollabError> {
    let p = &loaded.protocol;
    let (candidates, samples, window) = (options.candidates, options.samples, options.window);
    if p.model(&options.reference).is_none() {
        return Err(CollabError::Invalid(format!(
            "the protocol has no model {:?} to measure against",
            options.reference
        )));
    }
    let mut reference = p.clone();
    reference.collab.simulator_model = Some(options.reference.clone());
    reference.collab.judge_model = Some(options.reference.clone());
    let (simulator, judge) = p.collab_models();
    let mut modes = vec![
        (
            format!("reference ({} as simulator and judge)", options.reference),
            &reference,
            true,
        ),
        (
            format!("protocol ({simulator} simulator, {judge} judge)"),
            p,
            true,
        ),
    ];
    if options.sequential {
        modes.push(("protocol, one rollout after another".into(), p, false));
    }
    let mut runs = Vec::new();
    for (label, protocol, batched) in modes {
        let (seconds, engines) = mr_turn(
            protocol, loaded, models_dir, candidates, samples, window, batched,
        )
        .await?;
        runs.push(MrRun {
            label,
            seconds,
            engines,
        });
    }
    let rollouts = candidates * samples;
    let mut report = format!(
        "one turn's MRs: {candidates} candidates x {samples} rollouts x {window} turn pairs = \
         {rollouts} rollouts, all in flight at once unless said ({} threads)\n",
        crate::engine::llama::thread_count(),
    );
    for run in &runs {
        report.push_str(&format!(
            "{:<58} {:>7.1} s a turn {:>7.1} turns/h\n",
            run.label,
            run.seconds,
            3600.0 / run.seconds.max(f64::MIN_POSITIVE)
        ));
        for (engine, generated, prompt) in &run.engines {
            report.push_str(&format!(
                "    {engine:<54} {generated:>7} tokens generated {prompt:>7} prompt tokens computed\n"
            ));
        }
    }
    let (reference_run, protocol_run) = (&runs[0], &runs[1]);
    report.push_str(&format!(
        "protocol vs reference: {:.2}x the time of a turn; goal: >= 60 MR-scored turns an hour\n",
        protocol_run.seconds / reference_run.seconds.max(f64::MIN_POSITIVE)
    ));
    if let Some(sequential) = runs.get(2) {
        report.push_str(&format!(
            "all at once vs one after another: {:.2}x faster\n",
            sequential.seconds / protocol_run.seconds.max(f64::MIN_POSITIVE)
        ));
    }
    if let Some(rss) = crate::metrics::peak_rss_mib() {
        report.push_str(&format!(
            "peak memory of the process (the policy and the protocol's simulator and judge \
             loaded): {rss:.0} MiB\n"
        ));
    }
    Ok(report)
}

/// One turn's MR under `p` (its first arm, simulator and judge): the seconds the rollouts took
/// and each engine's tokens.
async fn mr_turn(
    p: &crate::protocol::Protocol,
    loaded: &LoadedProtocol,
    models_dir: &Path,
    candidates: u32,
    samples: u32,
    window: u32,
    batched: bool,
) -> Result<(f64, Vec<(String, u64, u64)>), CollabError> {
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
        keep_document: false,
    };
    // The candidates' own tokens are not the turn's MR: counted from here.
    let before: Vec<(String, u64, u64)> = engine_tokens(&engines);
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
    let seconds = started.elapsed().as_secs_f64();
    let tokens = engine_tokens(&engines)
        .into_iter()
        .map(|(name, generated, prompt)| {
            let was = before.iter().find(|b| b.0 == name);
            let (g0, p0) = was.map_or((0, 0), |b| (b.1, b.2));
            (name, generated - g0, prompt - p0)
        })
        .collect();
    Ok((seconds, tokens))
}

/// Each engine's name with the tokens it generated and computed so far.
fn engine_tokens(engines: &Engines) -> Vec<(String, u64, u64)> {
    engines
        .statuses()
        .into_iter()
        .map(|s| (s.model, s.generated_tokens, s.prompt_tokens_processed))
        .collect()
}
