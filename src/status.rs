//! `sync_status()`: what this node is and holds, as one JSON document for humans and tools.

use crate::changes::have_vector;
use crate::clock;
use crate::error::{SyncError, SyncResult};
use crate::gucs;
use pgrx::JsonB;
use pgrx::prelude::*;
use serde_json::{Value, json};

#[pg_extern]
fn sync_status() -> SyncResult<JsonB> {
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
    let have: serde_json::Map<String, Value> =
        have_vector()?.into_iter().map(|(k, v)| (k.to_string(), json!(v))).collect();
    Ok(JsonB(json!({
        "node_id": ext.node_id.to_string(),
        "node_name": gucs::node_name(),
        "version": env!("CARGO_PKG_VERSION"),
        "enabled": gucs::enabled(),
        "clock": clock::current().as_i64(),
        "tables": stored["tables"],
        "events": stored["events"],
        "have": have,
        "apply": stored["apply"],
        "worker": crate::worker::status(),
    })))
}
