//! The background worker: one per cluster, registered in `_PG_init`, connected to the
//! database named by `peersync.database`.
//!
//! The loop: wait on the latch with a short timeout, reload settings on SIGHUP, stop on SIGTERM
//! or postmaster death, and check whether the extension exists in its database (it does
//! nothing there until it does, and says so once in the log). Once it does, and a usable
//! registration key is set, `net` starts the HTTP server, multicast discovery and a puller per
//! peer on a tokio runtime; this thread answers their questions with SPI on every tick, records
//! their exchanges in `sync_sessions`, and when this node's changes move (a local commit, or
//! received events to relay) it pokes the peers, which pull at once.

pub(crate) mod net;

use crate::gucs;
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags};
use pgrx::prelude::*;
use pgrx::{PGRXSharedMemory, PgLwLock, pg_shmem_init};
use serde_json::{Value, json};
use std::time::Duration;
use sync_bridge::transport::now_ms;

/// How long the loop sleeps between ticks (signals wake it at once; the network threads
/// wake it too, with SIGUSR1, when they have a question).
const TICK: Duration = Duration::from_millis(5);
/// Ticks between copies of the network state into shared memory (for `sync_status()`).
const PUBLISH_EVERY: u32 = 20;
/// Ticks between housekeeping: the schema fingerprint refreshed, `sync_sessions` pruned.
const HOUSEKEEPING_EVERY: u32 = 2000;
/// Exchanges kept in `sync_sessions`.
const SESSIONS_KEPT: i64 = 10_000;
const TEXT: usize = 160;
/// Room for the network status (JSON) in shared memory.
const STATUS_BYTES: usize = 32 * 1024;
/// How often it checks for the extension while waiting for it.
const EXTENSION_CHECK: Duration = Duration::from_secs(2);
/// How long without a question from the network threads before the worker folds what the row
/// registers lack (`apply::fold_while_quiet`), and how often it looks while nothing is left;
/// after an error it waits `FOLD_AFTER_ERROR`.
const FOLD_WHEN_QUIET: Duration = Duration::from_secs(1);
/// How often it tries again the held transactions that failed for a reason that passes.
const RETRY_EVERY: Duration = Duration::from_secs(5);
const FOLD_AFTER_ERROR: Duration = Duration::from_secs(60);

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

#[derive(Copy, Clone)]
#[repr(C)]
struct WorkerShm {
    pid: i32,
    state: u8,
    started_at_ms: u64,
    /// Times the worker started since the postmaster did (more than 1: it was restarted).
    starts: u32,
    network_error: Text,
    /// `Net::status()` as JSON text, `status_len` bytes (0: no network running).
    status_len: u32,
    status: [u8; STATUS_BYTES],
}

