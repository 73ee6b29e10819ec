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

/// What a joiner asks `/v1/snapshot` for.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "ask", rename_all = "snake_case")]
pub enum Ask {
    /// The tables and the vector to catch up from.
    Manifest,
    /// Up to `limit` rows of `table` after key `after` (the key columns' text, in key order),
    /// each with its register.
    Rows { table: String, after: Option<Vec<String>>, limit: i64 },
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
    pub tables: Vec<TableInfo>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Finish {
    /// Covers every change a page may have shown (`cover`).
    pub upto: BTreeMap<Uuid, i64>,
    /// The source's hybrid logical clock, which the joiner's clock passes.
    pub hlc: i64,
}

/// What the joiner reads of a page; the rest (`c.<column>`, `versions`, `life`) goes to SQL as text.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct PageHead {
    /// Rows (or tombstones) in the page; fewer than asked: the table (or phase) is done.
    pub n: i64,
    /// The key to ask after next: the last row's key columns as text, or its `sync_rows.pk`.
    #[serde(default)]
    pub last: Option<Value>,
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
        let ask = Ask::Rows { table: "public.t".into(), after: Some(vec!["7".into()]), limit: 10 };
        let text = serde_json::to_string(&ask).unwrap();
        assert_eq!(text, r#"{"ask":"rows","table":"public.t","after":["7"],"limit":10}"#);
        assert_eq!(serde_json::from_str::<Ask>(&text).unwrap(), ask);
        assert_eq!(serde_json::from_str::<Ask>(r#"{"ask":"manifest"}"#).unwrap(), Ask::Manifest);
        assert!(serde_json::from_str::<Ask>(r#"{"ask":"everything"}"#).is_err());
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
