//! Exports of a study for analysis: CSV tables with a codebook (`csv`). Exports page through the
//! database a session at a time, so memory stays flat however large the study. Only pseudonymous
//! ids leave: session and participant pseudonyms, never external ids, tokens or addresses.

pub mod csv;
pub mod json;
pub mod pairs;

use crate::db::vocab::Outcome;
use std::collections::{BTreeMap, HashMap};

use chrono::{NaiveDate, NaiveDateTime};

use crate::db::models::{Session, StudyVersion};
use crate::db::{self, DbConn};
use crate::protocol::Protocol;

/// Sessions read from the database at a time.
const PAGE_SESSIONS: i64 = 200;

/// What an export knows of each study version.
struct Version {
    row: StudyVersion,
    protocol: Protocol,
    /// Arm names by arm id.
    arms: HashMap<i64, String>,
}

/// Every version of a study, by version id.
fn study_versions(conn: &mut DbConn, study_id: i64) -> Result<BTreeMap<i64, Version>, ExportError> {
    let mut versions = BTreeMap::new();
    for row in db::studies::versions(conn, study_id)? {
        let protocol = Protocol::from_stored(&row.protocol_text)
            .map_err(|e| ExportError::Db(db::DbError::Invalid(e.to_string())))?;
        let arms = db::studies::arms_of(conn, row.id)?
            .into_iter()
            .map(|a| (a.id, a.name))
            .collect();
        versions.insert(
            row.id,
            Version {
                row,
                protocol,
                arms,
            },
        );
    }
    Ok(versions)
}

/// Calls `visit` for every session of the versions, a page at a time.
fn for_each_session(
    conn: &mut DbConn,
    version_ids: &[i64],
    mut visit: impl FnMut(&mut DbConn, &Session) -> Result<(), ExportError>,
) -> Result<(), ExportError> {
    let mut after = 0;
    loop {
        let page = db::sessions::page(conn, version_ids, after, PAGE_SESSIONS)?;
        let Some(last) = page.last() else {
            return Ok(());
        };
        after = last.id;
        for s in &page {
            visit(conn, s)?;
        }
    }
}

/// Which sessions an export covers.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only sessions of this arm (by arm id in the protocol).
    pub arm: Option<String>,
    /// Only sessions started on or after this day (UTC).
    pub from: Option<NaiveDate>,
    /// Only sessions started on or before this day (UTC).
    pub to: Option<NaiveDate>,
    /// Only sessions that ended with the `completed` outcome.
    pub completed_only: bool,
    /// Only simulated participants (`Some(true)`) or only people (`Some(false)`).
    pub simulated: Option<bool>,
}

impl Filter {
    fn admits(&self, session: &Session, arm_name: Option<&str>, simulated: bool) -> bool {
        let day = session.started_at.date();
        self.arm.as_deref().is_none_or(|a| arm_name == Some(a))
            && self.from.is_none_or(|from| day >= from)
            && self.to.is_none_or(|to| day <= to)
            && (!self.completed_only || session.outcome == Some(Outcome::Completed))
            && self.simulated.is_none_or(|wanted| wanted == simulated)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("there is no study {0:?}")]
    UnknownStudy(String),
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Db(#[from] crate::db::DbError),
}

impl From<diesel::result::Error> for ExportError {
    fn from(e: diesel::result::Error) -> Self {
        ExportError::Db(e.into())
    }
}

/// A cell a spreadsheet could run as a formula gets a leading apostrophe, as OWASP recommends:
/// one that starts with a tab, CR or line feed, or whose first character after any white space
/// is `=`, `+`, `-` or `@` (or their full-width forms, which some spreadsheets read as the same).
/// Other text is kept as it is.
pub fn neutralise(text: &str) -> std::borrow::Cow<'_, str> {
    let control_first = text.starts_with(['\t', '\r', '\n']);
    let formula_first = text.trim_start().starts_with([
        '=', '+', '-', '@', '\u{ff1d}', '\u{ff0b}', '\u{ff0d}', '\u{ff20}',
    ]);
    if control_first || formula_first {
        format!("'{text}").into()
    } else {
        text.into()
    }
}

/// ISO 8601 in UTC with milliseconds, as pandas and R parse it.
pub fn timestamp(t: &NaiveDateTime) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

#[cfg(test)]
mod tests {
    use super::neutralise;

    #[test]
    fn formula_starts_are_neutralised() {
        let risky = [
            "=SUM(A1)",
            "+1",
            "-2+3",
            "@cmd",
            "\tx",
            "\rx",
            "\n=1+1",
            " =x",
            "\u{a0}=x",
            "\u{3000}@x",
            "\u{ff1d}SUM(A1)",
            "\u{ff0b}1",
            "\u{ff0d}1",
            "\u{ff20}x",
            "\nplain",
        ];
        for risky in risky {
            assert_eq!(neutralise(risky), format!("'{risky}"));
        }
        for safe in ["hello", "", "a=b", "x =y", "'quoted", "   ", "1-2"] {
            assert_eq!(neutralise(safe), safe);
        }
    }
}
