//! The CollabLLM core with the real model: the user simulator and the judge answer in shape,
//! simulated participants complete a protocol over the websocket, MR pairs are scored, stored,
//! resumed and reproduced, and bad input is refused or skipped without losing finished work.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use collabllm::collab::pairs::{self, PairsOptions, PairsSummary, SessionKind};
use collabllm::collab::reward::{MrOverrides, MrSettings};
use collabllm::collab::simulate::{self, SimulateOptions, Tally};
use collabllm::collab::simulator::{self, Draft, TERMINATE};
use collabllm::collab::{judge, Goal, Roles, Task};
use collabllm::db::models::NewMessage;
use collabllm::db::vocab::{MessageRole, Outcome, RevisionAuthor};
use collabllm::db::{self, schema, DbPool};
use collabllm::engine::registry::engine_name;
use collabllm::engine::CANDIDATE_RESAMPLE_ROUNDS;
use collabllm::engine::{ChatMessage, Engines, Role};
use collabllm::protocol::LoadedProtocol;
use collabllm::study::Studio;
use collabllm::web::AppState;
use diesel::prelude::*;
use serde_json::Value;

use crate::common::{
    asker, assert_trl_pair, models_dir, pilot_text, repo_root, request_text, scripted_engines,
    Asker, ScriptedEngine, TestDb, TestServer, JUDGE_MODEL_ID,
};
use crate::on_both_backends_async;

/// The quick pilot with small MR settings, so a test scores a turn in seconds.
fn pilot(extra: &str) -> LoadedProtocol {
    let path = repo_root().join("study-protocols/quick-pilot.toml");
    let text =
        pilot_text() + "samples = 2\nwindow = 1\nmax_turns = 2\nmax_document_chars = 300\n" + extra;
    LoadedProtocol::from_text(&path, text, &models_dir()).unwrap()
}

fn import(pool: &DbPool, loaded: &LoadedProtocol) {
    db::studies::import(&mut pool.get().unwrap(), loaded).unwrap();
}

/// A person's session with two turns and a final document.
async fn seed_session(pool: &DbPool) -> i64 {
    let studio = Studio::new(pool.clone(), Engines::new()).unwrap();
    let entry = studio
        .enter("quick-pilot".into(), Default::default(), None, true)
        .await
        .unwrap();
    let session = studio.agree(entry.session.id).await.unwrap();
    let pool = pool.clone();
    tokio::task::spawn_blocking(move || {
        let c = &mut pool.get().unwrap();
        for (user, assistant) in [
            ("i need a short note for someone", "Happy to help! Who is the note for, and what is it about?"),
            ("my neighbour, she watered my plants", "Dear neighbour, thank you so much for watering my plants while I was away."),
        ] {
            db::messages::append(c, session.id, &NewMessage { role: MessageRole::User, content: user, ..Default::default() }).unwrap();
            db::messages::append(
                c,
                session.id,
                &NewMessage { role: MessageRole::Assistant, content: assistant, gen_tokens: Some(20), ..Default::default() },
            )
            .unwrap();
        }
        db::revisions::append(
            c,
            session.id,
            RevisionAuthor::User,
            None,
            "Dear Ann, thank you for watering my plants during my holiday. The tomatoes are thriving!",
        )
        .unwrap();
        session.id
    })
    .await
    .unwrap()
}

fn options(study: &str) -> PairsOptions {
    PairsOptions {
        study: study.into(),
        sessions: SessionKind::All,
        mr: MrOverrides {
            candidates: Some(2),
            samples: Some(2),
            window: Some(1),
            margin: Some(0.0),
            min_gap_se: None,
        },
        seed: 11,
        models_dir: crate::common::real_models(),
        judge_model: None,
    }
}

async fn run_pairs(
    pool: &DbPool,
    engines: &Engines,
    options: &PairsOptions,
    out: &Path,
) -> PairsSummary {
    pairs::run(pool, engines, options, out, &|_, _| {})
        .await
        .unwrap()
}

