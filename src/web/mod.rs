//! The HTTP edge (actix-web): routes, pages and their errors. Handlers are thin: they parse,
//! call `db`/`engine`, and shape the response.

mod assets;
pub mod auth;
mod console;
mod error;
mod health;
pub mod limits;
pub mod openai;
mod participant;
mod preview;
mod socket;

use actix_web::http::header;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use askama::Template;

pub use error::ApiError;

use crate::db::{DbConn, DbPool};
use crate::engine::Engines;
use crate::study::Studio;
use std::sync::Arc;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub pool: DbPool,
    pub engines: Engines,
    pub studio: Arc<Studio>,
    /// Signs console sessions and CSRF tokens.
    pub console_key: auth::ConsoleKey,
    /// Where protocols imported from the console find their model files.
    pub models_dir: std::path::PathBuf,
    /// What one client may make the server do.
    pub limits: Arc<limits::Limits>,
    /// sha256 of the `/v1` API keys given at start (`COLLABLLM_API_KEYS`); keys made with
    /// `collabllm key add` are in the database.
    pub api_keys: Arc<Vec<String>>,
    /// Where the participant pages of this state are: `""` (`/s/{slug}`), or the preview's root.
    participant_root: &'static str,
    /// Researchers' previews of studies, over a scratch database of their own.
    preview: Arc<preview::Preview>,
}

impl AppState {
    /// The state of a server over `pool` and `engines`.
    pub fn new(
        pool: DbPool,
        engines: Engines,
        models_dir: std::path::PathBuf,
    ) -> Result<Self, crate::db::DbError> {
        let studio = Studio::new(pool.clone(), engines.clone())?;
        let mut conn = crate::db::connection(&pool)?;
        let key = crate::db::secrets::get_or_create(&mut conn, "console-session-key", || {
            hex::encode(rand::random::<[u8; 32]>())
        })?;
        Ok(Self {
            pool,
            engines,
            studio,
            console_key: auth::ConsoleKey::new(&key),
            models_dir,
            limits: Arc::default(),
            api_keys: Arc::default(),
            participant_root: "",
            preview: Arc::default(),
        })
    }
}

impl AppState {
    /// Runs blocking database work off the async threads.
    pub async fn db<T, F>(&self, work: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: FnOnce(&mut DbConn) -> Result<T, ApiError> + Send + 'static,
    {
        crate::db::run_blocking(&self.pool, work).await
    }
}

/// Registers every route, with the security headers; used by `serve` and by the tests'
/// in-process server.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.app_data(json_config())
        .app_data(web::PayloadConfig::new(MAX_JSON_BYTES))
        .service(
            web::scope("")
                .wrap(security_headers())
                .service(
                    web::scope(preview::ROOT)
                        .wrap(actix_web::middleware::from_fn(preview::guard))
                        .service(participant::enter_study)
                        .service(participant::show_session)
                        .service(participant::submit_consent)
                        .service(participant::submit_frames)
                        .service(socket::connect_socket),
                )
                .service(health::get_healthz)
                .service(health::get_metrics)
                .service(health::get_home)
                .service(openai::list_models)
                .service(openai::create_chat_completion)
                .service(assets::get_asset)
                .service(participant::enter_study)
                .service(participant::show_session)
                .service(participant::submit_consent)
                .service(participant::submit_frames)
                .service(socket::connect_socket)
                .service(console::show_login)
                .service(console::submit_login)
                .service(console::submit_logout)
                .service(console::show_console)
                .service(console::show_study)
                .service(console::set_study_status)
                .service(console::import_protocol)
                .service(console::show_session)
                .service(console::allow_handover)
                .service(preview::start_preview)
                .service(console::download_export),
        );
}

/// Largest JSON body accepted (a long conversation sent to `/v1`).
const MAX_JSON_BYTES: usize = 4 * 1024 * 1024;

/// JSON bodies that do not parse get the same error shape as everything else.
fn json_config() -> web::JsonConfig {
    web::JsonConfig::default()
        .limit(MAX_JSON_BYTES)
        .error_handler(|err, _req| ApiError::BadRequest(format!("invalid JSON body: {err}")).into())
}

