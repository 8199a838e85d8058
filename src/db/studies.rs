//! Studies, their protocol versions and arms. A changed protocol never rewrites an imported version:
//! it becomes the next version, and sessions keep pointing at the version they ran under.

use std::collections::HashMap;

use diesel::prelude::*;
use serde_json::json;

use super::models::{Arm, Study, StudyVersion};
use super::schema::{arms, sessions, studies, study_versions};
use super::{now, write_transaction, DbConn, DbError, DbResult};
use crate::protocol::LoadedProtocol;

/// What an import did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImportOutcome {
    /// A new study, at version 1.
    Created,
    /// The protocol changed: stored as the next version.
    NewVersion,
    /// The same text (by sha256) as the current version: nothing written.
    Unchanged,
}

#[derive(Debug, Clone)]
pub struct Imported {
    pub study: Study,
    pub version: StudyVersion,
    pub outcome: ImportOutcome,
}

/// The study statuses a researcher can set.
pub const STATUSES: [&str; 3] = ["active", "paused", "archived"];

/// Stores a checked protocol: creates the study, or adds a version when the text changed.
pub fn import(conn: &mut DbConn, loaded: &LoadedProtocol) -> DbResult<Imported> {
    write_transaction(conn, |conn| {
        let info = &loaded.protocol.study;
        let existing = find_by_slug(conn, &info.slug)?;
        let (study, next_version, outcome) = match existing {
            None => {
                let study: Study = diesel::insert_into(studies::table)
                    .values((
                        studies::slug.eq(&info.slug),
                        studies::title.eq(&info.title),
                        studies::status.eq("active"),
                        studies::created_at.eq(now()),
                    ))
                    .returning(studies::all_columns)
                    .get_result(conn)?;
                (study, 1, ImportOutcome::Created)
            }
            Some(study) => {
                let current = current_version(conn, study.id)?;
                if current.protocol_sha256 == loaded.sha256 {
                    return Ok(Imported {
                        study,
                        version: current,
                        outcome: ImportOutcome::Unchanged,
                    });
                }
                let study: Study = diesel::update(studies::table.find(study.id))
                    .set(studies::title.eq(&info.title))
                    .returning(studies::all_columns)
                    .get_result(conn)?;
                (study, current.version + 1, ImportOutcome::NewVersion)
            }
        };
        let version: StudyVersion = diesel::insert_into(study_versions::table)
            .values((
                study_versions::study_id.eq(study.id),
                study_versions::version.eq(next_version),
                study_versions::label.eq(&info.version),
                study_versions::protocol_text.eq(&loaded.text),
                study_versions::protocol_sha256.eq(&loaded.sha256),
                study_versions::source_path.eq(loaded.source.display().to_string()),
                study_versions::imported_at.eq(now()),
            ))
            .returning(study_versions::all_columns)
            .get_result(conn)?;
        for arm in &loaded.protocol.arms {
            let policy = json!({
                "model": arm.model,
                "system_prompt": arm.system_prompt,
                "sampling": arm.sampling,
                "lora": arm.lora,
            });
            let quota = arm.quota.map(|q| i32::try_from(q).unwrap_or(i32::MAX));
            diesel::insert_into(arms::table)
                .values((
                    arms::study_version_id.eq(version.id),
                    arms::name.eq(&arm.id),
                    arms::model_id.eq(&arm.model),
                    arms::weight.eq(arm.weight),
                    arms::quota.eq(quota),
                    arms::policy_json.eq(policy.to_string()),
                ))
                .execute(conn)?;
        }
        Ok(Imported {
            study,
            version,
            outcome,
        })
    })
}

pub fn find_by_slug(conn: &mut DbConn, slug: &str) -> DbResult<Option<Study>> {
    Ok(studies::table
        .filter(studies::slug.eq(slug))
        .select(Study::as_select())
        .first(conn)
        .optional()?)
}

pub fn list(conn: &mut DbConn) -> DbResult<Vec<Study>> {
    Ok(studies::table
        .order(studies::slug)
        .select(Study::as_select())
        .load(conn)?)
}

/// The newest version of a study: the one new participants run under.
pub fn current_version(conn: &mut DbConn, study_id: i64) -> DbResult<StudyVersion> {
    Ok(study_versions::table
        .filter(study_versions::study_id.eq(study_id))
        .order(study_versions::version.desc())
        .select(StudyVersion::as_select())
        .first(conn)?)
}

pub fn versions(conn: &mut DbConn, study_id: i64) -> DbResult<Vec<StudyVersion>> {
    Ok(study_versions::table
        .filter(study_versions::study_id.eq(study_id))
        .order(study_versions::version)
        .select(StudyVersion::as_select())
        .load(conn)?)
}

pub fn arms_of(conn: &mut DbConn, study_version_id: i64) -> DbResult<Vec<Arm>> {
    Ok(arms::table
        .filter(arms::study_version_id.eq(study_version_id))
        .order(arms::id)
        .select(Arm::as_select())
        .load(conn)?)
}

/// A study as the console lists it.
pub struct StudySummary {
    pub study: Study,
    /// Its newest version's number.
    pub version: i32,
    /// Sessions under any of its versions.
    pub sessions: i64,
}

/// Every study, by slug, with its newest version and session count: three queries however many
/// studies and versions there are.
pub fn summaries(conn: &mut DbConn) -> DbResult<Vec<StudySummary>> {
    use diesel::dsl::{count_star, max};
    let newest: HashMap<i64, Option<i32>> = study_versions::table
        .group_by(study_versions::study_id)
        .select((study_versions::study_id, max(study_versions::version)))
        .load::<(i64, Option<i32>)>(conn)?
        .into_iter()
        .collect();
    let counts: HashMap<i64, i64> = sessions::table
        .inner_join(study_versions::table)
        .group_by(study_versions::study_id)
        .select((study_versions::study_id, count_star()))
        .load::<(i64, i64)>(conn)?
        .into_iter()
        .collect();
    Ok(list(conn)?
        .into_iter()
        .map(|study| StudySummary {
            version: newest.get(&study.id).copied().flatten().unwrap_or(0),
            sessions: counts.get(&study.id).copied().unwrap_or(0),
            study,
        })
        .collect())
}

/// Activates, pauses or archives a study.
pub fn set_status(conn: &mut DbConn, study_id: i64, status: &str) -> DbResult<Study> {
    if !STATUSES.contains(&status) {
        return Err(DbError::Invalid(format!(
            "unknown study status {status:?}; use one of {}",
            STATUSES.join(", ")
        )));
    }
    Ok(diesel::update(studies::table.find(study_id))
        .set(studies::status.eq(status))
        .returning(studies::all_columns)
        .get_result(conn)?)
}

pub fn version(conn: &mut DbConn, id: i64) -> DbResult<StudyVersion> {
    Ok(study_versions::table
        .find(id)
        .select(StudyVersion::as_select())
        .first(conn)?)
}

pub fn get(conn: &mut DbConn, id: i64) -> DbResult<Study> {
    Ok(studies::table
        .find(id)
        .select(Study::as_select())
        .first(conn)?)
}
