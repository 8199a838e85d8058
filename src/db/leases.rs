//! Leases: work that must be done by one node at a time across every node of the database (the
//! reply to a session's message, a periodic job). A holder renews its lease while it works; when
//! a node dies its leases expire and another node takes them over. Times are the nodes' clocks,
//! so the time to live must be well above the clocks' skew.

use chrono::NaiveDateTime;
use diesel::prelude::*;

use super::schema::leases;
use super::{get_optional, now, write_transaction, DbConn, DbResult};

#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = leases)]
pub struct Lease {
    pub name: String,
    pub holder: String,
    pub expires_at: NaiveDateTime,
    pub session_id: Option<i64>,
    /// What the holder has done so far, for other nodes to show (a reply's text).
    pub progress: Option<String>,
    /// Someone asked the holder to stop (the participant pressed stop on another node).
    pub cancel: bool,
}

/// The lease of the reply to a session's last message.
pub fn reply_name(session_id: i64) -> String {
    format!("reply/{session_id}")
}

pub fn get(conn: &mut DbConn, name: &str) -> DbResult<Option<Lease>> {
    Ok(leases::table
        .find(name)
        .select(Lease::as_select())
        .first(conn)
        .optional()?)
}

/// Takes the lease for `holder` until `ttl` from now when nobody holds it, its holder let it
/// expire, or `holder` has it already (then it is renewed, its progress cleared). Whether
/// `holder` has it now. One statement: inserted, or taken over when the stored one may be.
pub fn acquire(
    conn: &mut DbConn,
    name: &str,
    holder: &str,
    ttl: chrono::Duration,
    session_id: Option<i64>,
) -> DbResult<bool> {
    // `filter` of an upsert is its `ON CONFLICT … DO UPDATE … WHERE`.
    use diesel::query_dsl::methods::FilterDsl;
    write_transaction(conn, |conn| {
        let at = now();
        let taken = get_optional::<_, String>(
            conn,
            diesel::insert_into(leases::table)
                .values((
                    leases::name.eq(name),
                    leases::holder.eq(holder),
                    leases::expires_at.eq(at + ttl),
                    leases::session_id.eq(session_id),
                    leases::cancel.eq(false),
                ))
                .on_conflict(leases::name)
                .do_update()
                .set((
                    leases::holder.eq(holder),
                    leases::expires_at.eq(at + ttl),
                    leases::progress.eq(None::<String>),
                    leases::cancel.eq(false),
                ))
                .filter(leases::expires_at.lt(at).or(leases::holder.eq(holder)))
                .returning(leases::name),
        )?;
        Ok(taken.is_some())
    })
}

/// Renews `holder`'s lease until `ttl` from now, storing `progress` when given. `None` when the
/// lease is no longer `holder`'s (it expired and another node took it), else whether the holder
/// was asked to stop.
pub fn renew(
    conn: &mut DbConn,
    name: &str,
    holder: &str,
    ttl: chrono::Duration,
    progress: Option<&str>,
) -> DbResult<Option<bool>> {
    let mine = leases::table.find(name).filter(leases::holder.eq(holder));
    let until = leases::expires_at.eq(now() + ttl);
    let cancel = match progress {
        Some(p) => diesel::update(mine)
            .set((until, leases::progress.eq(p)))
            .returning(leases::cancel)
            .get_result(conn),
        None => diesel::update(mine)
            .set(until)
            .returning(leases::cancel)
            .get_result(conn),
    };
    Ok(cancel.optional()?)
}

/// What became of a lease its holder let go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Released {
    /// It was the holder's and is gone.
    Released,
    /// There was none (the work was done and released elsewhere, or never leased).
    Absent,
    /// Another node holds it now: its work is theirs.
    HeldElsewhere,
}

/// Lets go of `holder`'s lease.
pub fn release(conn: &mut DbConn, name: &str, holder: &str) -> DbResult<Released> {
    let deleted =
        diesel::delete(leases::table.find(name).filter(leases::holder.eq(holder))).execute(conn)?;
    if deleted == 1 {
        return Ok(Released::Released);
    }
    Ok(match get(conn, name)? {
        Some(_) => Released::HeldElsewhere,
        None => Released::Absent,
    })
}

/// Asks the holder of the lease to stop; whether there is one.
pub fn request_cancel(conn: &mut DbConn, name: &str) -> DbResult<bool> {
    let asked = diesel::update(leases::table.find(name))
        .set(leases::cancel.eq(true))
        .execute(conn)?;
    Ok(asked == 1)
}

/// The sessions whose leased work (a reply) was left by a holder that stopped renewing it.
pub fn expired_sessions(conn: &mut DbConn, at: NaiveDateTime) -> DbResult<Vec<i64>> {
    Ok(leases::table
        .filter(leases::expires_at.lt(at))
        .filter(leases::session_id.is_not_null())
        .select(leases::session_id.assume_not_null())
        .order(leases::expires_at)
        .load(conn)?)
}
