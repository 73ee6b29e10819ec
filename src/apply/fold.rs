//! Bring the row registers in `sync_rows` up to date, lazily.
//!
//! Two kinds of change reach the tables without touching `sync_rows`:
//! - local writes: capture does not write registers, which would cost every local write a
//!   second row write;
//! - received changes applied *blind*: a change that has seen everything this node holds
//!   (`resolve::saw_everything`, the usual case: a peer's writes made after it had received
//!   this node's) replaces its row's register whatever the register held, so `sync_apply`
//!   neither reads nor writes registers for a transaction made only of such changes. It lists
//!   the transaction in `sync_unfolded` instead.
//!
//! Before registers are next read (an apply that may meet a conflict, or `sync_retry_errors`),
//! `fold` reads those changes back from the log and makes each one's row register just that
//! change, keeping per row the latest (each of them saw everything held before it), unless a
//! version already in the register has seen it. The background worker folds ahead of that, a
//! slice per transaction, while it is quiet (`fold_some`, through `apply::fold_while_quiet`).
//!
//! `sync_node.indexed_upto` records the committed local prefix folded so far; local
//! transactions above it that were already visible are folded again next time, which changes
//! nothing.

use super::Table;
use super::rows::{Held, RegisterRow, load_registers, store_registers, version_of};
use crate::error::SyncError;
use crate::log::{READ_COLUMNS, read_row, unreadable};
use crate::sequencer;
use pgrx::prelude::*;
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use sync_bridge::counter::Life;
use sync_bridge::resolve::{Stored, Version};
use sync_bridge::{Hlc, Op};
use uuid::Uuid;

/// The committed local transactions an apply accounts for: every one numbered up to `prefix`,
/// and those above it listed in `above` (committed out of order).
#[derive(Clone, Debug, Default)]
pub struct Local {
    pub prefix: i64,
    pub above: Vec<i64>,
}

impl Local {
    /// The highest local number accounted for.
    pub fn high(&self) -> i64 {
        self.above.iter().copied().fold(self.prefix, i64::max)
    }
}

fn node(me: Uuid) -> pgrx::Uuid {
    pgrx::Uuid::from_bytes(*me.as_bytes())
}

/// The committed local transactions, as of now.
pub fn local(schema: &str, me: Uuid) -> Result<Local, SyncError> {
    // Taken before the read below: everything up to it is visible to that read.
    let prefix = sequencer::committed_prefix(schema, me)?;
    let above = Spi::connect_mut(|c| {
        // A mutating statement: a fresh snapshot, which sees this transaction's own writes.
        let rows = c.update(
            &format!(
                "SELECT DISTINCT origin_seq FROM {schema}.sync_log WHERE origin = $1 AND origin_seq > $2 ORDER BY 1"
            ),
            None,
            &[node(me).into(), prefix.into()],
        )?;
        rows.map(|r| r.get::<i64>(1).map(|s| s.expect("origin_seq"))).collect::<Result<Vec<i64>, _>>()
    })?;
    Ok(Local { prefix, above })
}

/// True when the registers may lag behind the log: blind transactions are listed, or local
/// transactions of `local` lie above the prefix folded so far. Otherwise `fold` has nothing to
/// do, and an apply that is not blind need not call it.
pub fn pending(schema: &str, local: &Local) -> Result<bool, SyncError> {
    Ok(Spi::get_one_with_args::<bool>(
        &format!(
            "SELECT EXISTS (SELECT 1 FROM {schema}.sync_unfolded) \
                 OR (SELECT indexed_upto FROM {schema}.sync_node) < $1"
        ),
        &[local.high().into()],
    )?
    .unwrap_or(true))
}

/// A change to fold, with its full causal context (read from the log, shared by the changes of
/// one log row), so that "has seen" between two changes to fold is decided either way.
struct Change {
    stored: Stored,
    context: Rc<BTreeMap<Uuid, i64>>,
}

impl Change {
    /// As a version, for "has seen" (no row image).
    fn version(&self) -> Version {
        let s = &self.stored;
        let context = (*self.context).clone();
        Version { origin: s.o, seq: s.s, idx: s.i, hlc: Hlc(s.h), context, row: None, written: None }
    }
}

/// Changes folded together at most (about; a log row is never split): bounds the memory of a
/// fold after a long stream of blind transactions.
const FOLD_EVENTS: i64 = 20_000;

/// Fold the transactions listed in `sync_unfolded` and the local writes not folded yet into
/// the registers. Blind transactions go first, a slice at a time in the order they were
/// applied (a register keeps only what "has seen" needs, so a later slice must not meet a
/// change applied before one already folded), then the local writes: a local write and a
/// blind change of one row are told apart by their contexts (whichever saw the other stands),
/// whichever of them is folded first.
pub fn fold(schema: &str, me: Uuid, tables: &HashMap<String, Table>) -> Result<(), SyncError> {
    fold_some(schema, me, tables, usize::MAX).map(|_| ())
}

