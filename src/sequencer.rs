//! Numbers local transactions and computes this node's committed prefix.
//!
//! The prefix property (DESIGN.md invariant 2): when this node says "I have my own origin up
//! to N", every committed local event numbered <= N is visible. Sequence-numbered change tables
//! break this because transactions commit out of order. Here a transaction takes its number
//! (`origin_seq`) when it first writes its changes to the log (just before it commits, unless
//! it calls `sync_flush()`), and registers it in a shared-memory slot until it commits or
//! aborts. Numbering that late also keeps one origin's changes to a row in number order: a
//! transaction cannot write a row after another one committed a change to it and still take
//! the smaller number (counter columns rely on that, `sync_bridge::counter`). The committed prefix is then
//!
//! ```text
//!   min(next number, smallest number still held by a running transaction) - 1
//! ```
//!
//! capped at the greatest number actually committed (so a crash that forgets rolled-back
//! numbers can never make us claim a number that is later reused). All events of one
//! transaction share its number, so a transaction is never split by the prefix.

use crate::clock;
use crate::error::SyncError;
use pgrx::prelude::*;
use pgrx::{PGRXSharedMemory, PgAtomic, PgLwLock, pg_shmem_init};
use std::sync::atomic::{AtomicU64, Ordering};
use sync_bridge::Hlc;
use uuid::Uuid;

const MAX_DBS: usize = 64;
const MAX_SLOTS: usize = 4096;

#[derive(Copy, Clone, Default)]
#[repr(C)]
struct DbCounter {
    db: u32,
    /// Next number to hand out; 0 while not yet loaded from `sync_events` since startup.
    next: i64,
}

#[derive(Copy, Clone, Default)]
#[repr(C)]
struct Slot {
    db: u32,
    xid: u32,
    seq: i64,
}

#[derive(Copy, Clone)]
#[repr(C)]
struct SeqState {
    dbs: [DbCounter; MAX_DBS],
    /// Indexed by the backend's `pgprocno`.
    slots: [Slot; MAX_SLOTS],
}

impl Default for SeqState {
    fn default() -> Self {
        SeqState { dbs: [DbCounter::default(); MAX_DBS], slots: [Slot::default(); MAX_SLOTS] }
    }
}

unsafe impl PGRXSharedMemory for SeqState {}

static SEQ: PgLwLock<SeqState> = unsafe { PgLwLock::new(c"pg_peersync_seq") };

/// Moves whenever `sync_origins` (the remote part of the have-vector) changes, so backends
/// can cache it instead of reading it in every transaction.
static REMOTE_HAVE_GENERATION: PgAtomic<AtomicU64> = unsafe { PgAtomic::new(c"pg_peersync_have_gen") };

/// Moves whenever a transaction that captured changes commits: the worker tells its peers.
static LOCAL_COMMITS: PgAtomic<AtomicU64> = unsafe { PgAtomic::new(c"pg_peersync_local_commits") };

pub fn init_shmem() {
    pg_shmem_init!(SEQ);
    pg_shmem_init!(REMOTE_HAVE_GENERATION);
    pg_shmem_init!(LOCAL_COMMITS);
}

pub fn local_commits() -> u64 {
    LOCAL_COMMITS.get().load(Ordering::Acquire)
}

pub fn remote_have_generation() -> u64 {
    REMOTE_HAVE_GENERATION.get().load(Ordering::Acquire)
}

/// Call after a transaction that changed `sync_origins` has committed.
pub fn remote_have_changed() {
    REMOTE_HAVE_GENERATION.get().fetch_add(1, Ordering::AcqRel);
}

fn my_db() -> u32 {
    unsafe { pg_sys::MyDatabaseId.to_u32() }
}

fn my_slot() -> Result<usize, SyncError> {
    let procno = unsafe { (*pg_sys::MyProc).pgprocno } as usize;
    if procno >= MAX_SLOTS { Err(SyncError::TooManyBackends(MAX_SLOTS)) } else { Ok(procno) }
}

