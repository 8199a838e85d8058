//! The multiturn-aware reward. A candidate reply `c` in context `H` is worth how the conversation
//! goes after it: `H + c` is copied S times, each copy rolled forward w turn pairs (the simulator
//! as the user, the arm's policy as the assistant, stopping early at the simulator's marker), each
//! rollout scored as Σ weight · metric, and MR is the mean over the copies (with the population
//! standard deviation). The rollouts of all candidates of a turn run at once, so the engine decodes
//! them in one batch: every simulator, policy and judge call of every rollout is in flight
//! together, none waits for another rollout.

use serde::{Deserialize, Serialize};

use super::{derive_seed, judge, simulator, CollabError, Goal, Policy, Roles, Task};
use crate::engine::{ChatMessage, Role};
use crate::protocol::{CollabSpec, RewardWeights};

/// The reward settings of one run: the protocol's `[collab]` values, each replaceable by an option
/// of the command. The protocol's checks hold for its own values; an option can break them in
/// combination (`--samples 1` under a protocol's `min_gap_se`), so the result is checked again.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct MrSettings {
    /// Replies compared per turn (K, at least 2).
    pub candidates: u32,
    /// Rollouts per candidate (S, at least 1).
    pub samples: u32,
    /// Turn pairs per rollout (w); 0 is the single-turn ablation.
    pub window: u32,
    /// Smallest MR gap for a pair.
    pub margin: f64,
    /// Standard errors of itself the gap must reach; 0 is the margin alone.
    pub min_gap_se: f64,
}

/// A command's options that replace `[collab]` values for one run.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MrOverrides {
    pub candidates: Option<u32>,
    pub samples: Option<u32>,
    pub window: Option<u32>,
    pub margin: Option<f64>,
    pub min_gap_se: Option<f64>,
}

impl MrOverrides {
    /// The settings of a run under `collab`, or what makes them unusable.
    pub fn resolve(&self, collab: &CollabSpec) -> Result<MrSettings, CollabError> {
        let s = MrSettings {
            candidates: self.candidates.unwrap_or(collab.candidates),
            samples: self.samples.unwrap_or(collab.samples),
            window: self.window.unwrap_or(collab.window),
            margin: self.margin.unwrap_or(collab.margin),
            min_gap_se: self.min_gap_se.unwrap_or(collab.min_gap_se),
        };
        let problem = if s.candidates < 2 {
            format!(
                "candidates must be at least 2 (a pair needs two replies of a turn), not {}",
                s.candidates
            )
        } else if s.samples == 0 {
            "samples must be at least 1 (each candidate needs a rollout), not 0".to_string()
        } else if !(s.margin.is_finite() && s.margin >= 0.0) {
            format!("margin must be a number of 0 or more, not {}", s.margin)
        } else if !(s.min_gap_se.is_finite() && s.min_gap_se >= 0.0) {
            format!(
                "min_gap_se must be a number of 0 or more, not {}",
                s.min_gap_se
            )
        } else if s.min_gap_se > 0.0 && s.samples < 2 {
            format!(
                "min_gap_se {} needs the spread of at least 2 rollouts, and samples is {}: set \
                 samples to 2 or more, or min_gap_se to 0",
                s.min_gap_se, s.samples
            )
        } else {
            return Ok(s);
        };
        Err(CollabError::Invalid(problem))
    }

    /// The options' own problems, before any protocol is read: each given value is checked
    /// against the most lenient protocol, so only what no protocol could make right is refused.
    pub fn check(&self) -> Result<(), CollabError> {
        let lenient = CollabSpec {
            candidates: 2,
            samples: 2,
            margin: 0.0,
            min_gap_se: 0.0,
            ..CollabSpec::default()
        };
        self.resolve(&lenient).map(drop)
    }
}

/// A reply whose reward is estimated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    pub text: String,
    /// Tokens the policy generated for it.
    pub tokens: u32,
}

/// The metrics of one rollout.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Sentence BLEU of the final document against the goal document (0–1); none when there is
    /// no goal document (a one-line intent is no reference), and then it is not in the score.
    pub bleu: Option<f64>,
    /// Assistant tokens from the candidate on, in thousands.
    pub tokens_k: f64,
    /// The judge's interactivity (0–1).
    pub interactivity: f64,
    /// The judge's quality of the final document (1–10), when its weight is not 0.
    pub quality: Option<f64>,
    /// The simulated user ended the chat within the window.
    pub terminated: bool,
}

