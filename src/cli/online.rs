//! `loop`: online DPO, round after round. Round r simulates participants with the current policy
//! (the arm's model with round r−1's adapter; round 1 the base), scores their turns with MR into
//! pairs, trains an adapter, and evaluates it against the base on the same held-out simulated
//! users every round. Each step of a round is the command of its own (`simulate`, `pairs`,
//! `train dpo`, `eval`), parsed from the command line it prints (and keeps in the round's
//! `commands.txt`) with that command's own defaults, and a finished step is marked done in the
//! round's folder, so a stopped loop resumes where it stopped.
//!
//! Training starts from the base each round, on every pair so far, with the base as the DPO
//! reference: every round's adapter is then a solution of the same objective (the reward's
//! preferences, kept near the one reference), not a drift of references compounding round after
//! round, and a bad round cannot poison the next one's starting point. The cost, retraining on
//! all pairs, is small next to scoring them.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context as _, Result};
use serde_json::{json, Value};

use collabllm::db;
use collabllm::protocol::{LoraSpec, Protocol, EXAMPLE_PROTOCOL_PATH};

use super::collab::{EvalArgs, PairsArgs, RolloutArgs, SimulateArgs};
use super::train::TrainCommand;
use super::Context;

#[derive(clap::Args)]
pub struct LoopArgs {
    /// Protocol whose arm, simulator, judge and [collab] settings the loop uses.
    #[arg(long, env = "COLLABLLM_PROTOCOL", default_value = EXAMPLE_PROTOCOL_PATH)]
    protocol: PathBuf,
    /// The arm whose policy is trained (default: the protocol's first).
    #[arg(long)]
    arm: Option<String>,
    /// Rounds to run (a later run with more rounds goes on from the last one).
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Simulated participants per round, whose turns are scored into pairs.
    #[arg(long, default_value_t = 8)]
    users: usize,
    /// Simulated users of each round's evaluation: the same users (seeds) every round, none of
    /// them a participant whose turns were trained on.
    #[arg(long, default_value_t = 8)]
    eval_users: usize,
    #[command(flatten)]
    rollouts: RolloutArgs,
    /// DPO temperature.
    #[arg(long, default_value_t = 0.1)]
    beta: f64,
    /// Peak learning rate of each round's training.
    #[arg(long, default_value_t = 5e-4)]
    lr: f64,
    /// Epochs over the pairs so far, each round.
    #[arg(long, default_value_t = 2)]
    epochs: usize,
    /// Turns an evaluation conversation may take (default: the protocol's [collab] max_turns).
    #[arg(long)]
    max_turns: Option<u32>,
    /// Base of every seed (simulation, scoring, training, evaluation).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Folder of the run: round-N/ (protocols, pairs, adapter, training log, evaluation) and
    /// report.json and report.md.
    #[arg(long)]
    out: PathBuf,
}

/// The steps of a round, in order; each is marked done by a file of its name in the round's
/// folder.
const STEPS: [&str; 4] = ["simulated", "scored", "trained", "evaluated"];

