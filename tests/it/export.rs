//! CSV exports of a seeded study, read back with an RFC 4180 reader and checked field by field,
//! on both backends.

use std::collections::HashMap;
use std::path::Path;

use collabllm::db::models::{NewCandidate, NewMessage};
use collabllm::db::vocab::{CandidateSource, MessageRole, Outcome, RevisionAuthor};
use collabllm::db::{self, DbPool};
use collabllm::export::{self, Filter};
use collabllm::study::Studio;

use crate::common::{assert_trl_pair, example_protocol, TestDb};
use crate::on_both_backends;

/// A document that breaks naive CSV: commas, quotes, newlines, non-ASCII.
const DOCUMENT: &str = "Dear Sam,\n\"Thank you\" — for the plants, the cat; and 🙂.\r\nBest, Alex";
/// A document a spreadsheet would run as a formula.
const FORMULA: &str = "=HYPERLINK(\"http://x\",\"click\")";

fn pid(id: &str) -> collabllm::study::Arrival {
    collabllm::study::Arrival {
        external_id: Some(id.into()),
        resume_proof: None,
    }
}

/// A reply a spreadsheet would run as a formula, behind a line feed.
const SNEAKY_REPLY: &str = "\n=1+1";

/// Two sessions: one completed with everything recorded (a comparison pick among it), one still
/// chatting.
fn seed(pool: &DbPool) -> (String, String) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let studio = Studio::new(pool.clone(), collabllm::engine::Engines::new()).unwrap();
    let (done, open) = runtime.block_on(async {
        let a = studio
            .enter("doc-cocreation".into(), pid("PID-SECRET-1"), None, true)
            .await
            .unwrap();
        let a = studio.agree(a.session.id).await.unwrap();
        let b = studio
            .enter("doc-cocreation".into(), pid("PID-SECRET-2"), None, true)
            .await
            .unwrap();
        let b = studio.agree(b.session.id).await.unwrap();
        (a, b)
    });
    let mut conn = pool.get().unwrap();
    let c = &mut conn;
    for turn in 1..=3 {
        db::messages::append(
            c,
            done.id,
            &NewMessage {
                role: MessageRole::User,
                content: "Make it warmer,\nplease",
                ..Default::default()
            },
        )
        .unwrap();
        db::messages::append(
            c,
            done.id,
            &NewMessage {
                role: MessageRole::Assistant,
                content: if turn == 1 {
                    "-1 is a \"number\", isn't it?"
                } else {
                    "Sure."
                },
                ttft_ms: Some(100 * turn),
                gen_ms: Some(900),
                prompt_tokens: Some(50),
                gen_tokens: Some(20),
                finish_reason: Some("stop"),
                policy_json: Some("{}"),
            },
        )
        .unwrap();
    }
    db::revisions::append(
        c,
        done.id,
        RevisionAuthor::AssistantInsert,
        Some(2),
        FORMULA,
    )
    .unwrap();
    for (content, chosen, seed) in [(SNEAKY_REPLY, false, 11), ("Sure.", true, 12)] {
        db::candidates::insert(
            c,
            &NewCandidate {
                session_id: done.id,
                after_seq: 3,
                source: CandidateSource::Compare,
                content,
                chosen: Some(chosen),
                policy_json: &format!(r#"{{"sampling":{{"seed":{seed}}}}}"#),
                created_at: db::now(),
            },
        )
        .unwrap();
    }
    db::revisions::append(c, done.id, RevisionAuthor::User, None, DOCUMENT).unwrap();
    db::ratings::record(c, done.id, 3, "interaction", 7).unwrap();
    db::ratings::record(c, done.id, 3, "document_quality", 9).unwrap();
    db::ratings::record(c, done.id, 3, "overall_interaction", 8).unwrap();
    db::answers::record(c, done.id, "strengths", "@asked, questions").unwrap();
    db::answers::record(c, done.id, "weaknesses", "none").unwrap();
    db::events::record(c, done.id, 1, "blur", "{\"at\":1}").unwrap();
    db::sessions::finish(c, done.id, Outcome::Completed, "CLLM-DONE-7Q2X").unwrap();
    db::messages::append(
        c,
        open.id,
        &NewMessage {
            role: MessageRole::User,
            content: "hi",
            ..Default::default()
        },
    )
    .unwrap();
    (done.public_id, open.public_id)
}

