//! Checking that two nodes hold the same rows (`sync_verify`): the messages of `/v1/verify`
//! and the descent that finds the rows that differ without moving the tables.
//!
//! Each row sits in a bucket named by its key's hash (hex digits, so a bucket of `d` digits
//! splits into 16 of `d + 1`), and each side sums a bucket up as its row count and the xor
//! of its rows' hashes. Both sides compute the same buckets from their own rows, so only the
//! buckets travel. The descent asks for every bucket at a depth where buckets hold about
//! [`LIST_AT`] rows (at most [`FIRST_DEPTH_MAX`] digits); buckets that agree are done, a
//! bucket that differs is split one digit further (two when its rows call for it), or, once
//! it holds at most [`LIST_AT`] rows on either side, listed row by row (key and hash). Two
//! tables that agree cost one round trip; a few differing rows in ten million cost three.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use uuid::Uuid;

/// A differing bucket with at most this many rows on each side is listed row by row.
pub const LIST_AT: i64 = 1_000;
/// The first round asks for at most 16^this buckets.
pub const FIRST_DEPTH_MAX: usize = 3;
/// Digits of a key hash: a bucket this deep is listed whatever it holds.
pub const HASH_DIGITS: usize = 32;

/// What a node asks a peer's `/v1/verify` about one tracked table (and computes itself).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "ask", rename_all = "snake_case")]
pub enum Ask {
    /// Every non-empty bucket of `depth` digits under each prefix of `under` (all shorter).
    Buckets { table: String, depth: usize, under: Vec<String> },
    /// Each row's key and hash, for the rows in the buckets `under`.
    Rows { table: String, under: Vec<String> },
    /// The captured columns of the rows with these keys (`sync_rows.pk` text).
    Values { table: String, keys: Vec<String> },
}

impl Ask {
    pub fn table(&self) -> &str {
        match self {
            Ask::Buckets { table, .. } | Ask::Rows { table, .. } | Ask::Values { table, .. } => table,
        }
    }
}

/// A bucket summed up: its rows and the xor of their hashes.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Bucket {
    pub n: i64,
    pub x: i64,
}

/// The answer to an [`Ask`], with the have-vector of the node when it computed it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Answer {
    pub have: BTreeMap<Uuid, i64>,
    #[serde(default)]
    pub buckets: BTreeMap<String, Bucket>,
    /// Key -> row hash.
    #[serde(default)]
    pub rows: BTreeMap<String, String>,
    /// Key -> captured columns; a key whose row is absent is left out.
    #[serde(default)]
    pub values: BTreeMap<String, Value>,
}

/// How a row differs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Here, not at the peer.
    OnlyHere,
    /// At the peer, not here.
    OnlyThere,
    /// On both, with different values.
    Differs,
}

/// What the descent found.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Outcome {
    pub rows_here: i64,
    pub rows_there: i64,
    /// Keys of the rows that differ, in key order.
    pub differing: BTreeMap<String, Kind>,
    pub round_trips: u32,
}

/// Digits of the first round: the fewest that bring buckets down to about `LIST_AT` rows.
pub fn first_depth(rows: i64) -> usize {
    let mut depth = 1;
    let mut per_bucket = rows.max(0) / 16;
    while per_bucket > LIST_AT && depth < FIRST_DEPTH_MAX {
        depth += 1;
        per_bucket /= 16;
    }
    depth
}

fn size(buckets: &BTreeMap<String, Bucket>, name: &str) -> i64 {
    buckets.get(name).map_or(0, |b| b.n)
}

/// The depth to split `count` differing buckets into, the largest holding `largest` rows:
/// two digits at once when one would leave buckets too large to list and the answer stays
/// small (a table whose size was misjudged, e.g. never analysed).
fn next_depth(depth: usize, largest: i64, count: usize) -> usize {
    let step = if largest / 16 > LIST_AT && count <= 256 { 2 } else { 1 };
    (depth + step).min(HASH_DIGITS)
}

/// The buckets that differ, split into those to descend into and those to list.
fn differing_buckets(
    here: &BTreeMap<String, Bucket>,
    there: &BTreeMap<String, Bucket>,
    depth: usize,
) -> (Vec<String>, Vec<String>) {
    let (mut descend, mut list) = (Vec::new(), Vec::new());
    let names: BTreeSet<&String> = here.keys().chain(there.keys()).collect();
    for name in names {
        let (h, t) = (here.get(name).copied().unwrap_or_default(), there.get(name).copied().unwrap_or_default());
        if h == t {
            continue;
        }
        if h.n.max(t.n) <= LIST_AT || depth >= HASH_DIGITS {
            list.push(name.clone());
        } else {
            descend.push(name.clone());
        }
    }
    (descend, list)
}

