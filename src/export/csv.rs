//! CSV export: `sessions.csv` (one row per session, wide), `messages.csv`, `ratings.csv`,
//! `revisions.csv`, `candidates.csv`, `events.csv`, `assignments.csv` (long) and `codebook.csv`,
//! which describes every column. Each table is declared once, column by column (name, type,
//! meaning and how the cell is made), and both its file and its codebook entries come from that. RFC 4180, UTF-8, newlines inside fields kept, formula starts
//! neutralised.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use super::{
    for_each_session, neutralise, study_versions, timestamp, ExportError, Filter, Version,
};
use crate::db::models::{
    Answer, Assignment, Candidate, DocumentRevision, Event, Message, Rating, Session,
};
use crate::db::provenance::Provenance;
use crate::db::vocab::{CandidateSource, MessageRole, Outcome, SessionState};
use crate::db::{self, DbConn};
use crate::protocol::Protocol;

/// What was written: file names and their data rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub files: Vec<(String, u64)>,
}

/// A column's type: its name in the codebook, the pandas dtype that reads it and whether its
/// cells are text (neutralised against spreadsheet formulas).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Text,
    Json,
    Integer,
    Number,
    Boolean,
    Timestamp,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Text => "text",
            Kind::Json => "json",
            Kind::Integer => "integer",
            Kind::Number => "number",
            Kind::Boolean => "boolean",
            Kind::Timestamp => "timestamp",
        }
    }

    /// The pandas dtype that reads a column of the kind without loss: nullable integers stay
    /// integers when cells are blank (`Int64`, not float64). Timestamps are `datetime`, which
    /// pandas takes through `parse_dates` rather than `dtype` (docs/study.md shows the call).
    fn pandas_dtype(self) -> &'static str {
        match self {
            Kind::Integer => "Int64",
            Kind::Number => "Float64",
            Kind::Boolean => "boolean",
            Kind::Timestamp => "datetime",
            Kind::Text | Kind::Json => "string",
        }
    }

    fn is_text(self) -> bool {
        matches!(self, Kind::Text | Kind::Json)
    }
}

/// One column of a table: its codebook entry and how a row's cell is made from the table's
/// context `C` (whose row it is) and item `T` (what the row is of).
struct Column<C, T> {
    name: String,
    kind: Kind,
    meaning: String,
    cell: Cell<C, T>,
}

/// How a column's cell is made from a row's context and item.
type Cell<C, T> = Box<dyn Fn(&C, &T) -> String>;

fn column<C, T>(
    name: impl Into<String>,
    kind: Kind,
    meaning: impl Into<String>,
    cell: impl Fn(&C, &T) -> String + 'static,
) -> Column<C, T> {
    Column {
        name: name.into(),
        kind,
        meaning: meaning.into(),
        cell: Box::new(cell),
    }
}

/// A table of the export: its file and columns, from which the file's rows and its codebook
/// entries are both made, so the two cannot disagree.
struct Table<C, T> {
    file: &'static str,
    columns: Vec<Column<C, T>>,
}

impl<C, T> Table<C, T> {
    fn describe(&self, codebook: &mut Csv) -> Result<(), ExportError> {
        for c in &self.columns {
            codebook.record([
                self.file.to_string(),
                c.name.clone(),
                c.kind.name().to_string(),
                c.meaning.clone(),
                c.kind.pandas_dtype().to_string(),
            ])?;
        }
        Ok(())
    }

    fn open(self, dir: &Path) -> Result<Open<C, T>, ExportError> {
        let header: Vec<(&str, Kind)> = self
            .columns
            .iter()
            .map(|c| (c.name.as_str(), c.kind))
            .collect();
        let csv = Csv::create(dir, self.file, &header)?;
        Ok(Open { table: self, csv })
    }
}

/// A table whose file is being written.
struct Open<C, T> {
    table: Table<C, T>,
    csv: Csv,
}

impl<C, T> Open<C, T> {
    fn row(&mut self, context: &C, item: &T) -> Result<(), ExportError> {
        let cells = self.table.columns.iter().map(|c| (c.cell)(context, item));
        self.csv.record(cells)
    }
}

/// Whose row it is: the first columns of every per-session table.
struct Who {
    session: String,
    participant: String,
    arm: Option<String>,
}

