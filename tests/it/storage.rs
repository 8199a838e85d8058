//! Storage: every query function on SQLite and on PostgreSQL, each test with a fresh database;
//! migrations are reversible; an unreachable database gives a clear error.

use collabllm::db::models::{NewAssignment, NewCandidate, NewMessage, NewReward, NewSession};
use collabllm::db::studies::ImportOutcome;
use collabllm::db::vocab::{MessageRole, Outcome, RevisionAuthor, SessionState};
use collabllm::db::{self, DbConn, DbError};
use collabllm::protocol::LoadedProtocol;
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::Text;

use crate::common::{example_protocol, TestDb};
use crate::on_both_backends;

/// A study with one participant and one session under the example protocol.
struct Fixture {
    study_id: i64,
    version_id: i64,
    arm_ids: Vec<i64>,
    participant_id: i64,
    session_id: i64,
}

fn fixture(conn: &mut DbConn) -> Fixture {
    let imported = db::studies::import(conn, &example_protocol()).unwrap();
    let arms = db::studies::arms_of(conn, imported.version.id).unwrap();
    let (participant, _) =
        db::participants::find_or_create(conn, imported.study.id, Some("hmac-1"), false).unwrap();
    let session = new_session(
        conn,
        participant.id,
        imported.version.id,
        Some(arms[0].id),
        "s-1",
    );
    Fixture {
        study_id: imported.study.id,
        version_id: imported.version.id,
        arm_ids: arms.iter().map(|a| a.id).collect(),
        participant_id: participant.id,
        session_id: session.id,
    }
}

fn new_session(
    conn: &mut DbConn,
    participant_id: i64,
    version_id: i64,
    arm_id: Option<i64>,
    public_id: &str,
) -> db::models::Session {
    let now = db::now();
    // Each session has a token of its own.
    let token_hash = format!("hash-{public_id}");
    db::sessions::create(
        conn,
        &NewSession {
            public_id,
            participant_id,
            study_version_id: version_id,
            arm_id,
            task_id: Some("blog-post"),
            topic_id: Some("remote-work"),
            token_hash: &token_hash,
            state: SessionState::Consent,
            resume_proof_hmac: None,
            started_at: now,
            last_activity_at: now,
            simulation_seed: None,
        },
    )
    .unwrap()
}

/// Text that breaks naive storage: quotes, commas, newlines, non-ASCII, a formula start.
const AWKWARD: &str = "=SUM(A1)\n\"quoted\", comma; ünïcödé 🙂\r\nlast line";

on_both_backends!(
    importing_a_protocol_creates_a_study_with_its_arms,
    |db: &TestDb| {
        let mut conn = db.conn();
        let loaded = example_protocol();
        let imported = db::studies::import(&mut conn, &loaded).unwrap();
        assert_eq!(imported.outcome, ImportOutcome::Created);
        assert_eq!(imported.version.version, 1);
        assert_eq!(imported.version.protocol_sha256, loaded.sha256);
        assert_eq!(imported.version.protocol_text, loaded.text);
        assert_eq!(imported.version.label, "1.0");
        let arms = db::studies::arms_of(&mut conn, imported.version.id).unwrap();
        let names: Vec<&str> = arms.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(names, ["base", "proactive", "collabllm"]);
        let policy: serde_json::Value = serde_json::from_str(&arms[1].policy_json).unwrap();
        assert!(policy["system_prompt"]
            .as_str()
            .unwrap()
            .contains("clarifying"));
        assert_eq!(
            db::studies::find_by_slug(&mut conn, "doc-cocreation")
                .unwrap()
                .unwrap()
                .id,
            imported.study.id
        );
        assert!(db::studies::find_by_slug(&mut conn, "nope")
            .unwrap()
            .is_none());
        assert_eq!(db::studies::list(&mut conn).unwrap().len(), 1);
    }
);