impl Default for WorkerShm {
    fn default() -> Self {
        WorkerShm {
            pid: 0,
            state: 0,
            started_at_ms: 0,
            starts: 0,
            network_error: Text::default(),
            status_len: 0,
            status: [0; STATUS_BYTES],
        }
    }
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
    gucs::jit_off_for_session();
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
    let schema = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let mut quiet_since = std::time::Instant::now();
    // When to fold next (see FOLD_WHEN_QUIET).
    let mut next_fold = std::time::Instant::now();
    let mut next_retry = std::time::Instant::now() + RETRY_EVERY;
    // Whether the sign that another node uses this identity was logged (once per start).
    let mut identity_warned = false;
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
            unpublish();
        }
        // Set when this node's identity changed or its doubt was cleared: networking restarts.
        let mut renew = false;
        if let Some(n) = &network {
            for ask in n.asks() {
                quiet_since = std::time::Instant::now();
                answer(ask);
            }
            let sessions = n.sessions();
            if !sessions.is_empty() {
                record(&sessions);
            }
            if !identity_warned && let Some(d) = n.identity_doubt() {
                identity_warned = true;
                warn_identity(&d);
            }
            let now = (crate::sequencer::local_commits(), crate::sequencer::remote_have_generation());
            if now != seen {
                seen = now;
                n.poke_peers();
            }
            ticks = ticks.wrapping_add(1);
            if ticks.is_multiple_of(HOUSEKEEPING_EVERY) {
                housekeeping(&schema);
                drop_forgotten(n);
                let (id, doubt) = BackgroundWorker::transaction(|| {
                    let e = crate::clock::ext();
                    (e.node_id, e.doubt.is_some())
                });
                // A new identity, or a doubt an operator cleared (`sync_keep_identity()`).
                renew = id != n.node_id || (identity_warned && !doubt);
            }
            if ticks.is_multiple_of(PUBLISH_EVERY) {
                publish(n, &schema.lock().expect("schema"));
            }
        }
        if renew && let Some(n) = network.take() {
            log!("pg_peersync worker: this node's identity was settled; networking starts again");
            n.stop();
            network_tried = false;
            identity_warned = false;
            unpublish();
        }
        if state == State::Running {
            if network.is_none() && !network_tried {
                network_tried = true;
                housekeeping(&schema);
                network = start_network(&schema);
            }
            let now = std::time::Instant::now();
            if now >= next_fold && now.duration_since(quiet_since) >= FOLD_WHEN_QUIET {
                // A slice at a time, each in its own transaction: questions are answered between.
                next_fold = match fold_while_quiet() {
                    Ok(true) => now,
                    Ok(false) => now + FOLD_WHEN_QUIET,
                    Err(()) => now + FOLD_AFTER_ERROR,
                };
            }
            if now >= next_retry {
                next_retry = now + RETRY_EVERY;
                retry_transient();
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
                _ => {
                    log!("pg_peersync worker: extension found in database \"{database}\"; {}", networking_summary());
                    check_place();
                    adopt_orphans();
                }
            }
            state = next;
            set_state(state);
        }
    }
    if let Some(n) = network.take() {
        n.stop();
    }
    unpublish();
    set_state(State::NotStarted);
    WORKER.exclusive().pid = 0;
    log!("pg_peersync worker stopped");
    // Exit code 1: the postmaster starts the worker again (after its restart time) unless it is
    // shutting down, so a worker terminated alone (DROP DATABASE ... WITH (FORCE) while a dump
    // is restored, pg_terminate_backend) comes back. With 0 it would be gone until a restart.
    unsafe { pg_sys::proc_exit(1) };
}

/// Start the server, discovery and the pullers when the settings allow; the reason goes to the
/// log and to `sync_status()` when they do not.
fn start_network(schema: &std::sync::Arc<std::sync::Mutex<String>>) -> Option<net::Net> {
    let keys = match gucs::registration_key() {
        Ok(key) if gucs::enabled() => sync_bridge::auth::Keys::derive(&key).ok(),
        _ => None,
    }?;
    let fail = |e: String| {
        warning!("pg_peersync worker: {e}");
        WORKER.exclusive().network_error.set(&e);
        None
    };
    let advertise = match gucs::advertise_address() {
        a if a.is_empty() => None,
        a => match a.parse() {
            Ok(ip) => Some(ip),
            Err(_) => return fail(format!("peersync.advertise_address \"{a}\" is not an IP address")),
        },
    };
    let multicast = match gucs::multicast_group() {
        g if g.is_empty() => None,
        g => match g.parse::<std::net::Ipv4Addr>() {
            Ok(ip) if ip.is_multicast() => Some((ip, gucs::multicast_port(), gucs::announce_interval())),
            _ => return fail(format!("peersync.multicast_group \"{g}\" is not an IPv4 multicast address")),
        },
    };
    let node_id = BackgroundWorker::transaction(|| crate::clock::ext().node_id);
    let settings = net::Settings {
        keys,
        listen: gucs::listen_addresses(),
        port: gucs::port(),
        peers: gucs::peers(),
        interval: gucs::sync_interval(),
        multicast,
        identity: sync_bridge::discovery::Identity {
            node_id,
            name: gucs::node_name(),
            http_port: gucs::port(),
            schema: schema.clone(),
            advertise,
        },
    };
    match net::Net::start(settings) {
        Ok(n) => {
            let listening: Vec<String> = n.listen.iter().map(|a| a.to_string()).collect();
            log!(
                "pg_peersync worker listening on {}; {} static peer(s); multicast discovery {}",
                listening.join(", "),
                gucs::peers().len(),
                match multicast {
                    Some((g, p, _)) => format!("on {g}:{p}"),
                    None => "off".into(),
                }
            );
            WORKER.exclusive().network_error.set("");
            Some(n)
        }
        Err(e) => fail(e),
    }
}

