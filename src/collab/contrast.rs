//! `collabllm eval reward`: whether the judge and MR can tell a reply that helps from one that
//! does not. A contrast set pairs, for one request, a reply the method should prefer (on an
//! ambiguous request: the one that asks the question that matters; on a clear one: the one that
//! writes) with one it should not (one that assumes; one that stalls). How often the judge's
//! interactivity and MR side with the expected reply — and how often MR's gap is larger than its
//! own noise — says whether the judge model is good enough to train on its rewards.

use std::collections::BTreeMap;
use std::path::Path;

use futures_util::future::join_all;
use serde::{Deserialize, Serialize};

use super::reward::{rollouts, Candidate, Reward, RolloutKey, Scene};
use super::{derive_seed, judge, CollabError, Goal, Policy, Roles, Task};
use crate::engine::{ChatMessage, Role};
use crate::stats::wilson;

/// Which of a case's two replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    A,
    B,
}

impl Side {
    pub fn other(self) -> Side {
        match self {
            Side::A => Side::B,
            Side::B => Side::A,
        }
    }

    fn index(self) -> usize {
        match self {
            Side::A => 0,
            Side::B => 1,
        }
    }
}

/// One request with two replies and the one the method should prefer.
#[derive(Debug, Clone, Deserialize)]
pub struct Case {
    pub id: String,
    /// `ambiguous` (ask vs assume) or `clear` (write vs stall); reported separately.
    pub kind: String,
    /// The kind of document, as the judge is told.
    pub task: String,
    /// What the simulated user wants, hidden from the assistant.
    pub intent: String,
    /// The conversation before the replies, ending with the user's message.
    pub conversation: Vec<ChatMessage>,
    pub a: String,
    pub b: String,
    pub expected: Side,
}

impl Case {
    pub(super) fn reply(&self, side: Side) -> &str {
        match side {
            Side::A => &self.a,
            Side::B => &self.b,
        }
    }

    /// The task the judge and the simulator are told: the case's kind of document.
    pub(super) fn task(&self) -> Task {
        Task {
            kind: self.task.clone(),
            title: self.task.clone(),
            instructions: String::new(),
        }
    }

    /// What the simulated user pursues: the case's hidden intent.
    pub(super) fn goal(&self) -> Goal {
        Goal {
            intent: self.intent.clone(),
            document: String::new(),
        }
    }
}

/// The contrast set shipped with the platform (`study-protocols/contrast/documents.jsonl`): 30
/// cases, 16 ambiguous requests and 14 clear ones, the expected reply alternating between a and b
/// so a judge that prefers one position agrees half the time.
pub const BUILT_IN: &str = include_str!("../../study-protocols/contrast/documents.jsonl");

/// Reads a contrast set file (none: the built-in one).
pub fn read_cases(path: Option<&Path>) -> Result<Vec<Case>, CollabError> {
    match path {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| CollabError::Invalid(format!("{}: {e}", path.display())))?;
            parse_cases(&path.display().to_string(), &text)
        }
        None => parse_cases("the built-in contrast set", BUILT_IN),
    }
}

/// One JSON case per line; a line that is not a valid case is refused with its `origin:line`.
pub fn parse_cases(origin: &str, text: &str) -> Result<Vec<Case>, CollabError> {
    let mut cases = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let at = format!("{origin}:{}", i + 1);
        if line.trim().is_empty() {
            continue;
        }
        let case: Case = serde_json::from_str(line)
            .map_err(|e| CollabError::Invalid(format!("{at}: not a contrast case: {e}")))?;
        if case.conversation.last().map(|m| m.role) != Some(Role::User) {
            return Err(CollabError::Invalid(format!(
                "{at}: the conversation must end with the user's message"
            )));
        }
        if case.a.trim().is_empty()
            || case.b.trim().is_empty()
            || crate::engine::same_reply(&case.a, &case.b)
        {
            return Err(CollabError::Invalid(format!(
                "{at}: a case needs two different, non-empty replies"
            )));
        }
        cases.push(case);
    }
    if cases.is_empty() {
        return Err(CollabError::Invalid(format!("{origin}: no contrast cases")));
    }
    Ok(cases)
}