type Table = Vec<HashMap<String, String>>;

fn read(dir: &Path, name: &str) -> Table {
    let mut reader = csv::Reader::from_path(dir.join(name)).unwrap();
    let headers = reader.headers().unwrap().clone();
    reader
        .records()
        .map(|r| {
            let r = r.unwrap();
            headers
                .iter()
                .map(String::from)
                .zip(r.iter().map(String::from))
                .collect()
        })
        .collect()
}

fn export_with(pool: &DbPool, filter: &Filter) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut conn = pool.get().unwrap();
    export::csv::export(&mut conn, "doc-cocreation", filter, dir.path(), &|_, _| {}).unwrap();
    dir
}

on_both_backends!(csv_exports_round_trip_field_by_field, |db: &TestDb| {
    let pool = db.pool();
    db::studies::import(&mut pool.get().unwrap(), &example_protocol()).unwrap();
    let (done, open) = seed(&pool);
    let dir = export_with(&pool, &Filter::default());

    let sessions = read(dir.path(), "sessions.csv");
    assert_eq!(sessions.len(), 2);
    let s = sessions.iter().find(|r| r["session"] == done).unwrap();
    assert_eq!(s["state"], "finished");
    assert_eq!(s["outcome"], "completed");
    assert_eq!(s["turns"], "3");
    assert_eq!(s["assistant_tokens"], "60");
    assert_eq!(s["mean_ttft_ms"], "200.0");
    assert_eq!(s["user_words"], "12");
    assert_eq!(
        s["final_document"], DOCUMENT,
        "a document survives the round trip"
    );
    assert_eq!(s["rating_interaction_t3"], "7");
    // The comparison pick, with both replies and their seeds; a formula behind a line feed is
    // neutralised like any other.
    let candidates = read(dir.path(), "candidates.csv");
    let picks: Vec<(&str, &str, &str, &str, &str, &str)> = candidates
        .iter()
        .map(|r| {
            (
                r["session"].as_str(),
                r["source"].as_str(),
                r["candidate"].as_str(),
                r["chosen"].as_str(),
                r["choice"].as_str(),
                r["seed"].as_str(),
            )
        })
        .collect();
    assert_eq!(
        picks,
        [
            (done.as_str(), "compare", "0", "false", "b", "11"),
            (done.as_str(), "compare", "1", "true", "b", "12"),
        ]
    );
    assert_eq!(candidates[0]["content"], format!("'{SNEAKY_REPLY}"));
    assert_eq!(candidates[0]["after_seq"], "3");
    assert_eq!(s["rating_document_quality"], "9");
    assert_eq!(s["rating_overall_interaction"], "8");
    assert_eq!(
        s["answer_strengths"], "'@asked, questions",
        "formula starts are neutralised"
    );
    assert_eq!(s["answer_weaknesses"], "none");
    assert!(s["participant"].starts_with("p-"));
    assert!(s["started_at"].ends_with('Z'));
    let o = sessions.iter().find(|r| r["session"] == open).unwrap();
    assert_eq!(
        (o["turns"].as_str(), o["rating_interaction_t3"].as_str()),
        ("0", "")
    );

    let messages = read(dir.path(), "messages.csv");
    assert_eq!(messages.len(), 7);
    let first_reply = messages
        .iter()
        .find(|m| m["session"] == done && m["seq"] == "2")
        .unwrap();
    assert_eq!(first_reply["content"], "'-1 is a \"number\", isn't it?");
    assert_eq!(first_reply["ttft_ms"], "100");
    assert_eq!(messages[0]["content"], "Make it warmer,\nplease");

    let revisions = read(dir.path(), "revisions.csv");
    assert_eq!(revisions[0]["content"], format!("'{FORMULA}"));
    assert_eq!(revisions[0]["author"], "assistant_insert");
    assert_eq!(revisions[0]["inserted_message"], "2");
    assert_eq!(revisions[1]["content"], DOCUMENT);

    let ratings = read(dir.path(), "ratings.csv");
    let kinds: Vec<(&str, &str)> = ratings
        .iter()
        .map(|r| (r["key"].as_str(), r["kind"].as_str()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("document_quality", "final"),
            ("interaction", "periodic"),
            ("overall_interaction", "final")
        ]
    );
    assert_eq!(read(dir.path(), "events.csv")[0]["data"], "{\"at\":1}");
    let ledger = read(dir.path(), "assignments.csv");
    assert_eq!(ledger.len(), 2);
    assert!(ledger[0]["inputs"].contains("seed"));

    // The codebook describes every column of every file.
    let codebook = read(dir.path(), "codebook.csv");
    for file in [
        "sessions.csv",
        "messages.csv",
        "ratings.csv",
        "revisions.csv",
        "candidates.csv",
        "events.csv",
        "assignments.csv",
    ] {
        let mut reader = csv::Reader::from_path(dir.path().join(file)).unwrap();
        for column in reader.headers().unwrap() {
            assert!(
                codebook.iter().any(|c| c["file"] == file
                    && c["column"] == column
                    && !c["description"].is_empty()),
                "{file}:{column} is not in the codebook"
            );
        }
    }
    // The state column lists every state a session can be in, `choosing` too.
    let state = codebook
        .iter()
        .find(|c| c["file"] == "sessions.csv" && c["column"] == "state")
        .unwrap();
    for name in [
        "consent",
        "chatting",
        "choosing",
        "rating",
        "final",
        "finished",
        "timed_out",
    ] {
        assert!(
            state["description"].contains(name),
            "{}",
            state["description"]
        );
    }
    // Nothing identifying leaves: no external ids, no token hashes.
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        assert!(!text.contains("PID-SECRET"), "an external id leaked");
    }
});