on_both_backends!(
    reimporting_the_same_protocol_changes_nothing,
    |db: &TestDb| {
        let mut conn = db.conn();
        let first = db::studies::import(&mut conn, &example_protocol()).unwrap();
        let again = db::studies::import(&mut conn, &example_protocol()).unwrap();
        assert_eq!(again.outcome, ImportOutcome::Unchanged);
        assert_eq!(again.version.id, first.version.id);
        assert_eq!(
            db::studies::versions(&mut conn, first.study.id)
                .unwrap()
                .len(),
            1
        );
    }
);

on_both_backends!(
    a_changed_protocol_becomes_a_new_version_and_keeps_the_old_sessions,
    |db: &TestDb| {
        let mut conn = db.conn();
        let f = fixture(&mut conn);
        let original = db::studies::current_version(&mut conn, f.study_id).unwrap();
        let changed_text = original
            .protocol_text
            .replace("min_turns = 8", "min_turns = 9");
        let changed = LoadedProtocol::from_text(
            std::path::Path::new("doc-cocreation.toml"),
            changed_text.clone(),
            &crate::common::models_dir(),
        )
        .unwrap();
        let imported = db::studies::import(&mut conn, &changed).unwrap();
        assert_eq!(imported.outcome, ImportOutcome::NewVersion);
        assert_eq!(imported.version.version, 2);
        assert_eq!(
            db::studies::current_version(&mut conn, f.study_id)
                .unwrap()
                .id,
            imported.version.id
        );
        // The old version, its arms and its session are untouched.
        let versions = db::studies::versions(&mut conn, f.study_id).unwrap();
        assert_eq!(versions[0], original);
        assert_eq!(
            db::studies::arms_of(&mut conn, original.id).unwrap().len(),
            3
        );
        assert_eq!(
            db::sessions::list_for_version(&mut conn, original.id)
                .unwrap()
                .len(),
            1
        );
        assert!(
            db::sessions::list_for_version(&mut conn, imported.version.id)
                .unwrap()
                .is_empty()
        );
        // The console's list: the newest version, and the sessions of every version.
        let [summary] = &db::studies::summaries(&mut conn).unwrap()[..] else {
            panic!("one study");
        };
        assert_eq!((summary.version, summary.sessions), (2, 1));
        let session = db::sessions::get(&mut conn, f.session_id).unwrap();
        assert_eq!(session.study_version_id, original.id);
    }
);

on_both_backends!(study_status_can_be_set_and_is_validated, |db: &TestDb| {
    let mut conn = db.conn();
    let f = fixture(&mut conn);
    assert_eq!(
        db::studies::set_status(&mut conn, f.study_id, "paused")
            .unwrap()
            .status,
        "paused"
    );
    let err = db::studies::set_status(&mut conn, f.study_id, "deleted").unwrap_err();
    assert!(matches!(err, DbError::Invalid(_)), "{err}");
});

on_both_backends!(
    a_returning_external_id_finds_the_same_participant,
    |db: &TestDb| {
        let mut conn = db.conn();
        let f = fixture(&mut conn);
        let (again, created) =
            db::participants::find_or_create(&mut conn, f.study_id, Some("hmac-1"), false).unwrap();
        assert!(!created);
        assert_eq!(again.id, f.participant_id);
        let (other, created) =
            db::participants::find_or_create(&mut conn, f.study_id, Some("hmac-2"), true).unwrap();
        assert!(created && other.simulated);
        assert_ne!(other.pseudonym, again.pseudonym);
        let (anon1, _) =
            db::participants::find_or_create(&mut conn, f.study_id, None, false).unwrap();
        let (anon2, _) =
            db::participants::find_or_create(&mut conn, f.study_id, None, false).unwrap();
        assert_ne!(
            anon1.id, anon2.id,
            "participants without an external id are all distinct"
        );
        assert_eq!(db::participants::get(&mut conn, other.id).unwrap(), other);
        assert!(again.pseudonym.starts_with("p-"));
    }
);

