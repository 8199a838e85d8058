//! CollabLLM Studio: run human–AI document co-creation studies and turn them into training data
//! for collaborative LLMs.
//!
//! Dependencies flow one way: `web` → `study` / `export` / `results` → `db` / `engine` / `protocol`;
//! `train` (DPO on the CPU) uses `engine` for the served tokens and to check its adapters;
//! `metrics` is counted into from every layer and depends on `engine` alone.

pub mod bench;
pub mod collab;
pub mod config;
pub mod db;
pub mod engine;
pub mod export;
pub mod metrics;
pub mod protocol;
pub mod results;
pub mod study;
pub mod throttle;
pub mod train;
pub mod web;
