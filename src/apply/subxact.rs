//! Run a closure in a subtransaction, turning a PostgreSQL error into a value: one origin
//! transaction that cannot be applied is rolled back alone and recorded, the rest go on.

use pgrx::prelude::*;

/// A caught error: SQLSTATE (five characters) and message.
#[derive(Clone, Debug)]
pub struct Failure {
    pub sqlstate: String,
    pub message: String,
}

pub fn run<R>(f: impl FnOnce() -> R) -> Result<R, Failure> {
    // SAFETY: the classic PL pattern (plpython's PLy_spi_subtransaction_*): remember the memory
    // context and resource owner, start a subtransaction, and restore both after it ends.
    unsafe {
        let cxt = pg_sys::CurrentMemoryContext;
        let owner = pg_sys::CurrentResourceOwner;
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        pg_sys::MemoryContextSwitchTo(cxt);
        let result = PgTryBuilder::new(std::panic::AssertUnwindSafe(|| Ok(f())))
            .catch_others(|e| {
                let (code, message) = match &e {
                    pg_sys::panic::CaughtError::PostgresError(r)
                    | pg_sys::panic::CaughtError::ErrorReport(r)
                    | pg_sys::panic::CaughtError::RustPanic { ereport: r, .. } => {
                        (r.sql_error_code(), r.message().to_string())
                    }
                };
                Err(Failure { sqlstate: sqlstate(code), message })
            })
            .execute();
        match &result {
            Ok(_) => pg_sys::ReleaseCurrentSubTransaction(),
            Err(_) => pg_sys::RollbackAndReleaseCurrentSubTransaction(),
        }
        pg_sys::MemoryContextSwitchTo(cxt);
        pg_sys::CurrentResourceOwner = owner;
        result
    }
}

fn sqlstate(code: PgSqlErrorCode) -> String {
    // PostgreSQL packs the five characters six bits each (MAKE_SQLSTATE).
    let mut n = code as i32;
    (0..5)
        .map(|_| {
            let c = ((n & 0x3f) as u8 + b'0') as char;
            n >>= 6;
            c
        })
        .collect()
}
