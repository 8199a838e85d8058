//! The chat transcript of a session, in order (`seq` 1, 2, …).

use std::collections::HashMap;

use diesel::prelude::*;

use super::models::{Message, NewMessage};
use super::schema::messages;
use super::vocab::MessageRole;
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

/// The last message of a session, if any.
pub fn last(conn: &mut DbConn, session_id: i64) -> DbResult<Option<Message>> {
    Ok(messages::table
        .filter(messages::session_id.eq(session_id))
        .order(messages::seq.desc())
        .select(Message::as_select())
        .first(conn)
        .optional()?)
}

/// The turns of a session ([`Message::is_turn`]), from the finish reasons of its replies alone.
pub fn turn_count(conn: &mut DbConn, session_id: i64) -> DbResult<i32> {
    let reasons: Vec<Option<String>> = messages::table
        .filter(messages::session_id.eq(session_id))
        .filter(messages::role.eq(MessageRole::Assistant.as_str()))
        .select(messages::finish_reason)
        .load(conn)?;
    let turns = reasons
        .iter()
        .filter(|r| !Message::was_stopped(r.as_deref()))
        .count();
    Ok(i32::try_from(turns).unwrap_or(i32::MAX))
}

/// How many messages the participant sent since `since` (the per-minute limit).
pub fn user_messages_since(
    conn: &mut DbConn,
    session_id: i64,
    since: chrono::NaiveDateTime,
) -> DbResult<i64> {
    Ok(messages::table
        .filter(messages::session_id.eq(session_id))
        .filter(messages::role.eq(MessageRole::User.as_str()))
        .filter(messages::created_at.gt(since))
        .count()
        .get_result(conn)?)
}

/// The turns ([`Message::is_turn`]) of every session of a study version, by session id, in one
/// query; a session without any is absent.
pub fn turns_for_version(
    conn: &mut DbConn,
    study_version_id: i64,
) -> DbResult<HashMap<i64, usize>> {
    use super::schema::sessions;
    let replies: Vec<(i64, Option<String>)> = messages::table
        .inner_join(sessions::table)
        .filter(sessions::study_version_id.eq(study_version_id))
        .filter(messages::role.eq(MessageRole::Assistant.as_str()))
        .select((messages::session_id, messages::finish_reason))
        .load(conn)?;
    let mut turns = HashMap::new();
    for (session, finish_reason) in replies {
        if !Message::was_stopped(finish_reason.as_deref()) {
            *turns.entry(session).or_insert(0) += 1;
        }
    }
    Ok(turns)
}

/// Takes a message out of the transcript (a reply the participant asked to replace; it is kept
/// as a candidate first).
pub fn remove(conn: &mut DbConn, id: i64) -> DbResult<()> {
    diesel::delete(messages::table.find(id)).execute(conn)?;
    Ok(())
}
