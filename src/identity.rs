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
use uuid::Uuid;

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
        &format!("UPDATE {}.sync_node SET id = $1, identity_doubt = NULL, indexed_upto = 0", ext.schema),
        &[pgrx::Uuid::from_bytes(*new.as_bytes()).into()],
    )
    .map_err(SyncError::from)?;
    clock::identity_changed();
    sequencer::forget_numbering();
    Ok(JsonB(json!({"old": old, "new": new, "old_held_up_to": upto})))
}

/// On the original node, once its copy has a new identity or is stopped: clear the doubt, so
/// that capture goes on under this identity.
#[pg_extern]
fn sync_keep_identity() -> SyncResult<()> {
    if !unsafe { pg_sys::superuser() } {
        return Err(SyncError::IdentityNotAllowed.into());
    }
    let s = clock::ext().schema;
    Spi::run(&format!("UPDATE {s}.sync_node SET identity_doubt = NULL")).map_err(SyncError::from)?;
    clock::identity_changed();
    Ok(())
}
