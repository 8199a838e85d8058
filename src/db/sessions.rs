//! Sessions: one participant working through one task with one arm, and its state over time.

use chrono::NaiveDateTime;
use diesel::prelude::*;

use super::models::{NewSession, Session};
use super::schema::{participants, sessions};
use super::vocab::{Outcome, SessionState};
use super::{now, write_transaction, DbConn, DbError, DbResult};

pub fn create(conn: &mut DbConn, new: &NewSession) -> DbResult<Session> {
    Ok(diesel::insert_into(sessions::table)
        .values(new.clone())
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

/// Moves a session to `state` and marks it active now. A session that has ended stays ended (a
/// reply that finishes after a time-out does not reopen it): it is returned as it is.
pub fn set_state(conn: &mut DbConn, id: i64, state: SessionState) -> DbResult<Session> {
    let at = now();
    let moved = diesel::update(sessions::table.find(id))
        .filter(sessions::state.eq_any(SessionState::texts(&SessionState::OPEN)))
        .set((
            sessions::state.eq(state.as_str()),
            sessions::last_activity_at.eq(at),
        ))
        .returning(sessions::all_columns)
        .get_result(conn)
        .optional()?;
    match moved {
        Some(session) => Ok(session),
        None => get(conn, id),
    }
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

/// Ends a session with an outcome (in the state it implies) and its completion code.
pub fn finish(
    conn: &mut DbConn,
    id: i64,
    outcome: Outcome,
    completion_code: &str,
) -> DbResult<Session> {
    let at = now();
    Ok(diesel::update(sessions::table.find(id))
        .set((
            sessions::state.eq(outcome.ended_state().as_str()),
            sessions::outcome.eq(outcome.as_str()),
            sessions::completion_code.eq(completion_code),
            sessions::finished_at.eq(at),
            sessions::last_activity_at.eq(at),
        ))
        .returning(sessions::all_columns)
        .get_result(conn)?)
}

/// Ends a session that is still open as abandoned (no completion code); whether it was open.
pub fn abandon(conn: &mut DbConn, id: i64) -> DbResult<bool> {
    let at = now();
    let ended = diesel::update(sessions::table.find(id))
        .filter(sessions::state.eq_any(SessionState::texts(&SessionState::OPEN)))
        .set((
            sessions::state.eq(SessionState::Abandoned.as_str()),
            sessions::outcome.eq(Outcome::Abandoned.as_str()),
            sessions::finished_at.eq(at),
            sessions::last_activity_at.eq(at),
        ))
        .execute(conn)?;
    Ok(ended == 1)
}

/// Sessions per arm of a version whose state is one of `states`, of people or of simulated
/// participants only: the input of balanced assignment (a pilot never fills an arm for people).
pub fn count_by_arm(
    conn: &mut DbConn,
    study_version_id: i64,
    states: &[SessionState],
    simulated: bool,
) -> DbResult<Vec<(i64, i64)>> {
    let rows: Vec<(Option<i64>, i64)> = sessions::table
        .inner_join(participants::table)
        .filter(sessions::study_version_id.eq(study_version_id))
        .filter(sessions::state.eq_any(SessionState::texts(states)))
        .filter(participants::simulated.eq(simulated))
        .group_by(sessions::arm_id)
        .select((sessions::arm_id, diesel::dsl::count_star()))
        .load(conn)?;
    Ok(rows
        .into_iter()
        .filter_map(|(arm, n)| arm.map(|a| (a, n)))
        .collect())
}

/// Sessions of every study by state, people's and simulated ones alike (what `/metrics` shows).
pub fn count_by_state(conn: &mut DbConn) -> DbResult<Vec<(SessionState, i64)>> {
    let rows: Vec<(String, i64)> = sessions::table
        .group_by(sessions::state)
        .select((sessions::state, diesel::dsl::count_star()))
        .load(conn)?;
    rows.into_iter()
        .map(|(state, n)| {
            let state = state
                .parse::<SessionState>()
                .map_err(|e| DbError::Invalid(e.to_string()))?;
            Ok((state, n))
        })
        .collect()
}

pub fn find_by_token_hash(conn: &mut DbConn, token_hash: &str) -> DbResult<Option<Session>> {
    Ok(sessions::table
        .filter(sessions::token_hash.eq(token_hash))
        .select(Session::as_select())
        .first(conn)
        .optional()?)
}

/// Moves the session to a new browser: a new token replaces the old one, and a researcher's
/// handover, if any, is used up.
pub fn move_to_browser(conn: &mut DbConn, id: i64, token_hash: &str) -> DbResult<()> {
    diesel::update(sessions::table.find(id))
        .set((
            sessions::token_hash.eq(token_hash),
            sessions::handover_allowed.eq(false),
        ))
        .execute(conn)?;
    Ok(())
}

/// Lets the next entry with the session's participant id take it over in a new browser.
pub fn allow_handover(conn: &mut DbConn, id: i64) -> DbResult<()> {
    diesel::update(sessions::table.find(id))
        .set(sessions::handover_allowed.eq(true))
        .execute(conn)?;
    Ok(())
}

/// Records the drawn arm, task and topic.
pub fn assign(
    conn: &mut DbConn,
    id: i64,
    arm_id: i64,
    task_id: Option<&str>,
    topic_id: Option<&str>,
) -> DbResult<Session> {
    Ok(diesel::update(sessions::table.find(id))
        .set((
            sessions::arm_id.eq(arm_id),
            sessions::task_id.eq(task_id),
            sessions::topic_id.eq(topic_id),
        ))
        .returning(sessions::all_columns)
        .get_result(conn)?)
}

/// Sessions in one of `states` with no activity since `before`.
pub fn idle_since(
    conn: &mut DbConn,
    states: &[SessionState],
    before: NaiveDateTime,
) -> DbResult<Vec<Session>> {
    Ok(sessions::table
        .filter(sessions::state.eq_any(SessionState::texts(states)))
        .filter(sessions::last_activity_at.lt(before))
        .select(Session::as_select())
        .load(conn)?)
}

/// Makes the socket that said `hello` the session's owner: returns the session's new owner epoch
/// (hellos are ordered by the database, whatever node they reach).
pub fn claim(conn: &mut DbConn, id: i64) -> DbResult<i64> {
    Ok(diesel::update(sessions::table.find(id))
        .set(sessions::owner_epoch.eq(sessions::owner_epoch + 1))
        .returning(sessions::owner_epoch)
        .get_result(conn)?)
}

/// Ends a session as timed out with `completion_code` if it is still open and has been idle since
/// before `idle_before` (a frame that came meanwhile keeps it open); whether it ended.
pub fn time_out(
    conn: &mut DbConn,
    id: i64,
    idle_before: NaiveDateTime,
    completion_code: &str,
) -> DbResult<bool> {
    let at = now();
    let ended = diesel::update(sessions::table.find(id))
        .filter(sessions::state.eq_any(SessionState::texts(&SessionState::OPEN)))
        .filter(sessions::last_activity_at.lt(idle_before))
        .set((
            sessions::state.eq(Outcome::TimedOut.ended_state().as_str()),
            sessions::outcome.eq(Outcome::TimedOut.as_str()),
            sessions::completion_code.eq(completion_code),
            sessions::finished_at.eq(at),
            sessions::last_activity_at.eq(at),
        ))
        .execute(conn)?;
    Ok(ended == 1)
}

/// Whether a client frame was new or a resend of one already applied.
#[derive(Debug, PartialEq, Eq)]
pub enum Applied<T> {
    New(T),
    Duplicate,
}

/// Applies client frame `client_seq` of a session at most once: in one transaction, the number
/// is recorded when it is above the last applied one (which locks the session's row on
/// PostgreSQL, ordering its frames; SQLite's write lock is held), then `work` runs. When `work`
/// fails the transaction is rolled back and nothing is recorded. One statement both decides and
/// records, so a frame costs one round trip less.
pub fn apply_frame<T, E>(
    conn: &mut DbConn,
    id: i64,
    client_seq: i64,
    work: impl FnOnce(&mut DbConn, &Session) -> Result<T, E>,
) -> Result<Applied<T>, E>
where
    E: From<diesel::result::Error>,
{
    write_transaction(conn, |conn| {
        let session: Option<Session> = diesel::update(sessions::table.find(id))
            .filter(sessions::last_client_seq.lt(client_seq))
            .set((
                sessions::last_client_seq.eq(client_seq),
                sessions::last_activity_at.eq(now()),
            ))
            .returning(sessions::all_columns)
            .get_result(conn)
            .optional()?;
        let Some(session) = session else {
            // A resend, or no such session (an error).
            sessions::table
                .find(id)
                .select(sessions::id)
                .first::<i64>(conn)?;
            return Ok(Applied::Duplicate);
        };
        Ok(Applied::New(work(conn, &session)?))
    })
}

/// Sessions of the given study versions with an id above `after_id`, oldest first, at most
/// `limit`: exports page through a study with this, in constant memory.
pub fn page(
    conn: &mut DbConn,
    version_ids: &[i64],
    after_id: i64,
    limit: i64,
) -> DbResult<Vec<Session>> {
    Ok(sessions::table
        .filter(sessions::study_version_id.eq_any(version_ids))
        .filter(sessions::id.gt(after_id))
        .order(sessions::id)
        .limit(limit)
        .select(Session::as_select())
        .load(conn)?)
}