/// Answer one question of the network threads, in a transaction of its own.
fn answer(ask: net::Ask) {
    let batch = gucs::batch_size();
    let (reply, result) = match ask {
        net::Ask::Pull(stalled, reply) => (
            reply,
            call(|| {
                let mut request = crate::apply::pull_request(stalled.as_ref())?;
                // Whether to copy the tables from a peer's snapshot first ("any" peer that holds
                // something, or that one).
                request["join"] = match crate::snapshot::wanted()? {
                    Some(Some(id)) => json!(id.to_string()),
                    Some(None) => json!("any"),
                    None => Value::Null,
                };
                Ok(request.to_string())
            }),
        ),
        net::Ask::Snapshot(q, reply) => (reply, call(|| crate::snapshot::serve(&q))),
        net::Ask::Join(step, reply) => (reply, call(|| join_step(step))),
        net::Ask::Verify(q, reply) => (reply, call(|| crate::verify::serve(&q))),
        // What a peer may know of this node: who it is and what it holds (no data, no settings).
        net::Ask::Status(reply) => (
            reply,
            query(
                "SELECT jsonb_build_object('node_id', s -> 'node_id', 'node_name', s -> 'node_name',
                        'version', s -> 'version', 'protocol', $1, 'have', s -> 'have')::text
                   FROM (SELECT @.sync_status() AS s) x",
                None,
                Some(sync_bridge::auth::PROTOCOL_VERSION as i32),
            ),
        ),
        // The answer also carries this node's whole have-vector, so the puller can tell what
        // each side lacks.
        net::Ask::Changes(have, reply) => {
            (reply, query("SELECT @._sync_changes_text($1, $2, true)", Some(have.to_string()), Some(batch)))
        }
        // The batch text goes to apply as it came (sync_apply(jsonb) would parse and print it).
        net::Ask::Apply(b, reply) => (reply, query("SELECT @._sync_apply_text($1)::text", Some(b), None)),
    };
    let _ = reply.send(result);
    // A large batch leaves freed memory with the allocator: give it back to the system.
    // SAFETY: malloc_trim only releases free heap memory.
    unsafe {
        libc::malloc_trim(1 << 20);
    }
}

/// One step of a join from a peer's snapshot, as JSON for the puller.
fn join_step(step: net::JoinStep) -> Result<String, crate::error::SyncError> {
    use crate::snapshot::{self, Began};
    let bad = |e: serde_json::Error| crate::error::SyncError::BadBatch(e.to_string());
    Ok(match step {
        net::JoinStep::Begin { manifest, name, rejoin } => {
            let m: sync_bridge::snapshot::Manifest = serde_json::from_str(&manifest).map_err(bad)?;
            match snapshot::begin(&m, &name, rejoin)? {
                Began::Copy(tables) => {
                    log!("pg_peersync worker: copying {} table(s) from the snapshot of peer {name}", tables.len());
                    json!({"tables": tables})
                }
                Began::Nothing => json!({"nothing": true}),
                Began::SourceLacks(v) => json!({"source_lacks": v}),
            }
        }
        net::JoinStep::Load { table, tombstones, n, page } => {
            snapshot::load(&table, tombstones, n, &page)?;
            json!({"n": n})
        }
        net::JoinStep::Finish(text) => {
            let f: sync_bridge::snapshot::Finish = serde_json::from_str(&text).map_err(bad)?;
            let rows = snapshot::finish(&f)?;
            log!("pg_peersync worker: copy done ({rows} rows); catching up from the peers");
            json!({"rows": rows})
        }
    }
    .to_string())
}

