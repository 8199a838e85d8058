//! The live session behind a participant's socket: frames in, frames out. Each session has one
//! gate (frames are applied one at a time), one owner (the connection that said `hello` last: a
//! second tab takes the session over and the first is told so and closed, so two tabs never write
//! with the same frame numbers), and one broadcast channel (the streamed reply). A frame is
//! applied in three steps: a [`decide::Snapshot`] of the session is loaded, [`decide::decide`]
//! (pure) says what the frame may do, and the command's handler stores it. Replies are generated
//! by a task of their own ([`reply`]), so a refresh or a dropped socket does not stop them: they
//! complete, are stored, and show on reconnect. Live sessions without a socket or a reply are
//! dropped from memory.

mod cluster;
mod decide;
mod handlers;
mod reply;
mod view;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{broadcast, watch};

pub(super) use cluster::Node;

use super::frames::{ClientFrame, ServerFrame};
use super::{Studio, StudyError};
use crate::db::vocab::SessionState;
use crate::db::{self, DbError};
use crate::throttle::Throttle;

/// Frames a slow socket may fall behind before it is sent the full state instead.
const BROADCAST_CAPACITY: usize = 1024;
/// Document saves and browser events a session may send per minute (the page saves at most
/// every 0.8 s while typing).
const MAX_DOC_UPDATES_PER_MINUTE: usize = 90;
const MAX_EVENTS_PER_MINUTE: usize = 120;
/// Frames one beacon may carry (a page's unacknowledged frames as it closes).
const MAX_BEACON_FRAMES: usize = 64;

/// Numbers the connections of this process, so a session knows which one owns it.
static NEXT_CONNECTION: AtomicU64 = AtomicU64::new(1);

pub(super) struct LiveSession {
    events: broadcast::Sender<ServerFrame>,
    /// Serialises the application of frames.
    gate: tokio::sync::Mutex<()>,
    reply: Mutex<Option<reply::Reply>>,
    /// The connection that may write: the last one that said `hello`.
    owner: watch::Sender<u64>,
    /// The highest owner epoch (`sessions.owner_epoch`) seen here, of this node or another.
    owner_epoch: std::sync::atomic::AtomicI64,
    doc_updates: Throttle,
    browser_events: Throttle,
}

/// The sessions held in memory, by session id. A session is held while a socket or a reply in
/// flight holds it; the others are evicted whenever the registry is used.
#[derive(Default)]
pub(super) struct Registry(Mutex<HashMap<i64, Arc<LiveSession>>>);

impl Registry {
    fn get(&self, session_id: i64) -> Arc<LiveSession> {
        let mut live = self.0.lock().expect("live lock");
        evict(&mut live);
        live.entry(session_id)
            .or_insert_with(|| {
                Arc::new(LiveSession {
                    events: broadcast::channel(BROADCAST_CAPACITY).0,
                    gate: tokio::sync::Mutex::new(()),
                    reply: Mutex::new(None),
                    owner: watch::channel(0).0,
                    owner_epoch: Default::default(),
                    doc_updates: Throttle::new(MAX_DOC_UPDATES_PER_MINUTE, Duration::from_secs(60)),
                    browser_events: Throttle::new(MAX_EVENTS_PER_MINUTE, Duration::from_secs(60)),
                })
            })
            .clone()
    }

    /// The session if it is held in memory (a socket or a reply of this node has it).
    fn existing(&self, session_id: i64) -> Option<Arc<LiveSession>> {
        let mut live = self.0.lock().expect("live lock");
        evict(&mut live);
        live.get(&session_id).cloned()
    }

    /// Every session held in memory.
    fn held(&self) -> Vec<(i64, Arc<LiveSession>)> {
        let mut live = self.0.lock().expect("live lock");
        evict(&mut live);
        live.iter().map(|(id, s)| (*id, s.clone())).collect()
    }

    fn len(&self) -> usize {
        let mut live = self.0.lock().expect("live lock");
        evict(&mut live);
        live.len()
    }
}

/// Drops the live sessions that only the registry still holds (no socket, no reply in flight).
fn evict(live: &mut HashMap<i64, Arc<LiveSession>>) {
    live.retain(|_, session| Arc::strong_count(session) > 1);
}