/// `fold`, stopping after `slices` slices of blind transactions; the local writes are folded
/// once none is left. Returns true when some are left.
pub fn fold_some(schema: &str, me: Uuid, tables: &HashMap<String, Table>, slices: usize) -> Result<bool, SyncError> {
    let cols = READ_COLUMNS.split(", ").map(|c| format!("l.{c}")).collect::<Vec<_>>().join(", ");
    for slice in 0.. {
        // The next slice of blind transactions: about FOLD_EVENTS changes, at least one.
        let upto: Option<i64> = Spi::connect_mut(|c| {
            c.update(
                &format!(
                    "SELECT max(n) FROM (SELECT n, sum(events) OVER (ORDER BY n) - events AS before \
                                          FROM {schema}.sync_unfolded ORDER BY n LIMIT $1) x \
                      WHERE before < $1"
                ),
                None,
                &[FOLD_EVENTS.into()],
            )?
            .first()
            .get_one::<i64>()
        })?;
        let Some(upto) = upto else { break };
        if slice == slices {
            return Ok(true);
        }
        fold_rows(
            schema,
            me,
            tables,
            &format!(
                "SELECT {cols}, l.origin FROM {schema}.sync_unfolded u \
                   JOIN {schema}.sync_log l ON l.origin = u.origin AND l.origin_seq = u.origin_seq \
                  WHERE u.n <= $1"
            ),
            upto,
            None,
        )?;
        Spi::run_with_args(&format!("DELETE FROM {schema}.sync_unfolded WHERE n <= $1"), &[upto.into()])?;
    }
    let indexed: i64 = Spi::connect_mut(|c| {
        c.update(&format!("SELECT indexed_upto FROM {schema}.sync_node"), None, &[])?.first().get_one::<i64>()
    })?
    .unwrap_or(0);
    let prefix = sequencer::committed_prefix(schema, me)?;
    fold_rows(
        schema,
        me,
        tables,
        &format!("SELECT {cols}, l.origin FROM {schema}.sync_log l WHERE l.origin = $2 AND l.origin_seq > $1"),
        indexed,
        Some((me, prefix)),
    )?;
    if prefix > indexed {
        Spi::run_with_args(&format!("UPDATE {schema}.sync_node SET indexed_upto = $1"), &[prefix.into()])?;
    }
    Ok(false)
}

/// Fold the changes of the `sync_log` rows `query` selects (`log::READ_COLUMNS`, then the origin;
/// `$1` is `bound`, `$2` this node's id) into the registers.
fn fold_rows(
    schema: &str,
    me: Uuid,
    tables: &HashMap<String, Table>,
    query: &str,
    bound: i64,
    local: Option<(Uuid, i64)>,
) -> Result<(), SyncError> {
    // Per (table, key): the changes not seen by another change to fold (normally one).
    let mut latest: BTreeMap<(String, String), Vec<Change>> = BTreeMap::new();
    // Per row of a table with counters: every change, in order, to count into its life.
    let mut counted: Counted = BTreeMap::new();
    let has_counters = |table: &str| tables.get(table).is_some_and(|t| !t.counters.is_empty());
    Spi::connect_mut(|client| {
        // Log rows unpacked in Rust: several times faster than through the sync_events view.
        let rows = client.update(query, None, &[bound.into(), node(me).into()])?;
        for row in rows {
            let origin = Uuid::from_bytes(*row.get::<pgrx::Uuid>(11)?.expect("origin").as_bytes());
            let seq: i64 = row.get(1)?.expect("origin_seq");
            let log = read_row(origin, seq, &row)?;
            if log.parts.iter().any(|p| has_counters(&p.table)) {
                for e in log.events_unchecked().map_err(|e| unreadable(origin, seq, e))? {
                    if has_counters(&e.table) {
                        let key = sync_bridge::canonical::jsonb_text(&e.pk);
                        counted.entry((e.table.clone(), key)).or_default().push((version_of(&e), e.old));
                    }
                }
            }
            // The changes of one log row share its context.
            let context = Rc::new(log.vclock.clone());
            log.touches(|t| {
                let stored = Stored {
                    o: origin,
                    s: seq,
                    i: t.idx,
                    h: t.hlc as u64,
                    l: if origin == me { None } else { context.get(&me).copied() },
                    d: t.op == Op::Delete,
                    w: t.written,
                    r: None,
                };
                let change = Change { stored, context: context.clone() };
                // Most rows have one change to fold: room for just that.
                let best = latest.entry((t.table.to_string(), t.key)).or_insert_with(|| Vec::with_capacity(1));
                if !best.is_empty() {
                    let v = change.version();
                    if best.iter().map(Change::version).any(|b| b.dot() == v.dot() || b.has_seen(&v)) {
                        return;
                    }
                    best.retain(|b| !v.has_seen(&b.version()));
                }
                best.push(change);
            })
            .map_err(|e| unreadable(origin, seq, e))?;
        }
        Ok::<_, SyncError>(())
    })?;
    let mut by_table: BTreeMap<&str, Vec<(&str, &Stored)>> = BTreeMap::new();
    for ((table, key), best) in &latest {
        // Each change folded here saw everything held before it, so they form a chain per row
        // and one remains; should two ever remain, the last writer stands for the row.
        let last = best.iter().max_by_key(|b| b.version().lww_key()).expect("not empty");
        // Changes to tables no longer tracked have no register.
        if tables.contains_key(table) {
            by_table.entry(table).or_default().push((key, &last.stored));
        }
    }
    for (table, versions) in by_table {
        let relid = tables[table].relid;
        let keys: Vec<&str> = versions.iter().map(|(k, _)| *k).collect();
        let held = load_registers(schema, relid, &keys)?;
        let lives = count_lives(&tables[table], table, &keys, &held, &mut counted, local);
        let mut regs: Vec<RegisterRow> = Vec::new();
        for (((key, v), existing), life) in versions.into_iter().zip(&held).zip(&lives) {
            let folded = v.causal(me);
            // A version already there that has seen this change stands (a local write made
            // after a blind change and folded first, say).
            let seen = existing.as_ref().is_some_and(|h| {
                h.stored.iter().map(|w| w.causal(me)).any(|w| w.dot() == folded.dot() || w.has_seen(&folded))
            });
            let ctid = existing.as_ref().map(|h| h.ctid);
            if !seen {
                regs.push(RegisterRow { key, stored: std::slice::from_ref(v), life: life.as_ref(), ctid });
            } else if let (Some(life), Some(h)) = (life, existing) {
                regs.push(RegisterRow { key, stored: &h.stored, life: Some(life), ctid });
            }
        }
        store_registers(schema, relid, &regs)?;
    }
    Ok(())
}