/// The rows of two listings that differ.
pub fn differing_rows(here: &BTreeMap<String, String>, there: &BTreeMap<String, String>) -> BTreeMap<String, Kind> {
    let mut out = BTreeMap::new();
    for (k, h) in here {
        match there.get(k) {
            None => {
                out.insert(k.clone(), Kind::OnlyHere);
            }
            Some(t) if t != h => {
                out.insert(k.clone(), Kind::Differs);
            }
            Some(_) => {}
        }
    }
    for k in there.keys().filter(|k| !here.contains_key(*k)) {
        out.insert(k.clone(), Kind::OnlyThere);
    }
    out
}

/// The rows that differ between two rows' values (after a descent, to check again).
pub fn differing_values(
    keys: impl IntoIterator<Item = String>,
    here: &BTreeMap<String, Value>,
    there: &BTreeMap<String, Value>,
) -> BTreeMap<String, Kind> {
    let mut out = BTreeMap::new();
    for k in keys {
        let kind = match (here.get(&k), there.get(&k)) {
            (Some(h), Some(t)) if h == t => continue,
            (None, None) => continue,
            (Some(_), Some(_)) => Kind::Differs,
            (Some(_), None) => Kind::OnlyHere,
            (None, Some(_)) => Kind::OnlyThere,
        };
        out.insert(k, kind);
    }
    out
}

/// A have-vector without its origins at 0 (held up to nothing is the same as not listed).
fn held(v: &BTreeMap<Uuid, i64>) -> Vec<(Uuid, i64)> {
    v.iter().filter(|(_, n)| **n > 0).map(|(o, n)| (*o, *n)).collect()
}

/// Whether two nodes hold the same changes (equal have-vectors, origins at 0 aside).
pub fn same_holdings(a: &BTreeMap<Uuid, i64>, b: &BTreeMap<Uuid, i64>) -> bool {
    held(a) == held(b)
}

/// Whether two nodes' rows, read again round after round, can be told apart from changes still
/// on their way: both nodes held the same changes (equal have-vectors, origins at 0 aside)
/// when this round's rows were read, and the same ones a round earlier. A node reads its
/// have-vector just before its rows, so an unchanged vector across two rounds means no change
/// came in while this round's rows were read.
#[derive(Debug, Default)]
pub struct Settle {
    previous: Option<Vec<(Uuid, i64)>>,
}

impl Settle {
    /// Record one round's have-vectors; true when the round's rows are comparable.
    pub fn round(&mut self, here: &BTreeMap<Uuid, i64>, there: &BTreeMap<Uuid, i64>) -> bool {
        let now = same_holdings(here, there).then(|| held(here));
        let settled = now.is_some() && now == self.previous;
        self.previous = now;
        settled
    }
}

