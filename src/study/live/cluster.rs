//! Several `serve` nodes on one database. Any node may hold a participant's socket at any moment,
//! so what was in one process's memory is shared through the database:
//!
//! - one reply per message across the cluster: the node that generates it holds the session's
//!   reply lease (`db::leases`), renews it while it works and lets it go in the transaction that
//!   stores the reply; a lease whose node died expires, and the next sweep of any node takes it
//!   over and generates the reply again;
//! - what the reply's sockets see reaches sockets on other nodes: on PostgreSQL the holder
//!   stores the reply's progress with its lease and, in the same transaction, sends the new frames
//!   by `NOTIFY` (at once, at most every [`RELAY_EVERY`]); every node `LISTEN`s and hands them to
//!   its own sockets of the session. A socket that arrives mid-reply gets the text so far from the stored progress;
//!   a frame too large for a notification (a whole state) goes as "resync": each node sends its
//!   sockets the state it reads from the database;
//! - a node that knows it is alone relays nothing: every listening node says it is alive every
//!   [`BEAT_EVERY`], and one that has heard no other for [`PEER_TTL`] (nor listened that long)
//!   stops relaying until it does. `NOTIFY` serialises the commits of the whole database on one
//!   lock, which one node on its own would pay for at every relay. A reply that starts relaying
//!   again sends a resync first, so a node that joined mid-reply shows it whole;
//! - the socket that said hello last owns the session, whatever node it is on: every hello takes a
//!   new owner epoch from the database (`sessions.owner_epoch`), a frame from an older one is
//!   refused, and the other nodes are told so their sockets of the session close at once.
//!
//! SQLite serves one node: leases are still taken (a restarted process takes over the replies its
//! previous run left) but nothing is relayed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::LiveSession;
use crate::db::leases::{self, Released};
use crate::db::models::Session;
use crate::db::vocab::{MessageRole, SessionState};
use crate::db::{self, DbConn, DbPool};
use crate::study::frames::ServerFrame;
use crate::study::{Studio, StudyError};

/// How long a lease lives unless renewed: a node that died is replaced after at most this.
const LEASE_TTL: Duration = Duration::from_secs(10);
/// How often a reply renews its lease when it has nothing to relay.
const RENEW_EVERY: Duration = Duration::from_secs(2);
/// How often at most a reply relays its new frames to the other nodes (PostgreSQL).
const RELAY_EVERY: Duration = Duration::from_millis(100);
/// How often a node looks for replies that a node which died left unfinished.
const SWEEP_EVERY: Duration = Duration::from_secs(2);
/// Largest notification payload sent (PostgreSQL refuses more than 8000 bytes).
const MAX_PAYLOAD: usize = 7000;
/// How often the listening connection is read (it cannot be waited on through diesel).
const POLL_EVERY: Duration = Duration::from_millis(10);
/// How long the listener waits before connecting again after losing its connection.
const RECONNECT_AFTER: Duration = Duration::from_secs(1);
/// How often a listening node tells the others it is alive.
const BEAT_EVERY: Duration = Duration::from_secs(2);
/// How long a node counts as alive after it was last heard, and how long a node that has just
/// started listening relays before it trusts that it would have heard the others.
const PEER_TTL: Duration = Duration::from_secs(10);

/// This node in the cluster.
pub(crate) struct Node {
    /// Unique per process: lease holders are told apart by it.
    pub id: String,
    /// The PostgreSQL channel the nodes of this installation talk on: named after it, since
    /// channels are shared by every schema of a database.
    channel: String,
    /// Whether this process listens for the other nodes (`serve` does; tools do not).
    listening: AtomicBool,
    /// What this node knows of the others.
    peers: Arc<Peers>,
}

impl Node {
    /// A node of the installation whose secret is `installation` (any per-database secret).
    pub fn new(relays: bool, installation: &[u8]) -> Self {
        let id = format!(
            "{}-{}",
            std::process::id(),
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        let tag = crate::protocol::sha256_hex(installation);
        Self {
            peers: Arc::new(Peers {
                own: id.clone(),
                relays,
                listening_since: Mutex::default(),
                heard: Mutex::default(),
            }),
            id,
            channel: format!("collabllm_{}", &tag[..16]),
            listening: AtomicBool::new(false),
        }
    }

    /// Whether the database can relay frames to other nodes (it is PostgreSQL).
    pub fn relays(&self) -> bool {
        self.peers.relays
    }

    /// How this node hears the others, for `/healthz`: `off` (SQLite, or not serving),
    /// `listening`, or `disconnected` (frames of other nodes do not reach this node's sockets).
    pub fn relay_state(&self) -> &'static str {
        if !self.listening.load(Ordering::SeqCst) {
            "off"
        } else if self.peers.listening() {
            "listening"
        } else {
            "disconnected"
        }
    }
}