/// Per row (table, key) of a table with counters: every change, in order, with its counter values.
type Counted = BTreeMap<(String, String), Vec<(Version, Option<serde_json::Value>)>>;

/// The lives of rows of a table with counters after counting the changes folded now into
/// them (`None` for other tables): local writes are counted here, as received ones are by
/// `sync_apply`; a change counted already is not counted again. `local`: this node and its
/// committed prefix, when folding its own writes (all of them up to it are folded by now).
fn count_lives(
    t: &Table,
    table: &str,
    keys: &[&str],
    held: &[Option<Held>],
    counted: &mut Counted,
    local: Option<(Uuid, i64)>,
) -> Vec<Option<Life>> {
    if t.counters.is_empty() {
        return keys.iter().map(|_| None).collect();
    }
    keys.iter()
        .zip(held)
        .map(|(key, h)| {
            let mut life = h.as_ref().and_then(|h| h.life.clone()).unwrap_or_default();
            let mut changes = counted.remove(&(table.to_string(), key.to_string())).unwrap_or_default();
            // One origin's changes to one row in the order they were made (their clocks), which
            // is not their number order when their transactions committed out of order.
            changes.sort_by_key(|(v, _)| v.lww_key());
            for (v, old) in changes {
                life.count(&v, old.as_ref(), &t.counters);
                if Some(v.origin) != local.map(|l| l.0) {
                    life.settle(v.origin, (v.seq, v.idx));
                }
            }
            if let Some((me, prefix)) = local {
                life.settle(me, (prefix, i32::MAX));
            }
            Some(life)
        })
        .collect()
}

/// List origin transactions applied blind, as (origin, number, changes) in the order they were
/// applied, for the next `fold`.
pub fn defer(schema: &str, txns: &[(Uuid, i64, i32)]) -> Result<(), SyncError> {
    let origins: Vec<pgrx::Uuid> = txns.iter().map(|t| node(t.0)).collect();
    let seqs: Vec<i64> = txns.iter().map(|t| t.1).collect();
    let events: Vec<i32> = txns.iter().map(|t| t.2).collect();
    super::plans::run(
        &format!(
            "INSERT INTO {schema}.sync_unfolded (origin, origin_seq, events) \
             SELECT o, s, e FROM unnest($1::uuid[], $2::bigint[], $3::int[]) WITH ORDINALITY AS t(o, s, e, k) \
              ORDER BY k"
        ),
        &[origins.into(), seqs.into(), events.into()],
    )?;
    Ok(())
}

/// True when a local transaction that `local` did not include has committed since and wrote
/// one of `keys` (table, key text). Apply decided those rows without it, then waited for its
/// row lock and wrote over it: the origin transaction must be applied again.
pub fn raced(schema: &str, me: Uuid, local: &Local, keys: &[(String, String)]) -> Result<bool, SyncError> {
    let (tables, pks): (Vec<String>, Vec<String>) = keys.iter().cloned().unzip();
    Ok(Spi::connect_mut(|c| {
        c.update(
            &format!(
                "SELECT EXISTS (SELECT 1 FROM {schema}.sync_events e \
                   JOIN unnest($4::text[], $5::text[]) AS k(t, pk) ON e.table_name = k.t AND e.pk::text = k.pk \
                  WHERE e.origin = $1 AND e.origin_seq > $2 AND e.origin_seq <> ALL($3))"
            ),
            None,
            &[node(me).into(), local.prefix.into(), local.above.clone().into(), tables.into(), pks.into()],
        )?
        .first()
        .get_one::<bool>()
    })?
    .unwrap_or(false))
}
