//! A study's page: arms and their sessions by state, the sessions as they run, results per arm
//! with plots, the tasks drawn, the latest evaluation, the engines; its status and downloads.

use actix_web::http::header;
use actix_web::{get, post, web, HttpRequest, HttpResponse};
use askama::Template;
use futures_util::StreamExt;
use serde::Deserialize;

use super::{check_csrf, csrf, participant_label, researcher, with_cookie, Page};
use crate::collab::evaluate;
use crate::db::vocab::SessionState;
use crate::db::{self, DbConn};
use crate::engine::EngineStatus;
use crate::export;
use crate::results;
use crate::results::charts::{
    result_views, BoxPlot, EvaluationView, LinePlot, ResultRow, RoundView,
};
use crate::web::{render, see_other, ApiError, AppState};

struct ArmRow {
    name: String,
    model: String,
    weight: f64,
    quota: String,
    /// Sessions in each of [`SessionState::ALL`], in that order.
    by_state: Vec<i64>,
}

struct SessionRow {
    id: String,
    participant: String,
    arm: String,
    state: SessionState,
    turns: usize,
    words: usize,
    minutes: String,
    last_activity: String,
}

#[derive(Template)]
#[template(path = "console_study.html")]
struct StudyPage<'a> {
    who: &'a str,
    csrf: &'a str,
    study: db::models::Study,
    version: db::models::StudyVersion,
    states: &'static [SessionState],
    /// Whose sessions the results cover: `human`, `simulated` or `all`.
    shown: &'static str,
    arms: Vec<ArmRow>,
    sessions: Vec<SessionRow>,
    files: [&'static str; 9],
    result_headers: Vec<String>,
    results: Vec<ResultRow>,
    lines: Vec<LinePlot>,
    boxes: Option<BoxPlot>,
    tasks: Vec<TaskRow>,
    engines: Vec<EngineStatus>,
    evaluation: Option<EvaluationView>,
    /// The rounds of the online DPO runs (`collabllm loop`) of the study, run by run.
    rounds: Vec<RoundView>,
    /// The metrics of a round's cells.
    round_headers: Vec<&'static str>,
}

/// A task of the protocol, with how often each topic was drawn.
struct TaskRow {
    kind: String,
    topics: Vec<(String, i64)>,
}

/// The export files offered for download.
const EXPORT_FILES: [&str; 9] = [
    "sessions.csv",
    "messages.csv",
    "ratings.csv",
    "revisions.csv",
    "candidates.csv",
    "events.csv",
    "assignments.csv",
    "codebook.csv",
    "study.json",
];

/// Whose sessions the results per arm cover.
#[derive(Deserialize, Clone, Copy, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum SessionsShown {
    /// People only: what a study reports.
    #[default]
    Human,
    Simulated,
    All,
}

impl SessionsShown {
    /// The `simulated` flag the sessions must have, if any.
    fn simulated(self) -> Option<bool> {
        match self {
            SessionsShown::Human => Some(false),
            SessionsShown::Simulated => Some(true),
            SessionsShown::All => None,
        }
    }
}

#[derive(Deserialize)]
struct StudyQuery {
    #[serde(default)]
    sessions: SessionsShown,
}