fn who_columns<T>() -> Vec<Column<Who, T>> {
    vec![
        column(
            "session",
            Kind::Text,
            "pseudonymous session id",
            |w: &Who, _: &T| w.session.clone(),
        ),
        column(
            "participant",
            Kind::Text,
            "pseudonymous participant id (never the external id)",
            |w: &Who, _: &T| w.participant.clone(),
        ),
        column(
            "arm",
            Kind::Text,
            "study arm the session was assigned to",
            |w: &Who, _: &T| opt(w.arm.clone()),
        ),
    ]
}

/// A per-session table: the who columns, then `columns`.
fn per_session<T>(file: &'static str, columns: Vec<Column<Who, T>>) -> Table<Who, T> {
    let mut all = who_columns();
    all.extend(columns);
    Table { file, columns: all }
}

fn messages_table() -> Table<Who, Message> {
    per_session(
        "messages.csv",
        vec![
            column(
                "seq",
                Kind::Integer,
                "position of the message in the session, from 1",
                |_, m: &Message| m.seq.to_string(),
            ),
            column("role", Kind::Text, "user or assistant", |_, m: &Message| {
                m.role.to_string()
            }),
            column(
                "created_at",
                Kind::Timestamp,
                "when the server stored the message (UTC)",
                |_, m: &Message| timestamp(&m.created_at),
            ),
            column(
                "ttft_ms",
                Kind::Integer,
                "assistant: time from the request to the first token",
                |_, m: &Message| opt(m.ttft_ms),
            ),
            column(
                "gen_ms",
                Kind::Integer,
                "assistant: time from the first token to the end",
                |_, m: &Message| opt(m.gen_ms),
            ),
            column(
                "prompt_tokens",
                Kind::Integer,
                "assistant: tokens of the prompt",
                |_, m: &Message| opt(m.prompt_tokens),
            ),
            column(
                "gen_tokens",
                Kind::Integer,
                "assistant: tokens generated",
                |_, m: &Message| opt(m.gen_tokens),
            ),
            column(
                "finish_reason",
                Kind::Text,
                "assistant: stop, length or cancelled (participant pressed stop)",
                |_, m: &Message| opt(m.finish_reason.clone()),
            ),
            column(
                "content",
                Kind::Text,
                "the message text",
                |_, m: &Message| m.content.clone(),
            ),
        ],
    )
}

/// A rating and whether the protocol asks it at the end (final) or during the chat.
struct RatingRow {
    rating: Rating,
    is_final: bool,
}

fn ratings_table() -> Table<Who, RatingRow> {
    per_session(
        "ratings.csv",
        vec![
            column(
                "after_turn",
                Kind::Integer,
                "completed turns when the rating was given",
                |_, r: &RatingRow| r.rating.after_turn.to_string(),
            ),
            column(
                "kind",
                Kind::Text,
                "periodic (during the chat) or final (after it)",
                |_, r: &RatingRow| if r.is_final { "final" } else { "periodic" }.to_string(),
            ),
            column(
                "key",
                Kind::Text,
                "rating id in the protocol",
                |_, r: &RatingRow| r.rating.rating_key.clone(),
            ),
            column(
                "value",
                Kind::Integer,
                "the rating, on the protocol's scale",
                |_, r: &RatingRow| r.rating.value.to_string(),
            ),
            column(
                "created_at",
                Kind::Timestamp,
                "when the rating was stored (UTC)",
                |_, r: &RatingRow| timestamp(&r.rating.created_at),
            ),
        ],
    )
}

fn revisions_table() -> Table<Who, DocumentRevision> {
    per_session(
        "revisions.csv",
        vec![
            column(
                "rev",
                Kind::Integer,
                "revision number of the document, from 1",
                |_, r: &DocumentRevision| r.rev.to_string(),
            ),
            column(
                "author",
                Kind::Text,
                "user (typed) or assistant_insert (a reply inserted with one click)",
                |_, r: &DocumentRevision| r.author.to_string(),
            ),
            column(
                "inserted_message",
                Kind::Integer,
                "for inserts: seq of the assistant message inserted",
                |_, r: &DocumentRevision| opt(r.message_seq),
            ),
            column(
                "created_at",
                Kind::Timestamp,
                "when the revision was stored (UTC)",
                |_, r: &DocumentRevision| timestamp(&r.created_at),
            ),
            column(
                "words",
                Kind::Integer,
                "words in the document at this revision",
                |_, r: &DocumentRevision| words(&r.content).to_string(),
            ),
            column(
                "content",
                Kind::Text,
                "the whole document at this revision",
                |_, r: &DocumentRevision| r.content.clone(),
            ),
        ],
    )
}