impl Metrics {
    pub fn score(&self, w: &RewardWeights) -> f64 {
        self.bleu.map_or(0.0, |b| w.bleu * b)
            + w.tokens * self.tokens_k
            + w.interactivity * self.interactivity
            + self.quality.map_or(0.0, |q| w.quality * (q - 1.0) / 9.0)
    }
}

/// One rolled-forward conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    /// The candidate and what followed it (the context is not repeated).
    pub continuation: Vec<ChatMessage>,
    /// The document the judge extracted from the whole conversation; empty when the score does
    /// not use it (no goal document and no quality weight).
    pub document: String,
    pub metrics: Metrics,
    pub score: f64,
}

/// Where a rollout sits in a run; it names the rollout's seeds.
#[derive(Debug, Clone)]
pub struct RolloutKey {
    pub base_seed: u64,
    /// The context, e.g. `session/turn`.
    pub context: String,
    pub candidate: usize,
    pub sample: usize,
}

impl RolloutKey {
    fn seed(&self, what: &str, step: usize) -> u32 {
        derive_seed(
            self.base_seed,
            &[
                &self.context,
                &self.candidate.to_string(),
                &self.sample.to_string(),
                what,
                &step.to_string(),
            ],
        )
    }

    /// The seed recorded for the rollout as a whole.
    pub fn rollout_seed(&self) -> u32 {
        self.seed("rollout", 0)
    }
}

/// What a rollout needs besides its candidate.
pub struct Scene<'a> {
    pub roles: &'a Roles,
    pub policy: &'a Policy,
    pub task: &'a Task,
    pub goal: &'a Goal,
    /// The conversation before the candidate (user and assistant messages).
    pub context: &'a [ChatMessage],
    /// The final document is wanted besides the score (an evaluation rates and records it);
    /// otherwise it is extracted only when the score uses it.
    pub keep_document: bool,
}

/// A rollout under way.
struct Running {
    conversation: Vec<ChatMessage>,
    tokens: u64,
    /// The simulated user ended the chat: no more turns.
    terminated: bool,
    failed: Option<CollabError>,
}

impl Running {
    fn going(&self) -> bool {
        !self.terminated && self.failed.is_none()
    }
}

/// Rolls every listed candidate forward `window` turn pairs and scores the results. The rollouts
/// move in lockstep — all simulated users, then all assistants, then all judgements — each step
/// one group of requests, so the engine batches the whole turn together and, given the seeds,
/// batches it the same way on every run: same seeds, same build, same rewards.
pub async fn rollouts(
    scene: &Scene<'_>,
    candidates: &[Candidate],
    keys: &[RolloutKey],
    window: u32,
) -> Vec<Result<Rollout, CollabError>> {
    let mut runs: Vec<Running> = keys
        .iter()
        .map(|key| {
            let mut conversation = scene.context.to_vec();
            conversation.push(ChatMessage::new(
                Role::Assistant,
                candidates[key.candidate].text.clone(),
            ));
            Running {
                conversation,
                tokens: u64::from(candidates[key.candidate].tokens),
                terminated: false,
                failed: None,
            }
        })
        .collect();
    for step in 0..window as usize {
        // The simulated users.
        let going: Vec<usize> = (0..runs.len()).filter(|&i| runs[i].going()).collect();
        let mut asks = Vec::new();
        let mut asked = Vec::new();
        for &i in &going {
            let seed = keys[i].seed("user", step);
            match simulator::message_ask(
                scene.roles,
                scene.task,
                scene.goal,
                &runs[i].conversation,
                simulator::Draft::Skip,
                seed,
            ) {
                Ok(ask) => {
                    asks.push(ask);
                    asked.push(i);
                }
                Err(e) => runs[i].failed = Some(e),
            }
        }
        for (&i, message) in asked
            .iter()
            .zip(simulator::next_messages(scene.roles, &asks).await)
        {
            let run = &mut runs[i];
            match message {
                Ok(m) => {
                    if !m.response.is_empty() {
                        run.conversation
                            .push(ChatMessage::new(Role::User, m.response));
                    }
                    run.terminated = m.terminates;
                }
                Err(e) => run.failed = Some(e),
            }
        }
        // The assistants.
        let going: Vec<usize> = (0..runs.len()).filter(|&i| runs[i].going()).collect();
        let requests = going
            .iter()
            .map(|&i| {
                let mut sampling = scene.policy.arm.sampling.clone();
                sampling.seed = Some(keys[i].seed("assistant", step));
                super::request(scene.policy.messages(&runs[i].conversation), sampling)
            })
            .collect();
        let replies = super::generate_all(&*scene.policy.engine, "policy", requests).await;
        for (&i, reply) in going.iter().zip(replies) {
            let run = &mut runs[i];
            match reply {
                Ok(c) => {
                    run.tokens += u64::from(c.generated_tokens);
                    run.conversation
                        .push(ChatMessage::new(Role::Assistant, c.text));
                }
                Err(e) => run.failed = Some(e),
            }
        }
    }
    judge_all(scene, keys, runs).await
}

