//! `bench`: performance measured against a reference run in the same process, so the ratios
//! compare across machines.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use clap::Subcommand;
use indicatif::ProgressBar;

use collabllm::bench::api::{ApiClient, ApiWorkload};
use collabllm::bench::{self, load, EngineBenchOptions, StudyWorkload};
use collabllm::engine::fetch;
use collabllm::engine::llama::{self, LlamaEngine, WorkerConfig};
use collabllm::engine::remote::RemoteEngine;
use collabllm::engine::Engine;
use collabllm::protocol::{LoadedProtocol, Protocol, DEFAULT_TIME_SLICE_TOKENS};
use collabllm::protocol::{EXAMPLE_PROTOCOL, EXAMPLE_PROTOCOL_PATH};
use collabllm::train;
use collabllm::web::{self, limits::Limits, AppState};

use super::Context;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Peak memory and time of the CSV export of a large study against a study a tenth its size,
    /// each exported by a child process.
    Export {
        /// Sessions in the large study.
        #[arg(long, default_value_t = 1000)]
        sessions: usize,
        /// Messages per session.
        #[arg(long, default_value_t = 100)]
        messages: usize,
    },
    /// Time of one turn's multiturn-aware rewards (2 candidates, S=3, w=2) with the protocol's
    /// simulator and judge against the same turn with a reference model in both roles, in one
    /// run: seconds a turn, MR-scored turns an hour, and the tokens each engine generated and
    /// computed.
    Mr {
        /// Protocol whose first arm, simulator and judge are measured.
        #[arg(long, default_value = EXAMPLE_PROTOCOL_PATH)]
        protocol: PathBuf,
        /// Candidates of the turn.
        #[arg(long, default_value_t = 2)]
        candidates: u32,
        /// Rollouts per candidate.
        #[arg(long, default_value_t = 3)]
        samples: u32,
        /// Turn pairs per rollout.
        #[arg(long, default_value_t = 2)]
        window: u32,
        /// The protocol's model that plays the simulator and the judge of the reference run
        /// (default: the first arm's).
        #[arg(long)]
        reference: Option<String>,
        /// Also run the protocol's rollouts one after another, against all in flight at once.
        #[arg(long)]
        sequential: bool,
    },
    /// The engine's throughput and time to first token. `--workload chats` compares it with
    /// one-at-a-time requests without prefix reuse; `--workload study` runs the study's own load
    /// (participants chatting at once, several turns each, pauses between turns) on the engine and
    /// on llama.cpp's `llama-server` in the same run; `--workload v1` sends the same chats to this
    /// server's `/v1` and to llama-server's, over HTTP.
    Engine {
        /// What to measure: `chats` (concurrency and prefix reuse), `study` (the study's load
        /// against llama-server) or `v1` (concurrent chats over `/v1`, against llama-server's).
        #[arg(long, value_enum, default_value = "chats")]
        workload: Workload,
        /// GGUF model (default: the default model in the models directory).
        #[arg(long)]
        model: Option<PathBuf>,
        /// Sequence slots of the engine under test (and of the llama-server it starts).
        #[arg(long, default_value_t = 8)]
        slots: u32,
        /// Tokens one conversation may hold.
        #[arg(long, default_value_t = 8192)]
        context_tokens: u32,
        /// Tokens generated per request (`chats`, `v1`) or per turn of the conversation alone
        /// (`study`).
        #[arg(long, default_value_t = 64)]
        tokens: u32,
        /// Turns of each conversation.
        #[arg(long, default_value_t = 10)]
        turns: usize,
        /// Numbers of concurrent chats to measure (`chats`, `v1`).
        #[arg(long, value_delimiter = ',', default_value = "1,4,8,16")]
        concurrency: Vec<usize>,
        /// Times each `v1` figure is measured, with new chats each time; the median is shown.
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// Participants chatting at once (`study`).
        #[arg(long, default_value_t = 16)]
        participants: usize,
        /// Tokens of each participant's reply (`study`).
        #[arg(long, default_value_t = 48)]
        reply_tokens: u32,
        /// Seconds a participant pauses between a reply and the next message, as MIN,MAX
        /// (`study`).
        #[arg(long, value_delimiter = ',', num_args = 2, default_values_t = [0.5, 2.0])]
        think_seconds: Vec<f64>,
        /// An OpenAI-compatible server to measure: with `chats` in place of the in-process
        /// engine, with `study` and `v1` as the reference (e.g. llama-server at
        /// http://127.0.0.1:8081/v1).
        #[arg(long)]
        endpoint: Option<String>,
        /// Model name sent to --endpoint.
        #[arg(long, default_value = "default")]
        remote_model: String,
        /// A `llama-server` binary the `study` and `v1` workloads start as their reference, with
        /// the same model, slots, context and threads as the engine (used when --endpoint is not
        /// given).
        #[arg(long, env = "COLLABLLM_LLAMA_SERVER")]
        llama_server: Option<PathBuf>,
        /// Tokens a reply streams before a participant waiting for a first token may pause it,
        /// as the protocol's `time_slice_tokens` (`study`; 0 never pauses).
        #[arg(long, default_value_t = DEFAULT_TIME_SLICE_TOKENS)]
        time_slice_tokens: u32,
        /// Runs the engine under test with ggml's flash-attention kernel, as the protocol's
        /// `flash_attention = true` (llama-server uses it by default).
        #[arg(long)]
        flash_attention: bool,
    },
    /// The platform under many participants: each goes through the study as a person would over
    /// HTTP and the websocket (link, consent, document saves, messages, ratings, finish, final
    /// answers), all at once (with --duration, each followed by a new one). Without --url,
    /// against a server in this process whose model answers at once, over a new database
    /// (SQLite in a temporary folder, or --db), checked afterwards for every frame stored
    /// exactly once. Prints errors, server overhead (frame to acknowledgement) and reply time
    /// percentiles, database work per second and peak memory.
    Load {
        /// Participants at once.
        #[arg(long, default_value_t = 50)]
        participants: usize,
        /// Keep the load up this many seconds: a participant who finishes is followed by a new
        /// one in their place until then (default: each of --participants goes through once).
        #[arg(long)]
        duration: Option<u64>,
        /// Messages each participant sends (at least the study's minimum of turns).
        #[arg(long, default_value_t = 8)]
        turns: usize,
        /// Milliseconds a participant pauses before each frame, on average (each pause is drawn
        /// between half and 1.5 times it; 0: as fast as the server answers, a stress test rather
        /// than a study).
        #[arg(long, default_value_t = 500)]
        pause_ms: u64,
        /// A running server to load instead (e.g. http://127.0.0.1:8080; raise its
        /// --new-sessions-per-hour first). Its database is not checked.
        #[arg(long)]
        url: Option<String>,
        /// Study slug at --url.
        #[arg(long, default_value = "doc-cocreation")]
        study: String,
        /// Database of the in-process server, e.g. a PostgreSQL URL (default: a new SQLite file).
        #[arg(long)]
        db: Option<String>,
    },
    /// DPO training speed: seconds per pair and training tokens/s at pairs of --tokens tokens,
    /// against the forward-only pass and llama.cpp's forward pass over the same tokens in the same
    /// run, peak memory, and one epoch's estimated time.
    Train {
        /// GGUF model (default: the default model in the models directory).
        #[arg(long)]
        model: Option<PathBuf>,
        /// Tokens of each side of a pair (prompt + reply, half each).
        #[arg(long, default_value_t = 512)]
        tokens: usize,
        /// Pairs measured.
        #[arg(long, default_value_t = 3)]
        pairs: usize,
        /// Pairs of the epoch whose time is estimated.
        #[arg(long, default_value_t = 200)]
        epoch_pairs: usize,
    },
}

