//! CSV export: `sessions.csv` (one row per session, wide), `messages.csv`, `ratings.csv`,
//! `revisions.csv`, `candidates.csv`, `events.csv`, `assignments.csv` (long) and `codebook.csv`,
//! which describes every column. RFC 4180, UTF-8, newlines inside fields kept, formula starts
//! neutralised.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use super::{for_each_session, neutralise, study_versions, timestamp, ExportError, Filter};
use crate::db::models::{Candidate, Session};
use crate::db::provenance::Provenance;
use crate::db::vocab::{CandidateSource, MessageRole, Outcome, SessionState};
use crate::db::{self, DbConn};
use crate::protocol::Protocol;

/// What was written: file names and their data rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub files: Vec<(String, u64)>,
}

/// Column name, type and meaning, for the codebook.
type Column = (String, &'static str, String);

fn col(name: &str, kind: &'static str, meaning: &str) -> Column {
    (name.to_string(), kind, meaning.to_string())
}

fn common_columns() -> Vec<Column> {
    vec![
        col("session", "text", "pseudonymous session id"),
        col(
            "participant",
            "text",
            "pseudonymous participant id (never the external id)",
        ),
        col("arm", "text", "study arm the session was assigned to"),
    ]
}

fn message_columns() -> Vec<Column> {
    let mut c = common_columns();
    c.extend([
        col(
            "seq",
            "integer",
            "position of the message in the session, from 1",
        ),
        col("role", "text", "user or assistant"),
        col(
            "created_at",
            "timestamp",
            "when the server stored the message (UTC)",
        ),
        col(
            "ttft_ms",
            "integer",
            "assistant: time from the request to the first token",
        ),
        col(
            "gen_ms",
            "integer",
            "assistant: time from the first token to the end",
        ),
        col(
            "prompt_tokens",
            "integer",
            "assistant: tokens of the prompt",
        ),
        col("gen_tokens", "integer", "assistant: tokens generated"),
        col(
            "finish_reason",
            "text",
            "assistant: stop, length or cancelled (participant pressed stop)",
        ),
        col("content", "text", "the message text"),
    ]);
    c
}

fn rating_columns() -> Vec<Column> {
    let mut c = common_columns();
    c.extend([
        col(
            "after_turn",
            "integer",
            "completed turns when the rating was given",
        ),
        col(
            "kind",
            "text",
            "periodic (during the chat) or final (after it)",
        ),
        col("key", "text", "rating id in the protocol"),
        col("value", "integer", "the rating, on the protocol's scale"),
        col(
            "created_at",
            "timestamp",
            "when the rating was stored (UTC)",
        ),
    ]);
    c
}

fn revision_columns() -> Vec<Column> {
    let mut c = common_columns();
    c.extend([
        col("rev", "integer", "revision number of the document, from 1"),
        col(
            "author",
            "text",
            "user (typed) or assistant_insert (a reply inserted with one click)",
        ),
        col(
            "inserted_message",
            "integer",
            "for inserts: seq of the assistant message inserted",
        ),
        col(
            "created_at",
            "timestamp",
            "when the revision was stored (UTC)",
        ),
        col("words", "integer", "words in the document at this revision"),
        col("content", "text", "the whole document at this revision"),
    ]);
    c
}

fn candidate_columns() -> Vec<Column> {
    let mut c = common_columns();
    c.extend([
        col(
            "after_seq",
            "integer",
            "seq of the user message the reply answers",
        ),
        col(
            "source",
            "text",
            &format!(
                "{}: compare (one of two replies of a comparison turn), regenerate (a reply the \
                 participant asked to replace, then its replacement), mr (a fresh candidate \
                 scored by `collabllm pairs`)",
                one_of(CandidateSource::ALL)
            ),
        ),
        col(
            "candidate",
            "integer",
            "position among the replies to the same message and source, from 0 (A, then B; for \
             regenerate the replaced reply first)",
        ),
        col(
            "chosen",
            "boolean",
            "true if the participant picked it (both true: a tie; both false: both bad); empty \
             while undecided or for mr candidates",
        ),
        col(
            "choice",
            "text",
            "the participant's pick for the pair: a, b, tie, both_bad (empty while undecided)",
        ),
        col("seed", "integer", "sampling seed of the reply"),
        col("created_at", "timestamp", "when the reply was stored (UTC)"),
        col("content", "text", "the reply text"),
    ]);
    c
}

/// "a, b or c" for a vocabulary's values.
fn one_of<T: std::fmt::Display>(values: &[T]) -> String {
    let texts: Vec<String> = values.iter().map(ToString::to_string).collect();
    match texts.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        _ => texts.join(""),
    }
}