/// Scores finished rollouts: the documents and interactivity of all of them in one group, then
/// (when weighted) the quality of the documents in another. The document is extracted only when
/// it is wanted or the score uses it (a goal document to compute BLEU against, or a quality
/// weight): written out by the judge it is most of a rollout's judged tokens, and a score
/// without it is the same.
async fn judge_all(
    scene: &Scene<'_>,
    keys: &[RolloutKey],
    runs: Vec<Running>,
) -> Vec<Result<Rollout, CollabError>> {
    let roles = scene.roles;
    let weights = &roles.spec.weights;
    let documents =
        scene.keep_document || scene.goal.reference().is_some() || weights.quality != 0.0;
    let mut scored: Vec<Option<Result<(String, f64), CollabError>>> =
        (0..runs.len()).map(|_| None).collect();
    let mut asks = Vec::new();
    let mut judged = Vec::new();
    for (i, run) in runs.iter().enumerate().filter(|(_, r)| r.failed.is_none()) {
        let key = &keys[i];
        let interactivity = judge::interactivity_ask(
            roles,
            scene.task,
            &run.conversation,
            scene.context.len(),
            key.seed("interactivity", 0),
        );
        let document = documents.then(|| {
            judge::document_ask(
                roles,
                scene.task,
                &run.conversation,
                key.seed("document", 0),
            )
        });
        match (interactivity, document.transpose()) {
            (Ok(x), Ok(d)) => {
                asks.push(x);
                asks.extend(d);
                judged.push(i);
            }
            (Err(e), _) | (_, Err(e)) => scored[i] = Some(Err(e)),
        }
    }
    let mut answers = judge::ask_all(roles, &asks).await.into_iter();
    for &i in &judged {
        let Some(interactivity) = answers.next() else {
            break;
        };
        let document = if documents { answers.next() } else { None };
        scored[i] = Some(interactivity.and_then(|x| {
            let x = judge::read_interactivity(&x).0;
            let document = document.transpose()?;
            Ok((
                document
                    .map(|d| judge::read_document(&d))
                    .unwrap_or_default(),
                x,
            ))
        }));
    }
    let mut qualities: Vec<Option<Result<f64, CollabError>>> =
        (0..runs.len()).map(|_| None).collect();
    if weights.quality != 0.0 {
        let mut asks = Vec::new();
        let mut asked = Vec::new();
        for (i, s) in scored.iter().enumerate() {
            if let Some(Ok((document, _))) = s {
                match judge::quality_ask(roles, scene.task, document, keys[i].seed("quality", 0)) {
                    Ok(ask) => {
                        asks.push(ask);
                        asked.push(i);
                    }
                    Err(e) => qualities[i] = Some(Err(e)),
                }
            }
        }
        for (&i, answer) in asked.iter().zip(judge::ask_all(roles, &asks).await) {
            qualities[i] = Some(answer.map(|o| judge::read_quality(&o) as f64));
        }
    }
    let start = scene.context.len();
    runs.into_iter()
        .zip(scored)
        .zip(qualities)
        .map(|((mut run, scored), quality)| {
            if let Some(e) = run.failed.take() {
                return Err(e);
            }
            let (document, interactivity) = scored.unwrap_or_else(|| {
                Err(CollabError::Invalid("the rollout was not judged".into()))
            })?;
            let quality = quality.transpose()?;
            let metrics = Metrics {
                bleu: scene
                    .goal
                    .reference()
                    .map(|goal| super::metrics::sentence_bleu(&document, goal)),
                tokens_k: run.tokens as f64 / 1000.0,
                interactivity,
                quality,
                terminated: run.terminated,
            };
            Ok(Rollout {
                continuation: run.conversation.split_off(start),
                document,
                score: metrics.score(weights),
                metrics,
            })
        })
        .collect()
}