/// What `bench engine` measures.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Workload {
    /// Concurrent first turns and conversations against one-at-a-time requests.
    Chats,
    /// The study's load against llama.cpp's llama-server.
    Study,
    /// Chats sent at once to this server's `/v1` and to llama-server's, answered whole and
    /// streamed, as an OpenAI client sends them.
    V1,
}

/// The server the study and `/v1` workloads are compared with.
enum Reference {
    /// One already running: its `/v1` URL and model name.
    Endpoint(String, String),
    /// A llama-server binary to start with the engine's settings.
    LlamaServer(PathBuf),
}

impl Reference {
    /// `--endpoint` (with `--remote-model`), else `--llama-server`, else none.
    fn of(endpoint: Option<String>, model: String, llama_server: Option<PathBuf>) -> Option<Self> {
        match (endpoint, llama_server) {
            (Some(url), _) => Some(Reference::Endpoint(url, model)),
            (None, Some(binary)) => Some(Reference::LlamaServer(binary)),
            (None, None) => None,
        }
    }

    /// The reference's `/v1` URL and model name, starting llama-server if it is one (stopped
    /// when the returned guard is dropped).
    fn open(
        self,
        runtime: &tokio::runtime::Runtime,
        model: &Path,
        slots: u32,
        context_tokens: u32,
    ) -> Result<(Option<bench::LlamaServer>, String, String)> {
        Ok(match self {
            Reference::Endpoint(url, name) => (None, url, name),
            Reference::LlamaServer(binary) => {
                let server = runtime
                    .block_on(bench::LlamaServer::start(
                        &binary,
                        model,
                        slots,
                        context_tokens,
                        llama::thread_count(),
                    ))
                    .with_context(|| format!("cannot start {}", binary.display()))?;
                let url = server.url.clone();
                (Some(server), url, "default".to_string())
            }
        })
    }
}

