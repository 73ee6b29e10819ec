//! Two different transactions under one `(origin, seq)`: a copied or restored node that numbered
//! on under an identity another node also uses (`sync_bridge::log::Fingerprint` tells them
//! apart). Whoever receives the second says so loudly: a WARNING with a hint, a row in
//! `sync_twins` keeping the one received (so neither is dropped silently: this node's is in its
//! log). A node never receives its own origin's transactions back: it learns of a copy of
//! itself from the pairs its peers pass on in their batches (`Batch::twins`: holding one of
//! the two, it stops capturing), or by `discovery::Doubt`.

use super::Txn;
use crate::error::SyncError;
use pgrx::prelude::*;
use std::collections::BTreeMap;
use sync_bridge::log::{Fingerprint, Twin};

/// Pairs passed on per batch.
const PASSED_ON: i64 = 100;
use uuid::Uuid;

/// Compare the transactions a batch brought that this node already holds with its log.
pub fn check(schema: &str, held: &[&Txn]) -> Result<(), SyncError> {
    if held.is_empty() {
        return Ok(());
    }
    let keys: Vec<(Uuid, i64)> = held.iter().map(|t| (t.origin, t.seq)).collect();
    let ours = fingerprints(schema, &keys)?;
    for t in held {
        // Pruned longer ago than the retention: nothing to compare with.
        let Some(mine) = ours.get(&(t.origin, t.seq)) else { continue };
        let theirs = Fingerprint::of(&t.events);
        if *mine != theirs {
            report(schema, t, *mine, theirs)?;
        }
    }
    Ok(())
}

/// This node's fingerprints of the transactions `keys` (origin, seq) that its log keeps, or
/// kept (`sync_fingerprints`, for `peersync.log_retention` after they were pruned).
pub fn fingerprints(schema: &str, keys: &[(Uuid, i64)]) -> Result<BTreeMap<(Uuid, i64), Fingerprint>, SyncError> {
    let mut out = BTreeMap::new();
    if keys.is_empty() {
        return Ok(out);
    }
    let origins: Vec<pgrx::Uuid> = keys.iter().map(|(o, _)| pgrx::Uuid::from_bytes(*o.as_bytes())).collect();
    let seqs: Vec<i64> = keys.iter().map(|(_, q)| *q).collect();
    Spi::connect(|c| {
        for row in c.select(
            &format!(
                "SELECT o, q, min(x), max(h), sum(n)::bigint FROM ( \
                   SELECT l.origin, l.origin_seq, l.origin_xact, l.hlc, l.n::bigint \
                     FROM unnest($1::uuid[], $2::bigint[]) AS k(o, q) \
                     JOIN {schema}.sync_log l ON l.origin = k.o AND l.origin_seq = k.q \
                   UNION ALL \
                   SELECT f.origin, f.origin_seq, f.xact, f.hlc, f.n \
                     FROM unnest($1::uuid[], $2::bigint[]) AS k(o, q) \
                     JOIN {schema}.sync_fingerprints f ON f.origin = k.o AND f.origin_seq = k.q) AS t(o, q, x, h, n) \
                 GROUP BY 1, 2"
            ),
            None,
            &[origins.into(), seqs.into()],
        )? {
            let (Some(o), Some(q)) = (row.get::<pgrx::Uuid>(1)?, row.get::<i64>(2)?) else { continue };
            let f = Fingerprint {
                xact: row.get(3)?.unwrap_or(0),
                hlc: row.get(4)?.unwrap_or(0),
                n: row.get(5)?.unwrap_or(0),
            };
            out.insert((Uuid::from_bytes(*o.as_bytes()), q), f);
        }
        Ok::<_, SyncError>(())
    })?;
    Ok(out)
}

/// Pairs this node keeps (the most recent, a batch's worth), to pass on in its batches.
pub fn known(schema: &str) -> Result<Vec<Twin>, SyncError> {
    Spi::connect(|c| {
        let mut out = Vec::new();
        for row in c.select(
            &format!(
                "SELECT origin, origin_seq, ours::text, theirs::text FROM {schema}.sync_twins \
                  ORDER BY seen_at DESC LIMIT {PASSED_ON}"
            ),
            None,
            &[],
        )? {
            let (Some(o), Some(seq), Some(a), Some(b)) =
                (row.get::<pgrx::Uuid>(1)?, row.get::<i64>(2)?, row.get::<String>(3)?, row.get::<String>(4)?)
            else {
                continue;
            };
            if let (Ok(a), Ok(b)) = (serde_json::from_str(&a), serde_json::from_str(&b)) {
                out.push(Twin { origin: Uuid::from_bytes(*o.as_bytes()), seq, a, b });
            }
        }
        Ok(out)
    })
}

