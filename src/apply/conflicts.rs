//! Conflict settings and review: per-table strategy, node priorities, and
//! `sync_resolve_conflict()` for conflicts marked for review.

use crate::capture::display_name;
use crate::clock;
use crate::error::{SyncError, SyncResult};
use pgrx::prelude::*;
use pgrx::{JsonB, PgRelation};
use serde_json::Value;
use sync_bridge::resolve::Strategy;

/// Change a tracked table's conflict strategy. `resolver` names the function for 'custom':
/// `f(local jsonb, remote jsonb, info jsonb) returns jsonb`. Every node should use the same
/// strategy for a table.
#[pg_extern]
fn sync_set_strategy(tbl: PgRelation, strategy: &str, resolver: default!(Option<&str>, "NULL")) -> SyncResult<()> {
    let strategy = crate::capture::check_strategy(strategy)?;
    let ext = clock::ext();
    let name = display_name(tbl.oid())?;
    let resolver_oid: Option<pg_sys::Oid> = match (strategy, resolver) {
        (Strategy::Custom, None) => return Err(SyncError::NoResolver(name).into()),
        (_, Some(f)) => {
            // regprocedure input raises PostgreSQL's own error for an unknown function.
            let (oid, ok) = Spi::connect(|client| {
                let row = client
                    .select(
                        "SELECT p.oid, p.prorettype = 'jsonb'::regtype AND p.pronargs = 3 \
                                AND p.proargtypes[0] = 'jsonb'::regtype AND p.proargtypes[1] = 'jsonb'::regtype \
                                AND p.proargtypes[2] = 'jsonb'::regtype \
                           FROM pg_proc p WHERE p.oid = $1::regprocedure",
                        None,
                        &[f.into()],
                    )?
                    .first();
                Ok::<_, SyncError>((row.get::<pg_sys::Oid>(1)?, row.get::<bool>(2)?.unwrap_or(false)))
            })?;
            if !ok {
                return Err(SyncError::BadResolver(f.to_string()).into());
            }
            oid
        }
        (_, None) => None,
    };
    let updated = Spi::get_one_with_args::<bool>(
        &format!(
            "WITH u AS (UPDATE {}.sync_tables SET strategy = $2, resolver = $3::oid::regprocedure \
                         WHERE relid = $1 RETURNING 1) SELECT count(*) > 0 FROM u",
            ext.schema
        ),
        &[tbl.oid().into(), strategy.name().into(), resolver_oid.into()],
    )
    .map_err(SyncError::from)?
    .unwrap_or(false);
    if !updated {
        return Err(SyncError::NotTracked(name).into());
    }
    Ok(())
}

/// Declare counter columns of a tracked table (stock levels, balances, points): a change that
/// is concurrent with what a node holds adds its delta (new minus old) to that node's value,
/// so concurrent `qty - 3` and `qty - 5` from 100 end at 92 on every node. Integer and
/// `numeric` columns, not in the primary key. An empty array clears them. Set the same on
/// every node.
#[pg_extern]
fn sync_set_counters(tbl: PgRelation, columns: Vec<String>) -> SyncResult<()> {
    Ok(set_counters(tbl.oid(), columns)?)
}

fn set_counters(relid: pg_sys::Oid, columns: Vec<String>) -> Result<(), SyncError> {
    let ext = clock::ext();
    let name = display_name(relid)?;
    for c in &columns {
        // The column's type, and whether it is part of the primary key.
        let found = Spi::connect(|client| {
            let row = client
                .select(
                    "SELECT format_type(a.atttypid, NULL), \
                            a.attnum = ANY (SELECT unnest(i.indkey) FROM pg_index i \
                                             WHERE i.indrelid = a.attrelid AND i.indisprimary) \
                       FROM pg_attribute a \
                      WHERE a.attrelid = $1 AND a.attname = $2 AND a.attnum > 0 AND NOT a.attisdropped",
                    None,
                    &[relid.into(), c.clone().into()],
                )?
                .first();
            Ok::<_, SyncError>(if row.is_empty() { None } else { Some((row.get::<String>(1)?, row.get::<bool>(2)?)) })
        })?;
        match found {
            None => return Err(SyncError::UnknownColumn { table: name, column: c.clone() }),
            Some((Some(ty), in_key)) => {
                let kind = if in_key == Some(true) { "in the primary key".to_string() } else { ty };
                if !["smallint", "integer", "bigint", "numeric"].contains(&kind.as_str()) {
                    return Err(SyncError::BadCounter { table: name, column: c.clone(), kind });
                }
            }
            Some((None, _)) => return Err(SyncError::UnknownColumn { table: name, column: c.clone() }),
        }
    }
    let updated = Spi::get_one_with_args::<bool>(
        &format!(
            "WITH u AS (UPDATE {}.sync_tables SET counters = $2 WHERE relid = $1 RETURNING 1) \
             SELECT count(*) > 0 FROM u",
            ext.schema
        ),
        &[relid.into(), columns.into()],
    )?
    .unwrap_or(false);
    if !updated {
        return Err(SyncError::NotTracked(name));
    }
    Ok(())
}

