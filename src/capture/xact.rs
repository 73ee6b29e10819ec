//! The current transaction's capture: its number, the changes captured so far (held in memory
//! until commit), and the transaction callbacks that write them as one `sync_log` row just
//! before commit, drop the ones of rolled-back subtransactions, and release the number.
//!
//! Writing once per transaction instead of once per statement is what keeps capture cheap for
//! short OLTP transactions. The cost is memory: a transaction's row images stay in this
//! backend until it commits.

use super::plan::CapturePlan;
use super::sql::Part;
use crate::clock;
use crate::error::SyncError;
use crate::sequencer;
use pgrx::prelude::*;
use std::cell::RefCell;
use std::collections::BTreeMap;

/// One part of the transaction: changes of one kind from one statement on one table.
struct Pending {
    subxact: pg_sys::SubTransactionId,
    hlc: i64,
    table: String,
    op: &'static str,
    /// Primary-key column names as a JSON array.
    pk: String,
    first_idx: i32,
    n: i32,
    rows: String,
}

struct XactCapture {
    xid: pg_sys::TransactionId,
    schema: String,
    origin: uuid::Uuid,
    /// Taken when the changes are first written to the log (just before commit, as a rule):
    /// a transaction numbered earlier than another never wrote after the other committed, so
    /// one origin's changes to a row are numbered in the order they were made.
    seq: Option<i64>,
    next_idx: i32,
    pending: Vec<Pending>,
    /// Origin transactions this one has seen beyond what `sync_origins` said when it was last
    /// read: the received ones a resolution change (`add_resolution`) answers, applied in this
    /// same transaction.
    seen: BTreeMap<uuid::Uuid, i64>,
}

thread_local! {
    static XACT: RefCell<Option<XactCapture>> = const { RefCell::new(None) };
    static FLUSH_PLAN: RefCell<Option<(String, CapturePlan)>> = const { RefCell::new(None) };
    static REMOTE_HAVE: RefCell<Option<RemoteHave>> = const { RefCell::new(None) };
}

/// `sync_origins` as last read: (node, generation, origin -> upto).
type RemoteHave = (uuid::Uuid, u64, BTreeMap<String, i64>);