/// Why a frame was refused: an error code for the client and a sentence for the participant.
enum Refusal {
    Frame(&'static str, String),
    Study(StudyError),
}

impl From<diesel::result::Error> for Refusal {
    fn from(e: diesel::result::Error) -> Self {
        Refusal::Study(e.into())
    }
}

impl From<DbError> for Refusal {
    fn from(e: DbError) -> Self {
        Refusal::Study(e.into())
    }
}

impl From<StudyError> for Refusal {
    fn from(e: StudyError) -> Self {
        Refusal::Study(e)
    }
}

fn refuse<T>(code: &'static str, message: impl Into<String>) -> Result<T, Refusal> {
    Err(Refusal::Frame(code, message.into()))
}

/// One socket of a participant.
pub struct Connection {
    studio: Arc<Studio>,
    slug: String,
    /// The session token of the browser's cookie, sent with the upgrade request.
    cookie_token: Option<String>,
    id: u64,
    bound: Option<Bound>,
    /// Another connection took the session over; this one is closed.
    superseded: bool,
}

struct Bound {
    session_id: i64,
    live: Arc<LiveSession>,
    events: broadcast::Receiver<ServerFrame>,
    owner: watch::Receiver<u64>,
    /// The owner epoch this connection's hello took.
    epoch: i64,
}

impl Connection {
    pub fn new(studio: Arc<Studio>, slug: String, cookie_token: Option<String>) -> Self {
        Self {
            studio,
            slug,
            cookie_token,
            id: NEXT_CONNECTION.fetch_add(1, Ordering::Relaxed),
            bound: None,
            superseded: false,
        }
    }

    /// Whether another connection took the session over (then this one closes).
    pub fn superseded(&self) -> bool {
        self.superseded
    }

    /// Handles one text frame; returns what to send back to this socket. Every frame and every
    /// error frame in answer is counted for `/metrics`.
    pub async fn handle_text(&mut self, text: &str) -> Vec<ServerFrame> {
        let frame = serde_json::from_str::<ClientFrame>(text);
        let kind = frame.as_ref().map_or("invalid", ClientFrame::kind);
        let answer = match frame {
            // PostgreSQL cannot store it, and no text a person writes holds it.
            Ok(frame) if holds_nul(text) => vec![ServerFrame::error(
                "bad_frame",
                "the frame's text contains the NUL character (\\u0000)",
                frame.client_seq(),
            )],
            Ok(frame) => self.handle_frame(frame).await,
            Err(e) => vec![ServerFrame::error(
                "bad_frame",
                format!("the frame is not a valid message: {e}"),
                None,
            )],
        };
        let metrics = crate::metrics::metrics();
        metrics.frame(kind);
        for frame in &answer {
            if let ServerFrame::Error { code, .. } = frame {
                metrics.refusal(kind, code);
            }
        }
        answer
    }

    async fn handle_frame(&mut self, frame: ClientFrame) -> Vec<ServerFrame> {
        let client_seq = frame.client_seq();
        if let ClientFrame::Hello { session_token } = frame {
            return self.hello(session_token).await;
        }
        let Some(bound) = &self.bound else {
            return vec![ServerFrame::error(
                "not_authenticated",
                "send hello first",
                client_seq,
            )];
        };
        if *bound.owner.borrow() != self.id {
            // Not applied, so the client may send it again under a new number once it owns the
            // session again.
            return vec![ServerFrame::error(
                "taken_over",
                "this session is open in another tab or window",
                client_seq,
            )];
        }
        let studio = self.studio.clone();
        let live = bound.live.clone();
        let (session_id, epoch) = (bound.session_id, bound.epoch);
        let _turn = live.gate.lock().await;
        match studio.apply(session_id, &live, frame, Some(epoch)).await {
            Ok(frames) => frames,
            Err(Refusal::Frame(code, message)) => {
                vec![ServerFrame::error(code, message, client_seq)]
            }
            Err(Refusal::Study(e)) => {
                tracing::error!(session_id, error = %e, "frame failed");
                // A frame is stored in one transaction with its number, so the client keeps it
                // and sends it again: stored once when the database is back, acknowledged then.
                vec![ServerFrame::error(
                    "unavailable",
                    "the server could not save this right now; it will be sent again",
                    client_seq,
                )]
            }
        }
    }