on_both_backends!(
    rating_columns_come_from_the_protocol_even_when_nobody_rated,
    |db: &TestDb| {
        let pool = db.pool();
        let protocol = example_protocol();
        db::studies::import(&mut pool.get().unwrap(), &protocol).unwrap();
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let studio = Studio::new(pool.clone(), collabllm::engine::Engines::new()).unwrap();
        runtime.block_on(async {
            let s = studio
                .enter("doc-cocreation".into(), pid("PID-NEW"), None, true)
                .await
                .unwrap();
            studio.agree(s.session.id).await.unwrap();
        });
        let dir = export_with(&pool, &Filter::default());
        let mut reader = csv::Reader::from_path(dir.path().join("sessions.csv")).unwrap();
        let headers: Vec<String> = reader
            .headers()
            .unwrap()
            .iter()
            .map(str::to_string)
            .collect();
        let parsed = &protocol.protocol;
        for r in parsed.final_ratings() {
            let column = format!("rating_{}", r.id);
            assert!(headers.contains(&column), "{column} missing: {headers:?}");
        }
        let cap = parsed.session.max_turns;
        assert!(cap > 0, "the paper protocol caps its turns");
        let due: Vec<String> = (1..=cap)
            .flat_map(|t| {
                parsed
                    .periodic_ratings_due(t)
                    .into_iter()
                    .map(move |r| format!("rating_{}_t{t}", r.id))
            })
            .collect();
        assert!(!due.is_empty());
        for column in &due {
            assert!(headers.contains(column), "{column} missing: {headers:?}");
        }
        // The codebook tells pandas how to read each column.
        let codebook = read(dir.path(), "codebook.csv");
        let dtype = |column: &str| {
            codebook
                .iter()
                .find(|c| c["file"] == "sessions.csv" && c["column"] == column)
                .map(|c| c["pandas_dtype"].clone())
                .unwrap()
        };
        assert_eq!(dtype(&due[0]), "Int64");
        assert_eq!(dtype("turns"), "Int64");
        assert_eq!(dtype("simulated"), "boolean");
        assert_eq!(dtype("started_at"), "datetime");
        assert_eq!(dtype("arm"), "string");
    }
);

