//! A researcher's preview of a study as a participant sees it: consent, the workspace, replies
//! of the arm they pick, ratings and the end page, at `/console/preview/s/{slug}`. The participant
//! pages and websocket run unchanged over a scratch SQLite database of the preview's own, so a
//! preview records nothing in the study — no session, no draw against a quota, no row in an
//! export. The scratch database is made on the first preview and deleted with the server.

use std::rc::Rc;

use actix_web::body::MessageBody;
use actix_web::cookie::{Cookie, SameSite};
use actix_web::dev::{Extensions, ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::{get, web, HttpRequest};
use serde::Deserialize;

use super::console::{researcher, ConsoleError};
use super::participant::{participant_path, PREVIEW_ARM_COOKIE};
use super::{see_other, ApiError, AppState};
use crate::db;
use crate::protocol::{LoadedProtocol, Protocol};
use crate::study::Arrival;

/// Where the preview's participant routes live: under `/console`, so the researcher's login
/// cookie comes with every request.
pub const ROOT: &str = "/console/preview";

/// The preview's state, made on first use.
#[derive(Default)]
pub struct Preview {
    cell: tokio::sync::OnceCell<(web::Data<AppState>, tempfile::TempDir)>,
}

impl Preview {
    /// The participant side over the scratch database, with the study's engines and models.
    async fn state(&self, study: &AppState) -> Result<web::Data<AppState>, ApiError> {
        let (state, _) = self
            .cell
            .get_or_try_init(|| async {
                let (pool, dir) = web::block(|| -> Result<_, ApiError> {
                    let dir = tempfile::Builder::new()
                        .prefix("collabllm-preview-")
                        .tempdir()
                        .map_err(|e| {
                            ApiError::Internal(format!("cannot make the preview's database: {e}"))
                        })?;
                    let url = format!("sqlite://{}", dir.path().join("preview.db").display());
                    Ok((db::open(&url, 4)?, dir))
                })
                .await??;
                let mut state =
                    AppState::new(pool, study.engines.clone(), study.models_dir.clone())?;
                state.participant_root = ROOT;
                Ok::<_, ApiError>((web::Data::new(state), dir))
            })
            .await?;
        Ok(state.clone())
    }
}

/// In front of the preview's participant routes: only a logged-in researcher gets through, and
/// the handlers behind it see the preview's state instead of the study's.
pub async fn guard(
    mut req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let study = req
        .app_data::<web::Data<AppState>>()
        .cloned()
        .ok_or_else(|| ApiError::Internal("the server has no state".into()))?;
    researcher(req.request(), &study).await?;
    let preview = study.preview.state(&study).await?;
    let mut data = Extensions::new();
    data.insert(preview);
    req.add_data_container(Rc::new(data));
    next.call(req).await
}

#[derive(Deserialize)]
struct PreviewQuery {
    /// The arm whose replies the preview shows; by default the next balanced draw.
    arm: Option<String>,
}

/// Starts a new preview session of the study's current protocol and opens it.
#[get("/console/studies/{slug}/preview")]
async fn start_preview(
    req: HttpRequest,
    state: web::Data<AppState>,
    slug: web::Path<String>,
    query: web::Query<PreviewQuery>,
) -> Result<actix_web::HttpResponse, ConsoleError> {
    researcher(&req, &state).await?;
    let slug = slug.into_inner();
    let arm = query.into_inner().arm.filter(|a| !a.is_empty());
    let wanted = slug.clone();
    let loaded = state
        .db(move |conn| {
            let study = db::studies::find_by_slug(conn, &wanted)?
                .ok_or_else(|| ApiError::NotFound(format!("there is no study {wanted:?}")))?;
            let version = db::studies::current_version(conn, study.id)?;
            let protocol = Protocol::from_stored(&version.protocol_text)
                .map_err(|e| ApiError::Internal(e.to_string()))?;
            Ok(LoadedProtocol {
                protocol,
                text: version.protocol_text,
                sha256: version.protocol_sha256,
                source: version.source_path.into(),
            })
        })
        .await?;
    if let Some(arm) = &arm {
        if !loaded.protocol.arms.iter().any(|a| &a.id == arm) {
            return Err(ApiError::NotFound(format!("the study has no arm {arm:?}")).into());
        }
    }
    let preview = state.preview.state(&state).await?;
    preview
        .db(move |conn| {
            let imported = db::studies::import(conn, &loaded)?;
            db::studies::set_status(conn, imported.study.id, "active")?;
            Ok(())
        })
        .await?;
    let entry = preview
        .studio
        .enter(slug.clone(), Arrival::default(), None, true)
        .await
        .map_err(ApiError::from)?;
    let token = entry
        .new_token
        .ok_or_else(|| ApiError::Internal("a new preview session has no token".into()))?;
    let path = participant_path(ROOT, &slug);
    let mut response = see_other(format!("{path}/p"));
    let arm_cookie = Cookie::build(PREVIEW_ARM_COOKIE, arm.clone().unwrap_or_default())
        .path(path.clone())
        .http_only(true)
        .same_site(SameSite::Strict)
        .finish();
    for cookie in [
        super::participant::session_cookie(&req, &path, token),
        arm_cookie,
    ] {
        response
            .add_cookie(&cookie)
            .map_err(|e| ApiError::Internal(e.to_string()))?;
    }
    Ok(response)
}