/// The reward of one candidate from its rollouts' scores and metrics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reward {
    pub mr: f64,
    pub std: f64,
    /// Mean of each metric over the rollouts.
    pub means: Metrics,
    pub rollouts: usize,
    /// The score of each rollout, in sample order: the spread behind `mr` and `std`.
    pub scores: Vec<f64>,
}

impl Reward {
    pub fn of(rollouts: &[(f64, Metrics)]) -> Self {
        let n = rollouts.len().max(1) as f64;
        let mean = |f: &dyn Fn(&(f64, Metrics)) -> f64| rollouts.iter().map(f).sum::<f64>() / n;
        let mr = mean(&|r| r.0);
        let std = mean(&|r| (r.0 - mr).powi(2)).sqrt();
        let mean_of = |values: Vec<f64>| {
            (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
        };
        Self {
            mr,
            std,
            means: Metrics {
                bleu: mean_of(rollouts.iter().filter_map(|r| r.1.bleu).collect()),
                tokens_k: mean(&|r| r.1.tokens_k),
                interactivity: mean(&|r| r.1.interactivity),
                quality: mean_of(rollouts.iter().filter_map(|r| r.1.quality).collect()),
                terminated: rollouts.iter().any(|r| r.1.terminated),
            },
            rollouts: rollouts.len(),
            scores: rollouts.iter().map(|r| r.0).collect(),
        }
    }
}

/// Chosen and rejected among candidates' rewards: the highest MR and the lowest, ties broken
/// towards the lower standard deviation; `None` when the gap is below `margin`.
/// The standard error of the gap between the rewards of two candidates, from their rollouts'
/// sample variances: how far apart the two MR estimates could be by chance alone. Infinite when a
/// side has fewer than two rollouts (no spread to estimate it from).
fn gap_standard_error(a: &Reward, b: &Reward) -> f64 {
    let variance_of_mean = |r: &Reward| {
        let n = r.scores.len();
        if n < 2 {
            return f64::INFINITY;
        }
        let mean = r.scores.iter().sum::<f64>() / n as f64;
        let sample_var = r.scores.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
        sample_var / n as f64
    };
    (variance_of_mean(a) + variance_of_mean(b)).sqrt()
}

/// A pair the margin keeps: chosen and rejected, their gap and its standard error.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Picked {
    pub chosen: usize,
    pub rejected: usize,
    pub gap: f64,
    pub gap_se: f64,
}

impl Picked {
    /// Whether the gap is at least `k` standard errors; any gap when `k` is 0 (the rule is off),
    /// none when the error is unknown (one rollout a side).
    pub fn clears(&self, k: f64) -> bool {
        k <= 0.0 || self.gap >= k * self.gap_se
    }
}

/// [`pick_pair`] with the gap's standard error, for the noise-aware rule.
pub fn pick_with_noise(rewards: &[Reward], margin: f64) -> Option<Picked> {
    let (chosen, rejected) = pick_pair(rewards, margin)?;
    Some(Picked {
        chosen,
        rejected,
        gap: rewards[chosen].mr - rewards[rejected].mr,
        gap_se: gap_standard_error(&rewards[chosen], &rewards[rejected]),
    })
}