#[get("/console/studies/{slug}")]
pub(crate) async fn show_study(
    req: HttpRequest,
    state: web::Data<AppState>,
    slug: web::Path<String>,
    query: web::Query<StudyQuery>,
) -> Page {
    let who = researcher(&req, &state).await?;
    let (token, cookie) = csrf(&req, &state.console_key);
    let slug = slug.into_inner();
    let shown = query.sessions;
    let studio = state.studio.clone();
    let (study, version, arms, sessions, views) = state
        .db(move |conn| {
            let study = db::studies::find_by_slug(conn, &slug)?
                .ok_or_else(|| ApiError::NotFound(format!("there is no study {slug:?}")))?;
            let version = db::studies::current_version(conn, study.id)?;
            let (arms, sessions) = study_overview(conn, &version)?;
            let protocol = studio.protocol(conn, version.id)?;
            let per_arm = results::per_arm(conn, version.id, &protocol, shown.simulated())?;
            // Draws of the participants shown (people's and simulated ones are kept apart).
            let mut drawn = Vec::new();
            for simulated in [false, true] {
                if shown.simulated().is_none_or(|s| s == simulated) {
                    drawn.extend(db::assignments::task_counts(conn, version.id, simulated)?);
                }
            }
            let tasks = protocol
                .tasks
                .iter()
                .map(|t| TaskRow {
                    kind: t.kind.clone(),
                    topics: t
                        .topics
                        .iter()
                        .map(|p| {
                            let n = drawn
                                .iter()
                                .filter(|(task, topic, _)| *task == t.id && *topic == p.id)
                                .map(|(_, _, n)| n)
                                .sum();
                            (p.title.clone(), n)
                        })
                        .collect(),
                })
                .collect();
            let evaluation = db::evaluations::latest(conn, study.id)?
                .map(|e| evaluate::view(&e))
                .transpose()
                .map_err(|e| {
                    ApiError::Internal(format!("a stored evaluation is unreadable: {e}"))
                })?;
            let rounds = loop_rounds(conn, &study.slug)?;
            Ok((
                study,
                version,
                arms,
                sessions,
                (result_views(&per_arm, &protocol), tasks, evaluation, rounds),
            ))
        })
        .await?;
    let ((result_headers, results, lines, boxes), tasks, evaluation, rounds) = views;
    let response = render(&StudyPage {
        who: &who.name,
        csrf: &token,
        study,
        version,
        states: SessionState::ALL,
        shown: match shown {
            SessionsShown::Human => "human",
            SessionsShown::Simulated => "simulated",
            SessionsShown::All => "all",
        },
        arms,
        sessions,
        files: EXPORT_FILES,
        result_headers,
        results,
        lines,
        boxes,
        tasks,
        engines: state.engines.statuses(),
        evaluation,
        rounds,
        round_headers: evaluate::METRICS
            .iter()
            .map(|m| evaluate::metric_label(m))
            .collect(),
    })?;
    with_cookie(response, cookie)
}

/// Every evaluated round of the loops run on the study `base`, by run and round.
fn loop_rounds(conn: &mut DbConn, base: &str) -> Result<Vec<RoundView>, ApiError> {
    let mut rounds = Vec::new();
    for study in db::studies::list(conn)? {
        let Some((run, round)) = evaluate::loop_round_of(base, &study.slug) else {
            continue;
        };
        if let Some(stored) = db::evaluations::latest(conn, study.id)? {
            let view = evaluate::round_view(run, round, study.slug, &stored).map_err(|e| {
                ApiError::Internal(format!("a stored evaluation is unreadable: {e}"))
            })?;
            rounds.push(view);
        }
    }
    rounds.sort_by(|a, b| (&a.run, a.round).cmp(&(&b.run, b.round)));
    Ok(rounds)
}

