//! The fast capture path, for tracked tables without a row filter or excluded columns (most
//! tables): reads the statement's transition tables directly, turns each row into JSON with
//! PostgreSQL's own `row_to_json`, and writes the `sync_log` rows with one small prepared
//! INSERT. No per-statement query has to be planned or initialised, which is what a
//! single-row OLTP statement would otherwise pay for.
//!
//! It produces exactly what the SQL path (`sql.rs`) produces for the same statement; the
//! tests run both.

use super::sql::Part;
use pgrx::PgMemoryContexts;
use pgrx::prelude::*;

/// A primary-key attribute and what is needed to compare two values of it.
#[derive(Clone, Debug, PartialEq)]
pub struct KeyAttr {
    pub attnum: i32,
    pub byval: bool,
    pub len: i16,
}

/// Every live column of the table, for finding the columns an UPDATE changed.
unsafe fn all_columns(desc: pg_sys::TupleDesc) -> Vec<KeyAttr> {
    unsafe {
        let natts = (*desc).natts as usize;
        let attrs = (*desc).attrs.as_slice(natts);
        attrs
            .iter()
            .enumerate()
            .filter(|(_, a)| !a.attisdropped)
            .map(|(i, a)| KeyAttr { attnum: i as i32 + 1, byval: a.attbyval, len: a.attlen })
            .collect()
    }
}

/// Row descriptors holding a subset of the table's columns, one per subset met so far
/// (an UPDATE statement usually changes the same columns in every row).
struct Projections {
    desc: pg_sys::TupleDesc,
    by_columns: std::collections::HashMap<Vec<i32>, pg_sys::TupleDesc>,
}

impl Projections {
    /// The old values of `columns` as a JSON object (`row_to_json` of a row holding only them).
    /// Allocates the descriptor in the current memory context the first time.
    unsafe fn json(
        &mut self,
        slot: *mut pg_sys::TupleTableSlot,
        columns: &[i32],
        scratch: &mut PgMemoryContexts,
    ) -> &'static str {
        unsafe {
            let desc = self.desc;
            let pdesc = *self.by_columns.entry(columns.to_vec()).or_insert_with(|| {
                let d = pg_sys::CreateTemplateTupleDesc(columns.len() as i32);
                for (i, attnum) in columns.iter().enumerate() {
                    pg_sys::TupleDescCopyEntry(d, i as i16 + 1, desc, *attnum as i16);
                }
                pg_sys::BlessTupleDesc(d)
            });
            scratch.switch_to(|_| {
                let mut values = Vec::with_capacity(columns.len());
                let mut nulls = Vec::with_capacity(columns.len());
                for attnum in columns {
                    let mut is_null = false;
                    values.push(pg_sys::slot_getattr(slot, *attnum, &mut is_null));
                    nulls.push(is_null);
                }
                let tuple = pg_sys::heap_form_tuple(pdesc, values.as_mut_ptr(), nulls.as_mut_ptr());
                json_text(pg_sys::heap_copy_tuple_as_datum(tuple, pdesc))
            })
        }
    }
}