/// Register the transaction callbacks, once per backend (from `_PG_init`).
pub fn init_callbacks() {
    unsafe {
        pg_sys::RegisterXactCallback(Some(on_xact), std::ptr::null_mut());
        pg_sys::RegisterSubXactCallback(Some(on_subxact), std::ptr::null_mut());
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_xact(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    use pg_sys::XactEvent::*;
    match event {
        // Last moment to write: an error here still aborts the transaction cleanly.
        XACT_EVENT_PRE_COMMIT => flush(),
        XACT_EVENT_PRE_PREPARE if XACT.with(|x| x.borrow().is_some()) => SyncError::TwoPhase.report(),
        // After the outcome is visible: forget the buffer and release the number.
        // (A transaction whose changes all rolled back with their savepoints took no number.)
        XACT_EVENT_COMMIT | XACT_EVENT_ABORT
            if XACT.with(|x| x.borrow_mut().take()).is_some_and(|x| x.seq.is_some()) =>
        {
            sequencer::end_local_xact(event == XACT_EVENT_COMMIT);
        }
        _ => {}
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_subxact(
    event: pg_sys::SubXactEvent::Type,
    my_subid: pg_sys::SubTransactionId,
    _parent: pg_sys::SubTransactionId,
    _arg: *mut std::ffi::c_void,
) {
    if event == pg_sys::SubXactEvent::SUBXACT_EVENT_ABORT_SUB {
        // Subtransactions started after this one are its children: their changes go too.
        XACT.with(|x| {
            if let Some(x) = x.borrow_mut().as_mut() {
                x.pending.retain(|p| p.subxact < my_subid);
            }
        });
    }
}

/// Start capturing the current transaction on its first captured change; later calls reuse it.
fn ensure_started(ext: &clock::Ext) -> Result<(), SyncError> {
    let xid = unsafe { pg_sys::GetTopTransactionId() };
    if XACT.with(|x| x.borrow().as_ref().is_some_and(|s| s.xid == xid)) {
        return Ok(());
    }
    if let Some(why) = &ext.doubt {
        // Numbered under an identity another node may use, the change could be lost.
        return Err(SyncError::IdentityInDoubt(why.clone()));
    }
    if let Some(peer) = &ext.joining {
        // The copy under way would overwrite it.
        return Err(SyncError::Joining(peer.clone()));
    }
    XACT.with(|x| {
        *x.borrow_mut() = Some(XactCapture {
            xid,
            schema: ext.schema.clone(),
            origin: ext.node_id,
            seq: None,
            next_idx: 1,
            pending: Vec::new(),
            seen: BTreeMap::new(),
        })
    });
    Ok(())
}

/// Add one statement's parts to the transaction; returns how many changes they hold.
/// `pk` is the primary-key column names as a JSON array.
pub fn add_parts(ext: &clock::Ext, table: &str, pk: &str, parts: Vec<Part>) -> Result<i32, SyncError> {
    if parts.iter().all(|p| p.n == 0) {
        return Ok(0); // e.g. an UPDATE that matched no row: no number, no clock tick
    }
    ensure_started(ext)?;
    Ok(push(table, pk, parts, clock::tick().as_i64()).1)
}

/// Where a change recorded by `add_resolution` is: this transaction's number, the change's
/// index, its clock.
pub struct Recorded {
    pub seq: i64,
    pub idx: i32,
    pub hlc: i64,
}

/// Record a change the apply made to settle a constraint race (`apply::constraints`), as this
/// node's own: it is numbered, logged and relayed like a captured one, and its causal context
/// also counts `seen` (the received transactions it answers, applied in this transaction), so
/// on every node it supersedes the versions it settled.
pub fn add_resolution(
    ext: &clock::Ext,
    table: &str,
    pk: &str,
    part: Part,
    seen: &[(uuid::Uuid, i64)],
) -> Result<Recorded, SyncError> {
    ensure_started(ext)?;
    let hlc = clock::tick().as_i64();
    let (idx, _) = push(table, pk, vec![part], hlc);
    XACT.with(|x| {
        let mut x = x.borrow_mut();
        let x = x.as_mut().expect("started above");
        for (o, n) in seen {
            let e = x.seen.entry(*o).or_insert(0);
            *e = (*e).max(*n);
        }
        Ok(Recorded { seq: number(x)?, idx, hlc })
    })
}

/// The transaction's number, taken now if it has none yet (and held until it ends).
fn number(x: &mut XactCapture) -> Result<i64, SyncError> {
    if let Some(seq) = x.seq {
        return Ok(seq);
    }
    let seq = sequencer::begin_local_xact(&x.schema, x.origin)?;
    x.seq = Some(seq);
    Ok(seq)
}

/// Queue parts on the started transaction; returns the first change's index and the count.
fn push(table: &str, pk: &str, parts: Vec<Part>, hlc: i64) -> (i32, i32) {
    let subxact = unsafe { pg_sys::GetCurrentSubTransactionId() };
    XACT.with(|x| {
        let mut x = x.borrow_mut();
        let x = x.as_mut().expect("started by the caller");
        let first = x.next_idx;
        let mut total = 0;
        for part in parts.into_iter().filter(|p| p.n > 0) {
            x.pending.push(Pending {
                subxact,
                hlc,
                table: table.to_string(),
                op: part.op,
                pk: pk.to_string(),
                first_idx: x.next_idx,
                n: part.n,
                rows: part.rows,
            });
            x.next_idx += part.n;
            total += part.n;
        }
        (first, total)
    })
}

/// The remote part of the causal context: what this node holds of every other origin. Read
/// again only when `sync_origins` changed (its generation moved), not once per transaction.
/// A value read a little early only under-claims what was seen, which is safe.
///
/// It is taken when the transaction writes its log row, just before commit: later than any of
/// its row writes, so a later local write never claims less than an earlier one (which keeps
/// "has seen" transitive), and never more than the rows it wrote had seen (a remote change
/// to one of those rows cannot be applied while this transaction holds the row lock).
fn remote_context(schema: &str, node: uuid::Uuid) -> Result<BTreeMap<String, i64>, SyncError> {
    let generation = sequencer::remote_have_generation();
    if let Some(ctx) = REMOTE_HAVE
        .with(|r| r.borrow().as_ref().filter(|(n, g, _)| *n == node && *g == generation).map(|(_, _, c)| c.clone()))
    {
        return Ok(ctx);
    }
    let mut ctx = BTreeMap::new();
    Spi::connect(|client| {
        let rows = client.select(&format!("SELECT origin::text, upto FROM {schema}.sync_origins"), None, &[])?;
        for row in rows {
            if let (Some(o), Some(n)) = (row.get::<String>(1)?, row.get::<i64>(2)?) {
                ctx.insert(o, n);
            }
        }
        Ok::<_, SyncError>(())
    })?;
    REMOTE_HAVE.with(|r| *r.borrow_mut() = Some((node, generation, ctx.clone())));
    Ok(ctx)
}

fn datum<T: IntoDatum>(v: T) -> pg_sys::Datum {
    v.into_datum().expect("non-null argument")
}

/// Write the transaction's pending changes as one `sync_log` row (nothing if there are none).
/// Runs just before commit, and from `sync_flush()` so that a transaction can see its own
/// changes in `sync_events`; later changes then go into another row of the same transaction.
pub fn flush() {
    let Some((schema, origin)) =
        XACT.with(|x| x.borrow().as_ref().filter(|x| !x.pending.is_empty()).map(|x| (x.schema.clone(), x.origin)))
    else {
        return;
    };
    // At commit time the statement's portal and snapshot are gone; SPI needs one.
    let pushed = unsafe {
        if pg_sys::ActiveSnapshotSet() {
            false
        } else {
            pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
            true
        }
    };
    let seq = XACT.with(|x| number(x.borrow_mut().as_mut().expect("checked above"))).unwrap_or_else(|e| e.report());
    let mut ctx = remote_context(&schema, origin).unwrap_or_else(|e| e.report());
    for (o, n) in XACT.with(|x| x.borrow().as_ref().map(|x| x.seen.clone()).unwrap_or_default()) {
        let e = ctx.entry(o.to_string()).or_insert(0);
        *e = (*e).max(n);
    }
    ctx.insert(origin.to_string(), seq);
    let vclock = serde_json::to_value(ctx).expect("a map of numbers serialises");
    let pending = XACT.with(|x| std::mem::take(&mut x.borrow_mut().as_mut().expect("checked above").pending));
    let n: i32 = pending.iter().map(|p| p.n).sum();
    let hlc = pending.iter().map(|p| p.hlc).max().unwrap_or(0);
    let mut args = vec![
        datum(pgrx::Uuid::from_bytes(*origin.as_bytes())),
        datum(seq),
        datum(pending[0].first_idx as i64),
        datum(unsafe { pg_sys::GetTopFullTransactionId().value } as i64),
        datum(n),
        datum(pgrx::JsonB(vclock)),
        datum(hlc),
        datum(pending.iter().map(|p| p.hlc).collect::<Vec<i64>>()),
        datum(pending.iter().map(|p| p.table.clone()).collect::<Vec<String>>()),
        datum(pending.iter().map(|p| p.op.to_string()).collect::<Vec<String>>()),
        datum(pending.iter().map(|p| p.pk.clone()).collect::<Vec<String>>()),
        datum(pending.iter().map(|p| p.first_idx).collect::<Vec<i32>>()),
        datum(pending.iter().map(|p| p.n).collect::<Vec<i32>>()),
        datum(pending.into_iter().map(|p| p.rows).collect::<Vec<String>>()),
    ];
    Spi::connect(|_client| {
        FLUSH_PLAN.with(|f| {
            let mut f = f.borrow_mut();
            if f.as_ref().is_none_or(|(s, _)| *s != schema) {
                *f = Some((
                    schema.clone(),
                    CapturePlan::prepare(&crate::log::insert_statement(&schema, false), &crate::log::INSERT_TYPES),
                ));
            }
            f.as_ref().expect("prepared above").1.execute(&mut args);
        })
    });
    if pushed {
        unsafe { pg_sys::PopActiveSnapshot() };
    }
}

/// Write the current transaction's captured changes now, so that it can read them in
/// `sync_events` before it commits (they are written at commit anyway).
#[pg_extern]
fn sync_flush() -> Result<(), pgrx::pg_sys::panic::ErrorReport> {
    // A row written inside a subtransaction would vanish with it, taking the outer
    // transaction's changes along.
    if unsafe { pg_sys::GetCurrentTransactionNestLevel() } > 1 {
        return Err(SyncError::FlushInSubtransaction.into());
    }
    flush();
    Ok(())
}
