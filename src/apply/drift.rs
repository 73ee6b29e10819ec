//! Schema drift: columns that peers send and a table here lacks (one node ran `ALTER TABLE
//! ... ADD COLUMN` before the others).
//!
//! Values of such a column are written nowhere on arrival, but they are not lost: the log
//! keeps the events whole. Each column is recorded in `sync_tables.missing_columns`, and once
//! the table has it (the next apply after the `ALTER TABLE` here), every row gets the value
//! it would have had: that of the latest change of the row, in the last-writer order, that
//! carries the column. Applying each change with the column there would have left exactly
//! that: a change without the column does not write it.

use super::Applying;
use super::Table;
use super::rows::quote_ident;
use crate::error::SyncError;
use pgrx::prelude::*;
use std::collections::HashMap;

/// Record received columns that tables lack (once per table and column); returns them as
/// `table.column` for `sync_apply`'s answer.
pub fn persist_missing_columns(schema: &str, tables: &HashMap<String, Table>) -> Result<Vec<String>, SyncError> {
    let mut out = Vec::new();
    for t in tables.values().filter(|t| !t.new_missing.is_empty()) {
        let all: Vec<String> = t.missing.union(&t.new_missing).cloned().collect();
        set_missing(schema, t, &all)?;
        out.extend(t.new_missing.iter().map(|c| format!("{}.{}", t.name, c)));
    }
    Ok(out)
}

/// Fill in the columns a table lacked and has now, from the log; returns them as
/// `table.column`.
pub fn fill_in_added_columns(schema: &str, tables: &mut HashMap<String, Table>) -> Result<Vec<String>, SyncError> {
    let mut out = Vec::new();
    for t in tables.values_mut() {
        let added: Vec<String> = t.missing.iter().filter(|c| t.columns.contains(*c)).cloned().collect();
        if added.is_empty() {
            continue;
        }
        for column in &added {
            fill_in(schema, t, column)?;
            t.missing.remove(column);
            out.push(format!("{}.{column}", t.name));
        }
        let left: Vec<String> = t.missing.iter().cloned().collect();
        set_missing(schema, t, &left)?;
    }
    Ok(out)
}

/// Set `column` of every row of `t` to its value in the latest change of the row (by the
/// last-writer order) that carries it. Not captured: every node does this itself.
fn fill_in(schema: &str, t: &Table, column: &str) -> Result<(), SyncError> {
    let q = quote_ident(column);
    let on = t.pk.iter().map(|c| format!("x.{q} = (v.r).{q}", q = quote_ident(c))).collect::<Vec<_>>().join(" AND ");
    let sql = format!(
        "UPDATE {tbl} x SET {q} = (v.r).{q} \
           FROM (SELECT DISTINCT ON (e.pk) jsonb_populate_record(NULL::{tbl}, e.data) AS r \
                   FROM {schema}.sync_events e \
                  WHERE e.table_name = $1 AND e.data ? $2 \
                  ORDER BY e.pk, e.hlc DESC, e.origin DESC, e.origin_seq DESC, e.origin_idx DESC) v \
          WHERE {on} AND x.{q} IS DISTINCT FROM (v.r).{q}",
        tbl = t.name
    );
    let _guard = Applying::start();
    Spi::run_with_args(&sql, &[t.name.clone().into(), column.into()])?;
    Ok(())
}

fn set_missing(schema: &str, t: &Table, columns: &[String]) -> Result<(), SyncError> {
    Spi::run_with_args(
        &format!("UPDATE {schema}.sync_tables SET missing_columns = $2 WHERE relid = $1::oid::regclass"),
        &[t.relid.into(), columns.to_vec().into()],
    )?;
    Ok(())
}