/// What a node knows of the others, shared by its listener thread and its replies.
pub(super) struct Peers {
    /// This node's id.
    own: String,
    /// Whether the database relays at all (PostgreSQL).
    relays: bool,
    /// Since when the listening connection is up; `None` while it is down (or this process
    /// does not listen).
    listening_since: Mutex<Option<Instant>>,
    /// When each other node was last heard.
    heard: Mutex<HashMap<String, Instant>>,
}

impl Peers {
    fn listening(&self) -> bool {
        self.listening_since.lock().expect("peers lock").is_some()
    }

    fn set_listening(&self, up: bool) {
        *self.listening_since.lock().expect("peers lock") = up.then(Instant::now);
    }

    /// Notes that `node` spoke; false when it is this node.
    fn heard_from(&self, node: &str) -> bool {
        if node == self.own {
            return false;
        }
        let mut heard = self.heard.lock().expect("peers lock");
        heard.insert(node.to_string(), Instant::now());
        heard.retain(|_, at| at.elapsed() < PEER_TTL);
        true
    }

    /// The other nodes heard within [`PEER_TTL`].
    pub fn count(&self) -> usize {
        let heard = self.heard.lock().expect("peers lock");
        heard.values().filter(|at| at.elapsed() < PEER_TTL).count()
    }

    /// Whether frames are to be relayed now: on PostgreSQL, unless this node knows it is alone
    /// (it has listened for [`PEER_TTL`] and heard no other node that long). A process that
    /// does not listen, or whose listener is down, cannot know and relays.
    pub fn relay_now(&self) -> bool {
        let since = *self.listening_since.lock().expect("peers lock");
        self.relays && (since.is_none_or(|t| t.elapsed() < PEER_TTL) || self.count() > 0)
    }
}

fn ttl() -> chrono::Duration {
    chrono::Duration::from_std(LEASE_TTL).expect("a short duration")
}

/// What one node tells the others about a session, or (with none) that it is alive.
#[derive(Debug, Serialize, Deserialize)]
struct Notice {
    node: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    session: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    frames: Vec<ServerFrame>,
    /// Send the sockets the session's state as stored (something too large to relay changed).
    #[serde(default, skip_serializing_if = "is_false")]
    resync: bool,
    /// A socket on the sending node took the session over, with this owner epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    owner: Option<i64>,
}

fn is_false(b: &bool) -> bool {
    !b
}

/// A reply in flight as stored with its lease, for the sockets of other nodes.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(super) struct Progress {
    pub msg_seq: i32,
    pub texts: Vec<String>,
    pub tokens: Vec<usize>,
    pub waiting: Option<usize>,
}

impl Studio {
    /// This node's id (unique per process), how it hears the other nodes and how many it
    /// heard lately.
    pub fn node(&self) -> (&str, &'static str, usize) {
        (
            &self.node.id,
            self.node.relay_state(),
            self.node.peers.count(),
        )
    }

    /// Whether this node relays frames to the others now (see [`Peers::relay_now`]).
    pub fn relaying(&self) -> bool {
        self.node.peers.relay_now()
    }

    /// Sends frames to the session's sockets on this node and on the others.
    pub(super) async fn broadcast(
        self: &Arc<Self>,
        session_id: i64,
        live: &LiveSession,
        frames: Vec<ServerFrame>,
    ) {
        for frame in &frames {
            let _ = live.events.send(frame.clone());
        }
        if !self.relaying() || frames.is_empty() {
            return;
        }
        let this = self.clone();
        let sent = self
            .db(move |conn| this.publish(conn, session_id, &frames, false))
            .await;
        if let Err(e) = sent {
            tracing::warn!(session_id, error = %e, "cannot relay frames to the other nodes");
        }
    }

    /// Makes a socket of this node the session's owner: a new owner epoch, told to the other
    /// nodes (whose sockets of the session are taken over, unless they said hello since).
    pub(super) async fn claim_session(
        self: &Arc<Self>,
        session_id: i64,
    ) -> Result<i64, StudyError> {
        let this = self.clone();
        self.write(move |conn| {
            let epoch = db::sessions::claim(conn, session_id)?;
            // Told even to nodes not heard yet: a hello is rare, and an old tab must close.
            if this.node.relays() {
                let notice = Notice {
                    owner: Some(epoch),
                    ..this.notice(Some(session_id))
                };
                this.send_notice(conn, &notice, "owner")?;
            }
            Ok(epoch)
        })
        .await
    }