on_both_backends!(csv_export_filters_sessions, |db: &TestDb| {
    let pool = db.pool();
    db::studies::import(&mut pool.get().unwrap(), &example_protocol()).unwrap();
    let (done, _) = seed(&pool);
    let completed = export_with(
        &pool,
        &Filter {
            completed_only: true,
            ..Filter::default()
        },
    );
    let rows = read(completed.path(), "sessions.csv");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["session"], done);
    assert!(read(completed.path(), "messages.csv")
        .iter()
        .all(|m| m["session"] == done));
    let ledger = read(completed.path(), "assignments.csv");
    assert_eq!(
        ledger
            .iter()
            .map(|r| r["participant"].as_str())
            .collect::<Vec<_>>(),
        [rows[0]["participant"].as_str()],
        "only the draws of the sessions exported"
    );

    let arm = rows[0]["arm"].clone();
    let by_arm = export_with(
        &pool,
        &Filter {
            arm: Some(arm.clone()),
            ..Filter::default()
        },
    );
    assert!(read(by_arm.path(), "sessions.csv")
        .iter()
        .all(|r| r["arm"] == arm));
    assert!(read(by_arm.path(), "assignments.csv")
        .iter()
        .all(|r| r["arm"] == arm));

    let tomorrow = chrono::Utc::now().date_naive() + chrono::Duration::days(1);
    let later = export_with(
        &pool,
        &Filter {
            from: Some(tomorrow),
            ..Filter::default()
        },
    );
    assert!(read(later.path(), "sessions.csv").is_empty());
    let earlier = export_with(
        &pool,
        &Filter {
            to: Some(tomorrow),
            ..Filter::default()
        },
    );
    assert_eq!(read(earlier.path(), "sessions.csv").len(), 2);

    // The seeded participants are people: none is simulated.
    for (simulated, expected) in [(Some(false), 2), (Some(true), 0)] {
        let only = export_with(
            &pool,
            &Filter {
                simulated,
                ..Filter::default()
            },
        );
        assert_eq!(read(only.path(), "sessions.csv").len(), expected);
    }

    let mut conn = pool.get().unwrap();
    let err = export::csv::export(
        &mut conn,
        "nope",
        &Filter::default(),
        completed.path(),
        &|_, _| {},
    )
    .unwrap_err();
    assert!(err.to_string().contains("no study \"nope\""));
});

on_both_backends!(the_json_dump_holds_the_whole_study, |db: &TestDb| {
    let pool = db.pool();
    db::studies::import(&mut pool.get().unwrap(), &example_protocol()).unwrap();
    let (done, open) = seed(&pool);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("study.json");
    let count =
        export::json::export(&mut pool.get().unwrap(), "doc-cocreation", &path, &|_| {}).unwrap();
    assert_eq!(count, 2);
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(!text.contains("PID-SECRET"), "no external ids");
    let dump: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(dump["format"], export::json::FORMAT);
    assert_eq!(dump["study"]["slug"], "doc-cocreation");
    assert_eq!(
        dump["versions"][0]["protocol_text"],
        example_protocol().text
    );
    assert_eq!(
        dump["versions"][0]["arms"],
        serde_json::json!(["base", "proactive", "collabllm"]),
        "the protocol's arm order"
    );
    assert_eq!(dump["assignments"].as_array().unwrap().len(), 2);
    let sessions = dump["sessions"].as_array().unwrap();
    let s = sessions
        .iter()
        .find(|s| s["session"] == done.as_str())
        .unwrap();
    assert_eq!(s["messages"].as_array().unwrap().len(), 6);
    assert_eq!(s["revisions"][1]["content"], DOCUMENT);
    assert_eq!(
        s["revisions"][0]["content"], FORMULA,
        "JSON keeps text exactly as written"
    );
    assert_eq!(s["ratings"].as_array().unwrap().len(), 3);
    assert_eq!(s["answers"][0]["answer"], "@asked, questions");
    assert_eq!(s["events"][0]["data"]["at"], 1);
    let candidates = s["candidates"].as_array().unwrap();
    assert_eq!(candidates.len(), 2);
    assert_eq!(
        (
            &candidates[0]["content"],
            &candidates[0]["chosen"],
            &candidates[0]["policy"]["sampling"]["seed"]
        ),
        (
            &serde_json::json!(SNEAKY_REPLY),
            &serde_json::json!(false),
            &serde_json::json!(11)
        )
    );
    assert!(sessions.iter().any(|s| s["session"] == open.as_str()));
    let err = export::json::export(&mut pool.get().unwrap(), "nope", &path, &|_| {}).unwrap_err();
    assert!(err.to_string().contains("no study"));
});

