//! Two different transactions under one `(origin, seq)`: a copied or restored node that numbered
//! on under an identity another node also uses (`sync_bridge::log::Fingerprint` tells them
//! apart). Whoever receives the second says so loudly: a WARNING with a hint, a row in
//! `sync_twins` keeping the one received (so neither is dropped silently: this node's is in its
//! log). (A node never receives its own origin's transactions back; it finds a copy of itself
//! by `discovery::Doubt` instead.)

use super::Txn;
use crate::error::SyncError;
use pgrx::prelude::*;
use std::collections::BTreeMap;
use sync_bridge::log::Fingerprint;
use uuid::Uuid;

/// Compare the transactions a batch brought that this node already holds with its log.
pub fn check(schema: &str, held: &[&Txn]) -> Result<(), SyncError> {
    if held.is_empty() {
        return Ok(());
    }
    let origins: Vec<pgrx::Uuid> = held.iter().map(|t| pgrx::Uuid::from_bytes(*t.origin.as_bytes())).collect();
    let seqs: Vec<i64> = held.iter().map(|t| t.seq).collect();
    let mut ours = BTreeMap::new();
    Spi::connect(|c| {
        for row in c.select(
            &format!(
                "SELECT l.origin, l.origin_seq, min(l.origin_xact), max(l.hlc), sum(l.n)::bigint \
                   FROM unnest($1::uuid[], $2::bigint[]) AS k(o, q) \
                   JOIN {schema}.sync_log l ON l.origin = k.o AND l.origin_seq = k.q GROUP BY 1, 2"
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
            ours.insert((Uuid::from_bytes(*o.as_bytes()), q), f);
        }
        Ok::<_, SyncError>(())
    })?;
    for t in held {
        // Pruned from the log: nothing to compare with.
        let Some(mine) = ours.get(&(t.origin, t.seq)) else { continue };
        let theirs = Fingerprint::of(&t.events);
        if *mine != theirs {
            report(schema, t, *mine, theirs)?;
        }
    }
    Ok(())
}

fn report(schema: &str, t: &Txn, mine: Fingerprint, theirs: Fingerprint) -> Result<(), SyncError> {
    let first = Spi::get_one_with_args::<bool>(
        &format!(
            "WITH i AS (INSERT INTO {schema}.sync_twins (origin, origin_seq, ours, theirs, events) \
                        VALUES ($1, $2, $3::jsonb, $4::jsonb, $5::jsonb) ON CONFLICT DO NOTHING RETURNING 1) \
             SELECT EXISTS (SELECT 1 FROM i)"
        ),
        &[
            pgrx::Uuid::from_bytes(*t.origin.as_bytes()).into(),
            t.seq.into(),
            serde_json::to_string(&mine).expect("serialises").into(),
            serde_json::to_string(&theirs).expect("serialises").into(),
            serde_json::to_string(&t.events).expect("serialises").into(),
        ],
    )?;
    if first != Some(true) {
        return Ok(());
    }
    let what = format!("two different transactions are numbered ({}, {})", t.origin, t.seq);
    pgrx::pg_sys::panic::ErrorReport::new(
        PgSqlErrorCode::ERRCODE_WARNING,
        format!("pg_peersync: {what}: another node uses node {}'s identity", t.origin),
        "pg_peersync",
    )
    .set_hint(
        "A copied or restored database numbers on under its original's identity. On the copy, a superuser runs \
         SELECT sync_new_identity(). The transaction received is kept in sync_twins; this node's is in sync_log.",
    )
    .report(PgLogLevel::WARNING);
    Ok(())
}
