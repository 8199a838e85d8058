//! Sessions: one participant working through one task with one arm, and its state over time.

use chrono::NaiveDateTime;
use diesel::prelude::*;

use super::models::{NewSession, Session};
use super::schema::sessions;
use super::{now, DbConn, DbResult};

pub fn create(conn: &mut DbConn, new: &NewSession) -> DbResult<Session> {
    Ok(diesel::insert_into(sessions::table)
        .values(new)
        .returning(sessions::all_columns)
        .get_result(conn)?)
}

pub fn get(conn: &mut DbConn, id: i64) -> DbResult<Session> {
    Ok(sessions::table
        .find(id)
        .select(Session::as_select())
        .first(conn)?)
}

pub fn find_by_public_id(conn: &mut DbConn, public_id: &str) -> DbResult<Option<Session>> {
    Ok(sessions::table
        .filter(sessions::public_id.eq(public_id))
        .select(Session::as_select())
        .first(conn)
        .optional()?)
}

/// The participant's most recent session, if any: where a returning participant resumes.
pub fn latest_of_participant(conn: &mut DbConn, participant_id: i64) -> DbResult<Option<Session>> {
    Ok(sessions::table
        .filter(sessions::participant_id.eq(participant_id))
        .order(sessions::id.desc())
        .select(Session::as_select())
        .first(conn)
        .optional()?)
}

pub fn list_for_version(conn: &mut DbConn, study_version_id: i64) -> DbResult<Vec<Session>> {
    Ok(sessions::table
        .filter(sessions::study_version_id.eq(study_version_id))
        .order(sessions::id)
        .select(Session::as_select())
        .load(conn)?)
}

/// Moves a session to `state` and marks it active now.
pub fn set_state(conn: &mut DbConn, id: i64, state: &str) -> DbResult<Session> {
    let at = now();
    Ok(diesel::update(sessions::table.find(id))
        .set((sessions::state.eq(state), sessions::last_activity_at.eq(at)))
        .returning(sessions::all_columns)
        .get_result(conn)?)
}

/// Records agreement to the consent text with this sha256.
pub fn record_consent(conn: &mut DbConn, id: i64, consent_sha256: &str) -> DbResult<Session> {
    let at = now();
    Ok(diesel::update(sessions::table.find(id))
        .set((
            sessions::consent_sha256.eq(consent_sha256),
            sessions::consented_at.eq(at),
            sessions::last_activity_at.eq(at),
        ))
        .returning(sessions::all_columns)
        .get_result(conn)?)
}

/// Stamps the first message time once; later calls keep the first stamp.
pub fn mark_first_message(conn: &mut DbConn, id: i64, at: NaiveDateTime) -> DbResult<()> {
    diesel::update(sessions::table.find(id))
        .filter(sessions::first_message_at.is_null())
        .set(sessions::first_message_at.eq(at))
        .execute(conn)?;
    Ok(())
}

/// Ends a session with an outcome and its completion code.
pub fn finish(
    conn: &mut DbConn,
    id: i64,
    state: &str,
    outcome: &str,
    completion_code: &str,
) -> DbResult<Session> {
    let at = now();
    Ok(diesel::update(sessions::table.find(id))
        .set((
            sessions::state.eq(state),
            sessions::outcome.eq(outcome),
            sessions::completion_code.eq(completion_code),
            sessions::finished_at.eq(at),
            sessions::last_activity_at.eq(at),
        ))
        .returning(sessions::all_columns)
        .get_result(conn)?)
}

/// Sessions per arm of a version whose state is one of `states`: the input of balanced assignment.
pub fn count_by_arm(
    conn: &mut DbConn,
    study_version_id: i64,
    states: &[&str],
) -> DbResult<Vec<(i64, i64)>> {
    let rows: Vec<(Option<i64>, i64)> = sessions::table
        .filter(sessions::study_version_id.eq(study_version_id))
        .filter(sessions::state.eq_any(states))
        .group_by(sessions::arm_id)
        .select((sessions::arm_id, diesel::dsl::count_star()))
        .load(conn)?;
    Ok(rows
        .into_iter()
        .filter_map(|(arm, n)| arm.map(|a| (a, n)))
        .collect())
}