/// A candidate reply with its place among the replies to the same message and source, the
/// participant's pick for the pair, and its sampling seed.
struct CandidateRow {
    candidate: Candidate,
    index: usize,
    pick: String,
    seed: Option<u32>,
}

fn candidates_table() -> Table<Who, CandidateRow> {
    per_session(
        "candidates.csv",
        vec![
            column(
                "after_seq",
                Kind::Integer,
                "seq of the user message the reply answers",
                |_, c: &CandidateRow| c.candidate.after_seq.to_string(),
            ),
            column(
                "source",
                Kind::Text,
                format!(
                    "{}: compare (one of two replies of a comparison turn), regenerate (a reply \
                     the participant asked to replace, then its replacement), mr (a fresh \
                     candidate scored by `collabllm pairs`)",
                    one_of(CandidateSource::ALL)
                ),
                |_, c: &CandidateRow| c.candidate.source.to_string(),
            ),
            column(
                "candidate",
                Kind::Integer,
                "position among the replies to the same message and source, from 0 (A, then B; \
                 for regenerate the replaced reply first)",
                |_, c: &CandidateRow| c.index.to_string(),
            ),
            column(
                "chosen",
                Kind::Boolean,
                "true if the participant picked it (both true: a tie; both false: both bad); \
                 empty while undecided or for mr candidates",
                |_, c: &CandidateRow| opt(c.candidate.chosen),
            ),
            column(
                "choice",
                Kind::Text,
                "the participant's pick for the pair: a, b, tie, both_bad (empty while \
                 undecided)",
                |_, c: &CandidateRow| c.pick.clone(),
            ),
            column(
                "seed",
                Kind::Integer,
                "sampling seed of the reply",
                |_, c: &CandidateRow| opt(c.seed),
            ),
            column(
                "created_at",
                Kind::Timestamp,
                "when the reply was stored (UTC)",
                |_, c: &CandidateRow| timestamp(&c.candidate.created_at),
            ),
            column(
                "content",
                Kind::Text,
                "the reply text",
                |_, c: &CandidateRow| c.candidate.content.clone(),
            ),
        ],
    )
}

/// The session's candidates as rows: grouped by the message they answer and their source, each
/// pair with the participant's pick.
fn candidate_rows(candidates: Vec<Candidate>) -> Vec<CandidateRow> {
    let mut groups: Vec<((i32, CandidateSource), Vec<Candidate>)> = Vec::new();
    for c in candidates {
        let key = (c.after_seq, c.source);
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, group)) => group.push(c),
            None => groups.push((key, vec![c])),
        }
    }
    let mut rows = Vec::new();
    for (_, group) in groups {
        let pick = if group.len() == 2 {
            choice(&group)
        } else {
            String::new()
        };
        for (index, candidate) in group.into_iter().enumerate() {
            let seed = Provenance::parse(&candidate.policy_json).and_then(|p| p.sampling.seed);
            rows.push(CandidateRow {
                candidate,
                index,
                pick: pick.clone(),
                seed,
            });
        }
    }
    rows
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
fn choice(pair: &[Candidate]) -> String {
    match pair.iter().map(|c| c.chosen).collect::<Vec<_>>()[..] {
        [Some(true), Some(false)] => "a",
        [Some(false), Some(true)] => "b",
        [Some(true), Some(true)] => "tie",
        [Some(false), Some(false)] => "both_bad",
        _ => "",
    }
    .to_string()
}

fn events_table() -> Table<Who, Event> {
    per_session(
        "events.csv",
        vec![
            column(
                "client_seq",
                Kind::Integer,
                "the browser's frame number",
                |_, e: &Event| e.client_seq.to_string(),
            ),
            column(
                "kind",
                Kind::Text,
                "focus, blur, visibility_visible, visibility_hidden, …",
                |_, e: &Event| e.kind.clone(),
            ),
            column(
                "created_at",
                Kind::Timestamp,
                "when the server received the event (UTC)",
                |_, e: &Event| timestamp(&e.created_at),
            ),
            column(
                "data",
                Kind::Json,
                "what the browser sent with the event",
                |_, e: &Event| e.payload_json.clone(),
            ),
        ],
    )
}