/// Set a node's priority for strategy 'node_priority' (greater wins; nodes not listed have 0).
/// Set the same priorities on every node: they must agree for the nodes to converge.
#[pg_extern]
fn sync_set_node_priority(node: pgrx::Uuid, priority: i32) -> SyncResult<()> {
    let ext = clock::ext();
    Spi::run_with_args(
        &format!(
            "INSERT INTO {}.sync_node_priorities (node, priority) VALUES ($1, $2) \
             ON CONFLICT (node) DO UPDATE SET priority = EXCLUDED.priority",
            ext.schema
        ),
        &[node.into(), priority.into()],
    )
    .map_err(SyncError::from)?;
    Ok(())
}

/// Settle a conflict marked for review: `choice` is `"local"`, `"remote"` or a whole row (a JSON
/// object). The chosen row is written as an ordinary local change, so it replicates and, having
/// seen both versions, wins everywhere. Returns the row written (NULL when it is a delete).
#[pg_extern]
fn sync_resolve_conflict(id: i64, choice: JsonB) -> SyncResult<Option<JsonB>> {
    let ext = clock::ext();
    let s = &ext.schema;
    let found = Spi::connect_mut(|client| {
        let rows = client.update(
            &format!(
                "SELECT c.table_name, c.pk::text, c.local::text, c.remote::text, t.relid::oid \
                   FROM {s}.sync_conflicts c LEFT JOIN {s}.sync_tables t ON t.table_name = c.table_name \
                  WHERE c.id = $1 FOR UPDATE OF c"
            ),
            None,
            &[id.into()],
        )?;
        let mut out = None;
        for row in rows {
            out = Some((
                row.get::<String>(1)?.unwrap_or_default(),
                row.get::<String>(2)?.unwrap_or_default(),
                row.get::<String>(3)?.unwrap_or_default(),
                row.get::<String>(4)?.unwrap_or_default(),
                row.get::<pg_sys::Oid>(5)?,
            ));
        }
        Ok::<_, SyncError>(out)
    })?;
    let Some((table, pk, local, remote, relid)) = found else {
        return Err(SyncError::NoSuchConflict(id).into());
    };
    if relid.is_none() {
        return Err(SyncError::NotTracked(table).into());
    }
    let parse = |t: &str| serde_json::from_str::<Value>(t).unwrap_or(Value::Null);
    let pk = parse(&pk);
    let row = match &choice.0 {
        Value::String(c) if c == "local" => parse(&local)["row"].clone(),
        Value::String(c) if c == "remote" => parse(&remote)["row"].clone(),
        Value::Object(r) => {
            let mut r = r.clone();
            // The row stays where it is: its key comes from the conflict.
            for (k, v) in pk.as_object().into_iter().flatten() {
                r.insert(k.clone(), v.clone());
            }
            Value::Object(r)
        }
        other => return Err(SyncError::BadChoice(id, other.to_string()).into()),
    };
    let keys: Vec<String> =
        pk.as_object().map(|o| o.keys().map(|k| super::rows::quote_ident(k)).collect()).unwrap_or_default();
    let keys = keys.join(", ");
    // Ordinary statements, captured by the triggers like any local write.
    if row.is_object() {
        let cols: Vec<String> = row.as_object().expect("object").keys().map(|k| super::rows::quote_ident(k)).collect();
        let list = cols.join(", ");
        let set: Vec<String> = cols.iter().map(|c| format!("{c} = EXCLUDED.{c}")).collect();
        Spi::run_with_args(
            &format!(
                "INSERT INTO {table} ({list}) SELECT {list} FROM jsonb_populate_record(NULL::{table}, $1::jsonb) \
                 ON CONFLICT ({keys}) DO UPDATE SET {}",
                set.join(", ")
            ),
            &[row.to_string().into()],
        )
        .map_err(SyncError::from)?;
    } else {
        Spi::run_with_args(
            &format!(
                "DELETE FROM {table} WHERE ({keys}) IN (SELECT {keys} FROM jsonb_populate_record(NULL::{table}, $1::jsonb))"
            ),
            &[pk.to_string().into()],
        )
        .map_err(SyncError::from)?;
    }
    Spi::run_with_args(
        &format!(
            "UPDATE {s}.sync_conflicts SET review = 'resolved', resolved_at = now(), \
                    note = concat_ws('; ', note, 'resolved with ' || $2) WHERE id = $1"
        ),
        &[id.into(), choice.0.to_string().into()],
    )
    .map_err(SyncError::from)?;
    Ok(if row.is_object() { Some(JsonB(row)) } else { None })
}
