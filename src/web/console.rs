//! The researcher console under `/console`: login, studies with their arms and progress, the
//! sessions of a study as they run, a session's transcript and document history, study status,
//! and CSV downloads. Every route but the login page needs a researcher's session cookie; every
//! form carries a CSRF token.

use actix_web::cookie::{time::Duration as CookieDuration, Cookie, SameSite};
use actix_web::http::{header, StatusCode};
use actix_web::{get, post, web, HttpRequest, HttpResponse, ResponseError};
use askama::Template;
use futures_util::StreamExt;
use serde::Deserialize;

use super::auth::{self, ConsoleKey, CSRF_COOKIE, SESSION_COOKIE};
use super::{render, see_other, ApiError, AppState};
use crate::db::researchers::Researcher;
use crate::db::vocab::{RevisionAuthor, SessionState};
use crate::db::{self, DbConn};
use crate::engine::EngineStatus;
use crate::export;
use crate::results;

/// Why a console request was refused.
#[derive(Debug)]
pub(super) enum ConsoleError {
    /// Not logged in: go to the login page.
    Login,
    /// A form without a valid CSRF token.
    Forbidden,
    Api(ApiError),
}

impl std::fmt::Display for ConsoleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConsoleError::Login => f.write_str("log in first"),
            ConsoleError::Forbidden => {
                f.write_str("the form's security token is missing or wrong; reload the page")
            }
            ConsoleError::Api(e) => e.fmt(f),
        }
    }
}

impl<E: Into<ApiError>> From<E> for ConsoleError {
    fn from(e: E) -> Self {
        ConsoleError::Api(e.into())
    }
}

impl ResponseError for ConsoleError {
    fn status_code(&self) -> StatusCode {
        match self {
            ConsoleError::Login => StatusCode::SEE_OTHER,
            ConsoleError::Forbidden => StatusCode::FORBIDDEN,
            ConsoleError::Api(e) => e.status_code(),
        }
    }

    fn error_response(&self) -> HttpResponse {
        match self {
            ConsoleError::Login => HttpResponse::SeeOther()
                .insert_header((header::LOCATION, "/console/login"))
                .finish(),
            ConsoleError::Forbidden => HttpResponse::Forbidden().body(self.to_string()),
            ConsoleError::Api(e) => e.error_response(),
        }
    }
}

type Page = Result<HttpResponse, ConsoleError>;

fn page<T: Template>(t: &T) -> Page {
    Ok(render(t)?)
}

/// The logged-in researcher, or `Login`.
pub(super) async fn researcher(
    req: &HttpRequest,
    state: &AppState,
) -> Result<Researcher, ConsoleError> {
    let cookie = req.cookie(SESSION_COOKIE).ok_or(ConsoleError::Login)?;
    let (id, issued_ms) = state
        .console_key
        .verify_session(cookie.value(), chrono::Utc::now().timestamp())
        .ok_or(ConsoleError::Login)?;
    let researcher = state
        .db(move |conn| Ok(db::researchers::get(conn, id)?))
        .await?
        .ok_or(ConsoleError::Login)?;
    // A logout voids every cookie issued before it.
    let revoked = researcher
        .sessions_valid_after
        .is_some_and(|after| issued_ms <= after.and_utc().timestamp_millis());
    if revoked {
        return Err(ConsoleError::Login);
    }
    Ok(researcher)
}

/// The CSRF token for this browser's forms, and the cookie to set when it has none yet.
fn csrf(req: &HttpRequest, key: &ConsoleKey) -> (String, Option<Cookie<'static>>) {
    match req.cookie(CSRF_COOKIE) {
        Some(c) if !c.value().is_empty() => (key.csrf(c.value()), None),
        _ => {
            let value = hex::encode(rand::random::<[u8; 16]>());
            let token = key.csrf(&value);
            let cookie = Cookie::build(CSRF_COOKIE, value)
                .path("/console")
                .http_only(true)
                .same_site(SameSite::Strict)
                .finish();
            (token, Some(cookie))
        }
    }
}

fn check_csrf(req: &HttpRequest, key: &ConsoleKey, token: &str) -> Result<(), ConsoleError> {
    let cookie = req
        .cookie(CSRF_COOKIE)
        .map(|c| c.value().to_string())
        .unwrap_or_default();
    if key.verify_csrf(&cookie, token) {
        Ok(())
    } else {
        Err(ConsoleError::Forbidden)
    }
}

