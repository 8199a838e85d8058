//! `simulate` with a scripted model whose every answer is known: simulated participants insert
//! and regenerate replies as the simulator decides, so a pilot yields pairs; a stopped run ends
//! the sessions in flight as abandoned at once.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use collabllm::collab::simulate::{self, SimulateOptions, SimulateSummary, Tally};
use collabllm::db::models::Session;
use collabllm::db::vocab::{CandidateSource, MessageRole, Outcome, RevisionAuthor, SessionState};
use collabllm::db::{self, DbPool};
use collabllm::engine::{ChatRequest, Engine, Engines, Role};
use collabllm::export;
use collabllm::protocol::LoadedProtocol;
use collabllm::study::{Studio, StudyError};
use collabllm::web::AppState;
use serde_json::json;

use crate::common::{
    asker, models_dir, pilot_text, repo_root, request_text, Asker, FailingFirst, ScriptedEngine,
    TestApp, TestDb, TestServer,
};

/// The quick pilot, ending after two turns.
fn pilot() -> LoadedProtocol {
    let path = repo_root().join("study-protocols/quick-pilot.toml");
    let text = pilot_text() + "max_turns = 2\n";
    LoadedProtocol::from_text(&path, text, &models_dir()).unwrap()
}

/// The rewrite of the document the simulated user keeps after the first reply.
const REWRITE: &str = "Dear Jo, a thousand thanks for keeping my plants alive. Sam";

/// The policy numbers its replies; the simulated user writes no draft before the first reply and
/// the rewrite after it, inserts the first reply, regenerates the second, prefers reply B, rates
/// 7 and comments "fine".
fn scripted(hold: impl Fn(&ChatRequest) -> bool + Send + Sync + 'static) -> Arc<ScriptedEngine> {
    let replies = AtomicUsize::new(0);
    Arc::new(ScriptedEngine::holding(
        move |r| {
            let all = request_text(r);
            let answer = |a: serde_json::Value| json!({"thought": "", "answer": a}).to_string();
            match asker(&all) {
                Asker::Simulator
                    if all.contains("What do you do with the assistant's latest reply") =>
                {
                    answer(json!(if all.contains("Reply 2") {
                        "regenerate"
                    } else {
                        "insert"
                    }))
                }
                Asker::Simulator if all.contains("Which reply do you prefer") => answer(json!("b")),
                Asker::Simulator if all.contains("Answer with a whole number") => answer(json!(7)),
                Asker::Simulator if all.contains("Answer in a sentence or two") => {
                    answer(json!("fine"))
                }
                Asker::Simulator => {
                    let draft = if all.contains("Reply 1") { REWRITE } else { "" };
                    json!({"current_answer": draft, "thought": "", "response": "a note for Jo please"})
                        .to_string()
                }
                _ => format!(
                    "Reply {}: happy to help, who is it for?",
                    replies.fetch_add(1, Ordering::SeqCst) + 1
                ),
            }
        },
        hold,
    ))
}

struct Pilot {
    _db: TestDb,
    pool: DbPool,
    state: AppState,
    server: TestServer,
}

fn start(loaded: &LoadedProtocol, engine: Arc<dyn Engine>) -> Pilot {
    let db = TestDb::sqlite();
    let state = TestApp::new(&db)
        .loaded(loaded.clone())
        .serving(engine)
        .state();
    let pool = state.pool.clone();
    let server = TestServer::start(state.clone());
    Pilot {
        _db: db,
        pool,
        state,
        server,
    }
}

fn options(participants: usize) -> SimulateOptions {
    SimulateOptions {
        models_dir: crate::common::real_models(),
        ..options_without_models(participants)
    }
}

/// [`options`] for a test whose every model is scripted.
fn options_without_models(participants: usize) -> SimulateOptions {
    SimulateOptions {
        study: "quick-pilot".into(),
        arm: Some("proactive".into()),
        participants,
        concurrency: participants,
        seed: 1,
        models_dir: models_dir(),
    }
}