/// A peer passed on pairs under this node's own identity: if this node holds one of them,
/// another node numbers under its identity, and it stops capturing (`identity::record_doubt`).
pub fn betrayed(schema: &str, me: Uuid, source: Uuid, twins: &[Twin]) -> Result<(), SyncError> {
    let own: Vec<&Twin> = twins.iter().filter(|t| t.origin == me).collect();
    if own.is_empty() {
        return Ok(());
    }
    let keys: Vec<(Uuid, i64)> = own.iter().map(|t| (t.origin, t.seq)).collect();
    let ours = fingerprints(schema, &keys)?;
    if let Some(t) = own.iter().find(|t| t.betrays(me, ours.get(&(t.origin, t.seq)).copied())) {
        crate::identity::record_doubt(&format!(
            "peer {source} holds two different transactions numbered ({me}, {}): another node numbers \
             under this node's identity",
            t.seq
        ))?;
    }
    Ok(())
}

/// The origins of a batch that does not continue from the transaction this node holds at its
/// start (`Batch::at`): each is reported, and none of its events may be applied (they would
/// continue another history).
pub fn diverging(
    schema: &str,
    from: &BTreeMap<Uuid, i64>,
    at: &BTreeMap<Uuid, Fingerprint>,
) -> Result<Vec<Uuid>, SyncError> {
    let keys: Vec<(Uuid, i64)> = at.keys().filter_map(|o| Some((*o, *from.get(o)?))).collect();
    let ours = fingerprints(schema, &keys)?;
    let mut out = Vec::new();
    for (o, q) in keys {
        let (Some(mine), Some(theirs)) = (ours.get(&(o, q)), at.get(&o)) else { continue };
        if mine != theirs {
            record(schema, o, q, *mine, *theirs, "[]")?;
            out.push(o);
        }
    }
    Ok(out)
}

fn report(schema: &str, t: &Txn, mine: Fingerprint, theirs: Fingerprint) -> Result<(), SyncError> {
    record(schema, t.origin, t.seq, mine, theirs, &serde_json::to_string(&t.events).expect("serialises"))
}

/// Keep `theirs` in `sync_twins` and, the first time, say so with a WARNING.
fn record(
    schema: &str,
    origin: Uuid,
    seq: i64,
    mine: Fingerprint,
    theirs: Fingerprint,
    events: &str,
) -> Result<(), SyncError> {
    let first = Spi::get_one_with_args::<bool>(
        &format!(
            "WITH i AS (INSERT INTO {schema}.sync_twins (origin, origin_seq, ours, theirs, events) \
                        VALUES ($1, $2, $3::jsonb, $4::jsonb, $5::jsonb) ON CONFLICT DO NOTHING RETURNING 1) \
             SELECT EXISTS (SELECT 1 FROM i)"
        ),
        &[
            pgrx::Uuid::from_bytes(*origin.as_bytes()).into(),
            seq.into(),
            serde_json::to_string(&mine).expect("serialises").into(),
            serde_json::to_string(&theirs).expect("serialises").into(),
            events.to_string().into(),
        ],
    )?;
    if first != Some(true) {
        return Ok(());
    }
    let what = format!("two different transactions are numbered ({origin}, {seq})");
    pgrx::pg_sys::panic::ErrorReport::new(
        PgSqlErrorCode::ERRCODE_WARNING,
        format!("pg_peersync: {what}: another node uses node {origin}'s identity"),
        "pg_peersync",
    )
    .set_hint(
        "A copied or restored database numbers on under its original's identity. On the copy, a superuser runs \
         SELECT sync_new_identity(). The transaction received is kept in sync_twins; this node's is in sync_log.",
    )
    .report(PgLogLevel::WARNING);
    Ok(())
}
