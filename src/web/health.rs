//! Liveness and monitoring: `/healthz` for load balancers, `/metrics` for Prometheus (with a
//! `/v1` key: it names arms and engines), and the start page for people.

use actix_web::{get, web, HttpRequest, HttpResponse};
use askama::Template;
use serde_json::json;

use super::{render, ApiError, AppState};
use crate::db::vocab::SessionState;
use crate::db::{self, models::Study};

/// 200 with `"status": "ok"` when the database answers and every engine runs; 503 with
/// `"degraded"` when an engine has stopped, so a load balancer takes the node out. Engines that
/// failed and were restarted say so (`restarts`, `last_failure`).
#[get("/healthz")]
async fn get_healthz(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let studies = state.db(|conn| Ok(db::studies::list(conn)?.len())).await?;
    let engines = state.engines.statuses();
    let healthy = engines.iter().all(|e| e.running);
    let (node, relay, peers) = state.studio.node();
    let body = json!({
        "status": if healthy { "ok" } else { "degraded" },
        "version": env!("CARGO_PKG_VERSION"),
        "node": node,
        "relay": relay,
        "peers": peers,
        "relaying": state.studio.relaying(),
        "database": "ok",
        "studies": studies,
        "engines": engines.iter().map(|e| json!({
            "model": e.model,
            "backend": e.backend,
            "running": e.running,
            "restarts": e.restarts,
            "last_failure": e.last_failure,
            "queued": e.queued,
            "active": e.active,
            "slots": e.slots,
        })).collect::<Vec<_>>(),
    });
    Ok(if healthy {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    })
}

/// Prometheus's text format (`text/plain; version=0.0.4`) of [`crate::metrics`], with the
/// sessions by state and the engines read now.
#[get("/metrics")]
async fn get_metrics(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    super::openai::authorise(&req, &state).await?;
    let counts = state
        .db(|conn| Ok(db::sessions::count_by_state(conn)?))
        .await?;
    // Every state, with 0 where no session is in it.
    let sessions: Vec<(&str, i64)> = SessionState::ALL
        .iter()
        .map(|state| {
            let n = counts
                .iter()
                .filter(|(s, _)| s == state)
                .map(|(_, n)| n)
                .sum();
            (state.as_str(), n)
        })
        .collect();
    let text = crate::metrics::metrics().render(&sessions, &state.engines.statuses());
    Ok(HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(text))
}

#[derive(Template)]
#[template(path = "home.html")]
struct HomePage {
    version: &'static str,
    studies: Vec<Study>,
}

#[get("/")]
async fn get_home(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let studies = state.db(|conn| Ok(db::studies::list(conn)?)).await?;
    render(&HomePage {
        version: env!("CARGO_PKG_VERSION"),
        studies,
    })
}
