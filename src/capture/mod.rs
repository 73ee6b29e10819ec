//! Change capture: the statement-level trigger that appends every change of a tracked table to
//! `sync_events` in the same transaction, and the per-transaction numbering it relies on.

pub mod sql;
mod track;

use crate::clock;
use crate::error::SyncError;
use crate::sequencer;
use pgrx::callbacks::{PgXactCallbackEvent, register_xact_callback};
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::spi::OwnedPreparedStatement;
use pgrx::{PgBuiltInOids, PgOid};
use sql::Source;
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};

pub use track::table_spec;

/// The current transaction's capture state: its number and the next event index.
struct XactCapture {
    xid: pg_sys::TransactionId,
    seq: i64,
    last_idx: i32,
    vclock: pgrx::JsonB,
}

/// Prepared capture statements, per (table, source, trigger arguments).
type PlanKey = (pg_sys::Oid, Source);

thread_local! {
    static XACT: RefCell<Option<XactCapture>> = const { RefCell::new(None) };
    static PLANS: RefCell<HashMap<PlanKey, (Vec<String>, OwnedPreparedStatement)>> = RefCell::new(HashMap::new());
    static STALE: RefCell<Vec<pg_sys::Oid>> = const { RefCell::new(Vec::new()) };
}

/// Register the relcache callback that forgets cached plans and identity when a table changes
/// (ALTER TABLE, a new primary key, DROP EXTENSION).
pub fn init_backend_hooks() {
    #[pg_guard]
    unsafe extern "C-unwind" fn on_relcache(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
        // Only note it here: freeing plans inside an invalidation callback is not safe.
        STALE.with(|s| s.borrow_mut().push(relid));
        clock::invalidate(relid);
    }
    unsafe { pg_sys::CacheRegisterRelcacheCallback(Some(on_relcache), pg_sys::Datum::from(0)) };
}

fn drop_stale_plans() {
    let stale: Vec<pg_sys::Oid> = STALE.with(|s| std::mem::take(&mut *s.borrow_mut()));
    if stale.is_empty() {
        return;
    }
    PLANS.with(|p| {
        let mut p = p.borrow_mut();
        if stale.contains(&pg_sys::InvalidOid) {
            p.clear();
        } else {
            p.retain(|(rel, _), _| !stale.contains(rel));
        }
    });
}

/// Number the current transaction on its first captured change; later calls reuse it.
fn xact_state(ext: &clock::Ext) -> Result<(i64, i32, pgrx::JsonB), SyncError> {
    let xid = unsafe { pg_sys::GetTopTransactionId() };
    if let Some(s) = XACT.with(|x| x.borrow().as_ref().filter(|s| s.xid == xid).map(|s| (s.seq, s.last_idx, s.vclock.0.clone()))) {
        return Ok((s.0, s.1, pgrx::JsonB(s.2)));
    }
    let seq = sequencer::begin_local_xact(&ext.schema, ext.node_id)?;
    register_xact_callback(PgXactCallbackEvent::Commit, end_xact);
    register_xact_callback(PgXactCallbackEvent::Abort, end_xact);
    register_xact_callback(PgXactCallbackEvent::PrePrepare, || SyncError::TwoPhase.report());
    let vclock = causal_context(ext, seq)?;
    XACT.with(|x| {
        *x.borrow_mut() = Some(XactCapture { xid, seq, last_idx: 0, vclock: pgrx::JsonB(vclock.clone()) })
    });
    Ok((seq, 0, pgrx::JsonB(vclock)))
}

fn end_xact() {
    XACT.with(|x| x.borrow_mut().take());
    sequencer::end_local_xact();
}

/// The causal context of this transaction's events: what this node had of every other origin
/// when it wrote, plus its own number. A remote version is "seen" by an event when its
/// `(origin, seq)` is covered here.
fn causal_context(ext: &clock::Ext, seq: i64) -> Result<serde_json::Value, SyncError> {
    let mut ctx: BTreeMap<String, i64> = BTreeMap::new();
    Spi::connect(|client| {
        let rows = client.select(&format!("SELECT origin::text, upto FROM {}.sync_origins", ext.schema), None, &[])?;
        for row in rows {
            if let (Some(o), Some(n)) = (row.get::<String>(1)?, row.get::<i64>(2)?) {
                ctx.insert(o, n);
            }
        }
        Ok::<_, SyncError>(())
    })?;
    ctx.insert(ext.node_id.to_string(), seq);
    Ok(serde_json::to_value(ctx).expect("a map of numbers serialises"))
}