/// An assignment draw with its version number, the participant's pseudonym and the arm's name.
struct AssignmentRow {
    assignment: Assignment,
    version: i32,
    participant: String,
    arm: Option<String>,
}

fn assignments_table() -> Table<(), AssignmentRow> {
    Table {
        file: "assignments.csv",
        columns: vec![
            column(
                "draw_index",
                Kind::Integer,
                "position of the draw in its study version's ledger, from 0",
                |_, a: &AssignmentRow| a.assignment.draw_index.to_string(),
            ),
            column(
                "study_version",
                Kind::Integer,
                "protocol version the draw was made under",
                |_, a: &AssignmentRow| a.version.to_string(),
            ),
            column(
                "participant",
                Kind::Text,
                "pseudonymous participant id",
                |_, a: &AssignmentRow| a.participant.clone(),
            ),
            column(
                "method",
                Kind::Text,
                "permuted_blocks, least_filled or permuted_blocks_quota_fallback",
                |_, a: &AssignmentRow| a.assignment.method.clone(),
            ),
            column("arm", Kind::Text, "arm drawn", |_, a: &AssignmentRow| {
                opt(a.arm.clone())
            }),
            column("task", Kind::Text, "task drawn", |_, a: &AssignmentRow| {
                a.assignment.task_id.clone()
            }),
            column(
                "topic",
                Kind::Text,
                "topic drawn",
                |_, a: &AssignmentRow| a.assignment.topic_id.clone(),
            ),
            column(
                "created_at",
                Kind::Timestamp,
                "when the draw was made (UTC)",
                |_, a: &AssignmentRow| timestamp(&a.assignment.created_at),
            ),
            column(
                "inputs",
                Kind::Json,
                "what the draw saw: seed, block, position, counts",
                |_, a: &AssignmentRow| a.assignment.inputs_json.clone(),
            ),
        ],
    }
}

/// What the wide table says of one session, gathered from its rows.
struct SessionRow {
    session: Session,
    simulated: bool,
    version: i32,
    protocol_sha256: String,
    turns: usize,
    user_words: usize,
    assistant_tokens: i32,
    mean_ttft_ms: Option<f64>,
    revisions: usize,
    final_document: String,
    ratings: Vec<Rating>,
    answers: Vec<Answer>,
}

/// The rating and answer columns of the wide table, named by the protocols whether or not anyone
/// gave them, so every export of a study has the same columns.
struct WideColumns {
    /// Periodic ratings by key and the turn after which they were due.
    periodic: BTreeSet<(String, i32)>,
    finals: BTreeSet<String>,
    answers: BTreeSet<String>,
}

