//! Integration tests: the real router, SQLite and PostgreSQL, the real model, real clients.

mod common;
mod engine;
mod protocol;
mod storage;
mod cli;
mod participant;
