//! What a lab watches while a study runs, as Prometheus scrapes it from `/metrics`: frames and
//! refusals by type, reply latencies by arm (waiting for a slot, first token, whole reply), the
//! database's units of work, sessions by state, and each engine's queues, slots, speed and
//! prompt reuse. Events are counted where they happen, into one registry per process; what is
//! a state of the moment (sessions, engines) is read when scraped. It sits below every other
//! module but `engine`, so each layer (the database's included) can count into it.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::engine::{Completion, EngineStatus, Priority};

/// Seconds a reply may take, from a fraction of a second to minutes in a queue.
const REPLY_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0,
];
/// Writes committed together, from one alone to a full group.
const COMMIT_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];
/// Seconds of a database unit of work, from a cached read to a slow disk.
const DB_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

pub struct Metrics {
    registry: Registry,
    frames: IntCounterVec,
    refusals: IntCounterVec,
    reply_queue: HistogramVec,
    reply_first_token: HistogramVec,
    reply_total: HistogramVec,
    reply_failures: IntCounterVec,
    db_work: Histogram,
    db_commit_writes: Histogram,
    relay_notices: IntCounterVec,
    sessions: IntGaugeVec,
    engine_running: IntGaugeVec,
    engine_restarts: IntGaugeVec,
    engine_queued: IntGaugeVec,
    engine_slots_active: IntGaugeVec,
    engine_replies_paused: IntGaugeVec,
    engine_slots: IntGaugeVec,
    engine_tokens_per_second: GaugeVec,
    engine_tokens: IntCounterVec,
    /// Each engine's token totals at the last scrape, so the counters grow by what is new
    /// (an engine's totals start again from 0 when it is restarted).
    seen: Mutex<HashMap<String, [u64; 3]>>,
}

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);
    &METRICS
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help).namespace("collabllm")
}

fn histogram(name: &str, help: &str, buckets: &[f64]) -> HistogramOpts {
    HistogramOpts::new(name, help)
        .namespace("collabllm")
        .buckets(buckets.to_vec())
}