    /// An empty notice from this node about a session (none: that the node is alive).
    fn notice(&self, session_id: Option<i64>) -> Notice {
        Notice {
            node: self.node.id.clone(),
            session: session_id,
            frames: Vec::new(),
            resync: false,
            owner: None,
        }
    }

    /// Sends `notice` when `conn`'s transaction commits, counted as `kind`.
    fn send_notice(
        &self,
        conn: &mut DbConn,
        notice: &Notice,
        kind: &str,
    ) -> Result<(), StudyError> {
        let payload = serde_json::to_string(notice).expect("a notice serialises");
        db::notify(conn, &self.node.channel, &payload)?;
        crate::metrics::metrics().relay_notice(kind);
        Ok(())
    }

    /// Tells the other nodes this one is alive.
    async fn beat(self: &Arc<Self>) -> Result<(), StudyError> {
        let this = self.clone();
        self.db(move |conn| this.send_notice(conn, &this.notice(None), "beat"))
            .await
    }

    /// Sends `frames` to the other nodes when `conn`'s transaction commits, in notifications
    /// small enough for PostgreSQL; a frame too large (a state) becomes a resync. With `resync`
    /// only a resync is sent: the state it reads holds the frames (stored in this transaction).
    fn publish(
        &self,
        conn: &mut DbConn,
        session_id: i64,
        frames: &[ServerFrame],
        resync: bool,
    ) -> Result<(), StudyError> {
        if !self.node.relays() {
            return Ok(());
        }
        let empty = || self.notice(Some(session_id));
        if resync {
            let notice = Notice { resync, ..empty() };
            return self.send_notice(conn, &notice, "frames");
        }
        let mut notice = empty();
        let mut size = 0;
        let mut notices = Vec::new();
        for frame in frames {
            let len = serde_json::to_string(frame).map_or(usize::MAX, |s| s.len());
            if matches!(frame, ServerFrame::State(_)) || len > MAX_PAYLOAD - 200 {
                notice.resync = true;
                continue;
            }
            if size + len > MAX_PAYLOAD - 200 {
                notices.push(std::mem::replace(&mut notice, empty()));
                size = 0;
            }
            notice.frames.push(frame.clone());
            size += len + 1;
        }
        notices.push(notice);
        for notice in notices
            .into_iter()
            .filter(|n| n.resync || !n.frames.is_empty())
        {
            self.send_notice(conn, &notice, "frames")?;
        }
        Ok(())
    }

    /// Takes the session's reply lease for this node (see [`leases::acquire`]).
    pub(super) fn take_reply_lease(
        &self,
        conn: &mut DbConn,
        session_id: i64,
    ) -> Result<bool, StudyError> {
        let name = leases::reply_name(session_id);
        Ok(leases::acquire(
            conn,
            &name,
            &self.node.id,
            ttl(),
            Some(session_id),
        )?)
    }

    pub(super) fn release_reply_lease(
        &self,
        conn: &mut DbConn,
        session_id: i64,
    ) -> Result<Released, StudyError> {
        Ok(leases::release(
            conn,
            &leases::reply_name(session_id),
            &self.node.id,
        )?)
    }

    /// Lets go of the reply lease outside a transaction (a reply that failed or never started),
    /// so the participant may send their message again.
    pub(super) async fn drop_reply_lease(self: &Arc<Self>, session_id: i64) {
        let this = self.clone();
        let released = self
            .write(move |conn| this.release_reply_lease(conn, session_id))
            .await;
        if let Err(e) = released {
            tracing::warn!(session_id, error = %e, "cannot release the reply lease");
        }
    }

    /// Renews the reply's lease, storing its progress and relaying `frames` with it (one
    /// transaction: a node that reads the progress has every frame sent before), and a resync
    /// if asked. `None` when another node took the reply over, else whether the participant
    /// asked to stop.
    pub(super) async fn renew_reply(
        self: &Arc<Self>,
        session_id: i64,
        progress: Option<String>,
        frames: Vec<ServerFrame>,
        resync: bool,
    ) -> Result<Option<bool>, StudyError> {
        let this = self.clone();
        self.write(move |conn| {
            let name = leases::reply_name(session_id);
            let renewed = leases::renew(conn, &name, &this.node.id, ttl(), progress.as_deref())?;
            if renewed.is_some() && (resync || !frames.is_empty()) {
                this.publish(conn, session_id, &frames, resync)?;
            }
            Ok(renewed)
        })
        .await
    }