fn sessions_table(slug: &str, wide: WideColumns) -> Table<Who, SessionRow> {
    let slug = slug.to_string();
    let mut columns = vec![
        column(
            "simulated",
            Kind::Boolean,
            "true for simulated participants",
            |_, s: &SessionRow| s.simulated.to_string(),
        ),
        column(
            "study",
            Kind::Text,
            "study slug",
            move |_, _: &SessionRow| slug.clone(),
        ),
        column(
            "study_version",
            Kind::Integer,
            "protocol version the session ran under",
            |_, s: &SessionRow| s.version.to_string(),
        ),
        column(
            "protocol_sha256",
            Kind::Text,
            "sha256 of that protocol's text",
            |_, s: &SessionRow| s.protocol_sha256.clone(),
        ),
        column(
            "task",
            Kind::Text,
            "task (document type) id",
            |_, s: &SessionRow| opt(s.session.task_id.clone()),
        ),
        column("topic", Kind::Text, "topic id", |_, s: &SessionRow| {
            opt(s.session.topic_id.clone())
        }),
        column(
            "state",
            Kind::Text,
            one_of(SessionState::ALL),
            |_, s: &SessionRow| s.session.state.to_string(),
        ),
        column(
            "outcome",
            Kind::Text,
            format!("{} (empty while running)", one_of(Outcome::ALL)),
            |_, s: &SessionRow| opt(s.session.outcome.map(|o| o.to_string())),
        ),
        column(
            "started_at",
            Kind::Timestamp,
            "entry to the study (UTC)",
            |_, s: &SessionRow| timestamp(&s.session.started_at),
        ),
        column(
            "consented_at",
            Kind::Timestamp,
            "consent given (UTC)",
            |_, s: &SessionRow| opt(s.session.consented_at.as_ref().map(timestamp)),
        ),
        column(
            "first_message_at",
            Kind::Timestamp,
            "first message sent (UTC)",
            |_, s: &SessionRow| opt(s.session.first_message_at.as_ref().map(timestamp)),
        ),
        column(
            "finished_at",
            Kind::Timestamp,
            "end of the session (UTC)",
            |_, s: &SessionRow| opt(s.session.finished_at.as_ref().map(timestamp)),
        ),
        column(
            "duration_s",
            Kind::Number,
            "seconds from entry to the end (or to the last activity)",
            |_, s: &SessionRow| {
                let end = s.session.finished_at.unwrap_or(s.session.last_activity_at);
                let ms = (end - s.session.started_at).num_milliseconds();
                format!("{:.3}", ms as f64 / 1000.0)
            },
        ),
        column(
            "turns",
            Kind::Integer,
            "completed turns: assistant replies, not counting those the participant stopped",
            |_, s: &SessionRow| s.turns.to_string(),
        ),
        column(
            "user_words",
            Kind::Integer,
            "words the participant wrote in the chat",
            |_, s: &SessionRow| s.user_words.to_string(),
        ),
        column(
            "assistant_tokens",
            Kind::Integer,
            "tokens the assistant generated",
            |_, s: &SessionRow| s.assistant_tokens.to_string(),
        ),
        column(
            "mean_ttft_ms",
            Kind::Number,
            "mean time to the first token of the replies",
            |_, s: &SessionRow| opt(s.mean_ttft_ms.map(|t| format!("{t:.1}"))),
        ),
        column(
            "document_revisions",
            Kind::Integer,
            "stored revisions of the document",
            |_, s: &SessionRow| s.revisions.to_string(),
        ),
        column(
            "final_document_words",
            Kind::Integer,
            "words in the last revision",
            |_, s: &SessionRow| words(&s.final_document).to_string(),
        ),
        column(
            "final_document",
            Kind::Text,
            "the last revision of the document",
            |_, s: &SessionRow| s.final_document.clone(),
        ),
    ];
    for (key, turn) in wide.periodic {
        let name = format!("rating_{key}_t{turn}");
        let meaning = format!("periodic rating {key:?} after turn {turn}");
        columns.push(column(
            name,
            Kind::Integer,
            meaning,
            move |_, s: &SessionRow| {
                opt(s
                    .ratings
                    .iter()
                    .find(|r| r.rating_key == key && r.after_turn == turn)
                    .map(|r| r.value))
            },
        ));
    }
    for key in wide.finals {
        let (name, meaning) = (format!("rating_{key}"), format!("final rating {key:?}"));
        columns.push(column(
            name,
            Kind::Integer,
            meaning,
            move |_, s: &SessionRow| {
                opt(s
                    .ratings
                    .iter()
                    .find(|r| r.rating_key == key)
                    .map(|r| r.value))
            },
        ));
    }
    for key in wide.answers {
        let name = format!("answer_{key}");
        let meaning = format!("questionnaire answer {key:?}");
        columns.push(column(
            name,
            Kind::Text,
            meaning,
            move |_, s: &SessionRow| {
                opt(s
                    .answers
                    .iter()
                    .find(|a| a.question_key == key)
                    .map(|a| a.answer.clone()))
            },
        ));
    }
    per_session("sessions.csv", columns)
}

struct Csv {
    path: PathBuf,
    writer: csv::Writer<std::fs::File>,
    /// Which columns hold text (neutralised) rather than numbers, booleans or timestamps.
    text: Vec<bool>,
    rows: u64,
}