fn source_of(op: PgTriggerOperation) -> Option<Source> {
    match op {
        PgTriggerOperation::Insert => Some(Source::Inserted),
        PgTriggerOperation::Update => Some(Source::Updated),
        PgTriggerOperation::Delete => Some(Source::Deleted),
        PgTriggerOperation::Truncate => None,
    }
}

/// Append the changes of `source` rows to `sync_events`; returns how many events were written.
/// `trigger_data` must be set when `source` reads transition tables.
pub(crate) fn capture(
    relid: pg_sys::Oid,
    source: Source,
    args: &[String],
    trigger_data: Option<*mut pg_sys::TriggerData>,
) -> Result<i32, SyncError> {
    drop_stale_plans();
    let ext = clock::ext();
    let (seq, last_idx, vclock) = xact_state(&ext)?;
    let hlc = clock::tick();
    let xact = unsafe { pg_sys::GetTopFullTransactionId().value } as i64;
    let key = (relid, source);
    let written = Spi::connect_mut(|client| {
        if let Some(td) = trigger_data {
            // Makes the transition tables visible by name to the statements below.
            unsafe { pg_sys::SPI_register_trigger_data(td) };
        }
        let cached = PLANS.with(|p| p.borrow().get(&key).is_some_and(|(a, _)| a == args));
        if !cached {
            let spec = table_spec(relid, args)?;
            let text = sql::capture_statement(&ext.schema, &spec, source);
            let types = [
                PgOid::BuiltIn(PgBuiltInOids::UUIDOID),
                PgOid::BuiltIn(PgBuiltInOids::INT8OID),
                PgOid::BuiltIn(PgBuiltInOids::INT4OID),
                PgOid::BuiltIn(PgBuiltInOids::INT8OID),
                PgOid::BuiltIn(PgBuiltInOids::INT8OID),
                PgOid::BuiltIn(PgBuiltInOids::JSONBOID),
            ];
            let stmt = client.prepare_mut(text.as_str(), &types)?.keep();
            PLANS.with(|p| p.borrow_mut().insert(key, (args.to_vec(), stmt)));
        }
        let origin = pgrx::Uuid::from_bytes(*ext.node_id.as_bytes());
        PLANS.with(|p| {
            let p = p.borrow();
            let (_, stmt) = p.get(&key).expect("plan cached above");
            let result = client.update(
                stmt,
                None,
                &[origin.into(), seq.into(), last_idx.into(), xact.into(), hlc.as_i64().into(), vclock.into()],
            )?;
            Ok::<_, SyncError>(result.len() as i32)
        })
    })?;
    XACT.with(|x| {
        if let Some(s) = x.borrow_mut().as_mut() {
            s.last_idx += written;
        }
    });
    Ok(written)
}

/// The capture trigger: AFTER INSERT / UPDATE / DELETE ... FOR EACH STATEMENT, with transition
/// tables. Arguments: the row filter ('' for none) and the excluded columns (a text[] literal).
#[pg_trigger]
fn _sync_capture<'a>(
    trigger: &'a PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, ErrorReport> {
    // Errors are raised here: a trigger's Err would reach the user as a generic panic message.
    let op = trigger.op().unwrap_or_else(|e| internal(e.to_string()));
    let Some(source) = source_of(op) else { return Ok(None) };
    let relid = trigger.relid().unwrap_or_else(|e| internal(e.to_string()));
    let args = trigger.extra_args().unwrap_or_else(|e| internal(e.to_string()));
    let td = trigger.trigger_data() as *const pg_sys::TriggerData as *mut pg_sys::TriggerData;
    if let Err(e) = capture(relid, source, &args, Some(td)) {
        e.report();
    }
    Ok(None)
}

/// BEFORE TRUNCATE on tracked tables: refuse, so that a truncation is never silently lost.
#[pg_trigger]
fn _sync_refuse_truncate<'a>(
    trigger: &'a PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, ErrorReport> {
    let name = format!(
        "{}.{}",
        trigger.table_schema().unwrap_or_default(),
        trigger.table_name().unwrap_or_default()
    );
    SyncError::Truncate(name).report()
}

fn internal(msg: String) -> ! {
    ErrorReport::new(PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, msg, "pg_peersync").report(PgLogLevel::ERROR);
    unreachable!("ERROR does not return")
}