pub fn run(ctx: &Context, args: LoopArgs) -> Result<()> {
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let loaded = ctx.load_protocol(&args.protocol)?;
    let base = &loaded.protocol;
    let arm = match &args.arm {
        Some(id) => base
            .arm(id)
            .with_context(|| format!("the protocol has no arm {id:?}"))?,
        None => base.arms.first().context("the protocol has no arms")?,
    }
    .clone();
    let id = loop_id(&args.out)?;
    let started = Instant::now();
    let total = args.rounds * STEPS.len();
    // Steps done before (a resumed run) and in this run; the estimate of the time left rests on
    // this run's.
    let (mut done, mut ran) = (0, 0);
    let mut rows = Vec::new();
    for round in 1..=args.rounds {
        let dir = args.out.join(format!("round-{round}"));
        std::fs::create_dir_all(&dir)?;
        let previous = (round > 1).then(|| adapter_of(&args.out, round - 1));
        let previous = previous.filter(|a| a.exists());
        let mut slug = round_study(&dir, &format!("{}-loop-{id}-r{round}", base.study.slug));
        let sample = dir.join("sample.toml");
        let write_sample = |slug: &str| {
            write_protocol(
                &sample,
                &round_protocol(base, slug, &[("policy", &arm, previous.as_deref())]),
            )
        };
        write_sample(&slug)?;
        for step in STEPS {
            let marker = dir.join(step);
            if marker.exists() {
                done += 1;
                continue;
            }
            let left = if ran == 0 {
                String::new()
            } else {
                let per = started.elapsed().as_secs_f64() / ran as f64;
                format!(", about {:.0} min left", per * (total - done) as f64 / 60.0)
            };
            eprintln!("loop: round {round} of {}: {step}{left}", args.rounds);
            match step {
                "simulated" => {
                    if let Some(again) = next_attempt(ctx, &dir, &slug)? {
                        slug = again;
                        write_sample(&slug)?;
                    }
                    simulate(ctx, &args, &sample, round)?
                }
                "scored" => score(ctx, &args, &dir, &slug, round)?,
                "trained" => train(
                    ctx,
                    &args,
                    &sample,
                    &arm.model,
                    &dir,
                    round,
                    previous.as_deref(),
                )?,
                _ => evaluate(ctx, &args, base, &arm, &dir, &id, round)?,
            }
            std::fs::write(&marker, b"")?;
            done += 1;
            ran += 1;
        }
        rows.push(round_row(&dir, round)?);
        write_report(&args, &rows)?;
    }
    let report = args.out.join("report.md");
    println!("report: {}", report.display());
    if let Some(best) = best_round(&rows) {
        println!(
            "best adapter: round {best}; serve it as an arm with\n[[arms.lora]]\nfile = {:?}",
            adapter_of(&args.out, best).display().to_string()
        );
    }
    Ok(())
}

/// A path as a command-line argument.
fn path(p: &Path) -> String {
    p.display().to_string()
}

/// The arguments of the command `name`, parsed from `line` by the command's own definition (its
/// defaults included), after the line is printed and added to the round's `commands.txt`.
fn parse<T: clap::Args>(dir: &Path, name: &str, line: Vec<String>) -> Result<T> {
    #[derive(clap::Parser)]
    struct One<T: clap::Args> {
        #[command(flatten)]
        args: T,
    }
    let parsed: One<T> = parse_line(dir, name, line)?;
    Ok(parsed.args)
}

/// As [`parse`], for a command with subcommands (`train dpo …`).
fn parse_command<T: clap::Subcommand>(dir: &Path, name: &str, line: Vec<String>) -> Result<T> {
    #[derive(clap::Parser)]
    struct One<T: clap::Subcommand> {
        #[command(subcommand)]
        command: T,
    }
    let parsed: One<T> = parse_line(dir, name, line)?;
    Ok(parsed.command)
}

fn parse_line<P: clap::Parser>(dir: &Path, name: &str, line: Vec<String>) -> Result<P> {
    let shown = format!("collabllm {name} {}", line.join(" "));
    eprintln!("loop: {shown}");
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("commands.txt"))?;
    std::io::Write::write_all(&mut log, format!("{shown}\n").as_bytes())?;
    P::try_parse_from(std::iter::once(name.to_string()).chain(line))
        .with_context(|| format!("the loop built a command line that does not parse: {shown}"))
}

/// The run's id, kept in `out/loop.json` so a resumed run names its studies as before.
fn loop_id(out: &Path) -> Result<String> {
    let path = out.join("loop.json");
    if let Ok(text) = std::fs::read_to_string(&path) {
        let value: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not the loop's JSON", path.display()))?;
        if let Some(id) = value["id"].as_str() {
            return Ok(id.to_string());
        }
    }
    let id = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    std::fs::write(&path, serde_json::to_vec_pretty(&json!({"id": id}))?)?;
    Ok(id)
}

fn adapter_of(out: &Path, round: usize) -> PathBuf {
    out.join(format!("round-{round}")).join("adapter.gguf")
}

/// The protocol as the round runs it: its own study, and the given arms (an id, the arm it is a
/// copy of, and the adapter it serves, if any).
fn round_protocol(
    base: &Protocol,
    slug: &str,
    arms: &[(&str, &collabllm::protocol::ArmSpec, Option<&Path>)],
) -> Protocol {
    let mut p = base.clone();
    p.study.slug = slug.to_string();
    p.study.title = format!("{} ({slug})", base.study.title);
    p.arms = arms
        .iter()
        .map(|(id, arm, adapter)| {
            let mut arm = (*arm).clone();
            arm.id = (*id).to_string();
            arm.weight = 1.0;
            arm.quota = None;
            arm.lora = adapter
                .map(|file| LoraSpec {
                    file: file.to_path_buf(),
                    scale: 1.0,
                })
                .into_iter()
                .collect();
            arm
        })
        .collect();
    p
}