pub fn bench(ctx: &Context, command: BenchCommand) -> Result<()> {
    let models_dir = &ctx.settings.models_dir;
    match command {
        BenchCommand::Mr {
            protocol,
            candidates,
            samples,
            window,
            reference,
            sequential,
        } => {
            let loaded = ctx.load_protocol(&protocol)?;
            let reference = match reference {
                Some(id) => id,
                None => loaded
                    .protocol
                    .arms
                    .first()
                    .context("the protocol has no arms")?
                    .model
                    .clone(),
            };
            let options = bench::MrBenchOptions {
                candidates: candidates.max(2),
                samples: samples.max(1),
                window: window.max(1),
                reference,
                sequential,
            };
            let runtime = ctx.runtime()?;
            let _guard = runtime.enter();
            let bar = ProgressBar::new_spinner().with_message("measuring one turn's MR");
            bar.enable_steady_tick(std::time::Duration::from_millis(200));
            let report = runtime.block_on(bench::mr_bench(&loaded, models_dir, &options));
            bar.finish_and_clear();
            println!("{}", report?);
            Ok(())
        }
        BenchCommand::Export { sessions, messages } => export_bench(sessions, messages),
        BenchCommand::Engine {
            workload,
            model,
            slots,
            context_tokens,
            tokens,
            turns,
            concurrency,
            repeats,
            participants,
            reply_tokens,
            think_seconds,
            endpoint,
            remote_model,
            llama_server,
            time_slice_tokens,
            flash_attention,
        } => {
            let under_test = EngineUnderTest {
                model: model.unwrap_or_else(|| fetch::default_model_path(models_dir)),
                slots,
                context_tokens,
                flash_attention,
            };
            match workload {
                Workload::Chats => {
                    let options = EngineBenchOptions {
                        tokens,
                        concurrency,
                        turns,
                    };
                    engine_bench(
                        ctx,
                        &under_test,
                        &options,
                        endpoint.map(|e| (e, remote_model)),
                    )
                }
                Workload::Study => {
                    let workload = StudyWorkload {
                        participants,
                        turns,
                        tokens: reply_tokens,
                        alone_tokens: tokens,
                        think_seconds: (think_seconds[0], think_seconds[1]),
                        time_slice_tokens,
                    };
                    let reference = Reference::of(endpoint, remote_model, llama_server);
                    study_bench(ctx, &under_test, &workload, reference)
                }
                Workload::V1 => {
                    let workload = ApiWorkload {
                        concurrency,
                        tokens,
                        repeats,
                    };
                    let reference = Reference::of(endpoint, remote_model, llama_server);
                    v1_bench(ctx, &under_test, &workload, reference)
                }
            }
        }
        BenchCommand::Load {
            participants,
            duration,
            turns,
            pause_ms,
            url,
            study,
            db,
        } => {
            let options = load::LoadOptions {
                participants,
                turns,
                study,
                base: url.unwrap_or_default(),
                pause: std::time::Duration::from_millis(pause_ms),
                duration: duration.map(std::time::Duration::from_secs),
            };
            load_bench(ctx, options, db)
        }
        BenchCommand::Train {
            model,
            tokens,
            pairs,
            epoch_pairs,
        } => {
            let model = model.unwrap_or_else(|| fetch::default_model_path(models_dir));
            let bar = ProgressBar::new_spinner().with_message("measuring training steps");
            bar.enable_steady_tick(std::time::Duration::from_millis(200));
            let report = train::bench(&model, tokens, pairs.max(1), epoch_pairs)?;
            bar.finish_and_clear();
            println!("{report}");
            Ok(())
        }
    }
}