fn study_overview(
    conn: &mut DbConn,
    version: &db::models::StudyVersion,
) -> Result<(Vec<ArmRow>, Vec<SessionRow>), ApiError> {
    let arms = db::studies::arms_of(conn, version.id)?;
    let sessions = db::sessions::list_for_version(conn, version.id)?;
    let mut arm_rows: Vec<ArmRow> = arms
        .iter()
        .map(|a| ArmRow {
            name: a.name.clone(),
            model: a.model_id.clone(),
            weight: a.weight,
            quota: a.quota.map(|q| q.to_string()).unwrap_or_else(|| "—".into()),
            by_state: vec![0; SessionState::ALL.len()],
        })
        .collect();
    // Three grouped queries for every session of the version, not three per session.
    let participants = db::participants::of_version(conn, version.id)?;
    let turns = db::messages::turns_for_version(conn, version.id)?;
    let documents = db::revisions::latest_texts_for_version(conn, version.id)?;
    let mut rows = Vec::new();
    let now = db::now();
    for s in sessions.iter().rev() {
        let arm = arms.iter().find(|a| Some(a.id) == s.arm_id);
        if let Some(row) = arm.and_then(|a| arm_rows.iter_mut().find(|r| r.name == a.name)) {
            let column = SessionState::ALL
                .iter()
                .position(|state| *state == s.state)
                .expect("ALL lists every state");
            row.by_state[column] += 1;
        }
        let end = s.finished_at.unwrap_or(now);
        rows.push(SessionRow {
            id: s.public_id.clone(),
            participant: participants
                .get(&s.participant_id)
                .map_or_else(|| "—".to_string(), participant_label),
            arm: arm.map(|a| a.name.clone()).unwrap_or_else(|| "—".into()),
            state: s.state,
            turns: turns.get(&s.id).copied().unwrap_or(0),
            words: documents
                .get(&s.id)
                .map_or(0, |d| d.split_whitespace().count()),
            minutes: format!("{:.1}", (end - s.started_at).num_seconds() as f64 / 60.0),
            last_activity: export::timestamp(&s.last_activity_at),
        });
    }
    Ok((arm_rows, rows))
}

#[derive(Deserialize)]
struct StatusForm {
    status: String,
    csrf: String,
}

#[post("/console/studies/{slug}/status")]
pub(crate) async fn set_study_status(
    req: HttpRequest,
    state: web::Data<AppState>,
    slug: web::Path<String>,
    form: web::Form<StatusForm>,
) -> Page {
    researcher(&req, &state).await?;
    check_csrf(&req, &state.console_key, &form.csrf)?;
    let slug = slug.into_inner();
    let status = form.into_inner().status;
    let location = format!("/console/studies/{slug}");
    state
        .db(move |conn| {
            let study = db::studies::find_by_slug(conn, &slug)?
                .ok_or_else(|| ApiError::NotFound(format!("there is no study {slug:?}")))?;
            db::studies::set_status(conn, study.id, &status)
                .map_err(|e| ApiError::BadRequest(e.to_string()))?;
            Ok(())
        })
        .await?;
    Ok(see_other(location))
}

#[get("/console/studies/{slug}/export/{file}")]
pub(crate) async fn download_export(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
) -> Page {
    researcher(&req, &state).await?;
    let (slug, file) = path.into_inner();
    if !EXPORT_FILES.contains(&file.as_str()) {
        return Err(ApiError::NotFound(format!("there is no export file {file:?}")).into());
    }
    let dir = tempfile::tempdir().map_err(|e| ApiError::Internal(e.to_string()))?;
    let out = dir.path().to_path_buf();
    let export_slug = slug.clone();
    let json = file == "study.json";
    state
        .db(move |conn| {
            let done = if json {
                export::json::export(conn, &export_slug, &out.join("study.json"), &|_| {}).map(drop)
            } else {
                export::csv::export(
                    conn,
                    &export_slug,
                    &export::Filter::default(),
                    &out,
                    &|_, _| {},
                )
                .map(drop)
            };
            done.map_err(|e| match e {
                export::ExportError::UnknownStudy(_) => ApiError::NotFound(e.to_string()),
                other => ApiError::Internal(other.to_string()),
            })
        })
        .await?;
    let handle = tokio::fs::File::open(dir.path().join(&file))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    // The file streams from disk; the directory lives as long as the stream.
    let body = tokio_util::io::ReaderStream::new(handle).map(move |chunk| {
        let _keep = &dir;
        chunk
    });
    Ok(HttpResponse::Ok()
        .content_type(if json {
            "application/json"
        } else {
            "text/csv; charset=utf-8"
        })
        .insert_header((
            header::CONTENT_DISPOSITION,
            format!("attachment; filename=\"{slug}-{file}\""),
        ))
        .streaming(body))
}
