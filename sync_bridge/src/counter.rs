//! Counter columns (stock levels, balances, points): every node adds each remote change's delta
//! (new minus old) to its own value, so concurrent `-3` and `-5` from 100 end at 92 everywhere.
//!
//! Values are JSON numbers as PostgreSQL prints integers and `numeric` (no exponent); the
//! arithmetic is exact, on up to 38 significant digits.
//!
//! A row of a counter table has **lives**: an INSERT begins one, a DELETE ends it. Each change
//! belongs to the latest life its writer had seen (the greatest INSERT of the row in its causal
//! past, in last-writer order), which is the life the writer's own row was in. A node keeps,
//! per row, only the greatest life it knows ([`Life`]): its INSERT's counter values plus the
//! delta of every UPDATE of that life, each counted once. So the counters of a row are a
//! function of the set of changes, whatever the order they arrive in, and:
//! - concurrent UPDATEs of one life add up (100, then -3 and -5 on two nodes: 92);
//! - a DELETE ends its life for every change of it, even a concurrent UPDATE with a later clock
//!   (the update is counted into a life that is gone);
//! - an INSERT after a DELETE (the key reused) begins a new life that no change of the old
//!   one reaches; of two concurrent INSERTs, the later in last-writer order stands.
//!
//! The other columns of the row are decided by the table's strategy over the versions of the
//! current life (`resolve`); the caller keeps no version of an earlier life in the register.

use crate::hlc::Hlc;
use crate::resolve::{Image, Row, Version};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use uuid::Uuid;

/// An exact decimal: `mantissa / 10^scale`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Decimal {
    mantissa: i128,
    scale: u32,
}

impl Decimal {
    fn parse(text: &str) -> Option<Decimal> {
        let (negative, digits) = match text.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
        if int.is_empty() || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
            return None;
        }
        let mut mantissa: i128 = 0;
        for b in int.bytes().chain(frac.bytes()) {
            mantissa = mantissa.checked_mul(10)?.checked_add((b - b'0') as i128)?;
        }
        Some(Decimal { mantissa: if negative { -mantissa } else { mantissa }, scale: frac.len() as u32 })
    }

    fn rescale(self, scale: u32) -> Option<Decimal> {
        let factor = 10i128.checked_pow(scale - self.scale)?;
        Some(Decimal { mantissa: self.mantissa.checked_mul(factor)?, scale })
    }

    fn text(self) -> String {
        let digits = self.mantissa.unsigned_abs().to_string();
        let sign = if self.mantissa < 0 { "-" } else { "" };
        if self.scale == 0 {
            return format!("{sign}{digits}");
        }
        let padded = format!("{digits:0>width$}", width = self.scale as usize + 1);
        let (int, frac) = padded.split_at(padded.len() - self.scale as usize);
        format!("{sign}{int}.{frac}")
    }
}

/// `base + (new - old)`, exactly, at the greatest scale of the three (so `numeric` keeps its
/// digits). `None` when one of them is not a number or the result is out of range.
pub fn add_delta(base: &Value, new: &Value, old: &Value) -> Option<Value> {
    let [b, n, o] = [base, new, old].map(|v| v.as_number().and_then(|n| Decimal::parse(&n.to_string())));
    let (b, n, o) = (b?, n?, o?);
    let scale = b.scale.max(n.scale).max(o.scale);
    let (b, n, o) = (b.rescale(scale)?, n.rescale(scale)?, o.rescale(scale)?);
    let sum = b.mantissa.checked_add(n.mantissa.checked_sub(o.mantissa)?)?;
    serde_json::from_str(&Decimal { mantissa: sum, scale }.text()).ok()
}

/// Where a life began: its INSERT, ordered as last writer wins orders versions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Birth {
    pub h: u64,
    pub o: Uuid,
    pub s: i64,
    pub i: i32,
}

impl Birth {
    fn of(v: &Version) -> Birth {
        Birth { h: v.hlc.0, o: v.origin, s: v.seq, i: v.idx }
    }

