//! Whether an arm asks when a request leaves something open and writes when it does not: the
//! share of its first replies to a contrast set's ambiguous requests that ask a question, against
//! the same share on its clear requests, where asking only delays the text. The measure reads the
//! replies alone, so it holds whatever the judge makes of them: a trained arm whose rewards came
//! from a judge can be checked by something that is not that judge.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::contrast::Case;
use super::{derive_seed, generate_all, request, CollabError, Policy};
use crate::stats::{estimate, Estimate, Rate};

/// A reply asks when its first question comes before this many words: a question that opens
/// the reply, not the "anything else?" after a draft.
pub const ASK_WITHIN_WORDS: usize = 40;

/// Tokens generated for each reply: enough for [`ASK_WITHIN_WORDS`] words and their question
/// mark; what the reply says after that cannot change the measure.
const REPLY_TOKENS: u32 = 96;

/// Whether `reply` opens with a question (see [`ASK_WITHIN_WORDS`]).
pub fn asks(reply: &str) -> bool {
    reply
        .find('?')
        .is_some_and(|at| reply[..at].split_whitespace().count() < ASK_WITHIN_WORDS)
}

/// The arms' asking, by the contrast set's kinds (`ambiguous`, `clear`, and any other kind the
/// set has).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Asking {
    /// Replies per case and arm, each with its own seed, the same for every arm.
    pub samples: u32,
    /// Arm → kind → the share of first replies that ask.
    pub arms: BTreeMap<String, BTreeMap<String, Rate>>,
    /// Arm → kind → the mean paired difference to the baseline (each case and seed answered by
    /// both), with its 95% bootstrap interval.
    pub diff: BTreeMap<String, BTreeMap<String, Option<Estimate>>>,
}

/// One first reply of one arm.
#[derive(Debug, Clone, Serialize)]
pub struct FirstReply {
    pub arm: String,
    pub case: String,
    pub kind: String,
    pub sample: u32,
    pub asks: bool,
    /// The reply's first tokens (at most [`REPLY_TOKENS`]).
    pub reply: String,
}

