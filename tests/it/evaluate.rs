//! `eval`: arms evaluated with simulated users, with a scripted model whose every answer is
//! known, so the table's numbers are exact; and a stopped run that resumes.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use collabllm::collab::evaluate::{self, EvalOptions, EvalTask, Record};
use collabllm::collab::{start_policy, Policy, Roles};
use collabllm::db;
use collabllm::db::vocab::{MessageRole, Outcome};
use collabllm::engine::{Constraint, Engines};
use collabllm::protocol::LoadedProtocol;
use collabllm::study::Studio;
use serde_json::json;

use crate::common::{
    asker, models_dir, pilot_text, repo_root, request_text, scripted_engines, write_temp, Asker,
    ScriptedEngine, TestDb,
};

/// The quick pilot with a second arm that writes at once.
fn two_arms() -> LoadedProtocol {
    let path = repo_root().join("study-protocols/quick-pilot.toml");
    let text = pilot_text()
        + r#"
[[arms]]
id = "writer"
model = "smollm2-135m"
system_prompt = "Write the note at once."
"#;
    LoadedProtocol::from_text(&path, text, &models_dir()).unwrap()
}

const ASKS: &str = "Who is it for?";
const WRITES: &str = "Dear Jo, thank you for the plants.";

/// The proactive arm asks, the writer writes; the judge rates asking 1 and writing 0, every
/// document 7; the simulated user ends the chat after the first reply.
fn scripted() -> Arc<ScriptedEngine> {
    Arc::new(ScriptedEngine::new(|r| {
        if let Some(Constraint::Grammar(g)) = &r.constraint {
            // Nothing here uses the simulated user's draft: it is never asked for.
            assert!(!g.contains("current_answer"), "{g}");
        }
        let all = request_text(r);
        match asker(&all) {
            Asker::Interactivity(judged) => {
                let score = 1 + 4 * u8::from(judged.contains(ASKS));
                json!({"thought": "scripted", "interactivity": score}).to_string()
            }
            Asker::Document => json!({"thought": "scripted", "final_document": WRITES}).to_string(),
            Asker::Quality => json!({"thought": "scripted", "quality": 7}).to_string(),
            Asker::Simulator => {
                assert!(
                    !all.contains("current_answer"),
                    "the prompt asks for a draft"
                );
                json!({"thought": "", "response": "A note for Jo. [[TERMINATE CHAT]]"}).to_string()
            }
            Asker::Policy if all.contains("Write the note at once.") => WRITES.to_string(),
            Asker::Policy => ASKS.to_string(),
        }
    }))
}

struct Setup {
    roles: Roles,
    policies: Vec<Policy>,
    tasks: Vec<EvalTask>,
    engine: Arc<ScriptedEngine>,
}

fn setup() -> Setup {
    let loaded = two_arms();
    let p = &loaded.protocol;
    let engine = scripted();
    let engines = scripted_engines(engine.clone());
    let roles = Roles::start(&engines, p, &loaded.source, &models_dir(), 4).unwrap();
    let policies = p
        .arms
        .iter()
        .map(|a| start_policy(&engines, p, a, &models_dir(), 4).unwrap())
        .collect();
    Setup {
        roles,
        policies,
        tasks: evaluate::protocol_tasks(p),
        engine,
    }
}

/// The evaluation of `s`'s arms and tasks with these roles and options, logged in `dir`.
async fn evaluate_in(
    roles: &Roles,
    s: &Setup,
    options: &EvalOptions,
    dir: &std::path::Path,
) -> evaluate::EvalOutcome {
    evaluate::run(roles, &s.policies, &s.tasks, options, dir, None, &|_, _| {})
        .await
        .unwrap()
}

fn options() -> EvalOptions {
    EvalOptions {
        users: 3,
        max_turns: 4,
        seed: 5,
        baseline: "proactive".into(),
        concurrency: 2,
    }
}

