//! `collabllm synth`: the paper's data generation. From single-turn tasks (a prompt and a
//! reference document) it grows multi-turn conversations turn by turn: the simulator opens, the
//! policy offers K candidate replies, each is scored with the multiturn-aware reward, the best one
//! is kept and the conversation continues with the next user message of its rollouts. Every
//! candidate becomes a row (prompt, completion, score, rewards), and pairs can be built from the
//! rows of a turn like `collabllm pairs` builds them.

use std::io::BufRead;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::json;

use super::reward::{self, Candidate, MrSettings, Reward, RolloutKey, Scene};
use super::{derive_seed, simulator, CollabError, Goal, JsonlWriter, Policy, Roles, Task};
use crate::db::{self, DbPool};
use crate::engine::{ChatMessage, Role};

/// One line of the tasks file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SynthTask {
    #[serde(default)]
    pub id: Option<String>,
    /// What kind of document ("blog post", …); default "document".
    #[serde(default)]
    pub kind: Option<String>,
    /// The single-turn request.
    pub prompt: String,
    /// The document a good conversation ends with.
    pub reference: String,
}

impl SynthTask {
    /// The task as the simulator and judge see it, and the goal: the request as the intent, the
    /// reference as the document to end with.
    pub fn task_and_goal(&self) -> (Task, Goal) {
        let task = Task {
            kind: self.kind.clone().unwrap_or_else(|| "document".into()),
            title: self
                .prompt
                .lines()
                .next()
                .unwrap_or_default()
                .chars()
                .take(120)
                .collect(),
            instructions: self.prompt.clone(),
        };
        let goal = Goal {
            intent: self.prompt.clone(),
            document: self.reference.clone(),
        };
        (task, goal)
    }
}

/// Reads a JSONL file of tasks; errors name the line.
pub fn read_tasks(path: &Path) -> Result<Vec<SynthTask>, CollabError> {
    let file = std::fs::File::open(path).map_err(|e| {
        CollabError::Invalid(format!("cannot read tasks file {}: {e}", path.display()))
    })?;
    let mut tasks = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line =
            line.map_err(|e| CollabError::Invalid(format!("cannot read {}: {e}", path.display())))?;
        if line.trim().is_empty() {
            continue;
        }
        let task: SynthTask = serde_json::from_str(&line).map_err(|e| {
            CollabError::Invalid(format!(
                "{}:{}: {e}; each line is a JSON object with \"prompt\" and \"reference\" (and optionally \"id\", \"kind\")",
                path.display(),
                i + 1
            ))
        })?;
        tasks.push(task);
    }
    if tasks.is_empty() {
        return Err(CollabError::Invalid(format!(
            "{} holds no tasks",
            path.display()
        )));
    }
    Ok(tasks)
}

#[derive(Debug, Clone)]
pub struct SynthOptions {
    /// Conversations to grow (the tasks are taken in order, again from the first when there are
    /// fewer).
    pub conversations: usize,
    /// Assistant turns per conversation at most.
    pub turns: u32,
    pub mr: MrSettings,
    pub seed: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SynthSummary {
    pub conversations: u64,
    pub rows: u64,
    pub pairs: u64,
    /// Turns that could not be scored (the conversation stopped there).
    pub failed_turns: u64,
    /// Turns grown in this run, and turns an earlier run had stored.
    pub turns_run: u64,
    pub turns_reused: u64,
}

/// A grown turn as stored: all that resumes it without the models.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct GrownTurn {
    candidates: Vec<Candidate>,
    /// Each candidate's seed, and whether it had the proactive instruction.
    seeds: Vec<(u32, bool)>,
    rewards: Vec<Reward>,
    /// The user's next message; none when the simulated user ended the chat.
    next_user: Option<String>,
}

/// What a run keys its stored turns by: everything that shapes a turn besides its conversation.
struct RunKey(serde_json::Value);

impl RunKey {
    fn new(roles: &Roles, policy: &Policy, options: &SynthOptions) -> Self {
        let mut key = super::rollout_identity(roles, policy);
        key["candidates"] = json!(options.mr.candidates);
        key["samples"] = json!(options.mr.samples);
        key["window"] = json!(options.mr.window);
        key["seed"] = json!(options.seed);
        key["proactive_share"] = json!(roles.spec.proactive_share);
        Self(key)
    }

