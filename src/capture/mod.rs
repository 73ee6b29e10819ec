//! Change capture: the statement-level trigger that appends every change of a tracked table to
//! `sync_events` in the same transaction, and the per-transaction numbering it relies on.

mod fast;
pub mod sql;
mod track;

use crate::clock;
use crate::error::SyncError;
use crate::sequencer;
use pgrx::callbacks::{PgXactCallbackEvent, register_xact_callback};
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::PgMemoryContexts;
use pgrx::prelude::*;
use sql::{Source, TableSpec};
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};

pub use track::table_spec;

/// The current transaction's capture state: its number and the next event index.
struct XactCapture {
    xid: pg_sys::TransactionId,
    seq: i64,
    last_idx: i32,
    /// The causal context (`jsonb`), allocated in the transaction's memory context.
    vclock: pg_sys::Datum,
}

/// A kept SPI plan. Prepared as a generic plan: its parameters never change the best plan,
/// and re-planning on every call would cost more than running it.
struct CapturePlan(pg_sys::SPIPlanPtr);

impl CapturePlan {
    /// Must run inside an SPI connection (with the trigger's transition tables registered
    /// when the statement reads them).
    fn prepare(text: &str, types: &[pg_sys::Oid]) -> CapturePlan {
        let c = std::ffi::CString::new(text).expect("generated SQL has no NUL");
        let mut types = types.to_vec();
        // SAFETY: inside an SPI connection; the arguments describe `types` exactly.
        let plan = unsafe {
            pg_sys::SPI_prepare_cursor(
                c.as_ptr(),
                types.len() as i32,
                types.as_mut_ptr(),
                pg_sys::CURSOR_OPT_GENERIC_PLAN as i32,
            )
        };
        if plan.is_null() {
            internal(format!("pg_peersync could not prepare a capture statement (SPI result {})", unsafe {
                pg_sys::SPI_result
            }));
        }
        // SAFETY: a valid, unsaved plan.
        unsafe { pg_sys::SPI_keepplan(plan) };
        CapturePlan(plan)
    }

    /// Run with non-null `args`; returns the sum of the int4 first column of the returned rows
    /// (the change counts), or 0 when the statement returns nothing.
    fn execute(&self, args: &mut [pg_sys::Datum]) -> i32 {
        let nulls = vec![b' ' as std::ffi::c_char; args.len()];
        // SAFETY: inside an SPI connection; the plan is kept and matches the arguments.
        unsafe {
            let rc = pg_sys::SPI_execute_plan(self.0, args.as_mut_ptr(), nulls.as_ptr(), false, 0);
            if rc < 0 {
                internal(format!("pg_peersync capture statement failed (SPI result {rc})"));
            }
            if rc != pg_sys::SPI_OK_INSERT_RETURNING as i32 || pg_sys::SPI_tuptable.is_null() {
                return 0;
            }
            let table = &*pg_sys::SPI_tuptable;
            let mut total = 0;
            for i in 0..pg_sys::SPI_processed as usize {
                let mut is_null = false;
                let n = pg_sys::SPI_getbinval(*table.vals.add(i), table.tupdesc, 1, &mut is_null);
                total += i32::from_datum(n, is_null).unwrap_or(0);
            }
            total
        }
    }
}

impl Drop for CapturePlan {
    fn drop(&mut self) {
        // SAFETY: the plan was kept by `prepare` and is freed once.
        unsafe { pg_sys::SPI_freeplan(self.0) };
    }
}

/// Per tracked table: its spec (and the trigger arguments it was built from), and the SQL
/// path's plans by source.
struct TableCache {
    args: Vec<String>,
    spec: TableSpec,
    plans: HashMap<Source, CapturePlan>,
}

thread_local! {
    static XACT: RefCell<Option<XactCapture>> = const { RefCell::new(None) };
    static TABLES: RefCell<HashMap<pg_sys::Oid, TableCache>> = RefCell::new(HashMap::new());
    /// The fast path's single `INSERT INTO sync_log VALUES (...)`, with the schema it targets.
    static LOG_INSERT: RefCell<Option<(String, CapturePlan)>> = const { RefCell::new(None) };
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
    TABLES.with(|t| {
        let mut t = t.borrow_mut();
        if stale.contains(&pg_sys::InvalidOid) {
            t.clear();
        } else {
            t.retain(|rel, _| !stale.contains(rel));
        }
    });
    if stale.contains(&pg_sys::InvalidOid) {
        LOG_INSERT.with(|l| l.borrow_mut().take());
    }
}

