//! Multiturn-aware rewards of replies and candidates, with their components.

use diesel::prelude::*;

use super::models::{NewReward, Reward};
use super::schema::rewards;
use super::{DbConn, DbResult};

pub fn record(conn: &mut DbConn, new: &NewReward) -> DbResult<Reward> {
    Ok(diesel::insert_into(rewards::table)
        .values(new)
        .returning(rewards::all_columns)
        .get_result(conn)?)
}

pub fn list_for_session(conn: &mut DbConn, session_id: i64) -> DbResult<Vec<Reward>> {
    Ok(rewards::table
        .filter(rewards::session_id.eq(session_id))
        .order((rewards::turn, rewards::id))
        .select(Reward::as_select())
        .load(conn)?)
}