fn rows(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn count_rollouts(pool: &DbPool) -> i64 {
    schema::rollouts::table
        .count()
        .get_result(&mut pool.get().unwrap())
        .unwrap()
}

/// The judge and simulated user the example protocols name (fetched by `collabllm models fetch
/// --judge`): they load and answer in shape, reproducibly.
#[tokio::test(flavor = "multi_thread")]
async fn the_fetched_judge_rates_a_reply_in_shape() {
    let loaded = crate::common::protocol("quick-pilot.toml");
    let (simulator, judge_model) = loaded.protocol.collab_models();
    assert_eq!(
        (simulator.as_str(), judge_model.as_str()),
        (JUDGE_MODEL_ID, JUDGE_MODEL_ID)
    );
    let engines = Engines::new();
    let roles = Roles::start(
        &engines,
        &loaded.protocol,
        &loaded.source,
        &crate::common::real_models(),
        2,
    )
    .unwrap_or_else(|e| panic!("the judge model is needed: {e}"));
    let task_spec = &loaded.protocol.tasks[0];
    let task = Task::of(task_spec, &task_spec.topics[0]);
    let goal = Goal {
        intent: task_spec.topics[0].hidden_intent.clone(),
        document: String::new(),
    };
    let m = simulator::next_message(&roles, &task, &goal, &[], Draft::Skip, 0)
        .await
        .unwrap();
    assert!(
        !m.response.trim().is_empty() && !m.response.contains(TERMINATE),
        "{m:?}"
    );
    let asked = [
        ChatMessage::new(Role::User, "Write a thank-you note."),
        ChatMessage::new(
            Role::Assistant,
            "Happy to. Who is it for, and what would you like to thank them for?",
        ),
    ];
    let (score, reason) = judge::interactivity(&roles, &task, &asked, 1, 1)
        .await
        .unwrap();
    assert!(
        (0.0..=1.0).contains(&score) && !reason.trim().is_empty(),
        "{score} {reason:?}"
    );
    let again = judge::interactivity(&roles, &task, &asked, 1, 1)
        .await
        .unwrap();
    assert_eq!(
        (score, reason),
        again,
        "the same question and seed give the same answer"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn simulator_and_judge_answer_in_shape() {
    let loaded = pilot("");
    let engines = Engines::new();
    let roles = Roles::start(
        &engines,
        &loaded.protocol,
        &loaded.source,
        &crate::common::real_models(),
        4,
    )
    .unwrap();
    let task_spec = &loaded.protocol.tasks[0];
    let task = Task::of(task_spec, &task_spec.topics[0]);
    let goal = Goal {
        intent: task_spec.topics[0].hidden_intent.clone(),
        document: String::new(),
    };
    for seed in 0..3 {
        let m = simulator::next_message(&roles, &task, &goal, &[], Draft::Keep, seed)
            .await
            .unwrap();
        assert!(!m.response.trim().is_empty() || m.terminates);
        assert!(
            !m.response.contains(TERMINATE),
            "the marker is never sent: {m:?}"
        );
    }
    // Where the draft is not used, it is not asked for.
    let m = simulator::next_message(&roles, &task, &goal, &[], Draft::Skip, 0)
        .await
        .unwrap();
    assert!(m.current_answer.is_empty() && !m.response.trim().is_empty());
    let conversation = [
        ChatMessage::new(Role::User, "help me write a thank-you note"),
        ChatMessage::new(
            Role::Assistant,
            "Sure! Who is it for, and what are you thanking them for?",
        ),
        ChatMessage::new(Role::User, "my neighbour Ann, for watering my plants"),
        ChatMessage::new(
            Role::Assistant,
            "Dear Ann, thank you so much for watering my plants!",
        ),
    ];
    // The judge is reproducible: the same question and seed give the same answer.
    let judged = judge::interactivity(&roles, &task, &conversation, 1, 1)
        .await
        .unwrap();
    let again = judge::interactivity(&roles, &task, &conversation, 1, 1)
        .await
        .unwrap();
    assert_eq!(judged, again);
    let document = judge::extract_document(&roles, &task, &conversation, 2)
        .await
        .unwrap();
    // The document and quality judges answer in a shape that parses.
    judge::quality(&roles, &task, &document, 3).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn simulated_participants_complete_the_protocol_over_the_websocket() {
    let db = TestDb::sqlite();
    let loaded = pilot("");
    let pool = db.pool();
    import(&pool, &loaded);
    let engines = Engines::new();
    engines
        .load_protocol(&loaded.protocol, &crate::common::real_models())
        .unwrap();
    let state = AppState::new(pool.clone(), engines, crate::common::real_models()).unwrap();
    let server = TestServer::start(state.clone());
    let options = SimulateOptions {
        study: "quick-pilot".into(),
        arm: Some("proactive".into()),
        participants: 2,
        concurrency: 2,
        seed: 5,
        models_dir: crate::common::real_models(),
    };
    let tallies = std::sync::Mutex::new(Vec::new());
    let summary = simulate::run(
        &state.studio,
        &pool,
        &state.engines,
        &format!("ws://{}", server.addr),
        &options,
        &|t: &Tally| tallies.lock().unwrap().push(t.clone()),
        std::future::pending(),
    )
    .await
    .unwrap();
    assert_eq!(summary.completed.len(), 2, "failures: {:?}", summary.failed);
    assert!(!summary.stopped && summary.abandoned.is_empty());
    // Progress is heard turn by turn, not only when a participant is done.
    let tallies = tallies.into_inner().unwrap();
    let last = tallies.last().unwrap();
    assert_eq!((last.completed, last.failed, last.turns), (2, 0, 4));
    assert!(tallies.iter().any(|t| t.turns > 0 && t.done() == 0));
    assert!(last.turn_seconds > 0.0);
    let c = &mut pool.get().unwrap();
    for public_id in &summary.completed {
        let session = db::sessions::find_by_public_id(c, public_id)
            .unwrap()
            .unwrap();
        assert_eq!(
            (session.state.as_str(), session.outcome),
            ("finished", Some(Outcome::Completed))
        );
        assert!(
            db::participants::get(c, session.participant_id)
                .unwrap()
                .simulated
        );
        let messages = db::messages::list_for_session(c, session.id).unwrap();
        let turns = messages
            .iter()
            .filter(|m| m.role == MessageRole::Assistant)
            .count();
        // min_turns = 2 and [collab] max_turns = 2: exactly two turns, whatever the simulator says.
        assert_eq!(turns, 2, "{messages:?}");
        assert!(messages.iter().all(|m| !m.content.contains(TERMINATE)));
        let ratings = db::ratings::list_for_session(c, session.id).unwrap();
        let keys: Vec<&str> = ratings.iter().map(|r| r.rating_key.as_str()).collect();
        assert_eq!(
            keys.iter().filter(|k| **k == "interaction").count(),
            2,
            "{keys:?}"
        );
        assert!(keys.contains(&"document_quality"));
    }
    // The forced arm is recorded in the assignment ledger.
    let ledger = schema::assignments::table
        .select(schema::assignments::method)
        .load::<String>(c)
        .unwrap();
    assert_eq!(ledger, ["forced", "forced"]);
}

async fn pairs_are_scored_stored_resumed_and_reproduced(db: TestDb) {
    let pool = db.pool();
    import(&pool, &pilot(""));
    let session_id = seed_session(&pool).await;
    let engines = Engines::new();
    let dir = tempfile::tempdir().unwrap();
    let first = dir.path().join("first.jsonl");
    let options = options("quick-pilot");
    let summary = run_pairs(&pool, &engines, &options, &first).await;
    assert_eq!(
        (
            summary.turns,
            summary.scored,
            summary.skipped,
            summary.pairs
        ),
        (2, 2, 0, 2),
        "{summary:?}"
    );
    assert_eq!((summary.rollouts_run, summary.rollouts_reused), (8, 0));
    // Without the noise-aware rule every turn over the margin is a pair, and none is left out.
    assert_eq!(
        (summary.over_margin, summary.below_noise),
        (summary.pairs, 0)
    );
    let pairs = rows(&first);
    for row in &pairs {
        assert_trl_pair(row);
        for side in ["metrics_chosen", "metrics_rejected"] {
            for metric in ["bleu", "tokens_k", "interactivity", "mr_std"] {
                assert!(row[side][metric].is_number(), "{side}.{metric} in {row}");
            }
            assert_eq!(row[side]["rollouts"], 2);
            // The per-sample scores behind the reward: their mean is the score of the side.
            let scores: Vec<f64> = row[side]["scores"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect();
            assert_eq!(scores.len(), 2);
            let score = if side == "metrics_chosen" {
                "score_chosen"
            } else {
                "score_rejected"
            };
            let mean = scores.iter().sum::<f64>() / 2.0;
            assert!((mean - row[score].as_f64().unwrap()).abs() < 1e-9, "{row}");
        }
        let meta = &row["metadata"];
        assert_eq!(meta["study"], "quick-pilot");
        assert_eq!(
            meta["bleu_reference"], "goal document",
            "a recorded session's final document is the goal"
        );
        assert!(meta["participant"].as_str().unwrap().starts_with("p-"));
        assert_eq!(meta["policy_model_sha256"].as_str().unwrap().len(), 64);
        assert_eq!(meta["judge_model_sha256"], meta["policy_model_sha256"]);
        assert_eq!(
            (meta["samples"].as_u64(), meta["window"].as_u64()),
            (Some(2), Some(1))
        );
        assert!(
            meta["chosen_is_given"] != meta["rejected_is_given"],
            "the reply given vs a fresh one"
        );
    }
    assert_eq!(
        pairs[0]["prompt"].as_array().unwrap().len(),
        2,
        "system, user"
    );
    assert_eq!(pairs[1]["prompt"].as_array().unwrap().len(), 4);

    // Everything is stored: 2 turns × 2 candidates × 2 rollouts, a reward per candidate.
    assert_eq!(count_rollouts(&pool), 8);
    let rewards = db::rewards::list_for_session(&mut pool.get().unwrap(), session_id).unwrap();
    assert_eq!(rewards.len(), 4);
    assert_eq!(
        rewards.iter().filter(|r| r.candidate_id.is_none()).count(),
        2
    );

    // An interrupted run: it stopped after the first turn (a turn's rollouts are stored
    // together). The next run scores only the second turn.
    diesel::delete(schema::rollouts::table.filter(schema::rollouts::turn.eq(4)))
        .execute(&mut pool.get().unwrap())
        .unwrap();
    let second = dir.path().join("second.jsonl");
    let summary = run_pairs(&pool, &engines, &options, &second).await;
    assert_eq!(
        (summary.rollouts_run, summary.rollouts_reused, summary.pairs),
        (4, 4, 2)
    );
    assert_eq!(count_rollouts(&pool), 8);
    assert_eq!(rows(&second), pairs, "a resumed run gives the same pairs");

    // The noise-aware rule filters the same rollouts (reused, not run again): a gap never
    // reaches a million standard errors.
    let strict = PairsOptions {
        mr: MrOverrides {
            min_gap_se: Some(1e6),
            ..options.mr
        },
        ..options.clone()
    };
    let none_clear = dir.path().join("strict.jsonl");
    let summary = run_pairs(&pool, &engines, &strict, &none_clear).await;
    assert_eq!((summary.rollouts_run, summary.rollouts_reused), (0, 8));
    assert_eq!(
        (summary.pairs, summary.over_margin, summary.below_noise),
        (0, 2, 2)
    );
    assert!(!none_clear.exists());

    // Nothing stored at all: the same seeds give the same pairs again.
    diesel::delete(schema::rollouts::table)
        .execute(&mut pool.get().unwrap())
        .unwrap();
    diesel::delete(schema::rewards::table)
        .execute(&mut pool.get().unwrap())
        .unwrap();
    diesel::delete(schema::candidates::table)
        .execute(&mut pool.get().unwrap())
        .unwrap();
    let third = dir.path().join("third.jsonl");
    let summary = run_pairs(&pool, &engines, &options, &third).await;
    assert_eq!(summary.rollouts_run, 8);
    assert_eq!(rows(&third), pairs, "same seeds, same build: same pairs");

    // Only people's sessions, or only simulated ones.
    let simulated_only = PairsOptions {
        sessions: SessionKind::Simulated,
        ..options
    };
    let none = dir.path().join("none.jsonl");
    let summary = run_pairs(&pool, &engines, &simulated_only, &none).await;
    assert_eq!((summary.turns, summary.pairs), (0, 0));
    assert!(!none.exists(), "no pairs: no file");
}
on_both_backends_async!(pairs_are_scored_stored_resumed_and_reproduced);

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_refused_or_skipped() {
    let db = TestDb::sqlite();
    let pool = db.pool();
    import(&pool, &pilot(""));
    let engines = Engines::new();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pairs.jsonl");

    let e = pairs::run(&pool, &engines, &options("no-such-study"), &out, &|_, _| {})
        .await
        .unwrap_err();
    assert!(e.to_string().contains("no study \"no-such-study\""), "{e}");
    assert!(!out.exists());

    // A session without assistant turns: nothing to score, no error.
    let studio = Studio::new(pool.clone(), Engines::new()).unwrap();
    let entry = studio
        .enter("quick-pilot".into(), Default::default(), None, true)
        .await
        .unwrap();
    studio.agree(entry.session.id).await.unwrap();
    let summary = run_pairs(&pool, &engines, &options("quick-pilot"), &out).await;
    assert_eq!((summary.turns, summary.pairs), (0, 0));
    assert!(!out.exists(), "no pairs: no file, not an empty one");
}

/// How the remote judge is chosen: by the protocol's `[collab] judge_model`, or by `pairs
/// --judge-model` over a protocol that names the local model.
#[derive(Clone, Copy, PartialEq)]
enum JudgeNamed {
    InProtocol,
    OnCommandLine,
}

/// A remote judge that answers with garbage, or not at all: every turn is skipped with a logged
/// reason, the run ends normally, and the candidates it generated stay stored.
async fn with_remote_judge(behaviour: &'static str, named: JudgeNamed) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buffer = vec![0u8; 65536];
                let _ = socket.read(&mut buffer).await;
                if behaviour == "silent" {
                    tokio::time::sleep(std::time::Duration::from_secs(30)).await;
                    return;
                }
                let body = "data: {\"choices\":[{\"delta\":{\"content\":\"I think it is great!\"}}]}\n\ndata: [DONE]\n\n";
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(response.as_bytes()).await;
            });
        }
    });
    let remote = format!(
        "\n[[models]]\nid = \"remote-judge\"\nendpoint = \"http://127.0.0.1:{port}/v1\"\ntimeout_seconds = 1\n"
    );
    let pilot = pilot(&remote);
    let mut options = options("quick-pilot");
    let (text, protocols_judge) = match named {
        JudgeNamed::InProtocol => (
            pilot.text.replace(
                "judge_model = \"smollm2-135m\"",
                "judge_model = \"remote-judge\"",
            ),
            "remote-judge",
        ),
        JudgeNamed::OnCommandLine => {
            options.judge_model = Some("remote-judge".into());
            (pilot.text.clone(), "smollm2-135m")
        }
    };
    let loaded = LoadedProtocol::from_text(&pilot.source, text, &models_dir()).unwrap();
    assert_eq!(loaded.protocol.collab_models().1, protocols_judge);
    let db = TestDb::sqlite();
    let pool = db.pool();
    import(&pool, &loaded);
    seed_session(&pool).await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pairs.jsonl");
    if named == JudgeNamed::OnCommandLine {
        let unknown = PairsOptions {
            judge_model: Some("no-such-model".into()),
            ..options.clone()
        };
        let refused = pairs::run(&pool, &Engines::new(), &unknown, &out, &|_, _| {})
            .await
            .unwrap_err()
            .to_string();
        assert!(
            refused.contains("\"no-such-model\" is not a [[models]] id of study \"quick-pilot\""),
            "{refused}"
        );
    }
    let summary = run_pairs(&pool, &Engines::new(), &options, &out).await;
    assert_eq!(
        (
            summary.turns,
            summary.skipped,
            summary.pairs,
            summary.rollouts_run
        ),
        (2, 2, 0, 0),
        "{behaviour}: {summary:?}"
    );
    let candidates: i64 = schema::candidates::table
        .count()
        .get_result(&mut pool.get().unwrap())
        .unwrap();
    assert_eq!(
        candidates, 2,
        "the fresh candidates are kept for the next run"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_remote_judge_that_returns_garbage_skips_turns() {
    with_remote_judge("garbage", JudgeNamed::InProtocol).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_remote_judge_that_times_out_skips_turns() {
    with_remote_judge("silent", JudgeNamed::InProtocol).await;
}

/// `pairs --judge-model` judges with the model it names, not the protocol's judge (which here
/// would score every turn), and refuses an id the protocol does not declare.
#[tokio::test(flavor = "multi_thread")]
async fn a_judge_named_on_the_command_line_replaces_the_protocols() {
    with_remote_judge("garbage", JudgeNamed::OnCommandLine).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn synth_grows_conversations_from_single_turn_tasks() {
    use collabllm::collab::synth::{self, SynthOptions};
    let loaded = pilot("");
    let p = &loaded.protocol;
    let engines = Engines::new();
    let roles = Roles::start(
        &engines,
        p,
        &loaded.source,
        &crate::common::real_models(),
        4,
    )
    .unwrap();
    let policy =
        collabllm::collab::start_policy(&engines, p, &p.arms[0], &crate::common::real_models(), 4)
            .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tasks = crate::common::write_temp(
        dir.path(),
        "tasks.jsonl",
        "{\"id\": \"thanks\", \"kind\": \"short note\", \"prompt\": \"Write a thank-you note to my neighbour.\", \"reference\": \"Dear Sam, thank you for watering my plants. Best, Alex\"}\n",
    );
    let tasks = synth::read_tasks(&tasks).unwrap();
    let options = SynthOptions {
        conversations: 1,
        turns: 2,
        mr: MrSettings {
            candidates: 2,
            samples: 1,
            window: 1,
            margin: 0.0,
            min_gap_se: 0.0,
        },
        seed: 3,
    };
    let (out, pairs_out) = (
        dir.path().join("rows.jsonl"),
        dir.path().join("pairs.jsonl"),
    );
    let db = TestDb::sqlite();
    let pool = db.pool();
    let run = || {
        synth::run(
            &pool,
            &roles,
            &policy,
            &tasks,
            &options,
            &out,
            Some(&pairs_out),
            &|_, _| {},
        )
    };
    let summary = run().await.unwrap();
    assert_eq!(summary.conversations, 1);
    assert_eq!(summary.turns_reused, 0);
    let candidates = rows(&out);
    assert_eq!(candidates.len() as u64, summary.rows);
    assert!(
        candidates.len() == 2 || candidates.len() == 4,
        "two candidates per turn: {}",
        candidates.len()
    );
    for turn in candidates.chunks(2) {
        assert_eq!(turn.iter().filter(|r| r["kept"] == true).count(), 1);
        for r in turn {
            assert_eq!(r["task"], "thanks");
            assert_eq!(r["prompt"][0]["role"], "system");
            assert_eq!(r["completion"][0]["role"], "assistant");
            assert!(r["score"].is_number() && r["rewards"]["bleu"].is_number());
        }
    }
    // A file only when there are pairs: an empty JSONL file is not a data set.
    assert_eq!(pairs_out.exists(), summary.pairs > 0);
    if summary.pairs > 0 {
        let pairs = rows(&pairs_out);
        assert_eq!(pairs.len() as u64, summary.pairs);
        pairs.iter().for_each(assert_trl_pair);
    }
    // Run again on the same database: every turn comes from the stored run, the files are the
    // same to the byte.
    let read = |p: &Path| std::fs::read(p).unwrap_or_default();
    let (first_rows, first_pairs) = (read(&out), read(&pairs_out));
    let again = run().await.unwrap();
    assert_eq!(
        (again.turns_run, again.turns_reused),
        (0, summary.turns_run)
    );
    assert_eq!((again.rows, again.pairs), (summary.rows, summary.pairs));
    assert_eq!(read(&out), first_rows);
    assert_eq!(read(&pairs_out), first_pairs);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_weighted_quality_is_judged_in_every_rollout() {
    use collabllm::collab::reward::{self, Candidate, RolloutKey, Scene};
    let loaded = pilot("\n[collab.weights]\nquality = 0.5\n");
    let p = &loaded.protocol;
    let engines = Engines::new();
    let roles = Roles::start(
        &engines,
        p,
        &loaded.source,
        &crate::common::real_models(),
        4,
    )
    .unwrap();
    let policy =
        collabllm::collab::start_policy(&engines, p, &p.arms[0], &crate::common::real_models(), 4)
            .unwrap();
    let task = Task::of(&p.tasks[0], &p.tasks[0].topics[0]);
    let goal = Goal {
        intent: p.tasks[0].topics[0].hidden_intent.clone(),
        document: String::new(),
    };
    let context = [ChatMessage::new(Role::User, "i need a short note")];
    let scene = Scene {
        roles: &roles,
        policy: &policy,
        task: &task,
        goal: &goal,
        context: &context,
        keep_document: false,
    };
    let candidates = [Candidate {
        text: "Happy to help! Who is it for?".into(),
        tokens: 9,
    }];
    let keys: Vec<RolloutKey> = (0..2)
        .map(|sample| RolloutKey {
            base_seed: 1,
            context: "q".into(),
            candidate: 0,
            sample,
        })
        .collect();
    for rollout in reward::rollouts(&scene, &candidates, &keys, 1).await {
        let rollout = rollout.unwrap();
        let quality = rollout
            .metrics
            .quality
            .expect("quality is judged when weighted");
        assert_eq!(
            rollout.metrics.bleu, None,
            "no goal document: BLEU is left out, not scored against the intent"
        );
        let expected = -0.1 * rollout.metrics.tokens_k
            + rollout.metrics.interactivity
            + 0.5 * (quality - 1.0) / 9.0;
        assert!((rollout.score - expected).abs() < 1e-12);
        assert_eq!(rollout.continuation[0].content, candidates[0].text);
    }
}

/// A fresh candidate that repeats the reply given (the same words, spaced otherwise) is sampled
/// again with new seeds; one that still repeats it after the resampling rounds is left out and
/// never stored, and a turn left with the given reply alone is reported, runs no rollouts and
/// makes no pair. With no pairs, no file is written.
#[tokio::test(flavor = "multi_thread")]
async fn candidates_that_repeat_the_reply_given_never_make_a_pair() {
    let db = TestDb::sqlite();
    let pool = db.pool();
    import(&pool, &pilot(""));
    seed_session(&pool).await;
    let engines = Engines::new();
    let seeds = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = seeds.clone();
    let policy = Arc::new(ScriptedEngine::new(move |r| {
        seen.lock().unwrap().push(r.sampling.seed.unwrap());
        let last = r.messages.last().unwrap().content.as_str();
        if last.starts_with("i need") {
            "Happy to help!  Who is the note for,\nand what is it about?".to_string()
        } else {
            " Dear neighbour, thank you so much for watering my plants while I was away."
                .to_string()
        }
    }));
    engines.insert(&engine_name("smollm2-135m", None), policy.clone());
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pairs.jsonl");
    let base = options("quick-pilot");
    let three = PairsOptions {
        mr: MrOverrides {
            candidates: Some(3),
            ..base.mr
        },
        ..base
    };
    let summary = run_pairs(&pool, &engines, &three, &out).await;
    assert_eq!(
        (
            summary.turns,
            summary.scored,
            summary.skipped,
            summary.pairs
        ),
        (2, 0, 2, 0)
    );
    assert_eq!(
        summary.identical_candidates, 4,
        "both fresh candidates of both turns are left out"
    );
    let rounds = 1 + CANDIDATE_RESAMPLE_ROUNDS as usize;
    assert_eq!(policy.requests.load(Ordering::SeqCst), 2 * 2 * rounds);
    let mut distinct = seeds.lock().unwrap().clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        2 * 2 * rounds,
        "every draw has a seed of its own"
    );
    assert_eq!(count_rollouts(&pool), 0);
    let stored: i64 = schema::candidates::table
        .count()
        .get_result(&mut pool.get().unwrap())
        .unwrap();
    assert_eq!(stored, 0, "a repeated reply is not stored as a candidate");
    assert!(!out.exists() && !collabllm::collab::partial_path(&out).exists());
}

/// `proactive_share`: that share of a turn's fresh candidates is generated with the proactive
/// instruction after the arm's system prompt (the paper's `proact_prompt_ratio`); the pairs keep
/// the arm's own prompt, and each stored candidate says whether it had the instruction.
#[tokio::test(flavor = "multi_thread")]
async fn a_share_of_fresh_candidates_gets_the_proactive_instruction() {
    let db = TestDb::sqlite();
    let pool = db.pool();
    import(&pool, &pilot("proactive_share = 0.5\n"));
    seed_session(&pool).await;
    let instructed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = instructed.clone();
    let engine = Arc::new(ScriptedEngine::new(move |r| {
        match asker(&request_text(r)) {
            Asker::Interactivity(_) => {
                serde_json::json!({"thought": "", "interactivity": 3}).to_string()
            }
            Asker::Document => {
                serde_json::json!({"thought": "", "final_document": "A note."}).to_string()
            }
            Asker::Quality => serde_json::json!({"thought": "", "quality": 5}).to_string(),
            Asker::Simulator => {
                serde_json::json!({"thought": "", "response": "ok [[TERMINATE CHAT]]"}).to_string()
            }
            Asker::Policy => {
                if r.messages[0]
                    .content
                    .contains("Before you write, make sure you know")
                {
                    seen.fetch_add(1, Ordering::SeqCst);
                }
                format!("Reply number {}.", r.sampling.seed.unwrap())
            }
        }
    }));
    let engines = scripted_engines(engine);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pairs.jsonl");
    let base = options("quick-pilot");
    let three = PairsOptions {
        mr: MrOverrides {
            candidates: Some(3),
            ..base.mr
        },
        ..base
    };
    let summary = run_pairs(&pool, &engines, &three, &out).await;
    assert_eq!(summary.turns, 2);
    // Two fresh candidates a turn, half of them instructed: one a turn, two in all.
    assert_eq!(instructed.load(Ordering::SeqCst), 2);
    let flags: Vec<bool> = schema::candidates::table
        .select(schema::candidates::policy_json)
        .load::<String>(&mut pool.get().unwrap())
        .unwrap()
        .iter()
        .map(|p| {
            serde_json::from_str::<Value>(p).unwrap()["proactive"]
                .as_bool()
                .unwrap()
        })
        .collect();
    assert_eq!(flags.iter().filter(|&&p| p).count(), 2, "{flags:?}");
    assert_eq!(flags.len(), 4);
    for line in std::fs::read_to_string(&out).unwrap().lines() {
        let row: Value = serde_json::from_str(line).unwrap();
        assert!(!row["prompt"][0]["content"]
            .as_str()
            .unwrap()
            .contains("Before you write"));
    }
}
