//! Replicated DDL: `sync_ddl(command)` runs a statement here and records it as a change in this
//! node's stream, so that every node runs it in causal order with the data around it (an
//! `ALTER TABLE ... ADD COLUMN`, then rows that use the column, whatever the delivery order or
//! relays).
//!
//! On the wire a DDL is an INSERT event of the reserved table name `pg_peersync.ddl` (no such
//! table exists) whose row is `{"id": uuid, "command": text, "search_path": text}`: an ordinary
//! event, numbered, checksummed, stored and relayed like the others. Applying it runs the
//! command with the origin's `search_path`; a command that fails holds its transaction with the
//! reason, like any change that cannot be applied. Every node records the commands it ran in
//! `sync_ddl_history`.

use crate::capture::sql::Part;
use crate::capture::xact;
use crate::clock;
use crate::error::{SyncError, SyncResult};
use pgrx::prelude::*;
use serde_json::{Value, json};
use sync_bridge::Event;
use uuid::Uuid;

/// The table name DDL events carry.
pub const DDL_TABLE: &str = "pg_peersync.ddl";

/// Run `command` (one or more SQL statements) here and on every node, in this transaction's
/// place in this node's stream. Superusers only: peers run it with their apply role.
#[pg_extern]
fn sync_ddl(command: &str) -> SyncResult<()> {
    if !unsafe { pg_sys::superuser() } {
        return Err(SyncError::DdlNotAllowed.into());
    }
    let ext = clock::ext();
    let search_path =
        Spi::get_one::<String>("SELECT current_setting('search_path')").map_err(SyncError::from)?.unwrap_or_default();
    let row = json!({"id": Uuid::new_v4(), "command": command, "search_path": search_path});
    // Recorded first: changes the command itself makes to tracked tables come after it.
    xact::add_parts(&ext, DDL_TABLE, "[\"id\"]", vec![Part { op: "INSERT", n: 1, rows: format!("[{row}]") }])?;
    run(&ext.schema, ext.node_id, &row)?;
    Ok(())
}

pub fn is_ddl(e: &Event) -> bool {
    e.table == DDL_TABLE
}

/// Run a received DDL event here.
pub fn apply(schema: &str, e: &Event) -> Result<(), SyncError> {
    let row = e.data.as_ref().ok_or_else(|| SyncError::BadBatch(format!("DDL event {} has no row", e.seq)))?;
    run(schema, e.origin, row)
}

/// Run the command of a DDL row with its search_path, and record it.
fn run(schema: &str, origin: Uuid, row: &Value) -> Result<(), SyncError> {
    let field = |k: &str| row.get(k).and_then(Value::as_str).map(str::to_owned);
    let (Some(id), Some(command), Some(search_path)) = (field("id"), field("command"), field("search_path")) else {
        return Err(SyncError::BadBatch(format!("malformed DDL event: {row}")));
    };
    let before = Spi::get_one::<String>("SELECT current_setting('search_path')")?.unwrap_or_default();
    Spi::run_with_args("SELECT set_config('search_path', $1, true)", &[search_path.clone().into()])?;
    Spi::run(&command)?;
    Spi::run_with_args("SELECT set_config('search_path', $1, true)", &[before.into()])?;
    Spi::run_with_args(
        &format!(
            "INSERT INTO {schema}.sync_ddl_history (id, origin, command, search_path) \
             VALUES ($1::uuid, $2, $3, $4) ON CONFLICT (id) DO NOTHING"
        ),
        &[id.into(), pgrx::Uuid::from_bytes(*origin.as_bytes()).into(), command.into(), search_path.into()],
    )?;
    Ok(())
}
