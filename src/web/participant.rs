//! The participant's pages: entry at `/s/{slug}` (with Prolific's query parameters), consent,
//! the workspace, and the end page. The session token travels only in an HttpOnly cookie scoped to
//! the study's path: the pages never carry it, and the websocket reads it from its upgrade request.

use actix_web::cookie::{time::Duration as CookieDuration, Cookie, SameSite};
use actix_web::{get, post, web, HttpRequest, HttpResponse};
use askama::Template;
use serde::Deserialize;

use super::limits::minutes;
use super::{render, see_other, ApiError, AppState};
use crate::db::models::Session;
use crate::db::vocab::{Outcome, SessionState};
use crate::protocol::{OutcomeSpec, Protocol};
use crate::study::frames::ClientFrame;
use crate::study::{Arrival, StudyError};

pub(super) use crate::study::SESSION_COOKIE as COOKIE;
/// How long a browser keeps its session cookie.
const COOKIE_DAYS: i64 = 14;

#[derive(Deserialize)]
struct EntryQuery {
    #[serde(rename = "PROLIFIC_PID")]
    prolific_pid: Option<String>,
    #[serde(rename = "SESSION_ID")]
    prolific_session_id: Option<String>,
}

/// Names the arm a researcher's preview shows (set by the console's preview link).
pub(super) const PREVIEW_ARM_COOKIE: &str = "collabllm_preview_arm";

/// Where a study's participant pages are under `root` (`""`, or the preview's root).
pub(super) fn participant_path(root: &str, slug: &str) -> String {
    format!("{root}/s/{slug}")
}

impl AppState {
    fn study_path(&self, slug: &str) -> String {
        participant_path(self.participant_root, slug)
    }

    /// Whether these are the pages of a researcher's preview.
    fn is_preview(&self) -> bool {
        self.participant_root == super::preview::ROOT
    }
}

/// The cookie that holds a participant's session token, for the study's pages at `path` only.
pub(super) fn session_cookie(req: &HttpRequest, path: &str, token: String) -> Cookie<'static> {
    Cookie::build(COOKIE, token)
        .path(path.to_string())
        .http_only(true)
        .same_site(SameSite::Lax)
        .secure(req.connection_info().scheme() == "https")
        .max_age(CookieDuration::days(COOKIE_DAYS))
        .finish()
}

/// Errors of participant pages: the same kinds and status codes as [`ApiError`], shown as a page
/// a person can read rather than as JSON.
#[derive(Debug)]
struct PageError(ApiError);

impl std::fmt::Display for PageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl<E: Into<ApiError>> From<E> for PageError {
    fn from(e: E) -> Self {
        PageError(e.into())
    }
}

impl actix_web::ResponseError for PageError {
    fn status_code(&self) -> actix_web::http::StatusCode {
        self.0.status_code()
    }

    fn error_response(&self) -> HttpResponse {
        let heading = match self.0 {
            ApiError::NotFound(_) => "Not found",
            ApiError::Unauthorized(_) => "Session expired",
            ApiError::Unavailable(_) => "Not available",
            ApiError::Conflict(_) => "Already open elsewhere",
            ApiError::Disabled(_) => "Not available",
            ApiError::TooManyRequests(_) => "Please wait",
            _ => "Something went wrong",
        };
        let message = match &self.0 {
            ApiError::Database(_) | ApiError::Internal(_) | ApiError::Engine(_) => {
                tracing::error!(error = %self.0, "participant page failed");
                "The study server has a problem. Your answers so far are saved; please try again in a \
                 few minutes."
                    .to_string()
            }
            other => other.to_string(),
        };
        let page = NoticePage {
            heading,
            message: &message,
        };
        match page.render() {
            Ok(html) => HttpResponse::build(self.status_code())
                .content_type("text/html; charset=utf-8")
                .body(html),
            Err(_) => HttpResponse::build(self.status_code()).body(message),
        }
    }
}

fn page<T: Template>(t: &T) -> Result<HttpResponse, PageError> {
    Ok(render(t)?)
}

impl From<StudyError> for ApiError {
    fn from(e: StudyError) -> Self {
        match e {
            StudyError::UnknownStudy(_) => ApiError::NotFound(e.to_string()),
            StudyError::NotAccepting | StudyError::Full => ApiError::Unavailable(e.to_string()),
            StudyError::OpenElsewhere { .. } => ApiError::Conflict(e.to_string()),
            StudyError::TooManyStarted => ApiError::TooManyRequests(e.to_string()),
            StudyError::ReplyTakenOver => ApiError::Conflict(e.to_string()),
            StudyError::Protocol(m) => ApiError::Internal(m),
            StudyError::Db(e) => ApiError::Database(e),
        }
    }
}

