//! Logging in and out. A failed login is slowed down per name and per address.

use actix_web::cookie::{time::Duration as CookieDuration, Cookie, SameSite};
use actix_web::http::StatusCode;
use actix_web::{get, post, web, HttpRequest};
use askama::Template;
use serde::Deserialize;

use super::{check_csrf, csrf, researcher, with_cookie, CsrfForm, Page};
use crate::db;
use crate::web::auth::{self, SESSION_COOKIE};
use crate::web::{render, see_other, ApiError, AppState};

#[derive(Template)]
#[template(path = "console_login.html")]
struct LoginPage<'a> {
    csrf: &'a str,
    error: &'a str,
}

#[get("/console/login")]
pub(crate) async fn show_login(req: HttpRequest, state: web::Data<AppState>) -> Page {
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
pub(crate) async fn submit_login(
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
            crate::web::limits::minutes(wait)
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

#[post("/console/logout")]
pub(crate) async fn submit_logout(
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
