//! Document revisions: every saved state of a session's document, with who wrote it.

use diesel::prelude::*;

use super::models::DocumentRevision;
use super::schema::document_revisions as revs;
use super::vocab::RevisionAuthor;
use super::{next_number, now, DbConn, DbResult, Parent};

/// Stores `content` as the session's next revision (`rev` 1, 2, …); `message_seq` names the
/// assistant message when the change inserted one.
pub fn append(
    conn: &mut DbConn,
    session_id: i64,
    author: RevisionAuthor,
    message_seq: Option<i32>,
    content: &str,
) -> DbResult<DocumentRevision> {
    next_number(
        conn,
        Parent {
            table: "sessions",
            id: session_id,
        },
        |conn| {
            let rev: Option<i32> = revs::table
                .filter(revs::session_id.eq(session_id))
                .select(diesel::dsl::max(revs::rev))
                .first(conn)?;
            diesel::insert_into(revs::table)
                .values((
                    revs::session_id.eq(session_id),
                    revs::rev.eq(rev.unwrap_or(0) + 1),
                    revs::author.eq(author.as_str()),
                    revs::message_seq.eq(message_seq),
                    revs::content.eq(content),
                    revs::created_at.eq(now()),
                ))
                .returning(revs::all_columns)
                .get_result(conn)
        },
    )
}

pub fn latest(conn: &mut DbConn, session_id: i64) -> DbResult<Option<DocumentRevision>> {
    Ok(revs::table
        .filter(revs::session_id.eq(session_id))
        .order(revs::rev.desc())
        .select(DocumentRevision::as_select())
        .first(conn)
        .optional()?)
}

pub fn list_for_session(conn: &mut DbConn, session_id: i64) -> DbResult<Vec<DocumentRevision>> {
    Ok(revs::table
        .filter(revs::session_id.eq(session_id))
        .order(revs::rev)
        .select(DocumentRevision::as_select())
        .load(conn)?)
}
