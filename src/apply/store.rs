//! What apply keeps besides the log (`crate::log::store_received`): held transactions in
//! `sync_inbox`, and `sync_origins`.

use super::Txn;
use super::subxact::Failure;
use crate::error::SyncError;
use pgrx::prelude::*;
use pgrx::{PgBuiltInOids, PgOid};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use uuid::Uuid;

fn uuid(u: Uuid) -> pgrx::Uuid {
    pgrx::Uuid::from_bytes(*u.as_bytes())
}

/// Which held transactions to read.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Held {
    /// Waiting ones, and those that failed for a reason that passes by itself (a
    /// serialization failure or race with a local writer, a deadlock, a lock timeout): every
    /// apply tries those again.
    Retryable,
    /// Every one (`sync_retry_errors()`, and what a node asks its peers past).
    All,
}

/// SQLSTATEs of failures that pass by themselves: class 40 (transaction rollback:
/// serialization failure, deadlock) and lock_not_available.
const TRANSIENT: &str = "(sqlstate LIKE '40%' OR sqlstate = '55P03')";

/// Whether some held transaction failed for a reason that passes by itself.
pub fn has_transient(schema: &str) -> Result<bool, SyncError> {
    Ok(Spi::get_one::<bool>(&format!(
        "SELECT EXISTS (SELECT 1 FROM {schema}.sync_inbox WHERE error IS NOT NULL AND {TRANSIENT})"
    ))?
    .unwrap_or(false))
}

/// Per origin, the lowest number of a transaction held after it failed: the origin's changes
/// are not all in below it (a counter row's life lists what it counted above it, `rows`).
pub fn failed_floor(schema: &str) -> Result<BTreeMap<Uuid, i64>, SyncError> {
    Spi::connect(|c| {
        let rows = c.select(
            &format!("SELECT origin, min(origin_seq) FROM {schema}.sync_inbox WHERE error IS NOT NULL GROUP BY origin"),
            None,
            &[],
        )?;
        let mut out = BTreeMap::new();
        for row in rows {
            if let (Some(o), Some(n)) = (row.get::<pgrx::Uuid>(1)?, row.get::<i64>(2)?) {
                out.insert(Uuid::from_bytes(*o.as_bytes()), n);
            }
        }
        Ok(out)
    })
}

/// The held transactions, without their events (see `load_events`).
pub fn inbox(schema: &str, which: Held) -> Result<Vec<Txn>, SyncError> {
    let sql = format!(
        "SELECT origin, origin_seq, prev, context::text, error IS NOT NULL FROM {schema}.sync_inbox \
          WHERE $1 OR error IS NULL OR {TRANSIENT} ORDER BY origin, origin_seq"
    );
    super::plans::query(&sql, &[(which == Held::All).into()], |rows| {
        let mut out = Vec::new();
        for row in rows {
            let origin = Uuid::from_bytes(*row.get::<pgrx::Uuid>(1)?.expect("origin").as_bytes());
            let seq: i64 = row.get(2)?.expect("origin_seq");
            let context: String = row.get(4)?.expect("context");
            let context = serde_json::from_str(&context)
                .map_err(|e| SyncError::BadBatch(format!("sync_inbox entry {origin}/{seq} is unreadable: {e}")))?;
            out.push(Txn {
                origin,
                seq,
                prev: row.get(3)?.expect("prev"),
                context,
                events: Vec::new(),
                in_inbox: true,
                // A failed one is held past: the have-vector counts it.
                passed: row.get(5)?.unwrap_or(false),
            });
        }
        Ok(out)
    })
}

/// Read the events of the inbox entries `txns[i]` for each `i` of `which` (only those about to
/// be applied: the others stay in the inbox unread).
pub fn load_events(schema: &str, txns: &mut [Txn], which: &[usize]) -> Result<(), SyncError> {
    if which.is_empty() {
        return Ok(());
    }
    Spi::connect(|client| {
        let stmt = client.prepare(
            &format!("SELECT events::text FROM {schema}.sync_inbox WHERE origin = $1 AND origin_seq = $2"),
            &[PgOid::BuiltIn(PgBuiltInOids::UUIDOID), PgOid::BuiltIn(PgBuiltInOids::INT8OID)],
        )?;
        for &i in which {
            let t = &mut txns[i];
            let text: Option<String> =
                client.select(&stmt, Some(1), &[uuid(t.origin).into(), t.seq.into()])?.first().get(1)?;
            let text =
                text.ok_or_else(|| SyncError::BadBatch(format!("sync_inbox entry {}/{} vanished", t.origin, t.seq)))?;
            t.events = serde_json::from_str(&text).map_err(|e| {
                SyncError::BadBatch(format!("sync_inbox entry {}/{} is unreadable: {e}", t.origin, t.seq))
            })?;
        }
        Ok(())
    })
}

