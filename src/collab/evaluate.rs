//! `collabllm eval`: the paper's evaluation of arms with simulated users. Every arm meets the same
//! users — user i gets task i (cycling through the tasks) and the same seeds in every arm — whose
//! conversations run on the MR machinery: the simulator opens, the arm replies, and that reply is
//! rolled forward to the end of the conversation (one rollout of up to `max_turns` turns). Each
//! conversation gets the paper's metrics: document BLEU (with a goal document), assistant tokens,
//! interactivity (ITR, the judge's 0–1 × 100), document quality (the judge's 1–10) and turns; each
//! arm their means with 95% bootstrap intervals and the paired difference to the baseline.
//! Finished conversations are appended to `eval.jsonl` as they end, so a stopped run resumes.

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::reward::{rollouts, Candidate, RolloutKey, Scene};
use super::{derive_seed, judge, simulator, CollabError, Goal, Policy, Roles, Task};
use crate::engine::{ChatMessage, Role};
use crate::export::neutralise;
use crate::protocol::{sha256_hex, Protocol};
use crate::results::charts::{fmt_interval, EvaluationView, ResultRow, RoundView};
use crate::stats::estimate;
use crate::study::Studio;

/// One simulated user's task and what they want.
#[derive(Debug, Clone)]
pub struct EvalTask {
    pub id: String,
    pub task: Task,
    pub goal: Goal,
    /// The protocol's (task, topic) ids, when the task is one of the protocol's.
    pub protocol_task: Option<(String, String)>,
}

/// The protocol's own topics: the task, and the topic's hidden intent as the goal (no goal
/// document, so no BLEU).
pub fn protocol_tasks(protocol: &Protocol) -> Vec<EvalTask> {
    protocol
        .tasks
        .iter()
        .flat_map(|t| {
            t.topics.iter().map(move |topic| EvalTask {
                id: format!("{}/{}", t.id, topic.id),
                task: Task::of(t, topic),
                goal: Goal {
                    intent: topic.hidden_intent.clone(),
                    document: String::new(),
                },
                protocol_task: Some((t.id.clone(), topic.id.clone())),
            })
        })
        .collect()
}

/// Held-out tasks from a file in `synth`'s format (`prompt`, `reference`): BLEU against the
/// reference.
pub fn file_tasks(path: &Path) -> Result<Vec<EvalTask>, CollabError> {
    Ok(super::synth::read_tasks(path)?
        .iter()
        .enumerate()
        .map(|(i, spec)| {
            let (task, goal) = spec.task_and_goal();
            EvalTask {
                id: spec.id.clone().unwrap_or_else(|| format!("task-{i}")),
                task,
                goal,
                protocol_task: None,
            }
        })
        .collect())
}

pub struct EvalOptions {
    pub users: usize,
    pub max_turns: u32,
    pub seed: u64,
    pub baseline: String,
    /// Conversations in flight at once.
    pub concurrency: usize,
}

/// The metrics of one conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    pub arm: String,
    pub user: usize,
    pub task: String,
    pub bleu: Option<f64>,
    pub tokens_k: f64,
    pub itr: f64,
    pub quality: f64,
    pub turns: f64,
    /// The public id of the simulated session the conversation is recorded as.
    #[serde(default)]
    pub session: Option<String>,
}

/// Where conversations are recorded as simulated sessions: the study they evaluate.
#[derive(Clone, Copy)]
pub struct Record<'a> {
    pub studio: &'a Arc<Studio>,
    pub study: &'a str,
}

/// The metrics reported per arm, in the paper's order.
pub const METRICS: [&str; 5] = ["bleu", "tokens_k", "itr", "quality", "turns"];

/// How a metric is headed in tables.
pub fn metric_label(name: &str) -> &'static str {
    match name {
        "bleu" => "BLEU",
        "tokens_k" => "tokens (k)",
        "itr" => "ITR",
        "quality" => "quality (1–10)",
        "turns" => "turns",
        _ => "?",
    }
}