/// The response with `cookie` set, when there is one.
fn with_cookie(mut response: HttpResponse, cookie: Option<Cookie<'static>>) -> Page {
    if let Some(c) = cookie {
        response
            .add_cookie(&c)
            .map_err(|e| ApiError::Internal(e.to_string()))?;
    }
    Ok(response)
}

#[derive(Template)]
#[template(path = "console_login.html")]
struct LoginPage<'a> {
    csrf: &'a str,
    error: &'a str,
}

#[get("/console/login")]
async fn show_login(req: HttpRequest, state: web::Data<AppState>) -> Page {
    let (token, cookie) = csrf(&req, &state.console_key);
    let response = render(&LoginPage {
        csrf: &token,
        error: "",
    })?;
    with_cookie(response, cookie)
}

#[derive(Deserialize)]
struct LoginForm {
    name: String,
    password: String,
    csrf: String,
}

#[post("/console/login")]
async fn submit_login(
    req: HttpRequest,
    state: web::Data<AppState>,
    form: web::Form<LoginForm>,
) -> Page {
    check_csrf(&req, &state.console_key, &form.csrf)?;
    let LoginForm {
        name,
        password,
        csrf: token,
    } = form.into_inner();
    let limits = state.limits.clone();
    let address = limits.address(&req);
    let waits = [
        limits.logins_by_name.wait(&name),
        limits.logins_by_address.wait(&address),
    ];
    if let Some(wait) = waits.into_iter().flatten().max() {
        let error = format!(
            "Too many failed logins. Try again {}.",
            super::limits::minutes(wait)
        );
        let mut response = render(&LoginPage {
            csrf: &token,
            error: &error,
        })?;
        *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
        return Ok(response);
    }
    let lookup = name.clone();
    let found = state
        .db(move |conn| Ok(db::researchers::find_by_name(conn, &lookup)?))
        .await?;
    // Verification runs off the async threads: argon2 is slow on purpose. An unknown name is
    // verified against a decoy so that it takes as long as a wrong password.
    let hash = found.as_ref().map_or_else(
        || auth::decoy_hash().to_string(),
        |r| r.password_hash.clone(),
    );
    let verified = web::block(move || auth::verify_password(&password, &hash))
        .await
        .map_err(ApiError::from)?;
    let Some(researcher) = found.filter(|_| verified) else {
        limits.logins_by_name.hit(&name);
        limits.logins_by_address.hit(&address);
        tracing::warn!(name = %name, "failed console login");
        let mut response = render(&LoginPage {
            csrf: &token,
            error: "Unknown name or wrong password.",
        })?;
        *response.status_mut() = StatusCode::UNAUTHORIZED;
        return Ok(response);
    };
    limits.logins_by_name.clear(&name);
    let now = chrono::Utc::now();
    let expires = now.timestamp() + auth::SESSION_HOURS * 3600;
    let cookie = Cookie::build(
        SESSION_COOKIE,
        state
            .console_key
            .session(researcher.id, now.timestamp_millis(), expires),
    )
    .path("/console")
    .http_only(true)
    .same_site(SameSite::Strict)
    .secure(req.connection_info().scheme() == "https")
    .max_age(CookieDuration::hours(auth::SESSION_HOURS))
    .finish();
    let mut response = see_other("/console".into());
    response
        .add_cookie(&cookie)
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(response)
}

#[derive(Deserialize)]
struct CsrfForm {
    csrf: String,
}

#[post("/console/logout")]
async fn submit_logout(
    req: HttpRequest,
    state: web::Data<AppState>,
    form: web::Form<CsrfForm>,
) -> Page {
    let who = researcher(&req, &state).await?;
    check_csrf(&req, &state.console_key, &form.csrf)?;
    state
        .db(move |conn| Ok(db::researchers::revoke_sessions(conn, who.id)?))
        .await?;
    let mut response = see_other("/console/login".into());
    let mut gone = Cookie::build(SESSION_COOKIE, "").path("/console").finish();
    gone.make_removal();
    response
        .add_cookie(&gone)
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(response)
}

struct StudyRow {
    slug: String,
    title: String,
    status: String,
    version: i32,
    sessions: i64,
}

