//! The `collabllm` command line: the binary edge, where errors become messages and exit codes.
//! One module per concern; each command is a function of the [`Context`] and its own arguments.

mod admin;
mod bench;
mod collab;
mod config;
mod export;
mod online;
mod serve;
mod train;

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};
use indicatif::ProgressBar;

use collabllm::db::{self, studies::ImportOutcome};
use collabllm::protocol::{LoadedProtocol, ProtocolError};
use config::{ServeSettings, Settings};

/// CollabLLM Studio: run human–AI document co-creation studies and turn them into training data.
#[derive(Parser)]
#[command(name = "collabllm", version, about, long_about = None)]
struct Cli {
    #[command(flatten)]
    settings: Settings,

    /// Log filter, e.g. `info` or `collabllm=debug,actix_web=info`.
    #[arg(long, global = true, env = "COLLABLLM_LOG", default_value = "info")]
    log: String,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start the web server: participant pages, console, websocket and the `/v1` API.
    Serve(ServeSettings),
    /// Apply pending database migrations and exit.
    Migrate,
    /// Check or import study protocol files.
    #[command(subcommand)]
    Protocol(admin::ProtocolCommand),
    /// Manage model files.
    #[command(subcommand)]
    Models(admin::ModelsCommand),
    /// Chat with an arm of a protocol in the terminal, to pilot a policy before a study.
    Chat(serve::ChatArgs),
    /// Manage researcher accounts of the console.
    #[command(subcommand)]
    User(admin::UserCommand),
    /// Manage keys of the OpenAI-compatible `/v1` API.
    #[command(subcommand)]
    Key(admin::KeyCommand),
    /// Export a study's data for analysis.
    #[command(subcommand)]
    Export(export::ExportCommand),
    /// Run simulated participants through a study (assignment, websocket session, document
    /// edits, inserted and regenerated replies, comparisons, ratings), stored flagged
    /// `simulated`: a pilot before paying anyone. Progress counts turns as they happen. Ctrl-C or
    /// SIGTERM stops at once and ends the sessions in flight as `abandoned`.
    Simulate(collab::SimulateArgs),
    /// Preference pairs scored with the multiturn-aware reward: for each assistant turn of the
    /// chosen sessions, the reply given and K-1 fresh candidates are rolled forward with the user
    /// simulator and scored; highest vs lowest MR, as JSONL in TRL's conversational DPO format.
    /// Rollouts are stored as they finish: run the same command again to resume.
    Pairs(collab::PairsArgs),
    /// Grow multi-turn conversations from single-turn tasks (JSONL lines with "prompt" and
    /// "reference"), keeping the best-MR candidate each turn; one row per candidate. Finished
    /// turns are kept in the database: run the same command again to resume a stopped run.
    Synth(collab::SynthArgs),
    /// Measure performance against a baseline run in the same process.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Train a policy from preference pairs.
    #[command(subcommand)]
    Train(train::TrainCommand),
    /// Evaluate arms the way the paper does: N simulated users per arm, the same tasks and seeds
    /// in every arm, each whole conversation scored with document BLEU, assistant tokens (k),
    /// interactivity (ITR, judge ×100), document quality (judge, 1–10) and turns; each arm's
    /// means with 95% bootstrap intervals and the paired difference to the baseline, written to
    /// DIR/eval.json and DIR/eval.csv. Finished conversations are kept in DIR/eval.jsonl: run the
    /// same command again after a stop to resume. `eval reward` checks the reward itself.
    Eval(collab::EvalArgs),
    /// Online DPO, round after round: simulated participants with the current policy, their
    /// turns scored with MR into pairs, an adapter trained from the base on every pair so far, and
    /// the base against it on the same held-out simulated users; DIR/round-N/ keeps each round's
    /// protocols, pairs, adapter, training report and evaluation, DIR/report.md and report.json
    /// one row per round. Finished steps are kept: run the same command again to resume.
    Loop(online::LoopArgs),
}