impl Row {
    pub fn metric(&self, name: &str) -> Option<f64> {
        match name {
            "bleu" => self.bleu,
            "tokens_k" => Some(self.tokens_k),
            "itr" => Some(self.itr),
            "quality" => Some(self.quality),
            "turns" => Some(self.turns),
            _ => None,
        }
    }
}

/// sha256 of what shapes a conversation (the rollout identity the pairs use too, which includes
/// the document limit the simulator and judge read); rows of another configuration are not resumed.
fn config_sha256(roles: &Roles, policy: &Policy, task: &EvalTask, options: &EvalOptions) -> String {
    let config = json!({
        "seed": options.seed,
        "max_turns": options.max_turns,
        "task": [task.id, task.task.instructions, task.goal.intent, task.goal.document],
        "rollout": super::rollout_identity(roles, policy),
    });
    sha256_hex(config.to_string().as_bytes())
}

/// Runs one simulated user's whole conversation with `policy`.
async fn converse(
    roles: &Roles,
    policy: &Policy,
    t: &EvalTask,
    user: usize,
    options: &EvalOptions,
) -> Result<(Row, Vec<ChatMessage>, String), CollabError> {
    let label = format!("user-{user}");
    // Seeds depend on the user, not the arm: every arm meets the same simulated users.
    let opening = simulator::next_message(
        roles,
        &t.task,
        &t.goal,
        &[],
        simulator::Draft::Skip,
        derive_seed(options.seed, &[&label, "opening"]),
    )
    .await?;
    let context = vec![ChatMessage::new(Role::User, opening.response)];
    let mut sampling = policy.arm.sampling.clone();
    sampling.seed = Some(derive_seed(options.seed, &[&label, "reply"]));
    let first = super::generate_all(
        &*policy.engine,
        "policy",
        vec![super::request(policy.messages(&context), sampling)],
    )
    .await
    .pop()
    .expect("one request, one completion")?;
    let candidate = Candidate {
        text: first.text,
        tokens: first.generated_tokens,
    };
    let scene = Scene {
        roles,
        policy,
        task: &t.task,
        goal: &t.goal,
        context: &context,
        keep_document: true,
    };
    let key = RolloutKey {
        base_seed: options.seed,
        context: label.clone(),
        candidate: 0,
        sample: 0,
    };
    let window = options.max_turns.saturating_sub(1);
    let rollout = rollouts(&scene, &[candidate], std::slice::from_ref(&key), window)
        .await
        .pop()
        .expect("one key, one rollout")?;
    let quality = match rollout.metrics.quality {
        Some(q) => q,
        None => {
            let seed = derive_seed(options.seed, &[&label, "quality"]);
            judge::quality(roles, &t.task, &rollout.document, seed).await? as f64
        }
    };
    let turns = rollout
        .continuation
        .iter()
        .filter(|m| m.role == Role::Assistant)
        .count();
    let row = Row {
        arm: policy.arm.id.clone(),
        user,
        task: t.id.clone(),
        bleu: rollout.metrics.bleu,
        tokens_k: rollout.metrics.tokens_k,
        itr: rollout.metrics.interactivity * 100.0,
        quality,
        turns: turns as f64,
        session: None,
    };
    let mut transcript = context;
    transcript.extend(rollout.continuation);
    Ok((row, transcript, rollout.document))
}

/// The conversations finished so far, one JSON line each, flushed as each ends.
struct AppendLog {
    path: PathBuf,
    file: std::fs::File,
}

impl AppendLog {
    fn open(path: &Path) -> Result<Self, CollabError> {
        let failed = |source| CollabError::Write {
            path: path.display().to_string(),
            source,
        };
        // A line cut by a crash is ended, so the next row starts on a line of its own.
        let cut = std::fs::read(path).is_ok_and(|b| b.last().is_some_and(|&c| c != b'\n'));
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(failed)?;
        if cut {
            file.write_all(b"\n").map_err(failed)?;
        }
        Ok(AppendLog {
            path: path.to_path_buf(),
            file,
        })
    }