    /// The next frame broadcast to the session (a streamed token, a rating request, …), or the
    /// news that another connection took the session over. Waits forever while the socket has
    /// not said hello, and after it was taken over.
    pub async fn next_event(&mut self) -> ServerFrame {
        let Some(bound) = self.bound.as_mut().filter(|_| !self.superseded) else {
            return std::future::pending().await;
        };
        let received = tokio::select! {
            received = bound.events.recv() => received,
            changed = bound.owner.changed() => {
                if changed.is_err() || *bound.owner.borrow_and_update() != self.id {
                    self.superseded = true;
                    return ServerFrame::error(
                        "taken_over",
                        "this session was opened in another tab or window; continue there, or \
                         choose \"Use here\" to continue in this one",
                        None,
                    );
                }
                return std::future::pending().await;
            }
        };
        match received {
            Ok(frame) => frame,
            Err(broadcast::error::RecvError::Lagged(_)) => {
                let session_id = bound.session_id;
                let live = bound.live.clone();
                match self.studio.state_frame(session_id, &live).await {
                    Ok(f) => f,
                    Err(e) => ServerFrame::error("unavailable", e.to_string(), None),
                }
            }
            Err(broadcast::error::RecvError::Closed) => std::future::pending().await,
        }
    }

    async fn hello(&mut self, frame_token: Option<String>) -> Vec<ServerFrame> {
        let Some(token) = self.cookie_token.clone() else {
            return vec![ServerFrame::error(
                "unauthorized",
                "this browser has no session of this study; open the study link again",
                None,
            )];
        };
        if frame_token.is_some_and(|t| t != token) {
            return vec![ServerFrame::error(
                "wrong_session",
                "the session token does not match this browser's session",
                None,
            )];
        }
        let found = self
            .studio
            .session_for_token(self.slug.clone(), token)
            .await;
        let session = match found {
            Ok(Some((_, session))) => session,
            Ok(None) => {
                return vec![ServerFrame::error(
                    "unauthorized",
                    "this session token is not valid for this study; reload the study link",
                    None,
                )]
            }
            Err(e) => return vec![ServerFrame::error("unavailable", e.to_string(), None)],
        };
        if let Some(bound) = &self.bound {
            if bound.session_id != session.id {
                return vec![ServerFrame::error(
                    "wrong_session",
                    "this connection belongs to another session",
                    None,
                )];
            }
        }
        if session.state == SessionState::Consent {
            return vec![ServerFrame::error(
                "not_consented",
                "give or refuse consent first",
                None,
            )];
        }
        let live = self.studio.live(session.id);
        let events = live.events.subscribe();
        // This connection owns the session from now on; any other, on any node, is told so.
        let epoch = match self.studio.claim_session(session.id).await {
            Ok(epoch) => epoch,
            Err(e) => return vec![ServerFrame::error("unavailable", e.to_string(), None)],
        };
        live.owner_epoch.fetch_max(epoch, Ordering::SeqCst);
        live.owner.send_replace(self.id);
        let mut owner = live.owner.subscribe();
        owner.mark_unchanged();
        self.superseded = false;
        self.bound = Some(Bound {
            session_id: session.id,
            live: live.clone(),
            events,
            owner,
            epoch,
        });
        let _turn = live.gate.lock().await;
        if let Err(e) = self.studio.resume_reply(&session, &live).await {
            tracing::error!(session_id = session.id, error = %e, "cannot resume the reply");
        }
        match self.studio.state_frame(session.id, &live).await {
            Ok(f) => vec![f],
            Err(e) => vec![ServerFrame::error("unavailable", e.to_string(), None)],
        }
    }
}

impl Studio {
    /// Frames a page sends as it closes (`navigator.sendBeacon`), when its socket may already be
    /// gone: applied in order like a socket's, each at most once. Ownership is not taken (the
    /// page's own socket, if still open, keeps the session). Returns what a socket would answer.
    pub async fn apply_beacon(
        self: &Arc<Self>,
        slug: String,
        token: String,
        frames: Vec<ClientFrame>,
    ) -> Result<Vec<ServerFrame>, StudyError> {
        let Some((_, session)) = self.session_for_token(slug, token).await? else {
            return Ok(vec![ServerFrame::error(
                "unauthorized",
                "this browser has no session of this study",
                None,
            )]);
        };
        if frames.len() > MAX_BEACON_FRAMES {
            return Ok(vec![ServerFrame::error(
                "too_large",
                format!("a beacon carries at most {MAX_BEACON_FRAMES} frames"),
                None,
            )]);
        }
        let live = self.live(session.id);
        let _turn = live.gate.lock().await;
        let mut out = Vec::new();
        for frame in frames {
            let client_seq = frame.client_seq();
            if client_seq.is_none() {
                continue;
            }
            out.extend(match self.apply(session.id, &live, frame, None).await {
                Ok(frames) => frames
                    .into_iter()
                    .filter(|f| matches!(f, ServerFrame::Ack { .. }))
                    .collect(),
                Err(Refusal::Frame(code, message)) => {
                    vec![ServerFrame::error(code, message, client_seq)]
                }
                Err(Refusal::Study(e)) => return Err(e),
            });
        }
        Ok(out)
    }

