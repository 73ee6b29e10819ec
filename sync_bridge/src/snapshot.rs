//! Joining from a snapshot: the messages of `/v1/snapshot` and the vector arithmetic that
//! makes a copy taken page by page, while every node keeps writing, safe to catch up from.
//!
//! A source cannot hold one database snapshot open across the many requests of a copy, so
//! the copy is consistent per row instead: each page carries table rows together with their
//! registers (`sync_rows`), read by one statement. The joiner then catches up from
//! [`start_vector`], a have-vector taken before the first page and lowered below anything whose
//! register the source had not folded yet: every change a page may show without its register
//! comes again, and the registers (sets of versions, `resolve::Register`) absorb what a page
//! already showed. Until the joiner holds [`Finish::upto`], which covers everything any page
//! may have shown, it applies nothing blind (a change that saw everything the joiner holds
//! need not have seen what a page showed).

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use uuid::Uuid;

/// Rows per page the joiner asks for.
pub const PAGE_ROWS: i64 = 20_000;

/// The format of rows pages this node serves and reads (see [`split_rows_page`]). A source
/// refuses other formats, and a joiner whose source serves another replays the log instead.
pub const PAGE_FORMAT: u32 = 2;

/// The line that ends each block of a rows page: COPY's end-of-data marker, which escaped
/// values cannot form (a value's backslash travels doubled).
pub const END_OF_BLOCK: &str = "\\.\n";

/// What a joiner asks `/v1/snapshot` for.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "ask", rename_all = "snake_case")]
pub enum Ask {
    /// The tables and the vector to catch up from.
    Manifest,
    /// Up to `limit` rows of `table` after key `after` (the key columns' text, in key order),
    /// each with its register, in page format `format` (absent: an older joiner's, 0).
    Rows {
        table: String,
        after: Option<Vec<String>>,
        limit: i64,
        #[serde(default)]
        format: u32,
    },
    /// Up to `limit` registers of `table` whose rows are gone (tombstones), after key text
    /// `after` (`sync_rows.pk`, bytewise).
    Tombstones { table: String, after: Option<String>, limit: i64 },
    /// The vector that covers everything the pages showed, and the source's clock.
    Finish,
}

/// One tracked table as the source has it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TableInfo {
    pub name: String,
    /// Key columns, in key order.
    pub key: Vec<String>,
    /// Columns copied (captured and not generated), key columns included.
    pub columns: Vec<String>,
    /// Rows expected (the planner's estimate, for progress).
    pub rows: i64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub source: Uuid,
    /// What the source holds: a node rejoining from it waits until it holds at least as much.
    pub have: BTreeMap<Uuid, i64>,
    /// Catch up from here (`start_vector`).
    pub from: BTreeMap<Uuid, i64>,
    /// Changes in the source's log, and whether it deleted some: what replaying it would take.
    #[serde(default)]
    pub logged: i64,
    #[serde(default)]
    pub pruned: bool,
    /// Some table holds rows that no log holds (tracked with `existing_rows => 'shared'`, or
    /// copied from such a node): a new node must copy, replaying would miss them.
    #[serde(default)]
    pub shared: bool,
    /// The rows page format the source serves (absent: an older source's, 0).
    #[serde(default)]
    pub page_format: u32,
    pub tables: Vec<TableInfo>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Finish {
    /// Covers every change a page may have shown (`cover`).
    pub upto: BTreeMap<Uuid, i64>,
    /// The source's hybrid logical clock, which the joiner's clock passes.
    pub hlc: i64,
}

/// What the puller reads of a page (`page_head`); the rest goes to the joiner's database as it came.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct PageHead {
    /// Rows (or tombstones) in the page; fewer than asked: the table (or phase) is done.
    pub n: i64,
    /// The key to ask after next: the last row's key columns as text, or its `sync_rows.pk`.
    #[serde(default)]
    pub last: Option<Value>,
}

/// A page's head: the first line of a rows page, the whole of a tombstones page.
pub fn page_head(page: &str) -> Result<PageHead, String> {
    let line = page.split_once('\n').map_or(page, |(head, _)| head);
    serde_json::from_str(line).map_err(|e| format!("malformed page: {e}"))
}

/// A rows page (format 2), split: its head, then two blocks of lines in COPY's text format (a
/// tab between values, `\N` for null, backslash escapes), each ended by [`END_OF_BLOCK`]:
/// the table's rows (the columns of `TableInfo::columns`), then the registers of those rows
/// that have one (register key, versions, life).
pub struct RowsPage<'a> {
    pub head: PageHead,
    pub rows: &'a str,
    pub registers: &'a str,
}

pub fn split_rows_page(page: &str) -> Result<RowsPage<'_>, String> {
    let head = page_head(page)?;
    let rest = page.split_once('\n').map_or("", |(_, rest)| rest);
    let (rows, rest) = take_block(rest)?;
    let (registers, rest) = take_block(rest)?;
    if !rest.is_empty() {
        return Err("malformed page: text after its blocks".into());
    }
    let lines = rows.bytes().filter(|b| *b == b'\n').count() as i64;
    if lines != head.n {
        return Err(format!("malformed page: {lines} rows where its head says {}", head.n));
    }
    Ok(RowsPage { head, rows, registers })
}

