//! Finished turns of `collabllm synth`, stored as they finish so a stopped run resumes.

use diesel::prelude::*;

use super::schema::synth_turns;
use super::{now, write_transaction, DbConn, DbResult};

/// Stores a turn's result under its key; a key stored already keeps its first result.
pub fn insert(
    conn: &mut DbConn,
    key_sha256: &str,
    conversation: &str,
    turn: i32,
    result_json: &str,
) -> DbResult<()> {
    write_transaction(conn, |conn| {
        if find(conn, key_sha256)?.is_none() {
            diesel::insert_into(synth_turns::table)
                .values((
                    synth_turns::key_sha256.eq(key_sha256),
                    synth_turns::conversation.eq(conversation),
                    synth_turns::turn.eq(turn),
                    synth_turns::result_json.eq(result_json),
                    synth_turns::created_at.eq(now()),
                ))
                .execute(conn)?;
        }
        Ok(())
    })
}

/// The result stored under `key_sha256`, if any.
pub fn find(conn: &mut DbConn, key_sha256: &str) -> DbResult<Option<String>> {
    Ok(synth_turns::table
        .filter(synth_turns::key_sha256.eq(key_sha256))
        .select(synth_turns::result_json)
        .first(conn)
        .optional()?)
}
