//! Array arguments for apply's statements, built in one pass.
//!
//! Apply hands PostgreSQL a value per change and column: a thousand-element `text[]` or
//! `json[]` per column per chunk. pgrx's conversion of a `Vec` makes each element a datum of
//! its own, copies it into an accumulator, then into the array. Here every element is written
//! once into one buffer, and `construct_md_array` copies that buffer into the array.

use pgrx::datum::DatumWithOid;
use pgrx::pg_sys;

/// The array element types apply passes in bulk; both are a varlena holding text.
#[derive(Clone, Copy)]
pub enum Of {
    Text,
    /// Text that is JSON already (serde_json wrote it), so `json_in` need not check it again.
    Json,
}

/// A one-dimensional array of `items` (`None`: NULL), as `text[]` or `json[]`.
pub fn array<'a>(of: Of, items: impl IntoIterator<Item = Option<&'a str>>) -> DatumWithOid<'static> {
    let items: Vec<Option<&str>> = items.into_iter().collect();
    let (element, array) = match of {
        Of::Text => (pg_sys::TEXTOID, pg_sys::TEXTARRAYOID),
        Of::Json => (pg_sys::JSONOID, pg_sys::JSONARRAYOID),
    };
    // Each element: its 4-byte length word and bytes, padded so the next word is aligned.
    let header = pg_sys::VARHDRSZ;
    let padded = |len: usize| (header + len).next_multiple_of(4);
    let size: usize = items.iter().flatten().map(|s| padded(s.len())).sum();
    let mut datums = Vec::with_capacity(items.len());
    let mut nulls = Vec::with_capacity(items.len());
    // SAFETY: the buffer holds every element written into it (sized above); each datum points
    // at a complete varlena in it; construct_md_array copies them into a new array, in the
    // current memory context, before the buffer is freed.
    unsafe {
        let buffer = pg_sys::palloc(size.max(1)).cast::<u8>();
        let mut at = 0;
        for item in &items {
            match item {
                Some(s) => {
                    let element = buffer.add(at);
                    pgrx::set_varsize_4b(element.cast(), (header + s.len()) as i32);
                    std::ptr::copy_nonoverlapping(s.as_ptr(), element.add(header), s.len());
                    datums.push(pg_sys::Datum::from(element));
                    nulls.push(false);
                    at += padded(s.len());
                }
                None => {
                    datums.push(pg_sys::Datum::from(0usize));
                    nulls.push(true);
                }
            }
        }
        let mut dims = [items.len() as i32];
        let mut lower_bounds = [1];
        let result = pg_sys::construct_md_array(
            datums.as_mut_ptr(),
            nulls.as_mut_ptr(),
            1,
            dims.as_mut_ptr(),
            lower_bounds.as_mut_ptr(),
            element,
            -1,
            false,
            pg_sys::TYPALIGN_INT as std::ffi::c_char,
        );
        pg_sys::pfree(buffer.cast());
        DatumWithOid::new(pg_sys::Datum::from(result), array)
    }
}
