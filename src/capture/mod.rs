//! Change capture: statement-level triggers that record every change of a tracked table in
//! the writing transaction, written to `sync_log` as one row when the transaction commits.
//!
//! - `track`: `sync_track_table()` and friends install the triggers;
//! - `fast`: tables without a row filter or excluded columns, read straight from the
//!   transition tables;
//! - `sql`: the set-based SQL used for the other tables and for rows present at tracking time;
//! - `xact`: the per-transaction buffer, numbering and commit-time write;
//! - `plan`: kept SPI plans.

mod fast;
pub mod ids;
mod plan;
pub mod sql;
mod track;
pub mod xact;

use crate::clock;
use crate::error::SyncError;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use plan::CapturePlan;
use sql::{Part, Source, TableSpec};
use std::cell::RefCell;
use std::collections::HashMap;

pub use track::{check_strategy, display_name, table_spec};

/// Per tracked table: its spec (and the trigger arguments it was built from), and the SQL
/// path's plans by source.
struct TableCache {
    args: Vec<String>,
    spec: TableSpec,
    /// The primary-key column names as a JSON array, as stored with each part.
    pk_json: String,
    plans: HashMap<Source, CapturePlan>,
}

thread_local! {
    static TABLES: RefCell<HashMap<pg_sys::Oid, TableCache>> = RefCell::new(HashMap::new());
    static STALE: RefCell<Vec<pg_sys::Oid>> = const { RefCell::new(Vec::new()) };
}

/// Register the backend's callbacks: transaction events for the capture buffer, and relcache
/// invalidation to forget cached specs and plans when a table changes (ALTER TABLE, a new
/// primary key, DROP EXTENSION).
pub fn init_backend_hooks() {
    #[pg_guard]
    unsafe extern "C-unwind" fn on_relcache(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
        // Only note it here: freeing plans inside an invalidation callback is not safe.
        STALE.with(|s| s.borrow_mut().push(relid));
        clock::invalidate(relid);
    }
    unsafe { pg_sys::CacheRegisterRelcacheCallback(Some(on_relcache), pg_sys::Datum::from(0)) };
    xact::init_callbacks();
}

fn drop_stale_specs() {
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
}

const SQL_PARAMS: [pg_sys::Oid; 0] = [];

/// Capture the changes of `source` rows of `relid` into the current transaction; returns how
/// many changes were captured. `trigger_data` is set when called from the trigger (then
/// `source` reads its transition tables).
pub(crate) fn capture(
    relid: pg_sys::Oid,
    source: Source,
    op: PgTriggerOperation,
    args: &[String],
    trigger_data: Option<*mut pg_sys::TriggerData>,
) -> Result<i32, SyncError> {
    drop_stale_specs();
    let ext = clock::ext();
    if TABLES.with(|t| t.borrow().get(&relid).is_none_or(|c| c.args != args)) {
        let spec = table_spec(relid, args)?;
        let pk_json = serde_json::to_string(&spec.pk).expect("strings serialise");
        let cache = TableCache { args: args.to_vec(), spec, pk_json, plans: HashMap::new() };
        TABLES.with(|t| t.borrow_mut().insert(relid, cache));
    }
    let (table, pk, parts) = crate::gucs::floats_exact(|| {
        TABLES.with(|t| {
            let mut t = t.borrow_mut();
            let cache = t.get_mut(&relid).expect("cached above");
            let parts = match trigger_data {
                Some(td) if cache.spec.filter.is_none() && cache.spec.exclude.is_empty() => {
                    // SAFETY: `td` is this statement trigger's data, with the transition tables
                    // its operation implies.
                    unsafe { fast::statement_parts(td, op, &cache.spec.pk_attrs) }
                }
                _ => Spi::connect(|_client| {
                    if let Some(td) = trigger_data {
                        // Makes the transition tables visible by name to the statement.
                        unsafe { pg_sys::SPI_register_trigger_data(td) };
                    }
                    let spec = &cache.spec;
                    let plan = cache
                        .plans
                        .entry(source)
                        .or_insert_with(|| CapturePlan::prepare(&sql::capture_statement(spec, source), &SQL_PARAMS));
                    plan.execute(&mut []);
                    CapturePlan::returned_parts()
                        .into_iter()
                        .map(|(op, n, rows)| Part { op: sql::op_name(&op), n, rows })
                        .collect()
                }),
            };
            (cache.spec.qualified.clone(), cache.pk_json.clone(), parts)
        })
    });
    xact::add_parts(&ext, &table, &pk, parts)
}

fn source_of(op: &PgTriggerOperation) -> Option<Source> {
    match op {
        PgTriggerOperation::Insert => Some(Source::Inserted),
        PgTriggerOperation::Update => Some(Source::Updated),
        PgTriggerOperation::Delete => Some(Source::Deleted),
        PgTriggerOperation::Truncate => None,
    }
}

/// The capture trigger: AFTER INSERT / UPDATE / DELETE ... FOR EACH STATEMENT, with transition
/// tables. Arguments: the row filter ('' for none) and the excluded columns (a JSON array).
#[pg_trigger]
fn _sync_capture<'a>(trigger: &'a PgTrigger<'a>) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, ErrorReport> {
    // Errors are raised here: a trigger's Err would reach the user as a generic panic message.
    let op = trigger.op().unwrap_or_else(|e| internal(e.to_string()));
    let Some(source) = source_of(&op) else {
        return Ok(None);
    };
    if crate::apply::applying() {
        // Received changes are stored by sync_apply with their origin, not captured again.
        return Ok(None);
    }
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
    let name = format!("{}.{}", trigger.table_schema().unwrap_or_default(), trigger.table_name().unwrap_or_default());
    SyncError::Truncate(name).report()
}

fn internal(msg: String) -> ! {
    ErrorReport::new(PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, msg, "pg_peersync").report(PgLogLevel::ERROR);
    unreachable!("ERROR does not return")
}
