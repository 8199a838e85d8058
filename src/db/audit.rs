//! What the server noticed about a session outside the participant's own frames: an entry refused
//! because the session is open in another browser, a resume with proof, a researcher's handover.
//! Shown on the console's session page; never sent to participants.

use diesel::prelude::*;
use serde::Serialize;

use super::schema::audit_events;
use super::{now, DbConn, DbResult};

#[derive(Debug, Clone, Queryable, Selectable, Serialize, PartialEq)]
#[diesel(table_name = audit_events)]
pub struct AuditEvent {
    pub id: i64,
    pub session_id: i64,
    pub kind: String,
    pub detail_json: String,
    pub created_at: chrono::NaiveDateTime,
}

pub fn record(
    conn: &mut DbConn,
    session_id: i64,
    kind: &str,
    detail: &serde_json::Value,
) -> DbResult<()> {
    diesel::insert_into(audit_events::table)
        .values((
            audit_events::session_id.eq(session_id),
            audit_events::kind.eq(kind),
            audit_events::detail_json.eq(detail.to_string()),
            audit_events::created_at.eq(now()),
        ))
        .execute(conn)?;
    Ok(())
}

pub fn list_for_session(conn: &mut DbConn, session_id: i64) -> DbResult<Vec<AuditEvent>> {
    Ok(audit_events::table
        .filter(audit_events::session_id.eq(session_id))
        .order(audit_events::id)
        .select(AuditEvent::as_select())
        .load(conn)?)
}
