//! `sync_apply()`: apply a batch from another node's `sync_changes()`.
//!
//! 1. The batch is parsed and checked whole (format, checksums, ranges, tracked tables) before
//!    anything is written: bad input is an error and nothing is applied.
//! 2. Its events are grouped into origin transactions. Those already held are skipped; the
//!    rest are applied in causal order (`sync_bridge::delivery`), each in its own
//!    subtransaction (consecutive small ones in chunks): `rows` resolves and writes the rows,
//!    `store` keeps the events in `sync_log` under their original origin and number (so this
//!    node relays them). A transaction whose every change saw everything this node holds is
//!    applied blind, without the row registers; `fold` brings them up to date when needed.
//! 3. A transaction that cannot be applied here (type, constraint, missing column) is rolled
//!    back alone and kept in `sync_inbox` with the reason; what depends on it waits there too,
//!    until `sync_retry_errors()` or a later batch makes it appliable. Every apply tries again
//!    those that failed for a reason that passes (a race with a local writer, a deadlock).
//!    Nothing in the inbox is read whole unless it can be applied now, nor stored twice.
//!
//! While applying, the capture trigger stands aside (`applying()`): received changes are
//! stored once, with their origin, never re-captured as local ones.

pub(crate) mod arrays;
pub mod conflicts;
mod constraints;
mod drift;
mod fold;
pub(crate) mod plans;
mod rows;
use rows::Mode;
mod store;
pub(crate) mod twins;

pub(crate) use rows::{advance_sequences, quote_ident};
pub(crate) mod subxact;

use crate::changes::have_vector;
use crate::clock;
use crate::error::{SyncError, SyncResult};
use crate::sequencer;
use pgrx::JsonB;
use pgrx::prelude::*;
use serde_json::{Value, json};
use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use sync_bridge::delivery::{self, Pending, Wait};
use sync_bridge::resolve::{self, Strategy};
use sync_bridge::{Batch, Event, Hlc};
use uuid::Uuid;

thread_local! {
    static APPLYING: Cell<bool> = const { Cell::new(false) };
    static HAVE_CHANGED: Cell<bool> = const { Cell::new(false) };
}

/// True while `sync_apply` writes received rows: the capture trigger must not record them.
pub fn applying() -> bool {
    APPLYING.with(|a| a.get())
}

/// Sets `applying()` for its lifetime (also cleared at transaction end, should an error skip
/// the drop).
struct Applying;

impl Applying {
    fn start() -> Applying {
        APPLYING.with(|a| a.set(true));
        Applying
    }
}

impl Drop for Applying {
    fn drop(&mut self) {
        APPLYING.with(|a| a.set(false));
    }
}

pub fn init_callbacks() {
    #[pg_guard]
    unsafe extern "C-unwind" fn on_xact(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
        use pg_sys::XactEvent::*;
        match event {
            // Backends cache sync_origins by generation; move it once the new rows are
            // visible (and before row locks are released, see capture::xact).
            XACT_EVENT_COMMIT => {
                if HAVE_CHANGED.with(|h| h.replace(false)) {
                    sequencer::remote_have_changed();
                }
                APPLYING.with(|a| a.set(false));
            }
            XACT_EVENT_ABORT => {
                HAVE_CHANGED.with(|h| h.set(false));
                APPLYING.with(|a| a.set(false));
            }
            _ => {}
        }
    }
    unsafe { pg_sys::RegisterXactCallback(Some(on_xact), std::ptr::null_mut()) };
}

/// A tracked table as apply needs it.
pub(crate) struct Table {
    pub relid: pg_sys::Oid,
    /// Schema-qualified, quoted where needed: the name events carry, usable in SQL.
    pub name: String,
    pub strategy: Strategy,
    pub pk: Vec<String>,
    pub exclude: Vec<String>,
    pub resolver: Option<String>,
    pub columns: BTreeSet<String>,
    /// Columns each node computes (`GENERATED ALWAYS AS (...) STORED`): never written.
    pub generated: BTreeSet<String>,
    /// `GENERATED ALWAYS AS IDENTITY` columns: written with the value that travelled
    /// (`OVERRIDING SYSTEM VALUE`), never updated.
    pub identity_always: BTreeSet<String>,
    /// Some foreign key refers to this table: a delete deals with the rows that still refer
    /// to the deleted ones first (`constraints`).
    pub referenced: bool,
    /// Counter columns (`sync_set_counters`): each row's values are its life's, every update's
    /// delta counted once (`sync_bridge::counter`).
    pub counters: BTreeSet<String>,
    /// Columns fed by a sequence (serial, identity, a `DEFAULT nextval(...)`): column -> sequence.
    pub sequences: BTreeMap<String, String>,
    /// Per such column, the greatest value this apply wrote (see `rows::advance_sequences`).
    pub written_max: BTreeMap<String, i64>,
    /// Received columns this table lacks: already recorded, and newly met.
    pub missing: BTreeSet<String>,
    pub new_missing: BTreeSet<String>,
}

