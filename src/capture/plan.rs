//! A kept SPI plan, prepared once per backend and run many times.

use pgrx::prelude::*;

/// Prepared as a generic plan: its parameters never change the best plan, and re-planning on
/// every call would cost more than running it.
pub struct CapturePlan(pg_sys::SPIPlanPtr);

impl CapturePlan {
    /// Must run inside an SPI connection (with the trigger's transition tables registered
    /// when the statement reads them).
    pub fn prepare(text: &str, types: &[pg_sys::Oid]) -> CapturePlan {
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
            super::internal(format!("pg_peersync could not prepare a capture statement (SPI result {})", unsafe {
                pg_sys::SPI_result
            }));
        }
        // SAFETY: a valid, unsaved plan.
        unsafe { pg_sys::SPI_keepplan(plan) };
        CapturePlan(plan)
    }

    /// Run inside an SPI connection with non-null `args`; returns the SPI result code.
    pub fn execute(&self, args: &mut [pg_sys::Datum]) -> i32 {
        let nulls = vec![b' ' as std::ffi::c_char; args.len()];
        // SAFETY: inside an SPI connection; the plan is kept and matches the arguments.
        let rc = unsafe { pg_sys::SPI_execute_plan(self.0, args.as_mut_ptr(), nulls.as_ptr(), false, 0) };
        if rc < 0 {
            super::internal(format!("pg_peersync capture statement failed (SPI result {rc})"));
        }
        rc
    }

    /// The rows the last `execute` returned, as `(text, int4, text)` triples.
    pub fn returned_parts() -> Vec<(String, i32, String)> {
        // SAFETY: called right after `execute`, inside the same SPI connection; the statement
        // returns non-null (text, int4, json) columns.
        unsafe {
            if pg_sys::SPI_tuptable.is_null() {
                return Vec::new();
            }
            let table = &*pg_sys::SPI_tuptable;
            (0..pg_sys::SPI_processed as usize)
                .map(|i| {
                    let tuple = *table.vals.add(i);
                    let col = |n: i32| {
                        let mut is_null = false;
                        let d = pg_sys::SPI_getbinval(tuple, table.tupdesc, n, &mut is_null);
                        (d, is_null)
                    };
                    let (op, op_null) = col(1);
                    let (n, n_null) = col(2);
                    let (rows, rows_null) = col(3);
                    (
                        String::from_datum(op, op_null).unwrap_or_default(),
                        i32::from_datum(n, n_null).unwrap_or(0),
                        String::from_datum(rows, rows_null).unwrap_or_else(|| "[]".into()),
                    )
                })
                .collect()
        }
    }
}

impl Drop for CapturePlan {
    fn drop(&mut self) {
        // SAFETY: the plan was kept by `prepare` and is freed once.
        unsafe { pg_sys::SPI_freeplan(self.0) };
    }
}
