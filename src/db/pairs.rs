//! Preference pairs (chosen vs rejected reply for one context), from human signals or MR.

use diesel::prelude::*;

use super::models::{NewPreferencePair, PreferencePair};
use super::schema::preference_pairs as pairs;
use super::{DbConn, DbResult};

pub fn insert(conn: &mut DbConn, new: &NewPreferencePair) -> DbResult<PreferencePair> {
    Ok(diesel::insert_into(pairs::table)
        .values(new)
        .returning(pairs::all_columns)
        .get_result(conn)?)
}

pub fn list_for_study(conn: &mut DbConn, study_id: i64) -> DbResult<Vec<PreferencePair>> {
    Ok(pairs::table
        .filter(pairs::study_id.eq(study_id))
        .order(pairs::id)
        .select(PreferencePair::as_select())
        .load(conn)?)
}