#[derive(Template)]
#[template(path = "console_home.html")]
struct HomePage<'a> {
    who: &'a str,
    csrf: &'a str,
    studies: Vec<StudyRow>,
    engines: Vec<EngineStatus>,
    /// A protocol that failed to import, with its problems.
    draft: &'a str,
    problems: Vec<String>,
}

#[get("/console")]
async fn show_console(req: HttpRequest, state: web::Data<AppState>) -> Page {
    let who = researcher(&req, &state).await?;
    home(&req, &state, &who, "", Vec::new()).await
}

/// The console's front page; `draft` and `problems` show a failed import.
async fn home(
    req: &HttpRequest,
    state: &AppState,
    who: &Researcher,
    draft: &str,
    problems: Vec<String>,
) -> Page {
    let (token, cookie) = csrf(req, &state.console_key);
    let studies = state
        .db(|conn| {
            let mut rows = Vec::new();
            for s in db::studies::list(conn)? {
                let versions = db::studies::versions(conn, s.id)?;
                let mut sessions = 0;
                for v in &versions {
                    sessions += db::studies::session_count(conn, v.id)?;
                }
                rows.push(StudyRow {
                    slug: s.slug,
                    title: s.title,
                    status: s.status,
                    version: versions.last().map_or(0, |v| v.version),
                    sessions,
                });
            }
            Ok(rows)
        })
        .await?;
    let response = render(&HomePage {
        who: &who.name,
        csrf: &token,
        studies,
        engines: state.engines.statuses(),
        draft,
        problems,
    })?;
    with_cookie(response, cookie)
}

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

/// Plot size in SVG units, and the margin for axis labels.
const PLOT_W: f64 = 560.0;
const PLOT_H: f64 = 240.0;
const PLOT_MARGIN: f64 = 40.0;
/// Series colours, one per arm (colour-blind safe).
const COLOURS: [&str; 6] = [
    "#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00",
];

/// The latest evaluation with simulated users (`collabllm eval`), as the results page shows it.
struct EvaluationView {
    when: String,
    users: i32,
    baseline: String,
    headers: Vec<&'static str>,
    rows: Vec<ResultRow>,
    /// (arm, cells) of each arm's paired difference to the baseline.
    diffs: Vec<(String, Vec<String>)>,
}

impl EvaluationView {
    fn of(stored: &db::models::Evaluation) -> Result<Self, ApiError> {
        use crate::collab::evaluate::{metric_label, Interval, Table, METRICS};
        let table: Table = serde_json::from_str(&stored.table_json)
            .map_err(|e| ApiError::Internal(format!("a stored evaluation is unreadable: {e}")))?;
        let cell = |i: Option<&Option<Interval>>| match i.copied().flatten() {
            Some(i) => fmt_interval(i.mean, i.lo, i.hi),
            None => "—".to_string(),
        };
        let cells = |m: &std::collections::BTreeMap<String, Option<Interval>>| {
            METRICS.iter().map(|k| cell(m.get(*k))).collect::<Vec<_>>()
        };
        Ok(EvaluationView {
            when: stored.created_at.format("%Y-%m-%d %H:%M UTC").to_string(),
            users: stored.users,
            headers: METRICS.iter().map(|m| metric_label(m)).collect(),
            rows: table
                .order
                .iter()
                .filter_map(|arm| {
                    let row = table.arms.get(arm)?;
                    Some(ResultRow {
                        arm: arm.clone(),
                        n: row.n,
                        cells: cells(&row.metrics),
                    })
                })
                .collect(),
            diffs: table
                .order
                .iter()
                .filter_map(|arm| Some((arm.clone(), cells(table.diff.get(arm)?))))
                .collect(),
            baseline: table.baseline,
        })
    }
}

/// One row of the results table.
struct ResultRow {
    arm: String,
    n: usize,
    cells: Vec<String>,
}

struct Series {
    name: String,
    colour: &'static str,
    points: String,
    dots: Vec<(f64, f64)>,
}

struct Tick {
    at: f64,
    label: String,
}

/// The periodic rating by turn, one line per arm.
struct LinePlot {
    key: String,
    series: Vec<Series>,
    x_ticks: Vec<Tick>,
    y_ticks: Vec<Tick>,
}

