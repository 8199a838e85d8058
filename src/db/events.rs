//! Browser events (focus, blur, …) keyed by the client's sequence number, so a resent frame is
//! stored once.

use diesel::prelude::*;

use super::models::Event;
use super::schema::events;
use super::{insert_once, now, DbConn, DbResult};

/// Stores an event once per client sequence number; a resend returns the stored one and `false`.
pub fn record(
    conn: &mut DbConn,
    session_id: i64,
    client_seq: i64,
    kind: &str,
    payload_json: &str,
) -> DbResult<(Event, bool)> {
    insert_once(
        conn,
        diesel::insert_into(events::table)
            .values((
                events::session_id.eq(session_id),
                events::client_seq.eq(client_seq),
                events::kind.eq(kind),
                events::payload_json.eq(payload_json),
                events::created_at.eq(now()),
            ))
            .on_conflict_do_nothing()
            .returning(events::all_columns),
        |conn| {
            events::table
                .filter(events::session_id.eq(session_id))
                .filter(events::client_seq.eq(client_seq))
                .select(Event::as_select())
                .first(conn)
        },
    )
}

pub fn list_for_session(conn: &mut DbConn, session_id: i64) -> DbResult<Vec<Event>> {
    Ok(events::table
        .filter(events::session_id.eq(session_id))
        .order(events::client_seq)
        .select(Event::as_select())
        .load(conn)?)
}

pub fn count_for_session(conn: &mut DbConn, session_id: i64) -> DbResult<i64> {
    Ok(events::table
        .filter(events::session_id.eq(session_id))
        .count()
        .get_result(conn)?)
}
