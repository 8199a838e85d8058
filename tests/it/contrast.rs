//! `eval reward`: the contrast set's check of the judge and MR, with scripted models whose
//! agreement is known, so the report's numbers are exact.

use std::sync::Arc;

use collabllm::collab::contrast::{self, ContrastOptions, Side, BUILT_IN};
use collabllm::collab::{start_policy, Roles};
use collabllm::protocol::LoadedProtocol;
use serde_json::json;

use crate::common::{
    asker, models_dir, pilot_text, repo_root, request_text, scripted_engines, write_temp, Asker,
    ScriptedEngine,
};

fn pilot() -> LoadedProtocol {
    let path = repo_root().join("study-protocols/quick-pilot.toml");
    let text = pilot_text() + "samples = 2\nwindow = 1\n";
    LoadedProtocol::from_text(&path, text, &models_dir()).unwrap()
}

/// One scripted model plays every role: the judge rates 1 the conversations that contain one of
/// `preferred` (0 the others), the simulated user ends the chat at once, the policy says little.
fn scripted(preferred: Vec<String>) -> ScriptedEngine {
    ScriptedEngine::new(move |r| match asker(&request_text(r)) {
        Asker::Interactivity(judged) => {
            // The judge's 1–5 rating: 5 reads as 1, 1 as 0.
            let score = 1 + 4 * u8::from(preferred.iter().any(|p| judged.contains(p.as_str())));
            json!({"thought": "scripted", "interactivity": score}).to_string()
        }
        Asker::Document => json!({"thought": "scripted", "final_document": "A note."}).to_string(),
        Asker::Quality => json!({"thought": "scripted", "quality": 5}).to_string(),
        Asker::Simulator => {
            json!({"thought": "done", "response": "Thanks. [[TERMINATE CHAT]]"}).to_string()
        }
        Asker::Policy => "Noted.".to_string(),
    })
}

async fn check(preferred: Vec<String>, samples: u32) -> contrast::ContrastReport {
    let loaded = pilot();
    let p = &loaded.protocol;
    let engines = scripted_engines(Arc::new(scripted(preferred)));
    let roles = Roles::start(
        &engines,
        p,
        &loaded.source,
        &crate::common::real_models(),
        4,
    )
    .unwrap();
    let policy = start_policy(&engines, p, &p.arms[0], &crate::common::real_models(), 4).unwrap();
    let cases = contrast::read_cases(None).unwrap();
    let options = ContrastOptions {
        samples,
        window: 1,
        seed: 3,
    };
    contrast::run(&roles, &policy, &cases, &options, &|_, _| {})
        .await
        .unwrap()
}

fn replies(expected: bool) -> Vec<String> {
    contrast::read_cases(None)
        .unwrap()
        .iter()
        .map(|c| {
            let side = if expected {
                c.expected
            } else {
                c.expected.other()
            };
            match side {
                Side::A => c.a.clone(),
                Side::B => c.b.clone(),
            }
        })
        .collect()
}

#[tokio::test]
async fn a_judge_that_agrees_is_reported_as_agreeing() {
    let report = check(replies(true), 2).await;
    assert_eq!(
        (report.judge.agree, report.judge.n, report.judge.ties),
        (30, 30, 0)
    );
    assert_eq!(report.judge.rate, 1.0);
    assert!(
        report.judge.lo > 0.85 && report.judge.hi == 1.0,
        "{:?}",
        report.judge
    );
    let mr = report.mr.unwrap();
    assert_eq!((mr.agree, mr.n), (30, 30));
    // The scripted rollouts score the same every time: no noise, every gap clears it.
    let above = report.mr_above_noise.unwrap();
    assert_eq!((above.agree, above.n), (30, 30));
    for case in &report.cases {
        let r = case.rewards.as_ref().unwrap();
        assert!(r.gap > 0.9 && r.noise == 0.0, "{}: {r:?}", case.id);
    }
    assert_eq!(report.judge_by_kind["ambiguous"].n, 16);
    assert_eq!(report.judge_by_kind["clear"].n, 14);
    assert!(
        report.verdict().contains("carries signal"),
        "{}",
        report.verdict()
    );
}

#[tokio::test]
async fn a_judge_that_disagrees_is_reported_as_disagreeing() {
    let report = check(replies(false), 2).await;
    assert_eq!((report.judge.agree, report.judge.n), (0, 30));
    assert_eq!(report.judge.lo, 0.0);
    assert!(report.judge.hi < 0.15);
    assert_eq!(report.mr.unwrap().agree, 0);
    assert!(report.verdict().contains("cannot be told from chance"));
}

#[tokio::test]
async fn a_judge_that_rates_everything_alike_ties_and_samples_zero_skips_mr() {
    let report = check(Vec::new(), 0).await;
    assert_eq!((report.judge.agree, report.judge.ties), (0, 30));
    assert!(report.mr.is_none() && report.mr_above_noise.is_none());
    assert!(report.cases.iter().all(|c| c.rewards.is_none()));
}