impl Table {
    /// True when `row` has exactly this table's captured columns: then it is what reading the
    /// table row back gives.
    pub fn captures_exactly(&self, row: &sync_bridge::resolve::Row) -> bool {
        let captured = |c: &String| self.columns.contains(c) && !self.exclude.contains(c);
        row.keys().all(captured) && row.len() == self.columns.iter().filter(|c| captured(c)).count()
    }
}

pub(crate) fn load_tables(schema: &str) -> Result<HashMap<String, Table>, SyncError> {
    Spi::connect_mut(|client| {
        let mut tables = HashMap::new();
        let rows = client.update(
            &format!(
                "SELECT t.relid::oid, t.table_name, t.strategy, t.pk_columns, t.exclude_columns, \
                        t.resolver::oid::regproc::text, t.missing_columns, t.counters \
                   FROM {schema}.sync_tables t"
            ),
            None,
            &[],
        )?;
        for row in rows {
            let name: String = row.get(2)?.unwrap_or_default();
            let t = Table {
                relid: row.get(1)?.expect("relid"),
                name: name.clone(),
                // The column's CHECK allows only known names.
                strategy: row.get::<String>(3)?.as_deref().and_then(Strategy::parse).unwrap_or(Strategy::Lww),
                pk: row.get(4)?.unwrap_or_default(),
                exclude: row.get(5)?.unwrap_or_default(),
                resolver: row.get(6)?,
                missing: row.get::<Vec<String>>(7)?.unwrap_or_default().into_iter().collect(),
                counters: row.get::<Vec<String>>(8)?.unwrap_or_default().into_iter().collect(),
                columns: BTreeSet::new(),
                generated: BTreeSet::new(),
                identity_always: BTreeSet::new(),
                referenced: false,
                sequences: BTreeMap::new(),
                written_max: BTreeMap::new(),
                new_missing: BTreeSet::new(),
            };
            tables.insert(name, t);
        }
        Ok::<_, SyncError>(tables)
    })
    .and_then(|mut tables| {
        for t in tables.values_mut() {
            table_columns(t)?;
        }
        Ok(tables)
    })
}

/// A table's columns and which are generated, identity or fed by a sequence, and whether a
/// foreign key refers to the table. Per table, not in
/// `load_tables`' query: with the catalog subqueries once per tracked table, that query's
/// estimated cost passed jit_above_cost, and each apply paid ~60 ms of JIT. Planned once per
/// backend (`plans`).
fn table_columns(t: &mut Table) -> Result<(), SyncError> {
    let sql = format!(
        "SELECT a.attname::text, a.attgenerated = 's', a.attidentity = 'a', \
                CASE WHEN a.atthasdef OR a.attidentity <> '' THEN {seq} END, \
                (SELECT EXISTS (SELECT 1 FROM pg_constraint f WHERE f.contype = 'f' AND f.confrelid = $1)) \
           FROM pg_attribute a WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped",
        seq = crate::capture::ids::sequence_of("a.attrelid", "a.attname")
    );
    plans::query(&sql, &[t.relid.into()], |rows| {
        for row in rows {
            let name: String = row.get(1)?.unwrap_or_default();
            if row.get::<bool>(2)? == Some(true) {
                t.generated.insert(name.clone());
            }
            if row.get::<bool>(3)? == Some(true) {
                t.identity_always.insert(name.clone());
            }
            if let Some(seq) = row.get::<String>(4)? {
                t.sequences.insert(name.clone(), seq);
            }
            t.referenced = row.get::<bool>(5)? == Some(true);
            t.columns.insert(name);
        }
        Ok(())
    })
}

/// One received origin transaction.
#[derive(Clone)]
pub(crate) struct Txn {
    pub origin: Uuid,
    pub seq: i64,
    pub prev: i64,
    /// The greatest of its events' causal contexts.
    pub context: BTreeMap<Uuid, i64>,
    /// Empty for an inbox entry until it is about to be applied (`store::load_events`).
    pub events: Vec<Event>,
    pub in_inbox: bool,
    /// Held after it failed, and counted by the have-vector (stored in `sync_log`, relayed):
    /// later transactions went on without it.
    pub passed: bool,
}

impl Txn {
    fn pending(&self) -> Pending {
        Pending { origin: self.origin, seq: self.seq, prev: self.prev, context: self.context.clone() }
    }
}

