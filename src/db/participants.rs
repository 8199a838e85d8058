//! Participants: pseudonymous ids; an external id (e.g. a Prolific PID) is kept only as a salted HMAC.

use diesel::prelude::*;

use super::models::Participant;
use super::schema::participants;
use super::{insert_once, now, DbConn, DbResult};

/// The participant with this external-id HMAC in this study, created if new. Returns whether it
/// was created. Without an HMAC a new participant is always created.
pub fn find_or_create(
    conn: &mut DbConn,
    study_id: i64,
    external_id_hmac: Option<&str>,
    simulated: bool,
) -> DbResult<(Participant, bool)> {
    insert_once(
        conn,
        diesel::insert_into(participants::table)
            .values((
                participants::study_id.eq(study_id),
                participants::pseudonym.eq(new_pseudonym()),
                participants::external_id_hmac.eq(external_id_hmac),
                participants::simulated.eq(simulated),
                participants::created_at.eq(now()),
            ))
            .on_conflict_do_nothing()
            .returning(participants::all_columns),
        |conn| {
            participants::table
                .filter(participants::study_id.eq(study_id))
                .filter(participants::external_id_hmac.eq(external_id_hmac))
                .select(Participant::as_select())
                .first(conn)
        },
    )
}

pub fn get(conn: &mut DbConn, id: i64) -> DbResult<Participant> {
    Ok(participants::table
        .find(id)
        .select(Participant::as_select())
        .first(conn)?)
}

/// The participants of a study version's sessions, by id, in one query.
pub fn of_version(
    conn: &mut DbConn,
    study_version_id: i64,
) -> DbResult<std::collections::HashMap<i64, Participant>> {
    use super::schema::sessions;
    let ids = sessions::table
        .filter(sessions::study_version_id.eq(study_version_id))
        .select(sessions::participant_id);
    Ok(participants::table
        .filter(participants::id.eq_any(ids))
        .select(Participant::as_select())
        .load(conn)?
        .into_iter()
        .map(|p: Participant| (p.id, p))
        .collect())
}

/// `p-` and 16 random hex digits: what exports and the console show instead of any external id.
fn new_pseudonym() -> String {
    format!("p-{}", &uuid::Uuid::new_v4().simple().to_string()[..16])
}
