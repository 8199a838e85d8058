//! The console's front page: the studies with their latest version and sessions, the engines,
//! and the form that imports a pasted protocol.

use actix_web::http::StatusCode;
use actix_web::{get, post, web, HttpRequest};
use askama::Template;
use serde::Deserialize;

use super::{check_csrf, csrf, researcher, with_cookie, Page};
use crate::db;
use crate::db::researchers::Researcher;
use crate::engine::EngineStatus;
use crate::web::{render, see_other, AppState};

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
pub(crate) async fn show_console(req: HttpRequest, state: web::Data<AppState>) -> Page {
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
    let studies: Vec<StudyRow> = state
        .db(|conn| Ok(db::studies::summaries(conn)?))
        .await?
        .into_iter()
        .map(|s| StudyRow {
            slug: s.study.slug,
            title: s.study.title,
            status: s.study.status,
            version: s.version,
            sessions: s.sessions,
        })
        .collect();
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

#[derive(Deserialize)]
struct ImportForm {
    protocol: String,
    csrf: String,
}

/// Imports a pasted protocol: checked like `collabllm protocol check`, stored (a changed
/// protocol becomes a new version), and its models started.
#[post("/console/studies/import")]
pub(crate) async fn import_protocol(
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