/// Every arm's first replies to every case, `samples` each, `concurrency` requests at a time;
/// `progress` hears (replies done, all).
pub async fn first_replies(
    policies: &[Policy],
    cases: &[Case],
    samples: u32,
    seed: u64,
    concurrency: usize,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<Vec<FirstReply>, CollabError> {
    let todo: Vec<(&Policy, &Case, u32)> = policies
        .iter()
        .flat_map(|p| {
            cases
                .iter()
                .flat_map(move |c| (0..samples).map(move |s| (p, c, s)))
        })
        .collect();
    let total = todo.len() as u64;
    let mut replies = Vec::with_capacity(todo.len());
    progress(0, total);
    for chunk in todo.chunks(concurrency.max(1)) {
        // A chunk holds one arm's requests at most where it can: each group goes to one engine.
        let mut by_arm: Vec<(&Policy, Vec<(&Case, u32)>)> = Vec::new();
        for &(policy, case, sample) in chunk {
            match by_arm.last_mut() {
                Some((p, group)) if p.arm.id == policy.arm.id => group.push((case, sample)),
                _ => by_arm.push((policy, vec![(case, sample)])),
            }
        }
        for (policy, group) in by_arm {
            let requests = group
                .iter()
                .map(|(case, sample)| {
                    let mut sampling = policy.arm.sampling.clone();
                    sampling.max_tokens = sampling.max_tokens.min(REPLY_TOKENS);
                    sampling.seed = Some(derive_seed(
                        seed,
                        &["asking", &case.id, &sample.to_string()],
                    ));
                    request(policy.messages(&case.conversation), sampling)
                })
                .collect();
            let who = format!("arm {}", policy.arm.id);
            for ((case, sample), done) in group
                .iter()
                .zip(generate_all(&*policy.engine, &who, requests).await)
            {
                let text = done?.text;
                replies.push(FirstReply {
                    arm: policy.arm.id.clone(),
                    case: case.id.clone(),
                    kind: case.kind.clone(),
                    sample: *sample,
                    asks: asks(&text),
                    reply: text,
                });
            }
            progress(replies.len() as u64, total);
        }
    }
    Ok(replies)
}

impl Asking {
    /// "arm's share vs baseline's share" of the replies to `kind` that ask, or "—" when either
    /// was not measured.
    pub fn versus(&self, kind: &str, arm: &str, baseline: &str) -> String {
        let rate = |arm: &str| {
            let r = self.arms.get(arm)?.get(kind)?;
            Some(format!("{:.0}%", r.rate * 100.0))
        };
        match (rate(arm), rate(baseline)) {
            (Some(a), Some(b)) => format!("{a} vs {b}"),
            _ => "—".to_string(),
        }
    }

    /// The rates of `replies` by arm and kind, and each arm's paired difference to `baseline`.
    pub fn of(replies: &[FirstReply], baseline: &str, samples: u32) -> Self {
        let mut arms: BTreeMap<String, BTreeMap<String, Vec<bool>>> = BTreeMap::new();
        for r in replies {
            arms.entry(r.arm.clone())
                .or_default()
                .entry(r.kind.clone())
                .or_default()
                .push(r.asks);
        }
        let base: BTreeMap<(&str, u32), bool> = replies
            .iter()
            .filter(|r| r.arm == baseline)
            .map(|r| ((r.case.as_str(), r.sample), r.asks))
            .collect();
        let mut diff: BTreeMap<String, BTreeMap<String, Vec<f64>>> = BTreeMap::new();
        for r in replies.iter().filter(|r| r.arm != baseline) {
            if let Some(&b) = base.get(&(r.case.as_str(), r.sample)) {
                diff.entry(r.arm.clone())
                    .or_default()
                    .entry(r.kind.clone())
                    .or_default()
                    .push(f64::from(u8::from(r.asks)) - f64::from(u8::from(b)));
            }
        }
        Asking {
            samples,
            arms: arms
                .into_iter()
                .map(|(arm, kinds)| {
                    let rates = kinds.into_iter().map(|(k, f)| (k, Rate::of(&f))).collect();
                    (arm, rates)
                })
                .collect(),
            diff: diff
                .into_iter()
                .map(|(arm, kinds)| {
                    let diffs = kinds.into_iter().map(|(k, d)| (k, estimate(&d))).collect();
                    (arm, diffs)
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_asks_when_it_opens_with_a_question() {
        assert!(asks("Who is the email for, and what tone do you want?"));
        assert!(asks("Sure. Before I write it: how long should it be?"));
        assert!(!asks("Dear Jo, thank you for the tomatoes."));
        // "Anything else?" after a draft is not asking; a question within the first words is.
        let draft = "word ".repeat(ASK_WITHIN_WORDS - 1);
        assert!(!asks(&format!("{draft}Anything else?")));
        assert!(asks(&format!(
            "{}Anything else?",
            "word ".repeat(ASK_WITHIN_WORDS - 3)
        )));
    }

    fn reply(arm: &str, case: &str, kind: &str, asks: bool) -> FirstReply {
        FirstReply {
            arm: arm.into(),
            case: case.into(),
            kind: kind.into(),
            sample: 0,
            asks,
            reply: String::new(),
        }
    }

    #[test]
    fn rates_are_by_kind_and_differences_pair_the_same_case() {
        let replies = [
            reply("base", "a1", "ambiguous", false),
            reply("base", "a2", "ambiguous", true),
            reply("base", "c1", "clear", false),
            reply("trained", "a1", "ambiguous", true),
            reply("trained", "a2", "ambiguous", true),
            reply("trained", "c1", "clear", true),
        ];
        let asking = Asking::of(&replies, "base", 1);
        let rate = |arm: &str, kind: &str| asking.arms[arm][kind].clone();
        assert_eq!(
            (rate("base", "ambiguous").k, rate("base", "ambiguous").n),
            (1, 2)
        );
        assert_eq!(rate("trained", "clear").k, 1);
        assert!(!asking.diff.contains_key("base"));
        let d = asking.diff["trained"]["ambiguous"].clone().unwrap();
        assert_eq!((d.n, d.mean), (2, 0.5));
        assert_eq!(asking.diff["trained"]["clear"].clone().unwrap().mean, 1.0);
    }
}
