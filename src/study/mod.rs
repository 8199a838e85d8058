//! The study as participants live it: entry and resume, consent, balanced assignment, the live
//! co-writing session (messages, replies, document, ratings, completion) and its timings. This
//! module decides; `db` stores and `engine` generates. It knows nothing of HTTP or sockets: the web
//! layer turns requests and frames into calls here.

pub mod assign;
pub mod client;
mod entry;
pub mod frames;
mod live;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

pub use entry::{Arrival, Entry};
pub use live::Connection;

use crate::db::vocab::{MessageRole, SessionState};
use crate::db::{self, DbConn, DbError, DbPool};
use crate::engine::{ChatMessage, Engines, Role};
use crate::protocol::Protocol;

#[derive(Debug, thiserror::Error)]
pub enum StudyError {
    #[error("there is no study {0:?}")]
    UnknownStudy(String),
    #[error("this study is not accepting participants at the moment")]
    NotAccepting,
    #[error("every arm of the study has reached its quota")]
    Full,
    /// The participant id of the link has a session that another browser holds.
    #[error("{}", if *ended {
        "This participant ID has already taken part in this study in another browser."
    } else {
        "This participant ID already has a session of this study open in another browser. Please continue there; if you cannot, contact the researchers, who can move your session to this browser."
    })]
    OpenElsewhere { ended: bool },
    /// The client started the most new sessions it may for now.
    #[error("too many sessions were started from your network")]
    TooManyStarted,
    #[error("{0}")]
    Protocol(String),
    /// Another node took over the reply (this node stopped renewing its lease in time), or the
    /// message was answered meanwhile: this node's reply is not stored.
    #[error("the reply was taken over by another node")]
    ReplyTakenOver,
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<diesel::result::Error> for StudyError {
    fn from(e: diesel::result::Error) -> Self {
        StudyError::Db(e.into())
    }
}

/// The participant-facing side of every study in the database.
pub struct Studio {
    pool: DbPool,
    /// The session writes, committed in groups on SQLite.
    writer: db::group::Writer,
    engines: Engines,
    /// Parsed protocols by study version.
    protocols: Mutex<HashMap<i64, Arc<Protocol>>>,
    live: live::Registry,
    /// This process among the nodes that share the database.
    node: live::Node,
    /// Key of the external-id HMACs (an installation secret kept in the database).
    hmac_key: Vec<u8>,
    /// The process is stopping: replies in flight finish, no new one starts.
    draining: std::sync::atomic::AtomicBool,
}

impl Studio {
    pub fn new(pool: DbPool, engines: Engines) -> Result<Arc<Self>, DbError> {
        let mut conn = db::connection(&pool)?;
        let key = db::secrets::get_or_create(&mut conn, "participant-id-hmac", || {
            hex::encode(rand::random::<[u8; 32]>())
        })?;
        let backend = conn.backend();
        Ok(Arc::new(Self {
            node: live::Node::new(backend == db::Backend::Postgres, key.as_bytes()),
            writer: db::group::Writer::new(pool.clone(), backend)?,
            pool,
            engines,
            protocols: Mutex::default(),
            live: live::Registry::default(),
            hmac_key: key.into_bytes(),
            draining: Default::default(),
        }))
    }

    /// Runs blocking database work off the async threads.
    async fn db<T, E, F>(&self, work: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<DbError> + Send + 'static,
        F: FnOnce(&mut DbConn) -> Result<T, E> + Send + 'static,
    {
        db::run_blocking(&self.pool, work).await
    }

    /// Runs `work` in one write transaction and returns once it is committed (together with the
    /// writes of other sessions at that moment, on SQLite).
    async fn write<T, E, F>(&self, work: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<DbError> + From<diesel::result::Error> + Send + 'static,
        F: FnOnce(&mut DbConn) -> Result<T, E> + Send + 'static,
    {
        self.writer.write(work).await
    }

    /// The protocol a study version runs under (parsed once, for pages and console alike).
    pub fn protocol(
        &self,
        conn: &mut DbConn,
        version_id: i64,
    ) -> Result<Arc<Protocol>, StudyError> {
        if let Some(p) = self
            .protocols
            .lock()
            .expect("protocols lock")
            .get(&version_id)
        {
            return Ok(p.clone());
        }
        let version = db::studies::version(conn, version_id)?;
        let protocol = Arc::new(
            Protocol::from_stored(&version.protocol_text)
                .map_err(|e| StudyError::Protocol(e.to_string()))?,
        );
        self.protocols
            .lock()
            .expect("protocols lock")
            .insert(version_id, protocol.clone());
        Ok(protocol)
    }

    /// Ends, with the protocol's "timed out" outcome, every open session that has been idle
    /// longer than its protocol allows at `now`. Returns how many ended.
    pub async fn expire_idle_sessions(
        self: &Arc<Self>,
        now: chrono::NaiveDateTime,
    ) -> Result<usize, StudyError> {
        let this = self.clone();
        self.db(move |conn| {
            let mut ended = 0;
            let candidates = db::sessions::idle_since(
                conn,
                &SessionState::OPEN,
                now - chrono::Duration::minutes(1),
            )?;
            for session in candidates {
                let protocol = this.protocol(conn, session.study_version_id)?;
                let limit = i64::from(protocol.session.idle_timeout_minutes);
                let idle_before = now - chrono::Duration::minutes(limit);
                if limit == 0 || session.last_activity_at > idle_before {
                    continue;
                }
                // Only if nothing came meanwhile (on this node or another).
                let code = &protocol.outcomes.timed_out.code;
                if db::sessions::time_out(conn, session.id, idle_before, code)? {
                    tracing::info!(session = %session.public_id, "session timed out");
                    ended += 1;
                }
            }
            Ok(ended)
        })
        .await
    }

    /// The pseudonymous form of an external id (a Prolific PID): an HMAC keyed by an
    /// installation secret, so the id cannot be read back or matched across installations.
    fn external_id_hmac(&self, study_slug: &str, external_id: &str) -> String {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.hmac_key).expect("HMAC takes any key length");
        mac.update(study_slug.as_bytes());
        mac.update(b"\0");
        mac.update(external_id.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }
}

/// The cookie that holds a participant's session token (HttpOnly, scoped to the study's path).
pub const SESSION_COOKIE: &str = "collabllm_session";

/// A stored chat message as the engine takes it.
pub fn chat_message(role: MessageRole, content: &str) -> ChatMessage {
    let role = match role {
        MessageRole::User => Role::User,
        MessageRole::Assistant => Role::Assistant,
    };
    ChatMessage::new(role, content.to_string())
}

/// A new random session token (given to the browser) and its hash (stored).
fn new_token() -> (String, String) {
    let token = hex::encode(rand::random::<[u8; 32]>());
    let hash = token_hash(&token);
    (token, hash)
}

pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}