/// Time to completion per arm.
struct BoxRow {
    name: String,
    colour: &'static str,
    y: f64,
    min: f64,
    q1: f64,
    median: f64,
    q3: f64,
    max: f64,
}

struct BoxPlot {
    rows: Vec<BoxRow>,
    x_ticks: Vec<Tick>,
    height: f64,
}

/// A tick of the minutes axis, with the decimals the axis needs: a pilot that took seconds gets
/// ticks that differ (0.005, 0.011 …), a study that took an hour whole minutes.
fn minutes_label(value: f64, longest: f64) -> String {
    let decimals = match longest {
        l if l < 0.1 => 3,
        l if l < 1.0 => 2,
        l if l < 10.0 => 1,
        _ => 0,
    };
    format!("{value:.decimals$}")
}

/// Minutes as a median with quartiles, to the hundredth below one minute.
fn fmt_minutes(median: f64, q1: f64, q3: f64) -> String {
    let d = if q3 < 1.0 { 2 } else { 1 };
    format!("{median:.d$} [{q1:.d$}, {q3:.d$}]")
}

fn fmt_estimate(e: &Option<results::Estimate>) -> String {
    match e {
        Some(e) => fmt_interval(e.mean, e.low, e.high),
        None => "—".into(),
    }
}

/// "mean [low, high]", each number with two decimals unless it is whole (turns, counts, ratings
/// that all agree read "8 [8, 8]", not "8.00 [8.00, 8.00]").
fn fmt_interval(mean: f64, low: f64, high: f64) -> String {
    let number = |v: f64| {
        if v.fract() == 0.0 && v.abs() < 1e15 {
            format!("{v:.0}")
        } else {
            format!("{v:.2}")
        }
    };
    format!("{} [{}, {}]", number(mean), number(low), number(high))
}