    fn write(&mut self, row: &Value) -> Result<(), CollabError> {
        let mut line = serde_json::to_vec(row).expect("a row is JSON");
        line.push(b'\n');
        self.file
            .write_all(&line)
            .and_then(|()| self.file.sync_data())
            .map_err(|source| CollabError::Write {
                path: self.path.display().to_string(),
                source,
            })
    }
}

/// A line of `eval.jsonl`: a conversation's row and the configuration it was made under.
#[derive(Serialize, Deserialize)]
struct Logged {
    #[serde(flatten)]
    row: Row,
    config_sha256: String,
}

/// Rows of an earlier run in `path`, with the configuration each was made under.
fn resumed(path: &Path) -> Result<Vec<(String, Row)>, CollabError> {
    let Ok(file) = std::fs::File::open(path) else {
        return Ok(Vec::new());
    };
    let mut rows = Vec::new();
    for line in std::io::BufReader::new(file).lines() {
        let line = line.map_err(|e| CollabError::Invalid(format!("{}: {e}", path.display())))?;
        // A line cut by a crash does not parse: that conversation is run again.
        if let Ok(logged) = serde_json::from_str::<Logged>(&line) {
            rows.push((logged.config_sha256, logged.row));
        }
    }
    Ok(rows)
}

/// Every arm's conversations, resumed from and appended to `dir/eval.jsonl`, each recorded as a
/// simulated session of the study when `record` says where; `progress` hears (conversations
/// done, all). Conversations that fail are logged and left out.
pub async fn run(
    roles: &Roles,
    policies: &[Policy],
    tasks: &[EvalTask],
    options: &EvalOptions,
    dir: &Path,
    record: Option<Record<'_>>,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<EvalOutcome, CollabError> {
    if tasks.is_empty() || policies.is_empty() || options.users == 0 {
        return Err(CollabError::Invalid(
            "an evaluation needs tasks, arms and at least one user".into(),
        ));
    }
    std::fs::create_dir_all(dir).map_err(|source| CollabError::Write {
        path: dir.display().to_string(),
        source,
    })?;
    let log = dir.join("eval.jsonl");
    let earlier = resumed(&log)?;
    let mut writer = AppendLog::open(&log)?;
    let mut rows = Vec::new();
    let mut failed = Vec::new();
    let mut todo = Vec::new();
    for policy in policies {
        for user in 0..options.users {
            let t = &tasks[user % tasks.len()];
            let config = config_sha256(roles, policy, t, options);
            match earlier
                .iter()
                .find(|(c, r)| *c == config && r.arm == policy.arm.id && r.user == user)
            {
                Some((_, row)) => rows.push(row.clone()),
                None => todo.push((policy, user, t, config)),
            }
        }
    }
    let total = (policies.len() * options.users) as u64;
    progress(rows.len() as u64, total);
    for chunk in todo.chunks(options.concurrency.max(1)) {
        let results = futures_util::future::join_all(
            chunk
                .iter()
                .map(|(policy, user, t, _)| converse(roles, policy, t, *user, options)),
        )
        .await;
        for ((policy, user, t, config), result) in chunk.iter().zip(results) {
            match result {
                Ok((mut row, transcript, document)) => {
                    if let Some(r) = record {
                        let session = r
                            .studio
                            .record_simulated(
                                r.study.to_string(),
                                policy.arm.id.clone(),
                                t.protocol_task.clone(),
                                transcript,
                                document,
                            )
                            .await
                            .map_err(|e| {
                                CollabError::Invalid(format!(
                                    "cannot record the conversation of {} user {user}: {e}",
                                    policy.arm.id
                                ))
                            })?;
                        row.session = Some(session.public_id);
                    }
                    let logged = Logged {
                        row,
                        config_sha256: config.clone(),
                    };
                    writer.write(&serde_json::to_value(&logged).expect("a row is JSON"))?;
                    rows.push(logged.row);
                }
                Err(e) if e.is_local() => {
                    tracing::warn!(arm = %policy.arm.id, user, error = %e, "a conversation failed; left out");
                    failed.push(format!("{} user {user}: {e}", policy.arm.id));
                }
                Err(e) => return Err(e),
            }
            progress(rows.len() as u64 + failed.len() as u64, total);
        }
    }
    rows.sort_by(|a, b| {
        (arm_rank(policies, &a.arm), a.user).cmp(&(arm_rank(policies, &b.arm), b.user))
    });
    let table = Table::of(policies, &rows, &options.baseline);
    Ok(EvalOutcome {
        table,
        rows,
        failed,
        log,
    })
}