/// The lines before the next end-of-block line (each with its newline), and what follows it.
fn take_block(text: &str) -> Result<(&str, &str), String> {
    let end = END_OF_BLOCK;
    if let Some(rest) = text.strip_prefix(end) {
        return Ok(("", rest));
    }
    let at = text.find(&format!("\n{end}")).ok_or("malformed page: a block is not ended")?;
    Ok((&text[..at + 1], &text[at + 1 + end.len()..]))
}

/// `block`'s lines, each with `prefix` in front (the joiner's table oid before a register).
pub fn prefix_lines(block: &str, prefix: &str) -> String {
    let mut out = String::with_capacity(block.len() + block.len() / 8 + prefix.len());
    for line in block.split_inclusive('\n') {
        out.push_str(prefix);
        out.push_str(line);
    }
    out
}

/// `block`'s lines keeping only the values whose `keep` is true (the columns this node writes
/// of those the source sends). Values are tab-separated; a tab inside a value travels escaped.
pub fn keep_values(block: &str, keep: &[bool]) -> String {
    let mut out = String::with_capacity(block.len());
    for line in block.lines() {
        let kept: Vec<&str> = line.split('\t').zip(keep).filter(|(_, k)| **k).map(|(v, _)| v).collect();
        out.push_str(&kept.join("\t"));
        out.push('\n');
    }
    out
}

/// Whether every value of a type, printed as PostgreSQL prints it (`format_type` name), is
/// free of backslashes, tabs and line breaks, so it goes into COPY's text format unescaped.
pub fn prints_plain(ty: &str) -> bool {
    const PLAIN: [&str; 13] = [
        "smallint",
        "integer",
        "bigint",
        "real",
        "double precision",
        "numeric",
        "boolean",
        "date",
        "uuid",
        "oid",
        "timestamp",
        "time",
        "interval",
    ];
    let base = ty.split('(').next().unwrap_or(ty).trim();
    PLAIN.iter().any(|p| base == *p || (base.starts_with(p) && base[p.len()..].starts_with(" with")))
}

/// The vector to catch up from: what the source holds (`have`), lowered for each origin below
/// the first change whose register it has not folded (`unfolded`: origin -> lowest such
/// number) and, for the source's own origin `me`, to the local prefix folded (`folded`).
pub fn start_vector(
    have: &BTreeMap<Uuid, i64>,
    unfolded: &BTreeMap<Uuid, i64>,
    me: Uuid,
    folded: i64,
) -> BTreeMap<Uuid, i64> {
    have.iter()
        .map(|(o, n)| {
            let mut n = *n;
            if let Some(u) = unfolded.get(o) {
                n = n.min(u - 1);
            }
            if *o == me {
                n = n.min(folded);
            }
            (*o, n.max(0))
        })
        .filter(|(_, n)| *n > 0)
        .collect()
}

/// Whether a new node copies from a source whose log holds `logged` changes (and `pruned`:
/// deleted some; `shared`: its tables hold rows no log holds) rather than replaying that log:
/// it must when changes are gone or were never logged, and copying pays from `copy_from`
/// changes on (a copy refuses local writes while it runs; a replay does not, and for a short
/// log it is as quick).
pub fn worth_copying(logged: i64, pruned: bool, shared: bool, copy_from: i64) -> bool {
    pruned || shared || logged >= copy_from
}

/// Per origin the greater of the two vectors.
pub fn cover(a: &BTreeMap<Uuid, i64>, b: &BTreeMap<Uuid, i64>) -> BTreeMap<Uuid, i64> {
    let mut out = a.clone();
    for (o, n) in b {
        let e = out.entry(*o).or_insert(0);
        *e = (*e).max(*n);
    }
    out
}