/// Run `f` in a transaction of its own; an error rolls it back and goes back to the asker.
fn call(f: impl FnOnce() -> Result<String, crate::error::SyncError>) -> Result<String, String> {
    // A PostgreSQL error inside `f` is caught by the subtransaction, not unwound through here.
    let f = std::panic::AssertUnwindSafe(f);
    BackgroundWorker::transaction(move || match crate::apply::subxact::run(|| f().unwrap_or_else(|e| e.report())) {
        Ok(text) => Ok(text),
        Err(f) => Err(format!("{} ({})", f.message, f.sqlstate)),
    })
}

/// Run one statement (`@.` in `sql` stands for the extension's schema) and return its text
/// result.
fn query(sql: &str, text: Option<String>, int: Option<i32>) -> Result<String, String> {
    BackgroundWorker::transaction(move || {
        let sql = sql.replace("@.", &format!("{}.", crate::clock::ext().schema));
        // An error rolls back this question alone and goes back to the asker.
        let out = crate::apply::subxact::run(|| {
            let mut args = Vec::new();
            if let Some(t) = text.clone() {
                args.push(t.into());
            }
            if let Some(i) = int {
                args.push(i.into());
            }
            Spi::get_one_with_args::<String>(&sql, &args)
        });
        match out {
            Ok(Ok(Some(text))) => Ok(text),
            Ok(Ok(None)) => Err("no answer".into()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(f) => Err(format!("{} ({})", f.message, f.sqlstate)),
        }
    })
}

/// Say loudly, once, that another node seems to use this node's identity.
fn warn_identity(d: &sync_bridge::discovery::Doubt) {
    use sync_bridge::discovery::Doubt;
    let what = match d {
        Doubt::Twin { address, name, .. } => {
            format!("another node announces this node's identity from {address} (named \"{name}\")")
        }
        Doubt::Behind { peer, theirs, ours, .. } => {
            format!("peer {peer} holds this node's own transactions up to {theirs}, this node only up to {ours}")
        }
    };
    warn_refusing(
        &what,
        format!(
            "{}. On the copy (or the restored node), a superuser runs SELECT sync_new_identity(); \
             see sync_status() -> 'worker' -> 'identity'.",
            d.hint()
        ),
    );
    BackgroundWorker::transaction(|| {
        if let Err(e) = crate::identity::record_doubt(&what) {
            warning!("pg_peersync worker: cannot record the identity doubt: {e}");
        }
    });
}

/// Count the history of the identity a restored database had before as another node's (see
/// `apply::adopt_orphans`), and say so.
fn adopt_orphans() {
    BackgroundWorker::transaction(|| match crate::apply::subxact::run(crate::apply::adopt_orphans) {
        Ok(Ok(adopted)) => {
            for (origin, upto) in adopted {
                log!(
                    "pg_peersync worker: this database holds transactions of node {origin} up to {upto} under \
                     another identity (restored from a dump?): they count as that node's, the rest comes from the peers"
                );
            }
        }
        Ok(Err(e)) => warning!("pg_peersync worker: cannot count a restored history: {e}"),
        Err(f) => warning!("pg_peersync worker: cannot count a restored history: {}", f.message),
    });
}

/// Record where this node's identity lives, or warn once that the database runs elsewhere.
fn check_place() {
    let moved = BackgroundWorker::transaction(|| {
        crate::identity::check_place().unwrap_or_else(|e| {
            warning!("pg_peersync worker: cannot check where this identity lives: {e}");
            None
        })
    });
    if let Some(why) = moved {
        warn_refusing(
            &why,
            "On a copy, a superuser runs SELECT sync_new_identity(); on a database that moved here (the old \
             place no longer runs it), SELECT sync_keep_identity()."
                .into(),
        );
    }
}

/// The WARNING that says why changes to tracked tables are refused from now on.
fn warn_refusing(why: &str, hint: String) {
    pgrx::pg_sys::panic::ErrorReport::new(
        PgSqlErrorCode::ERRCODE_WARNING,
        format!("pg_peersync: {why}; changes to tracked tables are refused until this is settled"),
        "pg_peersync",
    )
    .set_hint(hint)
    .report(PgLogLevel::WARNING);
}

/// Write finished exchanges into `sync_sessions`.
fn record(sessions: &[net::Session]) {
    let rows = serde_json::to_string(sessions).expect("sessions serialise");
    BackgroundWorker::transaction(move || {
        let s = crate::clock::ext().schema;
        let sql = format!(
            "INSERT INTO {s}.sync_sessions (peer, peer_id, address, direction, started_at, duration_ms,
                                            events_in, events_out, bytes_in, bytes_out, error)
             SELECT peer, peer_id::uuid, address, direction, to_timestamp(started_ms / 1000.0), duration_ms,
                    events_in, events_out, bytes_in, bytes_out, error
               FROM jsonb_to_recordset($1::jsonb) AS s(peer text, peer_id text, address text, direction text,
                    started_ms bigint, duration_ms bigint, events_in bigint, events_out bigint,
                    bytes_in bigint, bytes_out bigint, error text)"
        );
        if let Err(e) = crate::apply::subxact::run(|| Spi::run_with_args(&sql, &[rows.clone().into()])) {
            warning!("pg_peersync worker: cannot record sessions: {}", e.message);
        }
        for x in sessions {
            let (Some(id), Some(have)) = (x.peer_id.as_deref().and_then(|i| uuid::Uuid::parse_str(i).ok()), &x.have)
            else {
                continue;
            };
            let name = (x.peer != id.to_string()).then_some(x.peer.as_str());
            if let Err(e) = crate::apply::subxact::run(|| crate::log::retention::record_peer(&s, id, name, have)) {
                warning!("pg_peersync worker: cannot record what peer {id} holds: {}", e.message);
            }
        }
    })
}

