//! The fast capture path, for tracked tables without a row filter or excluded columns (most
//! tables): reads the statement's transition tables directly, turns each row into JSON with
//! PostgreSQL's own `row_to_json`, and writes the `sync_log` rows with one small prepared
//! INSERT. No per-statement query has to be planned or initialised, which is what a
//! single-row OLTP statement would otherwise pay for.
//!
//! It produces exactly what the SQL path (`sql.rs`) produces for the same statement; the
//! tests run both.

use super::sql::Part;
use pgrx::prelude::*;
use pgrx::PgMemoryContexts;

/// A primary-key attribute and what is needed to compare two values of it.
#[derive(Clone, Debug, PartialEq)]
pub struct KeyAttr {
    pub attnum: i32,
    pub byval: bool,
    pub len: i16,
}

/// Rows of one transition table, read through a read pointer of our own so that other
/// readers of the same tuplestore are not disturbed.
struct Reader {
    store: *mut pg_sys::Tuplestorestate,
    pointer: i32,
    slot: *mut pg_sys::TupleTableSlot,
}

impl Reader {
    unsafe fn new(store: *mut pg_sys::Tuplestorestate, desc: pg_sys::TupleDesc) -> Reader {
        unsafe {
            let pointer = pg_sys::tuplestore_alloc_read_pointer(store, 0);
            pg_sys::tuplestore_select_read_pointer(store, pointer);
            pg_sys::tuplestore_rescan(store);
            let slot = pg_sys::MakeSingleTupleTableSlot(desc, &pg_sys::TTSOpsMinimalTuple);
            Reader { store, pointer, slot }
        }
    }

    /// Advance to the next row; false at the end.
    unsafe fn next(&mut self) -> bool {
        unsafe {
            pg_sys::tuplestore_select_read_pointer(self.store, self.pointer);
            pg_sys::tuplestore_gettupleslot(self.store, true, false, self.slot)
        }
    }

    /// The current row as JSON text (`row_to_json`), built in `scratch`.
    unsafe fn json(&self, scratch: &mut PgMemoryContexts) -> String {
        unsafe {
            let slot = self.slot;
            scratch.switch_to(|_| {
                let row = pg_sys::ExecFetchSlotHeapTupleDatum(slot);
                pgrx::fcinfo::direct_function_call::<String>(pg_sys::row_to_json, &[Some(row)])
                    .expect("row_to_json returns text")
            })
        }
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        unsafe { pg_sys::ExecDropSingleTupleTableSlot(self.slot) };
    }
}

/// Binary equality of one attribute in two slots (the same test PostgreSQL's `datumIsEqual` makes).
unsafe fn same_value(a: *mut pg_sys::TupleTableSlot, b: *mut pg_sys::TupleTableSlot, key: &KeyAttr) -> bool {
    unsafe {
        let (mut null_a, mut null_b) = (false, false);
        let va = pg_sys::slot_getattr(a, key.attnum, &mut null_a);
        let vb = pg_sys::slot_getattr(b, key.attnum, &mut null_b);
        if null_a || null_b {
            return null_a == null_b;
        }
        if key.byval {
            return va == vb;
        }
        if key.len > 0 {
            let (pa, pb) = (va.cast_mut_ptr::<u8>(), vb.cast_mut_ptr::<u8>());
            return std::slice::from_raw_parts(pa, key.len as usize) == std::slice::from_raw_parts(pb, key.len as usize);
        }
        if key.len == -1 {
            let da = pg_sys::pg_detoast_datum_packed(va.cast_mut_ptr());
            let db = pg_sys::pg_detoast_datum_packed(vb.cast_mut_ptr());
            let (la, lb) = (pgrx::varlena::varsize_any_exhdr(da), pgrx::varlena::varsize_any_exhdr(db));
            return la == lb
                && std::slice::from_raw_parts(pgrx::varlena::vardata_any(da).cast::<u8>(), la)
                    == std::slice::from_raw_parts(pgrx::varlena::vardata_any(db).cast::<u8>(), lb);
        }
        // cstring-like (len -2): compare as C strings.
        std::ffi::CStr::from_ptr(va.cast_mut_ptr()) == std::ffi::CStr::from_ptr(vb.cast_mut_ptr())
    }
}

fn json_array(items: &[String]) -> String {
    let mut out = String::with_capacity(items.iter().map(|s| s.len() + 1).sum::<usize>() + 2);
    out.push('[');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(item);
    }
    out.push(']');
    out
}

/// The log parts of one statement, read from the trigger's transition tables.
///
/// # Safety
/// `td` must be the TriggerData of an AFTER ... FOR EACH STATEMENT trigger with the transition
/// tables its operation implies.
pub unsafe fn statement_parts(td: *const pg_sys::TriggerData, op: PgTriggerOperation, keys: &[KeyAttr]) -> Vec<Part> {
    unsafe {
        let desc = (*(*td).tg_relation).rd_att;
        let mut scratch = PgMemoryContexts::new("pg_peersync capture row");
        let mut read_all = |store: *mut pg_sys::Tuplestorestate| {
            let mut reader = Reader::new(store, desc);
            let mut rows = Vec::new();
            while reader.next() {
                rows.push(reader.json(&mut scratch));
                scratch.reset();
            }
            rows
        };
        match op {
            PgTriggerOperation::Insert => vec![Part::new("INSERT", read_all((*td).tg_newtable))],
            PgTriggerOperation::Delete => vec![Part::new("DELETE", read_all((*td).tg_oldtable))],
            PgTriggerOperation::Update => {
                let mut old = Reader::new((*td).tg_oldtable, desc);
                let mut new = Reader::new((*td).tg_newtable, desc);
                let (mut updates, mut deletes, mut inserts) = (Vec::new(), Vec::new(), Vec::new());
                // Old and new rows are stored pairwise: the n-th old row became the n-th new row.
                while old.next() && new.next() {
                    let (oj, nj) = (old.json(&mut scratch), new.json(&mut scratch));
                    scratch.reset();
                    if oj == nj {
                        continue; // nothing captured changed
                    }
                    if keys.iter().all(|k| same_value(old.slot, new.slot, k)) {
                        updates.push(format!("[{nj},{oj}]"));
                    } else {
                        deletes.push(oj);
                        inserts.push(nj);
                    }
                }
                vec![Part::new("UPDATE", updates), Part::new("DELETE", deletes), Part::new("INSERT", inserts)]
            }
            PgTriggerOperation::Truncate => vec![],
        }
    }
}

impl Part {
    fn new(op: &'static str, rows: Vec<String>) -> Part {
        Part { op, n: rows.len() as i32, rows: json_array(&rows) }
    }
}
