//! The multiturn-aware reward with a scripted simulator, policy and judge, so every number is
//! known: where a rollout stops (the window, the simulated user ending the chat), what it costs
//! in tokens and what it scores.

use std::sync::Arc;

use collabllm::collab::metrics::sentence_bleu;
use collabllm::collab::reward::{self, Candidate, Reward, RolloutKey, Scene};
use collabllm::collab::{start_policy, Goal, Roles, Task};
use collabllm::engine::{ChatMessage, Role};
use collabllm::protocol::LoadedProtocol;
use serde_json::json;

use crate::common::{
    asker, models_dir, pilot_text, repo_root, request_text, scripted_engines, Asker, ScriptedEngine,
};

const ASKS: &str = "Who is it for?";
const MORE: &str = "Here is more.";
const DOCUMENT: &str = "Dear Jo, thank you.";
const GOAL: &str = "Dear Jo, thank you for the plants.";

/// The simulated user answers once and ends the chat after the assistant's next reply; the policy
/// always says [`MORE`] (3 tokens: the scripted engine counts words); the judge rates a part
/// that asks 1 and anything else 0, and extracts [`DOCUMENT`].
fn scripted() -> Arc<ScriptedEngine> {
    scripted_counting(Arc::default())
}

/// [`scripted`], counting the documents the judge is asked to extract in `documents`.
fn scripted_counting(documents: Arc<std::sync::atomic::AtomicUsize>) -> Arc<ScriptedEngine> {
    Arc::new(ScriptedEngine::new(move |r| {
        let all = request_text(r);
        if matches!(asker(&all), Asker::Document) {
            documents.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        match asker(&all) {
            Asker::Interactivity(judged) => {
                json!({"thought": "", "interactivity": 1 + 4 * u8::from(judged.contains(ASKS))})
                    .to_string()
            }
            Asker::Document => json!({"thought": "", "final_document": DOCUMENT}).to_string(),
            Asker::Quality => json!({"thought": "", "quality": 7}).to_string(),
            Asker::Simulator if all.contains(MORE) => {
                json!({"thought": "", "response": "Thanks, done. [[TERMINATE CHAT]]"}).to_string()
            }
            Asker::Simulator => json!({"thought": "", "response": "It is for Jo."}).to_string(),
            Asker::Policy => MORE.to_string(),
        }
    }))
}

struct Setup {
    roles: Roles,
    policy: collabllm::collab::Policy,
    task: Task,
}

fn setup() -> Setup {
    setup_with(scripted())
}

fn setup_with(engine: Arc<ScriptedEngine>) -> Setup {
    setup_from(engine, pilot_text())
}

/// [`setup_with`] under a protocol of this text.
fn setup_from(engine: Arc<ScriptedEngine>, text: String) -> Setup {
    let path = repo_root().join("study-protocols/quick-pilot.toml");
    let loaded = LoadedProtocol::from_text(&path, text, &models_dir()).unwrap();
    let p = &loaded.protocol;
    let engines = scripted_engines(engine);
    Setup {
        roles: Roles::start(
            &engines,
            p,
            &loaded.source,
            &crate::common::real_models(),
            4,
        )
        .unwrap(),
        policy: start_policy(&engines, p, &p.arms[0], &crate::common::real_models(), 4).unwrap(),
        task: Task::of(&p.tasks[0], &p.tasks[0].topics[0]),
    }
}

/// Two rollouts of each candidate over `window` turn pairs.
async fn roll(s: &Setup, candidates: &[Candidate], window: u32) -> Vec<reward::Rollout> {
    roll_towards(s, candidates, window, GOAL).await
}

/// [`roll`] towards a goal document (empty: the intent alone).
async fn roll_towards(
    s: &Setup,
    candidates: &[Candidate],
    window: u32,
    goal_document: &str,
) -> Vec<reward::Rollout> {
    let goal = Goal {
        intent: "a note for Jo".into(),
        document: goal_document.into(),
    };
    let context = [ChatMessage::new(Role::User, "A note please.")];
    let scene = Scene {
        roles: &s.roles,
        policy: &s.policy,
        task: &s.task,
        goal: &goal,
        context: &context,
        keep_document: false,
    };
    let keys: Vec<RolloutKey> = (0..candidates.len())
        .flat_map(|candidate| {
            (0..2).map(move |sample| RolloutKey {
                base_seed: 1,
                context: "t".into(),
                candidate,
                sample,
            })
        })
        .collect();
    reward::rollouts(&scene, candidates, &keys, window)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect()
}

fn asks() -> Candidate {
    Candidate {
        text: ASKS.into(),
        tokens: 4,
    }
}

fn texts(r: &reward::Rollout) -> Vec<(Role, &str)> {
    r.continuation
        .iter()
        .map(|m| (m.role, m.content.as_str()))
        .collect()
}

#[tokio::test]
async fn a_rollout_stops_where_the_simulated_user_ends_the_chat() {
    let s = setup();
    let bleu = sentence_bleu(DOCUMENT, GOAL);
    assert!(bleu > 0.0 && bleu < 1.0);
    // A window of 3 is cut short after the second user message, which ends the chat.
    for r in roll(&s, &[asks()], 3).await {
        assert_eq!(
            texts(&r),
            [
                (Role::Assistant, ASKS),
                (Role::User, "It is for Jo."),
                (Role::Assistant, MORE),
                (Role::User, "Thanks, done."),
            ]
        );
        assert!(r.metrics.terminated);
        assert_eq!(
            r.metrics.tokens_k, 0.007,
            "the candidate's 4 and the reply's 3"
        );
        assert_eq!(r.metrics.interactivity, 1.0);
        assert_eq!(r.metrics.bleu, Some(bleu));
        assert!((r.score - (bleu - 0.1 * 0.007 + 1.0)).abs() < 1e-12);
    }
    // A window of 1: one user message and one reply, the chat not ended.
    for r in roll(&s, &[asks()], 1).await {
        assert_eq!(texts(&r).len(), 3);
        assert!(!r.metrics.terminated);
        assert_eq!(r.metrics.tokens_k, 0.007);
    }
    // A window of 0 (the single-turn ablation) judges the candidate alone.
    for r in roll(&s, &[asks()], 0).await {
        assert_eq!(texts(&r), [(Role::Assistant, ASKS)]);
        assert_eq!(r.metrics.tokens_k, 0.004);
        assert!((r.score - (bleu - 0.1 * 0.004 + 1.0)).abs() < 1e-12);
    }
}

#[tokio::test]
async fn the_reward_of_a_candidate_that_asks_beats_one_that_does_not_by_its_score() {
    let s = setup();
    let assumes = Candidate {
        text: "Dear friend, thanks.".into(),
        tokens: 3,
    };
    let rollouts = roll(&s, &[asks(), assumes], 2).await;
    let rewards: Vec<Reward> = rollouts
        .chunks(2)
        .map(|r| {
            Reward::of(
                &r.iter()
                    .map(|x| (x.score, x.metrics.clone()))
                    .collect::<Vec<_>>(),
            )
        })
        .collect();
    let bleu = sentence_bleu(DOCUMENT, GOAL);
    // Both are rolled forward the same way; only interactivity and the candidate's tokens differ.
    assert!((rewards[0].mr - (bleu - 0.1 * 0.007 + 1.0)).abs() < 1e-12);
    assert!((rewards[1].mr - (bleu - 0.1 * 0.006)).abs() < 1e-12);
    assert_eq!((rewards[0].std, rewards[1].std), (0.0, 0.0));
    // The pair clears a margin below its gap (~1) and not one above it.
    let picked = reward::pick_with_noise(&rewards, 0.5).unwrap();
    assert_eq!((picked.chosen, picked.rejected), (0, 1));
    assert!((picked.gap - (1.0 - 0.0001)).abs() < 1e-12);
    assert!(reward::pick_with_noise(&rewards, 1.5).is_none());
}

/// Without a goal document and with no quality weight the score has no use for the document, so
/// the judge is not asked to write it out; the interactivity and the score are as with it.
#[tokio::test]
async fn the_document_is_extracted_only_when_the_score_uses_it() {
    let documents = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let s = setup_with(scripted_counting(documents.clone()));
    assert_eq!(s.roles.spec.weights.quality, 0.0);
    let count = || documents.load(std::sync::atomic::Ordering::Relaxed);
    let with_goal = roll(&s, &[asks()], 1).await;
    assert_eq!(count(), with_goal.len(), "one document a rollout for BLEU");
    assert!(with_goal.iter().all(|r| r.document == DOCUMENT));
    let without = roll_towards(&s, &[asks()], 1, "").await;
    assert_eq!(count(), with_goal.len(), "no document asked without a use");
    for (a, b) in with_goal.iter().zip(&without) {
        assert_eq!(b.document, "");
        assert_eq!(b.metrics.bleu, None);
        assert_eq!(a.metrics.interactivity, b.metrics.interactivity);
        let bleu = s.roles.spec.weights.bleu * a.metrics.bleu.unwrap();
        assert!(
            (a.score - bleu - b.score).abs() < 1e-12,
            "{} {}",
            a.score,
            b.score
        );
    }
}

/// With `judge_reasons` and `simulator_reasons` false neither the interactivity judge nor the
/// simulated user is asked for a thought (not in the grammar, not in the prompt), and the
/// rollouts score as before.
#[tokio::test]
async fn without_reasons_no_thought_is_asked_for() {
    use collabllm::engine::Constraint;
    let asked: Arc<std::sync::Mutex<Vec<(String, String)>>> = Arc::default();
    let inner = scripted();
    let engine = {
        let asked = asked.clone();
        Arc::new(ScriptedEngine::new(move |r| {
            if let Some(Constraint::Grammar(g)) = &r.constraint {
                asked.lock().unwrap().push((request_text(r), g.clone()));
            }
            inner.answer(r)
        }))
    };
    let text = pilot_text() + "judge_reasons = false\nsimulator_reasons = false\n";
    let s = setup_from(engine, text);
    assert!(!s.roles.spec.judge_reasons && !s.roles.spec.simulator_reasons);
    let rollouts = roll(&s, &[asks()], 2).await;
    let asked = asked.lock().unwrap().clone();
    let kinds = |text: &str| match asker(text) {
        Asker::Interactivity(_) => "judge",
        Asker::Simulator => "simulator",
        _ => "other",
    };
    for who in ["judge", "simulator"] {
        let of: Vec<_> = asked.iter().filter(|(t, _)| kinds(t) == who).collect();
        assert!(!of.is_empty(), "{who} was asked");
        for (text, grammar) in of {
            assert!(!grammar.contains("thought"), "{who}: {grammar}");
            assert!(!text.contains("\"thought\""), "{who}: {text}");
        }
    }
    assert!(rollouts.iter().all(|r| r.metrics.interactivity == 1.0));
}