pub fn pick_pair(rewards: &[Reward], margin: f64) -> Option<(usize, usize)> {
    let mut order: Vec<usize> = (0..rewards.len()).collect();
    order.sort_by(|&a, &b| {
        let (x, y) = (&rewards[a], &rewards[b]);
        y.mr.total_cmp(&x.mr).then(x.std.total_cmp(&y.std))
    });
    let (&chosen, &rejected) = (order.first()?, order.last()?);
    (chosen != rejected && rewards[chosen].mr - rewards[rejected].mr >= margin)
        .then_some((chosen, rejected))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reward(mr: f64, std: f64) -> Reward {
        Reward {
            mr,
            std,
            means: Metrics::default(),
            rollouts: 3,
            scores: vec![mr; 3],
        }
    }

    #[test]
    fn pairs_take_the_extremes_and_respect_the_margin() {
        let rewards = [reward(0.5, 0.1), reward(0.9, 0.2), reward(0.1, 0.0)];
        assert_eq!(pick_pair(&rewards, 0.02), Some((1, 2)));
        assert_eq!(pick_pair(&rewards, 0.9), None);
        // Equal rewards: the steadier one is chosen, and a gap of 0 is below any margin.
        let tied = [reward(0.5, 0.3), reward(0.5, 0.1)];
        assert_eq!(pick_pair(&tied, 0.0), Some((1, 0)));
        assert_eq!(pick_pair(&tied, 0.02), None);
    }

    #[test]
    fn the_gap_is_measured_against_its_own_noise() {
        let with = |scores: &[f64]| Reward {
            scores: scores.to_vec(),
            ..Reward::of(
                &scores
                    .iter()
                    .map(|&s| (s, Metrics::default()))
                    .collect::<Vec<_>>(),
            )
        };
        // Chosen 0.6 ± sample std 0.1, rejected 0.3 ± 0.1, 3 rollouts each:
        // se = sqrt(0.01/3 + 0.01/3) = 0.0816…, gap 0.3 = 3.67 se.
        let rewards = [with(&[0.5, 0.6, 0.7]), with(&[0.2, 0.3, 0.4])];
        let p = pick_with_noise(&rewards, 0.02).unwrap();
        assert_eq!((p.chosen, p.rejected), (0, 1));
        assert!((p.gap - 0.3).abs() < 1e-12);
        assert!((p.gap_se - (0.02f64 / 3.0).sqrt()).abs() < 1e-12);
        assert!(p.clears(3.0) && !p.clears(4.0));
        // The same gap from noisy rollouts is inside the noise.
        let noisy = [with(&[0.0, 0.6, 1.2]), with(&[-0.3, 0.3, 0.9])];
        assert!(!pick_with_noise(&noisy, 0.02).unwrap().clears(1.0));
        // One rollout each: no spread, no claim to be clear of it.
        let single = [with(&[0.9]), with(&[0.1])];
        let p = pick_with_noise(&single, 0.02).unwrap();
        assert!(p.gap_se.is_infinite() && !p.clears(1.0) && p.clears(0.0));
    }

    #[test]
    fn reward_is_mean_and_population_std() {
        let m = Metrics::default();
        let r = Reward::of(&[(1.0, m.clone()), (3.0, m)]);
        assert_eq!((r.mr, r.std, r.rollouts), (2.0, 1.0, 2));
        assert_eq!(r.scores, [1.0, 3.0]);
    }

    #[test]
    fn score_weighs_the_metrics() {
        let m = Metrics {
            bleu: Some(0.5),
            tokens_k: 0.2,
            interactivity: 1.0,
            quality: Some(10.0),
            terminated: false,
        };
        let w = RewardWeights {
            quality: 0.5,
            ..RewardWeights::default()
        };
        assert!((m.score(&w) - (0.5 - 0.02 + 1.0 + 0.5)).abs() < 1e-12);
        // Without a goal document BLEU measures nothing and is left out.
        let no_goal = Metrics { bleu: None, ..m };
        assert!((no_goal.score(&w) - (-0.02 + 1.0 + 0.5)).abs() < 1e-12);
    }

    #[test]
    fn options_replace_the_protocols_values_and_are_checked_with_them() {
        let collab = CollabSpec {
            min_gap_se: 2.0,
            ..CollabSpec::default()
        };
        let none = MrOverrides::default().resolve(&collab).unwrap();
        assert_eq!(
            (none.candidates, none.samples, none.window, none.min_gap_se),
            (2, 3, 2, 2.0)
        );
        let window = MrOverrides {
            window: Some(0),
            ..MrOverrides::default()
        };
        assert_eq!(window.resolve(&collab).unwrap().window, 0);
        // One rollout has no spread: the protocol's noise rule cannot hold.
        let one = MrOverrides {
            samples: Some(1),
            ..MrOverrides::default()
        };
        let e = one.resolve(&collab).unwrap_err().to_string();
        assert!(e.contains("min_gap_se 2 needs the spread"), "{e}");
        let off = MrOverrides {
            min_gap_se: Some(0.0),
            ..one
        };
        assert_eq!(off.resolve(&collab).unwrap().samples, 1);
        for bad in [
            MrOverrides {
                candidates: Some(1),
                ..MrOverrides::default()
            },
            MrOverrides {
                samples: Some(0),
                min_gap_se: Some(0.0),
                ..MrOverrides::default()
            },
            MrOverrides {
                margin: Some(f64::NAN),
                ..MrOverrides::default()
            },
        ] {
            assert!(bad.resolve(&collab).is_err(), "{bad:?}");
            assert!(bad.check().is_err(), "{bad:?}");
        }
        // Alone, one rollout is fine (a protocol without the noise rule takes it); with the
        // noise rule asked for too it never is.
        assert!(one.check().is_ok());
        let both = MrOverrides {
            min_gap_se: Some(2.0),
            ..one
        };
        assert!(both.check().is_err());
    }
}