/// Find the rows of `table` that differ between here and a peer. `both` answers an ask here
/// and at the peer (one round trip); `estimate` is about how many rows the table holds.
pub fn descend<E>(
    table: &str,
    estimate: i64,
    mut both: impl FnMut(&Ask) -> Result<(Answer, Answer), E>,
) -> Result<Outcome, E> {
    let mut out = Outcome::default();
    let mut depth = first_depth(estimate);
    let mut under = vec![String::new()];
    while !under.is_empty() {
        let (h, t) = both(&Ask::Buckets { table: table.into(), depth, under: std::mem::take(&mut under) })?;
        out.round_trips += 1;
        if out.round_trips == 1 {
            out.rows_here = h.buckets.values().map(|b| b.n).sum();
            out.rows_there = t.buckets.values().map(|b| b.n).sum();
        }
        let (descend, list) = differing_buckets(&h.buckets, &t.buckets, depth);
        if !list.is_empty() {
            let (h, t) = both(&Ask::Rows { table: table.into(), under: list })?;
            out.round_trips += 1;
            out.differing.extend(differing_rows(&h.rows, &t.rows));
        }
        let largest = descend.iter().map(|b| size(&h.buckets, b).max(size(&t.buckets, b))).max().unwrap_or(0);
        depth = next_depth(depth, largest, descend.len());
        under = descend;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use sha2::{Digest, Sha256};

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// A side that keeps its rows in memory (key -> value) and answers as the SQL side does,
    /// with SHA-256 in place of md5.
    fn answer(rows: &BTreeMap<String, String>, ask: &Ask) -> Answer {
        let key_hash = |k: &str| hex(&Sha256::digest(k.as_bytes()));
        let row_hash = |k: &str, v: &str| hex(&Sha256::digest(format!("{k}={v}").as_bytes()))[..16].to_string();
        let mut a = Answer::default();
        match ask {
            Ask::Buckets { depth, under, .. } => {
                for (k, v) in rows {
                    let h = key_hash(k);
                    if under.iter().any(|p| h.starts_with(p.as_str())) {
                        let b = a.buckets.entry(h[..*depth].to_string()).or_default();
                        b.n += 1;
                        b.x ^= u64::from_str_radix(&row_hash(k, v), 16).unwrap() as i64;
                    }
                }
            }
            Ask::Rows { under, .. } => {
                for (k, v) in rows {
                    if under.iter().any(|p| key_hash(k).starts_with(p.as_str())) {
                        a.rows.insert(k.clone(), row_hash(k, v));
                    }
                }
            }
            Ask::Values { keys, .. } => {
                for k in keys {
                    if let Some(v) = rows.get(k) {
                        a.values.insert(k.clone(), Value::String(v.clone()));
                    }
                }
            }
        }
        a
    }

    fn compare(here: &BTreeMap<String, String>, there: &BTreeMap<String, String>) -> Outcome {
        descend("t", here.len() as i64, |ask| Ok::<_, ()>((answer(here, ask), answer(there, ask)))).unwrap()
    }

    fn table(n: usize) -> BTreeMap<String, String> {
        (0..n).map(|i| (format!("{{\"id\": {i}}}"), format!("row {i}"))).collect()
    }

    #[test]
    fn first_depth_keeps_buckets_near_the_listing_size_and_the_first_answer_small() {
        assert_eq!(first_depth(0), 1);
        assert_eq!(first_depth(16_000), 1);
        assert_eq!(first_depth(16_016), 2);
        assert_eq!(first_depth(256_000), 2);
        assert_eq!(first_depth(10_000_000), 3);
        assert_eq!(first_depth(i64::MAX), FIRST_DEPTH_MAX);
    }

    #[test]
    fn tables_that_agree_cost_one_round_trip() {
        let t = table(50_000);
        let out = compare(&t, &t);
        assert_eq!((out.round_trips, out.rows_here, out.rows_there), (1, 50_000, 50_000));
        assert!(out.differing.is_empty());
    }

    #[test]
    fn a_few_differences_in_a_large_table_cost_a_few_round_trips() {
        let here = table(200_000);
        let mut there = here.clone();
        there.insert("{\"id\": 17}".into(), "changed".into());
        there.remove("{\"id\": 99999}");
        there.insert("{\"id\": -1}".into(), "new".into());
        let out = compare(&here, &there);
        let expected: BTreeMap<String, Kind> = [
            ("{\"id\": -1}".to_string(), Kind::OnlyThere),
            ("{\"id\": 17}".to_string(), Kind::Differs),
            ("{\"id\": 99999}".to_string(), Kind::OnlyHere),
        ]
        .into();
        assert_eq!(out.differing, expected);
        assert!(out.round_trips <= 4, "{} round trips", out.round_trips);
    }

    #[test]
    fn a_misjudged_size_still_costs_few_round_trips() {
        let here = table(300_000);
        let mut there = here.clone();
        there.insert("{\"id\": 5}".into(), "changed".into());
        let out = descend("t", 0, |ask| Ok::<_, ()>((answer(&here, ask), answer(&there, ask)))).unwrap();
        assert_eq!(out.differing.len(), 1);
        assert!(out.round_trips <= 3, "{} round trips", out.round_trips);
    }

    #[test]
    fn rows_are_settled_after_two_rounds_with_one_vector_on_both_nodes() {
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let v = |x: i64, y: i64| BTreeMap::from([(a, x), (b, y)]);
        let mut s = Settle::default();
        assert!(!s.round(&v(3, 4), &v(3, 4)), "one round proves nothing");
        assert!(s.round(&v(3, 4), &v(3, 4)));
        assert!(!s.round(&v(3, 5), &v(3, 4)), "a change on its way");
        assert!(!s.round(&v(3, 5), &v(3, 5)), "arrived since the last round");
        assert!(s.round(&v(3, 5), &BTreeMap::from([(a, 3), (b, 5), (Uuid::from_u128(3), 0)])), "origins at 0 aside");
    }

    #[test]
    fn differing_values_names_each_kind_and_skips_equal_rows() {
        let here: BTreeMap<String, Value> =
            [("a".into(), json!(1)), ("b".into(), json!(2)), ("c".into(), json!(3))].into();
        let there: BTreeMap<String, Value> =
            [("b".into(), json!(2)), ("c".into(), json!(4)), ("d".into(), json!(5))].into();
        let keys = ["a", "b", "c", "d", "e"].map(String::from);
        let expected: BTreeMap<String, Kind> =
            [("a".into(), Kind::OnlyHere), ("c".into(), Kind::Differs), ("d".into(), Kind::OnlyThere)].into();
        assert_eq!(differing_values(keys, &here, &there), expected);
    }

    use serde_json::json;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Whatever the two sides hold, the descent finds exactly the keys whose rows differ.
        #[test]
        fn the_descent_finds_exactly_the_differing_rows(
            here in proptest::collection::btree_map("[a-z]{1,3}", "[0-9]{1,2}", 0..3000),
            edits in proptest::collection::vec(("[a-z]{1,3}", proptest::option::of("[0-9]{1,2}")), 0..40),
        ) {
            let mut there = here.clone();
            for (k, v) in edits {
                match v {
                    Some(v) => { there.insert(k, v); }
                    None => { there.remove(&k); }
                }
            }
            let out = compare(&here, &there);
            prop_assert_eq!(out.differing, differing_rows(&here, &there));
            prop_assert_eq!((out.rows_here, out.rows_there), (here.len() as i64, there.len() as i64));
        }
    }
}
