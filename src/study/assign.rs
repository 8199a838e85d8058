//! Balanced assignment of arms, tasks and topics. Decisions are pure functions of what the ledger
//! and the session counts say, and of a seeded generator whose algorithm is fixed here
//! (SplitMix64, in [`crate::stats`]), so a recorded sequence can be recomputed by anyone.

use serde_json::json;

use crate::protocol::AssignmentMethod;
use crate::stats::SplitMix64;

/// One arm as the assignment sees it.
#[derive(Debug, Clone)]
pub struct ArmState {
    pub arm_id: i64,
    pub name: String,
    pub weight: f64,
    pub quota: Option<i32>,
    /// Active and completed sessions (not abandoned, declined or timed out).
    pub filled: i64,
}

impl ArmState {
    fn full(&self) -> bool {
        self.quota.is_some_and(|q| self.filled >= i64::from(q))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ArmDraw {
    pub arm_id: i64,
    pub method: &'static str,
    pub inputs: serde_json::Value,
}

/// Integer counts per arm in one block, proportional to the weights.
fn block_counts(arms: &[ArmState]) -> Vec<usize> {
    let multiplier = (1..=1000)
        .find(|m| {
            arms.iter().all(|a| {
                ((a.weight * f64::from(*m)) - (a.weight * f64::from(*m)).round()).abs() < 1e-6
            })
        })
        .unwrap_or(1000);
    arms.iter()
        .map(|a| ((a.weight * f64::from(multiplier)).round() as usize).max(1))
        .collect()
}

/// The arm order of block `block` (arm indices), shuffled with the study's seed.
pub fn block(arms: &[ArmState], seed: u64, block: u64) -> Vec<usize> {
    let mut order: Vec<usize> = block_counts(arms)
        .iter()
        .enumerate()
        .flat_map(|(i, n)| std::iter::repeat_n(i, *n))
        .collect();
    let mut rng = SplitMix64::new(seed ^ block.wrapping_mul(0xD1B5_4A32_D192_ED03));
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i + 1));
    }
    order
}

/// Picks the arm of draw number `draw_index`, or `None` when every arm's quota is full.
pub fn choose_arm(
    method: AssignmentMethod,
    seed: u64,
    draw_index: i64,
    arms: &[ArmState],
) -> Option<ArmDraw> {
    if arms.iter().all(ArmState::full) {
        return None;
    }
    let filled: Vec<_> = arms
        .iter()
        .map(|a| json!({"arm": a.name, "filled": a.filled}))
        .collect();
    if method == AssignmentMethod::PermutedBlocks {
        let size = block_counts(arms).iter().sum::<usize>() as i64;
        let (block_no, position) = (draw_index / size, draw_index % size);
        let order = block(arms, seed, block_no as u64);
        let arm = &arms[order[position as usize]];
        if !arm.full() {
            return Some(ArmDraw {
                arm_id: arm.arm_id,
                method: "permuted_blocks",
                inputs: json!({
                    "seed": seed, "draw_index": draw_index, "block": block_no,
                    "position": position, "block_size": size, "sessions": filled,
                }),
            });
        }
    }
    let mut rng = SplitMix64::new(seed ^ (draw_index as u64).wrapping_mul(0xA24B_AED4_963E_E407));
    let ratio = |a: &ArmState| a.filled as f64 / a.weight;
    let open: Vec<&ArmState> = arms.iter().filter(|a| !a.full()).collect();
    let lowest = open.iter().map(|a| ratio(a)).fold(f64::INFINITY, f64::min);
    let tied: Vec<&&ArmState> = open.iter().filter(|a| ratio(a) - lowest < 1e-9).collect();
    let arm = tied[rng.below(tied.len())];
    let method = match method {
        AssignmentMethod::LeastFilled => "least_filled",
        AssignmentMethod::PermutedBlocks => "permuted_blocks_quota_fallback",
    };
    Some(ArmDraw {
        arm_id: arm.arm_id,
        method,
        inputs: json!({"seed": seed, "draw_index": draw_index, "sessions": filled, "tied": tied.len()}),
    })
}