/// `row_to_json` of a composite datum, as text in the current memory context (valid until
/// that context is reset).
unsafe fn json_text(row: pg_sys::Datum) -> &'static str {
    unsafe {
        let text = pgrx::fcinfo::direct_function_call_as_datum(pg_sys::row_to_json, &[Some(row)])
            .expect("row_to_json returns text");
        let v = pg_sys::pg_detoast_datum_packed(text.cast_mut_ptr());
        let bytes =
            std::slice::from_raw_parts(pgrx::varlena::vardata_any(v).cast::<u8>(), pgrx::varlena::varsize_any_exhdr(v));
        std::str::from_utf8(bytes).unwrap_or_else(|_| {
            super::internal("pg_peersync needs a UTF8 database: a row image is not valid UTF-8".into())
        })
    }
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

    /// The current row as JSON text (`row_to_json`), allocated in the current memory context
    /// and valid until it is reset.
    unsafe fn json(&self) -> &'static str {
        unsafe { json_text(pg_sys::ExecFetchSlotHeapTupleDatum(self.slot)) }
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
            return std::slice::from_raw_parts(pa, key.len as usize)
                == std::slice::from_raw_parts(pb, key.len as usize);
        }
        if key.len == -1 {
            // Identical raw bytes (inline or the same TOAST pointer) mean equal values,
            // without fetching anything out of line.
            let (ra, rb) = (va.cast_mut_ptr::<pg_sys::varlena>(), vb.cast_mut_ptr::<pg_sys::varlena>());
            let (sa, sb) = (pgrx::varlena::varsize_any(ra), pgrx::varlena::varsize_any(rb));
            if sa == sb
                && std::slice::from_raw_parts(ra.cast::<u8>(), sa) == std::slice::from_raw_parts(rb.cast::<u8>(), sb)
            {
                return true;
            }
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

/// A JSON array written element by element.
struct ArrayBuilder {
    text: String,
    n: i32,
}

impl ArrayBuilder {
    fn new() -> ArrayBuilder {
        ArrayBuilder { text: String::from("["), n: 0 }
    }

    fn push(&mut self, parts: &[&str]) {
        if self.n > 0 {
            self.text.push(',');
        }
        for p in parts {
            self.text.push_str(p);
        }
        self.n += 1;
    }

    fn finish(mut self, op: &'static str) -> Part {
        self.text.push(']');
        Part { op, n: self.n, rows: self.text }
    }
}

/// The log parts of one statement, read from the trigger's transition tables.
///
/// # Safety
/// `td` must be the TriggerData of an AFTER ... FOR EACH STATEMENT trigger with the transition
/// tables its operation implies.
pub unsafe fn statement_parts(td: *const pg_sys::TriggerData, op: PgTriggerOperation, keys: &[KeyAttr]) -> Vec<Part> {
    unsafe {
        let desc = (*(*td).tg_relation).rd_att;
        // Row images are built in a scratch context reset after each row.
        let mut scratch = PgMemoryContexts::new("pg_peersync capture row");
        let mut read_all = |store: *mut pg_sys::Tuplestorestate, op: &'static str| {
            let mut reader = Reader::new(store, desc);
            let mut rows = ArrayBuilder::new();
            while reader.next() {
                scratch.switch_to(|_| rows.push(&[reader.json()]));
                scratch.reset();
            }
            rows.finish(op)
        };
        match op {
            PgTriggerOperation::Insert => vec![read_all((*td).tg_newtable, "INSERT")],
            PgTriggerOperation::Delete => vec![read_all((*td).tg_oldtable, "DELETE")],
            PgTriggerOperation::Update => {
                let mut old = Reader::new((*td).tg_oldtable, desc);
                let mut new = Reader::new((*td).tg_newtable, desc);
                let columns = all_columns(desc);
                let mut projections = Projections { desc, by_columns: Default::default() };
                let (mut updates, mut deletes, mut inserts) =
                    (ArrayBuilder::new(), ArrayBuilder::new(), ArrayBuilder::new());
                let mut changed: Vec<i32> = Vec::with_capacity(columns.len());
                // Old and new rows are stored pairwise: the n-th old row became the n-th new row.
                while old.next() && new.next() {
                    changed.clear();
                    changed.extend(columns.iter().filter(|c| !same_value(old.slot, new.slot, c)).map(|c| c.attnum));
                    if changed.is_empty() {
                        continue; // nothing captured changed
                    }
                    if keys.iter().all(|k| !changed.contains(&k.attnum)) {
                        let old_values = projections.json(old.slot, &changed, &mut scratch);
                        scratch.switch_to(|_| updates.push(&["[", new.json(), ",", old_values, "]"]));
                    } else {
                        scratch.switch_to(|_| {
                            deletes.push(&[old.json()]);
                            inserts.push(&[new.json()]);
                        });
                    }
                    scratch.reset();
                }
                vec![updates.finish("UPDATE"), deletes.finish("DELETE"), inserts.finish("INSERT")]
            }
            PgTriggerOperation::Truncate => vec![],
        }
    }
}