/// The results table, the rating-by-turn plots and the completion-time box plot.
fn result_views(
    arms: &[results::ArmResults],
    protocol: &crate::protocol::Protocol,
) -> (Vec<String>, Vec<ResultRow>, Vec<LinePlot>, Option<BoxPlot>) {
    let final_keys: Vec<String> = protocol
        .final_ratings()
        .iter()
        .map(|r| r.id.clone())
        .collect();
    let periodic_keys: Vec<String> = protocol
        .ratings
        .iter()
        .filter(|r| r.when == crate::protocol::RatingWhen::Periodic)
        .map(|r| r.id.clone())
        .collect();
    let mut headers: Vec<String> = final_keys.iter().map(|k| format!("{k} (final)")).collect();
    headers.extend(periodic_keys.iter().map(|k| format!("{k} (periodic)")));
    headers.extend(
        [
            "minutes, median [IQR]",
            "turns",
            "document words",
            "assistant tokens",
            "TTFT ms",
        ]
        .map(String::from),
    );
    let rows = arms
        .iter()
        .map(|a| {
            let mut cells: Vec<String> = final_keys
                .iter()
                .map(|k| fmt_estimate(a.finals.get(k).unwrap_or(&None)))
                .collect();
            cells.extend(
                periodic_keys
                    .iter()
                    .map(|k| fmt_estimate(a.periodic.get(k).unwrap_or(&None))),
            );
            cells.push(
                a.minutes
                    .as_ref()
                    .map_or("—".into(), |s| fmt_minutes(s.median, s.q1, s.q3)),
            );
            cells.extend([&a.turns, &a.words, &a.assistant_tokens, &a.ttft_ms].map(fmt_estimate));
            ResultRow {
                arm: a.arm.clone(),
                n: a.n,
                cells,
            }
        })
        .collect();
    let lines = protocol
        .ratings
        .iter()
        .filter(|r| r.when == crate::protocol::RatingWhen::Periodic)
        .filter_map(|spec| {
            let max_turn = arms
                .iter()
                .filter_map(|a| a.by_turn.get(&spec.id))
                .flat_map(|points| points.iter().map(|(t, _)| *t))
                .max()?;
            let step = spec.every_turns.unwrap_or(1).max(1) as i32;
            let x = |t: i32| {
                PLOT_MARGIN
                    + (PLOT_W - 2.0 * PLOT_MARGIN) * f64::from(t) / f64::from(max_turn.max(1))
            };
            let span = f64::from((spec.max - spec.min).max(1));
            let y = |v: f64| {
                PLOT_H
                    - PLOT_MARGIN
                    - (PLOT_H - 2.0 * PLOT_MARGIN) * (v - f64::from(spec.min)) / span
            };
            let series = arms
                .iter()
                .enumerate()
                .filter_map(|(i, a)| {
                    let points = a.by_turn.get(&spec.id)?;
                    let dots: Vec<(f64, f64)> =
                        points.iter().map(|(t, v)| (x(*t), y(*v))).collect();
                    Some(Series {
                        name: a.arm.clone(),
                        colour: COLOURS[i % COLOURS.len()],
                        points: dots
                            .iter()
                            .map(|(px, py)| format!("{px:.1},{py:.1}"))
                            .collect::<Vec<_>>()
                            .join(" "),
                        dots,
                    })
                })
                .collect();
            Some(LinePlot {
                key: spec.id.clone(),
                series,
                x_ticks: (1..=max_turn / step)
                    .map(|k| Tick {
                        at: x(k * step),
                        label: (k * step).to_string(),
                    })
                    .collect(),
                y_ticks: (spec.min..=spec.max)
                    .map(|v| Tick {
                        at: y(f64::from(v)),
                        label: v.to_string(),
                    })
                    .collect(),
            })
        })
        .collect();
    let longest = arms
        .iter()
        .filter_map(|a| a.minutes.as_ref().map(|s| s.max))
        .fold(0.0, f64::max);
    let boxes = (longest > 0.0).then(|| {
        let x = |m: f64| PLOT_MARGIN * 2.0 + (PLOT_W - 3.0 * PLOT_MARGIN) * m / longest;
        let rows: Vec<BoxRow> = arms
            .iter()
            .enumerate()
            .filter_map(|(i, a)| {
                let s = a.minutes.as_ref()?;
                Some(BoxRow {
                    name: a.arm.clone(),
                    colour: COLOURS[i % COLOURS.len()],
                    y: 20.0 + 36.0 * i as f64,
                    min: x(s.min),
                    q1: x(s.q1),
                    median: x(s.median),
                    q3: x(s.q3),
                    max: x(s.max),
                })
            })
            .collect();
        BoxPlot {
            height: 40.0 + 36.0 * arms.len() as f64,
            x_ticks: (0..=4)
                .map(|k| Tick {
                    at: x(longest * f64::from(k) / 4.0),
                    label: minutes_label(longest * f64::from(k) / 4.0, longest),
                })
                .collect(),
            rows,
        }
    });
    (headers, rows, lines, boxes)
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
async fn show_study(
    req: HttpRequest,
    state: web::Data<AppState>,
    slug: web::Path<String>,
    query: web::Query<StudyQuery>,
) -> Page {
    let who = researcher(&req, &state).await?;
    let (token, cookie) = csrf(&req, &state.console_key);
    let slug = slug.into_inner();
    let shown = query.sessions;
    let (study, version, arms, sessions, views) = state
        .db(move |conn| {
            let study = db::studies::find_by_slug(conn, &slug)?
                .ok_or_else(|| ApiError::NotFound(format!("there is no study {slug:?}")))?;
            let version = db::studies::current_version(conn, study.id)?;
            let (arms, sessions) = study_overview(conn, &version)?;
            let protocol = crate::protocol::Protocol::from_stored(&version.protocol_text)
                .map_err(|e| ApiError::Internal(e.to_string()))?;
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
                .map(|e| EvaluationView::of(&e))
                .transpose()?;
            Ok((
                study,
                version,
                arms,
                sessions,
                (result_views(&per_arm, &protocol), tasks, evaluation),
            ))
        })
        .await?;
    let ((result_headers, results, lines, boxes), tasks, evaluation) = views;
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
    })?;
    with_cookie(response, cookie)
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
        let messages = db::messages::list_for_session(conn, s.id)?;
        let document = db::revisions::latest(conn, s.id)?;
        let end = s.finished_at.unwrap_or(now);
        rows.push(SessionRow {
            id: s.public_id.clone(),
            participant: participant_label(&db::participants::get(conn, s.participant_id)?),
            arm: arm.map(|a| a.name.clone()).unwrap_or_else(|| "—".into()),
            state: s.state,
            turns: messages.iter().filter(|m| m.is_turn()).count(),
            words: document.map_or(0, |d| d.content.split_whitespace().count()),
            minutes: format!("{:.1}", (end - s.started_at).num_seconds() as f64 / 60.0),
            last_activity: export::timestamp(&s.last_activity_at),
        });
    }
    Ok((arm_rows, rows))
}

