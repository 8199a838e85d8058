//! Integration tests: the real router, SQLite and PostgreSQL, the real model, real clients.

mod browser;
mod cli;
mod cluster;
mod collab;
mod common;
mod console;
mod contrast;
mod engine;
mod evaluate;
mod export;
mod faults;
mod hostile;
mod layers;
mod online;
mod openai;
mod participant;
mod protocol;
mod reward;
mod simulate;
mod storage;
mod train;
