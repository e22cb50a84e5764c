//! Integration tests: real PostgreSQL servers started by the harness, the real rowsync binary.
//! One test binary (modules below) keeps link time down.

// Tests may unwrap: a panic is a test failure with its message.
#![allow(clippy::unwrap_used)]

mod harness;

mod batches;
mod behaviour;
mod cli;
mod config;
mod dashboard;
mod ddl;
mod faults;
mod guarantees;
mod http;
mod isolation;
mod journal;
mod lifecycle;
mod mapping;
mod names;
mod operations;
mod ownership;
mod partitions;
mod repair;
mod schema;
mod tls;
mod types;