/// One slice of the fold `sync_apply` would otherwise do when it next needs the registers;
/// true when more is left. Errors are logged (the next apply folds, and reports them).
fn fold_while_quiet() -> Result<bool, ()> {
    let result = BackgroundWorker::transaction(|| {
        // An error rolls the slice back whole.
        match crate::apply::subxact::run(|| crate::apply::fold_while_quiet().unwrap_or_else(|e| e.report())) {
            Ok(more) => Ok(more),
            Err(f) => {
                warning!("pg_peersync worker: cannot fold the row registers: {} ({})", f.message, f.sqlstate);
                Err(())
            }
        }
    });
    // A slice holds its changes in memory (one large transaction is one slice): give the freed
    // memory back, as after a large batch.
    // SAFETY: malloc_trim only releases free heap memory.
    unsafe {
        libc::malloc_trim(1 << 20);
    }
    result
}

/// Apply the held transactions that failed for a reason that passes, if they now can.
fn retry_transient() {
    BackgroundWorker::transaction(|| {
        match crate::apply::subxact::run(|| crate::apply::retry_transient().unwrap_or_else(|e| e.report())) {
            Ok(n) if n > 0 => log!("pg_peersync worker: {n} held transaction(s) applied on retry"),
            Ok(_) => {}
            Err(f) => warning!("pg_peersync worker: cannot retry held transactions: {} ({})", f.message, f.sqlstate),
        }
    });
}

/// Delete from the log what no peer needs any more (`retention`), a slice per transaction,
/// after forgetting the peers silent for longer than the retention.
fn prune_log() {
    let forgotten = BackgroundWorker::transaction(|| {
        let s = crate::clock::ext().schema;
        crate::apply::subxact::run(|| crate::log::retention::forget_silent(&s).unwrap_or_else(|e| e.report()))
    });
    match forgotten {
        Ok(peers) => {
            for p in peers {
                log!("pg_peersync worker: forgot peer {p}: silent for longer than peersync.log_retention");
            }
        }
        Err(f) => warning!("pg_peersync worker: cannot forget silent peers: {} ({})", f.message, f.sqlstate),
    }
    for _ in 0..50 {
        let deleted = BackgroundWorker::transaction(|| {
            let e = crate::clock::ext();
            crate::apply::subxact::run(|| {
                crate::log::retention::prune(&e.schema, e.node_id).unwrap_or_else(|e| e.report())
            })
        });
        match deleted {
            Ok(n) if n > 0 => continue,
            Ok(_) => return,
            Err(f) => {
                warning!("pg_peersync worker: cannot prune the change log: {} ({})", f.message, f.sqlstate);
                return;
            }
        }
    }
}