fn arm_rank(policies: &[Policy], arm: &str) -> usize {
    policies
        .iter()
        .position(|p| p.arm.id == arm)
        .unwrap_or(usize::MAX)
}

pub struct EvalOutcome {
    pub table: Table,
    pub rows: Vec<Row>,
    pub failed: Vec<String>,
    /// Where every finished conversation is kept.
    pub log: PathBuf,
}

/// A mean with its 95% bootstrap interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    pub n: usize,
    pub mean: f64,
    pub lo: f64,
    pub hi: f64,
}

fn interval(values: &[f64]) -> Option<Interval> {
    estimate(values).map(|e| Interval {
        n: e.n,
        mean: e.mean,
        lo: e.low,
        hi: e.high,
    })
}

/// The console's view of a stored evaluation; its table is JSON that `collabllm eval` wrote.
pub fn view(stored: &crate::db::models::Evaluation) -> Result<EvaluationView, serde_json::Error> {
    let table: Table = serde_json::from_str(&stored.table_json)?;
    let cell = |i: Option<&Option<Interval>>| match i.copied().flatten() {
        Some(i) => fmt_interval(i.mean, i.lo, i.hi),
        None => "—".to_string(),
    };
    let cells = |m: &BTreeMap<String, Option<Interval>>| {
        METRICS.iter().map(|k| cell(m.get(*k))).collect::<Vec<_>>()
    };
    Ok(EvaluationView {
        when: stored.created_at.format("%Y-%m-%d %H:%M UTC").to_string(),
        users: stored.users,
        headers: METRICS.iter().map(|m| metric_label(m)).collect(),
        rows: table
            .order
            .iter()
            .filter_map(|arm| {
                let row = table.arms.get(arm)?;
                Some(ResultRow {
                    arm: arm.clone(),
                    n: row.n,
                    cells: cells(&row.metrics),
                })
            })
            .collect(),
        diffs: table
            .order
            .iter()
            .filter_map(|arm| Some((arm.clone(), cells(table.diff.get(arm)?))))
            .collect(),
        baseline: table.baseline,
    })
}

/// The study under which `collabllm loop` evaluates round `round` of its run `run` of the study
/// `base`.
pub fn loop_eval_slug(base: &str, run: &str, round: usize) -> String {
    format!("{base}-loop-{run}-eval-r{round}")
}

/// The run and round of a study named by [`loop_eval_slug`] for `base`, if `slug` is one.
pub fn loop_round_of(base: &str, slug: &str) -> Option<(String, u32)> {
    let rest = slug.strip_prefix(base)?.strip_prefix("-loop-")?;
    let (run, round) = rest.rsplit_once("-eval-r")?;
    let round = round.parse().ok()?;
    // A run's id is a word of letters and digits, so a study of another base is never taken.
    (!run.is_empty() && run.chars().all(|c| c.is_ascii_alphanumeric()))
        .then(|| (run.to_string(), round))
}

