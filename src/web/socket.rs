//! The participant's websocket (`/s/{slug}/ws`): reads frames, hands them to the study's
//! connection, writes its answers and the session's broadcasts. The session is the one of the
//! HttpOnly cookie sent with the upgrade request (a token in `hello` alone opens nothing), and only
//! pages of this server may open the socket. Bad frames get an `error` frame; the connection stays
//! open, except after a frame too large to read, which is answered and then closed.

use actix_web::{get, web, HttpRequest, HttpResponse};
use actix_ws::{AggregatedMessage, CloseCode, CloseReason, ProtocolError};

use super::participant::COOKIE;
use super::AppState;
use crate::metrics::metrics;
use crate::study::frames::ServerFrame;
use crate::study::Connection;

/// Largest websocket message accepted at all. The protocol's own limits (message and document
/// sizes) are far lower and answered with an `error` frame; this bound only protects memory.
const MAX_WS_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

#[get("/s/{slug}/ws")]
async fn connect_socket(
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<AppState>,
    slug: web::Path<String>,
) -> Result<HttpResponse, actix_web::Error> {
    // A page on another site must not open a participant's socket with their cookie.
    if !super::same_origin(&req) {
        return Ok(HttpResponse::Forbidden().body("websockets are open to this site's pages only"));
    }
    let token = req.cookie(COOKIE).map(|c| c.value().to_string());
    let (response, session, stream) = actix_ws::handle(&req, body)?;
    let stream = stream
        .max_frame_size(MAX_WS_MESSAGE_BYTES)
        .aggregate_continuations()
        .max_continuation_size(MAX_WS_MESSAGE_BYTES);
    let connection = Connection::new(state.studio.clone(), slug.into_inner(), token);
    actix_web::rt::spawn(run(connection, session, stream));
    Ok(response)
}

async fn run(
    mut connection: Connection,
    mut session: actix_ws::Session,
    mut stream: actix_ws::AggregatedMessageStream,
) {
    let mut close = None;
    loop {
        let outgoing = tokio::select! {
            message = stream.recv() => match message {
                Some(Ok(AggregatedMessage::Text(text))) => connection.handle_text(&text).await,
                Some(Ok(AggregatedMessage::Binary(_))) => {
                    metrics().frame("binary");
                    metrics().refusal("binary", "bad_frame");
                    vec![ServerFrame::error(
                        "bad_frame",
                        "frames are JSON text, not binary",
                        None,
                    )]
                }
                Some(Ok(AggregatedMessage::Ping(bytes))) => {
                    if session.pong(&bytes).await.is_err() {
                        return;
                    }
                    Vec::new()
                }
                Some(Ok(AggregatedMessage::Pong(_))) => Vec::new(),
                Some(Ok(AggregatedMessage::Close(_))) | None => break,
                Some(Err(ProtocolError::Overflow)) => {
                    metrics().frame("oversized");
                    metrics().refusal("oversized", "too_large");
                    // The rest of the frame cannot be skipped: say why, then close.
                    close = Some(CloseReason {
                        code: CloseCode::Size,
                        description: Some("frame too large".into()),
                    });
                    vec![ServerFrame::error(
                        "too_large",
                        format!(
                            "a frame may be at most {MAX_WS_MESSAGE_BYTES} bytes; this one was \
                             larger, so the connection is closed (reconnect to go on)"
                        ),
                        None,
                    )]
                }
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "websocket protocol error");
                    break;
                }
            },
            frame = connection.next_event() => vec![frame],
        };
        for frame in outgoing {
            let json = serde_json::to_string(&frame).expect("frames serialise");
            if session.text(json).await.is_err() {
                return;
            }
        }
        if close.is_some() {
            break;
        }
        if connection.superseded() {
            close = Some(CloseReason {
                code: CloseCode::Policy,
                description: Some("the session was opened in another tab or window".into()),
            });
            break;
        }
    }
    let _ = session.close(close).await;
}