/// Number the current transaction on its first captured change; later calls reuse it.
/// Returns the number, the last change index used, and the causal context as a `jsonb` datum
/// built once per transaction in the transaction's memory context.
fn xact_state(ext: &clock::Ext) -> Result<(i64, i32, pg_sys::Datum), SyncError> {
    let xid = unsafe { pg_sys::GetTopTransactionId() };
    if let Some(s) = XACT.with(|x| x.borrow().as_ref().filter(|s| s.xid == xid).map(|s| (s.seq, s.last_idx, s.vclock))) {
        return Ok(s);
    }
    let seq = sequencer::begin_local_xact(&ext.schema, ext.node_id)?;
    register_xact_callback(PgXactCallbackEvent::Commit, end_xact);
    register_xact_callback(PgXactCallbackEvent::Abort, end_xact);
    register_xact_callback(PgXactCallbackEvent::PrePrepare, || SyncError::TwoPhase.report());
    let mut ctx = remote_context(ext)?;
    ctx.insert(ext.node_id.to_string(), seq);
    let value = serde_json::to_value(ctx).expect("a map of numbers serialises");
    let vclock = unsafe {
        PgMemoryContexts::TopTransactionContext.switch_to(|_| datum(pgrx::JsonB(value)))
    };
    XACT.with(|x| *x.borrow_mut() = Some(XactCapture { xid, seq, last_idx: 0, vclock }));
    Ok((seq, 0, vclock))
}

fn end_xact() {
    XACT.with(|x| x.borrow_mut().take());
    sequencer::end_local_xact();
}

thread_local! {
    /// `sync_origins` as last read: (node, generation, origin -> upto).
    static REMOTE_HAVE: RefCell<Option<(uuid::Uuid, u64, BTreeMap<String, i64>)>> = const { RefCell::new(None) };
}

/// The remote part of the causal context: what this node holds of every other origin. Read
/// again only when `sync_origins` changed (its generation moved), not once per transaction.
/// A value read a little early only under-claims what was seen, which is safe.
fn remote_context(ext: &clock::Ext) -> Result<BTreeMap<String, i64>, SyncError> {
    let generation = sequencer::remote_have_generation();
    if let Some(ctx) = REMOTE_HAVE.with(|r| {
        r.borrow().as_ref().filter(|(node, g, _)| *node == ext.node_id && *g == generation).map(|(_, _, c)| c.clone())
    }) {
        return Ok(ctx);
    }
    let mut ctx = BTreeMap::new();
    Spi::connect(|client| {
        let rows = client.select(&format!("SELECT origin::text, upto FROM {}.sync_origins", ext.schema), None, &[])?;
        for row in rows {
            if let (Some(o), Some(n)) = (row.get::<String>(1)?, row.get::<i64>(2)?) {
                ctx.insert(o, n);
            }
        }
        Ok::<_, SyncError>(())
    })?;
    REMOTE_HAVE.with(|r| *r.borrow_mut() = Some((ext.node_id, generation, ctx.clone())));
    Ok(ctx)
}

fn source_of(op: &PgTriggerOperation) -> Option<Source> {
    match op {
        PgTriggerOperation::Insert => Some(Source::Inserted),
        PgTriggerOperation::Update => Some(Source::Updated),
        PgTriggerOperation::Delete => Some(Source::Deleted),
        PgTriggerOperation::Truncate => None,
    }
}

const LOG_PARAMS: [pg_sys::Oid; 11] = [
    pg_sys::UUIDOID,
    pg_sys::INT8OID,
    pg_sys::INT4OID,
    pg_sys::INT4OID,
    pg_sys::INT8OID,
    pg_sys::INT8OID,
    pg_sys::TEXTOID,
    pg_sys::TEXTOID,
    pg_sys::TEXTARRAYOID,
    pg_sys::JSONBOID,
    pg_sys::JSONOID,
];

const SQL_PARAMS: [pg_sys::Oid; 6] =
    [pg_sys::UUIDOID, pg_sys::INT8OID, pg_sys::INT4OID, pg_sys::INT8OID, pg_sys::INT8OID, pg_sys::JSONBOID];

fn datum<T: IntoDatum>(v: T) -> pg_sys::Datum {
    v.into_datum().expect("non-null argument")
}