/// Make sure this database's counter (and the clock floor) are loaded since startup.
fn ensure_loaded(schema: &str, node: Uuid) -> Result<(), SyncError> {
    let db = my_db();
    if SEQ.share().dbs.iter().any(|d| d.db == db && d.next > 0) {
        return Ok(());
    }
    // Read outside the lock; concurrent loaders read the same committed maximum.
    let (max_seq, max_hlc) = Spi::connect(|client| {
        let row = client
            .select(
                &format!(
                    "SELECT (SELECT coalesce(max(origin_seq), 0) FROM {schema}.sync_log WHERE origin = $1), \
                            (SELECT coalesce(max(hlc), 0) FROM {schema}.sync_log)"
                ),
                None,
                &[pgrx::Uuid::from_bytes(*node.as_bytes()).into()],
            )?
            .first();
        Ok::<_, SyncError>((row.get::<i64>(1)?.unwrap_or(0), row.get::<i64>(2)?.unwrap_or(0)))
    })?;
    clock::observe(Hlc::from_i64(max_hlc));
    let mut state = SEQ.exclusive();
    if state.dbs.iter().any(|d| d.db == db && d.next > 0) {
        return Ok(());
    }
    let entry = state.dbs.iter_mut().find(|d| d.db == db || d.db == 0).ok_or(SyncError::TooManyDatabases(MAX_DBS))?;
    *entry = DbCounter { db, next: max_seq + 1 };
    Ok(())
}

/// Forget this database's counter: the next local transaction is numbered from the log again
/// (after the node took a new identity, from 1).
pub fn forget_numbering() {
    let db = my_db();
    if let Some(d) = SEQ.exclusive().dbs.iter_mut().find(|d| d.db == db) {
        d.next = 0;
    }
}

/// Give the current top-level transaction its number and hold it until `end_local_xact`.
pub fn begin_local_xact(schema: &str, node: Uuid) -> Result<i64, SyncError> {
    let slot = my_slot()?;
    // Assign the xid before taking our lock: it may take other locks.
    let xid = unsafe { pg_sys::GetTopTransactionId() };
    ensure_loaded(schema, node)?;
    let db = my_db();
    let mut state = SEQ.exclusive();
    let entry = state.dbs.iter_mut().find(|d| d.db == db).expect("counter loaded above");
    let seq = entry.next;
    entry.next += 1;
    state.slots[slot] = Slot { db, xid: xid.into_inner(), seq };
    Ok(seq)
}

/// Release this backend's slot. Runs in the commit/abort callback, after the transaction's
/// commit became visible, so it must not fail.
pub fn end_local_xact(committed: bool) {
    if committed {
        LOCAL_COMMITS.get().fetch_add(1, Ordering::AcqRel);
    }
    if let Ok(slot) = my_slot() {
        SEQ.exclusive().slots[slot] = Slot::default();
    }
}

/// This node's committed prefix: every committed local event numbered <= the result is visible
/// to queries that take their snapshot after this call returns.
pub fn committed_prefix(schema: &str, node: Uuid) -> Result<i64, SyncError> {
    ensure_loaded(schema, node)?;
    let db = my_db();
    let (next, held): (i64, Vec<(u32, i64)>) = {
        let state = SEQ.share();
        let next = state.dbs.iter().find(|d| d.db == db).map(|d| d.next).unwrap_or(1);
        let held = state.slots.iter().filter(|s| s.db == db && s.seq > 0).map(|s| (s.xid, s.seq)).collect();
        (next, held)
    };
    // A slot whose transaction is no longer running was left behind by a backend that ended
    // without running the callbacks; its transaction's outcome is already visible.
    let oldest_running = held
        .into_iter()
        .filter(|(xid, _)| unsafe { pg_sys::TransactionIdIsInProgress(pg_sys::TransactionId::from(*xid)) })
        .map(|(_, seq)| seq)
        .min()
        .unwrap_or(next);
    let bound = next.min(oldest_running) - 1;
    let committed_max = Spi::connect(|client| {
        // A mutating statement takes a fresh snapshot, taken after `bound` was computed.
        let stmt = client.prepare_mut(
            &format!("SELECT coalesce(max(origin_seq), 0) FROM {schema}.sync_log WHERE origin = $1"),
            &[pgrx::PgOid::BuiltIn(pgrx::PgBuiltInOids::UUIDOID)],
        )?;
        let v =
            client.select(&stmt, None, &[pgrx::Uuid::from_bytes(*node.as_bytes()).into()])?.first().get_one::<i64>()?;
        Ok::<_, SyncError>(v.unwrap_or(0))
    })?;
    Ok(bound.min(committed_max))
}

/// `sync_changes()` and `sync_have()` rely on fresh snapshots per query.
pub fn require_read_committed(what: &'static str) -> Result<(), SyncError> {
    if unsafe { pg_sys::XactIsoLevel } >= pg_sys::XACT_REPEATABLE_READ as i32 {
        return Err(SyncError::Isolation(what));
    }
    Ok(())
}