/// The console's row of one loop round, from its evaluation: the trained arm against the base.
pub fn round_view(
    run: String,
    round: u32,
    slug: String,
    stored: &crate::db::models::Evaluation,
) -> Result<RoundView, serde_json::Error> {
    let table: Table = serde_json::from_str(&stored.table_json)?;
    let diff = table.diff.get("trained");
    let cells = METRICS
        .iter()
        .map(|m| match diff.and_then(|d| d.get(*m)).copied().flatten() {
            Some(i) => fmt_interval(i.mean, i.lo, i.hi),
            None => "—".to_string(),
        })
        .collect();
    let asks = |kind: &str| {
        table
            .asking
            .as_ref()
            .map_or("—".to_string(), |a| a.versus(kind, "trained", "base"))
    };
    Ok(RoundView {
        run,
        round,
        slug,
        users: stored.users,
        cells,
        asks_ambiguous: asks("ambiguous"),
        asks_clear: asks("clear"),
    })
}

/// The paper's table: each arm's metrics, and each arm's paired difference to the baseline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Table {
    pub baseline: String,
    pub arms: BTreeMap<String, ArmRow>,
    /// Arm order as in the protocol.
    pub order: Vec<String>,
    /// Arm → metric → mean difference (arm − baseline) over the users both have, with its
    /// interval.
    pub diff: BTreeMap<String, BTreeMap<String, Option<Interval>>>,
    /// Arm → metric → the paired test of that difference (absent from tables stored before it).
    #[serde(default)]
    pub tests: BTreeMap<String, BTreeMap<String, Option<PairedTest>>>,
    /// How often each arm's first reply asks, on ambiguous and on clear requests (absent when
    /// not measured).
    #[serde(default)]
    pub asking: Option<super::asking::Asking>,
}

/// The paired test of an arm against the baseline in one metric, over the users both have.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PairedTest {
    pub n: usize,
    /// Two-sided p-value of the sign-flip permutation test ([`crate::stats::sign_flip_p`]).
    pub p: f64,
    /// `p` adjusted by Holm's method across the arms compared with the baseline in this metric.
    pub p_holm: f64,
    /// The effect size d_z: the mean difference over the differences' standard deviation.
    pub effect_size: Option<f64>,
    /// Users per arm an effect of this size needs for power 0.8 at α = 0.05.
    pub users_needed: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArmRow {
    pub n: usize,
    #[serde(flatten)]
    pub metrics: BTreeMap<String, Option<Interval>>,
}

impl Table {
    fn of(policies: &[Policy], rows: &[Row], baseline: &str) -> Self {
        fn of_arm<'a>(rows: &'a [Row], arm: &'a str) -> impl Iterator<Item = &'a Row> {
            rows.iter().filter(move |r| r.arm == arm)
        }
        let mut arms = BTreeMap::new();
        let mut diff = BTreeMap::new();
        let mut tests: BTreeMap<String, BTreeMap<String, Option<PairedTest>>> = BTreeMap::new();
        let base: BTreeMap<usize, &Row> = of_arm(rows, baseline).map(|r| (r.user, r)).collect();
        for p in policies {
            let arm = &p.arm.id;
            let metrics = METRICS
                .iter()
                .map(|m| {
                    let values: Vec<f64> = of_arm(rows, arm).filter_map(|r| r.metric(m)).collect();
                    (m.to_string(), interval(&values))
                })
                .collect();
            arms.insert(
                arm.clone(),
                ArmRow {
                    n: of_arm(rows, arm).count(),
                    metrics,
                },
            );
            if arm != baseline {
                let mut paired = BTreeMap::new();
                let mut tested = BTreeMap::new();
                for m in METRICS {
                    let values: Vec<f64> = of_arm(rows, arm)
                        .filter_map(|r| Some(r.metric(m)? - base.get(&r.user)?.metric(m)?))
                        .collect();
                    paired.insert(m.to_string(), interval(&values));
                    let test = crate::stats::sign_flip_p(&values).map(|p| {
                        let effect_size = crate::stats::paired_effect_size(&values);
                        PairedTest {
                            n: values.len(),
                            p,
                            p_holm: p,
                            effect_size,
                            users_needed: effect_size.and_then(crate::stats::paired_users_needed),
                        }
                    });
                    tested.insert(m.to_string(), test);
                }
                diff.insert(arm.clone(), paired);
                tests.insert(arm.clone(), tested);
            }
        }
        // Holm across the arms compared with the baseline, metric by metric.
        for m in METRICS {
            let family: Vec<(String, f64)> = tests
                .iter()
                .filter_map(|(arm, t)| Some((arm.clone(), t.get(m)?.as_ref()?.p)))
                .collect();
            let ps: Vec<f64> = family.iter().map(|(_, p)| *p).collect();
            for ((arm, _), adjusted) in family.iter().zip(crate::stats::holm(&ps)) {
                if let Some(Some(t)) = tests.get_mut(arm).and_then(|t| t.get_mut(m)) {
                    t.p_holm = adjusted;
                }
            }
        }
        Table {
            baseline: baseline.to_string(),
            arms,
            order: policies.iter().map(|p| p.arm.id.clone()).collect(),
            diff,
            tests,
            asking: None,
        }
    }
}

