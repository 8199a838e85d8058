//! Liveness: `/healthz` for load balancers and the start page for people.

use actix_web::{get, web, HttpResponse};
use askama::Template;
use serde_json::json;

use super::{render, ApiError, AppState};
use crate::db::{self, models::Study};

#[get("/healthz")]
async fn get_healthz(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let studies = state.db(|conn| Ok(db::studies::list(conn)?.len())).await?;
    Ok(HttpResponse::Ok().json(json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
        "database": "ok",
        "studies": studies,
    })))
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
