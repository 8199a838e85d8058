//! The researcher console under `/console`: login, studies with their arms and progress, the
//! sessions of a study as they run, a session's transcript and document history, study status,
//! and CSV downloads. Every route but the login page needs a researcher's session cookie; every
//! form carries a CSRF token. One module per page; what they share is here.

mod home;
mod login;
mod session;
mod study;

use actix_web::cookie::{Cookie, SameSite};
use actix_web::http::{header, StatusCode};
use actix_web::{HttpRequest, HttpResponse, ResponseError};
use askama::Template;
use serde::Deserialize;

pub(super) use home::{import_protocol, show_console};
pub(super) use login::{show_login, submit_login, submit_logout};
pub(super) use session::{allow_handover, show_session};
pub(super) use study::{download_export, set_study_status, show_study};

use super::auth::{ConsoleKey, CSRF_COOKIE, SESSION_COOKIE};
use super::{render, ApiError, AppState};
use crate::db;
use crate::db::researchers::Researcher;

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

/// A form that carries nothing but its CSRF token.
#[derive(Deserialize)]
struct CsrfForm {
    csrf: String,
}

/// A participant's pseudonym, marked when the participant was simulated.
fn participant_label(p: &db::models::Participant) -> String {
    if p.simulated {
        format!("{} (simulated)", p.pseudonym)
    } else {
        p.pseudonym.clone()
    }
}
