//! Keys of the OpenAI-compatible `/v1` API, stored as the sha256 of the key (the key itself is
//! shown once, when it is made).

use diesel::prelude::*;

use super::schema::api_keys;
use super::{now, DbConn, DbResult};

/// Stores a key under `name`, replacing the key the name had. Returns whether the name was new.
pub fn set(conn: &mut DbConn, name: &str, key_sha256: &str) -> DbResult<bool> {
    let updated = diesel::update(api_keys::table.filter(api_keys::name.eq(name)))
        .set(api_keys::key_sha256.eq(key_sha256))
        .execute(conn)?;
    if updated > 0 {
        return Ok(false);
    }
    diesel::insert_into(api_keys::table)
        .values((
            api_keys::name.eq(name),
            api_keys::key_sha256.eq(key_sha256),
            api_keys::created_at.eq(now()),
        ))
        .execute(conn)?;
    Ok(true)
}

/// The name of the key with this sha256, if one is stored.
pub fn find(conn: &mut DbConn, key_sha256: &str) -> DbResult<Option<String>> {
    Ok(api_keys::table
        .filter(api_keys::key_sha256.eq(key_sha256))
        .select(api_keys::name)
        .first(conn)
        .optional()?)
}

pub fn count(conn: &mut DbConn) -> DbResult<i64> {
    Ok(api_keys::table.count().get_result(conn)?)
}
