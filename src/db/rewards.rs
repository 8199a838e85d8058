//! Multiturn-aware rewards of replies and candidates, with their components. `turn` is the seq of
//! the assistant message whose context was scored; `candidate_id` is empty for the reply given.

use diesel::prelude::*;

use super::models::{NewReward, Reward};
use super::schema::rewards;
use super::{write_transaction, DbConn, DbResult};

pub fn record(conn: &mut DbConn, new: &NewReward) -> DbResult<Reward> {
    Ok(diesel::insert_into(rewards::table)
        .values(new)
        .returning(rewards::all_columns)
        .get_result(conn)?)
}

/// Stores the rewards of one turn under one configuration, in place of earlier ones.
pub fn replace_turn(
    conn: &mut DbConn,
    session_id: i64,
    turn: i32,
    config_sha256: &str,
    new: &[NewReward],
) -> DbResult<Vec<Reward>> {
    write_transaction(conn, |conn| {
        diesel::delete(
            rewards::table
                .filter(rewards::session_id.eq(session_id))
                .filter(rewards::turn.eq(turn))
                .filter(rewards::config_sha256.eq(config_sha256)),
        )
        .execute(conn)?;
        new.iter().map(|r| record(conn, r)).collect()
    })
}

pub fn list_for_session(conn: &mut DbConn, session_id: i64) -> DbResult<Vec<Reward>> {
    Ok(rewards::table
        .filter(rewards::session_id.eq(session_id))
        .order((rewards::turn, rewards::id))
        .select(Reward::as_select())
        .load(conn)?)
}