#[tokio::test]
async fn the_table_has_every_arms_metrics_and_the_paired_difference() {
    let s = setup();
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::sqlite();
    let pool = db.pool();
    db::studies::import(&mut pool.get().unwrap(), &two_arms()).unwrap();
    let studio = Studio::new(pool.clone(), Engines::new()).unwrap();
    let record = Record {
        studio: &studio,
        study: "quick-pilot",
    };
    let outcome = evaluate::run(
        &s.roles,
        &s.policies,
        &s.tasks,
        &options(),
        dir.path(),
        Some(record),
        &|_, _| {},
    )
    .await
    .unwrap();
    // Every conversation is a completed simulated session of its arm, with its messages and
    // the judge's document.
    let c = &mut pool.get().unwrap();
    for row in &outcome.rows {
        let public_id = row.session.as_deref().expect("recorded");
        let session = db::sessions::find_by_public_id(c, public_id)
            .unwrap()
            .unwrap();
        assert_eq!(session.outcome, Some(Outcome::Completed));
        assert!(
            db::participants::get(c, session.participant_id)
                .unwrap()
                .simulated
        );
        let arm = db::studies::arms_of(c, session.study_version_id)
            .unwrap()
            .into_iter()
            .find(|a| Some(a.id) == session.arm_id)
            .unwrap();
        assert_eq!(arm.name, row.arm);
        assert_eq!(session.task_id.as_deref(), Some("note"));
        let messages = db::messages::list_for_session(c, session.id).unwrap();
        assert_eq!(messages[0].role, MessageRole::User);
        assert_eq!(messages[0].content, "A note for Jo.");
        assert_eq!(messages[1].role, MessageRole::Assistant);
        let reply = if row.arm == "writer" { WRITES } else { ASKS };
        assert_eq!(messages[1].content, reply);
        let document = db::revisions::latest(c, session.id).unwrap().unwrap();
        assert_eq!(document.content, WRITES);
    }
    // Recorded sessions are not drawn: the ledger holds no row for them.
    let study = db::studies::find_by_slug(c, "quick-pilot")
        .unwrap()
        .unwrap();
    let version = db::studies::current_version(c, study.id).unwrap();
    assert!(db::assignments::list_for_version(c, version.id)
        .unwrap()
        .is_empty());
    let t = &outcome.table;
    let metric = |arm: &str, m: &str| t.arms[arm].metrics[m].unwrap();
    assert_eq!((t.arms["proactive"].n, t.arms["writer"].n), (3, 3));
    assert_eq!(metric("proactive", "itr").mean, 100.0);
    assert_eq!(metric("writer", "itr").mean, 0.0);
    assert_eq!(metric("writer", "quality").mean, 7.0);
    assert_eq!(metric("proactive", "turns").mean, 1.0);
    // Tokens: the scripted engine counts words; 4 words, and 7, in thousands.
    assert!((metric("proactive", "tokens_k").mean - 0.004).abs() < 1e-12);
    assert!((metric("writer", "tokens_k").mean - 0.007).abs() < 1e-12);
    // No goal document in the protocol's topics: no BLEU.
    assert!(t.arms["proactive"].metrics["bleu"].is_none());
    let diff = t.diff["writer"]["itr"].unwrap();
    assert_eq!(
        (diff.mean, diff.lo, diff.hi, diff.n),
        (-100.0, -100.0, -100.0, 3)
    );
    assert_eq!(t.diff["writer"]["quality"].unwrap().mean, 0.0);
    assert!(!t.diff.contains_key("proactive"));
    // The paired tests: three users all 100 points lower in ITR — of the 8 sign patterns only
    // the two of equal signs are as extreme (p = 0.25, one arm: Holm changes nothing; no spread,
    // so no effect size); the same quality everywhere is no evidence at all (p = 1).
    let itr = t.tests["writer"]["itr"].unwrap();
    assert_eq!((itr.n, itr.p, itr.p_holm), (3, 0.25, 0.25));
    assert_eq!((itr.effect_size, itr.users_needed), (None, None));
    assert_eq!(t.tests["writer"]["quality"].unwrap().p, 1.0);
    assert!(t.tests["writer"]["bleu"].is_none());

    let (json_path, csv_path) =
        evaluate::write_outputs(dir.path(), &outcome, json!({"seed": 5})).unwrap();
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(json_path).unwrap()).unwrap();
    assert_eq!(written["arms"]["writer"]["itr"]["mean"], 0.0);
    assert_eq!(written["arms"]["writer"]["n"], 3);
    assert_eq!(written["baseline"], "proactive");
    assert_eq!(written["diff"]["writer"]["itr"]["lo"], -100.0);
    assert_eq!(written["tests"]["writer"]["itr"]["p"], 0.25);
    let csv = std::fs::read_to_string(csv_path).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "arm,user,task,metric,value");
    assert_eq!(lines.len(), 1 + 2 * 3 * 5);
    assert!(lines.contains(&"writer,2,note/thank-you,itr,0"), "{csv}");
}

#[tokio::test]
async fn a_stopped_evaluation_resumes_without_redoing_finished_conversations() {
    let s = setup();
    let dir = tempfile::tempdir().unwrap();
    let first = evaluate_in(&s.roles, &s, &options(), dir.path()).await;
    let requests = s.engine.requests.load(Ordering::SeqCst);
    // All finished: nothing is asked again and the table is the same.
    let again = evaluate_in(&s.roles, &s, &options(), dir.path()).await;
    assert_eq!(s.engine.requests.load(Ordering::SeqCst), requests);
    assert_eq!(again.table, first.table);
    // A run stopped mid-write: the last conversation's line is cut; it alone is done again.
    let log = dir.path().join("eval.jsonl");
    let text = std::fs::read_to_string(&log).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    let last = lines.pop().unwrap();
    let cut = format!("{}\n{}", lines.join("\n"), &last[..last.len() / 2]);
    std::fs::write(&log, cut).unwrap();
    let resumed = evaluate_in(&s.roles, &s, &options(), dir.path()).await;
    assert!(s.engine.requests.load(Ordering::SeqCst) > requests);
    assert_eq!(resumed.table, first.table);
    assert_eq!(resumed.rows, first.rows);
    // Another seed is another set of users: nothing is reused.
    let before = s.engine.requests.load(Ordering::SeqCst);
    let other = EvalOptions {
        seed: 6,
        ..options()
    };
    evaluate_in(&s.roles, &s, &other, dir.path()).await;
    assert!(s.engine.requests.load(Ordering::SeqCst) >= before + 6 * 3);
    // Another document limit changes what the simulator and the judge read: done again too.
    let before = s.engine.requests.load(Ordering::SeqCst);
    let mut roles = s.roles.clone();
    roles.spec.max_document_chars += 1;
    evaluate_in(&roles, &s, &options(), dir.path()).await;
    assert!(s.engine.requests.load(Ordering::SeqCst) >= before + 6 * 3);
}