#[derive(Deserialize)]
struct ImportForm {
    protocol: String,
    csrf: String,
}

/// Imports a pasted protocol: checked like `collabllm protocol check`, stored (a changed
/// protocol becomes a new version), and its models started.
#[post("/console/studies/import")]
async fn import_protocol(
    req: HttpRequest,
    state: web::Data<AppState>,
    form: web::Form<ImportForm>,
) -> Page {
    let who = researcher(&req, &state).await?;
    let ImportForm {
        protocol,
        csrf: token,
    } = form.into_inner();
    check_csrf(&req, &state.console_key, &token)?;
    let path = std::path::Path::new("pasted protocol");
    let loaded =
        match crate::protocol::LoadedProtocol::from_text(path, protocol.clone(), &state.models_dir)
        {
            Ok(l) => l,
            Err(e) => {
                let problems = match e.diagnostics() {
                    [] => vec![e.to_string()],
                    d => d.iter().map(ToString::to_string).collect(),
                };
                let mut response = home(&req, &state, &who, &protocol, problems).await?;
                *response.status_mut() = StatusCode::UNPROCESSABLE_ENTITY;
                return Ok(response);
            }
        };
    let engines = state.engines.clone();
    let models_dir = state.models_dir.clone();
    let slug = loaded.protocol.study.slug.clone();
    // Remote backends spawn their requests on this runtime.
    let runtime = tokio::runtime::Handle::current();
    state
        .db(move |conn| {
            let _runtime = runtime.enter();
            engines.load_protocol(&loaded.protocol, &models_dir)?;
            db::studies::import(conn, &loaded)?;
            Ok(())
        })
        .await?;
    Ok(see_other(format!("/console/studies/{slug}")))
}

#[derive(Deserialize)]
struct StatusForm {
    status: String,
    csrf: String,
}

#[post("/console/studies/{slug}/status")]
async fn set_study_status(
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

#[derive(Template)]
#[template(path = "console_session.html")]
struct SessionPage<'a> {
    who: &'a str,
    csrf: &'a str,
    slug: String,
    session: db::models::Session,
    participant: String,
    arm: String,
    messages: Vec<db::models::Message>,
    /// Each revision with its change against the previous one.
    revisions: Vec<(db::models::DocumentRevision, Vec<results::Change>)>,
    /// Share of the final document typed by the participant and inserted from the assistant.
    typed_percent: String,
    inserted_percent: String,
    ratings: Vec<db::models::Rating>,
    answers: Vec<db::models::Answer>,
    events: Vec<db::models::Event>,
    /// Entries refused, moves to another browser, handovers.
    audit: Vec<db::audit::AuditEvent>,
    /// Replies of comparison turns and regenerations, with the participant's pick.
    candidates: Vec<db::models::Candidate>,
    rewards: Vec<RewardRow>,
}

/// A participant's pseudonym, marked when the participant was simulated.
fn participant_label(p: &db::models::Participant) -> String {
    if p.simulated {
        format!("{} (simulated)", p.pseudonym)
    } else {
        p.pseudonym.clone()
    }
}

/// A multiturn-aware reward of a reply, as `collabllm pairs` stored it.
struct RewardRow {
    /// The assistant message whose context was scored.
    turn: i32,
    /// "reply given" or the candidate's text.
    reply: String,
    mr: String,
    std: String,
    bleu: String,
    interactivity: String,
    tokens: String,
    settings: String,
}

impl RewardRow {
    fn of(reward: db::models::Reward, candidates: &[db::models::Candidate]) -> Self {
        let components: serde_json::Value =
            serde_json::from_str(&reward.components_json).unwrap_or_default();
        let metric = |key: &str| {
            components["means"][key]
                .as_f64()
                .map_or_else(|| "—".to_string(), |x| format!("{x:.3}"))
        };
        let reply = match reward.candidate_id {
            None => "reply given".to_string(),
            Some(id) => candidates
                .iter()
                .find(|c| c.id == id)
                .map_or_else(|| format!("candidate {id}"), |c| c.content.clone()),
        };
        Self {
            turn: reward.turn,
            reply,
            mr: format!("{:.3}", reward.mr),
            std: format!("{:.3}", reward.mr_std),
            bleu: metric("bleu"),
            interactivity: metric("interactivity"),
            tokens: metric("tokens_k"),
            settings: format!(
                "S={} w={} · {}",
                components["samples"],
                components["window"],
                reward.config_sha256.chars().take(8).collect::<String>()
            ),
        }
    }
}

