//! Installation secrets (e.g. the key behind participant-id HMACs), made once and shared by every
//! node that uses the database.

use diesel::prelude::*;

use super::schema::secrets;
use super::{insert_once, now, DbConn, DbResult};

/// The secret called `name`, created with `make` the first time it is asked for.
pub fn get_or_create(
    conn: &mut DbConn,
    name: &str,
    make: impl FnOnce() -> String,
) -> DbResult<String> {
    let existing = secrets::table
        .find(name)
        .select(secrets::value)
        .first::<String>(conn)
        .optional()?;
    if let Some(value) = existing {
        return Ok(value);
    }
    let value = make();
    let (stored, _) = insert_once(
        conn,
        diesel::insert_into(secrets::table)
            .values((
                secrets::name.eq(name),
                secrets::value.eq(&value),
                secrets::created_at.eq(now()),
            ))
            .on_conflict_do_nothing()
            .returning(secrets::value),
        |conn| secrets::table.find(name).select(secrets::value).first(conn),
    )?;
    Ok(stored)
}