#[test]
fn the_built_in_contrast_set_is_balanced() {
    let cases = contrast::parse_cases("built-in", BUILT_IN).unwrap();
    assert!(cases.len() >= 30);
    let expected_a = cases.iter().filter(|c| c.expected == Side::A).count();
    // A judge that always picks one position agrees with half the set, no more.
    assert_eq!(expected_a * 2, cases.len());
    for kind in ["ambiguous", "clear"] {
        assert!(cases.iter().filter(|c| c.kind == kind).count() >= 10);
    }
}

#[test]
fn a_bad_contrast_case_is_refused_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let good = BUILT_IN.lines().next().unwrap();
    let same = json!({
        "id": "x", "kind": "clear", "task": "note", "intent": "",
        "conversation": [{"role": "user", "content": "Write a note."}],
        "a": "A note.", "b": " A   note. ", "expected": "a"
    });
    let path = write_temp(dir.path(), "cases.jsonl", &format!("{good}\n\n{same}\n"));
    let e = contrast::read_cases(Some(&path)).unwrap_err().to_string();
    assert!(e.contains(&format!("{}:3", path.display())), "{e}");
    assert!(e.contains("two different"), "{e}");
    let path = write_temp(dir.path(), "broken.jsonl", "{\"id\": 1}\n");
    let e = contrast::read_cases(Some(&path)).unwrap_err().to_string();
    assert!(e.contains(":1: not a contrast case"), "{e}");
}

/// A reply without a recorded token count is counted at about four characters a token: close to
/// what the real tokenizer says for the replies of the contrast set.
#[test]
fn unrecorded_replies_are_counted_close_to_their_real_tokens() {
    let model =
        collabllm::engine::llama::load_model(&crate::common::model_path(), None, &[]).unwrap();
    for case in contrast::read_cases(None).unwrap() {
        for reply in [&case.a, &case.b] {
            let real = model
                .model
                .vocab()
                .tokenize(reply.as_bytes(), false, false)
                .len() as f64;
            let estimate = f64::from(collabllm::collab::estimated_tokens(reply));
            assert!(
                estimate >= 0.6 * real && estimate <= 1.6 * real,
                "{}: estimated {estimate}, really {real}: {reply}",
                case.id
            );
        }
    }
}

/// `eval simulator` on a scripted user whose behaviour is known: it opens vaguely (or pastes its
/// goal, when `pastes` says so), answers a question with its goal, and ends the chat once the
/// text it asked for is there; the report's rates are exact.
async fn simulator_check(pastes: bool) -> collabllm::collab::fidelity::FidelityReport {
    let cases = contrast::read_cases(None).unwrap();
    let clear: Vec<String> = cases
        .iter()
        .filter(|c| c.kind == "clear")
        .map(|c| c.intent.clone())
        .collect();
    let engine = ScriptedEngine::new(move |r| {
        let all = request_text(r);
        let goal = all
            .split("you never paste it):\n")
            .nth(1)
            .and_then(|rest| rest.split("\n\nHow you behave").next())
            .unwrap_or_default()
            .to_string();
        let response = if clear.contains(&goal) {
            "Perfect, thanks! [[TERMINATE CHAT]]".to_string()
        } else if all.contains("(nothing yet: you write first)") && !pastes {
            "hi, can you help me with something?".to_string()
        } else {
            goal
        };
        json!({"thought": "scripted", "response": response}).to_string()
    });
    let loaded = pilot();
    let engines = scripted_engines(Arc::new(engine));
    let roles = Roles::start(&engines, &loaded.protocol, &loaded.source, &models_dir(), 4).unwrap();
    collabllm::collab::fidelity::run(&roles, &cases, 2, 1, &|_, _| {})
        .await
        .unwrap()
}

#[tokio::test]
async fn the_simulator_check_counts_leaks_answers_and_endings() {
    let report = simulator_check(false).await;
    let ambiguous = 2 * 16;
    assert_eq!(
        (report.first_message_leaks.k, report.first_message_leaks.n),
        (0, ambiguous)
    );
    assert_eq!(report.answer_carries_intent.n, ambiguous);
    assert!(
        report.answer_carries_intent.rate > 0.9,
        "an answer that restates the goal adds its facts: {:?}",
        report.answer_carries_intent
    );
    assert_eq!(report.ends_after_question.k, 0);
    assert_eq!(
        (report.ends_when_met.k, report.ends_when_met.n),
        (2 * 14, 2 * 14)
    );
    let words = report.message_words.unwrap();
    assert_eq!(words.n, 2 * ambiguous);
    assert!(words.low <= words.mean && words.mean <= words.high);

    let pasting = simulator_check(true).await;
    assert_eq!(
        pasting.first_message_leaks.k, ambiguous,
        "{:?}",
        pasting.first_message_leaks
    );
}
