//! Statements apply runs for every chunk of changes, planned once per backend and kept.
//!
//! Parsing and planning them each time was about 8% of an apply where every change conflicts
//! (several statements per chunk of 1,000 changes). A kept plan is replanned by PostgreSQL's
//! plan cache whenever something it depends on changes (a table altered, dropped and created
//! again, another search_path), so keeping it is safe; it is found again by its SQL text, which
//! names the tables. Statements whose best plan depends on their values (the race check in
//! `fold::raced`) are planned each time instead.

use crate::error::SyncError;
use pgrx::PgOid;
use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use pgrx::spi::{OwnedPreparedStatement, SpiClient, SpiTupleTable};
use std::cell::RefCell;
use std::collections::HashMap;
use std::mem::ManuallyDrop;
use std::rc::Rc;

/// More distinct statements than this (many tables, many column sets) and the cache starts over.
const KEEP_AT_MOST: usize = 256;

thread_local! {
    // Never dropped: freeing plans while the backend exits would only be work.
    static KEPT: ManuallyDrop<RefCell<HashMap<String, Rc<OwnedPreparedStatement>>>> =
        ManuallyDrop::new(RefCell::new(HashMap::new()));
}

/// `sql`'s kept plan, made on first use with the types of `args`.
fn kept(client: &SpiClient, sql: &str, args: &[DatumWithOid]) -> Result<Rc<OwnedPreparedStatement>, SyncError> {
    if let Some(plan) = KEPT.with(|k| k.borrow().get(sql).cloned()) {
        return Ok(plan);
    }
    let types: Vec<PgOid> = args.iter().map(|a| PgOid::from(a.oid())).collect();
    let plan = Rc::new(client.prepare_mut(sql, &types)?.keep());
    KEPT.with(|k| {
        let mut k = k.borrow_mut();
        if k.len() >= KEEP_AT_MOST {
            k.clear();
        }
        k.insert(sql.to_string(), plan.clone());
    });
    Ok(plan)
}

/// Run `sql` with `args` through its kept plan and hand the rows to `read`.
pub fn query<R>(
    sql: &str,
    args: &[DatumWithOid],
    read: impl FnOnce(SpiTupleTable) -> Result<R, SyncError>,
) -> Result<R, SyncError> {
    Spi::connect_mut(|client| {
        let plan = kept(client, sql, args)?;
        let rows = client.update(&*plan, None, args)?;
        read(rows)
    })
}

/// Run `sql` with `args` through its kept plan.
pub fn run(sql: &str, args: &[DatumWithOid]) -> Result<(), SyncError> {
    query(sql, args, |_| Ok(()))
}
