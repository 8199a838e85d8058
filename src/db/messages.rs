//! The chat transcript of a session, in order (`seq` 1, 2, …).

use diesel::prelude::*;

use super::models::{Message, NewMessage};
use super::schema::messages;
use super::{next_number, now, DbConn, DbResult, Parent};

/// Appends a message with the next `seq` of its session.
pub fn append(conn: &mut DbConn, session_id: i64, new: &NewMessage) -> DbResult<Message> {
    next_number(
        conn,
        Parent {
            table: "sessions",
            id: session_id,
        },
        |conn| {
            let seq: Option<i32> = messages::table
                .filter(messages::session_id.eq(session_id))
                .select(diesel::dsl::max(messages::seq))
                .first(conn)?;
            diesel::insert_into(messages::table)
                .values((
                    messages::session_id.eq(session_id),
                    messages::seq.eq(seq.unwrap_or(0) + 1),
                    messages::role.eq(new.role.as_str()),
                    messages::content.eq(new.content),
                    messages::created_at.eq(now()),
                    messages::ttft_ms.eq(new.ttft_ms),
                    messages::gen_ms.eq(new.gen_ms),
                    messages::prompt_tokens.eq(new.prompt_tokens),
                    messages::gen_tokens.eq(new.gen_tokens),
                    messages::finish_reason.eq(new.finish_reason),
                    messages::policy_json.eq(new.policy_json),
                ))
                .returning(messages::all_columns)
                .get_result(conn)
        },
    )
}

pub fn list_for_session(conn: &mut DbConn, session_id: i64) -> DbResult<Vec<Message>> {
    Ok(messages::table
        .filter(messages::session_id.eq(session_id))
        .order(messages::seq)
        .select(Message::as_select())
        .load(conn)?)
}

/// Takes a message out of the transcript (a reply the participant asked to replace; it is kept
/// as a candidate first).
pub fn remove(conn: &mut DbConn, id: i64) -> DbResult<()> {
    diesel::delete(messages::table.find(id)).execute(conn)?;
    Ok(())
}