/// Group a checked batch's events into origin transactions, in batch order, dropping this
/// node's own events.
fn transactions(events: Vec<Event>, from: &BTreeMap<Uuid, i64>, me: Uuid) -> Vec<Txn> {
    let mut txns: Vec<Txn> = Vec::new();
    for e in events {
        if e.origin == me {
            continue;
        }
        match txns.last_mut() {
            // A transaction's events are together (checked by validate()).
            Some(t) if t.origin == e.origin && t.seq == e.seq => t.events.push(e),
            _ => txns.push(Txn {
                origin: e.origin,
                seq: e.seq,
                prev: 0,
                context: BTreeMap::new(),
                events: vec![e],
                in_inbox: false,
                passed: false,
            }),
        }
    }
    for t in &mut txns {
        for e in &t.events {
            delivery::widen(&mut t.context, &e.vclock);
        }
    }
    let mut pending: Vec<Pending> = txns.iter().map(Txn::pending).collect();
    delivery::link(from, &mut pending);
    for (t, p) in txns.iter_mut().zip(pending) {
        t.prev = p.prev;
    }
    txns
}

/// The advisory lock (per database) held by whoever writes row registers: `sync_apply`,
/// `sync_retry_errors`, the worker's fold.
const APPLY_LOCK: &str = "hashtext('pg_peersync.apply')";
/// The SQLSTATE of `SyncError::ConcurrentLocalWrite` (serialization_failure).
const RACED: &str = "40001";
/// unique_violation and foreign_key_violation: races with another node's change, settled by
/// `constraints` rather than held.
const RACES: [&str; 2] = ["23505", "23503"];
/// Events applied together at most, when consecutive origin transactions go in one chunk.
const CHUNK_EVENTS: usize = 2000;

#[derive(Default)]
struct Counts {
    applied: i64,
    skipped: i64,
    conflicts: i64,
    transactions: i64,
    failed: i64,
    waiting: i64,
}

/// What one call of `sync_apply` or `sync_retry_errors` works with.
struct Run {
    schema: String,
    me: Uuid,
    tables: HashMap<String, Table>,
    /// The committed local transactions this apply accounts for.
    local: fold::Local,
    /// Registers may lag behind the log (local writes, blind applies): fold before reading them.
    unfolded: bool,
    have: BTreeMap<Uuid, i64>,
    /// Per other origin, the highest number applied so far (delivery keeps each a prefix).
    applied: BTreeMap<Uuid, i64>,
    /// The transactions left waiting in the inbox.
    waiting: Vec<Pending>,
    counts: Counts,
    /// Columns added here since peers sent them, filled in from the log (`drift`).
    filled: Vec<String>,
    /// Rows settled races changed in this run (see `constraints::Settler`).
    changed: constraints::Changed,
    /// What the last join from a snapshot copied covers: nothing below it is applied blind.
    copied: BTreeMap<Uuid, i64>,
}

impl Run {
    /// With `fold_now`, bring the registers up to date at once (else only when needed).
    fn start(fold_now: bool) -> Result<Run, SyncError> {
        let ext = clock::ext();
        if let Some(peer) = ext.joining {
            return Err(SyncError::Joining(peer));
        }
        // One applier at a time per database: registers are read, resolved and written whole.
        Spi::run(&format!("SELECT pg_advisory_xact_lock({APPLY_LOCK})"))?;
        let mut tables = load_tables(&ext.schema)?;
        let filled = drift::fill_in_added_columns(&ext.schema, &mut tables)?;
        let local = fold::local(&ext.schema, ext.node_id)?;
        if fold_now {
            fold::fold(&ext.schema, ext.node_id, &tables)?;
        }
        let unfolded = !fold_now && fold::pending(&ext.schema, &local)?;
        let have = have_vector()?;
        Ok(Run {
            schema: ext.schema.clone(),
            me: ext.node_id,
            tables,
            local,
            unfolded,
            applied: have.clone(),
            have,
            waiting: Vec::new(),
            counts: Counts::default(),
            filled,
            changed: constraints::Changed::new(),
            copied: crate::snapshot::copied_upto(&ext.schema)?,
        })
    }

    /// `Blind` when `txns[i]` for each `i` of `chunk` can be applied blind (each change has
    /// seen everything this node holds, counting those before it in the chunk); if not, fold
    /// what the registers lack first, outside the chunk's subtransaction, so that a chunk
    /// rolled back does not undo it.
    fn mode(&mut self, txns: &[Txn], chunk: &[usize]) -> Mode {
        // A copy may show changes this node does not hold yet: a change blind here must have
        // seen them too.
        let mut held = sync_bridge::snapshot::cover(&self.applied, &self.copied);
        held.insert(self.me, self.local.high().max(held.get(&self.me).copied().unwrap_or(0)));
        let blind = chunk.iter().flat_map(|&i| &txns[i].events).all(|e| {
            // A delete may change rows that refer to it (`constraints`), whose registers must
            // then be up to date.
            let referenced = e.op == sync_bridge::Op::Delete && self.tables.get(&e.table).is_some_and(|t| t.referenced);
            // Counters are counted into each row's life, kept with its register.
            let counted = self.tables.get(&e.table).is_some_and(|t| !t.counters.is_empty());
            // A row a settled race changed in this run: its register must be kept (the fold
            // would take the change for one that saw it).
            let settled = !self.changed.is_empty()
                && constraints::was_changed(&self.changed, &e.table, &sync_bridge::canonical::jsonb_text(&e.pk));
            let seen = !referenced && !counted && !settled && resolve::saw_everything(e.origin, &e.vclock, &held);
            let n = held.entry(e.origin).or_insert(0);
            *n = (*n).max(e.seq);
            seen
        });
        if blind {
            return Mode::Blind;
        }
        self.fold_if_needed();
        Mode::Registers
    }