impl Csv {
    fn create(dir: &Path, name: &str, columns: &[(&str, Kind)]) -> Result<Self, ExportError> {
        let path = dir.join(name);
        let mut writer = csv::Writer::from_path(&path).map_err(|e| write_error(&path, e))?;
        writer
            .write_record(columns.iter().map(|(name, _)| name))
            .map_err(|e| write_error(&path, e))?;
        Ok(Self {
            path,
            writer,
            text: columns.iter().map(|(_, kind)| kind.is_text()).collect(),
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

/// The open tables of an export, in the order of the codebook.
struct Tables {
    sessions: Open<Who, SessionRow>,
    messages: Open<Who, Message>,
    ratings: Open<Who, RatingRow>,
    revisions: Open<Who, DocumentRevision>,
    candidates: Open<Who, CandidateRow>,
    events: Open<Who, Event>,
    assignments: Open<(), AssignmentRow>,
}

impl Tables {
    /// Writes the codebook of the tables, then opens each table's file.
    fn create(dir: &Path, slug: &str, wide: WideColumns) -> Result<(Self, Csv), ExportError> {
        let (sessions, messages, ratings) = (
            sessions_table(slug, wide),
            messages_table(),
            ratings_table(),
        );
        let (revisions, candidates, events) =
            (revisions_table(), candidates_table(), events_table());
        let assignments = assignments_table();
        let header = ["file", "column", "type", "description", "pandas_dtype"];
        let header: Vec<(&str, Kind)> = header.iter().map(|h| (*h, Kind::Text)).collect();
        let mut codebook = Csv::create(dir, "codebook.csv", &header)?;
        sessions.describe(&mut codebook)?;
        messages.describe(&mut codebook)?;
        ratings.describe(&mut codebook)?;
        revisions.describe(&mut codebook)?;
        candidates.describe(&mut codebook)?;
        events.describe(&mut codebook)?;
        assignments.describe(&mut codebook)?;
        let tables = Tables {
            sessions: sessions.open(dir)?,
            messages: messages.open(dir)?,
            ratings: ratings.open(dir)?,
            revisions: revisions.open(dir)?,
            candidates: candidates.open(dir)?,
            events: events.open(dir)?,
            assignments: assignments.open(dir)?,
        };
        Ok((tables, codebook))
    }

    fn finish(self, codebook: Csv) -> Result<Written, ExportError> {
        let files = [
            codebook.finish()?,
            self.sessions.csv.finish()?,
            self.messages.csv.finish()?,
            self.ratings.csv.finish()?,
            self.revisions.csv.finish()?,
            self.candidates.csv.finish()?,
            self.events.csv.finish()?,
            self.assignments.csv.finish()?,
        ];
        Ok(Written {
            files: files.to_vec(),
        })
    }
}

/// Writes the CSV tables of study `slug` into `dir`; `progress(done, total)` follows the sessions.
/// Two passes over the sessions: the first finds the wide table's columns and how many sessions
/// the filter admits, the second writes the rows.
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
    let Plan {
        wide,
        total,
        admitted,
    } = plan(conn, &versions, filter)?;
    let (mut tables, codebook) = Tables::create(dir, slug, wide)?;
    let mut done = 0u64;
    for_each_session(conn, &version_ids, |conn, s| {
        let participant = db::participants::get(conn, s.participant_id)?;
        let arm = arm_of(&versions, s);
        if !filter.admits(s, arm.as_deref(), participant.simulated) {
            return Ok(());
        }
        let who = Who {
            session: s.public_id.clone(),
            participant: participant.pseudonym,
            arm,
        };
        write_session(
            conn,
            &versions[&s.study_version_id],
            s,
            participant.simulated,
            &who,
            &mut tables,
        )?;
        done += 1;
        progress(done, total);
        Ok(())
    })?;
    write_assignments(conn, &versions, &admitted, &mut tables.assignments)?;
    tables.finish(codebook)
}

fn arm_of(versions: &BTreeMap<i64, Version>, s: &Session) -> Option<String> {
    s.arm_id
        .and_then(|a| versions[&s.study_version_id].arms.get(&a).cloned())
}

/// What the first pass over the sessions finds.
struct Plan {
    wide: WideColumns,
    /// Sessions the filter admits.
    total: u64,
    /// The (version, participant) of each: their assignments are the ones exported.
    admitted: BTreeSet<(i64, i64)>,
}

/// The first pass: the wide table's rating and answer columns and the sessions the filter
/// admits. Periodic ratings of a protocol without a turn cap get a column for every turn they
/// were due up to the last one rated.
fn plan(
    conn: &mut DbConn,
    versions: &BTreeMap<i64, Version>,
    filter: &Filter,
) -> Result<Plan, ExportError> {
    let mut wide = WideColumns {
        periodic: BTreeSet::new(),
        finals: BTreeSet::new(),
        answers: BTreeSet::new(),
    };
    for version in versions.values() {
        let protocol = &version.protocol;
        wide.finals
            .extend(protocol.final_ratings().iter().map(|r| r.id.clone()));
        wide.answers
            .extend(protocol.questionnaire.iter().map(|q| q.id.clone()));
    }
    let version_ids: Vec<i64> = versions.keys().copied().collect();
    let mut total = 0u64;
    let mut last_rated_turn = 0;
    let mut admitted = BTreeSet::new();
    for_each_session(conn, &version_ids, |conn, s| {
        let simulated = db::participants::get(conn, s.participant_id)?.simulated;
        if !filter.admits(s, arm_of(versions, s).as_deref(), simulated) {
            return Ok(());
        }
        total += 1;
        admitted.insert((s.study_version_id, s.participant_id));
        let protocol = &versions[&s.study_version_id].protocol;
        for r in db::ratings::list_for_session(conn, s.id)? {
            if is_final(protocol, &r.rating_key) {
                wide.finals.insert(r.rating_key);
            } else {
                last_rated_turn = last_rated_turn.max(r.after_turn);
                wide.periodic.insert((r.rating_key, r.after_turn));
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
            wide.periodic
                .extend(due.iter().map(|r| (r.id.clone(), turn)));
        }
    }
    Ok(Plan {
        wide,
        total,
        admitted,
    })
}

/// The second pass for one session: its rows in every per-session table.
fn write_session(
    conn: &mut DbConn,
    version: &Version,
    s: &Session,
    simulated: bool,
    who: &Who,
    tables: &mut Tables,
) -> Result<(), ExportError> {
    let messages = db::messages::list_for_session(conn, s.id)?;
    for m in &messages {
        tables.messages.row(who, m)?;
    }
    let ratings = db::ratings::list_for_session(conn, s.id)?;
    for rating in &ratings {
        let is_final = is_final(&version.protocol, &rating.rating_key);
        let row = RatingRow {
            rating: rating.clone(),
            is_final,
        };
        tables.ratings.row(who, &row)?;
    }
    let revisions = db::revisions::list_for_session(conn, s.id)?;
    for r in &revisions {
        tables.revisions.row(who, r)?;
    }
    for c in candidate_rows(db::candidates::list_for_session(conn, s.id)?) {
        tables.candidates.row(who, &c)?;
    }
    for e in db::events::list_for_session(conn, s.id)? {
        tables.events.row(who, &e)?;
    }
    let replies: Vec<&Message> = messages
        .iter()
        .filter(|m| m.role == MessageRole::Assistant)
        .collect();
    let ttfts: Vec<i32> = replies.iter().filter_map(|m| m.ttft_ms).collect();
    let row = SessionRow {
        session: s.clone(),
        simulated,
        version: version.row.version,
        protocol_sha256: version.row.protocol_sha256.clone(),
        turns: messages.iter().filter(|m| m.is_turn()).count(),
        user_words: messages
            .iter()
            .filter(|m| m.role == MessageRole::User)
            .map(|m| words(&m.content))
            .sum(),
        assistant_tokens: replies.iter().filter_map(|m| m.gen_tokens).sum(),
        mean_ttft_ms: (!ttfts.is_empty())
            .then(|| ttfts.iter().map(|&t| f64::from(t)).sum::<f64>() / ttfts.len() as f64),
        revisions: revisions.len(),
        final_document: revisions
            .last()
            .map(|r| r.content.clone())
            .unwrap_or_default(),
        ratings,
        answers: db::answers::list_for_session(conn, s.id)?,
    };
    tables.sessions.row(who, &row)
}

/// The assignment draws of the admitted participants, version by version.
fn write_assignments(
    conn: &mut DbConn,
    versions: &BTreeMap<i64, Version>,
    admitted: &BTreeSet<(i64, i64)>,
    table: &mut Open<(), AssignmentRow>,
) -> Result<(), ExportError> {
    for (version_id, version) in versions {
        for assignment in db::assignments::list_for_version(conn, *version_id)? {
            if !admitted.contains(&(*version_id, assignment.participant_id)) {
                continue;
            }
            let row = AssignmentRow {
                version: version.row.version,
                participant: db::participants::get(conn, assignment.participant_id)?.pseudonym,
                arm: version.arms.get(&assignment.arm_id).cloned(),
                assignment,
            };
            table.row(&(), &row)?;
        }
    }
    Ok(())
}

fn is_final(protocol: &Protocol, key: &str) -> bool {
    protocol.final_ratings().iter().any(|r| r.id == key)
}