#[get("/s/{slug}")]
async fn enter_study(
    req: HttpRequest,
    state: web::Data<AppState>,
    slug: web::Path<String>,
    query: web::Query<EntryQuery>,
) -> Result<HttpResponse, PageError> {
    let slug = slug.into_inner();
    let token = req.cookie(COOKIE).map(|c| c.value().to_string());
    let address = state.limits.address(&req);
    let wait = state.limits.new_sessions.wait(&address);
    let query = query.into_inner();
    let arrival = Arrival {
        external_id: query.prolific_pid,
        resume_proof: query.prolific_session_id,
    };
    let entered = state
        .studio
        .enter(slug.clone(), arrival, token, wait.is_none())
        .await;
    let entry = match (entered, wait) {
        (Err(StudyError::TooManyStarted), Some(wait)) => {
            return Err(ApiError::TooManyRequests(format!(
                "Too many sessions were started from your network. Please try again {}.",
                minutes(wait)
            ))
            .into())
        }
        (entered, _) => entered?,
    };
    if entry.new_token.is_some() {
        state.limits.new_sessions.hit(&address);
    }
    // The marker tells the next page that a cookie was just set, so a browser that refuses
    // cookies gets an explanation instead of a redirect loop.
    let path = state.study_path(&slug);
    let mut response = see_other(format!("{path}/p?entered=1"));
    if let Some(token) = entry.new_token {
        response
            .add_cookie(&session_cookie(&req, &path, token))
            .map_err(|e| ApiError::Internal(e.to_string()))?;
    }
    Ok(response)
}

#[derive(Template)]
#[template(path = "consent.html")]
struct ConsentPage<'a> {
    title: &'a str,
    /// The study's participant path (the form posts under it).
    path: &'a str,
    preview: bool,
    /// The consent text's paragraphs, reflowed (see [`paragraphs`]).
    consent: Vec<String>,
}

#[derive(Template)]
#[template(path = "workspace.html")]
struct WorkspacePage<'a> {
    title: &'a str,
    slug: &'a str,
    /// The study's participant path (the socket and the closing beacon are under it).
    path: &'a str,
    preview: bool,
    /// The session's public id: names the browser's local drafts, opens nothing.
    session: &'a str,
}

#[derive(Template)]
#[template(path = "done.html")]
struct DonePage<'a> {
    title: &'a str,
    preview: bool,
    outcome: &'a OutcomeSpec,
    redirect: Option<String>,
}

#[derive(Template)]
#[template(path = "notice.html")]
struct NoticePage<'a> {
    heading: &'a str,
    message: &'a str,
}

#[derive(Deserialize)]
struct SessionQuery {
    entered: Option<String>,
}

#[get("/s/{slug}/p")]
async fn show_session(
    req: HttpRequest,
    state: web::Data<AppState>,
    slug: web::Path<String>,
    query: web::Query<SessionQuery>,
) -> Result<HttpResponse, PageError> {
    let slug = slug.into_inner();
    let Some(token) = req.cookie(COOKIE).map(|c| c.value().to_string()) else {
        if query.entered.is_some() {
            return page(&NoticePage {
                heading: "Cookies are needed",
                message:
                    "This study keeps your place with a cookie. Please allow cookies for this site \
                          and open the study link again.",
            });
        }
        return Ok(see_other(state.study_path(&slug)));
    };
    let Some((study, session)) = state.studio.session_for_token(slug.clone(), token).await? else {
        // The cookie names no session: the session moved to another browser (a new study link
        // there took it over). Starting a new one here would fork the participant.
        return page(&NoticePage {
            heading: "This session continues elsewhere",
            message:
                "Your session of this study was opened in another browser, so it is no longer \
                      available here. Please continue in that browser.",
        });
    };
    let protocol = state.studio.protocol_of(&session).await?;
    let path = state.study_path(&slug);
    let preview = state.is_preview();
    match session.state {
        SessionState::Consent => page(&ConsentPage {
            title: &study.title,
            path: &path,
            preview,
            consent: paragraphs(&protocol.consent.text),
        }),
        SessionState::Chatting
        | SessionState::Choosing
        | SessionState::Rating
        | SessionState::Final => page(&WorkspacePage {
            title: &study.title,
            slug: &slug,
            path: &path,
            preview,
            session: &session.public_id,
        }),
        SessionState::Abandoned => page(&NoticePage {
            heading: "This session has ended",
            message: "It was ended before it was completed, so there is no completion code.",
        }),
        SessionState::Declined | SessionState::Finished | SessionState::TimedOut => {
            let outcome = outcome_of(&protocol, &session)?;
            page(&DonePage {
                title: &study.title,
                preview,
                outcome,
                // A researcher's preview goes back to no study platform.
                redirect: outcome
                    .redirect
                    .as_ref()
                    .filter(|_| !preview)
                    .map(|r| r.replace("{code}", &outcome.code)),
            })
        }
    }
}

