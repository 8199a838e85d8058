//! Evaluations of a study's arms with simulated users, stored so the console shows the latest.

use diesel::prelude::*;

use super::models::Evaluation;
use super::schema::evaluations;
use super::{now, DbConn, DbResult};

pub fn insert(
    conn: &mut DbConn,
    study_id: i64,
    users: i32,
    table_json: &str,
    provenance_json: &str,
) -> DbResult<()> {
    diesel::insert_into(evaluations::table)
        .values((
            evaluations::study_id.eq(study_id),
            evaluations::users.eq(users),
            evaluations::table_json.eq(table_json),
            evaluations::provenance_json.eq(provenance_json),
            evaluations::created_at.eq(now()),
        ))
        .execute(conn)?;
    Ok(())
}

/// The study's most recent evaluation.
pub fn latest(conn: &mut DbConn, study_id: i64) -> DbResult<Option<Evaluation>> {
    Ok(evaluations::table
        .filter(evaluations::study_id.eq(study_id))
        .order((evaluations::created_at.desc(), evaluations::id.desc()))
        .select(Evaluation::as_select())
        .first(conn)
        .optional()?)
}