/// Keep a transaction in the inbox: failed (with the error) or waiting (with what for). One
/// already there keeps its events as stored; only its state changes, and only when it does.
pub fn hold(schema: &str, t: &Txn, failure: Option<&Failure>, waiting_for: Option<&str>) -> Result<(), SyncError> {
    let failed = failure.map(|f| (f.sqlstate.clone(), f.message.clone()));
    let (sqlstate, error) = (failed.as_ref().map(|f| f.0.clone()), failed.as_ref().map(|f| f.1.clone()));
    if t.in_inbox {
        Spi::run_with_args(
            &format!(
                "UPDATE {schema}.sync_inbox SET sqlstate = $3, error = $4, waiting_for = $5, \
                        attempts = attempts + (CASE WHEN $4 IS NULL THEN 0 ELSE 1 END), \
                        failed_at = CASE WHEN $4 IS NULL THEN failed_at ELSE now() END \
                  WHERE origin = $1 AND origin_seq = $2 \
                    AND ($4 IS NOT NULL OR (sqlstate, error, waiting_for) IS DISTINCT FROM ($3, $4, $5))"
            ),
            &[
                uuid(t.origin).into(),
                t.seq.into(),
                sqlstate.into(),
                error.into(),
                waiting_for.map(str::to_owned).into(),
            ],
        )?;
        return Ok(());
    }
    let tables: Vec<String> = {
        let mut v: Vec<String> = t.events.iter().map(|e| e.table.clone()).collect();
        v.dedup();
        v
    };
    if let Some(f) = failure {
        // Once per held transaction; retries update its row quietly.
        pgrx::warning!(
            "pg_peersync: origin transaction {}/{} ({}) is held: {} ({}); see sync_apply_errors",
            t.origin,
            t.seq,
            tables.join(", "),
            f.message,
            f.sqlstate
        );
    }
    Spi::run_with_args(
        &format!(
            "INSERT INTO {schema}.sync_inbox (origin, origin_seq, prev, context, events, tables, sqlstate, error, \
                                              waiting_for, attempts, failed_at) \
             VALUES ($1, $2, $3, $4::jsonb, $5::jsonb, $6, $7, $8, $9, CASE WHEN $8 IS NULL THEN 0 ELSE 1 END, \
                     CASE WHEN $8 IS NULL THEN NULL ELSE now() END) \
             ON CONFLICT (origin, origin_seq) DO NOTHING"
        ),
        &[
            uuid(t.origin).into(),
            t.seq.into(),
            t.prev.into(),
            serde_json::to_string(&t.context).expect("serialises").into(),
            serde_json::to_string(&t.events).expect("serialises").into(),
            tables.into(),
            sqlstate.into(),
            error.into(),
            waiting_for.map(str::to_owned).into(),
        ],
    )?;
    Ok(())
}

pub fn remove_from_inbox(schema: &str, t: &Txn) -> Result<(), SyncError> {
    Spi::run_with_args(
        &format!("DELETE FROM {schema}.sync_inbox WHERE origin = $1 AND origin_seq = $2"),
        &[uuid(t.origin).into(), t.seq.into()],
    )?;
    Ok(())
}

/// Record how far this node now holds each of these origins.
pub fn origins(schema: &str, upto: &[(Uuid, i64)]) -> Result<(), SyncError> {
    let map: serde_json::Map<String, Value> = upto.iter().map(|(o, n)| (o.to_string(), json!(n))).collect();
    Spi::run_with_args(
        &format!(
            "INSERT INTO {schema}.sync_origins (origin, upto) \
             SELECT key::uuid, value::bigint FROM jsonb_each_text($1::jsonb) \
             ON CONFLICT (origin) DO UPDATE SET upto = greatest({schema}.sync_origins.upto, EXCLUDED.upto)"
        ),
        &[Value::Object(map).to_string().into()],
    )?;
    Ok(())
}
