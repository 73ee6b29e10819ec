//! Node identity and the hybrid logical clock.
//!
//! The clock lives in shared memory (one per cluster, never a table row, so writers do not
//! serialise on it); the arithmetic is `sync_bridge::Hlc`. After a restart the clock is raised
//! to the greatest timestamp stored in `sync_log` before the first local event is numbered
//! (see `sequencer`), so it never goes back even if the wall clock did.

use pgrx::prelude::*;
use pgrx::{PgAtomic, pg_shmem_init};
use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};
use sync_bridge::Hlc;
use uuid::Uuid;

static HLC: PgAtomic<AtomicU64> = unsafe { PgAtomic::new(c"pg_peersync_hlc") };

pub fn init_shmem() {
    pg_shmem_init!(HLC);
}

fn wall_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// A new local timestamp, greater than every one handed out or observed before.
pub fn tick() -> Hlc {
    let cell = HLC.get();
    let mut last = cell.load(Ordering::Acquire);
    loop {
        let next = Hlc::tick(Hlc(last), wall_ms());
        match cell.compare_exchange_weak(last, next.0, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return next,
            Err(actual) => last = actual,
        }
    }
}

/// Raise the clock to at least `seen` (a stored or received timestamp).
pub fn observe(seen: Hlc) {
    HLC.get().fetch_max(seen.0, Ordering::AcqRel);
}

pub fn current() -> Hlc {
    Hlc(HLC.get().load(Ordering::Acquire))
}

/// What this backend knows about the extension in the current database: its schema (quoted,
/// ready to prefix table names) and this node's id. Cached per backend, forgotten when the
/// relcache says `sync_node` changed (DROP/CREATE EXTENSION, a new identity, a doubt).
#[derive(Clone)]
pub struct Ext {
    pub schema: String,
    pub node_id: Uuid,
    /// Why this identity is in doubt (another node seems to use it), if it is: capture stops.
    pub doubt: Option<String>,
    /// The peer this node copies its tracked tables from, while it does (`snapshot`).
    pub joining: Option<String>,
    node_rel: pg_sys::Oid,
}

thread_local! {
    static EXT: RefCell<Option<Ext>> = const { RefCell::new(None) };
}

pub fn ext() -> Ext {
    if let Some(e) = EXT.with(|c| c.borrow().clone()) {
        return e;
    }
    let e = Spi::connect(|client| {
        let schema: String = client
            .select(
                "SELECT quote_ident(n.nspname) FROM pg_extension e \
                 JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'pg_peersync'",
                None,
                &[],
            )?
            .first()
            .get_one::<String>()?
            .expect("pg_peersync is not installed in this database");
        let row = client
            .select(
                &format!(
                    "SELECT id, '{schema}.sync_node'::regclass::oid, identity_doubt, joining, place FROM {schema}.sync_node"
                ),
                None,
                &[],
            )?
            .first();
        let id: pgrx::Uuid = row.get(1)?.expect("sync_node is empty");
        let rel: pg_sys::Oid = row.get(2)?.expect("sync_node oid");
        let doubt: Option<String> = row.get(3)?;
        let joining: Option<String> = row.get(4)?;
        // Started elsewhere than its identity was recorded: in doubt before its first capture.
        let place: Option<String> = row.get(5)?;
        // (A standby, in recovery, captures nothing and has no timeline of its own yet.)
        let standby = unsafe { pg_sys::RecoveryInProgress() };
        let doubt = doubt.or_else(|| {
            if standby { None } else { crate::identity::moved(place.as_deref(), &crate::identity::here()) }
        });
        Ok::<_, pgrx::spi::SpiError>(Ext {
            schema,
            node_id: Uuid::from_bytes(*id.as_bytes()),
            doubt,
            joining,
            node_rel: rel,
        })
    })
    .expect("reading pg_peersync's node identity");
    EXT.with(|c| *c.borrow_mut() = Some(e.clone()));
    e
}

/// Make every backend read `sync_node` again at its next transaction once this one commits
/// (a new identity, a doubt): a row change alone does not invalidate their caches.
pub fn identity_changed() {
    let rel = ext().node_rel;
    unsafe { pg_sys::CacheInvalidateRelcacheByRelid(rel) };
}

/// Relcache invalidation hook: forget the cached identity when `sync_node` changes.
pub fn invalidate(relid: pg_sys::Oid) {
    EXT.with(|c| {
        let mut c = c.borrow_mut();
        if relid == pg_sys::InvalidOid || c.as_ref().is_some_and(|e| e.node_rel == relid) {
            *c = None;
        }
    });
}

#[pg_extern]
fn sync_node_id() -> pgrx::Uuid {
    pgrx::Uuid::from_bytes(*ext().node_id.as_bytes())
}