#[tokio::test]
async fn bleu_is_scored_against_the_tasks_reference() {
    let s = setup();
    let dir = tempfile::tempdir().unwrap();
    let reference = "Dear Jo, thank you for the plants and the tomatoes.";
    let tasks_file = write_temp(
        dir.path(),
        "tasks.jsonl",
        &json!({"id": "jo", "kind": "note", "prompt": "A thank-you note to Jo.", "reference": reference})
            .to_string(),
    );
    let tasks = evaluate::file_tasks(&tasks_file).unwrap();
    let out = dir.path().join("out");
    let outcome = evaluate::run(
        &s.roles,
        &s.policies,
        &tasks,
        &options(),
        &out,
        None,
        &|_, _| {},
    )
    .await
    .unwrap();
    let expected = collabllm::collab::metrics::sentence_bleu(WRITES, reference);
    assert!(expected > 0.0 && expected < 1.0);
    let bleu = outcome.table.arms["writer"].metrics["bleu"].unwrap();
    assert!(
        (bleu.mean - expected).abs() < 1e-12,
        "{bleu:?} vs {expected}"
    );
    assert_eq!(outcome.rows[0].task, "jo");
}

/// How often an arm's first reply asks: every contrast case answered by every arm with the same
/// seeds, short replies, rates by kind, and the paired difference to the baseline; the table
/// shows them.
#[tokio::test]
async fn the_arms_first_replies_are_counted_as_asking_or_writing_by_kind() {
    use collabllm::collab::{asking, contrast};
    use std::sync::Mutex;
    // (the writer asked, seed, max tokens) of each request.
    type Seen = Vec<(bool, Option<u32>, u32)>;
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let engine = {
        let seen = seen.clone();
        Arc::new(ScriptedEngine::new(move |r| {
            let writer = request_text(r).contains("Write the note at once.");
            seen.lock()
                .unwrap()
                .push((writer, r.sampling.seed, r.sampling.max_tokens));
            if writer { WRITES } else { ASKS }.to_string()
        }))
    };
    let loaded = two_arms();
    let p = &loaded.protocol;
    let engines = scripted_engines(engine);
    let policies: Vec<Policy> = p
        .arms
        .iter()
        .map(|a| start_policy(&engines, p, a, &models_dir(), 4).unwrap())
        .collect();
    let cases = contrast::read_cases(None).unwrap();
    let replies = asking::first_replies(&policies, &cases, 2, 9, 3, &|_, _| {})
        .await
        .unwrap();
    assert_eq!(replies.len(), 2 * 2 * cases.len());
    let seen = seen.lock().unwrap().clone();
    assert!(seen.iter().all(|(_, _, max)| *max <= 96), "{seen:?}");
    let seeds = |writer: bool| {
        let mut s: Vec<_> = seen.iter().filter(|r| r.0 == writer).map(|r| r.1).collect();
        s.sort();
        s
    };
    assert_eq!(
        seeds(true),
        seeds(false),
        "both arms answer with the same seeds"
    );
    assert_eq!(
        seeds(true)
            .iter()
            .collect::<std::collections::HashSet<_>>()
            .len(),
        2 * cases.len(),
        "each case and sample has a seed of its own"
    );

    let table = asking::Asking::of(&replies, "writer", 2);
    let ambiguous = cases.iter().filter(|c| c.kind == "ambiguous").count();
    let rate = &table.arms["proactive"]["ambiguous"];
    assert_eq!((rate.k, rate.n), (2 * ambiguous, 2 * ambiguous));
    assert_eq!(table.arms["writer"]["clear"].k, 0);
    let d = table.diff["proactive"]["clear"].clone().unwrap();
    assert_eq!((d.mean, d.low, d.high), (1.0, 1.0, 1.0));

    let s = setup();
    let mut outcome = evaluate_in(
        &s.roles,
        &s,
        &options(),
        tempfile::tempdir().unwrap().path(),
    )
    .await;
    outcome.table.asking = Some(table);
    let shown = outcome.table.to_string();
    assert!(
        shown.contains("first replies that ask a question"),
        "{shown}"
    );
    assert!(shown.contains("100% ["), "{shown}");
}
