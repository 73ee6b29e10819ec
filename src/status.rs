//! `sync_status()`: what this node is and holds, as one JSON document for humans and tools.

use crate::changes::have_vector;
use crate::clock;
use crate::error::{SyncError, SyncResult};
use crate::gucs;
use pgrx::JsonB;
use pgrx::prelude::*;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};

#[pg_extern]
fn sync_status() -> SyncResult<JsonB> {
    gucs::without_jit(status)
}

fn status() -> SyncResult<JsonB> {
    let ext = clock::ext();
    let s = &ext.schema;
    let stored: Value = Spi::get_one_with_args::<JsonB>(
        &format!(
            "SELECT jsonb_build_object(
                'tables', coalesce((SELECT jsonb_agg(jsonb_build_object(
                        'table', t.table_name, 'strategy', t.strategy, 'row_filter', t.row_filter,
                        'exclude_columns', to_jsonb(t.exclude_columns), 'primary_key', to_jsonb(t.pk_columns),
                        'ignored_columns', to_jsonb(t.missing_columns),
                        'events', coalesce(c.n, 0)) ORDER BY t.table_name)
                    FROM {s}.sync_tables t
                    LEFT JOIN (SELECT p.table_name, sum(p.n) AS n
                                 FROM {s}.sync_log l, unnest(l.part_table, l.part_n) AS p(table_name, n)
                                GROUP BY 1) c
                      ON c.table_name = t.table_name), '[]'::jsonb),
                'events', (SELECT jsonb_build_object(
                        'total', coalesce(sum(n), 0), 'local', coalesce(sum(n) FILTER (WHERE origin = $1), 0),
                        'oldest', min(created_at), 'newest', max(created_at))
                    FROM {s}.sync_log),
                'apply', jsonb_build_object(
                        'errors', (SELECT count(*) FROM {s}.sync_inbox WHERE error IS NOT NULL),
                        'waiting', (SELECT count(*) FROM {s}.sync_inbox WHERE error IS NULL),
                        'conflicts', (SELECT count(*) FROM {s}.sync_conflicts),
                        'conflicts_to_review', (SELECT count(*) FROM {s}.sync_conflicts WHERE review = 'pending'),
                        'same_key_conflicts', (SELECT count(*) FROM {s}.sync_conflicts WHERE kind = 'same_key'),
                        'twins', (SELECT count(*) FROM {s}.sync_twins),
                        'held', (SELECT coalesce(jsonb_agg(jsonb_build_object(
                                    'origin', h.origin, 'table', h.tbl, 'transactions', h.n,
                                    'oldest_s', h.age, 'reason', h.reason) ORDER BY h.age DESC), '[]'::jsonb)
                                   FROM (SELECT i.origin, t.tbl, count(*) AS n,
                                                extract(epoch FROM now() - min(i.received_at))::bigint AS age,
                                                (array_agg(coalesce(i.error || ' (' || i.sqlstate || ')',
                                                                    'waiting for ' || i.waiting_for)
                                                           ORDER BY i.received_at))[1] AS reason
                                           FROM {s}.sync_inbox i, unnest(i.tables) AS t(tbl)
                                          GROUP BY i.origin, t.tbl) h)))"
        ),
        &[pgrx::Uuid::from_bytes(*ext.node_id.as_bytes()).into()],
    )
    .map_err(SyncError::from)?
    .map(|j| j.0)
    .unwrap_or(Value::Null);
    let mut stored = stored;
    let drift = column_drift(s, ext.node_id)?;
    if let Some(tables) = stored["tables"].as_array_mut() {
        for t in tables {
            let differ = t["table"].as_str().and_then(|name| drift.get(name)).cloned().unwrap_or_default();
            t["columns_differ"] = Value::Object(differ);
        }
    }
    let have: serde_json::Map<String, Value> =
        have_vector()?.into_iter().map(|(k, v)| (k.to_string(), json!(v))).collect();
    Ok(JsonB(json!({
        "node_id": ext.node_id.to_string(),
        "node_name": gucs::node_name(),
        "version": env!("CARGO_PKG_VERSION"),
        "enabled": gucs::enabled(),
        "clock": clock::current().as_i64(),
        // Why changes to tracked tables are refused, when another node seems to use this identity.
        "identity_doubt": ext.doubt,
        "tables": stored["tables"],
        "events": stored["events"],
        "log": crate::log::retention::status(s)?,
        "join": crate::snapshot::status(s)?,
        "have": have,
        "apply": stored["apply"],
        "worker": crate::worker::status(),
    })))
}

/// Per tracked table, per other origin whose columns differ from this table's: the columns its
/// latest changes carry that this table lacks (`missing_here`), and the captured columns they
/// lack (`missing_there`). Read from each origin's latest log rows (a bounded look back).
fn column_drift(schema: &str, me: uuid::Uuid) -> Result<BTreeMap<String, serde_json::Map<String, Value>>, SyncError> {
    let rows = Spi::connect(|client| {
        let sql = format!(
            "WITH latest AS (
               SELECT DISTINCT ON (l.origin, p.tbl) l.origin, p.tbl,
                      CASE p.op WHEN 'UPDATE' THEN p.rows::json -> 0 -> 0 ELSE p.rows::json -> 0 END AS image
                 FROM {schema}.sync_origins o
                CROSS JOIN LATERAL (SELECT * FROM {schema}.sync_log l WHERE l.origin = o.origin
                                     ORDER BY l.origin_seq DESC LIMIT 200) l
                CROSS JOIN LATERAL unnest(l.part_table, l.part_op, l.part_rows) AS p(tbl, op, rows)
                WHERE o.origin <> $1
                ORDER BY l.origin, p.tbl, l.origin_seq DESC)
             SELECT t.table_name, x.origin::text,
                    ARRAY(SELECT json_object_keys(x.image)),
                    ARRAY(SELECT a.attname::text FROM pg_attribute a
                           WHERE a.attrelid = t.relid AND a.attnum > 0 AND NOT a.attisdropped
                             AND a.attname <> ALL (t.exclude_columns))
               FROM {schema}.sync_tables t JOIN latest x ON x.tbl = t.table_name"
        );
        let mut out = Vec::new();
        for row in client.select(&sql, None, &[pgrx::Uuid::from_bytes(*me.as_bytes()).into()])? {
            out.push((
                row.get::<String>(1)?.unwrap_or_default(),
                row.get::<String>(2)?.unwrap_or_default(),
                row.get::<Vec<String>>(3)?.unwrap_or_default(),
                row.get::<Vec<String>>(4)?.unwrap_or_default(),
            ));
        }
        Ok::<_, SyncError>(out)
    })?;
    let mut drift: BTreeMap<String, serde_json::Map<String, Value>> = BTreeMap::new();
    for (table, origin, theirs, ours) in rows {
        let (here, there) = differ(&ours, &theirs);
        if !here.is_empty() || !there.is_empty() {
            drift.entry(table).or_default().insert(origin, json!({"missing_here": here, "missing_there": there}));
        }
    }
    Ok(drift)
}

/// The columns `theirs` has and `ours` lacks, and those `ours` has and `theirs` lacks, sorted.
fn differ(ours: &[String], theirs: &[String]) -> (Vec<String>, Vec<String>) {
    let ours: BTreeSet<&String> = ours.iter().collect();
    let theirs: BTreeSet<&String> = theirs.iter().collect();
    (
        theirs.difference(&ours).map(|c| c.to_string()).collect(),
        ours.difference(&theirs).map(|c| c.to_string()).collect(),
    )
}
