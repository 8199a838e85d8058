//! The CollabLLM core on the command line: simulated participants, preference pairs scored with
//! the multiturn-aware reward, synthetic conversations, and evaluations of arms and of the reward.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use clap::Subcommand;

use collabllm::collab::{self, reward::MrOverrides};
use collabllm::db;
use collabllm::engine::Engines;
use collabllm::protocol::EXAMPLE_PROTOCOL_PATH;
use collabllm::web::{self, AppState};

use super::{run_writing, stop_signal, until_stopped, written, Context, Progress, SessionsArg};

#[derive(clap::Args)]
pub struct SimulateArgs {
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
}

#[derive(clap::Args)]
pub struct PairsArgs {
    /// Study slug.
    #[arg(long)]
    study: String,
    /// Which sessions to score.
    #[arg(long, value_enum, default_value_t = SessionsArg::All)]
    sessions: SessionsArg,
    #[command(flatten)]
    rollouts: RolloutArgs,
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
    /// Judge with this `[[models]]` id of the study's protocol instead of its `[collab]`
    /// judge_model, e.g. to compare two judges on the same sessions (their rollouts and rewards
    /// are stored apart).
    #[arg(long, value_name = "ID")]
    judge_model: Option<String>,
    /// JSONL file to write.
    #[arg(long)]
    out: PathBuf,
}

#[derive(clap::Args)]
pub struct SynthArgs {
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
    #[command(flatten)]
    rollouts: RolloutArgs,
    /// Base of every seed of the run.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// How the multiturn-aware reward rolls a turn's candidates forward, for `pairs`, `synth` and
/// `loop`; each defaults to the protocol's `[collab]` value.
#[derive(clap::Args)]
pub struct RolloutArgs {
    /// Replies compared per turn, in `pairs` the one given included (K >= 2; default: the
    /// protocol's [collab] candidates, 2).
    #[arg(long)]
    candidates: Option<u32>,
    /// Rollouts per candidate (S; default: the protocol's, 3).
    #[arg(long)]
    samples: Option<u32>,
    /// Turn pairs each rollout runs (w; default: the protocol's, 2). 0 scores a candidate in its
    /// context alone: the paper's single-turn ablation (`synth` then asks the simulator for the
    /// next user message).
    #[arg(long)]
    window: Option<u32>,
}

impl RolloutArgs {
    /// The options as they are written on a command line (those given only).
    pub(super) fn to_args(&self) -> Vec<String> {
        [
            ("--candidates", self.candidates),
            ("--samples", self.samples),
            ("--window", self.window),
        ]
        .into_iter()
        .filter_map(|(flag, v)| Some([flag.to_string(), v?.to_string()]))
        .flatten()
        .collect()
    }

