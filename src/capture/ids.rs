//! Node-unique ids for primary keys fed by a sequence (serial, identity, `DEFAULT nextval(...)`).
//!
//! Every node's copy of a sequence hands out the same numbers: two nodes inserting at once give
//! two different rows one key. `sync_global_ids(tbl)` makes each such key sequence step by
//! `SLOTS` from a value equal to this node's `peersync.node_number` modulo `SLOTS`, above every
//! value the column holds: ids made on different nodes can never be equal, and the column's
//! default (or identity) stays as it was. An `int4` key keeps about 2^31 / 1024 = 2 million ids
//! per node; past that, `nextval` fails and the column needs `ALTER ... TYPE bigint`.

use crate::error::{SyncError, SyncResult};
use crate::gucs;
use pgrx::prelude::*;
use pgrx::{JsonB, PgRelation};
use serde_json::{Map, Value, json};

pub use sync_bridge::ids::{SLOTS, first_id};

/// SQL for the sequence feeding column `attname` of table `relid` (text, or NULL): an owned one
/// (serial, identity) or the one its default calls `nextval` on.
pub fn sequence_of(relid: &str, attname: &str) -> String {
    format!(
        "coalesce(pg_get_serial_sequence({relid}::regclass::text, {attname}), \
           (SELECT d.refobjid::regclass::text FROM pg_attrdef ad \
              JOIN pg_depend d ON d.classid = 'pg_attrdef'::regclass AND d.objid = ad.oid \
                              AND d.refclassid = 'pg_class'::regclass \
              JOIN pg_class c ON c.oid = d.refobjid AND c.relkind = 'S' \
             WHERE ad.adrelid = {relid} AND ad.adnum = (SELECT attnum FROM pg_attribute \
                                                         WHERE attrelid = {relid} AND attname = {attname}) \
             LIMIT 1))"
    )
}

/// A primary-key column fed by a sequence.
struct KeySequence {
    column: String,
    sequence: String,
    increment: i64,
}

fn key_sequences(relid: pg_sys::Oid) -> Result<Vec<KeySequence>, SyncError> {
    let sql = format!(
        "SELECT a.attname::text, q.seq, s.seqincrement \
           FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey), \
                LATERAL (SELECT {} AS seq) q JOIN pg_sequence s ON s.seqrelid = q.seq::regclass \
          WHERE i.indrelid = $1 AND i.indisprimary ORDER BY a.attnum",
        sequence_of("$1", "a.attname")
    );
    Spi::connect(|client| {
        let mut out = Vec::new();
        for row in client.select(&sql, None, &[relid.into()])? {
            out.push(KeySequence {
                column: row.get(1)?.unwrap_or_default(),
                sequence: row.get(2)?.unwrap_or_default(),
                increment: row.get(3)?.unwrap_or(1),
            });
        }
        Ok(out)
    })
}

/// After `sync_track_table`: a WARNING, with the choices, for each key column whose sequence
/// hands out the same ids on every node.
pub fn warn_if_shared(relid: pg_sys::Oid, table: &str) -> Result<(), SyncError> {
    for k in key_sequences(relid)?.into_iter().filter(|k| k.increment == 1) {
        pgrx::pg_sys::panic::ErrorReport::new(
            PgSqlErrorCode::ERRCODE_WARNING,
            format!(
                "primary key column \"{}\" of {table} is filled by sequence {}, which hands out the same \
                 ids on every node",
                k.column, k.sequence
            ),
            "pg_peersync",
        )
        .set_detail("Rows inserted on two nodes at once would get one key: two entities under one id.")
        .set_hint(format!(
            "Set a different peersync.node_number on each node and run SELECT sync_global_ids('{table}') on \
             each, or use uuid keys (DEFAULT gen_random_uuid())."
        ))
        .report(PgLogLevel::WARNING);
    }
    Ok(())
}

/// Make the sequences feeding `tbl`'s primary key hand out node-unique ids: step `SLOTS`, from
/// the first value above the column's greatest (and the sequence's last) that ends in this
/// node's number. Run it on every node. Returns, per column, the sequence and its next id.
#[pg_extern]
fn sync_global_ids(tbl: PgRelation) -> SyncResult<JsonB> {
    Ok(global_ids(tbl.oid())?)
}

fn global_ids(relid: pg_sys::Oid) -> Result<JsonB, SyncError> {
    let node = gucs::node_number().ok_or(SyncError::NoNodeNumber)?;
    let name = super::track::display_name(relid)?;
    let keys = key_sequences(relid)?;
    if keys.is_empty() {
        return Err(SyncError::NoKeySequence(name));
    }
    // Inserts wait, so no id is handed out between reading the greatest and restarting.
    Spi::run(&format!("LOCK TABLE {name} IN SHARE ROW EXCLUSIVE MODE"))?;
    let mut out = Map::new();
    for k in keys {
        let column = spi::quote_identifier(&k.column);
        let floor = Spi::get_one_with_args::<i64>(
            &format!(
                "SELECT greatest((SELECT max({column})::bigint FROM {name}), \
                                 pg_sequence_last_value($1::regclass), 0)"
            ),
            &[k.sequence.clone().into()],
        )?
        .unwrap_or(0);
        let next = first_id(floor, node);
        Spi::run(&format!("ALTER SEQUENCE {} INCREMENT BY {SLOTS} RESTART WITH {next}", k.sequence))?;
        out.insert(k.column, json!({"sequence": k.sequence, "next": next}));
    }
    Ok(JsonB(Value::Object(out)))
}
