//! The background worker: one per cluster, registered in `_PG_init`, connected to the
//! database named by `peersync.database`.
//!
//! The loop: wait on the latch with a short timeout, reload settings on SIGHUP, stop on SIGTERM
//! or postmaster death, and check whether the extension exists in its database (it does
//! nothing there until it does, and says so once in the log). Once it does, and a usable
//! registration key is set, `net` starts the HTTP server and pulls from the static peers on a
//! tokio runtime; this thread answers their questions with SPI on every tick, and when this
//! node's changes move (a local commit, or received events to relay) it pokes the peers,
//! which pull at once. Multicast discovery is not built yet.

mod net;

use crate::gucs;
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags};
use pgrx::prelude::*;
use pgrx::{PGRXSharedMemory, PgLwLock, pg_shmem_init};
use serde_json::{Value, json};
use std::time::Duration;
use sync_bridge::transport::now_ms;

/// How long the loop sleeps between ticks (signals wake it at once; the network threads
/// cannot, so this bounds how long their questions wait, once per hop of an exchange).
const TICK: Duration = Duration::from_millis(5);
/// Ticks between copies of the network state into shared memory (for `sync_status()`).
const PUBLISH_EVERY: u32 = 20;
const MAX_PEERS: usize = 16;
const TEXT: usize = 160;
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

/// Fixed-size text for shared memory.
#[derive(Copy, Clone)]
#[repr(C)]
struct Text([u8; TEXT]);

impl Default for Text {
    fn default() -> Self {
        Text([0; TEXT])
    }
}

impl Text {
    fn set(&mut self, s: &str) {
        let mut end = s.len().min(TEXT - 1);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        self.0 = [0; TEXT];
        self.0[..end].copy_from_slice(&s.as_bytes()[..end]);
    }

    fn get(&self) -> String {
        let end = self.0.iter().position(|b| *b == 0).unwrap_or(TEXT);
        String::from_utf8_lossy(&self.0[..end]).into_owned()
    }
}

#[derive(Copy, Clone, Default)]
#[repr(C)]
struct PeerShm {
    address: Text,
    /// 0 unknown, 1 up, 2 down.
    state: u8,
    last_ok_ms: u64,
    last_error: Text,
    pulls: u64,
    events_received: u64,
}