/// How a share of cases agreed, with its 95% Wilson interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Agreement {
    pub n: usize,
    pub agree: usize,
    /// Cases where both replies scored the same (counted as not agreeing).
    pub ties: usize,
    pub rate: f64,
    pub lo: f64,
    pub hi: f64,
}

impl Agreement {
    fn of(outcomes: impl IntoIterator<Item = Option<bool>>) -> Self {
        let (mut n, mut agree, mut ties) = (0, 0, 0);
        for o in outcomes {
            n += 1;
            match o {
                Some(true) => agree += 1,
                Some(false) => {}
                None => ties += 1,
            }
        }
        let (lo, hi) = wilson(agree, n);
        Agreement {
            n,
            agree,
            ties,
            rate: if n == 0 { 0.0 } else { agree as f64 / n as f64 },
            lo,
            hi,
        }
    }

    /// Better than a coin: the whole interval is above one half.
    pub fn above_chance(&self) -> bool {
        self.n > 0 && self.lo > 0.5
    }
}

/// MR of both replies of a case.
#[derive(Debug, Clone, Serialize)]
pub struct CaseRewards {
    pub a: Reward,
    pub b: Reward,
    /// MR(expected) − MR(other).
    pub gap: f64,
    /// The gap's noise: the pooled standard deviation of the rollouts over √S.
    pub noise: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct CaseResult {
    pub id: String,
    pub kind: String,
    pub expected: Side,
    /// The judge's interactivity of reply a and reply b.
    pub judge: [f64; 2],
    /// Whether the judge rated the expected reply higher (`None`: the same score).
    pub judge_agrees: Option<bool>,
    pub rewards: Option<CaseRewards>,
    pub mr_agrees: Option<bool>,
    /// Why MR is missing for this case, when a rollout failed.
    pub mr_failure: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ContrastReport {
    pub cases: Vec<CaseResult>,
    pub judge: Agreement,
    pub judge_by_kind: BTreeMap<String, Agreement>,
    /// MR agreement over the cases whose rollouts all succeeded (none when MR was not run).
    pub mr: Option<Agreement>,
    pub mr_by_kind: BTreeMap<String, Agreement>,
    /// Cases whose MR gap, either way, is larger than its noise.
    pub mr_above_noise: Option<Agreement>,
    pub samples: u32,
    pub window: u32,
    pub judge_model: String,
}

impl ContrastReport {
    /// What a researcher should conclude about the judge.
    pub fn verdict(&self) -> String {
        if self.judge.above_chance() {
            format!(
                "the judge ({}) prefers the expected reply more often than chance ({:.0}% \
                 [{:.0}%, {:.0}%]): its interactivity carries signal on this set",
                self.judge_model,
                self.judge.rate * 100.0,
                self.judge.lo * 100.0,
                self.judge.hi * 100.0
            )
        } else {
            format!(
                "the judge ({}) cannot be told from chance on this set ({:.0}% [{:.0}%, {:.0}%] \
                 agreement): rewards scored by it carry little signal. Use a stronger judge: a \
                 remote [[models]] endpoint as the protocol's [collab] judge_model",
                self.judge_model,
                self.judge.rate * 100.0,
                self.judge.lo * 100.0,
                self.judge.hi * 100.0
            )
        }
    }
}

pub struct ContrastOptions {
    /// Rollouts per reply for MR; 0 checks the judge alone.
    pub samples: u32,
    pub window: u32,
    pub seed: u64,
}

/// Judges every case and, with `samples > 0`, computes MR of both replies; `progress` hears
/// (cases done, all).
pub async fn run(
    roles: &Roles,
    policy: &Policy,
    cases: &[Case],
    options: &ContrastOptions,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<ContrastReport, CollabError> {
    let mut results = Vec::with_capacity(cases.len());
    for (done, case) in cases.iter().enumerate() {
        results.push(run_case(roles, policy, case, options).await?);
        progress(done as u64 + 1, cases.len() as u64);
    }
    let by_kind = |pick: &dyn Fn(&CaseResult) -> Option<Option<bool>>| {
        let mut kinds: BTreeMap<String, Vec<Option<bool>>> = BTreeMap::new();
        for r in &results {
            if let Some(o) = pick(r) {
                kinds.entry(r.kind.clone()).or_default().push(o);
            }
        }
        kinds
            .into_iter()
            .map(|(k, v)| (k, Agreement::of(v)))
            .collect::<BTreeMap<_, _>>()
    };
    let scored: Vec<&CaseResult> = results.iter().filter(|r| r.rewards.is_some()).collect();
    let ran_mr = options.samples > 0;
    Ok(ContrastReport {
        judge: Agreement::of(results.iter().map(|r| r.judge_agrees)),
        judge_by_kind: by_kind(&|r| Some(r.judge_agrees)),
        mr: ran_mr.then(|| Agreement::of(scored.iter().map(|r| r.mr_agrees))),
        mr_by_kind: by_kind(&|r| r.rewards.as_ref().map(|_| r.mr_agrees)),
        mr_above_noise: ran_mr.then(|| {
            Agreement::of(
                scored
                    .iter()
                    .filter_map(|r| r.rewards.as_ref())
                    .map(|w| Some(w.gap.abs() > w.noise)),
            )
        }),
        samples: options.samples,
        window: options.window,
        judge_model: roles.judge.fingerprint(),
        cases: results,
    })
}

/// Higher is what the case expects: `Some(true)`; the same score: `None`.
fn agrees(expected: f64, other: f64) -> Option<bool> {
    (expected != other).then_some(expected > other)
}

async fn run_case(
    roles: &Roles,
    policy: &Policy,
    case: &Case,
    options: &ContrastOptions,
) -> Result<CaseResult, CollabError> {
    let task = case.task();
    let judged = [Side::A, Side::B].map(|side| {
        let mut conversation = case.conversation.clone();
        conversation.push(ChatMessage::new(Role::Assistant, case.reply(side)));
        conversation
    });
    let from = case.conversation.len();
    let seed = derive_seed(options.seed, &[&case.id, "judge"]);
    let scores = join_all(
        judged
            .iter()
            .map(|c| judge::interactivity(roles, &task, c, from, seed)),
    )
    .await;
    let mut judge = [0.0; 2];
    for (slot, score) in judge.iter_mut().zip(scores) {
        *slot = score?.0;
    }
    let (expected, other) = (case.expected.index(), case.expected.other().index());
    let mut result = CaseResult {
        id: case.id.clone(),
        kind: case.kind.clone(),
        expected: case.expected,
        judge,
        judge_agrees: agrees(judge[expected], judge[other]),
        rewards: None,
        mr_agrees: None,
        mr_failure: None,
    };
    if options.samples == 0 {
        return Ok(result);
    }
    let goal = case.goal();
    let scene = Scene {
        roles,
        policy,
        task: &task,
        goal: &goal,
        context: &case.conversation,
        keep_document: false,
    };
    let candidates = [Side::A, Side::B].map(|side| Candidate {
        text: case.reply(side).to_string(),
        tokens: super::estimated_tokens(case.reply(side)),
    });
    let keys: Vec<RolloutKey> = (0..2)
        .flat_map(|candidate| {
            (0..options.samples as usize).map(move |sample| RolloutKey {
                base_seed: options.seed,
                context: case.id.clone(),
                candidate,
                sample,
            })
        })
        .collect();
    let mut per_candidate: [Vec<(f64, super::reward::Metrics)>; 2] = [Vec::new(), Vec::new()];
    for (key, rollout) in keys
        .iter()
        .zip(rollouts(&scene, &candidates, &keys, options.window).await)
    {
        match rollout {
            Ok(r) => per_candidate[key.candidate].push((r.score, r.metrics)),
            Err(e) if e.is_local() => {
                tracing::warn!(case = %case.id, error = %e, "a rollout failed; the case has no MR");
                result.mr_failure = Some(e.to_string());
                return Ok(result);
            }
            Err(e) => return Err(e),
        }
    }
    let [a, b] = per_candidate.map(|r| Reward::of(&r));
    let rewards = [&a, &b];
    let gap = rewards[expected].mr - rewards[other].mr;
    let noise = ((a.std * a.std + b.std * b.std) / 2.0).sqrt() / f64::from(options.samples).sqrt();
    result.mr_agrees = agrees(rewards[expected].mr, rewards[other].mr);
    result.rewards = Some(CaseRewards { a, b, gap, noise });
    Ok(result)
}