    /// True when `v` was written with this INSERT already applied at its origin.
    fn seen_by(self, v: &Version) -> bool {
        let insert = Version {
            origin: self.o,
            seq: self.s,
            idx: self.i,
            hlc: Hlc(self.h),
            context: BTreeMap::new(),
            row: None,
            written: None,
        };
        v.dot() == insert.dot() || v.has_seen(&insert)
    }
}

/// The greatest life of one row a node knows, as `sync_rows.life` keeps it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Life {
    /// Its INSERT; `None`: the life the row had before any INSERT this node knows of (rows
    /// older than their tracking), which every INSERT follows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub b: Option<Birth>,
    /// The counter columns: the INSERT's values plus every delta counted since.
    pub v: Row,
    /// Ended by a DELETE.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub d: bool,
    /// Per origin, which of its changes to the row were counted: a change counts once.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub n: BTreeMap<Uuid, Tally>,
}

/// The changes of one origin a life has counted: all up to `u` (number, index) and those in
/// `a` above it. Changes come in number order from a remote origin, but this node's own are
/// counted as they commit, which may be out of order, until they are all below its prefix.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Tally {
    pub u: (i64, i32),
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub a: BTreeSet<(i64, i32)>,
}

/// What counting a change did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counted {
    /// Of an earlier life (or counted already): it does not touch the row.
    Earlier,
    /// Of the current life: the register decides the other columns.
    Current,
    /// An INSERT that begins a new life: it alone stands for the row.
    Born,
}

impl Life {
    /// Count change `v` (`old`: the event's old values; an UPDATE's changed columns), unless
    /// counted already. Changes must come in causal order, as causal delivery brings them.
    pub fn count(&mut self, v: &Version, old: Option<&Value>, counters: &BTreeSet<String>) -> Counted {
        let dot = (v.seq, v.idx);
        if self.n.get(&v.origin).is_some_and(|t| dot <= t.u || t.a.contains(&dot)) {
            return Counted::Earlier;
        }
        if v.is_insert() {
            let birth = Some(Birth::of(v));
            if birth <= self.b {
                return Counted::Earlier;
            }
            let row = v.row.as_deref();
            let values = counters.iter().filter_map(|c| Some((c.clone(), row?.get(c)?.clone()))).collect();
            *self = Life { b: birth, v: values, d: false, n: std::mem::take(&mut self.n) };
        } else if self.b.is_some_and(|b| !b.seen_by(v)) {
            return Counted::Earlier;
        } else if v.row.is_none() {
            self.d = true;
        } else {
            self.add(v, old, counters);
        }
        self.n.entry(v.origin).or_default().a.insert(dot);
        if v.is_insert() { Counted::Born } else { Counted::Current }
    }

    /// Every change of `origin` up to `upto` (number, index) has come (counted or not): they
    /// need not be listed one by one any more.
    pub fn settle(&mut self, origin: Uuid, upto: (i64, i32)) {
        let t = self.n.entry(origin).or_default();
        if upto > t.u {
            t.u = upto;
            t.a.retain(|d| *d > upto);
        }
    }

    /// Add an UPDATE's deltas. A column this life has no value for yet (the life older than
    /// this node's counting) starts from the update's new value.
    fn add(&mut self, v: &Version, old: Option<&Value>, counters: &BTreeSet<String>) {
        let (Some(new), Some(old)) = (v.row.as_deref(), old.and_then(Value::as_object)) else { return };
        for c in counters {
            let (Some(to), Some(from)) = (new.get(c), old.get(c)) else { continue };
            let value = match self.v.get(c) {
                Some(here) => add_delta(here, to, from),
                None => Some(to.clone()),
            };
            if let Some(value) = value {
                self.v.insert(c.clone(), value);
            }
        }
    }