impl std::fmt::Display for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let cell = |i: &Option<Interval>| match i {
            Some(i) => format!("{:.2} [{:.2}, {:.2}]", i.mean, i.lo, i.hi),
            None => "–".to_string(),
        };
        write!(f, "{:<14} {:>4}", "arm", "n")?;
        for m in METRICS {
            write!(f, " {m:>24}")?;
        }
        writeln!(f)?;
        for arm in &self.order {
            let row = &self.arms[arm];
            write!(f, "{arm:<14} {:>4}", row.n)?;
            for m in METRICS {
                write!(f, " {:>24}", cell(&row.metrics[m]))?;
            }
            writeln!(f)?;
        }
        for (arm, metrics) in self
            .order
            .iter()
            .filter_map(|a| Some((a, self.diff.get(a)?)))
        {
            write!(f, "{:<19}", format!("{arm} − {}", self.baseline))?;
            for m in METRICS {
                write!(f, " {:>24}", cell(&metrics[m]))?;
            }
            writeln!(f)?;
            let tests = self.tests.get(arm);
            let test = |m: &str| tests.and_then(|t| t.get(m).copied().flatten());
            write!(f, "{:<19}", "  p (Holm)")?;
            for m in METRICS {
                let text =
                    test(m).map_or("–".into(), |t| format!("{:.3} ({:.3})", t.p, t.p_holm));
                write!(f, " {text:>24}")?;
            }
            writeln!(f)?;
            write!(f, "{:<19}", "  d_z, users for 80%")?;
            for m in METRICS {
                let text =
                    test(m).map_or("–".into(), |t| match (t.effect_size, t.users_needed) {
                        (Some(d), Some(n)) => format!("{d:+.2}, {n}"),
                        _ => "–".into(),
                    });
                write!(f, " {text:>24}")?;
            }
            writeln!(f)?;
        }
        writeln!(
            f,
            "p: two-sided paired sign-flip permutation test; Holm across the arms; d_z: mean \
             difference / its standard deviation; users for 80%: per arm, for power 0.8 at α 0.05"
        )?;
        if let Some(asking) = &self.asking {
            write_asking(f, asking, &self.order, &self.baseline)?;
        }
        Ok(())
    }
}