/// Picks the task and topic drawn least often so far (ties broken by the seeded generator).
/// `bank` lists (task id, topic ids); `counts` the ledger's draws per (task, topic).
pub fn choose_topic(
    seed: u64,
    draw_index: i64,
    bank: &[(String, Vec<String>)],
    counts: &[(String, String, i64)],
) -> (String, String) {
    let count = |task: &str, topic: Option<&str>| -> i64 {
        counts
            .iter()
            .filter(|(t, p, _)| t == task && topic.is_none_or(|topic| p == topic))
            .map(|(_, _, n)| n)
            .sum()
    };
    let mut rng = SplitMix64::new(seed ^ (draw_index as u64).wrapping_mul(0x9FB2_1C65_1E98_DF25));
    let least = |candidates: Vec<(&str, i64)>, rng: &mut SplitMix64| -> String {
        let low = candidates.iter().map(|(_, n)| *n).min().unwrap_or(0);
        let tied: Vec<&str> = candidates
            .iter()
            .filter(|(_, n)| *n == low)
            .map(|(c, _)| *c)
            .collect();
        tied[rng.below(tied.len())].to_string()
    };
    let task = least(
        bank.iter()
            .map(|(t, _)| (t.as_str(), count(t, None)))
            .collect(),
        &mut rng,
    );
    let topics = &bank
        .iter()
        .find(|(t, _)| *t == task)
        .expect("chosen from the bank")
        .1;
    let topic = least(
        topics
            .iter()
            .map(|p| (p.as_str(), count(&task, Some(p))))
            .collect(),
        &mut rng,
    );
    (task, topic)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arms(weights: &[f64]) -> Vec<ArmState> {
        weights
            .iter()
            .enumerate()
            .map(|(i, w)| ArmState {
                arm_id: i as i64 + 1,
                name: format!("arm{i}"),
                weight: *w,
                quota: None,
                filled: 0,
            })
            .collect()
    }

    #[test]
    fn blocks_hold_each_arm_in_proportion_to_its_weight() {
        let a = arms(&[1.0, 2.0, 0.5]);
        let b = block(&a, 7, 0);
        assert_eq!(b.len(), 7);
        assert_eq!(b.iter().filter(|&&i| i == 1).count(), 4);
        assert_eq!(b.iter().filter(|&&i| i == 2).count(), 1);
        assert_eq!(block(&a, 7, 0), b, "the same seed gives the same block");
        assert!(
            (1..5).any(|n| block(&a, 7, n) != b),
            "blocks are shuffled anew"
        );
    }

    #[test]
    fn a_full_arm_is_skipped() {
        let mut a = arms(&[1.0, 1.0]);
        a[0].quota = Some(1);
        a[0].filled = 1;
        for i in 0..10 {
            let d = choose_arm(AssignmentMethod::PermutedBlocks, 3, i, &a).unwrap();
            assert_eq!(d.arm_id, 2);
        }
        a[1].quota = Some(0);
        assert!(choose_arm(AssignmentMethod::LeastFilled, 3, 0, &a).is_none());
    }

    #[test]
    fn least_filled_picks_the_arm_furthest_behind_its_weight() {
        let mut a = arms(&[1.0, 2.0]);
        a[0].filled = 3;
        a[1].filled = 5;
        let d = choose_arm(AssignmentMethod::LeastFilled, 1, 0, &a).unwrap();
        assert_eq!(d.arm_id, 2);
    }

    #[test]
    fn topics_are_drawn_evenly() {
        let bank = vec![
            ("a".to_string(), vec!["a1".to_string(), "a2".to_string()]),
            ("b".to_string(), vec!["b1".to_string()]),
        ];
        let mut counts: Vec<(String, String, i64)> = Vec::new();
        for i in 0..40 {
            let (task, topic) = choose_topic(9, i, &bank, &counts);
            match counts
                .iter_mut()
                .find(|(t, p, _)| *t == task && *p == topic)
            {
                Some(c) => c.2 += 1,
                None => counts.push((task, topic, 1)),
            }
        }
        let per_task = |t: &str| counts.iter().filter(|c| c.0 == t).map(|c| c.2).sum::<i64>();
        assert_eq!((per_task("a"), per_task("b")), (20, 20));
        assert!(counts.iter().filter(|c| c.0 == "a").all(|c| c.2 == 10));
    }
}
