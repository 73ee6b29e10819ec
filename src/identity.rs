//! This node's identity in the mesh, and what happens when another node turns out to use it
//! (a copy of this database, or a restore of an older backup of it; the worker finds out, see
//! `sync_bridge::discovery::Doubt`).
//!
//! While in doubt, capture refuses changes to tracked tables (`SyncError::IdentityInDoubt`):
//! numbered like another node's, they could be lost. `sync_new_identity()` ends it: the node
//! takes a new id, and what it captured under the old one becomes another origin's history,
//! held up to where this node has it. A restored node then gets the rest of that history, the
//! transactions it made before the restore, back from its peers like any other origin's.
//! `sync_keep_identity()` ends it on the original, once its copy is dealt with.

use crate::clock;
use crate::error::{SyncError, SyncResult};
use crate::sequencer;
use pgrx::JsonB;
use pgrx::prelude::*;
use serde_json::json;
use std::ffi::CStr;
use uuid::Uuid;

/// Where this database runs: host, data directory, database oid and WAL timeline. A base
/// backup or a copied data directory keeps the system identifier and the identity, not the
/// first three; a restore to a point in time, or a standby promoted, starts a new timeline (and
/// may lack transactions its peers hold). Only for a server not in recovery.
pub fn here() -> String {
    let host = crate::gucs::host_name();
    // SAFETY: DataDir is set once at postmaster start, before any backend runs.
    let dir = unsafe { CStr::from_ptr(pg_sys::DataDir) }.to_string_lossy().into_owned();
    let db = unsafe { pg_sys::MyDatabaseId }.to_u32();
    // SAFETY: called only when recovery is over (see `clock::ext`), when the timeline is fixed.
    let timeline = unsafe { pg_sys::GetWALInsertionTimeLine() };
    format!("{host}:{dir} (database {db}, timeline {timeline})")
}

/// Why this node's identity is in doubt because the database runs elsewhere than where the
/// identity was recorded (`recorded`; none yet: not in doubt).
pub fn moved(recorded: Option<&str>, here: &str) -> Option<String> {
    let was = recorded.filter(|r| *r != here)?;
    Some(format!(
        "this database runs at {here}, but its identity was recorded at {was}: it is a copy (a base backup, \
         a copied data directory), it moved, or it was restored to a point in time or promoted from a standby \
         (a new timeline)"
    ))
}

/// The worker, when it finds the extension: record where this identity lives the first time,
/// and a doubt when the database runs elsewhere (returned, to warn once).
pub fn check_place() -> Result<Option<String>, SyncError> {
    let s = clock::ext().schema;
    let recorded = Spi::get_one::<String>(&format!("SELECT (SELECT place FROM {s}.sync_node)"))?;
    let here = here();
    match moved(recorded.as_deref(), &here) {
        None if recorded.is_none() => {
            Spi::run_with_args(&format!("UPDATE {s}.sync_node SET place = $1"), &[here.into()])?;
            Ok(None)
        }
        None => Ok(None),
        Some(why) => {
            record_doubt(&why)?;
            Ok(Some(why))
        }
    }
}

/// Record that another node seems to use this identity (the worker, in a transaction). The
/// first reason is kept.
pub fn record_doubt(reason: &str) -> Result<(), SyncError> {
    let s = clock::ext().schema;
    Spi::run_with_args(
        &format!("UPDATE {s}.sync_node SET identity_doubt = $1 WHERE identity_doubt IS NULL"),
        &[reason.into()],
    )?;
    clock::identity_changed();
    Ok(())
}

/// Give this node a new identity. Run it on a copy of a node's database, or on a node restored
/// from a backup, while nothing writes the tracked tables; returns the old and new ids.
#[pg_extern]
fn sync_new_identity() -> SyncResult<JsonB> {
    if !unsafe { pg_sys::superuser() } {
        return Err(SyncError::IdentityNotAllowed.into());
    }
    sequencer::require_read_committed("sync_new_identity()")?;
    let ext = clock::ext();
    let old = ext.node_id;
    let upto = sequencer::committed_prefix(&ext.schema, old)?;
    crate::apply::retire_identity(old, upto)?;
    let new = Uuid::new_v4();
    Spi::run_with_args(
        &format!("UPDATE {}.sync_node SET id = $1, identity_doubt = NULL, indexed_upto = 0, place = $2", ext.schema),
        &[pgrx::Uuid::from_bytes(*new.as_bytes()).into(), here().into()],
    )
    .map_err(SyncError::from)?;
    clock::identity_changed();
    sequencer::forget_numbering();
    Ok(JsonB(json!({"old": old, "new": new, "old_held_up_to": upto})))
}

/// On the original node, once its copy has a new identity or is stopped, or on a database that
/// moved (another host, data directory or database, the old one no longer running): clear the
/// doubt and record where the identity lives now, so that capture goes on under it.
#[pg_extern]
fn sync_keep_identity() -> SyncResult<()> {
    if !unsafe { pg_sys::superuser() } {
        return Err(SyncError::IdentityNotAllowed.into());
    }
    let s = clock::ext().schema;
    Spi::run_with_args(&format!("UPDATE {s}.sync_node SET identity_doubt = NULL, place = $1"), &[here().into()])
        .map_err(SyncError::from)?;
    clock::identity_changed();
    Ok(())
}