/// Drop from the roster the announced peers that were forgotten (`sync_forget_peer`, or silent
/// past the retention) and are down.
fn drop_forgotten(n: &net::Net) {
    let kept = BackgroundWorker::transaction(|| {
        let s = crate::clock::ext().schema;
        crate::apply::subxact::run(|| crate::log::retention::kept_peers(&s))
    });
    // Nothing is dropped when the list cannot be read.
    if let Ok(Ok(kept)) = kept {
        for key in n.drop_forgotten(&kept, gucs::peer_timeout()) {
            log!("pg_peersync worker: peer {key} left the roster: forgotten and not heard from");
        }
    }
}

/// Now and then: refresh the schema fingerprint announced to peers, prune `sync_sessions` and
/// the change log.
fn housekeeping(schema: &std::sync::Mutex<String>) {
    prune_log();
    adopt_orphans();
    let fingerprint = BackgroundWorker::transaction(|| {
        let s = crate::clock::ext().schema;
        let _ = crate::apply::subxact::run(|| {
            Spi::run(&format!(
                "DELETE FROM {s}.sync_sessions WHERE id <= (SELECT max(id) - {SESSIONS_KEPT} FROM {s}.sync_sessions)"
            ))
        });
        // The tracked tables' names and captured columns with their types.
        crate::apply::subxact::run(|| {
            Spi::get_one::<String>(&format!(
                "SELECT coalesce(left(md5(string_agg(t.table_name || '(' || coalesce((
                        SELECT string_agg(quote_ident(a.attname) || ' ' || format_type(a.atttypid, a.atttypmod), ','
                                          ORDER BY a.attname)
                          FROM pg_attribute a
                         WHERE a.attrelid = t.relid AND a.attnum > 0 AND NOT a.attisdropped
                           AND a.attname <> ALL (t.exclude_columns)), '') || ')', ';' ORDER BY t.table_name)), 16),
                        'none')
                   FROM {s}.sync_tables t"
            ))
        })
        .ok()
        .and_then(|r| r.ok().flatten())
    });
    if let Some(f) = fingerprint {
        *schema.lock().expect("schema") = f;
    }
}

/// Copy the network threads' state into shared memory for `sync_status()`.
fn publish(n: &net::Net, schema: &str) {
    let mut status = n.status(schema, gucs::peer_timeout());
    status["schema"] = json!(schema);
    let mut text = status.to_string();
    if text.len() > STATUS_BYTES {
        // Too many peers to show: keep the rest of the status and say so.
        status["peers"] =
            json!(format!("{} peers; too many to show here", status["peers"].as_array().map_or(0, Vec::len)));
        text = status.to_string();
    }
    let mut w = WORKER.exclusive();
    let len = text.len().min(STATUS_BYTES);
    w.status[..len].copy_from_slice(&text.as_bytes()[..len]);
    w.status_len = len as u32;
}

fn unpublish() {
    WORKER.exclusive().status_len = 0;
}

/// Why there is or is not networking, in one line (never showing the key).
fn networking_summary() -> String {
    match networking_off_reason() {
        Some(why) => format!("networking is off: {why}"),
        None => "networking is on".into(),
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
    let w = WORKER.share();
    let state = match w.state {
        1 => "waiting for the extension in peersync.database",
        2 => "running",
        _ if w.pid == 0 => "not running",
        _ => "starting",
    };
    let network: Value = serde_json::from_slice(&w.status[..w.status_len as usize]).unwrap_or(Value::Null);
    let mut out = json!({
        "state": state,
        "pid": (w.pid != 0).then_some(w.pid),
        "database": gucs::database(),
        "started_at_ms": (w.started_at_ms != 0).then_some(w.started_at_ms),
        "starts": w.starts,
        "networking": networking_summary(),
        "network_error": Some(w.network_error.get()).filter(|e| !e.is_empty()),
    });
    if let Value::Object(net) = network {
        // Transactions this node holds that reachable peers still lack.
        let queue: i64 = net["peers"].as_array().map_or(0, |ps| ps.iter().filter_map(|p| p["it_lacks"].as_i64()).sum());
        out["queue_depth"] = json!(queue);
        for (k, v) in net {
            out[k] = v;
        }
    }
    out
}