    fn fold_if_needed(&mut self) {
        if self.unfolded {
            fold::fold(&self.schema, self.me, &self.tables).unwrap_or_else(|e| e.report());
            self.unfolded = false;
        }
    }

    /// Apply one transaction alone, in its own subtransaction. One that breaks a unique
    /// constraint or a foreign key is tried again settling those races (`constraints`).
    fn apply_alone(&mut self, t: &Txn) -> Result<(), subxact::Failure> {
        let one = std::slice::from_ref(t);
        let mode = self.mode(one, &[0]);
        match subxact::run(|| self.apply_chunk(one, &[0], mode).unwrap_or_else(|e| e.report())) {
            Err(f) if RACES.contains(&f.sqlstate.as_str()) => {
                self.fold_if_needed();
                subxact::run(|| self.apply_chunk(one, &[0], Mode::Settling).unwrap_or_else(|e| e.report()))
            }
            other => other,
        }
    }

    fn inbox(&self, which: store::Held) -> Result<Vec<Txn>, SyncError> {
        store::inbox(&self.schema, which)
    }

    /// Apply what can be applied of `txns`, keep the rest in the inbox.
    fn deliver(&mut self, txns: Vec<Txn>) -> Result<(), SyncError> {
        let (late, mut txns) = self.sort_out(txns)?;
        self.apply_late(late)?;
        let pending: Vec<Pending> = txns.iter().map(Txn::pending).collect();
        let order = delivery::plan(&mut self.have.clone(), self.me, &pending, |_| true);
        // Inbox entries that still cannot be applied stay there unread.
        let inboxed: Vec<usize> = order.iter().copied().filter(|&i| txns[i].in_inbox).collect();
        store::load_events(&self.schema, &mut txns, &inboxed)?;
        let mut max_hlc = 0i64;
        let chunked = self.apply_chunks(&txns, &order, &mut max_hlc);
        let rest: Vec<usize> = order.iter().copied().filter(|i| !chunked.contains(i)).collect();
        let (applied, failures) = self.apply_one_by_one(&txns, &pending, &rest, &mut max_hlc);
        if max_hlc > 0 {
            clock::observe(Hlc::from_i64(max_hlc));
        }
        let applied: BTreeSet<usize> = applied.into_iter().chain(chunked).collect();
        self.keep_the_rest(&txns, &pending, &applied, &failures)
    }

    /// Drop what this node already holds (a copy left in the inbox goes; one received is
    /// compared with the log, `twins`) and repeats (the inbox's copy, which comes first, stays); set aside the inbox entries that failed but
    /// that the have-vector already counts (`passed`), to be tried out of order.
    fn sort_out(&mut self, txns: Vec<Txn>) -> Result<(Vec<Txn>, Vec<Txn>), SyncError> {
        let (mut late, mut fresh, mut held) = (Vec::new(), Vec::new(), Vec::new());
        let mut seen = std::collections::HashSet::new();
        for t in txns {
            if !seen.insert((t.origin, t.seq)) {
                continue;
            }
            if t.passed {
                late.push(t);
            } else if self.have.get(&t.origin).is_some_and(|h| t.seq <= *h) {
                if t.in_inbox {
                    store::remove_from_inbox(&self.schema, &t)?;
                } else {
                    self.counts.skipped += t.events.len() as i64;
                    held.push(t);
                }
            } else {
                fresh.push(t);
            }
        }
        // What this node holds already must be what it received now.
        twins::check(&self.schema, &held.iter().collect::<Vec<_>>())?;
        Ok((late, fresh))
    }

    /// Held transactions the have-vector counts, tried again out of order: through the
    /// registers, so a change that a later one (applied meanwhile) has seen changes nothing.
    fn apply_late(&mut self, mut late: Vec<Txn>) -> Result<(), SyncError> {
        if late.is_empty() {
            return Ok(());
        }
        let all: Vec<usize> = (0..late.len()).collect();
        store::load_events(&self.schema, &mut late, &all)?;
        for t in &late {
            match self.apply_alone(t) {
                Ok(()) => store::remove_from_inbox(&self.schema, t)?,
                Err(f) => {
                    self.counts.failed += 1;
                    store::hold(&self.schema, t, Some(&f), None)?;
                }
            }
        }
        Ok(())
    }