    /// The row as it stands: gone when the life ended, else `decided` (the strategy's row over
    /// the current life's versions) with this life's counter values.
    pub fn overlay(&self, decided: Option<Image>) -> Option<Image> {
        if self.d {
            return None;
        }
        let mut row = decided?;
        for (c, value) in &self.v {
            if row.get(c) != Some(value) {
                Arc::make_mut(&mut row).insert(c.clone(), value.clone());
            }
        }
        Some(row)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn n(text: &str) -> Value {
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn deltas_add_exactly() {
        assert_eq!(add_delta(&n("97"), &n("95"), &n("100")), Some(n("92")));
        assert_eq!(add_delta(&n("0.10"), &n("0.25"), &n("0.05")), Some(n("0.30")));
        assert_eq!(add_delta(&n("1.5"), &n("-2"), &n("0")), Some(n("-0.5")));
        assert_eq!(add_delta(&n("-0.01"), &n("0"), &n("0")), Some(n("-0.01")));
        assert_eq!(add_delta(&n("5"), &n("null"), &n("3")), None);
        assert_eq!(add_delta(&n("999999999999999999999999999999999999999"), &n("1"), &n("0")), None);
        // Text shows the digits as PostgreSQL prints numeric.
        assert_eq!(add_delta(&n("10.00"), &n("1"), &n("1")).unwrap().to_string(), "10.00");
    }

    fn node(n: usize) -> Uuid {
        Uuid::from_u128(n as u128 + 1)
    }

    /// One node of a simulated mesh writing one row of a table whose `k` is a counter: it
    /// applies a change as `sync_apply` does (skip what the register saw, count it into the
    /// life, keep only the current life's versions in the register).
    #[derive(Clone, Default)]
    struct Node {
        register: crate::resolve::Register,
        life: Life,
        held: Vec<(Version, Option<Value>)>,
        seq: i64,
        clock: u64,
    }

    fn counters() -> BTreeSet<String> {
        BTreeSet::from(["k".to_string()])
    }

    impl Node {
        fn receive(&mut self, v: &Version, old: &Option<Value>) {
            // A change the register saw (the same, or one its origin numbered later) may still
            // bring a delta this life has not counted.
            let seen = self.register.versions().iter().any(|w| w.dot() == v.dot() || w.has_seen(v));
            let counted = self.life.count(v, old.as_ref(), &counters());
            self.life.settle(v.origin, (v.seq, v.idx));
            match counted {
                Counted::Earlier => {}
                Counted::Born => {
                    self.register = Default::default();
                    self.register.insert(v.clone());
                }
                Counted::Current if !seen => {
                    self.register.insert(v.clone());
                }
                Counted::Current => {}
            }
        }

        fn row(&self) -> Option<Image> {
            let decided = crate::resolve::resolve(crate::resolve::Strategy::Lww, &BTreeMap::new(), &self.register);
            self.life.overlay(decided.and_then(|r| r.row))
        }

        /// A local write on the row as this node shows it: an INSERT when it is absent; else
        /// `k = k + delta`, a change of `c`, or a DELETE.
        fn write(&mut self, me: usize, kind: u8, value: i64) -> (Version, Option<Value>) {
            let current = self.row();
            self.seq += 1;
            self.clock += 1 + (value as u64 % 3);
            let mut context = BTreeMap::new();
            for (v, _) in &self.held {
                let e = context.entry(v.origin).or_insert(0);
                *e = (*e).max(v.seq);
            }
            let (row, written, old) = match (current, kind % 4) {
                (None, _) => (Some(json!({"k": value, "c": value})), None, None),
                (Some(r), 0) => (None, None, Some(json!(*r))),
                (Some(r), 1) => {
                    let mut new = (*r).clone();
                    new.insert("c".into(), json!(value));
                    (Some(json!(new)), Some(["c"]), Some(json!({"c": r["c"]})))
                }
                (Some(r), _) => {
                    let mut new = (*r).clone();
                    let k = r["k"].as_i64().unwrap();
                    new.insert("k".into(), json!(k + value - 25));
                    (Some(json!(new)), Some(["k"]), Some(json!({"k": k})))
                }
            };
            let v = Version {
                origin: node(me),
                seq: self.seq,
                idx: 1,
                hlc: Hlc(self.clock),
                context,
                row: row.map(|r| Arc::new(r.as_object().unwrap().clone())),
                written: written.map(|w| w.iter().map(|c| c.to_string()).collect()),
            };
            self.receive(&v, &old);
            self.held.push((v.clone(), old.clone()));
            (v, old)
        }

        /// Take every change `from` holds that this node lacks, in the order `from` got them
        /// (so causally), and the first of them twice.
        fn pull(&mut self, from: &Node) {
            let mut again = None;
            for (v, old) in &from.held {
                if !self.held.iter().any(|(w, _)| w.dot() == v.dot()) {
                    self.clock = self.clock.max(v.hlc.0);
                    self.receive(v, old);
                    self.held.push((v.clone(), old.clone()));
                    again.get_or_insert((v.clone(), old.clone()));
                }
            }
            if let Some((v, old)) = again {
                self.receive(&v, &old);
            }
        }
    }

    /// Runs `steps` (write on a node, or one node pulls from another) on three nodes after an
    /// INSERT of k = 100 everyone has; then everyone pulls from everyone.
    fn mesh(steps: &[(u8, u8, u8, i64)]) -> (Vec<Node>, Vec<(Version, Option<Value>)>) {
        let mut nodes = vec![Node::default(), Node::default(), Node::default()];
        let mut all = vec![nodes[0].write(0, 0, 100)];
        for &(kind, a, b, value) in steps {
            let (a, b) = (a as usize % 3, b as usize % 3);
            if kind % 5 == 4 {
                if a != b {
                    let from = nodes[b].clone();
                    nodes[a].pull(&from);
                }
            } else {
                all.push(nodes[a].write(a, kind, value));
            }
        }
        for _ in 0..2 {
            for a in 0..3 {
                for b in 0..3 {
                    let from = nodes[b].clone();
                    nodes[a].pull(&from);
                }
            }
        }
        (nodes, all)
    }

    /// The counter the rules above give, from the whole set of changes: the greatest INSERT's
    /// value plus the delta of every UPDATE that had seen it; gone if a DELETE had seen it.
    fn expected(all: &[(Version, Option<Value>)]) -> Option<i64> {
        let birth = all.iter().filter(|(v, _)| v.is_insert()).map(|(v, _)| Birth::of(v)).max()?;
        let of_life: Vec<&(Version, Option<Value>)> =
            all.iter().filter(|(v, _)| !v.is_insert() && birth.seen_by(v)).collect();
        if of_life.iter().any(|(v, _)| v.row.is_none()) {
            return None;
        }
        let insert = all.iter().find(|(v, _)| Birth::of(v) == birth).unwrap();
        let base = insert.0.row.as_ref().unwrap()["k"].as_i64().unwrap();
        let deltas: i64 = of_life
            .iter()
            .filter_map(|(v, old)| Some(v.row.as_ref()?["k"].as_i64()? - old.as_ref()?.get("k")?.as_i64()?))
            .sum();
        Some(base + deltas)
    }

    #[test]
    fn concurrent_decrements_add_up_and_a_delete_ends_the_life() {
        // 100; -3 on node 1 and -5 on node 2, concurrently: 92 everywhere.
        let (nodes, _) = mesh(&[(4, 1, 0, 0), (4, 2, 0, 0), (2, 1, 0, 22), (2, 2, 0, 20)]);
        for n in &nodes {
            assert_eq!(n.row().unwrap()["k"], json!(92));
        }
        // Node 1 deletes and inserts the key again (k = 7) while node 2 adds 10 to the old row:
        // the new life stands, without node 2's +10.
        let (nodes, _) = mesh(&[(4, 1, 0, 0), (4, 2, 0, 0), (0, 1, 0, 0), (0, 1, 0, 7), (2, 2, 0, 35)]);
        for n in &nodes {
            assert_eq!(n.row().unwrap()["k"], json!(7));
        }
        // A later +1 on node 1 (in the new life) reaches everyone once: 8.
        let (nodes, _) = mesh(&[(4, 1, 0, 0), (4, 2, 0, 0), (0, 1, 0, 0), (0, 1, 0, 7), (2, 2, 0, 35), (2, 1, 0, 26)]);
        for n in &nodes {
            assert_eq!(n.row().unwrap()["k"], json!(8));
        }
        // A delete concurrent with an update that has a later clock: the row is gone.
        let (nodes, _) = mesh(&[(4, 1, 0, 0), (4, 2, 0, 0), (0, 1, 0, 0), (2, 2, 0, 50)]);
        assert!(nodes.iter().all(|n| n.row().is_none()));
    }

    /// This node's own transactions commit, and are counted, out of their number order: each
    /// counts once, before and after the prefix passes them.
    #[test]
    fn own_changes_count_once_in_any_commit_order() {
        let me = node(0);
        let change = |seq: i64, hlc: u64, k: i64| {
            let v = Version {
                origin: me,
                seq,
                idx: 1,
                hlc: Hlc(hlc),
                context: BTreeMap::new(),
                row: Some(Arc::new(json!({"k": k + 1}).as_object().unwrap().clone())),
                written: Some(BTreeSet::from(["k".to_string()])),
            };
            (v, json!({"k": k}))
        };
        let mut life = Life { v: json!({"k": 10}).as_object().unwrap().clone(), ..Life::default() };
        let (ten, nine) = (change(10, 5, 10), change(9, 6, 11));
        assert_eq!(life.count(&ten.0, Some(&ten.1), &counters()), Counted::Current);
        assert_eq!(life.count(&nine.0, Some(&nine.1), &counters()), Counted::Current);
        assert_eq!(life.count(&ten.0, Some(&ten.1), &counters()), Counted::Earlier);
        life.settle(me, (10, i32::MAX));
        assert!(life.n[&me].a.is_empty());
        assert_eq!(life.count(&nine.0, Some(&nine.1), &counters()), Counted::Earlier);
        assert_eq!(life.v["k"], json!(12));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]
        /// Three nodes writing one counter row (updates, deletes, the key inserted again),
        /// syncing in random patterns, relays and duplicates included: once all have
        /// everything they show the same row, and its counter is the one the rules give.
        #[test]
        fn lives_converge_on_the_counter_the_rules_give(
            steps in prop::collection::vec((0u8..5, 0u8..3, 0u8..3, 0i64..50), 1..40),
        ) {
            let (nodes, all) = mesh(&steps);
            let want = expected(&all);
            for n in &nodes {
                prop_assert_eq!(n.row(), nodes[0].row());
                prop_assert_eq!(n.row().map(|r| r["k"].as_i64().unwrap()), want);
            }
        }

        /// Deltas applied in any order give the same value: the sum of all of them.
        #[test]
        fn the_order_of_deltas_does_not_matter(
            start in -1_000_000i64..1_000_000,
            deltas in prop::collection::vec((-10_000i64..10_000, 0u32..3), 1..8),
        ) {
            let dec = |v: i64, s: u32| n(&Decimal { mantissa: v as i128, scale: s }.text());
            let apply = |order: &[(i64, u32)]| {
                order.iter().fold(dec(start, 0), |acc, (d, s)| add_delta(&acc, &dec(*d, *s), &dec(0, 0)).unwrap())
            };
            let mut reversed = deltas.clone();
            reversed.reverse();
            let (a, b) = (apply(&deltas), apply(&reversed));
            prop_assert_eq!(Decimal::parse(&a.to_string()).map(|d| d.mantissa * 10i128.pow(3 - d.scale)),
                            Decimal::parse(&b.to_string()).map(|d| d.mantissa * 10i128.pow(3 - d.scale)));
        }
    }
}