    fn overrides(&self) -> MrOverrides {
        MrOverrides {
            candidates: self.candidates,
            samples: self.samples,
            window: self.window,
            ..MrOverrides::default()
        }
    }
}

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct EvalArgs {
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
    #[arg(long, required_unless_present = "power")]
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
    #[arg(long, required_unless_present = "power")]
    out: Option<PathBuf>,
    /// Contrast set whose requests measure how often each arm's first reply asks a question
    /// (ambiguous requests, where asking helps, against clear ones, where it only delays); the
    /// format of `eval reward --contrast` (default: the built-in set).
    #[arg(long)]
    ask_cases: Option<PathBuf>,
    /// First replies per contrast case and arm for that measure, each with its own seed, the
    /// same for every arm; 0 skips it.
    #[arg(long, default_value_t = 1)]
    ask_samples: u32,
    /// Only say how many users per arm a paired difference of this effect size (d_z: the mean
    /// difference over the differences' standard deviation, as the table reports it) needs to be
    /// found with power 0.8 by a two-sided test at α = 0.05, and exit.
    #[arg(long, value_name = "D_Z")]
    power: Option<f64>,
}

#[derive(Subcommand)]
pub enum EvalCommand {
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
    /// Whether the simulated user plays a person as MR assumes, on a contrast set: how often its
    /// first message pastes the hidden intent (should be rare), how often its answer to a
    /// clarifying question adds facts of the intent (should be most), how often it ends the chat
    /// right after a question (rare) or once the text it asked for is delivered (most), and how
    /// long its messages are; each with a 95% interval.
    Simulator {
        /// Protocol whose user simulator is checked.
        #[arg(long, default_value = EXAMPLE_PROTOCOL_PATH)]
        protocol: PathBuf,
        /// Contrast set, as for `eval reward` (its ambiguous and clear cases are used).
        #[arg(long)]
        contrast: Option<PathBuf>,
        /// Simulated messages per case and measure (each with its own seed).
        #[arg(long, default_value_t = 2)]
        samples: u32,
        /// Base of every seed of the check.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Also write the whole report, every message included, as JSON.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// `simulate`: the participants use the same websocket path as people, on a server of their own.
pub fn simulate(ctx: &Context, args: SimulateArgs) -> Result<()> {
    let SimulateArgs {
        protocol,
        arm,
        n,
        concurrency,
        seed,
    } = args;
    let models_dir = &ctx.settings.models_dir;
    let loaded = ctx.load_protocol(&protocol)?;
    let pool = ctx.pool()?;
    ctx.import(
        &mut *pool.get().context("cannot get a database connection")?,
        &loaded,
    )?;
    let engines = Engines::new();
    engines
        .load_protocol(&loaded.protocol, models_dir)
        .with_context(|| format!("cannot start the models of {}", protocol.display()))?;
    let state = AppState::new(pool, engines, models_dir.clone())?;
    let options = collab::simulate::SimulateOptions {
        study: loaded.protocol.study.slug.clone(),
        arm,
        participants: n,
        concurrency,
        seed,
        models_dir: models_dir.clone(),
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

/// `pairs`: each protocol version of the study is scored under its own `[collab]` settings, with
/// the options given replacing them.
pub fn pairs(ctx: &Context, args: PairsArgs) -> Result<()> {
    let PairsArgs {
        study,
        sessions,
        rollouts,
        margin,
        min_gap_se,
        seed,
        judge_model,
        out,
    } = args;
    let mr = MrOverrides {
        margin,
        min_gap_se,
        ..rollouts.overrides()
    };
    mr.check()?;
    let options = collab::pairs::PairsOptions {
        study,
        sessions: sessions.into(),
        mr,
        seed,
        models_dir: ctx.settings.models_dir.clone(),
        judge_model,
    };
    let pool = ctx.pool()?;
    let runtime = ctx.runtime()?;
    let _guard = runtime.enter();
    let bar = Progress::new("scoring turns");
    let engines = Engines::new();
    let progress = bar.counter();
    let job = collab::pairs::run(&pool, &engines, &options, &out, &progress);
    let summary = run_writing(runtime, job, &[&out]);
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

pub fn synth(ctx: &Context, args: SynthArgs) -> Result<()> {
    let SynthArgs {
        tasks,
        n,
        out,
        pairs_out,
        protocol,
        arm,
        turns,
        rollouts,
        seed,
    } = args;
    let overrides = rollouts.overrides();
    overrides.check()?;
    let models_dir = &ctx.settings.models_dir;
    let loaded = ctx.load_protocol(&protocol)?;
    let tasks = collab::synth::read_tasks(&tasks)?;
    let p = &loaded.protocol;
    let arm = match arm {
        Some(id) => p
            .arm(&id)
            .with_context(|| format!("the protocol has no arm {id:?}"))?,
        None => p.arms.first().context("the protocol has no arms")?,
    };
    let mr = overrides.resolve(&p.collab)?;
    let options = collab::synth::SynthOptions {
        conversations: n,
        turns: turns.unwrap_or(p.collab.max_turns).max(1),
        mr,
        seed,
    };
    let runtime = ctx.runtime()?;
    let _guard = runtime.enter();
    let engines = Engines::new();
    let slots = mr.candidates * mr.samples;
    let roles = collab::Roles::start(&engines, p, &loaded.source, models_dir, slots)?;
    let policy = collab::start_policy(&engines, p, arm, models_dir, slots)?;
    let pool = ctx.pool()?;
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
    let summary = run_writing(runtime, job, &outputs);
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

pub fn eval(ctx: &Context, mut args: EvalArgs) -> Result<()> {
    match args.check.take() {
        Some(check @ EvalCommand::Reward { .. }) => eval_reward(ctx, check),
        Some(check @ EvalCommand::Simulator { .. }) => eval_simulator(ctx, check),
        None => eval_arms(ctx, args),
    }
}

/// `eval reward`: the judge and MR on a contrast set.
fn eval_reward(ctx: &Context, check: EvalCommand) -> Result<()> {
    let EvalCommand::Reward {
        protocol,
        contrast,
        samples,
        window,
        seed,
        out,
    } = check
    else {
        unreachable!("eval dispatches by kind");
    };
    let models_dir = &ctx.settings.models_dir;
    let loaded = ctx.load_protocol(&protocol)?;
    let cases = collab::contrast::read_cases(contrast.as_deref())?;
    let p = &loaded.protocol;
    let arm = p.arms.first().context("the protocol has no arms")?;
    let options = collab::contrast::ContrastOptions {
        samples: samples.unwrap_or(p.collab.samples),
        window: window.unwrap_or(p.collab.window),
        seed,
    };
    let runtime = ctx.runtime()?;
    let _guard = runtime.enter();
    let engines = Engines::new();
    let slots = (2 * options.samples).max(2);
    let roles = collab::Roles::start(&engines, p, &loaded.source, models_dir, slots)?;
    let policy = collab::start_policy(&engines, p, arm, models_dir, slots)?;
    let bar = Progress::new("contrast cases");
    let progress = bar.counter();
    let report = runtime.block_on(collab::contrast::run(
        &roles, &policy, &cases, &options, &progress,
    ));
    bar.finish();
    let report = report?;
    print_contrast(&report);
    write_json(out.as_deref(), &report)
}

/// `eval simulator`: the user simulator on a contrast set.
fn eval_simulator(ctx: &Context, check: EvalCommand) -> Result<()> {
    let EvalCommand::Simulator {
        protocol,
        contrast,
        samples,
        seed,
        out,
    } = check
    else {
        unreachable!("eval dispatches by kind");
    };
    if samples == 0 {
        bail!("--samples must be at least 1");
    }
    let loaded = ctx.load_protocol(&protocol)?;
    let cases = collab::contrast::read_cases(contrast.as_deref())?;
    let runtime = ctx.runtime()?;
    let _guard = runtime.enter();
    let engines = Engines::new();
    let slots = u32::try_from(cases.len()).unwrap_or(u32::MAX).clamp(2, 8);
    let roles = collab::Roles::start(
        &engines,
        &loaded.protocol,
        &loaded.source,
        &ctx.settings.models_dir,
        slots,
    )?;
    let bar = Progress::new("simulator steps");
    let progress = bar.counter();
    let report = runtime.block_on(collab::fidelity::run(
        &roles, &cases, samples, seed, &progress,
    ));
    bar.finish();
    let report = report?;
    print_fidelity(&report);
    write_json(out.as_deref(), &report)
}

/// Writes `value` as pretty JSON to `out`, when given, and says where.
fn write_json(out: Option<&std::path::Path>, value: &impl serde::Serialize) -> Result<()> {
    if let Some(out) = out {
        let json = serde_json::to_vec_pretty(value).expect("the report is JSON");
        std::fs::write(out, json).with_context(|| format!("cannot write {}", out.display()))?;
        println!("report: {}", out.display());
    }
    Ok(())
}

fn print_fidelity(report: &collab::fidelity::FidelityReport) {
    let line = |what: &str, r: &collabllm::stats::Rate| {
        println!(
            "{what:<44} {:>3}/{:<3} {:>5.1}%  [{:>5.1}%, {:>5.1}%]",
            r.k,
            r.n,
            r.rate * 100.0,
            r.lo * 100.0,
            r.hi * 100.0
        );
    };
    println!(
        "the simulated user ({}), {} sample(s) a case (95% Wilson intervals)",
        report.simulator_model, report.samples
    );
    line(
        "first message pastes the intent (rare)",
        &report.first_message_leaks,
    );
    line(
        "answer to a question adds its facts (most)",
        &report.answer_carries_intent,
    );
    line(
        "ends the chat right after a question (rare)",
        &report.ends_after_question,
    );
    line(
        "ends the chat once it is delivered (most)",
        &report.ends_when_met,
    );
    if let Some(w) = &report.message_words {
        println!(
            "{:<44} {:>9.1}  [{:.1}, {:.1}]  (n = {})",
            "words a message", w.mean, w.low, w.high, w.n
        );
    }
}

fn eval_arms(ctx: &Context, args: EvalArgs) -> Result<()> {
    if let Some(d_z) = args.power {
        let Some(n) = collabllm::stats::paired_users_needed(d_z) else {
            bail!("--power needs an effect size other than 0, e.g. 0.5");
        };
        println!(
            "a paired difference of effect size d_z = {d_z} needs {n} simulated users per arm \
             (two-sided test at α = 0.05, power 0.8; normal approximation + 1)"
        );
        return Ok(());
    }
    let (Some(users), Some(out)) = (args.users, args.out) else {
        bail!("eval needs --users and --out");
    };
    let models_dir = &ctx.settings.models_dir;
    let loaded = ctx.load_protocol(&args.protocol)?;
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
    let pool = ctx.pool()?;
    let imported = ctx.import(
        &mut *pool.get().context("cannot get a database connection")?,
        &loaded,
    )?;
    let runtime = ctx.runtime()?;
    let _guard = runtime.enter();
    let engines = Engines::new();
    let slots = u32::try_from(options.concurrency).unwrap_or(u32::MAX);
    let roles = collab::Roles::start(&engines, p, &loaded.source, models_dir, slots)?;
    let policies = arm_ids
        .iter()
        .map(|id| {
            let arm = p
                .arm(id)
                .with_context(|| format!("the protocol has no arm {id:?}"))?;
            Ok(collab::start_policy(&engines, p, arm, models_dir, slots)?)
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
    let outcome = until_stopped(runtime, job);
    bar.finish();
    let log = out.join("eval.jsonl");
    let Some(outcome) = outcome else {
        bail!(
            "stopped; the conversations finished so far are in {}: run the same command again to \
             resume",
            log.display()
        );
    };
    let mut outcome =
        outcome.with_context(|| format!("finished conversations are in {}", log.display()))?;
    if args.ask_samples > 0 {
        let cases = collab::contrast::read_cases(args.ask_cases.as_deref())?;
        let bar = Progress::new("first replies");
        let progress = bar.counter();
        let job = collab::asking::first_replies(
            &policies,
            &cases,
            args.ask_samples,
            options.seed,
            options.concurrency,
            &progress,
        );
        let replies = until_stopped(runtime, job);
        bar.finish();
        let Some(replies) = replies else {
            bail!(
                "stopped while measuring first replies; the conversations are in {}: run the \
                 same command again to finish",
                log.display()
            );
        };
        let replies = replies.context("cannot measure how often the arms ask")?;
        let mut log = collab::JsonlWriter::create(&out.join("asking.jsonl"))?;
        for reply in &replies {
            log.write(&serde_json::to_value(reply).expect("a reply is JSON"))?;
        }
        log.finish()?;
        outcome.table.asking = Some(collab::asking::Asking::of(
            &replies,
            &options.baseline,
            args.ask_samples,
        ));
    }
    let provenance = serde_json::json!({
        "protocol": args.protocol.display().to_string(),
        "protocol_sha256": loaded.sha256,
        "tasks": args.tasks.as_ref().map(|t| t.display().to_string()),
        "users": users,
        "max_turns": options.max_turns,
        "seed": options.seed,
        "ask_cases": args.ask_cases.as_ref().map(|c| c.display().to_string()),
        "ask_samples": args.ask_samples,
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
