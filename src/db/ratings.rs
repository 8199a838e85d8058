//! Ratings: periodic (after turn N) and final (after the last turn), one value per key and turn.

use diesel::prelude::*;

use super::models::Rating;
use super::schema::ratings;
use super::{insert_once, now, DbConn, DbResult};

/// Stores a rating once; a repeat for the same key and turn returns the stored one and `false`.
pub fn record(
    conn: &mut DbConn,
    session_id: i64,
    after_turn: i32,
    key: &str,
    value: i32,
) -> DbResult<(Rating, bool)> {
    insert_once(
        conn,
        diesel::insert_into(ratings::table)
            .values((
                ratings::session_id.eq(session_id),
                ratings::after_turn.eq(after_turn),
                ratings::rating_key.eq(key),
                ratings::value.eq(value),
                ratings::created_at.eq(now()),
            ))
            .on_conflict_do_nothing()
            .returning(ratings::all_columns),
        |conn| {
            ratings::table
                .filter(ratings::session_id.eq(session_id))
                .filter(ratings::rating_key.eq(key))
                .filter(ratings::after_turn.eq(after_turn))
                .select(Rating::as_select())
                .first(conn)
        },
    )
}

pub fn list_for_session(conn: &mut DbConn, session_id: i64) -> DbResult<Vec<Rating>> {
    Ok(ratings::table
        .filter(ratings::session_id.eq(session_id))
        .order((ratings::after_turn, ratings::rating_key))
        .select(Rating::as_select())
        .load(conn)?)
}

/// Keys of the ratings recorded after `after_turn`.
pub fn keys_after_turn(
    conn: &mut DbConn,
    session_id: i64,
    after_turn: i32,
) -> DbResult<Vec<String>> {
    Ok(ratings::table
        .filter(ratings::session_id.eq(session_id))
        .filter(ratings::after_turn.eq(after_turn))
        .order(ratings::rating_key)
        .select(ratings::rating_key)
        .load(conn)?)
}