/// Whether the request comes from a page of this server (or from a client that is no browser and
/// sends no `Origin`).
pub(crate) fn same_origin(req: &HttpRequest) -> bool {
    let Some(origin) = req.headers().get(header::ORIGIN) else {
        return true;
    };
    let Ok(origin) = origin.to_str() else {
        return false;
    };
    let host = origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"));
    host == Some(req.connection_info().host())
}

/// A redirect that makes the browser GET `location`.
pub fn see_other(location: String) -> HttpResponse {
    HttpResponse::SeeOther()
        .insert_header((actix_web::http::header::LOCATION, location))
        .finish()
}

/// Renders a template into an HTML response.
pub fn render<T: Template>(page: &T) -> Result<HttpResponse, ApiError> {
    let html = page
        .render()
        .map_err(|e| ApiError::Internal(format!("template: {e}")))?;
    Ok(HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .body(html))
}

/// Headers every response carries: no inline scripts or styles, no framing, no sniffing, no
/// referrer leaking a participant's URL, and no copy of a page in a cache (pages carry a
/// participant's session or the console; static files set their own caching).
fn security_headers() -> actix_web::middleware::DefaultHeaders {
    actix_web::middleware::DefaultHeaders::new()
        .add((
            "Content-Security-Policy",
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             connect-src 'self'; frame-ancestors 'none'; form-action 'self'",
        ))
        .add(("X-Content-Type-Options", "nosniff"))
        .add(("Referrer-Policy", "no-referrer"))
        .add(("X-Frame-Options", "DENY"))
        .add(("Cache-Control", "no-store"))
}

/// The routes over `state`, bound to `addr` (port 0: a free one); the caller runs the returned
/// server and handles Ctrl-C and SIGTERM (`serve` does; `simulate`'s own server on a loopback
/// port leaves them to its command).
pub fn bind(
    state: AppState,
    addr: std::net::SocketAddr,
    workers: Option<usize>,
) -> std::io::Result<(std::net::SocketAddr, actix_web::dev::Server)> {
    let data = web::Data::new(state);
    let mut server = HttpServer::new(move || App::new().app_data(data.clone()).configure(routes))
        .disable_signals()
        .bind(addr)?;
    if let Some(n) = workers {
        server = server.workers(n);
    }
    let bound = server.addrs()[0];
    Ok((bound, server.run()))
}

/// How often idle sessions are looked for and ended as timed out.
pub const IDLE_SWEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

/// How long a stopping server waits for the replies in flight before it closes the sockets.
const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Serves until the process is stopped. On Ctrl-C or SIGTERM it stops taking connections, lets
/// the replies in flight finish and be stored (new messages are answered `unavailable`, which the
/// page sends again once a node serves), then closes.
pub async fn serve(
    state: AppState,
    addr: std::net::SocketAddr,
    workers: Option<usize>,
) -> std::io::Result<()> {
    let studio = state.studio.clone();
    let (bound, server) = bind(state, addr, workers)?;
    tracing::info!(%bound, "listening");
    studio.run_cluster(IDLE_SWEEP_INTERVAL);
    let handle = server.handle();
    let mut server = std::pin::pin!(server);
    tokio::select! {
        result = &mut server => return result,
        signal = stop_signal() => signal?,
    }
    tracing::info!("stopping: the replies in flight finish first");
    // The server goes on running (its handle's commands are carried out by it) while it drains.
    let stopping = async {
        handle.pause().await;
        let left = studio.drain(DRAIN_TIMEOUT).await;
        if left > 0 {
            tracing::warn!(
                left,
                "replies still in flight are generated again by the next node"
            );
        }
        handle.stop(false).await;
    };
    tokio::join!(server, stopping).0
}

/// Ctrl-C or SIGTERM.
async fn stop_signal() -> std::io::Result<()> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result,
        _ = terminate.recv() => Ok(()),
    }
}