/// The participant's pick among a pair of candidates, as `a`, `b`, `tie` or `both_bad`.
fn choice(pair: &[&Candidate]) -> String {
    match pair.iter().map(|c| c.chosen).collect::<Vec<_>>()[..] {
        [Some(true), Some(false)] => "a",
        [Some(false), Some(true)] => "b",
        [Some(true), Some(true)] => "tie",
        [Some(false), Some(false)] => "both_bad",
        _ => "",
    }
    .to_string()
}

fn event_columns() -> Vec<Column> {
    let mut c = common_columns();
    c.extend([
        col("client_seq", "integer", "the browser's frame number"),
        col(
            "kind",
            "text",
            "focus, blur, visibility_visible, visibility_hidden, …",
        ),
        col(
            "created_at",
            "timestamp",
            "when the server received the event (UTC)",
        ),
        col("data", "json", "what the browser sent with the event"),
    ]);
    c
}

fn assignment_columns() -> Vec<Column> {
    vec![
        col(
            "draw_index",
            "integer",
            "position of the draw in its study version's ledger, from 0",
        ),
        col(
            "study_version",
            "integer",
            "protocol version the draw was made under",
        ),
        col("participant", "text", "pseudonymous participant id"),
        col(
            "method",
            "text",
            "permuted_blocks, least_filled or permuted_blocks_quota_fallback",
        ),
        col("arm", "text", "arm drawn"),
        col("task", "text", "task drawn"),
        col("topic", "text", "topic drawn"),
        col("created_at", "timestamp", "when the draw was made (UTC)"),
        col(
            "inputs",
            "json",
            "what the draw saw: seed, block, position, counts",
        ),
    ]
}

struct Csv {
    path: PathBuf,
    writer: csv::Writer<std::fs::File>,
    /// Which columns hold text (neutralised) rather than numbers, booleans or timestamps.
    text: Vec<bool>,
    rows: u64,
}

impl Csv {
    fn create(dir: &Path, name: &str, columns: &[Column]) -> Result<Self, ExportError> {
        let path = dir.join(name);
        let mut writer = csv::Writer::from_path(&path).map_err(|e| write_error(&path, e))?;
        writer
            .write_record(columns.iter().map(|(n, _, _)| n.as_str()))
            .map_err(|e| write_error(&path, e))?;
        let text = columns
            .iter()
            .map(|(_, kind, _)| matches!(*kind, "text" | "json" | ""))
            .collect();
        Ok(Self {
            path,
            writer,
            text,
            rows: 0,
        })
    }

    fn record(&mut self, cells: impl IntoIterator<Item = String>) -> Result<(), ExportError> {
        let cells: Vec<String> = cells
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                if self.text.get(i).copied().unwrap_or(true) {
                    neutralise(&c).into_owned()
                } else {
                    c
                }
            })
            .collect();
        self.writer
            .write_record(&cells)
            .map_err(|e| write_error(&self.path, e))?;
        self.rows += 1;
        Ok(())
    }

    fn finish(mut self) -> Result<(String, u64), ExportError> {
        self.writer.flush().map_err(|e| ExportError::Write {
            path: self.path.display().to_string(),
            source: e,
        })?;
        let name = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok((name, self.rows))
    }
}

fn write_error(path: &Path, e: csv::Error) -> ExportError {
    ExportError::Write {
        path: path.display().to_string(),
        source: e.into(),
    }
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_default()
}

fn words(text: &str) -> usize {
    text.split_whitespace().count()
}

