//! Fold local writes into the row registers, lazily.
//!
//! Capture does not touch `sync_rows`: that would cost every local write a second row write.
//! Instead, before it reads any register, `sync_apply` folds in the local transactions
//! committed since the last time (they are in `sync_log`), keeping per row only the latest.
//! A local write was made on top of every version applied before it, so it replaces the
//! row's register, unless a version already held has seen it.
//!
//! `sync_node.indexed_upto` records the committed prefix folded so far; transactions above it
//! that were already visible are folded again next time, which changes nothing.

use super::Table;
use super::rows::{RegisterRow, load_registers, store_registers};
use crate::error::SyncError;
use crate::sequencer;
use pgrx::prelude::*;
use std::collections::{BTreeMap, HashMap};
use sync_bridge::resolve::Stored;
use uuid::Uuid;

/// What one `index` pass folded: every local transaction numbered up to `prefix`, and those
/// above it listed in `above` (committed out of order).
#[derive(Clone, Debug, Default)]
pub struct Folded {
    pub prefix: i64,
    pub above: Vec<i64>,
}

pub fn index(schema: &str, me: Uuid, tables: &HashMap<String, Table>) -> Result<Folded, SyncError> {
    // Reads here and in `rows` are "mutating" SPI statements: those take a fresh snapshot and
    // see this transaction's own earlier writes (a read-only one would not).
    let indexed: i64 = Spi::connect_mut(|c| {
        c.update(&format!("SELECT indexed_upto FROM {schema}.sync_node"), None, &[])?.first().get_one::<i64>()
    })?
    .unwrap_or(0);
    // Taken before the read below: everything up to it is visible to that read.
    let prefix = sequencer::committed_prefix(schema, me)?;
    // Per (table, key): the latest local version.
    let mut latest: BTreeMap<(String, String), Stored> = BTreeMap::new();
    let mut above = Vec::new();
    Spi::connect_mut(|client| {
        let rows = client.update(
            &format!(
                "SELECT table_name, pk::text, origin_seq, origin_idx, hlc, op = 'DELETE', \
                        CASE WHEN op = 'UPDATE' THEN ARRAY(SELECT jsonb_object_keys(old)) END \
                   FROM {schema}.sync_events WHERE origin = $1 AND origin_seq > $2 \
                  ORDER BY origin_seq, origin_idx"
            ),
            None,
            &[pgrx::Uuid::from_bytes(*me.as_bytes()).into(), indexed.into()],
        )?;
        for row in rows {
            let table: String = row.get(1)?.expect("table");
            let key: String = row.get(2)?.expect("pk");
            let w: Option<Vec<String>> = row.get(7)?;
            let v = Stored {
                o: me,
                s: row.get(3)?.expect("seq"),
                i: row.get(4)?.expect("idx"),
                h: row.get::<i64>(5)?.expect("hlc") as u64,
                l: None,
                d: row.get(6)?.expect("op"),
                w: w.map(|w| w.into_iter().collect()),
                r: None,
            };
            if v.s > prefix && above.last() != Some(&v.s) {
                above.push(v.s);
            }
            latest.insert((table, key), v);
        }
        Ok::<_, SyncError>(())
    })?;
    let mut by_table: BTreeMap<&str, Vec<(&str, &Stored)>> = BTreeMap::new();
    for ((table, key), v) in &latest {
        // Changes to tables no longer tracked have no register.
        if tables.contains_key(table) {
            by_table.entry(table).or_default().push((key, v));
        }
    }
    for (table, versions) in by_table {
        let relid = tables[table].relid;
        let keys: Vec<String> = versions.iter().map(|(k, _)| k.to_string()).collect();
        let held: HashMap<String, Vec<Stored>> = load_registers(schema, relid, keys)?.into_iter().collect();
        let mut regs: Vec<RegisterRow> = Vec::new();
        for (key, v) in versions {
            let local = v.causal(me);
            let existing = held.get(key);
            let seen = existing.is_some_and(|regs| {
                regs.iter().map(|w| w.causal(me)).any(|w| w.dot() == local.dot() || w.has_seen(&local))
            });
            if !seen {
                regs.push(RegisterRow { key, stored: std::slice::from_ref(v), existed: existing.is_some() });
            }
        }
        store_registers(schema, relid, &regs)?;
    }
    if prefix > indexed {
        Spi::run_with_args(&format!("UPDATE {schema}.sync_node SET indexed_upto = $1"), &[prefix.into()])?;
    }
    Ok(Folded { prefix, above })
}

/// True when a local transaction that `folded` did not include has committed since and wrote
/// one of `keys` (table, key text). Apply read those rows' registers without it, then waited
/// for its row lock and wrote over it: the origin transaction must be applied again.
pub fn raced(schema: &str, me: Uuid, folded: &Folded, keys: &[(String, String)]) -> Result<bool, SyncError> {
    let (tables, pks): (Vec<String>, Vec<String>) = keys.iter().cloned().unzip();
    Ok(Spi::connect_mut(|c| {
        c.update(
            &format!(
                "SELECT EXISTS (SELECT 1 FROM {schema}.sync_events e \
                   JOIN unnest($4::text[], $5::text[]) AS k(t, pk) ON e.table_name = k.t AND e.pk::text = k.pk \
                  WHERE e.origin = $1 AND e.origin_seq > $2 AND e.origin_seq <> ALL($3))"
            ),
            None,
            &[
                pgrx::Uuid::from_bytes(*me.as_bytes()).into(),
                folded.prefix.into(),
                folded.above.clone().into(),
                tables.into(),
                pks.into(),
            ],
        )?
        .first()
        .get_one::<bool>()
    })?
    .unwrap_or(false))
}