impl Metrics {
    fn new() -> Self {
        let registry = Registry::new();
        // The names and labels are fixed here: registering them cannot fail.
        fn add<T: prometheus::core::Collector + Clone + 'static>(registry: &Registry, c: T) -> T {
            registry
                .register(Box::new(c.clone()))
                .expect("metric names are unique and valid");
            c
        }
        let counter = |name, help, labels: &[&str]| {
            add(
                &registry,
                IntCounterVec::new(opts(name, help), labels).expect("valid counter"),
            )
        };
        let gauge = |name, help, labels: &[&str]| {
            add(
                &registry,
                IntGaugeVec::new(opts(name, help), labels).expect("valid gauge"),
            )
        };
        let reply = |name, help| {
            add(
                &registry,
                HistogramVec::new(histogram(name, help, REPLY_BUCKETS), &["arm"])
                    .expect("valid histogram"),
            )
        };
        Self {
            frames: counter(
                "frames_total",
                "Websocket frames received from participants, by type (invalid: not a frame).",
                &["type"],
            ),
            refusals: counter(
                "frame_errors_total",
                "Error frames sent to participants, by the frame's type and the error code.",
                &["type", "code"],
            ),
            reply_queue: reply(
                "reply_queue_seconds",
                "Seconds a participant's reply waited for an engine slot, by arm.",
            ),
            reply_first_token: reply(
                "reply_first_token_seconds",
                "Seconds from a participant's message to the reply's first token, by arm.",
            ),
            reply_total: reply(
                "reply_seconds",
                "Seconds from a participant's message to the reply's end, by arm.",
            ),
            reply_failures: counter(
                "reply_failures_total",
                "Participants' replies that failed (the engine, its worker or its endpoint \
                 failed) and were offered to try again, by arm.",
                &["arm"],
            ),
            db_work: add(
                &registry,
                Histogram::with_opts(histogram(
                    "db_work_seconds",
                    "Seconds of a unit of database work off the async threads (transactions \
                     included, waiting for a pooled connection included).",
                    DB_BUCKETS,
                ))
                .expect("valid histogram"),
            ),
            db_commit_writes: add(
                &registry,
                Histogram::with_opts(histogram(
                    "db_commit_writes",
                    "Session writes committed together in one SQLite transaction (group commit).",
                    COMMIT_BUCKETS,
                ))
                .expect("valid histogram"),
            ),
            relay_notices: counter(
                "relay_notices_total",
                "PostgreSQL notifications sent to the other nodes, by kind: frames (a reply's \
                 frames or a resync), owner (a tab took a session over) and beat (this node is \
                 alive). None carry frames while a node knows it is alone.",
                &["kind"],
            ),
            sessions: gauge("sessions", "Sessions by state.", &["state"]),
            engine_running: gauge(
                "engine_running",
                "1 while the engine can take requests.",
                &["engine"],
            ),
            engine_restarts: gauge(
                "engine_restarts",
                "Times the engine's worker failed and was started again.",
                &["engine"],
            ),
            engine_queued: gauge(
                "engine_queued",
                "Requests waiting for a slot, by class (participant, api, background).",
                &["engine", "class"],
            ),
            engine_slots_active: gauge(
                "engine_slots_active",
                "Sequence slots generating now.",
                &["engine"],
            ),
            engine_replies_paused: gauge(
                "engine_replies_paused",
                "Replies paused for participants waiting for a first token.",
                &["engine"],
            ),
            engine_slots: gauge("engine_slots", "Sequence slots in all.", &["engine"]),
            engine_tokens_per_second: add(
                &registry,
                GaugeVec::new(
                    opts(
                        "engine_tokens_per_second",
                        "Generated tokens per second over the recent past.",
                    ),
                    &["engine"],
                )
                .expect("valid gauge"),
            ),
            engine_tokens: counter(
                "engine_tokens_total",
                "Tokens by kind: generated, prompt_computed (prompt tokens the engine computed) \
                 and prompt_reused (prompt tokens a slot's cache already held).",
                &["engine", "kind"],
            ),
            seen: Mutex::default(),
            registry,
        }
    }

    /// A frame received; `kind` is its `type`, or `invalid` when it was not a frame.
    pub fn frame(&self, kind: &str) {
        self.frames.with_label_values(&[kind]).inc();
    }

    /// An error frame sent in answer to a frame of `kind`.
    pub fn refusal(&self, kind: &str, code: &str) {
        self.refusals.with_label_values(&[kind, code]).inc();
    }

    /// A notification sent to the other nodes.
    pub fn relay_notice(&self, kind: &str) {
        self.relay_notices.with_label_values(&[kind]).inc();
    }

    /// A participant's reply that finished, after waiting `queued` for a slot.
    pub fn reply(&self, arm: &str, queued: Duration, c: &Completion) {
        let ms = |v: u64| Duration::from_millis(v).as_secs_f64();
        self.reply_queue
            .with_label_values(&[arm])
            .observe(queued.as_secs_f64());
        self.reply_first_token
            .with_label_values(&[arm])
            .observe(ms(c.ttft_ms));
        self.reply_total
            .with_label_values(&[arm])
            .observe(ms(c.total_ms));
    }

    /// A participant's reply that failed.
    pub fn reply_failed(&self, arm: &str) {
        self.reply_failures.with_label_values(&[arm]).inc();
    }

    /// A unit of database work that took `elapsed`.
    pub fn db_work(&self, elapsed: Duration) {
        self.db_work.observe(elapsed.as_secs_f64());
    }

    /// A group of `writes` committed in one transaction.
    pub fn db_commit(&self, writes: usize) {
        self.db_commit_writes.observe(writes as f64);
    }

    /// Group commits so far and the writes they carried.
    pub fn db_commits(&self) -> (u64, u64) {
        let h = &self.db_commit_writes;
        (h.get_sample_count(), h.get_sample_sum() as u64)
    }

    /// Notifications of `kind` sent to the other nodes so far.
    pub fn relay_notices(&self, kind: &str) -> u64 {
        self.relay_notices.with_label_values(&[kind]).get()
    }

    /// Units of database work so far.
    pub fn db_work_count(&self) -> u64 {
        self.db_work.get_sample_count()
    }

    /// Everything, in Prometheus's text format, with the sessions (how many in each state, every
    /// state named) and the engines as they are now.
    pub fn render(&self, sessions: &[(&str, i64)], engines: &[EngineStatus]) -> String {
        for (state, n) in sessions {
            self.sessions.with_label_values(&[state]).set(*n);
        }
        let mut seen = self.seen.lock().expect("metrics lock");
        for e in engines {
            let name = e.model.as_str();
            let int = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
            self.engine_running
                .with_label_values(&[name])
                .set(i64::from(e.running));
            self.engine_restarts
                .with_label_values(&[name])
                .set(i64::from(e.restarts));
            for (class, queued) in Priority::ALL.iter().zip(e.queued_by_priority) {
                self.engine_queued
                    .with_label_values(&[name, class.name()])
                    .set(int(queued));
            }
            self.engine_slots_active
                .with_label_values(&[name])
                .set(int(e.active));
            self.engine_replies_paused
                .with_label_values(&[name])
                .set(int(e.paused));
            self.engine_slots
                .with_label_values(&[name])
                .set(int(e.slots));
            self.engine_tokens_per_second
                .with_label_values(&[name])
                .set(e.tokens_per_second);
            let now = [
                e.generated_tokens,
                e.prompt_tokens_processed,
                e.prompt_tokens_reused,
            ];
            let before = seen.insert(name.to_string(), now).unwrap_or_default();
            for ((kind, now), before) in ["generated", "prompt_computed", "prompt_reused"]
                .iter()
                .zip(now)
                .zip(before)
            {
                // Below the last total: the worker was restarted and counts from 0 again.
                let new = if now >= before { now - before } else { now };
                self.engine_tokens
                    .with_label_values(&[name, kind])
                    .inc_by(new);
            }
        }
        drop(seen);
        let mut text = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut text)
            .expect("the text encoder writes to memory");
        String::from_utf8(text).expect("the text format is UTF-8")
    }
}

/// Peak resident memory of this process in MiB (Linux), if known.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}