fn export_bench(sessions: usize, messages: usize) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut results = Vec::new();
    for (name, n) in [("reference", (sessions / 10).max(1)), ("large", sessions)] {
        let url = format!(
            "sqlite://{}",
            dir.path().join(format!("{name}.sqlite3")).display()
        );
        let bar = ProgressBar::new(n as u64).with_message(format!("seeding the {name} study"));
        bench::seed_study(&url, n, messages, &bar)?;
        bar.finish_and_clear();
        let mut command = std::process::Command::new(std::env::current_exe()?);
        command
            .args([
                "--log",
                "warn",
                "--database-url",
                &url,
                "export",
                "csv",
                "--study",
                "doc-cocreation",
                "--out",
            ])
            .arg(dir.path().join(name))
            .stdout(std::process::Stdio::null());
        let started = std::time::Instant::now();
        let (ok, peak) = bench::peak_rss_of(command)?;
        if !ok {
            bail!("the export of the {name} study failed");
        }
        results.push((name, n * messages, peak, started.elapsed().as_secs_f64()));
    }
    println!(
        "{:<10} {:>10} {:>14} {:>10}",
        "study", "messages", "peak RSS MiB", "seconds"
    );
    for (name, n, peak, secs) in &results {
        println!("{name:<10} {n:>10} {peak:>14.1} {secs:>10.2}");
    }
    let (reference, large) = (&results[0], &results[1]);
    println!(
        "peak RSS, large / reference: {:.2}x for {:.0}x the messages (constant memory: about 1x)",
        large.2 / reference.2,
        large.1 as f64 / reference.1 as f64
    );
    Ok(())
}

/// The engine a benchmark measures: its model and its worker's settings.
struct EngineUnderTest {
    model: PathBuf,
    slots: u32,
    context_tokens: u32,
    flash_attention: bool,
}

impl EngineUnderTest {
    /// A worker of `slots`; with `reuse_prefix` as `serve` runs it (prefix reuse, caches kept in
    /// RAM), else the one-at-a-time baseline that computes every prompt again.
    fn config(
        &self,
        name: &str,
        slots: u32,
        reuse_prefix: bool,
        time_slice_tokens: u32,
    ) -> WorkerConfig {
        WorkerConfig {
            name: name.into(),
            context_tokens: self.context_tokens,
            slots,
            lora: None,
            reuse_prefix,
            saved_cache_bytes: if reuse_prefix { 1 << 30 } else { 0 },
            time_slice_tokens,
            flash_attention: self.flash_attention,
        }
    }

    /// What a report says of it: model, slots, context, threads, attention path.
    fn describe(&self) -> String {
        format!(
            "model {}, {} slots of {} tokens, {} threads, flash attention {}",
            self.model.display(),
            self.slots,
            self.context_tokens,
            llama::thread_count(),
            if self.flash_attention { "on" } else { "off" }
        )
    }
}