    /// In the transaction that stores a reply: lets go of its lease, and refuses to store it
    /// when another node took the reply over or the message was answered meanwhile.
    pub(super) fn settle_reply(
        &self,
        conn: &mut DbConn,
        session_id: i64,
        msg_seq: i32,
    ) -> Result<(), StudyError> {
        if self.release_reply_lease(conn, session_id)? == Released::HeldElsewhere {
            return Err(StudyError::ReplyTakenOver);
        }
        let answers = db::messages::last(conn, session_id)?
            .is_some_and(|m| m.role == MessageRole::User && m.seq == msg_seq - 1);
        if !answers {
            return Err(StudyError::ReplyTakenOver);
        }
        Ok(())
    }

    /// The reply in flight on whatever node generates it, as its lease stores it; the message
    /// it answers is `last_seq + 1`'s when nothing was stored yet.
    pub(super) fn leased_reply(
        conn: &mut DbConn,
        session_id: i64,
    ) -> Result<Option<Progress>, StudyError> {
        let Some(lease) = leases::get(conn, &leases::reply_name(session_id))? else {
            return Ok(None);
        };
        if let Some(progress) = lease
            .progress
            .as_deref()
            .and_then(|p| serde_json::from_str::<Progress>(p).ok())
        {
            return Ok(Some(progress));
        }
        let msg_seq = db::messages::last(conn, session_id)?.map_or(1, |m| m.seq + 1);
        Ok(Some(Progress {
            msg_seq,
            ..Progress::default()
        }))
    }