#[derive(Copy, Clone, Default)]
#[repr(C)]
struct WorkerShm {
    pid: i32,
    state: u8,
    started_at_ms: u64,
    /// Times the worker started since the postmaster did (more than 1: it was restarted).
    starts: u32,
    listening: Text,
    network_error: Text,
    requests: u64,
    /// Rejected requests: wrong key, stale, replay, malformed, version.
    rejected: [u64; 5],
    npeers: u32,
    peers: [PeerShm; MAX_PEERS],
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
    let mut network: Option<net::Net> = None;
    let mut network_tried = false;
    // What this node held at the last tick: when it moves (a local commit, or events received
    // that peers may relay), the peers are told at once.
    let mut seen = (0, 0);
    let mut ticks = 0u32;
    // wait_latch returns false on SIGTERM or postmaster death.
    while BackgroundWorker::wait_latch(Some(TICK)) {
        if BackgroundWorker::sighup_received() {
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
            log!("pg_peersync worker reloaded its settings; {}", networking_summary());
            // Settings may have changed: start the network again with them.
            if let Some(n) = network.take() {
                n.stop();
            }
            network_tried = false;
        }
        if let Some(n) = &network {
            for ask in n.asks() {
                answer(ask);
            }
            let now = (crate::sequencer::local_commits(), crate::sequencer::remote_have_generation());
            if now != seen {
                seen = now;
                n.poke_peers();
            }
            ticks = ticks.wrapping_add(1);
            if ticks.is_multiple_of(PUBLISH_EVERY) {
                publish(n);
            }
        }
        if state == State::Running {
            if network.is_none() && !network_tried {
                network_tried = true;
                network = start_network();
            }
            continue;
        }
        if last_check.is_some_and(|t| t.elapsed() < EXTENSION_CHECK) {
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
    if let Some(n) = network.take() {
        n.stop();
    }
    set_state(State::NotStarted);
    WORKER.exclusive().pid = 0;
    log!("pg_peersync worker stopped");
}

/// Start the server and the pullers when the settings allow; the reason goes to the log and
/// to `sync_status()` when they do not.
fn start_network() -> Option<net::Net> {
    let keys = match gucs::registration_key() {
        Ok(key) if gucs::enabled() => sync_bridge::auth::Keys::derive(&key).ok(),
        _ => None,
    }?;
    match net::Net::start(keys, &gucs::listen_address(), gucs::port(), &gucs::peers(), gucs::sync_interval()) {
        Ok(n) => {
            log!("pg_peersync worker listening on {}, {} static peer(s)", n.listen, gucs::peers().len());
            let mut w = WORKER.exclusive();
            w.listening.set(&n.listen.to_string());
            w.network_error.set("");
            Some(n)
        }
        Err(e) => {
            warning!("pg_peersync worker: {e}");
            WORKER.exclusive().network_error.set(&e);
            None
        }
    }
}

/// Answer one question of the network threads, in a transaction of its own.
fn answer(ask: net::Ask) {
    let batch = gucs::batch_size();
    let (reply, result) = match ask {
        net::Ask::Have(reply) => (reply, query("SELECT sync_have()::text", None, None)),
        net::Ask::Changes(have, reply) => {
            (reply, query("SELECT sync_changes($1::jsonb, $2)::text", Some(have.to_string()), Some(batch)))
        }
        net::Ask::Apply(b, reply) => (reply, query("SELECT sync_apply($1::jsonb)::text", Some(b.to_string()), None)),
    };
    let _ = reply.send(result);
}

fn query(sql: &str, text: Option<String>, int: Option<i32>) -> Result<Value, String> {
    BackgroundWorker::transaction(move || {
        // An error rolls back this question alone and goes back to the asker.
        let out = crate::apply::subxact::run(|| {
            let mut args = Vec::new();
            if let Some(t) = text.clone() {
                args.push(t.into());
            }
            if let Some(i) = int {
                args.push(i.into());
            }
            Spi::get_one_with_args::<String>(sql, &args)
        });
        match out {
            Ok(Ok(Some(text))) => serde_json::from_str(&text).map_err(|e| e.to_string()),
            Ok(Ok(None)) => Err("no answer".into()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(f) => Err(format!("{} ({})", f.message, f.sqlstate)),
        }
    })
}

/// Copy the network threads' state into shared memory for `sync_status()`.
fn publish(n: &net::Net) {
    let counters = n.counters.lock().expect("counters").clone();
    let peers = n.peers.lock().expect("peer states").clone();
    let mut w = WORKER.exclusive();
    w.requests = counters.requests;
    for (i, reason) in REASONS.iter().enumerate() {
        w.rejected[i] = counters.rejected.get(reason).copied().unwrap_or(0);
    }
    w.npeers = peers.len().min(MAX_PEERS) as u32;
    for (slot, p) in w.peers.iter_mut().zip(&peers) {
        slot.address.set(&p.address);
        slot.state = match p.state {
            "up" => 1,
            "down" => 2,
            _ => 0,
        };
        slot.last_ok_ms = p.last_ok_ms.unwrap_or(0);
        slot.last_error.set(p.last_error.as_deref().unwrap_or(""));
        slot.pulls = p.pulls;
        slot.events_received = p.events_received;
    }
}

const REASONS: [&str; 5] = ["wrong_key", "stale", "replay", "malformed", "version"];

/// Why there is or is not networking, in one line (never showing the key).
fn networking_summary() -> String {
    match networking_off_reason() {
        Some(why) => format!("networking is off: {why}"),
        None => "networking is on (static peers; multicast discovery is not built yet)".into(),
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
    let peers: Vec<Value> = w.peers[..w.npeers as usize]
        .iter()
        .map(|p| {
            let peer_state = ["unknown", "up", "down"][p.state.min(2) as usize];
            json!({
                "address": p.address.get(),
                "found_by": "peersync.peers",
                "state": peer_state,
                "last_sync_ms": (p.last_ok_ms != 0).then_some(p.last_ok_ms),
                "lag_s": (p.last_ok_ms != 0).then(|| now_ms().saturating_sub(p.last_ok_ms) / 1000),
                "last_error": Some(p.last_error.get()).filter(|e| !e.is_empty()),
                "pulls": p.pulls,
                "events_received": p.events_received,
            })
        })
        .collect();
    let rejected: serde_json::Map<String, Value> =
        REASONS.iter().zip(w.rejected).map(|(r, n)| (r.to_string(), json!(n))).collect();
    json!({
        "state": state,
        "pid": (w.pid != 0).then_some(w.pid),
        "database": gucs::database(),
        "started_at_ms": (w.started_at_ms != 0).then_some(w.started_at_ms),
        "starts": w.starts,
        "networking": networking_summary(),
        "listening": Some(w.listening.get()).filter(|l| !l.is_empty()),
        "network_error": Some(w.network_error.get()).filter(|e| !e.is_empty()),
        "requests": w.requests,
        "rejected": rejected,
        "peers": peers,
    })
}
