//! pg_peersync: multi-master replication between PostgreSQL databases on a LAN.
//!
//! Module map (one concern each):
//! - `gucs`: every `peersync.*` setting;
//! - `error`: the error enum raised at the SQL boundary, with SQLSTATEs and hints;
//! - `clock`: node identity and the hybrid logical clock kept in shared memory;
//! - `sequencer`: numbers local transactions and computes the committed prefix (have-vector);
//! - `capture`: table tracking and the capture trigger;
//! - `apply`: `sync_apply()`, conflict resolution and review;
//! - `changes`: `sync_have()` and `sync_changes()`, the batches peers pull;
//! - `status`: `sync_status()`;
//! - `worker`: the background worker: its loop, SPI answers and status, and `net`, the peers
//!   it finds and syncs with.

use pgrx::prelude::*;

mod apply;
mod capture;
mod changes;
mod clock;
mod copy;
mod ddl;
mod error;
mod gucs;
mod identity;
mod log;
mod sequencer;
mod snapshot;
mod status;
mod verify;
mod worker;

pgrx::pg_module_magic!(name, version);

// Hand-written DDL. `bootstrap` runs before the generated function definitions.
extension_sql_file!("../sql/schema.sql", name = "schema", bootstrap);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    // Capture numbers transactions in shared memory, so the library must be preloaded.
    if unsafe { !pg_sys::process_shared_preload_libraries_in_progress } {
        error::SyncError::NotPreloaded.report();
    }
    gucs::init();
    clock::init_shmem();
    sequencer::init_shmem();
    capture::init_backend_hooks();
    apply::init_callbacks();
    worker::init_shmem();
    worker::register();
}

#[cfg(any(test, feature = "pg_test"))]
mod tests;

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec!["shared_preload_libraries = 'pg_peersync'", "peersync.node_name = 'test-node'"]
    }
}