    /// Starts the node's cluster work: the sweep for replies left by a node that died, the idle
    /// session time-outs (one node at a time), and on PostgreSQL the listener for the other nodes
    /// and the beat that tells them this one is alive.
    pub fn run_cluster(self: &Arc<Self>, idle_sweep_every: Duration) {
        let this = self.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(SWEEP_EVERY);
            loop {
                every.tick().await;
                if let Err(e) = this.take_over_replies().await {
                    tracing::warn!(error = %e, "cannot look for replies left unfinished");
                }
            }
        });
        let this = self.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(idle_sweep_every);
            loop {
                every.tick().await;
                if let Err(e) = this.expire_idle_sessions_once(idle_sweep_every).await {
                    tracing::warn!(error = %e, "cannot end idle sessions");
                }
            }
        });
        if self.node.relays() && !self.node.listening.swap(true, Ordering::SeqCst) {
            let (sender, mut received) = tokio::sync::mpsc::unbounded_channel();
            let (pool, channel) = (self.pool.clone(), self.node.channel.clone());
            let peers = self.node.peers.clone();
            std::thread::Builder::new()
                .name("collabllm-listen".into())
                .spawn(move || listen(&pool, &channel, &peers, &sender))
                .expect("start the listener thread");
            let this = self.clone();
            tokio::spawn(async move {
                while let Some(heard) = received.recv().await {
                    this.dispatch(heard).await;
                }
            });
            let this = self.clone();
            tokio::spawn(async move {
                // The first beat goes at once, before any socket of this node can say hello.
                let mut every = tokio::time::interval(BEAT_EVERY);
                loop {
                    every.tick().await;
                    if let Err(e) = this.beat().await {
                        tracing::warn!(error = %e, "cannot tell the other nodes this one is alive");
                    }
                }
            });
        }
    }

    /// Ends idle sessions if this node holds the job's lease (one node does it at a time).
    async fn expire_idle_sessions_once(
        self: &Arc<Self>,
        every: Duration,
    ) -> Result<(), StudyError> {
        let this = self.clone();
        // Held a while past the next sweep, so a live holder keeps it.
        let ttl = chrono::Duration::milliseconds(every.as_millis() as i64 * 3 / 2);
        let ours = self
            .db(move |conn| leases::acquire(conn, "job/idle-sessions", &this.node.id, ttl, None))
            .await?;
        if ours {
            self.expire_idle_sessions(db::now()).await?;
        }
        Ok(())
    }

    /// Takes over the replies whose node stopped renewing their lease, and generates them again.
    async fn take_over_replies(self: &Arc<Self>) -> Result<(), StudyError> {
        let expired = self
            .db(|conn| Ok::<_, StudyError>(leases::expired_sessions(conn, db::now())?))
            .await?;
        for session_id in expired {
            if let Err(e) = self.take_over_reply(session_id).await {
                tracing::warn!(session_id, error = %e, "cannot take over a reply");
            }
        }
        Ok(())
    }

    async fn take_over_reply(self: &Arc<Self>, session_id: i64) -> Result<(), StudyError> {
        let live = self.live(session_id);
        let _turn = live.gate.lock().await;
        let session = self
            .db(move |conn| Ok::<_, StudyError>(db::sessions::get(conn, session_id)?))
            .await?;
        tracing::info!(session = %session.public_id, "a reply's lease expired: taking it over");
        self.resume_reply(&session, &live).await
    }

    /// Whether the session waits for a reply that nobody generates, taking its lease if so
    /// (else letting go of a lease it no longer needs). The caller then starts the reply.
    pub(super) async fn claim_unanswered(
        self: &Arc<Self>,
        session: &Session,
    ) -> Result<bool, StudyError> {
        let this = self.clone();
        let (session_id, chatting) = (session.id, session.state == SessionState::Chatting);
        self.write(move |conn| {
            if !this.take_reply_lease(conn, session_id)? {
                return Ok(false);
            }
            let unanswered = chatting
                && db::messages::last(conn, session_id)?
                    .is_some_and(|m| m.role == MessageRole::User);
            if !unanswered {
                this.release_reply_lease(conn, session_id)?;
            }
            Ok(unanswered)
        })
        .await
    }

    /// Hands what another node said to this node's sockets of the session.
    async fn dispatch(self: &Arc<Self>, heard: Heard) {
        let (session_id, notice) = match heard {
            Heard::Notice(session_id, notice) => (session_id, notice),
            Heard::Reconnected => {
                // Notices may have been missed while the connection was down.
                for (session_id, live) in self.live.held() {
                    self.resync(session_id, &live).await;
                }
                return;
            }
        };
        let Some(live) = self.live.existing(session_id) else {
            return;
        };
        if let Some(epoch) = notice.owner {
            if live.owner_epoch.fetch_max(epoch, Ordering::SeqCst) < epoch {
                // No connection of this process has number 0: every one here is taken over.
                live.owner.send_replace(0);
            }
        }
        for frame in notice.frames {
            let _ = live.events.send(frame);
        }
        if notice.resync {
            self.resync(session_id, &live).await;
        }
    }

    /// Sends this node's sockets of the session its state as stored.
    async fn resync(self: &Arc<Self>, session_id: i64, live: &LiveSession) {
        match self.state_frame(session_id, live).await {
            Ok(frame) => {
                let _ = live.events.send(frame);
            }
            Err(e) => tracing::warn!(session_id, error = %e, "cannot send the session's state"),
        }
    }
}

/// Keeps a reply's lease while it is generated: renews it every [`RENEW_EVERY`] and, while the
/// node relays, relays new frames at once, or [`RELAY_EVERY`] after the last relay when frames
/// come faster (one transaction per interval however fast the model writes).
pub(super) struct LeaseKeeper {
    peers: Arc<Peers>,
    /// Whether the other nodes had every frame so far (false once the node relayed nothing).
    relayed: bool,
    renewed: tokio::time::Instant,
    frames: Vec<ServerFrame>,
    lost: bool,
}

impl LeaseKeeper {
    pub fn new(studio: &Studio) -> Self {
        let peers = studio.node.peers.clone();
        Self {
            relayed: peers.relay_now(),
            peers,
            renewed: tokio::time::Instant::now(),
            frames: Vec::new(),
            lost: false,
        }
    }

    /// Sends a frame of the reply to the session's sockets here, and keeps it for the other
    /// nodes' (relayed with the next renewal).
    pub fn send(&mut self, live: &LiveSession, frame: ServerFrame) {
        if self.peers.relay_now() {
            self.frames.push(frame.clone());
        }
        let _ = live.events.send(frame);
    }

    /// Whether frames, or a resync for nodes that missed some, wait to be relayed.
    pub fn pending(&self) -> bool {
        !self.frames.is_empty() || (!self.relayed && self.peers.relay_now())
    }

    /// Waits until the frames so far are to be relayed or the lease is due for renewal (made
    /// again after every frame, so it sees the frames sent meanwhile).
    pub async fn due(&self) {
        let after = if self.pending() {
            RELAY_EVERY
        } else {
            RENEW_EVERY
        };
        tokio::time::sleep_until(self.renewed + after).await;
    }