on_both_backends!(
    edited_inserts_become_dpo_pairs_in_trl_format,
    |db: &TestDb| {
        let pool = db.pool();
        db::studies::import(&mut pool.get().unwrap(), &example_protocol()).unwrap();
        let (done, _) = seed(&pool);
        let mut conn = pool.get().unwrap();
        let session = db::sessions::find_by_public_id(&mut conn, &done)
            .unwrap()
            .unwrap();
        // Message 4 ("Sure.") is inserted, then rewritten; message 6 is inserted and kept as it is.
        let base = db::revisions::latest(&mut conn, session.id)
            .unwrap()
            .unwrap()
            .content;
        let with_reply = format!("{base}\nSure.");
        db::revisions::append(
            &mut conn,
            session.id,
            RevisionAuthor::AssistantInsert,
            Some(4),
            &with_reply,
        )
        .unwrap();
        let rewritten = format!("{base}\nOf course, gladly — here it is.");
        db::revisions::append(
            &mut conn,
            session.id,
            RevisionAuthor::User,
            None,
            &rewritten,
        )
        .unwrap();
        db::revisions::append(
            &mut conn,
            session.id,
            RevisionAuthor::AssistantInsert,
            Some(6),
            &format!("{rewritten}\nSure."),
        )
        .unwrap();

        let dir = tempfile::tempdir().unwrap();
        let options = export::pairs::PairOptions {
            edit_threshold: 0.2,
            eval_share: 0.0,
        };
        let counts =
            export::pairs::export(&mut conn, "doc-cocreation", &options, dir.path()).unwrap();
        // The seed's own insert of message 2 was replaced by other text too: two pairs; message 6
        // stayed as inserted: no pair; and the seed's comparison pick is the third.
        assert_eq!((counts.train, counts.eval), (3, 0));
        let text = std::fs::read_to_string(dir.path().join("train.jsonl")).unwrap();
        let rows: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert!(rows.iter().all(|r| r["metadata"]["turn"] != 3));
        let row = rows
            .iter()
            .find(|r| r["rejected"][0]["content"] == "Sure.")
            .unwrap();
        assert_trl_pair(row);
        assert_eq!(
            row["prompt"].as_array().unwrap().len(),
            1 + 3,
            "system, user, assistant, user"
        );
        assert_eq!(
            row["chosen"][0]["content"],
            "Of course, gladly — here it is."
        );
        assert_eq!(row["rejected"][0]["content"], "Sure.");
        let meta = &row["metadata"];
        assert_eq!(
            (meta["source"].as_str(), meta["session"].as_str()),
            (Some("edit"), Some(done.as_str()))
        );
        assert_eq!(meta["turn"], 2);
        assert!(meta["participant"].as_str().unwrap().starts_with("p-"));
        assert!(!text.contains("PID-SECRET"));
        assert_eq!(
            meta["seed"],
            serde_json::Value::Null,
            "the chosen text is the participant's"
        );
        assert_eq!(
            meta["seed_rejected"],
            serde_json::Value::Null,
            "message 4 records no sampling"
        );
        assert!(meta["changed_share"].as_f64().unwrap() > 0.2);
        // The comparison pick names the seed of the reply chosen (the second candidate, 12) and
        // the rejected one's beside it, whichever candidate came first.
        let compare = rows
            .iter()
            .find(|r| r["metadata"]["source"] == "compare")
            .unwrap();
        assert_eq!(compare["chosen"][0]["content"], "Sure.");
        assert_eq!(
            (
                &compare["metadata"]["seed"],
                &compare["metadata"]["seed_rejected"]
            ),
            (&serde_json::json!(12), &serde_json::json!(11))
        );
        assert_eq!(
            compare["metadata"]["changed_share"],
            serde_json::Value::Null
        );
        // One schema: every row's metadata has the same keys.
        let keys = |r: &serde_json::Value| -> Vec<String> {
            r["metadata"].as_object().unwrap().keys().cloned().collect()
        };
        assert!(rows.iter().all(|r| keys(r) == keys(&rows[0])), "{rows:?}");

        // The split is by participant: everything to eval with a share of 1.
        let all_eval = export::pairs::PairOptions {
            eval_share: 1.0,
            ..options
        };
        let counts =
            export::pairs::export(&mut conn, "doc-cocreation", &all_eval, dir.path()).unwrap();
        assert_eq!((counts.train, counts.eval), (0, 3));
    }
);