/// Append the changes of `source` rows to `sync_log`; returns how many changes were written.
/// `trigger_data` is set when called from the trigger (then `source` reads transition tables).
pub(crate) fn capture(
    relid: pg_sys::Oid,
    source: Source,
    op: PgTriggerOperation,
    args: &[String],
    trigger_data: Option<*mut pg_sys::TriggerData>,
) -> Result<i32, SyncError> {
    drop_stale_plans();
    let ext = clock::ext();
    let (seq, last_idx, vclock) = xact_state(&ext)?;
    let hlc = clock::tick().as_i64();
    let xact = unsafe { pg_sys::GetTopFullTransactionId().value } as i64;
    let origin = pgrx::Uuid::from_bytes(*ext.node_id.as_bytes());
    let written = Spi::connect(|_client| {
        if let Some(td) = trigger_data {
            // Makes the transition tables visible by name to the SQL path's statements.
            unsafe { pg_sys::SPI_register_trigger_data(td) };
        }
        let fresh = TABLES.with(|t| t.borrow().get(&relid).is_none_or(|c| c.args != args));
        if fresh {
            let spec = table_spec(relid, args)?;
            TABLES.with(|t| t.borrow_mut().insert(relid, TableCache { args: args.to_vec(), spec, plans: HashMap::new() }));
        }
        TABLES.with(|t| {
            let mut t = t.borrow_mut();
            let cache = t.get_mut(&relid).expect("cached above");
            let spec = &cache.spec;
            match trigger_data {
                Some(td) if spec.filter.is_none() && spec.exclude.is_empty() => {
                    // SAFETY: `td` is this statement trigger's data, with the transition tables
                    // its operation implies.
                    let parts = unsafe { fast::statement_parts(td, op, &spec.pk_attrs) };
                    let pk_columns = spec.pk.clone();
                    Ok(write_parts(&ext.schema, parts, |part, first_idx| {
                        vec![
                            datum(origin),
                            datum(seq),
                            datum(first_idx),
                            datum(part.n),
                            datum(xact),
                            datum(hlc),
                            datum(spec.qualified.as_str()),
                            datum(part.op),
                            datum(pk_columns.clone()),
                            vclock,
                            datum(part.rows.as_str()),
                        ]
                    }, last_idx))
                }
                _ => {
                    let plan = cache.plans.entry(source).or_insert_with(|| {
                        CapturePlan::prepare(&sql::capture_statement(&ext.schema, spec, source), &SQL_PARAMS)
                    });
                    let mut datums =
                        [datum(origin), datum(seq), datum(last_idx), datum(xact), datum(hlc), vclock];
                    Ok::<_, SyncError>(plan.execute(&mut datums))
                }
            }
        })
    })?;
    XACT.with(|x| {
        if let Some(s) = x.borrow_mut().as_mut() {
            s.last_idx += written;
        }
    });
    Ok(written)
}

/// Insert each non-empty part as one `sync_log` row, numbering changes after `last_idx`.
fn write_parts(
    schema: &str,
    parts: Vec<sql::Part>,
    args: impl Fn(&sql::Part, i32) -> Vec<pg_sys::Datum>,
    last_idx: i32,
) -> i32 {
    let mut next = last_idx + 1;
    LOG_INSERT.with(|l| {
        let mut l = l.borrow_mut();
        if l.as_ref().is_none_or(|(s, _)| s != schema) {
            *l = Some((schema.to_string(), CapturePlan::prepare(&sql::log_insert_statement(schema), &LOG_PARAMS)));
        }
        let (_, plan) = l.as_ref().expect("prepared above");
        for part in parts.iter().filter(|p| p.n > 0) {
            plan.execute(&mut args(part, next));
            next += part.n;
        }
    });
    next - (last_idx + 1)
}

/// The capture trigger: AFTER INSERT / UPDATE / DELETE ... FOR EACH STATEMENT, with transition
/// tables. Arguments: the row filter ('' for none) and the excluded columns (a text[] literal).
#[pg_trigger]
fn _sync_capture<'a>(
    trigger: &'a PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, ErrorReport> {
    // Errors are raised here: a trigger's Err would reach the user as a generic panic message.
    let op = trigger.op().unwrap_or_else(|e| internal(e.to_string()));
    let Some(source) = source_of(&op) else { return Ok(None) };
    let relid = trigger.relid().unwrap_or_else(|e| internal(e.to_string()));
    let args = trigger.extra_args().unwrap_or_else(|e| internal(e.to_string()));
    let td = trigger.trigger_data() as *const pg_sys::TriggerData as *mut pg_sys::TriggerData;
    if let Err(e) = capture(relid, source, op, &args, Some(td)) {
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

