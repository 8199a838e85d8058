//! CollabLLM Studio: run human–AI document co-creation studies and turn them into training data
//! for collaborative LLMs.
//!
//! The modules are layers. A module uses only modules of the layers below its own, never one of
//! its own layer or above (checked by the `layers` integration test, which reads this list):
//!
//! 1. `bench` — benchmarks of the whole platform, the engine, MR and training
//! 2. `web` — actix-web: participant pages and websocket, the console, `/v1`, `/healthz`
//! 3. `collab` — the CollabLLM core: simulator, judge, MR, pilots, pairs, synth, evaluation
//! 4. `study`, `export`, `results`, `train` — a participant's study, exports, results per
//!    arm, DPO training
//! 5. `db` — storage over SQLite and PostgreSQL
//! 6. `metrics` — Prometheus counters that every layer above counts into
//! 7. `engine` — inference: llama.cpp workers and remote OpenAI-compatible servers
//! 8. `protocol`, `throttle` — study protocol files; rate limits
//! 9. `stats` — statistics and the seeded generator
//!
//! The binary's command line (`src/cli/`, outside the library) sits on top of them all.

pub mod bench;
pub mod collab;
pub mod db;
pub mod engine;
pub mod export;
pub mod metrics;
pub mod protocol;
pub mod results;
pub mod stats;
pub mod study;
pub mod throttle;
pub mod train;
pub mod web;