    /// Fast path: many small transactions (a node catching up) cost mostly per-statement
    /// overhead, so consecutive ones in delivery order are applied together, one
    /// subtransaction per chunk. A chunk that fails is rolled back whole and the rest goes
    /// through the careful path, one origin transaction at a time. Returns what went in.
    fn apply_chunks(&mut self, txns: &[Txn], order: &[usize], max_hlc: &mut i64) -> BTreeSet<usize> {
        let mut chunked = BTreeSet::new();
        let mut k = 0;
        while k < order.len() {
            let mut end = k + 1;
            let mut n = txns[order[k]].events.len();
            while end < order.len() && n + txns[order[end]].events.len() <= CHUNK_EVENTS {
                n += txns[order[end]].events.len();
                end += 1;
            }
            let chunk = &order[k..end];
            if chunk.len() < 2 {
                break;
            }
            let mode = self.mode(txns, chunk);
            if subxact::run(|| self.apply_chunk(txns, chunk, mode).unwrap_or_else(|e| e.report())).is_err() {
                break;
            }
            for &i in chunk {
                self.have.insert(txns[i].origin, txns[i].seq);
                *max_hlc = (*max_hlc).max(txns[i].events.iter().map(|e| e.hlc).max().unwrap_or(0));
                chunked.insert(i);
            }
            k = end;
        }
        chunked
    }

    /// Careful path: each of `rest` alone, in delivery order. One that fails is rolled back
    /// alone (after a few tries when a local writer raced it) and held, and the stream goes on:
    /// the have-vector counts it (`keep_the_rest` stores and relays it), so what follows it
    /// applies, and it is tried again later (`apply_late`). Returns the applied and the failed.
    fn apply_one_by_one(
        &mut self,
        txns: &[Txn],
        pending: &[Pending],
        rest: &[usize],
        max_hlc: &mut i64,
    ) -> (Vec<usize>, HashMap<usize, subxact::Failure>) {
        let rest_pending: Vec<Pending> = rest.iter().map(|&i| pending[i].clone()).collect();
        let mut failures: HashMap<usize, subxact::Failure> = HashMap::new();
        let mut have = self.have.clone();
        let delivered = delivery::plan(&mut have, self.me, &rest_pending, |j| {
            let i = rest[j];
            let t = &txns[i];
            for attempt in 1.. {
                match self.apply_alone(t) {
                    Ok(()) => {
                        *max_hlc = (*max_hlc).max(t.events.iter().map(|e| e.hlc).max().unwrap_or(0));
                        return true;
                    }
                    // A local write to the same rows committed meanwhile: account for it, again.
                    Err(f) if f.sqlstate == RACED && attempt < 5 => {
                        match fold::local(&self.schema, self.me) {
                            Ok(local) => self.local = local,
                            Err(e) => e.report(),
                        }
                        self.unfolded = true;
                    }
                    Err(f) => {
                        failures.insert(i, f);
                        return true;
                    }
                }
            }
            unreachable!("the loop returns")
        });
        self.have = have;
        let applied = delivered.into_iter().map(|j| rest[j]).filter(|i| !failures.contains_key(i)).collect();
        (applied, failures)
    }

    /// Record the outcome in the inbox: applied ones leave it, failed ones are held (stored in
    /// `sync_log` too, since the have-vector counts them), the others wait.
    fn keep_the_rest(
        &mut self,
        txns: &[Txn],
        pending: &[Pending],
        applied: &BTreeSet<usize>,
        failures: &HashMap<usize, subxact::Failure>,
    ) -> Result<(), SyncError> {
        for (i, t) in txns.iter().enumerate() {
            if applied.contains(&i) {
                if t.in_inbox {
                    store::remove_from_inbox(&self.schema, t)?;
                }
            } else if let Some(f) = failures.get(&i) {
                self.counts.failed += 1;
                crate::log::store_received(&self.schema, &t.events)?;
                store::hold(&self.schema, t, Some(f), None)?;
            } else {
                self.counts.waiting += 1;
                self.waiting.push(pending[i].clone());
                let why = match delivery::check(&self.have, self.me, &pending[i]) {
                    Err(Wait::Predecessor { origin, need, have } | Wait::Context { origin, need, have }) => {
                        format!("events of origin {origin} up to {need} (this node has {have})")
                    }
                    _ => "an earlier transaction".to_string(),
                };
                store::hold(&self.schema, t, None, Some(&why))?;
            }
        }
        Ok(())
    }

