//! pg_peersync's pgrx-free core.
//!
//! Everything here is plain Rust, tested with `cargo test -p sync_bridge`, and never calls into
//! PostgreSQL: the wire types of events and batches and their canonical checksum (`event`,
//! `canonical`), the hybrid logical clock (`hlc`), causal delivery order (`delivery`), who wins
//! a conflict (`resolve`), the membership crypto derived from the registration key (`auth`),
//! finding peers by multicast (`discovery`), the HTTP server and client between nodes
//! (`transport`), joining from a snapshot (`snapshot`) and comparing tables (`verify`). The extension loads state through SPI and calls these functions.

pub mod auth;
pub mod canonical;
pub mod counter;
pub mod delivery;
pub mod discovery;
pub mod event;
pub mod hlc;
pub mod ids;
pub mod log;
pub mod resolve;
pub mod serve;
pub mod snapshot;
pub mod transport;
pub mod verify;

pub use event::{Batch, BatchError, Event, FORMAT_VERSION, Op};
pub use hlc::Hlc;