    /// The key of one turn: the run's settings, the task and the conversation so far.
    fn of(
        &self,
        task: &SynthTask,
        conversation: &str,
        turn: u32,
        history: &[ChatMessage],
    ) -> String {
        let key = json!({
            "run": self.0,
            "task": [&task.kind, &task.prompt, &task.reference],
            "conversation": conversation,
            "turn": turn,
            "history": history.iter().map(|m| (m.role.as_str(), &m.content)).collect::<Vec<_>>(),
        });
        crate::protocol::sha256_hex(key.to_string().as_bytes())
    }
}

/// Grows the conversations and writes one row per candidate to `out`, and DPO pairs to `pairs`
/// when given. Every finished turn is stored in the database first, so a run stopped anywhere
/// and started again with the same settings reuses them and writes the same files. `progress`
/// hears (conversations done, all).
#[allow(clippy::too_many_arguments)]
pub async fn run(
    pool: &DbPool,
    roles: &Roles,
    policy: &Policy,
    tasks: &[SynthTask],
    options: &SynthOptions,
    out: &Path,
    pairs: Option<&Path>,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<SynthSummary, CollabError> {
    let mut rows = JsonlWriter::create(out)?;
    let mut pair_rows = pairs.map(JsonlWriter::create).transpose()?;
    let mut summary = SynthSummary::default();
    let run_key = RunKey::new(roles, policy, options);
    let total = options.conversations as u64;
    progress(0, total);
    for c in 0..options.conversations {
        let spec = &tasks[c % tasks.len()];
        let id = spec
            .id
            .clone()
            .unwrap_or_else(|| format!("task-{}", c % tasks.len()));
        let conversation_id = format!("{id}#{c}");
        let (task, goal) = spec.task_and_goal();
        let opening_key = run_key.of(spec, &conversation_id, 0, &[]);
        let opening = match stored::<String>(pool, &opening_key).await? {
            Some(text) => text,
            None => {
                let text = simulator::next_message(
                    roles,
                    &task,
                    &goal,
                    &[],
                    simulator::Draft::Skip,
                    derive_seed(options.seed, &[&conversation_id, "opening"]),
                )
                .await?
                .response;
                store(pool, &opening_key, &conversation_id, 0, &text).await?;
                text
            }
        };
        let mut history = vec![ChatMessage::new(Role::User, opening)];
        for turn in 1..=options.turns {
            let label = format!("{conversation_id}/{turn}");
            let key = run_key.of(spec, &conversation_id, turn, &history);
            let grown = match stored::<GrownTurn>(pool, &key).await? {
                Some(grown) => {
                    summary.turns_reused += 1;
                    grown
                }
                None => {
                    match grow_turn(roles, policy, &task, &goal, &history, options, &label).await {
                        Ok(grown) => {
                            store(pool, &key, &conversation_id, turn, &grown).await?;
                            summary.turns_run += 1;
                            grown
                        }
                        Err(e) if e.is_local() => {
                            tracing::warn!(conversation = %conversation_id, turn, error = %e, "turn failed; the conversation ends here");
                            summary.failed_turns += 1;
                            break;
                        }
                        Err(e) => return Err(e),
                    }
                }
            };
            let GrownTurn {
                candidates,
                seeds,
                rewards,
                next_user,
            } = grown;
            for (k, (candidate, reward)) in candidates.iter().zip(&rewards).enumerate() {
                rows.write(&json!({
                    "conversation": conversation_id,
                    "task": id,
                    "turn": turn,
                    "candidate": k,
                    "prompt": policy.messages(&history),
                    "completion": [{"role": "assistant", "content": candidate.text}],
                    "score": reward.mr,
                    "score_std": reward.std,
                    "rewards": reward.means,
                    "kept": k == best(&rewards),
                    "seed": seeds[k].0,
                    "proactive": seeds[k].1,
                }))?;
                summary.rows += 1;
            }
            let picked = reward::pick_with_noise(&rewards, options.mr.margin)
                .filter(|p| p.clears(options.mr.min_gap_se));
            if let (
                Some(out),
                Some(reward::Picked {
                    chosen, rejected, ..
                }),
            ) = (pair_rows.as_mut(), picked)
            {
                out.write(&json!({
                    "prompt": policy.messages(&history),
                    "chosen": [{"role": "assistant", "content": candidates[chosen].text}],
                    "rejected": [{"role": "assistant", "content": candidates[rejected].text}],
                    "score_chosen": rewards[chosen].mr,
                    "score_rejected": rewards[rejected].mr,
                    "metadata": {"source": "synth", "conversation": conversation_id, "task": id, "turn": turn, "seed": options.seed},
                }))?;
                summary.pairs += 1;
            }
            history.push(ChatMessage::new(
                Role::Assistant,
                candidates[best(&rewards)].text.clone(),
            ));
            match next_user {
                Some(next) => history.push(ChatMessage::new(Role::User, next)),
                None => break,
            }
        }
        summary.conversations += 1;
        progress(summary.conversations, total);
    }
    rows.finish()?;
    if let Some(p) = pair_rows {
        p.finish()?;
    }
    Ok(summary)
}

/// A stored turn's result, if an earlier run finished it.
async fn stored<T: serde::de::DeserializeOwned>(
    pool: &DbPool,
    key: &str,
) -> Result<Option<T>, CollabError> {
    let key = key.to_string();
    let json = db::run_blocking::<_, CollabError, _>(pool, move |conn| {
        Ok(db::synth_turns::find(conn, &key)?)
    })
    .await?;
    json.map(|j| {
        serde_json::from_str(&j)
            .map_err(|e| CollabError::Invalid(format!("a stored synth turn is unreadable: {e}")))
    })
    .transpose()
}

async fn store(
    pool: &DbPool,
    key: &str,
    conversation: &str,
    turn: u32,
    result: &impl Serialize,
) -> Result<(), CollabError> {
    let (key, conversation) = (key.to_string(), conversation.to_string());
    let json = serde_json::to_string(result).expect("a turn is JSON");
    let turn = i32::try_from(turn).unwrap_or(i32::MAX);
    db::run_blocking::<_, CollabError, _>(pool, move |conn| {
        Ok(db::synth_turns::insert(
            conn,
            &key,
            &conversation,
            turn,
            &json,
        )?)
    })
    .await
}

fn best(rewards: &[Reward]) -> usize {
    reward::pick_pair(rewards, f64::NEG_INFINITY).map_or(0, |(chosen, _)| chosen)
}

/// K fresh candidates after `history` (a repeated reply sampled again; at least two different
/// ones), their seeds and whether each had the proactive instruction, their rewards, and the
/// user's next message from the best candidate's first rollout (none when the simulated user
/// ended the chat there).
async fn grow_turn(
    roles: &Roles,
    policy: &Policy,
    task: &Task,
    goal: &Goal,
    history: &[ChatMessage],
    options: &SynthOptions,
    label: &str,
) -> Result<GrownTurn, CollabError> {
    let wanted: Vec<usize> = (0..options.mr.candidates as usize).collect();
    let proactive = super::Proactive::of(roles, &wanted)?;
    let fresh = super::fresh_candidates(policy, history, &wanted, &[], &proactive, |k, round| {
        super::candidate_seed(options.seed, label, k, round)
    })
    .await?;
    if fresh.len() < 2 {
        return Err(CollabError::SameCandidates(label.to_string()));
    }
    let seeds: Vec<(u32, bool)> = fresh
        .iter()
        .map(|f| (f.completion.seed, f.proactive))
        .collect();
    let candidates: Vec<Candidate> = fresh
        .into_iter()
        .map(|f| Candidate {
            text: f.completion.text,
            tokens: f.completion.generated_tokens,
        })
        .collect();
    let todo: Vec<RolloutKey> = (0..candidates.len())
        .flat_map(|candidate| {
            (0..options.mr.samples as usize).map(move |sample| RolloutKey {
                base_seed: options.seed,
                context: label.to_string(),
                candidate,
                sample,
            })
        })
        .collect();
    let scene = Scene {
        roles,
        policy,
        task,
        goal,
        context: history,
        keep_document: false,
    };
    let ran = reward::rollouts(&scene, &candidates, &todo, options.mr.window).await;
    let mut per_candidate = vec![Vec::new(); candidates.len()];
    let mut rollouts_of: Vec<Vec<reward::Rollout>> = vec![Vec::new(); candidates.len()];
    for (key, result) in todo.iter().zip(ran) {
        let rollout = result?;
        per_candidate[key.candidate].push((rollout.score, rollout.metrics.clone()));
        rollouts_of[key.candidate].push(rollout);
    }
    let rewards: Vec<Reward> = per_candidate.iter().map(|r| Reward::of(r)).collect();
    // The conversation goes on with a simulated user's reply to the kept candidate.
    let kept = best(&rewards);
    let next_user = if options.mr.window == 0 {
        // The rollouts stopped at the candidate: the simulator answers the kept one.
        let mut conversation = history.to_vec();
        conversation.push(ChatMessage::new(
            Role::Assistant,
            candidates[kept].text.clone(),
        ));
        let seed = derive_seed(options.seed, &[label, "next user"]);
        let next = simulator::next_message(
            roles,
            task,
            goal,
            &conversation,
            simulator::Draft::Skip,
            seed,
        )
        .await?;
        (!next.terminates && !next.response.is_empty()).then_some(next.response)
    } else {
        next_user_of(&rollouts_of[kept])
    };
    Ok(GrownTurn {
        candidates,
        seeds,
        rewards,
        next_user,
    })
}

/// The user's next message after a candidate, from its rollouts (each the candidate, then the
/// user, then the assistant, …): from one whose first simulated user went on with the chat, the
/// longest such (the first of equals), so the conversation continues where a user did; none when
/// every first user ended the chat.
fn next_user_of(rollouts: &[reward::Rollout]) -> Option<String> {
    let first_user_went_on = |r: &&reward::Rollout| {
        let replied = r.continuation.get(1).is_some_and(|m| m.role == Role::User);
        // A user who ended the chat at once is the last message of the rollout.
        replied && (r.continuation.len() > 2 || !r.metrics.terminated)
    };
    rollouts
        .iter()
        .filter(first_user_went_on)
        .min_by_key(|r| std::cmp::Reverse(r.continuation.len()))
        .map(|r| r.continuation[1].content.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collab::reward::{Metrics, Rollout};

    fn rollout(messages: &[(Role, &str)], terminated: bool) -> Rollout {
        Rollout {
            continuation: messages
                .iter()
                .map(|(role, text)| ChatMessage::new(*role, *text))
                .collect(),
            document: String::new(),
            metrics: Metrics {
                terminated,
                ..Metrics::default()
            },
            score: 0.0,
        }
    }

    #[test]
    fn the_next_user_comes_from_a_rollout_whose_first_user_went_on() {
        use Role::{Assistant as A, User as U};
        // Sample 0: the first user ended the chat. Sample 1: went on, ended later (terminated
        // somewhere in the window, which does not matter). Sample 2: went on, shorter.
        let ended_at_once = rollout(&[(A, "c"), (U, "bye")], true);
        let went_on_longest = rollout(
            &[(A, "c"), (U, "more"), (A, "r"), (U, "thanks, done")],
            true,
        );
        let went_on_short = rollout(&[(A, "c"), (U, "short"), (A, "r")], false);
        let rollouts = [ended_at_once.clone(), went_on_short, went_on_longest];
        assert_eq!(next_user_of(&rollouts).as_deref(), Some("more"));
        // Of equals, the first.
        let a = rollout(&[(A, "c"), (U, "first"), (A, "r")], false);
        let b = rollout(&[(A, "c"), (U, "second"), (A, "r")], false);
        assert_eq!(next_user_of(&[a, b]).as_deref(), Some("first"));
        // A window of one: the user's message ends the rollout without ending the chat.
        let one = rollout(&[(A, "c"), (U, "go on")], false);
        assert_eq!(next_user_of(&[one]).as_deref(), Some("go on"));
        // Every first user ended the chat: the conversation ends.
        assert_eq!(next_user_of(&[ended_at_once]), None);
        assert_eq!(next_user_of(&[rollout(&[(A, "c")], true)]), None);
    }
}