on_both_backends!(sessions_move_through_their_states, |db: &TestDb| {
    let mut conn = db.conn();
    let f = fixture(&mut conn);
    let s = db::sessions::find_by_public_id(&mut conn, "s-1")
        .unwrap()
        .unwrap();
    assert_eq!(s.id, f.session_id);
    assert!(db::sessions::find_by_public_id(&mut conn, "nope")
        .unwrap()
        .is_none());
    let s = db::sessions::record_consent(&mut conn, s.id, "abc").unwrap();
    assert_eq!(s.consent_sha256.as_deref(), Some("abc"));
    assert!(s.consented_at.is_some());
    let s = db::sessions::set_state(&mut conn, s.id, SessionState::Chatting).unwrap();
    assert_eq!(s.state, SessionState::Chatting);
    let first = db::now();
    db::sessions::mark_first_message(&mut conn, s.id, first).unwrap();
    db::sessions::mark_first_message(&mut conn, s.id, first + chrono::Duration::seconds(5))
        .unwrap();
    let s = db::sessions::get(&mut conn, s.id).unwrap();
    assert_eq!(
        s.first_message_at.map(|t| t.and_utc().timestamp()),
        Some(first.and_utc().timestamp()),
        "the first stamp is kept"
    );
    let s = db::sessions::finish(&mut conn, s.id, Outcome::Completed, "CODE").unwrap();
    assert_eq!(
        (s.state, s.outcome, s.completion_code.as_deref()),
        (
            SessionState::Finished,
            Some(Outcome::Completed),
            Some("CODE")
        )
    );
    assert!(s.finished_at.is_some());
    let latest = new_session(
        &mut conn,
        f.participant_id,
        f.version_id,
        Some(f.arm_ids[1]),
        "s-2",
    );
    assert_eq!(
        db::sessions::latest_of_participant(&mut conn, f.participant_id)
            .unwrap()
            .unwrap()
            .id,
        latest.id
    );
    assert_eq!(
        db::sessions::list_for_version(&mut conn, f.version_id)
            .unwrap()
            .len(),
        2
    );
});

on_both_backends!(sessions_are_counted_per_arm_and_state, |db: &TestDb| {
    let mut conn = db.conn();
    let f = fixture(&mut conn);
    new_session(
        &mut conn,
        f.participant_id,
        f.version_id,
        Some(f.arm_ids[1]),
        "s-2",
    );
    let abandoned = new_session(
        &mut conn,
        f.participant_id,
        f.version_id,
        Some(f.arm_ids[1]),
        "s-3",
    );
    db::sessions::set_state(&mut conn, abandoned.id, SessionState::TimedOut).unwrap();
    new_session(&mut conn, f.participant_id, f.version_id, None, "s-4");
    let mut counts = db::sessions::count_by_arm(
        &mut conn,
        f.version_id,
        &[SessionState::Consent, SessionState::Chatting],
        false,
    )
    .unwrap();
    counts.sort();
    assert_eq!(counts, vec![(f.arm_ids[0], 1), (f.arm_ids[1], 1)]);
});

on_both_backends!(
    messages_are_numbered_in_order_and_keep_their_text,
    |db: &TestDb| {
        let mut conn = db.conn();
        let f = fixture(&mut conn);
        let user = db::messages::append(
            &mut conn,
            f.session_id,
            &NewMessage {
                role: MessageRole::User,
                content: AWKWARD,
                ..Default::default()
            },
        )
        .unwrap();
        let reply = db::messages::append(
            &mut conn,
            f.session_id,
            &NewMessage {
                role: MessageRole::Assistant,
                content: "Sure.",
                ttft_ms: Some(40),
                gen_ms: Some(300),
                prompt_tokens: Some(120),
                gen_tokens: Some(2),
                finish_reason: Some("stop"),
                policy_json: Some("{\"seed\":7}"),
            },
        )
        .unwrap();
        assert_eq!((user.seq, reply.seq), (1, 2));
        let all = db::messages::list_for_session(&mut conn, f.session_id).unwrap();
        assert_eq!(all, vec![user, reply]);
        assert_eq!(all[0].content, AWKWARD);
        assert_eq!(all[1].ttft_ms, Some(40));
    }
);

