//! Questionnaire answers: free text per question, one per session.

use diesel::prelude::*;

use super::models::Answer;
use super::schema::questionnaire_answers as answers;
use super::{insert_once, now, DbConn, DbResult};

/// Stores an answer once; a repeat returns the stored answer and `false`.
pub fn record(
    conn: &mut DbConn,
    session_id: i64,
    question_key: &str,
    answer: &str,
) -> DbResult<(Answer, bool)> {
    insert_once(
        conn,
        diesel::insert_into(answers::table)
            .values((
                answers::session_id.eq(session_id),
                answers::question_key.eq(question_key),
                answers::answer.eq(answer),
                answers::created_at.eq(now()),
            ))
            .on_conflict_do_nothing()
            .returning(answers::all_columns),
        |conn| {
            answers::table
                .filter(answers::session_id.eq(session_id))
                .filter(answers::question_key.eq(question_key))
                .select(Answer::as_select())
                .first(conn)
        },
    )
}

pub fn list_for_session(conn: &mut DbConn, session_id: i64) -> DbResult<Vec<Answer>> {
    Ok(answers::table
        .filter(answers::session_id.eq(session_id))
        .order(answers::question_key)
        .select(Answer::as_select())
        .load(conn)?)
}
