//! Researcher accounts of the console.

use diesel::prelude::*;
use serde::Serialize;

use super::schema::researchers;
use super::{now, DbConn, DbResult};

#[derive(Debug, Clone, Queryable, Selectable, Serialize, PartialEq)]
#[diesel(table_name = researchers)]
pub struct Researcher {
    pub id: i64,
    pub name: String,
    /// argon2id PHC string.
    #[serde(skip)]
    pub password_hash: String,
    pub created_at: chrono::NaiveDateTime,
    /// Console cookies issued before this moment are void (set by logging out).
    pub sessions_valid_after: Option<chrono::NaiveDateTime>,
}

/// Creates the account, or sets a new password when the name exists. Returns whether it was new.
pub fn set(conn: &mut DbConn, name: &str, password_hash: &str) -> DbResult<bool> {
    let updated = diesel::update(researchers::table.filter(researchers::name.eq(name)))
        .set(researchers::password_hash.eq(password_hash))
        .execute(conn)?;
    if updated > 0 {
        return Ok(false);
    }
    diesel::insert_into(researchers::table)
        .values((
            researchers::name.eq(name),
            researchers::password_hash.eq(password_hash),
            researchers::created_at.eq(now()),
        ))
        .execute(conn)?;
    Ok(true)
}

pub fn find_by_name(conn: &mut DbConn, name: &str) -> DbResult<Option<Researcher>> {
    Ok(researchers::table
        .filter(researchers::name.eq(name))
        .select(Researcher::as_select())
        .first(conn)
        .optional()?)
}

pub fn get(conn: &mut DbConn, id: i64) -> DbResult<Option<Researcher>> {
    Ok(researchers::table
        .find(id)
        .select(Researcher::as_select())
        .first(conn)
        .optional()?)
}

/// Voids every console cookie issued to the researcher until now (logout).
pub fn revoke_sessions(conn: &mut DbConn, id: i64) -> DbResult<()> {
    diesel::update(researchers::table.find(id))
        .set(researchers::sessions_valid_after.eq(now()))
        .execute(conn)?;
    Ok(())
}
