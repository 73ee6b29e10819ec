//! Writing rows through PostgreSQL's own COPY FROM, fed from memory: a joiner loads a page
//! the way logical replication's table sync loads its copy (`BeginCopyFrom` with a data
//! callback), with COPY's batched inserts, input functions and index maintenance.
//!
//! As there, no permission or row security check is made (the caller is the worker, writing
//! tables it tracks), and triggers fire as `session_replication_role` says.

use crate::error::SyncError;
use pgrx::pg_sys;
use std::cell::Cell;
use std::ffi::{CString, c_int, c_void};

thread_local! {
    /// The bytes COPY reads next: start, length, how far it has read. Set only for the span of
    /// one `copy_from` call (COPY's callback takes no argument of its own).
    static FEED: Cell<(*const u8, usize, usize)> = const { Cell::new((std::ptr::null(), 0, 0)) };
}

/// COPY's data callback: as many of the remaining bytes as fit, 0 at the end.
unsafe extern "C-unwind" fn feed(out: *mut c_void, _minread: c_int, maxread: c_int) -> c_int {
    FEED.with(|f| {
        let (start, len, read) = f.get();
        let n = (len - read).min(maxread.max(0) as usize);
        if n > 0 {
            // SAFETY: `start..start + len` is the live `data` of the running `copy_from`, and
            // COPY's buffer holds `maxread` bytes.
            unsafe { std::ptr::copy_nonoverlapping(start.add(read), out.cast::<u8>(), n) };
        }
        f.set((start, len, read + n));
        n as c_int
    })
}

/// Clears the feed however `copy_from` ends (an ERROR unwinds through it).
struct Fed;

impl Drop for Fed {
    fn drop(&mut self) {
        FEED.with(|f| f.set((std::ptr::null(), 0, 0)));
    }
}

/// Write `data` (lines in COPY's text format, UTF-8) into the columns `columns` of table
/// `relid`; returns the rows written. A malformed line is an ERROR, as in COPY.
pub fn copy_from(relid: pg_sys::Oid, columns: &[String], data: &str) -> Result<u64, SyncError> {
    let names: Vec<CString> = columns
        .iter()
        .map(|c| CString::new(c.as_str()))
        .collect::<Result<_, _>>()
        .map_err(|_| SyncError::BadBatch("a column name holds a NUL byte".into()))?;
    let _fed = Fed;
    FEED.with(|f| f.set((data.as_ptr(), data.len(), 0)));
    // SAFETY: called inside a transaction; every pointer handed over is palloc'd or lives until
    // CopyFrom returns; an ERROR longjmps out through pgrx's guard and aborts the transaction.
    unsafe {
        let lock = pg_sys::RowExclusiveLock as c_int;
        let rel = pg_sys::table_open(relid, lock);
        let pstate = pg_sys::make_parsestate(std::ptr::null_mut());
        pg_sys::addRangeTableEntryForRelation(pstate, rel, lock, std::ptr::null_mut(), false, false);
        let mut attnames: *mut pg_sys::List = std::ptr::null_mut();
        for n in &names {
            attnames = pg_sys::lappend(attnames, pg_sys::makeString(pg_sys::pstrdup(n.as_ptr())).cast());
        }
        let utf8 = pg_sys::makeString(pg_sys::pstrdup(c"UTF8".as_ptr()));
        let options = pg_sys::lappend(
            std::ptr::null_mut(),
            pg_sys::makeDefElem(pg_sys::pstrdup(c"encoding".as_ptr()), utf8.cast(), -1).cast(),
        );
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
        let cstate = pg_sys::BeginCopyFrom(
            pstate,
            rel,
            std::ptr::null_mut(),
            std::ptr::null(),
            false,
            Some(feed),
            attnames,
            options,
        );
        let written = pg_sys::CopyFrom(cstate);
        pg_sys::EndCopyFrom(cstate);
        pg_sys::PopActiveSnapshot();
        pg_sys::CommandCounterIncrement();
        pg_sys::table_close(rel, pg_sys::NoLock as c_int);
        pg_sys::free_parsestate(pstate);
        Ok(written)
    }
}