/// The asking table: per arm and kind, the share of first replies that ask, and the paired
/// difference to the baseline.
fn write_asking(
    f: &mut std::fmt::Formatter<'_>,
    asking: &super::asking::Asking,
    order: &[String],
    baseline: &str,
) -> std::fmt::Result {
    let kinds: std::collections::BTreeSet<&String> =
        asking.arms.values().flat_map(|k| k.keys()).collect();
    writeln!(
        f,
        "\nfirst replies that ask a question ({} a case; % [95% Wilson interval]; − {baseline}: \
         paired difference in points [95% bootstrap])",
        asking.samples
    )?;
    write!(f, "{:<19}", "arm")?;
    for kind in &kinds {
        write!(f, " {kind:>24}")?;
    }
    writeln!(f)?;
    for arm in order {
        let Some(rates) = asking.arms.get(arm) else {
            continue;
        };
        write!(f, "{arm:<19}")?;
        for kind in &kinds {
            let text = rates.get(*kind).map_or("–".into(), |r| {
                format!(
                    "{:.0}% [{:.0}, {:.0}]",
                    r.rate * 100.0,
                    r.lo * 100.0,
                    r.hi * 100.0
                )
            });
            write!(f, " {text:>24}")?;
        }
        writeln!(f)?;
        if let Some(diffs) = asking.diff.get(arm) {
            write!(f, "{:<19}", format!("  − {baseline}"))?;
            for kind in &kinds {
                let text = diffs.get(*kind).cloned().flatten().map_or("–".into(), |d| {
                    format!(
                        "{:+.0} [{:+.0}, {:+.0}]",
                        d.mean * 100.0,
                        d.low * 100.0,
                        d.high * 100.0
                    )
                });
                write!(f, " {text:>24}")?;
            }
            writeln!(f)?;
        }
    }
    Ok(())
}

/// Writes `eval.json` (the table and provenance) and `eval.csv` (arm, user, metric, value).
pub fn write_outputs(
    dir: &Path,
    outcome: &EvalOutcome,
    provenance: Value,
) -> Result<(PathBuf, PathBuf), CollabError> {
    let write = |path: &Path, bytes: &[u8]| {
        std::fs::write(path, bytes).map_err(|source| CollabError::Write {
            path: path.display().to_string(),
            source,
        })
    };
    let json_path = dir.join("eval.json");
    let table = &outcome.table;
    let document = json!({
        "arms": table.arms,
        "baseline": table.baseline,
        "diff": table.diff,
        "tests": table.tests,
        "asking": table.asking,
        "failed": outcome.failed,
        "provenance": provenance,
    });
    write(
        &json_path,
        &serde_json::to_vec_pretty(&document).expect("JSON"),
    )?;
    let csv_path = dir.join("eval.csv");
    let csv_error = |e: csv::Error| CollabError::Write {
        path: csv_path.display().to_string(),
        source: e.into(),
    };
    let mut csv = csv::Writer::from_path(&csv_path).map_err(csv_error)?;
    csv.write_record(["arm", "user", "task", "metric", "value"])
        .map_err(csv_error)?;
    let mut seen = HashSet::new();
    for r in &outcome.rows {
        if !seen.insert((r.arm.clone(), r.user)) {
            continue;
        }
        for m in METRICS {
            let value = r.metric(m).map(|v| v.to_string()).unwrap_or_default();
            csv.write_record([
                neutralise(&r.arm).as_ref(),
                &r.user.to_string(),
                neutralise(&r.task).as_ref(),
                m,
                &value,
            ])
            .map_err(csv_error)?;
        }
    }
    csv.flush().map_err(|e| CollabError::Write {
        path: csv_path.display().to_string(),
        source: e,
    })?;
    Ok((json_path, csv_path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loop_round_is_found_by_its_study_name_and_only_for_its_base() {
        let slug = loop_eval_slug("pilot", "3fa2b9c1", 2);
        assert_eq!(loop_round_of("pilot", &slug), Some(("3fa2b9c1".into(), 2)));
        // A study of the base "pilot-loop-x" is not a round of "pilot".
        let other = loop_eval_slug("pilot-loop-x", "3fa2b9c1", 1);
        assert_eq!(loop_round_of("pilot", &other), None);
        assert_eq!(loop_round_of("pilot-2", &slug), None);
        assert_eq!(loop_round_of("pilot", "pilot-loop-3fa2b9c1-r1"), None);
        assert_eq!(loop_round_of("pilot", "pilot-loop-3fa2b9c1-eval-rx"), None);
    }
}
