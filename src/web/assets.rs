//! Static files, compiled into the binary so a deployment is one file.

use actix_web::http::header;
use actix_web::{get, web, HttpResponse};

/// (name, content type, content)
const ASSETS: &[(&str, &str, &str)] = &[
    (
        "app.css",
        "text/css; charset=utf-8",
        include_str!("../../static/app.css"),
    ),
    (
        "console.js",
        "text/javascript; charset=utf-8",
        include_str!("../../static/console.js"),
    ),
    (
        "favicon.svg",
        "image/svg+xml",
        include_str!("../../static/favicon.svg"),
    ),
    (
        "workspace.js",
        "text/javascript; charset=utf-8",
        include_str!("../../static/workspace.js"),
    ),
];

#[get("/static/{name}")]
async fn get_asset(name: web::Path<String>) -> HttpResponse {
    match ASSETS.iter().find(|(n, _, _)| *n == name.as_str()) {
        Some((_, content_type, body)) => HttpResponse::Ok()
            .content_type(*content_type)
            .insert_header((header::CACHE_CONTROL, "no-cache"))
            .body(*body),
        None => HttpResponse::NotFound().finish(),
    }
}
