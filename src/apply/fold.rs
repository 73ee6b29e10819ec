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
//! version already in the register has seen it.
//!
//! `sync_node.indexed_upto` records the committed local prefix folded so far; local
//! transactions above it that were already visible are folded again next time, which changes
//! nothing.

use super::Table;
use super::rows::{RegisterRow, load_registers, store_registers};
use crate::error::SyncError;
use crate::sequencer;
use pgrx::prelude::*;
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use sync_bridge::Hlc;
use sync_bridge::resolve::{Stored, Version};
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

/// Fold the local writes not folded yet and the transactions listed in `sync_unfolded` into
/// the registers.
pub fn fold(schema: &str, me: Uuid, tables: &HashMap<String, Table>) -> Result<(), SyncError> {
    let indexed: i64 = Spi::connect_mut(|c| {
        c.update(&format!("SELECT indexed_upto FROM {schema}.sync_node"), None, &[])?.first().get_one::<i64>()
    })?
    .unwrap_or(0);
    let prefix = sequencer::committed_prefix(schema, me)?;
    // Per (table, key): the changes not seen by another change to fold (normally one).
    let mut latest: BTreeMap<(String, String), Vec<Change>> = BTreeMap::new();
    let columns = "e.table_name, e.pk::text, e.origin, e.origin_seq, e.origin_idx, e.hlc, e.op = 'DELETE', \
                   CASE WHEN e.op = 'UPDATE' THEN ARRAY(SELECT jsonb_object_keys(e.old)) END, e.vclock::text";
    Spi::connect_mut(|client| {
        let rows = client.update(
            &format!(
                "SELECT {columns} FROM {schema}.sync_events e WHERE e.origin = $1 AND e.origin_seq > $2 \
                 UNION ALL \
                 SELECT {columns} FROM {schema}.sync_unfolded u \
                  CROSS JOIN LATERAL (SELECT * FROM {schema}.sync_events e \
                                       WHERE e.origin = u.origin AND e.origin_seq = u.origin_seq) e"
            ),
            None,
            &[node(me).into(), indexed.into()],
        )?;
        // The changes of one log row come one after the other with the same context.
        let (mut last_text, mut context) = (String::new(), Rc::new(BTreeMap::new()));
        for row in rows {
            let text: &str = row.get(9)?.expect("vclock");
            if text != last_text {
                context = Rc::new(
                    serde_json::from_str(text)
                        .map_err(|e| SyncError::BadBatch(format!("a sync_log vclock is unreadable: {e}")))?,
                );
                last_text = text.to_string();
            }
            let origin = Uuid::from_bytes(*row.get::<pgrx::Uuid>(3)?.expect("origin").as_bytes());
            let stored = Stored {
                o: origin,
                s: row.get(4)?.expect("seq"),
                i: row.get(5)?.expect("idx"),
                h: row.get::<i64>(6)?.expect("hlc") as u64,
                l: if origin == me { None } else { context.get(&me).copied() },
                d: row.get(7)?.expect("op"),
                w: row.get::<Vec<String>>(8)?.map(|w| w.into_iter().collect()),
                r: None,
            };
            let change = Change { stored, context: context.clone() };
            let key = (row.get(1)?.expect("table"), row.get(2)?.expect("pk"));
            // Most rows have one change to fold: room for just that.
            let best = latest.entry(key).or_insert_with(|| Vec::with_capacity(1));
            if !best.is_empty() {
                let v = change.version();
                if best.iter().map(Change::version).any(|b| b.dot() == v.dot() || b.has_seen(&v)) {
                    continue;
                }
                best.retain(|b| !v.has_seen(&b.version()));
            }
            best.push(change);
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
        let keys: Vec<String> = versions.iter().map(|(k, _)| k.to_string()).collect();
        let held: HashMap<String, (Vec<Stored>, String)> =
            load_registers(schema, relid, keys)?.into_iter().map(|h| (h.pk, (h.stored, h.ctid))).collect();
        let mut regs: Vec<RegisterRow> = Vec::new();
        for (key, v) in versions {
            let folded = v.causal(me);
            let existing = held.get(key);
            let seen = existing.is_some_and(|(regs, _)| {
                regs.iter().map(|w| w.causal(me)).any(|w| w.dot() == folded.dot() || w.has_seen(&folded))
            });
            if !seen {
                let ctid = existing.map(|(_, c)| c.as_str());
                regs.push(RegisterRow { key, stored: std::slice::from_ref(v), ctid });
            }
        }
        store_registers(schema, relid, &regs)?;
    }
    Spi::run(&format!("DELETE FROM {schema}.sync_unfolded"))?;
    if prefix > indexed {
        Spi::run_with_args(&format!("UPDATE {schema}.sync_node SET indexed_upto = $1"), &[prefix.into()])?;
    }
    Ok(())
}

/// List origin transactions applied blind, for the next `fold`.
pub fn defer(schema: &str, txns: &[(Uuid, i64)]) -> Result<(), SyncError> {
    let (origins, seqs): (Vec<pgrx::Uuid>, Vec<i64>) = txns.iter().map(|(o, s)| (node(*o), *s)).unzip();
    Spi::run_with_args(
        &format!(
            "INSERT INTO {schema}.sync_unfolded (origin, origin_seq) SELECT * FROM unnest($1::uuid[], $2::bigint[])"
        ),
        &[origins.into(), seqs.into()],
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