    /// Renews the lease and, while the node relays, stores the reply's progress with it and
    /// relays the frames (with a resync first when the other nodes missed some); stops the
    /// reply when the participant asked so on another node. False when the lease was lost:
    /// another node generates the reply now.
    pub async fn renew(
        &mut self,
        studio: &Arc<Studio>,
        session_id: i64,
        live: &LiveSession,
    ) -> bool {
        let relay = self.peers.relay_now();
        let progress = if relay {
            live.reply
                .lock()
                .expect("reply lock")
                .as_ref()
                .and_then(|r| serde_json::to_string(&r.progress()).ok())
        } else {
            None
        };
        let resync = relay && !self.relayed;
        // The next relay is timed from the start of this one.
        let started = tokio::time::Instant::now();
        match studio
            .renew_reply(session_id, progress, self.frames.clone(), resync)
            .await
        {
            Ok(Some(stop)) => {
                self.frames.clear();
                self.relayed = relay;
                self.renewed = started;
                if stop {
                    if let Some(reply) = live.reply.lock().expect("reply lock").as_ref() {
                        for cancel in &reply.cancels {
                            cancel.store(true, Ordering::Relaxed);
                        }
                    }
                }
                true
            }
            Ok(None) => {
                self.lost = true;
                false
            }
            Err(e) => {
                // The frames are kept for the next try, an interval later; the lease lives on
                // for a while.
                tracing::warn!(session_id, error = %e, "cannot renew the reply's lease");
                self.renewed = started;
                true
            }
        }
    }

    /// Runs `work` (a comparison candidate sampled again) while renewing the lease; `None`
    /// when the lease was lost meanwhile.
    pub async fn hold<T>(
        &mut self,
        studio: &Arc<Studio>,
        session_id: i64,
        live: &LiveSession,
        work: impl std::future::Future<Output = T>,
    ) -> Option<T> {
        tokio::pin!(work);
        loop {
            tokio::select! {
                done = &mut work => return Some(done),
                () = self.due() => {
                    if !self.renew(studio, session_id, live).await {
                        return None;
                    }
                }
            }
        }
    }

    pub fn lost(&self) -> bool {
        self.lost
    }
}

/// What the listener heard from the other nodes (their beats only count them as alive).
enum Heard {
    Notice(i64, Notice),
    /// The listening connection was made again: notices may have been missed.
    Reconnected,
}

/// Receives the other nodes' notices, for as long as the process runs (on its own thread: the
/// connection is read without waiting, every [`POLL_EVERY`]). Who spoke is noted here rather
/// than by the receiver, so a busy receiver does not make a node seem gone.
fn listen(
    pool: &DbPool,
    channel: &str,
    peers: &Peers,
    sender: &tokio::sync::mpsc::UnboundedSender<Heard>,
) {
    let mut first = true;
    while !sender.is_closed() {
        let mut conn = match pool.get() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "the listener has no database connection");
                std::thread::sleep(RECONNECT_AFTER);
                continue;
            }
        };
        if let Err(e) = db::listen(&mut conn, channel) {
            tracing::warn!(error = %e, "cannot listen for the other nodes");
            std::thread::sleep(RECONNECT_AFTER);
            continue;
        }
        peers.set_listening(true);
        if !std::mem::take(&mut first) && sender.send(Heard::Reconnected).is_err() {
            return;
        }
        loop {
            match db::notifications(&mut conn) {
                Ok(payloads) => {
                    for p in payloads {
                        let notice = match serde_json::from_str::<Notice>(&p) {
                            Ok(n) => n,
                            Err(e) => {
                                tracing::warn!(error = %e, "a notification that is not a notice");
                                continue;
                            }
                        };
                        if !peers.heard_from(&notice.node) {
                            continue;
                        }
                        let Some(session_id) = notice.session else {
                            continue;
                        };
                        if sender.send(Heard::Notice(session_id, notice)).is_err() {
                            return;
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "lost the connection that listens for the other nodes");
                    break;
                }
            }
            if sender.is_closed() {
                break;
            }
            std::thread::sleep(POLL_EVERY);
        }
        peers.set_listening(false);
        // A connection that still works goes back to the pool without the subscription.
        let _ = db::unlisten(&mut conn);
        std::thread::sleep(RECONNECT_AFTER);
    }
}