/// The protocol's text for how an ended session ended. A code is only ever shown for a session
/// whose outcome is recorded.
fn outcome_of<'p>(protocol: &'p Protocol, session: &Session) -> Result<&'p OutcomeSpec, ApiError> {
    match session.outcome {
        Some(Outcome::Completed) => Ok(&protocol.outcomes.completed),
        Some(Outcome::NoConsent) => Ok(&protocol.outcomes.no_consent),
        Some(Outcome::TimedOut) => Ok(&protocol.outcomes.timed_out),
        Some(Outcome::Abandoned) | None => Err(ApiError::Internal(format!(
            "session {} is {} without an outcome that has a code",
            session.public_id, session.state
        ))),
    }
}

#[derive(Deserialize)]
struct ConsentForm {
    decision: String,
}

#[post("/s/{slug}/consent")]
async fn submit_consent(
    req: HttpRequest,
    state: web::Data<AppState>,
    slug: web::Path<String>,
    form: web::Form<ConsentForm>,
) -> Result<HttpResponse, PageError> {
    let slug = slug.into_inner();
    let token = req
        .cookie(COOKIE)
        .map(|c| c.value().to_string())
        .ok_or_else(|| {
            ApiError::Unauthorized("your session has expired; open the study link again".into())
        })?;
    let (_, session) = state
        .studio
        .session_for_token(slug.clone(), token)
        .await?
        .ok_or_else(|| {
            ApiError::Unauthorized("your session has expired; open the study link again".into())
        })?;
    // Only a researcher's preview picks its arm.
    let arm = req
        .cookie(PREVIEW_ARM_COOKIE)
        .map(|c| c.value().to_string())
        .filter(|arm| state.is_preview() && !arm.is_empty());
    match form.decision.as_str() {
        "agree" => state.studio.agree_as(session.id, arm).await?,
        "decline" => state.studio.decline(session.id).await?,
        other => return Err(ApiError::BadRequest(format!("unknown decision {other:?}")).into()),
    };
    Ok(see_other(format!("{}/p", state.study_path(&slug))))
}

/// Largest beacon body: the page's unacknowledged frames as it closes.
const MAX_BEACON_BYTES: usize = 4 * 1024 * 1024;

/// Frames a page sends with `navigator.sendBeacon` as it is closed, so text typed just before is
/// not lost. The session is the cookie's; only this server's pages may send (the `Origin` check,
/// and the cookie is SameSite). Answers what a socket would: acks and errors.
#[post("/s/{slug}/frames")]
async fn submit_frames(
    req: HttpRequest,
    state: web::Data<AppState>,
    slug: web::Path<String>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    if !super::same_origin(&req) {
        return Err(ApiError::Unauthorized(
            "frames are accepted from this site's pages only".into(),
        ));
    }
    if body.len() > MAX_BEACON_BYTES {
        return Err(ApiError::BadRequest(format!(
            "a beacon may be at most {MAX_BEACON_BYTES} bytes"
        )));
    }
    let token = req
        .cookie(COOKIE)
        .map(|c| c.value().to_string())
        .ok_or_else(|| {
            ApiError::Unauthorized("this browser has no session of this study".into())
        })?;
    let frames: Vec<ClientFrame> = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("the body is not a list of frames: {e}")))?;
    let answers = state
        .studio
        .apply_beacon(slug.into_inner(), token, frames)
        .await?;
    Ok(HttpResponse::Ok().json(answers))
}

/// A protocol text's paragraphs (blank lines between them) with the file's hard line breaks
/// joined, so the page, not the protocol file, decides where lines wrap. A line that starts a
/// list item keeps its break.
fn paragraphs(text: &str) -> Vec<String> {
    let starts_item = |line: &str| {
        let line = line.trim_start();
        line.starts_with("- ")
            || line.starts_with("* ")
            || line.starts_with("• ")
            || line
                .split_once(". ")
                .is_some_and(|(n, _)| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()))
    };
    let mut out: Vec<String> = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        if line.trim().is_empty() {
            if !current.is_empty() {
                out.push(std::mem::take(&mut current));
            }
            continue;
        }
        if !current.is_empty() {
            current.push(if starts_item(line) { '\n' } else { ' ' });
        }
        current.push_str(line.trim());
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::paragraphs;

    #[test]
    fn hard_line_breaks_are_joined_and_paragraphs_and_list_items_kept() {
        let text = "You are invited to take part\nin a study.\n\nWe record:\n- your messages\n- your ratings\n1. first\n\n\n";
        assert_eq!(
            paragraphs(text),
            [
                "You are invited to take part in a study.",
                "We record:\n- your messages\n- your ratings\n1. first",
            ]
        );
    }
}