on_both_backends!(concurrent_appends_get_distinct_numbers, |db: &TestDb| {
    let mut conn = db.conn();
    let f = fixture(&mut conn);
    let threads: Vec<_> = (0..4)
        .map(|i| {
            let url = db.url.clone();
            std::thread::spawn(move || {
                let mut conn = db::connect(&url).unwrap();
                for j in 0..5 {
                    let text = format!("{i}-{j}");
                    db::messages::append(
                        &mut conn,
                        f.session_id,
                        &NewMessage {
                            role: MessageRole::User,
                            content: &text,
                            ..Default::default()
                        },
                    )
                    .unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let seqs: Vec<i32> = db::messages::list_for_session(&mut conn, f.session_id)
        .unwrap()
        .iter()
        .map(|m| m.seq)
        .collect();
    assert_eq!(seqs, (1..=20).collect::<Vec<_>>());
});

on_both_backends!(
    document_revisions_are_numbered_with_their_author,
    |db: &TestDb| {
        let mut conn = db.conn();
        let f = fixture(&mut conn);
        assert!(db::revisions::latest(&mut conn, f.session_id)
            .unwrap()
            .is_none());
        let r1 = db::revisions::append(
            &mut conn,
            f.session_id,
            RevisionAuthor::AssistantInsert,
            Some(2),
            "Draft",
        )
        .unwrap();
        let r2 =
            db::revisions::append(&mut conn, f.session_id, RevisionAuthor::User, None, AWKWARD)
                .unwrap();
        assert_eq!((r1.rev, r2.rev), (1, 2));
        assert_eq!(
            db::revisions::latest(&mut conn, f.session_id)
                .unwrap()
                .unwrap(),
            r2
        );
        assert_eq!(
            db::revisions::list_for_session(&mut conn, f.session_id).unwrap(),
            vec![r1, r2]
        );
    }
);

on_both_backends!(
    a_repeated_rating_answer_or_event_is_stored_once,
    |db: &TestDb| {
        let mut conn = db.conn();
        let f = fixture(&mut conn);
        let (r, new) = db::ratings::record(&mut conn, f.session_id, 3, "interaction", 7).unwrap();
        assert!(new);
        let (again, new) =
            db::ratings::record(&mut conn, f.session_id, 3, "interaction", 2).unwrap();
        assert!(!new);
        assert_eq!(again, r, "the first value stays");
        db::ratings::record(&mut conn, f.session_id, 6, "interaction", 8).unwrap();
        assert_eq!(
            db::ratings::list_for_session(&mut conn, f.session_id)
                .unwrap()
                .len(),
            2
        );

        let (a, new) = db::answers::record(&mut conn, f.session_id, "strengths", AWKWARD).unwrap();
        assert!(new);
        let (_, new) = db::answers::record(&mut conn, f.session_id, "strengths", "other").unwrap();
        assert!(!new);
        assert_eq!(
            db::answers::list_for_session(&mut conn, f.session_id).unwrap(),
            vec![a]
        );

        let (e, new) = db::events::record(&mut conn, f.session_id, 11, "blur", "{}").unwrap();
        assert!(new);
        let (e2, new) = db::events::record(&mut conn, f.session_id, 11, "blur", "{}").unwrap();
        assert!(!new);
        assert_eq!(e, e2);
        db::events::record(&mut conn, f.session_id, 12, "focus", "{\"x\":1}").unwrap();
        let kinds: Vec<String> = db::events::list_for_session(&mut conn, f.session_id)
            .unwrap()
            .into_iter()
            .map(|e| e.kind)
            .collect();
        assert_eq!(kinds, ["blur", "focus"]);
    }
);

on_both_backends!(assignment_draws_form_a_numbered_ledger, |db: &TestDb| {
    let mut conn = db.conn();
    let f = fixture(&mut conn);
    for (i, arm) in f.arm_ids.iter().enumerate() {
        let inputs = format!("{{\"draw\":{i}}}");
        let a = db::assignments::record(
            &mut conn,
            &NewAssignment {
                study_version_id: f.version_id,
                participant_id: f.participant_id,
                method: "permuted_blocks",
                arm_id: *arm,
                task_id: "blog-post",
                topic_id: "remote-work",
                inputs_json: &inputs,
            },
        )
        .unwrap();
        assert_eq!(a.draw_index, i as i32);
    }
    let ledger = db::assignments::list_for_version(&mut conn, f.version_id).unwrap();
    assert_eq!(
        ledger.iter().map(|a| a.arm_id).collect::<Vec<_>>(),
        f.arm_ids
    );
});

on_both_backends!(candidates_rewards_and_pairs_are_stored, |db: &TestDb| {
    let mut conn = db.conn();
    let f = fixture(&mut conn);
    let c = db::candidates::insert(
        &mut conn,
        &NewCandidate {
            session_id: f.session_id,
            after_seq: 1,
            source: collabllm::db::vocab::CandidateSource::Compare,
            content: AWKWARD,
            chosen: None,
            policy_json: "{}",
            created_at: db::now(),
        },
    )
    .unwrap();
    let c = db::candidates::set_chosen(&mut conn, c.id, true).unwrap();
    assert_eq!(c.chosen, Some(true));
    assert_eq!(
        db::candidates::list_for_session(&mut conn, f.session_id).unwrap(),
        vec![c.clone()]
    );

    let r = db::rewards::record(
        &mut conn,
        &NewReward {
            session_id: f.session_id,
            turn: 1,
            candidate_id: Some(c.id),
            mr: 0.42,
            mr_std: 0.05,
            components_json: "{\"bleu\":0.3}",
            created_at: db::now(),
            config_sha256: "c0ffee",
        },
    )
    .unwrap();
    assert_eq!(
        db::rewards::list_for_session(&mut conn, f.session_id).unwrap(),
        vec![r]
    );
});

on_both_backends!(foreign_keys_are_enforced, |db: &TestDb| {
    let mut conn = db.conn();
    let err = db::messages::append(
        &mut conn,
        999_999,
        &NewMessage {
            role: MessageRole::User,
            content: "x",
            ..Default::default()
        },
    );
    assert!(
        err.is_err(),
        "a message for a session that does not exist is refused"
    );
});

#[derive(QueryableByName, PartialEq, Debug)]
struct Line {
    #[diesel(sql_type = Text)]
    line: String,
}

/// Everything the migrations define, as comparable text.
fn schema_dump(conn: &mut DbConn) -> Vec<String> {
    let query = match conn {
        DbConn::Sqlite(_) => {
            "SELECT type || ' ' || name || ': ' || COALESCE(sql, '') AS line FROM sqlite_master \
             WHERE name NOT LIKE 'sqlite_%' ORDER BY type, name"
        }
        DbConn::Postgres(_) => {
            "SELECT table_name || '.' || column_name || ' ' || data_type || ' ' || is_nullable || ' ' \
             || COALESCE(column_default, '') AS line FROM information_schema.columns \
             WHERE table_schema = current_schema() \
             UNION ALL SELECT indexname || ': ' || indexdef FROM pg_indexes WHERE schemaname = current_schema() \
             UNION ALL SELECT conname || ': ' || pg_get_constraintdef(oid) FROM pg_constraint \
             WHERE connamespace = current_schema()::regnamespace ORDER BY 1"
        }
    };
    diesel::sql_query(query)
        .load::<Line>(conn)
        .unwrap()
        .into_iter()
        .map(|l| l.line)
        // Sequence names carry no meaning and Postgres numbers them anew.
        .filter(|l| !l.contains("__diesel_schema_migrations"))
        .collect()
}

on_both_backends!(
    migrations_run_up_down_up_to_the_same_schema,
    |db: &TestDb| {
        let mut conn = db.conn();
        let up = schema_dump(&mut conn);
        assert!(up.iter().any(|l| l.contains("synth_turns")), "{up:?}");
        db::revert_all(&mut conn).unwrap();
        let down = schema_dump(&mut conn);
        assert!(
            !down.iter().any(|l| l.contains("sessions")),
            "down leaves tables: {down:?}"
        );
        db::migrate(&mut conn).unwrap();
        assert_eq!(schema_dump(&mut conn), up);
    }
);

// Nodes started at the same moment on an empty database all come up: the migrations run once,
// under a lock, and the other nodes wait for them (without it, PostgreSQL fails a node with a
// duplicate `pg_type` row in the first round). Several rounds, each on a fresh database, three
// nodes at once.
on_both_backends!(
    nodes_started_together_on_an_empty_database_all_migrate_once,
    |given: &TestDb| {
        const NODES: usize = 3;
        for round in 0..4 {
            let fresh = if db::Backend::of_url(&given.url) == db::Backend::Sqlite {
                TestDb::sqlite()
            } else {
                TestDb::postgres()
            };
            let barrier = std::sync::Barrier::new(NODES);
            let applied: Vec<Vec<String>> = std::thread::scope(|scope| {
                let nodes: Vec<_> = (0..NODES)
                    .map(|_| {
                        scope.spawn(|| {
                            let mut conn = db::connect(&fresh.url).expect("connect");
                            barrier.wait();
                            db::migrate(&mut conn)
                        })
                    })
                    .collect();
                nodes
                    .into_iter()
                    .enumerate()
                    .map(|(node, n)| {
                        n.join()
                            .expect("the node's thread")
                            .unwrap_or_else(|e| panic!("round {round}, node {node}: {e}"))
                    })
                    .collect()
            });
            let mut counts: Vec<usize> = applied.iter().map(Vec::len).collect();
            counts.sort();
            let all = applied.iter().map(Vec::len).max().unwrap();
            assert!(all > 0, "round {round}: nothing was applied");
            assert_eq!(
                counts,
                [0, 0, all],
                "round {round}: each migration runs once"
            );
            let mut conn = db::connect(&fresh.url).unwrap();
            assert!(db::migrate(&mut conn).unwrap().is_empty());
            fixture(&mut conn);
        }
    }
);

/// The plan the database picks for `query`, one line per step (PostgreSQL told to avoid whole
/// table scans where it can, so that an index that exists is used even on a tiny table).
fn plan(conn: &mut DbConn, query: &str) -> String {
    #[derive(QueryableByName)]
    struct Step {
        #[diesel(sql_type = Text)]
        detail: String,
    }
    #[derive(QueryableByName)]
    struct PgStep {
        #[diesel(sql_type = Text, column_name = "QUERY PLAN")]
        detail: String,
    }
    match conn {
        DbConn::Sqlite(_) => diesel::sql_query(format!("EXPLAIN QUERY PLAN {query}"))
            .load::<Step>(conn)
            .unwrap()
            .into_iter()
            .map(|s| s.detail)
            .collect::<Vec<_>>()
            .join("\n"),
        DbConn::Postgres(_) => {
            diesel::sql_query("SET enable_seqscan = off")
                .execute(conn)
                .unwrap();
            diesel::sql_query(format!("EXPLAIN {query}"))
                .load::<PgStep>(conn)
                .unwrap()
                .into_iter()
                .map(|s| s.detail)
                .collect::<Vec<_>>()
                .join("\n")
        }
    }
}

// The lookups every page, socket and sweep makes read an index, not every session stored.
on_both_backends!(
    sessions_are_found_by_token_and_idleness_through_indexes,
    |db: &TestDb| {
        let mut conn = db.conn();
        let by_token = plan(
            &mut conn,
            "SELECT id FROM sessions WHERE token_hash = 'abc'",
        );
        assert!(by_token.contains("sessions_token_hash"), "{by_token}");
        let idle = plan(
            &mut conn,
            "SELECT id FROM sessions WHERE state IN ('consent', 'chatting') \
             AND last_activity_at < '2026-01-01 00:00:00'",
        );
        assert!(idle.contains("sessions_state_activity"), "{idle}");
    }
);

#[test]
fn an_unreachable_database_gives_a_clear_error() {
    let err = db::open("postgres://postgres:secret@127.0.0.1:1/none", 2)
        .err()
        .unwrap();
    let text = err.to_string();
    assert!(text.contains("cannot connect to the database"), "{text}");
    assert!(text.contains("127.0.0.1:1"), "{text}");
    assert!(
        !text.contains("secret"),
        "the password is not shown: {text}"
    );
    assert!(text.contains("COLLABLLM_DATABASE_URL"), "{text}");
}

#[test]
fn an_sqlite_file_in_a_missing_directory_gives_a_clear_error() {
    let err = db::open("sqlite:///nonexistent-dir/x.sqlite3", 2)
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("/nonexistent-dir/x.sqlite3"),
        "{err}"
    );
}

#[test]
fn sqlite_runs_in_wal_mode_with_foreign_keys() {
    let db = TestDb::sqlite();
    let mut conn = db.conn();
    #[derive(QueryableByName)]
    struct Mode {
        #[diesel(sql_type = Text)]
        journal_mode: String,
    }
    let mode: Mode = diesel::sql_query("PRAGMA journal_mode")
        .get_result(&mut conn)
        .unwrap();
    assert_eq!(mode.journal_mode, "wal");
    if let DbConn::Sqlite(c) = &mut conn {
        c.batch_execute("SELECT 1").unwrap();
    }
}

on_both_backends!(a_lease_has_one_holder_until_it_expires, |db: &TestDb| {
    use db::leases::{self, Released};
    let mut conn = db.conn();
    let f = fixture(&mut conn);
    let name = leases::reply_name(f.session_id);
    let ttl = chrono::Duration::seconds(30);
    let sid = Some(f.session_id);
    assert!(leases::acquire(&mut conn, &name, "node-a", ttl, sid).unwrap());
    assert!(!leases::acquire(&mut conn, &name, "node-b", ttl, sid).unwrap());
    // The holder renews it with its progress; a stop asked elsewhere reaches it.
    assert_eq!(
        leases::renew(&mut conn, &name, "node-a", ttl, Some("{\"msg_seq\":2}")).unwrap(),
        Some(false)
    );
    assert_eq!(
        leases::get(&mut conn, &name)
            .unwrap()
            .unwrap()
            .progress
            .as_deref(),
        Some("{\"msg_seq\":2}")
    );
    assert!(leases::request_cancel(&mut conn, &name).unwrap());
    assert_eq!(
        leases::renew(&mut conn, &name, "node-a", ttl, None).unwrap(),
        Some(true)
    );
    assert_eq!(
        leases::renew(&mut conn, &name, "node-b", ttl, None).unwrap(),
        None
    );
    assert!(leases::expired_sessions(&mut conn, db::now())
        .unwrap()
        .is_empty());

    // Node A stops renewing (its lease is made to expire): node B takes it over, A has lost it.
    assert!(leases::acquire(&mut conn, &name, "node-a", -ttl, sid).unwrap());
    assert_eq!(
        leases::expired_sessions(&mut conn, db::now()).unwrap(),
        [f.session_id]
    );
    assert!(leases::acquire(&mut conn, &name, "node-b", ttl, sid).unwrap());
    let lease = leases::get(&mut conn, &name).unwrap().unwrap();
    assert_eq!(
        (lease.holder.as_str(), lease.progress, lease.cancel),
        ("node-b", None, false)
    );
    assert_eq!(
        leases::renew(&mut conn, &name, "node-a", ttl, None).unwrap(),
        None
    );
    assert_eq!(
        leases::release(&mut conn, &name, "node-a").unwrap(),
        Released::HeldElsewhere
    );
    assert_eq!(
        leases::release(&mut conn, &name, "node-b").unwrap(),
        Released::Released
    );
    assert_eq!(
        leases::release(&mut conn, &name, "node-b").unwrap(),
        Released::Absent
    );
    assert!(!leases::request_cancel(&mut conn, &name).unwrap());
});

/// Concurrent writes through the group writer: each is visible to any other connection as soon
/// as it is acknowledged (committed, not merely queued), and a write that fails or panics is
/// rolled back alone while the writes committed beside it stand.
async fn concurrent_writes_commit_before_their_answer_and_fail_alone(db: TestDb) {
    let f = fixture(&mut db.conn());
    let backend = db::Backend::of_url(&db.url);
    let writer = std::sync::Arc::new(db::group::Writer::new(db.pool(), backend).unwrap());
    let writes = (1..=60i64).map(|seq| {
        let writer = writer.clone();
        let session_id = f.session_id;
        tokio::spawn(async move {
            let written = writer
                .write(move |conn| {
                    db::events::record(conn, session_id, seq, "focus", "{}")?;
                    match seq % 10 {
                        3 => Err(DbError::Invalid(format!("write {seq} refused"))),
                        7 => panic!("write {seq} panics"),
                        _ => Ok(seq),
                    }
                })
                .await;
            (seq, written)
        })
    });
    let mut committed = Vec::new();
    for write in writes {
        let (seq, written) = write.await.unwrap();
        match written {
            Ok(n) => {
                assert_eq!(n, seq);
                let stored = db::events::list_for_session(&mut db.conn(), f.session_id).unwrap();
                assert!(
                    stored.iter().any(|e| e.client_seq == seq),
                    "write {seq} was answered before another connection could see it"
                );
                committed.push(seq);
            }
            Err(e) => assert!(
                matches!(seq % 10, 3 | 7),
                "write {seq} failed for no reason: {e}"
            ),
        }
    }
    let wanted: Vec<i64> = (1..=60).filter(|s| !matches!(s % 10, 3 | 7)).collect();
    assert_eq!(committed, wanted);
    let mut stored: Vec<i64> = db::events::list_for_session(&mut db.conn(), f.session_id)
        .unwrap()
        .iter()
        .map(|e| e.client_seq)
        .collect();
    stored.sort_unstable();
    assert_eq!(
        stored, wanted,
        "exactly the writes that succeeded are stored"
    );
}

crate::on_both_backends_async!(concurrent_writes_commit_before_their_answer_and_fail_alone);

// A write that panicked (the thread survives it: a blocking pool reuses its threads) leaves the
// next write on that thread in a transaction of its own, not joined to one that is gone.
on_both_backends!(
    a_write_after_a_panicked_one_is_still_a_transaction,
    |db: &TestDb| {
        let mut conn = db.conn();
        let f = fixture(&mut conn);
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            db::write_transaction(&mut conn, |_| -> Result<(), DbError> {
                panic!("the work panics")
            })
        }));
        assert!(panicked.is_err());
        // Closing the connection ends what the panic left open.
        drop(conn);
        let refused = db::write_transaction(&mut db.conn(), |conn| {
            db::events::record(conn, f.session_id, 1, "focus", "{}")?;
            Err::<(), _>(DbError::Invalid("refused after writing".into()))
        });
        assert!(refused.is_err());
        assert!(
            db::events::list_for_session(&mut db.conn(), f.session_id)
                .unwrap()
                .is_empty(),
            "the refused write was rolled back"
        );
    }
);
