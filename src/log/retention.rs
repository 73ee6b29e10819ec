//! A bounded change log (`peersync.log_retention`, off at 0).
//!
//! Every exchange brings the peer's have-vector; the worker keeps the latest per peer in
//! `sync_peers`. A `sync_log` row is deleted once every peer heard from within the retention
//! holds it and it is older than `peersync.log_min_age`, unless something here still reads it:
//! - this node's own transactions not folded into the row registers yet (`fold`),
//! - transactions applied blind and not folded yet (`sync_unfolded`),
//! - held transactions (`sync_inbox`), which this node relays from the log,
//! - any row while a table lacks columns that received changes carry (`drift` fills them in
//!   from the log once the column exists),
//! - the newest row of each origin (numbering and the clock start again from it after a
//!   restart).
//!
//! Conflict detection needs no log: the row registers (`sync_rows`) keep what it reads. What
//! was deleted is recorded per origin in `sync_pruned`; a node that asks for changes of an
//! origin below that is told so (`gone` in the batch, PROTOCOL.md) instead of being sent a batch
//! with a hole in it.

use crate::error::SyncError;
use crate::gucs;
use pgrx::prelude::*;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use uuid::Uuid;

/// Rows deleted per statement at most: keeps each pruning transaction short.
const PRUNE_ROWS: i64 = 20_000;

fn uuid(u: Uuid) -> pgrx::Uuid {
    pgrx::Uuid::from_bytes(*u.as_bytes())
}

/// Keep what peer `id` held at an exchange just finished.
pub fn record_peer(schema: &str, id: Uuid, name: Option<&str>, have: &BTreeMap<String, i64>) -> Result<(), SyncError> {
    Spi::run_with_args(
        &format!(
            "INSERT INTO {schema}.sync_peers AS p (id, name, have, heard_at) VALUES ($1, $2, $3, now())
             ON CONFLICT (id) DO UPDATE SET name = coalesce(excluded.name, p.name), have = excluded.have,
                                            heard_at = excluded.heard_at"
        ),
        &[uuid(id).into(), name.into(), pgrx::JsonB(json!(have)).into()],
    )?;
    Ok(())
}

/// Forget a peer for good: the log no longer keeps changes for it. Should it come back, it
/// counts again from its next exchange (and may find the changes it lacks gone).
#[pg_extern]
fn sync_forget_peer(id: pgrx::Uuid) -> crate::error::SyncResult<()> {
    let schema = crate::clock::ext().schema;
    let gone = Spi::get_one_with_args::<bool>(
        &format!("WITH d AS (DELETE FROM {schema}.sync_peers WHERE id = $1 RETURNING 1) SELECT count(*) > 0 FROM d"),
        &[id.into()],
    )
    .map_err(SyncError::from)?;
    if gone != Some(true) {
        return Err(SyncError::UnknownPeer(id.to_string()).into());
    }
    Ok(())
}

/// Forget the peers not heard from for longer than the retention: they no longer hold the log
/// back in any case. Returns their ids and names, for the server log.
pub fn forget_silent(schema: &str) -> Result<Vec<String>, SyncError> {
    let retention = gucs::log_retention();
    if retention <= 0 {
        return Ok(Vec::new());
    }
    Spi::connect_mut(|c| {
        let rows = c.update(
            &format!(
                "DELETE FROM {schema}.sync_peers WHERE heard_at < now() - make_interval(secs => $1)
                 RETURNING id::text || coalesce(' (' || name || ')', '') || ', silent since ' || heard_at"
            ),
            None,
            &[(retention as f64).into()],
        )?;
        rows.map(|r| Ok(r.get::<String>(1)?.unwrap_or_default())).collect()
    })
}

/// The peers the log keeps changes for (those not forgotten).
pub fn kept_peers(schema: &str) -> Result<std::collections::BTreeSet<Uuid>, SyncError> {
    Spi::connect(|c| {
        let mut out = std::collections::BTreeSet::new();
        for row in c.select(&format!("SELECT id FROM {schema}.sync_peers"), None, &[])? {
            if let Some(id) = row.get::<pgrx::Uuid>(1)? {
                out.insert(Uuid::from_bytes(*id.as_bytes()));
            }
        }
        Ok(out)
    })
}