fn engine_bench(
    ctx: &Context,
    under_test: &EngineUnderTest,
    options: &EngineBenchOptions,
    endpoint: Option<(String, String)>,
) -> Result<()> {
    let runtime = ctx.runtime()?;
    let _guard = runtime.enter();
    let (model, slots) = (&under_test.model, under_test.slots);
    let loaded = llama::load_model(model, None, &[])?;
    let engine: Box<dyn Engine> = match endpoint {
        Some((url, name)) => Box::new(RemoteEngine::new(&url, &name, None)?),
        None => Box::new(LlamaEngine::spawn(
            loaded.clone(),
            under_test.config("engine", slots, true, DEFAULT_TIME_SLICE_TOKENS),
        )?),
    };
    let baseline = LlamaEngine::spawn(loaded.clone(), under_test.config("baseline", 1, false, 0))?;
    let progress = ProgressBar::new(bench::steps(options));
    let figures = runtime.block_on(bench::engine_bench(&*engine, &baseline, options, &progress))?;
    progress.finish_and_clear();
    println!(
        "model {} ({}), {slots} slots, {} generated tokens per request, {} threads",
        model.display(),
        loaded.sha256,
        options.tokens,
        llama::thread_count()
    );
    print_figures(&figures, "baseline");
    let get = |prefix: &str| {
        figures
            .iter()
            .find(|f| f.name.starts_with(prefix))
            .map(|f| f.engine)
    };
    if let (Some(one), Some(eight)) = (get("aggregate, 1 "), get("aggregate, 8 ")) {
        println!(
            "aggregate at 8 chats / 1 chat: {:.2}x (target >= 1.75x)",
            eight / one
        );
    }
    let ttft: Vec<f64> = figures
        .iter()
        .filter(|f| f.name.starts_with("time to first token"))
        .map(|f| f.engine)
        .collect();
    if let [first, last] = ttft[..] {
        println!(
            "time to first token, turn {} / turn 1: {:.2}x (target <= 1.4x)",
            options.turns,
            last / first.max(1.0)
        );
    }
    if let Some(rss) = collabllm::metrics::peak_rss_mib() {
        println!("peak RSS: {rss:.0} MiB");
    }
    Ok(())
}

/// `bench engine --workload study`: the in-process engine, then the reference, on the same
/// workload; the ratios are what compare across machines.
fn study_bench(
    ctx: &Context,
    under_test: &EngineUnderTest,
    workload: &StudyWorkload,
    reference: Option<Reference>,
) -> Result<()> {
    let (model, slots, context_tokens) = (
        &under_test.model,
        under_test.slots,
        under_test.context_tokens,
    );
    let runtime = ctx.runtime()?;
    let _guard = runtime.enter();
    let replies = workload.turns * (workload.participants + 1);
    let runs = if reference.is_some() { 2 } else { 1 };
    let progress = ProgressBar::new(runs * replies as u64);
    let ours = {
        let engine = LlamaEngine::spawn(
            llama::load_model(model, None, &[])?,
            under_test.config("engine", slots, true, workload.time_slice_tokens),
        )?;
        runtime.block_on(bench::study_bench(&engine, workload, &progress))?
    };
    println!("{}", under_test.describe());
    println!(
        "{} participants at once, {} turns each, {} tokens a reply, {:.1}-{:.1} s between turns; \
         one conversation alone: {} turns of {} tokens; time slices of {} tokens",
        workload.participants,
        workload.turns,
        workload.tokens,
        workload.think_seconds.0,
        workload.think_seconds.1,
        workload.turns,
        workload.alone_tokens,
        workload.time_slice_tokens
    );
    let alone = |f: &bench::StudyFigures| {
        f.alone_turn_s.last().copied().unwrap_or(0.0) / f.alone_turn_s[0].max(1e-9)
    };
    let Some(reference) = reference else {
        progress.finish_and_clear();
        println!("{}", serde_json::to_string_pretty(&ours)?);
        println!(
            "alone, turn {} / turn 1: {:.2}x (target <= 1.2x); no reference was measured: \
             pass --llama-server PATH or --endpoint URL to compare with llama-server",
            workload.turns,
            alone(&ours)
        );
        return Ok(());
    };
    // The engine is dropped before the reference starts: the two never share the cores.
    let (_server, url, name) = reference.open(runtime, model, slots, context_tokens)?;
    let remote = RemoteEngine::new(&url, &name, None)?;
    let theirs = runtime.block_on(bench::study_bench(&remote, workload, &progress))?;
    progress.finish_and_clear();
    println!("reference: {url}");
    let figures = bench::study_figures(&ours, &theirs);
    print_figures(&figures, "llama-server");
    println!(
        "alone, turn {} / turn 1: engine {:.2}x, llama-server {:.2}x (target <= 1.2x)",
        workload.turns,
        alone(&ours),
        alone(&theirs)
    );
    println!(
        "together: time to first token p50 {:.2}x llama-server's (target <= 0.8x), throughput \
         {:.2}x (target >= 1.0x)",
        ours.ttft_p50_ms / theirs.ttft_p50_ms.max(1e-9),
        ours.tokens_per_s / theirs.tokens_per_s.max(1e-9)
    );
    Ok(())
}