    fn live(&self, session_id: i64) -> Arc<LiveSession> {
        self.live.get(session_id)
    }

    /// Sessions held in memory (with a socket or a reply in flight), after dropping the others.
    pub fn live_sessions(&self) -> usize {
        self.live.len()
    }

    /// For a process that is stopping: no new reply starts (a message is answered `unavailable`,
    /// so the page keeps it and sends it again to the node that serves next), and the replies in
    /// flight are waited for, at most `within`. Returns how many were still in flight then;
    /// those are generated again by the next node, as after a crash.
    pub async fn drain(&self, within: Duration) -> usize {
        self.draining.store(true, Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let replying = self
                .live
                .held()
                .iter()
                .filter(|(_, s)| s.reply.lock().expect("reply lock").is_some())
                .count();
            if replying == 0 || tokio::time::Instant::now() >= deadline {
                return replying;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Applies one frame: the session's snapshot, the decision, then the command's handler. A
    /// socket's frame carries the owner epoch its hello took: refused when a later hello (on any
    /// node) took the session over. A beacon's frames carry none.
    async fn apply(
        self: &Arc<Self>,
        session_id: i64,
        live: &Arc<LiveSession>,
        frame: ClientFrame,
        epoch: Option<i64>,
    ) -> Result<Vec<ServerFrame>, Refusal> {
        if self.draining.load(Ordering::SeqCst)
            && matches!(
                frame,
                ClientFrame::UserMessage { .. } | ClientFrame::Regenerate { .. }
            )
        {
            return refuse(
                "unavailable",
                "the server is restarting; your message is sent again once it is back",
            );
        }
        let this = self.clone();
        let replying = live.reply.lock().expect("reply lock").is_some();
        let (snapshot, protocol) = self
            .db(move |conn| {
                let session = db::sessions::get(conn, session_id)?;
                // A reply of this node, or of another node (or one left by a node that died).
                let busy = replying
                    || db::leases::get(conn, &db::leases::reply_name(session_id))?.is_some();
                let protocol = this.protocol(conn, session.study_version_id)?;
                let turn = db::messages::turn_count(conn, session_id)?;
                let recorded = db::ratings::keys_after_turn(conn, session_id, turn)?;
                let snapshot = decide::Snapshot {
                    session,
                    turn,
                    recorded,
                    busy,
                };
                Ok::<_, StudyError>((snapshot, protocol))
            })
            .await?;
        if epoch.is_some_and(|e| e != snapshot.session.owner_epoch) {
            // A later hello, on this node or another; not applied, so the client may send it
            // again under a new number once it owns the session again.
            return refuse(
                "taken_over",
                "this session is open in another tab or window",
            );
        }
        let command = decide::decide(&snapshot, &protocol, frame)?;
        let cx = handlers::Context {
            studio: self,
            live,
            snapshot,
            protocol: &protocol,
        };
        handlers::handle(cx, command).await
    }
}

/// Whether a JSON text's strings hold the NUL character: JSON can only write it as the escape
/// `\u0000`, whose backslash is not itself escaped.
fn holds_nul(json: &str) -> bool {
    let bytes = json.as_bytes();
    json.match_indices("u0000").any(|(at, _)| {
        let slashes = bytes[..at]
            .iter()
            .rev()
            .take_while(|&&b| b == b'\\')
            .count();
        slashes % 2 == 1
    })
}

#[cfg(test)]
mod tests {
    use super::holds_nul;

    #[test]
    fn only_an_unescaped_nul_escape_is_a_nul() {
        assert!(holds_nul(r#"{"text":"a\u0000"}"#));
        assert!(holds_nul(r#"{"text":"a\\\u0000"}"#));
        assert!(
            !holds_nul(r#"{"text":"a\\u0000"}"#),
            "a backslash, then text"
        );
        assert!(!holds_nul(r#"{"text":"u0000"}"#));
    }
}