/// The origins (with their numbers) `ours` holds beyond `theirs`: what a source lacks that a
/// node rejoining from it would lose by replacing its data.
pub fn lacking(theirs: &BTreeMap<Uuid, i64>, ours: &BTreeMap<Uuid, i64>) -> BTreeMap<Uuid, i64> {
    ours.iter().filter(|(o, n)| theirs.get(o).copied().unwrap_or(0) < **n).map(|(o, n)| (*o, *n)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ids() -> (Uuid, Uuid, Uuid) {
        (Uuid::from_u128(1), Uuid::from_u128(2), Uuid::from_u128(3))
    }

    #[test]
    fn start_vector_stops_below_what_is_not_folded() {
        let (me, b, c) = ids();
        let have = BTreeMap::from([(me, 50), (b, 40), (c, 7)]);
        let unfolded = BTreeMap::from([(b, 31)]);
        let from = start_vector(&have, &unfolded, me, 45);
        assert_eq!(from, BTreeMap::from([(me, 45), (b, 30), (c, 7)]));
        // Nothing folded of an origin: it is caught up from its start.
        let from = start_vector(&have, &BTreeMap::from([(c, 1)]), me, 50);
        assert_eq!(from, BTreeMap::from([(me, 50), (b, 40)]));
    }

    #[test]
    fn asks_travel_tagged() {
        let ask = Ask::Rows { table: "public.t".into(), after: Some(vec!["7".into()]), limit: 10, format: 2 };
        let text = serde_json::to_string(&ask).unwrap();
        assert_eq!(text, r#"{"ask":"rows","table":"public.t","after":["7"],"limit":10,"format":2}"#);
        assert_eq!(serde_json::from_str::<Ask>(&text).unwrap(), ask);
        assert_eq!(serde_json::from_str::<Ask>(r#"{"ask":"manifest"}"#).unwrap(), Ask::Manifest);
        assert!(serde_json::from_str::<Ask>(r#"{"ask":"everything"}"#).is_err());
    }

    #[test]
    fn a_rows_page_splits_into_its_head_and_blocks() {
        let page = "{\"n\":2,\"last\":[\"2\"]}\n1\ta\\\\.\n2\t\\N\n\\.\n{\"id\": 1}\t[]\t\\N\n\\.\n";
        let p = split_rows_page(page).unwrap();
        assert_eq!(p.head.n, 2);
        assert_eq!(p.head.last, Some(serde_json::json!(["2"])));
        assert_eq!(p.rows, "1\ta\\\\.\n2\t\\N\n", "an escaped backslash before a dot is a value");
        assert_eq!(p.registers, "{\"id\": 1}\t[]\t\\N\n");
        let empty = split_rows_page("{\"n\":0}\n\\.\n\\.\n").unwrap();
        assert_eq!((empty.head.n, empty.rows, empty.registers), (0, "", ""));
        // Cut short, miscounted, or an older source's JSON page: refused.
        assert!(split_rows_page(&page[..page.len() - 3]).is_err());
        assert!(split_rows_page(&page.replace("\"n\":2", "\"n\":3")).is_err());
        assert!(split_rows_page("{\"n\":1,\"pk\":[\"x\"]}").is_err());
        assert_eq!(page_head("{\"n\":5,\"last\":\"k\"}").unwrap().n, 5, "a tombstones page is its head");
    }

    #[test]
    fn lines_take_a_prefix_and_lose_values() {
        assert_eq!(prefix_lines("a\tb\nc\td\n", "42\t"), "42\ta\tb\n42\tc\td\n");
        assert_eq!(prefix_lines("", "42\t"), "");
        let keep = [true, false, true];
        assert_eq!(keep_values("1\tx\\ty\t3\n4\t\\N\t6\n", &keep), "1\t3\n4\t6\n");
    }

    #[test]
    fn only_types_that_print_plain_skip_escaping() {
        for ty in
            ["integer", "bigint", "numeric(12,2)", "timestamp(3) with time zone", "time without time zone", "uuid"]
        {
            assert!(prints_plain(ty), "{ty}");
        }
        for ty in ["text", "character(84)", "jsonb", "bytea", "integer[]", "integer_ish", "interval day", "\"time\""] {
            assert!(!prints_plain(ty), "{ty}");
        }
    }

    #[test]
    fn a_new_node_copies_a_long_or_pruned_log_and_replays_a_short_one() {
        assert!(!worth_copying(99, false, false, 100));
        assert!(worth_copying(100, false, false, 100));
        assert!(worth_copying(1, true, false, 100));
        assert!(worth_copying(0, false, true, 100), "rows no log holds");
        assert!(worth_copying(0, false, false, 0));
    }

    #[test]
    fn lacking_names_what_only_we_hold() {
        let (me, b, c) = ids();
        let theirs = BTreeMap::from([(me, 10), (b, 5)]);
        let ours = BTreeMap::from([(me, 12), (b, 5), (c, 1)]);
        assert_eq!(lacking(&theirs, &ours), BTreeMap::from([(me, 12), (c, 1)]));
        assert!(lacking(&ours, &theirs).is_empty());
    }

    proptest! {
        /// The start vector never claims more than the source holds, nor anything not folded.
        #[test]
        fn start_vector_is_below_have_and_unfolded(
            have in proptest::collection::btree_map(0u128..5, 0i64..100, 0..5),
            unfolded in proptest::collection::btree_map(0u128..5, 1i64..100, 0..5),
            folded in 0i64..100,
        ) {
            let have: BTreeMap<Uuid, i64> = have.into_iter().map(|(k, v)| (Uuid::from_u128(k), v)).collect();
            let unfolded: BTreeMap<Uuid, i64> = unfolded.into_iter().map(|(k, v)| (Uuid::from_u128(k), v)).collect();
            let me = Uuid::from_u128(0);
            let from = start_vector(&have, &unfolded, me, folded);
            for (o, n) in &from {
                prop_assert!(*n <= have[o]);
                prop_assert!(unfolded.get(o).is_none_or(|u| n < u));
                prop_assert!(*o != me || *n <= folded);
            }
        }
    }
}