#[get("/console/sessions/{id}")]
async fn show_session(req: HttpRequest, state: web::Data<AppState>, id: web::Path<String>) -> Page {
    let who = researcher(&req, &state).await?;
    let (token, _) = csrf(&req, &state.console_key);
    let id = id.into_inner();
    let page_data = state
        .db(move |conn| {
            let session = db::sessions::find_by_public_id(conn, &id)?
                .ok_or_else(|| ApiError::NotFound(format!("there is no session {id:?}")))?;
            let version = db::studies::version(conn, session.study_version_id)?;
            let study = db::studies::get(conn, version.study_id)?;
            let arm = db::studies::arms_of(conn, version.id)?
                .into_iter()
                .find(|a| Some(a.id) == session.arm_id)
                .map_or_else(|| "—".to_string(), |a| a.name);
            let participant = db::participants::get(conn, session.participant_id)?;
            let candidates = db::candidates::list_for_session(conn, session.id)?;
            let rewards: Vec<RewardRow> = db::rewards::list_for_session(conn, session.id)?
                .into_iter()
                .map(|r| RewardRow::of(r, &candidates))
                .collect();
            Ok((
                study.slug,
                participant_label(&participant),
                arm,
                db::messages::list_for_session(conn, session.id)?,
                db::revisions::list_for_session(conn, session.id)?,
                db::ratings::list_for_session(conn, session.id)?,
                db::answers::list_for_session(conn, session.id)?,
                db::events::list_for_session(conn, session.id)?,
                db::audit::list_for_session(conn, session.id)?,
                candidates,
                session,
                rewards,
            ))
        })
        .await?;
    let (
        slug,
        participant,
        arm,
        messages,
        revisions,
        ratings,
        answers,
        events,
        audit,
        candidates,
        session,
        rewards,
    ) = page_data;
    let history: Vec<(RevisionAuthor, String)> = revisions
        .iter()
        .map(|r| (r.author, r.content.clone()))
        .collect();
    let (changes, typed, inserted) = results::authorship(&history);
    let percent = |part: usize| {
        if typed + inserted == 0 {
            "—".to_string()
        } else {
            format!("{:.0}%", 100.0 * part as f64 / (typed + inserted) as f64)
        }
    };
    let (typed_percent, inserted_percent) = (percent(typed), percent(inserted));
    let revisions = revisions.into_iter().zip(changes).collect();
    page(&SessionPage {
        who: &who.name,
        csrf: &token,
        slug,
        session,
        participant,
        arm,
        messages,
        revisions,
        typed_percent,
        inserted_percent,
        ratings,
        answers,
        events,
        audit,
        candidates,
        rewards,
    })
}

/// A participant who lost their browser (and cannot prove who they are with Prolific's session
/// id) asked the researchers for help: the next entry with their participant id takes the session
/// over in a new browser. Recorded in the session's audit trail.
#[post("/console/sessions/{id}/handover")]
async fn allow_handover(
    req: HttpRequest,
    state: web::Data<AppState>,
    id: web::Path<String>,
    form: web::Form<CsrfForm>,
) -> Page {
    let who = researcher(&req, &state).await?;
    check_csrf(&req, &state.console_key, &form.csrf)?;
    let id = id.into_inner();
    let public_id = id.clone();
    state
        .db(move |conn| {
            let session = db::sessions::find_by_public_id(conn, &id)?
                .ok_or_else(|| ApiError::NotFound(format!("there is no session {id:?}")))?;
            db::write_transaction(conn, |conn| {
                db::sessions::allow_handover(conn, session.id)?;
                db::audit::record(
                    conn,
                    session.id,
                    "handover_allowed",
                    &serde_json::json!({"researcher": who.name}),
                )
            })?;
            Ok(())
        })
        .await?;
    Ok(see_other(format!("/console/sessions/{public_id}")))
}

#[get("/console/studies/{slug}/export/{file}")]
async fn download_export(
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