    /// Apply `txns[i]` for each `i` of `chunk`, in that order, as one: their row writes in
    /// origin order, the registers read and written once (`Blind`: not at all, see `fold`).
    fn apply_chunk(&mut self, txns: &[Txn], chunk: &[usize], mode: Mode) -> Result<(), SyncError> {
        let blind = mode == Mode::Blind;
        let events: Vec<&Event> = chunk.iter().flat_map(|&i| &txns[i].events).collect();
        let stats = rows::apply(&self.schema, self.me, &mut self.tables, &events, mode, &self.changed)?;
        if fold::raced(&self.schema, self.me, &self.local, &stats.keys)? {
            return Err(SyncError::ConcurrentLocalWrite);
        }
        for &i in chunk {
            crate::log::store_received(&self.schema, &txns[i].events)?;
        }
        if blind {
            let done: Vec<(Uuid, i64, i32)> =
                chunk.iter().map(|&i| (txns[i].origin, txns[i].seq, txns[i].events.len() as i32)).collect();
            fold::defer(&self.schema, &done)?;
            self.unfolded = true;
        }
        for &i in chunk {
            let n = self.applied.entry(txns[i].origin).or_insert(0);
            *n = (*n).max(txns[i].seq);
        }
        self.changed.extend(stats.changed);
        self.counts.transactions += chunk.len() as i64;
        self.counts.applied += stats.applied;
        self.counts.skipped += stats.skipped;
        self.counts.conflicts += stats.conflicts;
        Ok(())
    }

    /// A batch covers each origin's `(from, have]` whole: see `delivery::raise`. `last` is the
    /// greatest number of each origin's events in the batch.
    fn raise_to_batch(&mut self, from: &BTreeMap<Uuid, i64>, top: &BTreeMap<Uuid, i64>, last: &BTreeMap<Uuid, i64>) {
        delivery::raise(&mut self.have, self.me, from, top, last);
    }

    fn finish(self, before: BTreeMap<Uuid, i64>) -> Result<JsonB, SyncError> {
        let changed: Vec<(Uuid, i64)> = self
            .have
            .iter()
            .filter(|(o, n)| **o != self.me && before.get(o) != Some(n))
            .map(|(o, n)| (*o, *n))
            .collect();
        if !changed.is_empty() {
            store::origins(&self.schema, &changed)?;
            HAVE_CHANGED.with(|h| h.set(true));
        }
        let missing = drift::persist_missing_columns(&self.schema, &self.tables)?;
        rows::advance_sequences(&self.tables)?;
        let c = &self.counts;
        let have: serde_json::Map<String, Value> = self.have.iter().map(|(k, v)| (k.to_string(), json!(v))).collect();
        let mut out = json!({
            "applied": c.applied,
            "transactions": c.transactions,
            "skipped": c.skipped,
            "conflicts": c.conflicts,
            "errors": c.failed,
            "waiting": c.waiting,
            "have": have,
        });
        if !missing.is_empty() {
            out["ignored_columns"] = json!(missing);
        }
        if !self.filled.is_empty() {
            out["filled_columns"] = json!(self.filled);
        }
        // What the waiting transactions need that no waiting one supplies: a peer should send it.
        let lacking = delivery::missing(&self.have, self.me, &self.waiting);
        if !lacking.is_empty() {
            out["missing"] = Value::Object(lacking.iter().map(|(o, n)| (o.to_string(), json!(n))).collect());
        }
        Ok(JsonB(out))
    }
}

/// Apply a batch produced by `sync_changes()` on another node; returns counts: `applied`
/// events, `transactions`, `skipped` (already held), `conflicts`, `errors` (origin transactions
/// held in `sync_apply_errors`), `waiting` (held until what they depend on arrives) and the
/// resulting `have`; `gone` when the source no longer keeps changes this node lacks.
///
/// SQL calls it through `sync_apply(jsonb)` (see below), which hands over the batch's text:
/// parsing that straight into typed events is several times cheaper than building a generic
/// JSON tree first.
#[pg_extern]
fn _sync_apply_text(batch: &str) -> SyncResult<JsonB> {
    sequencer::require_read_committed("sync_apply()")?;
    let batch: Batch = serde_json::from_str(batch).map_err(|e| SyncError::BadBatch(e.to_string()))?;
    batch.validate().map_err(SyncError::from)?;
    let mut run = Run::start(false)?;
    // A table a DDL in the batch creates and tracks is known only once the DDL ran: then a
    // change of a table still unknown holds its transaction instead.
    if !batch.events.iter().any(crate::ddl::is_ddl)
        && let Some(e) = batch.events.iter().find(|e| !run.tables.contains_key(&e.table))
    {
        return Err(SyncError::UntrackedTable(e.table.clone()).into());
    }
    let before = run.have.clone();
    // The source may have met two transactions under this node's own identity.
    twins::betrayed(&run.schema, run.me, batch.source, &batch.twins)?;
    // An origin whose events continue another transaction than the one held here at their
    // start (a copy numbering on under its original's identity) is reported and not applied.
    let diverging = twins::diverging(&run.schema, &batch.from, &batch.at)?;
    let mut top = batch.have.clone();
    top.retain(|o, _| !diverging.contains(o));
    let events: Vec<Event> = batch.events.into_iter().filter(|e| !diverging.contains(&e.origin)).collect();
    let mut last = BTreeMap::new();
    for e in &events {
        last.insert(e.origin, e.seq);
    }
    let mut txns = run.inbox(store::Held::Retryable)?;
    txns.extend(transactions(events, &batch.from, run.me));
    run.deliver(txns)?;
    run.raise_to_batch(&batch.from, &top, &last);
    let mut out = run.finish(before)?;
    if !batch.gone.is_empty() {
        // The source deleted changes this node lacks: it cannot catch up from that log.
        out.0["gone"] = json!(batch.gone);
    }
    Ok(out)
}