/// `bench engine --workload v1`: this server's `/v1` (in this process, over loopback HTTP) and
/// the reference's, on the same chats, one batch of chats after the other (neither computes while
/// the other is measured).
fn v1_bench(
    ctx: &Context,
    under_test: &EngineUnderTest,
    workload: &ApiWorkload,
    reference: Option<Reference>,
) -> Result<()> {
    let (model, slots, context_tokens) = (
        &under_test.model,
        under_test.slots,
        under_test.context_tokens,
    );
    let runtime = ctx.runtime()?;
    let _guard = runtime.enter();
    let runs = if reference.is_some() { 2 } else { 1 };
    let batches = 2 * workload.concurrency.len() * workload.repeats.max(1);
    let progress = ProgressBar::new(runs * batches as u64);
    let dir = tempfile::tempdir()?;
    let url = format!("sqlite://{}", dir.path().join("bench.sqlite3").display());
    let engine = LlamaEngine::spawn(
        llama::load_model(model, None, &[])?,
        under_test.config("engine", slots, true, DEFAULT_TIME_SLICE_TOKENS),
    )?;
    let engines = collabllm::engine::Engines::new();
    engines.insert("bench", std::sync::Arc::new(engine));
    let key = uuid::Uuid::new_v4().simple().to_string();
    let mut state = AppState::new(collabllm::db::open(&url, 4)?, engines, PathBuf::new())?;
    state.api_keys = std::sync::Arc::new(vec![web::openai::key_sha256(&key)]);
    let server = ServerThread::start(state, None)?;
    let ours = ApiClient::new(&format!("{}/v1", server.base), "bench", Some(key));
    println!(
        "{}; {} tokens a chat",
        under_test.describe(),
        workload.tokens
    );
    let Some(reference) = reference else {
        let figures = runtime.block_on(bench::api::api_bench(&[&ours], workload, &progress))?;
        progress.finish_and_clear();
        println!("{}", serde_json::to_string_pretty(&figures[0])?);
        println!(
            "no reference was measured: pass --llama-server PATH or --endpoint URL to compare \
             with llama-server"
        );
        return Ok(());
    };
    let (_reference_server, url, name) = reference.open(runtime, model, slots, context_tokens)?;
    let theirs = ApiClient::new(&url, &name, None);
    let figures = runtime.block_on(bench::api::api_bench(
        &[&ours, &theirs],
        workload,
        &progress,
    ))?;
    progress.finish_and_clear();
    println!("reference: {url}");
    print_figures(
        &bench::api::api_figures(&figures[0], &figures[1], workload),
        "llama-server",
    );
    println!("target: every ratio >= 0.95x");
    Ok(())
}