/// Delete what no peer needs any more (see the module comment), a bounded slice; returns how
/// many log rows went. Nothing while retention is off or no peer has been heard from.
pub fn prune(schema: &str, me: Uuid) -> Result<i64, SyncError> {
    let retention = gucs::log_retention();
    if retention <= 0 {
        return Ok(0);
    }
    let deleted = Spi::get_one_with_args::<i64>(
        &format!(
            "WITH counted AS (
               SELECT have FROM {schema}.sync_peers
                WHERE heard_at > now() - make_interval(secs => $2) AND id <> $1),
             floor AS (
               SELECT o.key::uuid AS origin, min(o.value::bigint) AS upto
                 FROM counted c CROSS JOIN LATERAL jsonb_each_text(c.have) o
                GROUP BY 1 HAVING count(*) = (SELECT count(*) FROM counted)),
             bound AS (
               SELECT f.origin,
                      least(f.upto,
                            (SELECT max(origin_seq) - 1 FROM {schema}.sync_log m WHERE m.origin = f.origin),
                            CASE WHEN f.origin = $1 THEN (SELECT indexed_upto FROM {schema}.sync_node) END) AS upto
                 FROM floor f
                WHERE NOT EXISTS (SELECT 1 FROM {schema}.sync_tables WHERE cardinality(missing_columns) > 0)),
             doomed AS (
               SELECT l.ctid AS t FROM {schema}.sync_log l JOIN bound b ON l.origin = b.origin AND l.origin_seq <= b.upto
                WHERE l.created_at < now() - make_interval(secs => $3)
                  AND NOT EXISTS (SELECT 1 FROM {schema}.sync_unfolded u
                                   WHERE u.origin = l.origin AND u.origin_seq = l.origin_seq)
                  AND NOT EXISTS (SELECT 1 FROM {schema}.sync_inbox i
                                   WHERE i.origin = l.origin AND i.origin_seq = l.origin_seq)
                LIMIT $4),
             gone AS (
               DELETE FROM {schema}.sync_log l USING doomed d WHERE l.ctid = d.t
               RETURNING l.origin, l.origin_seq, l.origin_xact, l.hlc, l.n),
             noted AS (
               INSERT INTO {schema}.sync_pruned AS p SELECT origin, max(origin_seq) FROM gone GROUP BY origin
               ON CONFLICT (origin) DO UPDATE SET upto = greatest(p.upto, excluded.upto)),
             kept AS (
               INSERT INTO {schema}.sync_fingerprints AS f (origin, origin_seq, xact, hlc, n)
               SELECT origin, origin_seq, min(origin_xact), max(hlc), sum(n) FROM gone GROUP BY 1, 2
               ON CONFLICT (origin, origin_seq) DO UPDATE
                  SET xact = least(f.xact, excluded.xact), hlc = greatest(f.hlc, excluded.hlc), n = f.n + excluded.n),
             expired AS (
               DELETE FROM {schema}.sync_fingerprints WHERE ctid IN (
                 SELECT ctid FROM {schema}.sync_fingerprints
                  WHERE pruned_at < now() - make_interval(secs => $2) LIMIT $4))
             SELECT count(*) FROM gone"
        ),
        &[uuid(me).into(), (retention as f64).into(), (gucs::log_min_age() as f64).into(), PRUNE_ROWS.into()],
    )?;
    Ok(deleted.unwrap_or(0))
}

/// Per origin, the greatest number deleted from the log.
pub fn pruned(schema: &str) -> Result<BTreeMap<Uuid, i64>, SyncError> {
    Spi::connect(|c| {
        let mut out = BTreeMap::new();
        for row in c.select(&format!("SELECT origin, upto FROM {schema}.sync_pruned"), None, &[])? {
            if let (Some(o), Some(n)) = (row.get::<pgrx::Uuid>(1)?, row.get::<i64>(2)?) {
                out.insert(Uuid::from_bytes(*o.as_bytes()), n);
            }
        }
        Ok(out)
    })
}

/// For `sync_status()`: the log's size, its oldest entry and what was pruned, and per peer
/// heard from, how many of the log's transactions it alone still lacks (kept for it).
pub fn status(schema: &str) -> Result<Value, SyncError> {
    let v = Spi::get_one_with_args::<pgrx::JsonB>(
        &format!(
            "WITH peers AS (SELECT id, name, have, heard_at FROM {schema}.sync_peers),
             kept AS (
               SELECT p.id, count(*) AS n
                 FROM peers p JOIN {schema}.sync_log l
                   ON l.origin_seq > coalesce((p.have ->> l.origin::text)::bigint, 0)
                WHERE NOT EXISTS (SELECT 1 FROM peers q WHERE q.id <> p.id
                                   AND l.origin_seq > coalesce((q.have ->> l.origin::text)::bigint, 0))
                GROUP BY p.id)
             SELECT jsonb_build_object(
               'rows', (SELECT count(*) FROM {schema}.sync_log),
               'bytes', pg_total_relation_size('{schema}.sync_log'),
               'oldest', (SELECT min(created_at) FROM {schema}.sync_log),
               'retention_s', $1, 'min_age_s', $2,
               'pruned', coalesce((SELECT jsonb_object_agg(origin, upto) FROM {schema}.sync_pruned), '{{}}'),
               'peers', coalesce((SELECT jsonb_agg(jsonb_build_object(
                          'id', p.id, 'name', p.name, 'heard_s_ago', extract(epoch FROM now() - p.heard_at)::bigint,
                          'counted', $1 > 0 AND p.heard_at > now() - make_interval(secs => $1),
                          'kept_only_for_it', coalesce(k.n, 0)) ORDER BY p.id)
                        FROM peers p LEFT JOIN kept k ON k.id = p.id), '[]'))"
        ),
        &[(gucs::log_retention() as f64).into(), (gucs::log_min_age() as f64).into()],
    )?;
    Ok(v.map(|j| j.0).unwrap_or(Value::Null))
}