/// Parses the command line, sets up logging and runs the command; an error is printed and exits
/// with status 1.
pub fn main() {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&cli.log)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal: a log file or CI gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let ctx = Context {
        settings: cli.settings,
        runtime: OnceLock::new(),
    };
    if let Err(e) = run(&ctx, cli.command) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(ctx: &Context, command: Command) -> Result<()> {
    match command {
        Command::Serve(settings) => serve::serve(ctx, settings),
        Command::Migrate => admin::migrate(ctx),
        Command::Protocol(command) => admin::protocol(ctx, command),
        Command::Models(command) => admin::models(ctx, command),
        Command::Chat(args) => serve::chat(ctx, args),
        Command::User(command) => admin::user(ctx, command),
        Command::Key(command) => admin::key(ctx, command),
        Command::Export(command) => export::export(ctx, command),
        Command::Simulate(args) => collab::simulate(ctx, args),
        Command::Pairs(args) => collab::pairs(ctx, args),
        Command::Synth(args) => collab::synth(ctx, args),
        Command::Bench(command) => bench::bench(ctx, command),
        Command::Train(command) => train::train(ctx, command),
        Command::Eval(args) => collab::eval(ctx, args),
        Command::Loop(args) => online::run(ctx, args),
    }
}

/// What every command starts from: the global settings, and the async runtime, made once and
/// only by a command that needs it. Database connections are opened and migrated here, so no
/// command works on a database older than the binary.
struct Context {
    settings: Settings,
    runtime: OnceLock<tokio::runtime::Runtime>,
}

impl Context {
    /// One connection, migrated.
    fn conn(&self) -> Result<db::DbConn> {
        let mut conn = db::connect(&self.settings.database_url)?;
        db::migrate(&mut conn)?;
        Ok(conn)
    }

    /// A connection pool (opening it migrates).
    fn pool(&self) -> Result<db::DbPool> {
        Ok(db::open(
            &self.settings.database_url,
            self.settings.db_connections,
        )?)
    }

    /// The async runtime; engines and servers need it entered (`runtime.enter()`).
    fn runtime(&self) -> Result<&tokio::runtime::Runtime> {
        if let Some(runtime) = self.runtime.get() {
            return Ok(runtime);
        }
        let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
        Ok(self.runtime.get_or_init(|| runtime))
    }

    /// A protocol file, checked; relative model paths resolve against the models directory.
    fn load_protocol(&self, path: &Path) -> Result<LoadedProtocol> {
        LoadedProtocol::load(path, &self.settings.models_dir).map_err(protocol_error)
    }

    /// Stores a protocol's study (or finds it unchanged) and says which it was.
    fn import(
        &self,
        conn: &mut db::DbConn,
        loaded: &LoadedProtocol,
    ) -> Result<db::studies::Imported> {
        let imported = db::studies::import(conn, loaded)?;
        let what = match imported.outcome {
            ImportOutcome::Created => "created",
            ImportOutcome::NewVersion => "stored as a new version",
            ImportOutcome::Unchanged => "unchanged",
        };
        println!(
            "study {}: {what} (version {}, sha256 {})",
            imported.study.slug, imported.version.version, imported.version.protocol_sha256
        );
        Ok(imported)
    }
}

/// A protocol's diagnostics as they are printed (each names its file, line and fix).
fn protocol_error(e: ProtocolError) -> anyhow::Error {
    anyhow::anyhow!("{e}")
}

/// Which sessions `pairs` scores.
#[derive(Clone, Copy, clap::ValueEnum)]
enum SessionsArg {
    /// Sessions of people only.
    Human,
    /// Simulated participants only.
    Simulated,
    /// Both.
    All,
}

impl From<SessionsArg> for collabllm::collab::pairs::SessionKind {
    fn from(s: SessionsArg) -> Self {
        match s {
            SessionsArg::Human => Self::Human,
            SessionsArg::Simulated => Self::Simulated,
            SessionsArg::All => Self::All,
        }
    }
}

