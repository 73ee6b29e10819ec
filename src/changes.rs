//! `sync_have()` and `sync_changes()`: what this node holds, and the batches peers pull.

use crate::clock;
use crate::error::{SyncError, SyncResult};
use crate::log::unreadable;
use crate::sequencer;
use pgrx::prelude::*;
use pgrx::{JsonB, PgBuiltInOids, PgOid};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use sync_bridge::{Batch, Event, serve};
use uuid::Uuid;

/// This node's have-vector: for each origin, the highest number up to which it holds every
/// committed event of that origin.
pub fn have_vector() -> Result<BTreeMap<Uuid, i64>, SyncError> {
    let ext = clock::ext();
    let mut have = BTreeMap::new();
    have.insert(ext.node_id, sequencer::committed_prefix(&ext.schema, ext.node_id)?);
    Spi::connect(|client| {
        for row in client.select(&format!("SELECT origin, upto FROM {}.sync_origins", ext.schema), None, &[])? {
            if let (Some(o), Some(n)) = (row.get::<pgrx::Uuid>(1)?, row.get::<i64>(2)?) {
                have.insert(Uuid::from_bytes(*o.as_bytes()), n);
            }
        }
        Ok::<_, SyncError>(())
    })?;
    Ok(have)
}

fn to_json(map: &BTreeMap<Uuid, i64>) -> Value {
    Value::Object(map.iter().map(|(k, v)| (k.to_string(), json!(v))).collect())
}

/// Parse a have-vector given by a caller: `{"<uuid>": <non-negative integer>, ...}`.
pub fn parse_have(v: &Value) -> Result<BTreeMap<Uuid, i64>, SyncError> {
    let obj = v.as_object().ok_or_else(|| SyncError::BadHaveVector("expected a JSON object".into()))?;
    obj.iter()
        .map(|(k, n)| {
            let origin = Uuid::parse_str(k).map_err(|_| SyncError::BadHaveVector(format!("\"{k}\" is not a uuid")))?;
            let seq = n
                .as_i64()
                .filter(|s| *s >= 0)
                .ok_or_else(|| SyncError::BadHaveVector(format!("value for {k} is not a non-negative integer")))?;
            Ok((origin, seq))
        })
        .collect()
}

#[pg_extern]
fn sync_have() -> SyncResult<JsonB> {
    sequencer::require_read_committed("sync_have()")?;
    Ok(JsonB(to_json(&have_vector()?)))
}

/// One event of the `sync_events` view as JSON, in the batch's event shape (for tests that
/// compare the view with what `sync_changes` builds).
#[cfg(any(test, feature = "pg_test"))]
pub(crate) const EVENT_JSON: &str = "jsonb_build_object('origin', origin, 'seq', origin_seq, 'idx', origin_idx, \
     'xact', origin_xact, 'hlc', hlc, 'table', table_name, 'pk', pk, 'op', op, 'data', data, \
     'old', old, 'vclock', vclock, 'checksum', encode(checksum, 'hex'))";

/// The events the caller lacks, given its have-vector `since`, as the batch's JSON text: whole
/// transactions, each after what it depends on, about `max_events` events in all (a
/// transaction larger than that comes whole). With `node_have`, the batch also carries this node's whole
/// have-vector (the worker's answer to a pull). `sync_changes(jsonb, int)` wraps it.
///
/// The events are rebuilt from the `sync_log` rows in Rust (`sync_bridge::log`), not read from
/// the `sync_events` view, which gives the same events but is several times slower.
#[pg_extern]
fn _sync_changes_text(since: &str, max_events: i32, node_have: bool) -> SyncResult<String> {
    sequencer::require_read_committed("sync_changes()")?;
    if max_events < 1 {
        return Err(pgrx::pg_sys::panic::ErrorReport::new(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("max_events must be at least 1, not {max_events}"),
            "pg_peersync",
        )
        .set_hint("Pass a positive batch size, for example 1000."));
    }
    let since: Value = serde_json::from_str(since).map_err(|e| SyncError::BadHaveVector(format!("not JSON: {e}")))?;
    let since = parse_have(&since)?;
    // The have-vector is computed first; the reads below take later snapshots.
    let have = have_vector()?;
    let batch = batch(&since, &have, max_events as i64)?;
    let mut text = serde_json::to_string(&batch).expect("a batch serialises");
    if node_have {
        text.pop();
        text.push_str(",\"node_have\":");
        text.push_str(&to_json(&have).to_string());
        text.push('}');
    }
    Ok(text)
}

/// Append the events of one `sync_log` row (read with `log::READ_COLUMNS`).
fn push_events(
    events: &mut Vec<Event>,
    origin: Uuid,
    seq: i64,
    row: &pgrx::spi::SpiHeapTupleData,
) -> Result<(), SyncError> {
    let log = crate::log::read_row(origin, seq, row)?;
    events.extend(log.events().map_err(|e| unreadable(origin, seq, e))?);
    Ok(())
}

extension_sql!(
    r#"
CREATE FUNCTION sync_changes(since jsonb DEFAULT '{}', max_events integer DEFAULT 1000) RETURNS jsonb
LANGUAGE sql VOLATILE
AS $$ SELECT @extschema@._sync_changes_text(since::text, max_events, false)::jsonb $$;
COMMENT ON FUNCTION sync_changes(jsonb, integer) IS
    'The events a node with have-vector since lacks: whole transactions, about max_events of them.';
"#,
    name = "sync_changes",
    requires = [_sync_changes_text],
);