/// The figures of a benchmark as a table: engine, reference, ratio.
fn print_figures(figures: &[bench::Figure], reference: &str) {
    println!(
        "{:<40} {:>12} {:>16} {:>8}",
        "", "engine", reference, "ratio"
    );
    for f in figures {
        println!(
            "{:<40} {:>8.1} {:<3} {:>12.1} {:<3} {:>7.2}x",
            f.name,
            f.engine,
            f.unit,
            f.baseline,
            f.unit,
            f.ratio()
        );
    }
}

/// `bench load`: against the server at `options.base`, or, without one, a server of its own over
/// `db`.
fn load_bench(ctx: &Context, mut options: load::LoadOptions, db: Option<String>) -> Result<()> {
    let runtime = ctx.runtime()?;
    let _guard = runtime.enter();
    let dir = tempfile::tempdir()?;
    let own = if options.base.is_empty() {
        let url =
            db.unwrap_or_else(|| format!("sqlite://{}", dir.path().join("load.sqlite3").display()));
        let server = LoadServer::start(&url, ctx.settings.db_connections)?;
        options.base = server.server.base.clone();
        options.study = server.study.clone();
        Some((server, url))
    } else {
        options.base = options.base.trim_end_matches('/').to_string();
        None
    };
    let (participants, turns, study) = (options.participants, options.turns, options.study.clone());
    let units_before = collabllm::metrics::metrics().db_work_count();
    let commits_before = collabllm::metrics::metrics().db_commits();
    let bar = super::Progress::new(if options.duration.is_some() {
        "seconds"
    } else {
        "participants"
    });
    let report = runtime.block_on(load::run(&options, &bar.counter()));
    bar.finish();
    let units = collabllm::metrics::metrics().db_work_count() - units_before;
    let ms = |values: &[f64], q: f64| bench::percentile(values.to_vec(), q);
    let seconds = report.elapsed.as_secs_f64();
    println!(
        "{participants} participants at once, {} messages each, at {}: {} sessions completed, {} \
         errors, {:.1} s",
        report
            .sent
            .iter()
            .map(|s| s.messages)
            .max()
            .unwrap_or(turns),
        options.base,
        report.sent.iter().filter(|s| s.completed).count(),
        report.errors.len(),
        seconds
    );
    println!(
        "server overhead, frame to acknowledgement: p50 {:.1} ms, p99 {:.1} ms ({} frames)",
        ms(&report.ack_ms, 0.5),
        ms(&report.ack_ms, 0.99),
        report.ack_ms.len()
    );
    if report.retried > 0 {
        println!(
            "pages loaded and frames sent again after the server could not store them: {}",
            report.retried
        );
    }
    println!(
        "message to reply done{}: p50 {:.1} ms, p99 {:.1} ms ({} replies)",
        if own.is_some() {
            " (a model that answers at once)"
        } else {
            ""
        },
        ms(&report.reply_ms, 0.5),
        ms(&report.reply_ms, 0.99),
        report.reply_ms.len()
    );
    if let Some(rss) = collabllm::metrics::peak_rss_mib() {
        println!("peak RSS of this process (server and participants): {rss:.0} MiB");
    }
    for error in report.errors.iter().take(10) {
        eprintln!("error: {error}");
    }
    let mut problems = Vec::new();
    match own {
        Some((server, url)) => {
            println!(
                "database ({}): {units} units of work, {:.0} a second",
                if url.starts_with("postgres") {
                    "PostgreSQL"
                } else {
                    "SQLite"
                },
                units as f64 / seconds.max(1e-9)
            );
            let (commits, writes) = collabllm::metrics::metrics().db_commits();
            let (commits, writes) = (commits - commits_before.0, writes - commits_before.1);
            if commits > 0 {
                println!(
                    "group commit: {writes} session writes in {commits} commits ({:.1} a commit, \
                     {:.0} commits a second)",
                    writes as f64 / commits as f64,
                    commits as f64 / seconds.max(1e-9)
                );
            }
            if url.starts_with("postgres") {
                let sent = |kind| collabllm::metrics::metrics().relay_notices(kind);
                println!(
                    "relay to other nodes: {} notifications of frames ({}; {} beats)",
                    sent("frames"),
                    if server.studio.relaying() {
                        "relaying: another node was heard, or this one started listening lately"
                    } else {
                        "none relayed once no other node was heard for 10 s"
                    },
                    sent("beat")
                );
            }
            problems = load::check_stored(&mut *server.pool.get()?, &study, &report.sent)?;
            if problems.is_empty() {
                println!("stored: every frame exactly once");
            }
            for p in &problems {
                eprintln!("stored wrongly: {p}");
            }
            drop(server);
        }
        None => println!("stored: not checked (the server's database is its own)"),
    }
    if !report.errors.is_empty() || !problems.is_empty() {
        bail!(
            "{} participants failed, {} problems in what was stored",
            report.errors.len(),
            problems.len()
        );
    }
    Ok(())
}

