//! Rollouts of the multiturn-aware reward, stored one by one as they finish.

use diesel::prelude::*;

use super::models::{NewRollout, Rollout};
use super::schema::rollouts;
use super::{DbConn, DbResult};

pub fn insert(conn: &mut DbConn, new: &NewRollout) -> DbResult<Rollout> {
    Ok(diesel::insert_into(rollouts::table)
        .values(new)
        .returning(rollouts::all_columns)
        .get_result(conn)?)
}

/// The rollouts of one turn under one configuration.
pub fn list_for_turn(
    conn: &mut DbConn,
    session_id: i64,
    turn: i32,
    config_sha256: &str,
) -> DbResult<Vec<Rollout>> {
    Ok(rollouts::table
        .filter(rollouts::session_id.eq(session_id))
        .filter(rollouts::turn.eq(turn))
        .filter(rollouts::config_sha256.eq(config_sha256))
        .order(rollouts::id)
        .select(Rollout::as_select())
        .load(conn)?)
}