async fn simulate(
    pilot: &Pilot,
    options: &SimulateOptions,
    progress: &(dyn Fn(&Tally) + Sync),
    stop: impl std::future::Future<Output = ()>,
) -> SimulateSummary {
    simulate::run(
        &pilot.state.studio,
        &pilot.pool,
        &pilot.state.engines,
        &format!("ws://{}", pilot.server.addr),
        options,
        progress,
        stop,
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn simulated_participants_insert_and_regenerate_so_a_pilot_has_pairs() {
    let pilot = start(&pilot(), scripted(|_| false));
    let last = Mutex::new(Tally::default());
    let summary = simulate(
        &pilot,
        &options(1),
        &|t: &Tally| *last.lock().unwrap() = t.clone(),
        std::future::pending(),
    )
    .await;
    assert_eq!(summary.completed.len(), 1, "{:?}", summary.failed);
    let last = last.into_inner().unwrap();
    assert_eq!(
        (last.completed, last.turns, last.inserted, last.regenerated),
        (1, 2, 1, 1)
    );

    let c = &mut pilot.pool.get().unwrap();
    let session = db::sessions::find_by_public_id(c, &summary.completed[0])
        .unwrap()
        .unwrap();
    // The first reply (message 2) was inserted, then rewritten by the participant.
    let revisions = db::revisions::list_for_session(c, session.id).unwrap();
    let insert = revisions
        .iter()
        .find(|r| r.author == RevisionAuthor::AssistantInsert)
        .expect("an inserted reply");
    assert_eq!(insert.message_seq, Some(2));
    assert!(insert.content.contains("Reply 1: happy to help"));
    assert_eq!(revisions.last().unwrap().content, REWRITE);
    // The second reply was regenerated; the participant kept reply B, the new one.
    let candidates = db::candidates::list_for_session(c, session.id).unwrap();
    let regenerated: Vec<_> = candidates
        .iter()
        .filter(|c| c.source == CandidateSource::Regenerate)
        .collect();
    assert_eq!(regenerated.len(), 2, "{candidates:?}");
    let messages = db::messages::list_for_session(c, session.id).unwrap();
    let replies: Vec<&str> = messages
        .iter()
        .filter(|m| m.role == MessageRole::Assistant)
        .map(|m| m.content.as_str())
        .collect();
    assert_eq!(replies.len(), 2, "a regeneration is not a turn");
    let kept = regenerated.iter().find(|c| c.chosen == Some(true)).unwrap();
    assert_eq!(replies[1], kept.content);
    assert!(kept.content.starts_with("Reply 3"));

    // The pilot's pairs export has the regeneration pick and the rewritten insert.
    let dir = tempfile::tempdir().unwrap();
    let options = export::pairs::PairOptions {
        edit_threshold: 0.2,
        eval_share: 0.0,
    };
    let counts = export::pairs::export(c, "quick-pilot", &options, dir.path()).unwrap();
    assert_eq!(counts.train, 2);
    let text = std::fs::read_to_string(dir.path().join("train.jsonl")).unwrap();
    for line in text.lines() {
        crate::common::assert_trl_pair(&serde_json::from_str(line).unwrap());
    }
    let sources: Vec<String> = text
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["metadata"]["source"].to_string()
        })
        .collect();
    assert!(
        sources.iter().any(|s| s.contains("regenerat")),
        "{sources:?}"
    );
    assert!(sources.iter().any(|s| s.contains("edit")), "{sources:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_simulation_ends_its_sessions_as_abandoned_at_once() {
    // Every second reply never finishes, as a slow model's; the run is stopped once both
    // participants had their first turn.
    let pilot = start(
        &pilot(),
        scripted(|r| {
            let policy = matches!(asker(&request_text(r)), Asker::Policy);
            policy && r.messages.iter().any(|m| m.role == Role::Assistant)
        }),
    );
    let first_turn = tokio::sync::Notify::new();
    let started = std::time::Instant::now();
    let summary = simulate(
        &pilot,
        &options(2),
        &|t: &Tally| {
            if t.turns >= 2 {
                first_turn.notify_one();
            }
        },
        first_turn.notified(),
    )
    .await;
    assert!(started.elapsed() < std::time::Duration::from_secs(60));
    assert!(summary.stopped && summary.completed.is_empty());
    assert_eq!(summary.abandoned.len(), 2, "{summary:?}");
    let c = &mut pilot.pool.get().unwrap();
    for public_id in &summary.abandoned {
        let session = db::sessions::find_by_public_id(c, public_id)
            .unwrap()
            .unwrap();
        assert_eq!(session.state, SessionState::Abandoned);
        assert_eq!(session.outcome, Some(Outcome::Abandoned));
        assert_eq!(
            session.completion_code, None,
            "no code for an unfinished session"
        );
        assert!(session.finished_at.is_some());
    }
}

/// Simulated participants are balanced and filled among themselves: with a quota of one per
/// arm, a pilot that fills every arm leaves people's places free.
#[tokio::test(flavor = "multi_thread")]
async fn a_pilot_never_takes_the_place_of_a_person() {
    let db = TestDb::sqlite();
    let pool = db.pool();
    let path = repo_root().join("study-protocols/quick-pilot.toml");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("[[arms]]\n", "[[arms]]\nquota = 1\n");
    let loaded = LoadedProtocol::from_text(&path, text, &models_dir()).unwrap();
    let arms = loaded.protocol.arms.len();
    db::studies::import(&mut pool.get().unwrap(), &loaded).unwrap();
    let studio = Studio::new(pool.clone(), Engines::new()).unwrap();
    for _ in 0..arms {
        studio
            .enter_simulated("quick-pilot".into(), None, 0)
            .await
            .unwrap();
    }
    // Every arm is full for simulated participants…
    let full = studio.enter_simulated("quick-pilot".into(), None, 0).await;
    assert!(matches!(full, Err(StudyError::Full)), "{full:?}");
    // …and empty for people: the first person is drawn as in a study without the pilot.
    let entry = studio
        .enter("quick-pilot".into(), Default::default(), None, true)
        .await
        .unwrap();
    let session = studio.agree(entry.session.id).await.unwrap();
    assert_eq!(session.state, SessionState::Chatting);
    let fresh = TestDb::sqlite();
    db::studies::import(&mut fresh.pool().get().unwrap(), &loaded).unwrap();
    let fresh_studio = Studio::new(fresh.pool(), Engines::new()).unwrap();
    let entry = fresh_studio
        .enter("quick-pilot".into(), Default::default(), None, true)
        .await
        .unwrap();
    let first = fresh_studio.agree(entry.session.id).await.unwrap();
    let arm_name = |pool: &DbPool, s: &Session| {
        db::studies::arms_of(&mut pool.get().unwrap(), s.study_version_id)
            .unwrap()
            .into_iter()
            .find(|a| Some(a.id) == s.arm_id)
            .unwrap()
            .name
    };
    assert_eq!(
        (arm_name(&pool, &session), &session.topic_id),
        (arm_name(&fresh.pool(), &first), &first.topic_id)
    );
}

/// A comparison whose second candidate repeats the first is sampled again: the participant
/// chooses between two different replies.
#[tokio::test(flavor = "multi_thread")]
async fn a_comparison_never_offers_the_same_reply_twice() {
    let policy_requests = AtomicUsize::new(0);
    let engine = Arc::new(ScriptedEngine::new(move |r| {
        let all = request_text(r);
        let answer = |a: serde_json::Value| json!({"thought": "", "answer": a}).to_string();
        match asker(&all) {
            Asker::Simulator
                if all.contains("What do you do with the assistant's latest reply") =>
            {
                answer(json!("keep"))
            }
            Asker::Simulator if all.contains("Which reply do you prefer") => answer(json!("b")),
            Asker::Simulator if all.contains("Answer with a whole number") => answer(json!(7)),
            Asker::Simulator if all.contains("Answer in a sentence or two") => {
                answer(json!("fine"))
            }
            Asker::Simulator => {
                json!({"current_answer": "", "thought": "", "response": "a note please"})
                    .to_string()
            }
            // The first comparison's two candidates are the same text, spaced otherwise.
            _ => match policy_requests.fetch_add(1, Ordering::SeqCst) {
                0 => "Who is  it for?".to_string(),
                1 => "Who is it for?\n".to_string(),
                n => format!("Reply {n}: here is the note."),
            },
        }
    }));
    let path = repo_root().join("study-protocols/quick-pilot.toml");
    let text = pilot_text().replace("[session]\n", "[session]\ncompare_every_turns = 1\n")
        + "max_turns = 2\n";
    let loaded = LoadedProtocol::from_text(&path, text, &models_dir()).unwrap();
    let pilot = start(&loaded, engine);
    let summary = simulate(&pilot, &options(1), &|_: &Tally| {}, std::future::pending()).await;
    assert_eq!(summary.completed.len(), 1, "{:?}", summary.failed);
    let c = &mut pilot.pool.get().unwrap();
    let session = db::sessions::find_by_public_id(c, &summary.completed[0])
        .unwrap()
        .unwrap();
    let first_turn: Vec<String> = db::candidates::list_for_session(c, session.id)
        .unwrap()
        .into_iter()
        .filter(|c| c.source == CandidateSource::Compare && c.after_seq == 1)
        .map(|c| c.content)
        .collect();
    assert_eq!(
        first_turn,
        ["Who is  it for?", "Reply 2: here is the note."],
        "the repeat was sampled again"
    );
}

/// A participant whose reply failed presses Try again, as the page asks, and goes on; one whose
/// reply fails three times in a row gives up at once, with the reason, instead of waiting for a
/// reply that will not come.
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_reply_is_tried_again_twice_then_the_participant_gives_up() {
    let options = options_without_models(1);
    for (fails, completes) in [(2, true), (3, false)] {
        let policy = |r: &ChatRequest| matches!(asker(&request_text(r)), Asker::Policy);
        let engine = Arc::new(FailingFirst::new(scripted(|_| false), fails, policy));
        let pilot = start(&pilot(), engine);
        let started = std::time::Instant::now();
        let summary = simulate(&pilot, &options, &|_: &Tally| {}, std::future::pending()).await;
        assert!(started.elapsed().as_secs() < 60, "{:?}", started.elapsed());
        if completes {
            assert_eq!(summary.completed.len(), 1, "{:?}", summary.failed);
        } else {
            assert!(summary.completed.is_empty());
            let why = format!("{:?}", summary.failed);
            assert!(why.contains("failed three times"), "{why}");
        }
    }
}
