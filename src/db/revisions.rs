//! Document revisions: every saved state of a session's document, with who wrote it.

use std::collections::HashMap;

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

/// The text of the latest revision of every session of a study version that has one, by session
/// id: one query for the latest revisions' ids, one per thousand of them for their texts.
/// Revisions are numbered in the order they are stored, so the newest row is the latest revision.
pub fn latest_texts_for_version(
    conn: &mut DbConn,
    study_version_id: i64,
) -> DbResult<HashMap<i64, String>> {
    use super::schema::sessions;
    let sessions_of_version = sessions::table
        .filter(sessions::study_version_id.eq(study_version_id))
        .select(sessions::id);
    let newest: Vec<Option<i64>> = revs::table
        .filter(revs::session_id.eq_any(sessions_of_version))
        .group_by(revs::session_id)
        .select(diesel::dsl::max(revs::id))
        .load(conn)?;
    let newest: Vec<i64> = newest.into_iter().flatten().collect();
    let mut texts = HashMap::new();
    for ids in newest.chunks(1000) {
        texts.extend(
            revs::table
                .filter(revs::id.eq_any(ids))
                .select((revs::session_id, revs::content))
                .load::<(i64, String)>(conn)?,
        );
    }
    Ok(texts)
}

pub fn list_for_session(conn: &mut DbConn, session_id: i64) -> DbResult<Vec<DocumentRevision>> {
    Ok(revs::table
        .filter(revs::session_id.eq(session_id))
        .order(revs::rev)
        .select(DocumentRevision::as_select())
        .load(conn)?)
}