fn write_protocol(path: &Path, protocol: &Protocol) -> Result<()> {
    let text = toml::to_string(protocol).context("the protocol cannot be written as TOML")?;
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// The study the round simulates its participants in, kept in the round's `study.txt` once a
/// stopped simulation moved it to a new attempt (see [`next_attempt`]).
fn round_study(dir: &Path, first: &str) -> String {
    std::fs::read_to_string(dir.join("study.txt"))
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| first.to_string())
}

/// A simulation stopped before it finished is run again from its start, in a study of its own
/// (`…-a2`, `…-a3`): with the same seeds, the same participants then draw the same arms and
/// topics and get the same replies as in a loop that never stopped. The stopped attempt's
/// sessions stay in its study, ended as abandoned. `None`: the study has no session yet.
fn next_attempt(ctx: &Context, dir: &Path, slug: &str) -> Result<Option<String>> {
    let mut conn = ctx.conn()?;
    let Some(study) = db::studies::find_by_slug(&mut conn, slug)? else {
        return Ok(None);
    };
    let version = db::studies::current_version(&mut conn, study.id)?;
    let sessions = db::sessions::list_for_version(&mut conn, version.id)?;
    if sessions.is_empty() {
        return Ok(None);
    }
    for session in &sessions {
        db::sessions::abandon(&mut conn, session.id)?;
    }
    let attempt = slug
        .rsplit_once("-a")
        .and_then(|(first, n)| Some((first, n.parse::<u32>().ok()?)));
    let (first, attempt) = attempt.map_or((slug, 2), |(first, n)| (first, n + 1));
    let next = format!("{first}-a{attempt}");
    eprintln!("loop: the simulation in {slug} stopped before it finished; it runs again in {next}");
    std::fs::write(dir.join("study.txt"), &next)?;
    Ok(Some(next))
}

/// Simulates the round's participants.
fn simulate(ctx: &Context, args: &LoopArgs, sample: &Path, round: usize) -> Result<()> {
    let line = vec![
        "--protocol".into(),
        path(sample),
        "--arm".into(),
        "policy".into(),
        "--n".into(),
        args.users.to_string(),
        "--seed".into(),
        round_seed(args.seed, round).to_string(),
    ];
    let dir = sample.parent().unwrap_or(Path::new("."));
    super::collab::simulate(ctx, parse::<SimulateArgs>(dir, "simulate", line)?)
}

/// Seeds of a round, apart from every other round's and from the evaluation's.
fn round_seed(seed: u64, round: usize) -> u64 {
    seed.wrapping_add(1_000_003 * round as u64)
}

/// The round's turns scored with MR into `pairs.jsonl`, and split: every fifth pair is held
/// out of training to measure the adapter on (`heldout.jsonl`), the others go to
/// `train.jsonl`.
fn score(ctx: &Context, args: &LoopArgs, dir: &Path, slug: &str, round: usize) -> Result<()> {
    let pairs = dir.join("pairs.jsonl");
    let mut line = vec![
        "--study".into(),
        slug.to_string(),
        "--sessions".into(),
        "simulated".into(),
        "--seed".into(),
        round_seed(args.seed, round).to_string(),
        "--out".into(),
        path(&pairs),
    ];
    line.extend(args.rollouts.to_args());
    super::collab::pairs(ctx, parse::<PairsArgs>(dir, "pairs", line)?)?;
    let text = std::fs::read_to_string(&pairs).unwrap_or_default();
    let (mut train, mut heldout) = (String::new(), String::new());
    for (i, line) in text.lines().filter(|l| !l.trim().is_empty()).enumerate() {
        let side = if i % 5 == 4 { &mut heldout } else { &mut train };
        side.push_str(line);
        side.push('\n');
    }
    std::fs::write(dir.join("train.jsonl"), train)?;
    std::fs::write(dir.join("heldout.jsonl"), heldout)?;
    Ok(())
}