/// The batch of events in `(since, have]` per origin, about `max_events` of them, each
/// transaction after what it depends on (`sync_bridge::serve`).
pub(crate) fn batch(
    since: &BTreeMap<Uuid, i64>,
    have: &BTreeMap<Uuid, i64>,
    max_events: i64,
) -> Result<Batch, SyncError> {
    let ext = clock::ext();
    // Origins whose changes the caller lacks and this node deleted: none of them is served.
    let gone = serve::gone(&crate::log::retention::pruned(&ext.schema)?, since);
    // And those it lacks from before this node's data was copied: another peer serves them.
    let mut absent = serve::gone(&crate::snapshot::copied_marks(&ext.schema)?, since);
    absent.retain(|o, _| !gone.contains_key(o));
    let mut have = have.clone();
    have.retain(|o, _| !gone.contains_key(o) && !absent.contains_key(o));
    let windows = windows(&ext.schema, since, &have, max_events)?;
    let cut = serve::cut(since, &windows, max_events);
    let mut txns = read_transactions(&ext.schema, &cut)?;
    let mut events: Vec<Event> = Vec::with_capacity(txns.values().map(Vec::len).sum());
    for key in &cut.order {
        events.extend(txns.remove(key).unwrap_or_default());
    }
    let starts: Vec<(Uuid, i64)> = cut
        .from
        .iter()
        .filter(|(o, n)| **n > 0 && events.iter().any(|e| e.origin == **o))
        .map(|(o, n)| (*o, *n))
        .collect();
    let at = crate::apply::twins::fingerprints(&ext.schema, &starts)?.into_iter().map(|((o, _), f)| (o, f)).collect();
    let twins = crate::apply::twins::known(&ext.schema)?;
    Ok(Batch {
        format: sync_bridge::FORMAT_VERSION,
        source: ext.node_id,
        from: cut.from,
        have: cut.have,
        events,
        more: cut.more,
        gone,
        absent,
        at,
        twins,
    })
}

/// Per origin this node holds beyond `since`: its first transactions (at most `max_events`,
/// since each has at least one event) with their sizes, clocks and contexts; not their images.
fn windows(
    schema: &str,
    since: &BTreeMap<Uuid, i64>,
    have: &BTreeMap<Uuid, i64>,
    max_events: i64,
) -> Result<Vec<serve::Window>, SyncError> {
    // Index range scans whatever the values: planned once per backend.
    let heads = format!(
        "SELECT origin_seq, sum(n)::bigint, max(hlc), array_agg(vclock::text) FROM {schema}.sync_log \
          WHERE origin = $1 AND origin_seq > $2 AND origin_seq <= $3 \
          GROUP BY origin_seq ORDER BY origin_seq LIMIT $4"
    );
    let mut out = Vec::new();
    for (origin, &top) in have {
        let from = since.get(origin).copied().unwrap_or(0);
        if top <= from {
            continue;
        }
        let o = pgrx::Uuid::from_bytes(*origin.as_bytes());
        let offers =
            crate::apply::plans::query(&heads, &[o.into(), from.into(), top.into(), max_events.into()], |rows| {
                let mut offers = Vec::with_capacity(rows.len());
                for row in rows {
                    let seq: i64 = row.get(1)?.expect("origin_seq");
                    let mut context: BTreeMap<Uuid, i64> = BTreeMap::new();
                    for text in row.get::<Vec<String>>(4)?.unwrap_or_default() {
                        let v: BTreeMap<Uuid, i64> =
                            serde_json::from_str(&text).map_err(|e| unreadable(*origin, seq, e.to_string()))?;
                        sync_bridge::delivery::widen(&mut context, &v);
                    }
                    offers.push(serve::Offer {
                        seq,
                        events: row.get(2)?.unwrap_or(1),
                        hlc: row.get(3)?.unwrap_or(0),
                        context,
                    });
                }
                Ok(offers)
            })?;
        let complete = (offers.len() as i64) < max_events;
        out.push(serve::Window { origin: *origin, from, top, offers, complete });
    }
    Ok(out)
}

/// The events of the transactions `cut` chose, by transaction.
fn read_transactions(schema: &str, cut: &serve::Cut) -> Result<HashMap<(Uuid, i64), Vec<Event>>, SyncError> {
    // What each origin contributes is a run of its transactions from the caller's position.
    let mut last: BTreeMap<Uuid, i64> = BTreeMap::new();
    for (origin, seq) in &cut.order {
        last.insert(*origin, *seq);
    }
    let mut out: HashMap<(Uuid, i64), Vec<Event>> = HashMap::with_capacity(cut.order.len());
    Spi::connect(|client| {
        let uuid = PgOid::BuiltIn(PgBuiltInOids::UUIDOID);
        let int8 = PgOid::BuiltIn(PgBuiltInOids::INT8OID);
        let cols = crate::log::READ_COLUMNS;
        let range = client.prepare(
            &format!(
                "SELECT {cols} FROM {schema}.sync_log \
                  WHERE origin = $1 AND origin_seq > $2 AND origin_seq <= $3 ORDER BY origin_seq, first_idx"
            ),
            &[uuid, int8, int8],
        )?;
        for (origin, upto) in last {
            let from = cut.from.get(&origin).copied().unwrap_or(0);
            let o = pgrx::Uuid::from_bytes(*origin.as_bytes());
            for row in client.select(&range, None, &[o.into(), from.into(), upto.into()])? {
                let seq: i64 = row.get(1)?.expect("origin_seq");
                push_events(out.entry((origin, seq)).or_default(), origin, seq, &row)?;
            }
        }
        Ok::<_, SyncError>(())
    })?;
    Ok(out)
}
