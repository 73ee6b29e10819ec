//! `sync_have()` and `sync_changes()`: what this node holds, and the batches peers pull.

use crate::clock;
use crate::error::{SyncError, SyncResult};
use crate::sequencer;
use pgrx::prelude::*;
use pgrx::{JsonB, PgBuiltInOids, PgOid};
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
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

pub(crate) const EVENT_JSON: &str = "jsonb_build_object('origin', origin, 'seq', origin_seq, 'idx', origin_idx, \
     'xact', origin_xact, 'hlc', hlc, 'table', table_name, 'pk', pk, 'op', op, 'data', data, \
     'old', old, 'vclock', vclock, 'checksum', encode(checksum, 'hex'))";

/// The events the caller lacks, given its have-vector `since`: per origin, oldest first, whole
/// transactions only, about `max_events` in all (a transaction larger than that comes whole).
#[pg_extern]
fn sync_changes(since: default!(JsonB, "'{}'"), max_events: default!(i32, 1000)) -> SyncResult<JsonB> {
    sequencer::require_read_committed("sync_changes()")?;
    if max_events < 1 {
        return Err(pgrx::pg_sys::panic::ErrorReport::new(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("max_events must be at least 1, not {max_events}"),
            "pg_peersync",
        )
        .set_hint("Pass a positive batch size, for example 1000."));
    }
    let since = parse_have(&since.0)?;
    // The have-vector is computed first; the reads below take later snapshots.
    let have = have_vector()?;
    let ext = clock::ext();
    let mut budget = max_events as i64;
    let (mut from, mut upto) = (BTreeMap::new(), BTreeMap::new());
    let mut events: Vec<Value> = Vec::new();
    let mut more = false;
    Spi::connect(|client| {
        let uuid = PgOid::BuiltIn(PgBuiltInOids::UUIDOID);
        let int8 = PgOid::BuiltIn(PgBuiltInOids::INT8OID);
        let range = client.prepare_mut(
            &format!(
                "SELECT origin_seq, {EVENT_JSON} FROM {}.sync_events \
                 WHERE origin = $1 AND origin_seq > $2 AND origin_seq <= $3 \
                 ORDER BY origin_seq, origin_idx LIMIT $4",
                ext.schema
            ),
            &[uuid, int8, int8, int8],
        )?;
        let rest = client.prepare_mut(
            &format!(
                "SELECT origin_seq, {EVENT_JSON} FROM {}.sync_events \
                 WHERE origin = $1 AND origin_seq = $2 AND origin_idx > $3 ORDER BY origin_idx",
                ext.schema
            ),
            &[uuid, int8, PgOid::BuiltIn(PgBuiltInOids::INT4OID)],
        )?;
        for (origin, &top) in &have {
            let start = since.get(origin).copied().unwrap_or(0);
            if top <= start {
                continue;
            }
            if budget <= 0 {
                more = true;
                break;
            }
            let o = pgrx::Uuid::from_bytes(*origin.as_bytes());
            let rows = client.select(&range, None, &[o.into(), start.into(), top.into(), budget.into()])?;
            let mut last: Option<(i64, i32)> = None;
            let mut n = 0i64;
            for row in rows {
                let seq: i64 = row.get(1)?.expect("origin_seq is not null");
                let JsonB(ev) = row.get::<JsonB>(2)?.expect("event json");
                let idx = ev["idx"].as_i64().unwrap_or(0) as i32;
                last = Some((seq, idx));
                events.push(ev);
                n += 1;
            }
            budget -= n;
            let reached = if n > 0 && budget <= 0 {
                // The limit may have cut the last transaction: complete it.
                let (seq, idx) = last.expect("rows were read");
                for row in client.select(&rest, None, &[o.into(), seq.into(), idx.into()])? {
                    let JsonB(ev) = row.get::<JsonB>(2)?.expect("event json");
                    events.push(ev);
                }
                seq
            } else {
                top
            };
            if reached < top {
                more = true;
            }
            from.insert(*origin, start);
            upto.insert(*origin, reached);
        }
        Ok::<_, SyncError>(())
    })?;
    let mut batch = Map::new();
    batch.insert("format".into(), json!(sync_bridge::FORMAT_VERSION));
    batch.insert("source".into(), json!(ext.node_id.to_string()));
    batch.insert("from".into(), to_json(&from));
    batch.insert("have".into(), to_json(&upto));
    batch.insert("events".into(), Value::Array(events));
    batch.insert("more".into(), json!(more));
    Ok(JsonB(Value::Object(batch)))
}