/// An adapter trained from the base on the training pairs of every round so far, measured on
/// this round's held-out pairs. With no pair yet, the round keeps the previous adapter (or the
/// base).
fn train(
    ctx: &Context,
    args: &LoopArgs,
    sample: &Path,
    model: &str,
    dir: &Path,
    round: usize,
    previous: Option<&Path>,
) -> Result<()> {
    let out = dir.join("adapter.gguf");
    let files: Vec<PathBuf> = (1..=round)
        .map(|r| args.out.join(format!("round-{r}/train.jsonl")))
        .filter(|f| std::fs::metadata(f).is_ok_and(|m| m.len() > 0))
        .collect();
    if files.is_empty() {
        eprintln!("loop: no pairs to train on yet; round {round} keeps the previous policy");
        if let Some(previous) = previous {
            std::fs::copy(previous, &out)?;
        }
        return Ok(());
    }
    let pairs: usize = files
        .iter()
        .map(|f| std::fs::read_to_string(f).map_or(0, |t| t.lines().count()))
        .sum();
    let mut line = vec!["dpo".to_string()];
    for file in &files {
        line.extend(["--pairs".into(), path(file)]);
    }
    // Several optimizer steps an epoch even on the few pairs of the first rounds.
    let grad_accum = (pairs / 4).clamp(1, 8);
    line.extend(["--grad-accum".into(), grad_accum.to_string()]);
    line.extend([
        "--model".into(),
        model.to_string(),
        "--protocol".into(),
        path(sample),
        "--out".into(),
        path(&out),
        "--beta".into(),
        args.beta.to_string(),
        "--lr".into(),
        args.lr.to_string(),
        "--epochs".into(),
        args.epochs.to_string(),
        "--seed".into(),
        round_seed(args.seed, round).to_string(),
    ]);
    let heldout = dir.join("heldout.jsonl");
    if std::fs::metadata(&heldout).is_ok_and(|m| m.len() > 0) {
        line.extend(["--eval".into(), path(&heldout)]);
    }
    if collabllm::train::checkpoint_path(&out).exists() {
        line.push("--resume".into());
    } else if out.exists() {
        line.push("--force".into()); // an adapter of a run stopped before it was marked done
    }
    super::train::train(ctx, parse_command::<TrainCommand>(dir, "train", line)?)
}

/// The base against the round's adapter, on the same held-out simulated users every round.
fn evaluate(
    ctx: &Context,
    args: &LoopArgs,
    base: &Protocol,
    arm: &collabllm::protocol::ArmSpec,
    dir: &Path,
    id: &str,
    round: usize,
) -> Result<()> {
    let adapter = dir.join("adapter.gguf");
    let slug = collabllm::collab::evaluate::loop_eval_slug(&base.study.slug, id, round);
    let trained = adapter.exists().then_some(adapter.as_path());
    let protocol = dir.join("eval.toml");
    write_protocol(
        &protocol,
        &round_protocol(
            base,
            &slug,
            &[("base", arm, None), ("trained", arm, trained)],
        ),
    )?;
    let mut line = vec![
        "--protocol".into(),
        path(&protocol),
        "--arms".into(),
        "base,trained".into(),
        "--baseline".into(),
        "base".into(),
        "--users".into(),
        args.eval_users.to_string(),
        // The evaluation's users are the same every round and none of the training's.
        "--seed".into(),
        args.seed.wrapping_add(7_777_777).to_string(),
        "--out".into(),
        path(&dir.join("eval")),
    ];
    if let Some(turns) = args.max_turns {
        line.extend(["--max-turns".into(), turns.to_string()]);
    }
    super::collab::eval(ctx, parse::<EvalArgs>(dir, "eval", line)?)
}

