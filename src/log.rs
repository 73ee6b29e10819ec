//! The change log, `sync_log`: one row per transaction (or run of one) of any origin, its
//! changes in parts (`sync_bridge::log::LogRow` says what a row holds and unpacks it). This
//! module owns the table's layout: the one statement that writes a row, used by capture for
//! this node's transactions and by apply for received ones, the one reader, and (in
//! `retention`) what may be deleted.

pub mod retention;

use crate::error::SyncError;
use pgrx::prelude::*;
use sync_bridge::Event;
use sync_bridge::log::{LogRow, Part};
use uuid::Uuid;

/// The columns `read_row` reads, in its order (from column 1).
pub const READ_COLUMNS: &str = "origin_seq, first_idx, origin_xact, vclock::text, part_hlc, part_table, \
                                part_op, part_pk, part_first, part_rows";

pub fn unreadable(origin: Uuid, seq: i64, what: String) -> SyncError {
    SyncError::BadBatch(format!("sync_log row {origin}/{seq} is unreadable: {what}"))
}

/// One `sync_log` row of `origin`, read with `READ_COLUMNS`.
pub fn read_row(origin: Uuid, seq: i64, row: &pgrx::spi::SpiHeapTupleData) -> Result<LogRow, SyncError> {
    let text = |i: usize| -> Result<Vec<String>, SyncError> { Ok(row.get::<Vec<String>>(i)?.unwrap_or_default()) };
    let (tables, ops, pks, rows) = (text(6)?, text(7)?, text(8)?, text(10)?);
    let hlcs: Vec<i64> = row.get(5)?.unwrap_or_default();
    let firsts: Vec<i32> = row.get(9)?.unwrap_or_default();
    let vclock: &str = row.get(4)?.expect("vclock");
    // The part arrays are parallel; their texts move into the parts (row images can be large).
    let mut parts = Vec::with_capacity(tables.len());
    for ((((table, op), pk_columns), rows), (hlc, first)) in
        tables.into_iter().zip(ops).zip(pks).zip(rows).zip(hlcs.into_iter().zip(firsts))
    {
        let op = sync_bridge::Op::parse(&op).ok_or_else(|| unreadable(origin, seq, format!("operation {op:?}")))?;
        parts.push(Part { hlc, table, op, pk_columns, first, rows });
    }
    Ok(LogRow {
        origin,
        seq,
        xact: row.get(3)?.expect("origin_xact"),
        vclock: serde_json::from_str(vclock).map_err(|e| unreadable(origin, seq, e.to_string()))?,
        parts,
    })
}

/// The statement that writes one row: `$1` origin, `$2` origin_seq, `$3` first change index,
/// `$4` xid, `$5` change count, `$6` vclock, `$7` greatest hlc, then one array per part
/// attribute: hlc, table, op, primary-key columns, first index, count, rows. With `if_new`, a
/// row already there is kept (a received transaction can arrive again).
pub fn insert_statement(schema: &str, if_new: bool) -> String {
    format!(
        "INSERT INTO {schema}.sync_log (origin, origin_seq, first_idx, origin_xact, n, vclock, hlc, \
           part_hlc, part_table, part_op, part_pk, part_first, part_n, part_rows) \
         VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7, $8, $9, $10, $11, $12, $13, $14){}",
        if if_new { " ON CONFLICT DO NOTHING" } else { "" }
    )
}

/// The parameter types of `insert_statement`, for a plan prepared ahead.
pub const INSERT_TYPES: [pg_sys::Oid; 14] = [
    pg_sys::UUIDOID,
    pg_sys::INT8OID,
    pg_sys::INT8OID,
    pg_sys::INT8OID,
    pg_sys::INT4OID,
    pg_sys::JSONBOID,
    pg_sys::INT8OID,
    pg_sys::INT8ARRAYOID,
    pg_sys::TEXTARRAYOID,
    pg_sys::TEXTARRAYOID,
    pg_sys::TEXTARRAYOID,
    pg_sys::INT4ARRAYOID,
    pg_sys::INT4ARRAYOID,
    pg_sys::TEXTARRAYOID,
];

/// Store one received origin transaction's events, in the layout capture writes, so that this
/// node serves them to others under their origin and numbers.
pub fn store_received(schema: &str, events: &[Event]) -> Result<(), SyncError> {
    let sql = insert_statement(schema, true);
    for row in LogRow::from_events(events) {
        let n = row.len();
        let (first, hlc) = (row.first() as i64, row.hlc());
        let mut hlcs = Vec::new();
        let mut tables = Vec::new();
        let mut ops = Vec::new();
        let mut pks = Vec::new();
        let mut firsts = Vec::new();
        let mut counts = Vec::new();
        let mut rows = Vec::new();
        for p in row.parts {
            counts.push(p.len());
            hlcs.push(p.hlc);
            tables.push(p.table);
            ops.push(p.op.as_str().to_string());
            pks.push(p.pk_columns);
            firsts.push(p.first);
            rows.push(p.rows);
        }
        crate::apply::plans::run(
            &sql,
            &[
                pgrx::Uuid::from_bytes(*row.origin.as_bytes()).into(),
                row.seq.into(),
                first.into(),
                row.xact.into(),
                n.into(),
                serde_json::to_string(&row.vclock).expect("serialises").into(),
                hlc.into(),
                hlcs.into(),
                tables.into(),
                ops.into(),
                pks.into(),
                firsts.into(),
                counts.into(),
                rows.into(),
            ],
        )?;
    }
    Ok(())
}
