//! The background worker: one per cluster, registered in `_PG_init`, connected to the
//! database named by `peersync.database`.
//!
//! This version runs the loop and reports its state; it does no networking yet (discovery and
//! the encrypted transport come next, on a tokio runtime beside this loop; see DESIGN.md
//! section 6). The loop: wait on the latch with a short timeout, reload settings on SIGHUP,
//! stop on SIGTERM or postmaster death, and check whether the extension exists in its database
//! (it does nothing there until it does, and says so once in the log).

use crate::gucs;
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags};
use pgrx::prelude::*;
use pgrx::{PGRXSharedMemory, PgLwLock, pg_shmem_init};
use serde_json::{Value, json};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long the loop sleeps between ticks (signals wake it at once).
const TICK: Duration = Duration::from_millis(250);
/// How often it checks for the extension while waiting for it.
const EXTENSION_CHECK: Duration = Duration::from_secs(2);

#[derive(Copy, Clone, Default, PartialEq, Eq, Debug)]
#[repr(u8)]
enum State {
    #[default]
    NotStarted = 0,
    /// Connected; the extension does not exist in `peersync.database`.
    WaitingForExtension = 1,
    Running = 2,
}

#[derive(Copy, Clone, Default)]
#[repr(C)]
struct WorkerShm {
    pid: i32,
    state: u8,
    started_at_ms: u64,
    /// Times the worker started since the postmaster did (more than 1: it was restarted).
    starts: u32,
}

unsafe impl PGRXSharedMemory for WorkerShm {}

static WORKER: PgLwLock<WorkerShm> = unsafe { PgLwLock::new(c"pg_peersync_worker") };

pub fn init_shmem() {
    pg_shmem_init!(WORKER);
}

/// Register the static worker (from `_PG_init`, while preloading).
pub fn register() {
    BackgroundWorkerBuilder::new("pg_peersync worker")
        .set_type("pg_peersync worker")
        .set_function("peersync_worker_main")
        .set_library("pg_peersync")
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        // A crash restarts it; everything it needs is durable in the database.
        .set_restart_time(Some(Duration::from_secs(5)))
        .load();
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn set_state(state: State) {
    WORKER.exclusive().state = state as u8;
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn peersync_worker_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let database = gucs::database();
    BackgroundWorker::connect_worker_to_spi(Some(&database), None);
    {
        let mut w = WORKER.exclusive();
        w.pid = unsafe { pg_sys::MyProcPid };
        w.state = State::NotStarted as u8;
        w.started_at_ms = now_ms();
        w.starts += 1;
    }
    log!("pg_peersync worker started in database \"{database}\"");
    let mut state = State::NotStarted;
    let mut last_check: Option<std::time::Instant> = None;
    // wait_latch returns false on SIGTERM or postmaster death.
    while BackgroundWorker::wait_latch(Some(TICK)) {
        if BackgroundWorker::sighup_received() {
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
            log!("pg_peersync worker reloaded its settings; {}", networking_summary());
        }
        if state == State::Running || last_check.is_some_and(|t| t.elapsed() < EXTENSION_CHECK) {
            continue;
        }
        last_check = Some(std::time::Instant::now());
        let present = BackgroundWorker::transaction(|| {
            Spi::get_one::<bool>("SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_peersync')")
                .ok()
                .flatten()
                .unwrap_or(false)
        });
        let next = if present { State::Running } else { State::WaitingForExtension };
        if next != state {
            match next {
                State::WaitingForExtension => log!(
                    "pg_peersync worker: the extension is not created in database \"{database}\"; \
                     waiting (run CREATE EXTENSION pg_peersync there, or set peersync.database)"
                ),
                _ => log!("pg_peersync worker: extension found in database \"{database}\"; {}", networking_summary()),
            }
            state = next;
            set_state(state);
        }
    }
    set_state(State::NotStarted);
    WORKER.exclusive().pid = 0;
    log!("pg_peersync worker stopped");
}

/// Why there is or is not networking, in one line (never showing the key).
fn networking_summary() -> String {
    match networking_off_reason() {
        Some(why) => format!("networking is off: {why}"),
        None => "networking is not built in this version".into(),
    }
}

fn networking_off_reason() -> Option<String> {
    if !gucs::enabled() {
        return Some("peersync.enabled is off".into());
    }
    match gucs::registration_key() {
        Ok(key) => sync_bridge::auth::check_registration_key(&key).err().map(|e| e.to_string()),
        Err(why) => Some(why),
    }
}

/// The worker's part of `sync_status()`.
pub fn status() -> Value {
    let w = *WORKER.share();
    let state = match w.state {
        1 => "waiting for the extension in peersync.database",
        2 => "running",
        _ if w.pid == 0 => "not running",
        _ => "starting",
    };
    json!({
        "state": state,
        "pid": (w.pid != 0).then_some(w.pid),
        "database": gucs::database(),
        "started_at_ms": (w.started_at_ms != 0).then_some(w.started_at_ms),
        "starts": w.starts,
        "networking": networking_summary(),
    })
}