extension_sql!(
    r#"
CREATE FUNCTION sync_apply(batch jsonb) RETURNS jsonb LANGUAGE sql VOLATILE
AS $$ SELECT @extschema@._sync_apply_text(batch::text) $$;
COMMENT ON FUNCTION sync_apply(jsonb) IS 'Apply a batch from sync_changes() on another node; returns counts.';
-- The same from the batch's text, as it travels (a file, the network): it skips parsing into
-- jsonb and printing it back, which is a third of the time of a large batch.
CREATE FUNCTION sync_apply(batch text) RETURNS jsonb LANGUAGE sql VOLATILE
AS $$ SELECT @extschema@._sync_apply_text(batch) $$;
COMMENT ON FUNCTION sync_apply(text) IS 'Apply a batch from sync_changes() on another node, given as text; returns counts.';
"#,
    name = "sync_apply",
    requires = [_sync_apply_text],
);

/// Hand this node's identity over (`identity::sync_new_identity`): under the apply lock, the
/// registers brought up to date with everything captured under `old`, which from now on is
/// another node's origin held up to `upto`.
pub fn retire_identity(old: Uuid, upto: i64) -> Result<(), SyncError> {
    let run = Run::start(true)?;
    store::origins(&run.schema, &[(old, upto)])?;
    HAVE_CHANGED.with(|h| h.set(true));
    Ok(())
}

/// A database restored from a dump got a new identity at the restore's CREATE EXTENSION
/// (`sync_node` is not dumped), and its log holds transactions of the identity it had: nothing
/// counts them as held. Count each such origin (in the log, neither this node nor in
/// `sync_origins`) as another node's, held up to where its transactions run on without a gap
/// from what was pruned, and fold those into the registers like received ones (folding one
/// that was folded before changes nothing). Returns the origins adopted with that number.
pub fn adopt_orphans() -> Result<Vec<(Uuid, i64)>, SyncError> {
    let ext = clock::ext();
    let s = &ext.schema;
    let me = pgrx::Uuid::from_bytes(*ext.node_id.as_bytes());
    // The log's origins by a loose index scan: a few probes however long the log.
    let any = Spi::get_one_with_args::<bool>(
        &format!(
            "WITH RECURSIVE o AS ((SELECT origin FROM {s}.sync_log ORDER BY origin LIMIT 1) \
                UNION ALL SELECT (SELECT l.origin FROM {s}.sync_log l WHERE l.origin > o.origin \
                                   ORDER BY l.origin LIMIT 1) \
                            FROM o WHERE o.origin IS NOT NULL) \
             SELECT EXISTS (SELECT 1 FROM o WHERE o.origin IS NOT NULL AND o.origin <> $1 \
                             AND NOT EXISTS (SELECT 1 FROM {s}.sync_origins x WHERE x.origin = o.origin))"
        ),
        &[me.into()],
    )?;
    if any != Some(true) {
        return Ok(Vec::new());
    }
    Spi::run(&format!("SELECT pg_advisory_xact_lock({APPLY_LOCK})"))?;
    let mut adopted = Vec::new();
    Spi::connect_mut(|c| {
        let rows = c.update(
            &format!(
                "WITH t AS (SELECT l.origin, l.origin_seq, sum(l.n)::int AS events, coalesce(p.upto, 0) AS base \
                              FROM {s}.sync_log l LEFT JOIN {s}.sync_pruned p USING (origin) \
                             WHERE l.origin <> $1 AND l.origin_seq > coalesce(p.upto, 0) \
                               AND NOT EXISTS (SELECT 1 FROM {s}.sync_origins x WHERE x.origin = l.origin) \
                             GROUP BY l.origin, l.origin_seq, p.upto), \
                      r AS (SELECT t.*, row_number() OVER (PARTITION BY origin ORDER BY origin_seq) AS k FROM t), \
                      held AS (SELECT origin, coalesce(max(origin_seq) FILTER (WHERE origin_seq = base + k), max(base)) \
                                      AS upto FROM r GROUP BY origin), \
                      unfolded AS (INSERT INTO {s}.sync_unfolded (origin, origin_seq, events) \
                                   SELECT r.origin, r.origin_seq, r.events FROM r JOIN held h USING (origin) \
                                    WHERE r.origin_seq <= h.upto ORDER BY r.origin, r.origin_seq) \
                 INSERT INTO {s}.sync_origins (origin, upto) SELECT origin, upto FROM held \
                 RETURNING origin, upto"
            ),
            None,
            &[me.into()],
        )?;
        for row in rows {
            if let (Some(o), Some(n)) = (row.get::<pgrx::Uuid>(1)?, row.get::<i64>(2)?) {
                adopted.push((Uuid::from_bytes(*o.as_bytes()), n));
            }
        }
        Ok::<_, SyncError>(())
    })?;
    HAVE_CHANGED.with(|h| h.set(true));
    Ok(adopted)
}

