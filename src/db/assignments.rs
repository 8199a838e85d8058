//! The assignment ledger: every arm/task draw of a study version, in order, with what it saw.

use diesel::prelude::*;

use super::models::{Assignment, NewAssignment};
use super::schema::{assignments, participants};
use super::{lock, next_number, now, DbConn, DbResult, Parent};

/// The lock of a version's ledger: a study version row.
fn ledger(study_version_id: i64) -> Parent {
    Parent {
        table: "study_versions",
        id: study_version_id,
    }
}

/// Holds the version's ledger until the end of the caller's write transaction. A draw takes it
/// before reading what the ledger holds so far: two concurrent draws never see the same count
/// and so never take the same place in the seeded sequence.
pub fn lock_ledger(conn: &mut DbConn, study_version_id: i64) -> DbResult<()> {
    Ok(lock(conn, &ledger(study_version_id))?)
}

/// Appends a draw with the next `draw_index` (0, 1, …) of its study version.
pub fn record(conn: &mut DbConn, new: &NewAssignment) -> DbResult<Assignment> {
    next_number(conn, ledger(new.study_version_id), |conn| {
        let draws: i64 = assignments::table
            .filter(assignments::study_version_id.eq(new.study_version_id))
            .count()
            .get_result(conn)?;
        diesel::insert_into(assignments::table)
            .values((
                assignments::study_version_id.eq(new.study_version_id),
                assignments::participant_id.eq(new.participant_id),
                assignments::draw_index.eq(i32::try_from(draws).unwrap_or(i32::MAX)),
                assignments::method.eq(new.method),
                assignments::arm_id.eq(new.arm_id),
                assignments::task_id.eq(new.task_id),
                assignments::topic_id.eq(new.topic_id),
                assignments::inputs_json.eq(new.inputs_json),
                assignments::created_at.eq(now()),
            ))
            .returning(assignments::all_columns)
            .get_result(conn)
    })
}

pub fn list_for_version(conn: &mut DbConn, study_version_id: i64) -> DbResult<Vec<Assignment>> {
    Ok(assignments::table
        .filter(assignments::study_version_id.eq(study_version_id))
        .order(assignments::draw_index)
        .select(Assignment::as_select())
        .load(conn)?)
}

/// Draws so far in a version's ledger, of people or of simulated participants: the position of
/// the next draw in its seeded sequence.
pub fn count_for_version(
    conn: &mut DbConn,
    study_version_id: i64,
    simulated: bool,
) -> DbResult<i64> {
    Ok(assignments::table
        .inner_join(participants::table)
        .filter(assignments::study_version_id.eq(study_version_id))
        .filter(participants::simulated.eq(simulated))
        .count()
        .get_result(conn)?)
}

/// Draws so far per (task, topic) in a version's ledger, of people or of simulated participants:
/// the input of balanced task assignment.
pub fn task_counts(
    conn: &mut DbConn,
    study_version_id: i64,
    simulated: bool,
) -> DbResult<Vec<(String, String, i64)>> {
    Ok(assignments::table
        .inner_join(participants::table)
        .filter(assignments::study_version_id.eq(study_version_id))
        .filter(participants::simulated.eq(simulated))
        .group_by((assignments::task_id, assignments::topic_id))
        .select((
            assignments::task_id,
            assignments::topic_id,
            diesel::dsl::count_star(),
        ))
        .load(conn)?)
}

/// The draw of a participant, if they have one (a returning participant keeps it).
pub fn find_for_participant(
    conn: &mut DbConn,
    study_version_id: i64,
    participant_id: i64,
) -> DbResult<Option<Assignment>> {
    Ok(assignments::table
        .filter(assignments::study_version_id.eq(study_version_id))
        .filter(assignments::participant_id.eq(participant_id))
        .order(assignments::draw_index)
        .select(Assignment::as_select())
        .first(conn)
        .optional()?)
}