/// Writes the CSV tables of study `slug` into `dir`; `progress(done, total)` follows the sessions.
pub fn export(
    conn: &mut DbConn,
    slug: &str,
    filter: &Filter,
    dir: &Path,
    progress: &dyn Fn(u64, u64),
) -> Result<Written, ExportError> {
    let study = db::studies::find_by_slug(conn, slug)?
        .ok_or_else(|| ExportError::UnknownStudy(slug.into()))?;
    std::fs::create_dir_all(dir).map_err(|source| ExportError::Write {
        path: dir.display().to_string(),
        source,
    })?;
    let versions = study_versions(conn, study.id)?;
    let version_ids: Vec<i64> = versions.keys().copied().collect();
    let arm_of = |s: &Session| {
        s.arm_id
            .and_then(|a| versions[&s.study_version_id].arms.get(&a).cloned())
    };

    // The wide table's rating and answer columns come from the protocols, whether or not anyone
    // gave them, so every export of a study has the same columns. Periodic ratings of a protocol
    // without a turn cap get a column for every turn they were due up to the last one rated.
    let mut periodic: BTreeSet<(String, i32)> = BTreeSet::new();
    let mut finals: BTreeSet<String> = BTreeSet::new();
    let mut answers: BTreeSet<String> = BTreeSet::new();
    for version in versions.values() {
        let protocol = &version.protocol;
        finals.extend(protocol.final_ratings().iter().map(|r| r.id.clone()));
        answers.extend(protocol.questionnaire.iter().map(|q| q.id.clone()));
    }
    let mut total = 0u64;
    let mut last_rated_turn = 0;
    // The (version, participant) of every session the filter admits: their assignments are
    // the ones exported.
    let mut admitted: BTreeSet<(i64, i64)> = BTreeSet::new();
    for_each_session(conn, &version_ids, |conn, s| {
        let simulated = db::participants::get(conn, s.participant_id)?.simulated;
        if !filter.admits(s, arm_of(s).as_deref(), simulated) {
            return Ok(());
        }
        total += 1;
        admitted.insert((s.study_version_id, s.participant_id));
        let protocol = &versions[&s.study_version_id].protocol;
        for r in db::ratings::list_for_session(conn, s.id)? {
            if is_final(protocol, &r.rating_key) {
                finals.insert(r.rating_key);
            } else {
                last_rated_turn = last_rated_turn.max(r.after_turn);
                periodic.insert((r.rating_key, r.after_turn));
            }
        }
        Ok(())
    })?;
    for version in versions.values() {
        let protocol = &version.protocol;
        let last = match protocol.session.max_turns {
            0 => last_rated_turn,
            cap => i32::try_from(cap).unwrap_or(i32::MAX),
        };
        for turn in 1..=last {
            let due = protocol.periodic_ratings_due(turn as u32);
            periodic.extend(due.iter().map(|r| (r.id.clone(), turn)));
        }
    }

    let mut session_cols = common_columns();
    session_cols.extend([
        col("simulated", "boolean", "true for simulated participants"),
        col("study", "text", "study slug"),
        col(
            "study_version",
            "integer",
            "protocol version the session ran under",
        ),
        col("protocol_sha256", "text", "sha256 of that protocol's text"),
        col("task", "text", "task (document type) id"),
        col("topic", "text", "topic id"),
        col("state", "text", &one_of(SessionState::ALL)),
        col(
            "outcome",
            "text",
            &format!("{} (empty while running)", one_of(Outcome::ALL)),
        ),
        col("started_at", "timestamp", "entry to the study (UTC)"),
        col("consented_at", "timestamp", "consent given (UTC)"),
        col("first_message_at", "timestamp", "first message sent (UTC)"),
        col("finished_at", "timestamp", "end of the session (UTC)"),
        col(
            "duration_s",
            "number",
            "seconds from entry to the end (or to the last activity)",
        ),
        col(
            "turns",
            "integer",
            "completed turns: assistant replies, not counting those the participant stopped",
        ),
        col(
            "user_words",
            "integer",
            "words the participant wrote in the chat",
        ),
        col(
            "assistant_tokens",
            "integer",
            "tokens the assistant generated",
        ),
        col(
            "mean_ttft_ms",
            "number",
            "mean time to the first token of the replies",
        ),
        col(
            "document_revisions",
            "integer",
            "stored revisions of the document",
        ),
        col(
            "final_document_words",
            "integer",
            "words in the last revision",
        ),
        col(
            "final_document",
            "text",
            "the last revision of the document",
        ),
    ]);
    for (key, turn) in &periodic {
        session_cols.push((
            format!("rating_{key}_t{turn}"),
            "integer",
            format!("periodic rating {key:?} after turn {turn}"),
        ));
    }
    for key in &finals {
        session_cols.push((
            format!("rating_{key}"),
            "integer",
            format!("final rating {key:?}"),
        ));
    }
    for key in &answers {
        session_cols.push((
            format!("answer_{key}"),
            "text",
            format!("questionnaire answer {key:?}"),
        ));
    }

    let tables: [(&str, Vec<Column>); 7] = [
        ("sessions.csv", session_cols),
        ("messages.csv", message_columns()),
        ("ratings.csv", rating_columns()),
        ("revisions.csv", revision_columns()),
        ("candidates.csv", candidate_columns()),
        ("events.csv", event_columns()),
        ("assignments.csv", assignment_columns()),
    ];
    let mut codebook = Csv::create(
        dir,
        "codebook.csv",
        &[
            col("file", "", ""),
            col("column", "", ""),
            col("type", "", ""),
            col("description", "", ""),
            col("pandas_dtype", "", ""),
        ],
    )?;
    for (file, columns) in &tables {
        for (name, kind, meaning) in columns {
            codebook.record([
                file.to_string(),
                name.clone(),
                kind.to_string(),
                meaning.clone(),
                pandas_dtype(kind).to_string(),
            ])?;
        }
    }
    let mut files: Vec<Csv> = tables
        .iter()
        .map(|(name, columns)| Csv::create(dir, name, columns))
        .collect::<Result<_, _>>()?;
    let [sessions_csv, messages_csv, ratings_csv, revisions_csv, candidates_csv, events_csv, assignments_csv] =
        &mut files[..]
    else {
        unreachable!("seven tables")
    };

    // Second pass: the rows.
    let mut done = 0u64;
    for_each_session(conn, &version_ids, |conn, s| {
        let arm = arm_of(s);
        let participant = db::participants::get(conn, s.participant_id)?;
        if !filter.admits(s, arm.as_deref(), participant.simulated) {
            return Ok(());
        }
        let version = &versions[&s.study_version_id];
        let who = [
            s.public_id.clone(),
            participant.pseudonym.clone(),
            opt(arm.clone()),
        ];
        let messages = db::messages::list_for_session(conn, s.id)?;
        for m in &messages {
            messages_csv.record(who.iter().cloned().chain([
                m.seq.to_string(),
                m.role.to_string(),
                timestamp(&m.created_at),
                opt(m.ttft_ms),
                opt(m.gen_ms),
                opt(m.prompt_tokens),
                opt(m.gen_tokens),
                opt(m.finish_reason.clone()),
                m.content.clone(),
            ]))?;
        }
        let ratings = db::ratings::list_for_session(conn, s.id)?;
        for r in &ratings {
            let kind = if is_final(&version.protocol, &r.rating_key) {
                "final"
            } else {
                "periodic"
            };
            ratings_csv.record(who.iter().cloned().chain([
                r.after_turn.to_string(),
                kind.to_string(),
                r.rating_key.clone(),
                r.value.to_string(),
                timestamp(&r.created_at),
            ]))?;
        }
        let revisions = db::revisions::list_for_session(conn, s.id)?;
        for r in &revisions {
            revisions_csv.record(who.iter().cloned().chain([
                r.rev.to_string(),
                r.author.to_string(),
                opt(r.message_seq),
                timestamp(&r.created_at),
                words(&r.content).to_string(),
                r.content.clone(),
            ]))?;
        }
        let candidates = db::candidates::list_for_session(conn, s.id)?;
        let mut groups: Vec<((i32, CandidateSource), Vec<&Candidate>)> = Vec::new();
        for c in &candidates {
            let key = (c.after_seq, c.source);
            match groups.iter_mut().find(|(k, _)| *k == key) {
                Some((_, group)) => group.push(c),
                None => groups.push((key, vec![c])),
            }
        }
        for (_, group) in &groups {
            let pick = if group.len() == 2 {
                choice(group)
            } else {
                String::new()
            };
            for (i, c) in group.iter().enumerate() {
                let seed = Provenance::parse(&c.policy_json).and_then(|p| p.sampling.seed);
                candidates_csv.record(who.iter().cloned().chain([
                    c.after_seq.to_string(),
                    c.source.to_string(),
                    i.to_string(),
                    opt(c.chosen),
                    pick.clone(),
                    opt(seed),
                    timestamp(&c.created_at),
                    c.content.clone(),
                ]))?;
            }
        }
        for e in db::events::list_for_session(conn, s.id)? {
            events_csv.record(who.iter().cloned().chain([
                e.client_seq.to_string(),
                e.kind,
                timestamp(&e.created_at),
                e.payload_json,
            ]))?;
        }
        let answer_rows = db::answers::list_for_session(conn, s.id)?;
        let replies: Vec<_> = messages
            .iter()
            .filter(|m| m.role == MessageRole::Assistant)
            .collect();
        let ttfts: Vec<i32> = replies.iter().filter_map(|m| m.ttft_ms).collect();
        let end = s.finished_at.unwrap_or(s.last_activity_at);
        let last = revisions
            .last()
            .map(|r| r.content.clone())
            .unwrap_or_default();
        let mut row: Vec<String> = who.to_vec();
        row.extend([
            participant.simulated.to_string(),
            slug.to_string(),
            version.row.version.to_string(),
            version.row.protocol_sha256.clone(),
            opt(s.task_id.clone()),
            opt(s.topic_id.clone()),
            s.state.to_string(),
            opt(s.outcome.map(|o| o.to_string())),
            timestamp(&s.started_at),
            opt(s.consented_at.as_ref().map(timestamp)),
            opt(s.first_message_at.as_ref().map(timestamp)),
            opt(s.finished_at.as_ref().map(timestamp)),
            format!(
                "{:.3}",
                (end - s.started_at).num_milliseconds() as f64 / 1000.0
            ),
            messages.iter().filter(|m| m.is_turn()).count().to_string(),
            messages
                .iter()
                .filter(|m| m.role == MessageRole::User)
                .map(|m| words(&m.content))
                .sum::<usize>()
                .to_string(),
            replies
                .iter()
                .filter_map(|m| m.gen_tokens)
                .sum::<i32>()
                .to_string(),
            if ttfts.is_empty() {
                String::new()
            } else {
                format!(
                    "{:.1}",
                    ttfts.iter().map(|&t| f64::from(t)).sum::<f64>() / ttfts.len() as f64
                )
            },
            revisions.len().to_string(),
            words(&last).to_string(),
            last,
        ]);
        let value_of = |key: &str, turn: Option<i32>| {
            opt(ratings
                .iter()
                .find(|r| r.rating_key == key && turn.is_none_or(|t| r.after_turn == t))
                .map(|r| r.value))
        };
        row.extend(
            periodic
                .iter()
                .map(|(key, turn)| value_of(key, Some(*turn))),
        );
        row.extend(finals.iter().map(|key| value_of(key, None)));
        row.extend(answers.iter().map(|key| {
            opt(answer_rows
                .iter()
                .find(|a| &a.question_key == key)
                .map(|a| a.answer.clone()))
        }));
        sessions_csv.record(row)?;
        done += 1;
        progress(done, total);
        Ok(())
    })?;

    for (version_id, version) in &versions {
        for a in db::assignments::list_for_version(conn, *version_id)? {
            if !admitted.contains(&(*version_id, a.participant_id)) {
                continue;
            }
            let arm = version.arms.get(&a.arm_id).cloned();
            let participant = db::participants::get(conn, a.participant_id)?;
            assignments_csv.record([
                a.draw_index.to_string(),
                version.row.version.to_string(),
                participant.pseudonym,
                a.method,
                opt(arm),
                a.task_id,
                a.topic_id,
                timestamp(&a.created_at),
                a.inputs_json,
            ])?;
        }
    }

    let mut written = vec![codebook.finish()?];
    for file in files {
        written.push(file.finish()?);
    }
    Ok(Written { files: written })
}

/// The pandas dtype that reads a column of the kind without loss: nullable integers stay
/// integers when cells are blank (`Int64`, not float64). Timestamps are `datetime`, which pandas
/// takes through `parse_dates` rather than `dtype` (the README shows the call).
fn pandas_dtype(kind: &str) -> &'static str {
    match kind {
        "integer" => "Int64",
        "number" => "Float64",
        "boolean" => "boolean",
        "timestamp" => "datetime",
        _ => "string",
    }
}

fn is_final(protocol: &Protocol, key: &str) -> bool {
    protocol.final_ratings().iter().any(|r| r.id == key)
}