/// A long task's progress: an indicatif bar on a terminal; without one (a log, CI) a plain line
/// on stderr at most every [`PLAIN_PROGRESS_EVERY`] and at the end, so a long run never looks
/// stuck.
struct Progress {
    what: &'static str,
    bar: ProgressBar,
    /// When the last plain line was written; `None` on a terminal.
    plain: Option<std::sync::Mutex<Option<std::time::Instant>>>,
}

const PLAIN_PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

impl Progress {
    fn new(what: &'static str) -> Self {
        use std::io::IsTerminal;
        let bar = ProgressBar::new(0).with_style(
            indicatif::ProgressStyle::with_template(&format!(
                "{what} {{bar:40}} {{pos}}/{{len}} {{msg}} ({{elapsed}} so far, {{eta}} left)"
            ))
            .expect("static template"),
        );
        let plain = (!std::io::stderr().is_terminal()).then(Default::default);
        Self { what, bar, plain }
    }

    /// `done` of `total`, with a note (may be empty).
    fn set(&self, done: u64, total: u64, note: String) {
        self.bar.set_length(total);
        self.bar.set_position(done);
        let Some(last) = &self.plain else {
            self.bar.set_message(note);
            return;
        };
        let mut last = last.lock().expect("progress lock");
        if done == total || last.is_none_or(|at| at.elapsed() >= PLAIN_PROGRESS_EVERY) {
            *last = Some(std::time::Instant::now());
            let note = if note.is_empty() {
                String::new()
            } else {
                format!(", {note}")
            };
            eprintln!(
                "{}: {done}/{total}{note} ({} so far)",
                self.what,
                indicatif::HumanDuration(self.bar.elapsed())
            );
        }
    }

    /// The (done, total) callback the library's long tasks take.
    fn counter(&self) -> impl Fn(u64, u64) + Sync + '_ {
        |done, total| self.set(done, total, String::new())
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// Runs `job` to its end, or until the process is told to stop (Ctrl-C, SIGTERM): `None`.
fn until_stopped<F: std::future::Future>(
    runtime: &tokio::runtime::Runtime,
    job: F,
) -> Option<F::Output> {
    runtime.block_on(async {
        tokio::select! {
            result = job => Some(result),
            () = stop_signal() => None,
        }
    })
}

/// Runs a job that writes JSONL files until it ends, fails, or is stopped (Ctrl-C, SIGTERM).
/// Stopped or failed, it says where the rows finished so far are: complete lines in each
/// output's `.jsonl.partial` file.
fn run_writing<T>(
    runtime: &tokio::runtime::Runtime,
    job: impl std::future::Future<Output = Result<T, collabllm::collab::CollabError>>,
    outputs: &[&Path],
) -> Result<T> {
    let outcome = until_stopped(runtime, job);
    let partial = || {
        let files: Vec<String> = outputs
            .iter()
            .map(|p| collabllm::collab::partial_path(p))
            .filter(|p| p.exists())
            .map(|p| p.display().to_string())
            .collect();
        if files.is_empty() {
            "nothing was written yet".to_string()
        } else {
            format!("the rows finished so far are in {}", files.join(", "))
        }
    };
    match outcome {
        Some(Ok(value)) => Ok(value),
        Some(Err(e)) => Err(anyhow::anyhow!("{e}; {}", partial())),
        None => bail!("stopped; {}", partial()),
    }
}

/// Ctrl-C or SIGTERM.
async fn stop_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let terminated = async {
        match term.as_mut() {
            Some(t) => {
                t.recv().await;
            }
            None => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminated => {}
    }
}

/// The output's name, or that it was not written because it would be empty.
fn written(path: &Path, rows: u64, what: &str) -> String {
    if rows == 0 {
        format!("no {what}: {} was not written", path.display())
    } else {
        path.display().to_string()
    }
}
