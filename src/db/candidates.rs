//! Candidate replies: alternatives shown to a participant (comparison, regenerate) or generated
//! for scoring, next to the reply that was kept.

use diesel::prelude::*;

use super::models::{Candidate, NewCandidate};
use super::schema::candidates;
use super::{DbConn, DbResult};

pub fn insert(conn: &mut DbConn, new: &NewCandidate) -> DbResult<Candidate> {
    Ok(diesel::insert_into(candidates::table)
        .values(new.clone())
        .returning(candidates::all_columns)
        .get_result(conn)?)
}

/// Records whether the participant kept this candidate.
pub fn set_chosen(conn: &mut DbConn, id: i64, chosen: bool) -> DbResult<Candidate> {
    Ok(diesel::update(candidates::table.find(id))
        .set(candidates::chosen.eq(Some(chosen)))
        .returning(candidates::all_columns)
        .get_result(conn)?)
}

pub fn list_for_session(conn: &mut DbConn, session_id: i64) -> DbResult<Vec<Candidate>> {
    Ok(candidates::table
        .filter(candidates::session_id.eq(session_id))
        .order((candidates::after_seq, candidates::id))
        .select(Candidate::as_select())
        .load(conn)?)
}