/// What one round did, read from its files.
fn round_row(dir: &Path, round: usize) -> Result<Value> {
    let pairs: Vec<Value> = std::fs::read_to_string(dir.join("pairs.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let gaps: Vec<f64> = pairs
        .iter()
        .filter_map(|p| Some(p["score_chosen"].as_f64()? - p["score_rejected"].as_f64()?))
        .collect();
    let clear = pairs
        .iter()
        .filter(|p| {
            let gap = p["score_chosen"].as_f64().unwrap_or(0.0)
                - p["score_rejected"].as_f64().unwrap_or(0.0);
            p["metadata"]["gap_se"]
                .as_f64()
                .is_some_and(|se| se > 0.0 && gap >= 2.0 * se)
        })
        .count();
    // The training report without its step-by-step curve.
    let training: Value = std::fs::read_to_string(collabllm::train::report_path(&dir.join("adapter.gguf")))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .map_or(Value::Null, |r| {
            json!({"train": r["train"], "eval": r["eval"], "data": r["data"], "seconds": r["seconds"], "provenance": r["provenance"]})
        });
    let eval: Value = std::fs::read_to_string(dir.join("eval").join("eval.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null);
    Ok(json!({
        "round": round,
        "pairs": pairs.len(),
        "gap": quartiles(gaps),
        "pairs_clear_of_noise": clear,
        "training": training,
        "eval": eval,
    }))
}

/// Minimum, quartiles and maximum, or null for no values.
fn quartiles(mut values: Vec<f64>) -> Value {
    if values.is_empty() {
        return Value::Null;
    }
    values.sort_by(f64::total_cmp);
    let at = |q: f64| values[((values.len() - 1) as f64 * q).round() as usize];
    json!({"min": at(0.0), "q1": at(0.25), "median": at(0.5), "q3": at(0.75), "max": at(1.0)})
}

/// The round whose adapter's paired difference in document quality to the base is highest.
fn best_round(rows: &[Value]) -> Option<usize> {
    rows.iter()
        .filter_map(|r| {
            let diff = diff_of(r, "quality")?["mean"].as_f64()?;
            Some((r["round"].as_u64()? as usize, diff))
        })
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(round, _)| round)
}

/// The trained arm's paired difference to the base in `metric`, from a round's evaluation.
fn diff_of<'a>(row: &'a Value, metric: &str) -> Option<&'a Value> {
    let table = row["eval"].get("table").unwrap_or(&row["eval"]);
    table["diff"]["trained"]
        .get(metric)
        .filter(|v| !v.is_null())
}

fn write_report(args: &LoopArgs, rows: &[Value]) -> Result<()> {
    let report = json!({
        "protocol": args.protocol.display().to_string(),
        "arm": args.arm,
        "users": args.users,
        "eval_users": args.eval_users,
        "beta": args.beta,
        "lr": args.lr,
        "epochs": args.epochs,
        "seed": args.seed,
        "rounds": rows,
    });
    std::fs::write(
        args.out.join("report.json"),
        serde_json::to_vec_pretty(&report)?,
    )?;
    let mut md = String::from(
        "# Online DPO\n\nEach round: simulated participants with the policy so far, their turns \
         scored with MR into pairs, an adapter trained from the base on every pair so far, and the \
         base against it on the same held-out simulated users. Differences are the trained arm's \
         minus the base's over the same users, with 95% bootstrap intervals.\n\n\
         Asks: the share of first replies to the contrast set's ambiguous and clear requests \
         that open with a question, trained vs base (asking should rise on the ambiguous ones, \
         not on the clear ones); a measure that does not rest on the judge.\n\n\
         | round | pairs | gap median [q1, q3] | clear of noise | train loss | reward accuracy \
         (held out) | margin (held out) | Δ quality | Δ ITR | Δ tokens (k) | Δ turns | asks, \
         ambiguous | asks, clear |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let gap = match &r["gap"] {
            Value::Null => "—".to_string(),
            g => format!(
                "{:.3} [{:.3}, {:.3}]",
                g["median"].as_f64().unwrap_or(0.0),
                g["q1"].as_f64().unwrap_or(0.0),
                g["q3"].as_f64().unwrap_or(0.0)
            ),
        };
        let num = |v: &Value, digits: usize| {
            v.as_f64()
                .map_or("—".to_string(), |x| format!("{x:.digits$}"))
        };
        let t = &r["training"];
        let diff = |metric: &str| match diff_of(r, metric) {
            Some(d) => format!(
                "{:+.2} [{:+.2}, {:+.2}]",
                d["mean"].as_f64().unwrap_or(0.0),
                d["lo"].as_f64().unwrap_or(0.0),
                d["hi"].as_f64().unwrap_or(0.0)
            ),
            None => "—".to_string(),
        };
        let asking: Option<collabllm::collab::asking::Asking> =
            serde_json::from_value(r["eval"]["asking"].clone()).ok();
        let asks = |kind: &str| {
            asking
                .as_ref()
                .map_or("—".to_string(), |a| a.versus(kind, "trained", "base"))
        };
        md.push_str(&format!(
            "| {} | {} | {gap} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r["round"],
            r["pairs"],
            r["pairs_clear_of_noise"],
            num(&t["train"]["loss"], 3),
            num(&t["eval"]["reward_accuracy"], 2),
            num(&t["eval"]["margin"], 3),
            diff("quality"),
            diff("itr"),
            diff("tokens_k"),
            diff("turns"),
            asks("ambiguous"),
            asks("clear"),
        ));
    }
    std::fs::write(args.out.join("report.md"), md)?;
    Ok(())
}