/// The server `bench load` runs in this process: the example study under a fresh slug, with no
/// limit on new sessions or messages a minute, every model answering at once.
struct LoadServer {
    study: String,
    pool: collabllm::db::DbPool,
    studio: std::sync::Arc<collabllm::study::Studio>,
    server: ServerThread,
}

impl LoadServer {
    fn start(url: &str, connections: u32) -> Result<Self> {
        let study = format!("load-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        let text = EXAMPLE_PROTOCOL
            .replacen(
                "slug = \"doc-cocreation\"",
                &format!("slug = \"{study}\""),
                1,
            )
            .replacen("messages_per_minute = 10", "messages_per_minute = 0", 1);
        let protocol = Protocol::from_stored(&text).map_err(|e| anyhow::anyhow!("{e}"))?;
        let loaded = LoadedProtocol {
            sha256: collabllm::protocol::sha256_hex(text.as_bytes()),
            protocol,
            text,
            source: PathBuf::from(EXAMPLE_PROTOCOL_PATH),
        };
        // As many pooled connections as `serve` would have (--db-connections).
        let pool = collabllm::db::open(url, connections)?;
        collabllm::db::studies::import(&mut *pool.get()?, &loaded)?;
        let engines = load::instant_engines(&loaded.protocol);
        let mut state = AppState::new(pool.clone(), engines, PathBuf::new())?;
        state.limits = std::sync::Arc::new(Limits::new(0, false));
        let studio = state.studio.clone();
        // A node as `serve` runs it (on PostgreSQL: listening, and relaying only while it hears
        // another node).
        let server = ServerThread::start(state, Some(studio.clone()))?;
        Ok(Self {
            study,
            pool,
            studio,
            server,
        })
    }
}

/// The routes over a state, served on a loopback port by a thread of its own (with its own
/// runtime, so the benchmark's clients never share one with the server); stopped when dropped.
struct ServerThread {
    /// `http://127.0.0.1:PORT`.
    base: String,
    handle: actix_web::dev::ServerHandle,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ServerThread {
    /// Serves `state`; with `cluster`, that studio also runs as a node of a cluster.
    fn start(
        state: AppState,
        cluster: Option<std::sync::Arc<collabllm::study::Studio>>,
    ) -> Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            actix_web::rt::System::new().block_on(async move {
                let loopback = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
                match web::bind(state, loopback, None) {
                    Ok((addr, server)) => {
                        if let Some(studio) = cluster {
                            studio.run_cluster(web::IDLE_SWEEP_INTERVAL);
                        }
                        let _ = tx.send(Ok((addr, server.handle())));
                        if let Err(e) = server.await {
                            tracing::error!(error = %e, "the benchmark's server failed");
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            });
        });
        let (addr, handle) = rx
            .recv()
            .context("the benchmark's server did not start")?
            .context("cannot start the benchmark's server")?;
        Ok(Self {
            base: format!("http://{addr}"),
            handle,
            thread: Some(thread),
        })
    }
}

impl Drop for ServerThread {
    fn drop(&mut self) {
        let handle = self.handle.clone();
        // Stopping needs a runtime of its own: the server's is on its thread.
        std::thread::spawn(move || actix_web::rt::System::new().block_on(handle.stop(false)))
            .join()
            .ok();
        if let Some(thread) = self.thread.take() {
            thread.join().ok();
        }
    }
}