/// Bring the row registers up to date with everything folded so far (a snapshot's source does,
/// before it says what its copy covers).
pub fn fold_all() -> Result<(), SyncError> {
    Run::start(true).map(|_| ())
}

/// Fold one slice of what the row registers lack (see `fold`), unless an apply holds the apply
/// lock. The background worker calls it once it has been quiet for a while, so that the apply
/// that next needs the registers does not first fold a long one-way stream. Returns true when
/// more is left to fold.
pub fn fold_while_quiet() -> Result<bool, SyncError> {
    sequencer::require_read_committed("the worker's fold")?;
    let ext = clock::ext();
    if ext.joining.is_some() {
        return Ok(false);
    }
    let locked = Spi::get_one::<bool>(&format!("SELECT pg_try_advisory_xact_lock({APPLY_LOCK})"))?;
    if locked != Some(true) {
        return Ok(false);
    }
    let local = fold::local(&ext.schema, ext.node_id)?;
    if !fold::pending(&ext.schema, &local)? {
        return Ok(false);
    }
    let tables = load_tables(&ext.schema)?;
    fold::fold_some(&ext.schema, ext.node_id, &tables, 1)
}

/// Try again the held transactions that failed for a reason that passes by itself (a race with
/// a local writer, a deadlock, a lock timeout), and what waits for them. The worker calls it
/// now and then, so they apply without anyone calling `sync_retry_errors()`. Returns how many
/// origin transactions went in.
pub fn retry_transient() -> Result<i64, SyncError> {
    sequencer::require_read_committed("the worker's retry")?;
    let ext = clock::ext();
    if ext.joining.is_some() {
        return Ok(0);
    }
    if !store::has_transient(&ext.schema)? {
        return Ok(0);
    }
    // Never wait behind an apply (the worker answers its peers meanwhile): it retries them too.
    let locked = Spi::get_one::<bool>(&format!("SELECT pg_try_advisory_xact_lock({APPLY_LOCK})"))?;
    if locked != Some(true) {
        return Ok(0);
    }
    let mut run = Run::start(false)?;
    let before = run.have.clone();
    let txns = run.inbox(store::Held::Retryable)?;
    run.deliver(txns)?;
    let applied = run.counts.transactions;
    run.finish(before)?;
    Ok(applied)
}

/// Try again every origin transaction held in `sync_apply_errors` (and what waits for them),
/// for instance after adding a missing column, after bringing the row registers up to date
/// (see `fold`). Returns the same counts as `sync_apply`.
#[pg_extern]
fn sync_retry_errors() -> SyncResult<JsonB> {
    sequencer::require_read_committed("sync_retry_errors()")?;
    let mut run = Run::start(true)?;
    let before = run.have.clone();
    let txns = run.inbox(store::Held::All)?;
    run.deliver(txns)?;
    Ok(run.finish(before)?)
}

/// What the worker sends a peer it pulls from: this node's have-vector, and the vector to ask
/// with (`delivery::ask_for`: raised over what the inbox keeps; with `stalled`, the peer's
/// have-vector after a pull that applied nothing, only the origins the inbox waits for), as
/// `{"have": {...}, "ask": {...}}`.
pub fn pull_request(stalled: Option<&BTreeMap<Uuid, i64>>) -> Result<Value, SyncError> {
    sequencer::require_read_committed("the worker's pull")?;
    let ext = clock::ext();
    let have = have_vector()?;
    let kept: Vec<Pending> = store::inbox(&ext.schema, store::Held::All)?.iter().map(Txn::pending).collect();
    let ask = delivery::ask_for(&have, ext.node_id, &kept, stalled);
    let vector = |m: &BTreeMap<Uuid, i64>| -> Value { m.iter().map(|(k, v)| (k.to_string(), json!(v))).collect() };
    Ok(json!({"have": vector(&have), "ask": vector(&ask)}))
}
