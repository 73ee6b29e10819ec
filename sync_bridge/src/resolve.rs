//! Who wins: the documented rules that decide what a row looks like, given the versions of it
//! a node holds (`resolve`), and how races on unique values and foreign keys end
//! (`unique_keeps`, `Orphan`). Pure, so that they can be property-tested without PostgreSQL;
//! `sync_apply` loads a row's versions, calls them, and writes the result.
//!
//! A **version** is one change to one row: its dot `(origin, seq, idx)`, its hybrid logical
//! clock, and its causal context (what its origin held of every other origin when it wrote).
//!
//! Version `a` **has seen** version `b` when `a` was written with `b` already applied at `a`'s
//! origin: for the same origin, `a` came later (greater clock); for different origins,
//! `a.context[b.origin] >= b.seq`. With causal delivery (a node applies a change only once it
//! holds the change's context) this is happened-before, a strict partial order.
//!
//! A node keeps, per row, the **causally maximal** versions (those no other version has seen):
//! a multi-value register. Inserting versions in any order gives the same set, and the visible
//! row is a deterministic function of that set, so every node that holds the same changes
//! shows the same row, whatever the order they arrived in (DESIGN.md invariant 4). Only when
//! the set holds more than one version with different content is there a conflict.
//!
//! The order used to break every tie is "last writer wins": greatest `(hlc, origin, seq, idx)`.
//! Because a node raises its clock past every change it applies, a version that has seen
//! another also has the greater clock, so this order agrees with causality.
//!
//! Strategies, over the maximal set `M`:
//! - `lww`: the last writer in `M`; if it is a delete, the row is gone.
//! - `field_merge`: if the last writer in `M` is a delete, the row is gone; otherwise each
//!   column takes the value of the last writer in `M` that wrote that column (an INSERT
//!   writes every column), or the last writer's value when none did.
//! - `node_priority`: the versions in `M` from the highest-priority origin, then the last
//!   writer among them; if it is a delete, the row is gone.
//! - `custom`: as `lww` here; on a conflict the caller asks the table's resolver function.
//! - `manual`: as `lww`, and every conflict is left for review.
//!
//! A delete concurrent with an update is therefore decided like any other pair of versions;
//! an update the delete has seen can never bring the row back (it is not in `M`).

use crate::hlc::Hlc;
use serde_json::{Map, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use uuid::Uuid;

pub type Row = Map<String, Value>;

/// A row image, shared: one image is held by the event, the register, the conflict record and
/// the write, so it is counted, not copied.
pub type Image = Arc<Row>;

#[derive(Clone, Debug, PartialEq)]
pub struct Version {
    pub origin: Uuid,
    pub seq: i64,
    pub idx: i32,
    pub hlc: Hlc,
    /// What the origin held of each other origin when it wrote (its own entry is ignored).
    pub context: BTreeMap<Uuid, i64>,
    /// The full row after the change; `None` for a delete.
    pub row: Option<Image>,
    /// The columns an UPDATE changed; `None`: every column (an INSERT, or a delete).
    pub written: Option<BTreeSet<String>>,
}

impl Version {
    /// A whole row written (an INSERT), not an update of some columns nor a delete.
    pub fn is_insert(&self) -> bool {
        self.row.is_some() && self.written.is_none()
    }

    pub fn dot(&self) -> (Uuid, i64, i32) {
        (self.origin, self.seq, self.idx)
    }

    /// True when this change wrote `column`.
    pub fn wrote(&self, column: &str) -> bool {
        self.written.as_ref().is_none_or(|w| w.contains(column))
    }

    /// The last-writer-wins order: greater is later.
    pub fn lww_key(&self) -> (Hlc, Uuid, i64, i32) {
        (self.hlc, self.origin, self.seq, self.idx)
    }

    /// True when `self` was written with `other` already applied at `self`'s origin.
    pub fn has_seen(&self, other: &Version) -> bool {
        if self.origin == other.origin {
            // One origin writes one row in a single sequence (row locks), in clock order.
            self.lww_key() > other.lww_key()
        } else {
            self.context.get(&other.origin).is_some_and(|held| *held >= other.seq)
        }
    }
}

/// True when a version written at `origin` with causal context `context` has seen every event
/// of a node that holds `held` (per origin, the highest number held, all of them held up to
/// it, as causal delivery keeps them): then it has seen every version of every row that node
/// keeps, and a row's register need not be read to know that this version alone remains.
/// The version's own origin is skipped: its earlier events are seen by definition.
pub fn saw_everything(origin: Uuid, context: &BTreeMap<Uuid, i64>, held: &BTreeMap<Uuid, i64>) -> bool {
    held.iter().all(|(o, n)| *o == origin || *n <= 0 || context.get(o).is_some_and(|c| c >= n))
}

/// The causally maximal versions of one row.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Register {
    versions: Vec<Version>,
}

impl Register {
    pub fn versions(&self) -> &[Version] {
        &self.versions
    }

    /// Add a version. Returns false (and changes nothing) when it is already known or some
    /// held version has seen it; otherwise drops the versions it has seen and keeps it.
    pub fn insert(&mut self, v: Version) -> bool {
        if self.versions.iter().any(|w| w.dot() == v.dot() || w.has_seen(&v)) {
            return false;
        }
        self.versions.retain(|w| !v.has_seen(w));
        self.versions.push(v);
        // A canonical order, so equal sets compare and serialise equal.
        self.versions.sort_by_key(|w| w.lww_key());
        true
    }

    /// The last writer among the held versions.
    pub fn last_writer(&self) -> Option<&Version> {
        self.versions.last()
    }
}

/// A table's conflict strategy, as `sync_tables.strategy` and `sync_set_strategy()` name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    Lww,
    FieldMerge,
    /// By the priority of each origin (greater wins; origins not listed have priority 0).
    NodePriority,
    /// A user function merges the concurrent rows; decided here as `Lww`, and the caller, which
    /// can call SQL, asks the function on a conflict.
    Custom,
    /// Decided as `Lww`, and every conflict is left for review.
    Manual,
}

impl Strategy {
    pub const ALL: [Strategy; 5] =
        [Strategy::Lww, Strategy::FieldMerge, Strategy::NodePriority, Strategy::Custom, Strategy::Manual];

    pub fn name(self) -> &'static str {
        match self {
            Strategy::Lww => "lww",
            Strategy::FieldMerge => "field_merge",
            Strategy::NodePriority => "node_priority",
            Strategy::Custom => "custom",
            Strategy::Manual => "manual",
        }
    }

    pub fn parse(name: &str) -> Option<Strategy> {
        Strategy::ALL.into_iter().find(|s| s.name() == name)
    }

    /// Every conflict of this strategy is left for a person to review.
    pub fn reviewed(self) -> bool {
        self == Strategy::Manual
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Resolution {
    /// The visible row, or `None` when it is deleted.
    pub row: Option<Image>,
    /// The version whose decision applies (for the record of a conflict).
    pub winner: (Uuid, i64, i32),
    /// More than one concurrent version, with different content.
    pub conflict: bool,
}

/// What concurrent versions of one row mean.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConflictKind {
    /// Concurrent changes of one row: the strategy decides.
    Update,
    /// Two nodes inserted different rows under one key without seeing each other: two entities
    /// got one key. The strategy still decides what the row shows, but the other row is only
    /// kept in the conflict record, which is always left for review.
    SameKey,
    /// A row took a unique value (other than its key) that another row holds, each written on
    /// a node that had not seen the other: see `unique_keeps`.
    Unique,
    /// A row refers to a parent that a change which had not seen the row deleted: see `orphan`.
    ForeignKey,
}

impl ConflictKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ConflictKind::Update => "update",
            ConflictKind::SameKey => "same_key",
            ConflictKind::Unique => "unique",
            ConflictKind::ForeignKey => "foreign_key",
        }
    }

    /// Whether a conflict of this kind is left for a person to review whatever the strategy:
    /// when a row was removed or two entities shared a key, only the record keeps the other.
    pub fn reviewed(self) -> bool {
        self != ConflictKind::Update
    }

    /// The kind of conflict `incoming` makes with the versions it has not seen (`concurrent`):
    /// `SameKey` when it and one of them are inserts (a whole row written, not deleted).
    pub fn of(incoming: &Version, concurrent: &[&Version]) -> ConflictKind {
        if incoming.is_insert() && concurrent.iter().any(|v| v.is_insert()) {
            ConflictKind::SameKey
        } else {
            ConflictKind::Update
        }
    }
}

/// Whose outcome a conflict's resulting row is, as `sync_conflicts.winner` records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Winner {
    /// The incoming change's.
    Remote,
    /// What this node had.
    Local,
    /// Neither alone (`field_merge`, a counter, a custom resolver).
    Merged,
}

impl Winner {
    /// Name the outcome: `result` is the row decided, `incoming` the incoming change's row,
    /// `before` the row this node had (each `None` when absent).
    pub fn of(result: Option<&Row>, incoming: Option<&Row>, before: Option<&Row>) -> Winner {
        if result == incoming {
            Winner::Remote
        } else if result == before {
            Winner::Local
        } else {
            Winner::Merged
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Winner::Remote => "remote",
            Winner::Local => "local",
            Winner::Merged => "merged",
        }
    }
}

/// Which of two rows keeps a unique value they both hold (constraint races).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Keeps {
    /// The incoming version's row keeps it; the row that held it here is removed.
    Incoming,
    /// The row that holds it here keeps it; the incoming version's row is removed.
    Holder,
}

/// A unique value claimed by two rows that were written on nodes that had not seen each other
/// (two users who signed up with one e-mail address): the row whose latest version is the last
/// writer keeps it, and the other row is removed (kept whole in the conflict record, for
/// review). `holder` is the last writer of the row that holds the value here, or `None` for a
/// row no change of which this node holds (older than tracking), which every version beats.
///
/// Every node that meets the race compares the same two versions, and removes by a change of
/// its own that has seen both, so the outcome travels with the data: a node that met no race
/// (one of the rows changed its value first there) still ends with the same rows.
pub fn unique_keeps(incoming: &Version, holder: Option<(Hlc, Uuid, i64, i32)>) -> Keeps {
    match holder {
        Some(h) if h > incoming.lww_key() => Keeps::Holder,
        _ => Keeps::Incoming,
    }
}

/// What a row whose parent was deleted by a change that had not seen it becomes, by its
/// foreign key's `ON DELETE` action.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Orphan {
    /// The delete wins and the child goes too: `CASCADE` says so, and for `NO ACTION`,
    /// `RESTRICT` and `SET DEFAULT` it is the one outcome every node reaches without asking
    /// the parent's node (a parent brought back would undo a delete that user made).
    Remove,
    /// `SET NULL`: the child stays, without the reference.
    SetNull,
}

impl Orphan {
    /// From `pg_constraint.confdeltype`.
    pub fn of(confdeltype: char) -> Orphan {
        if confdeltype == 'n' { Orphan::SetNull } else { Orphan::Remove }
    }
}

/// Decide the visible row from a register. `None` for an empty register. `priority` is read
/// by `NodePriority` only.
pub fn resolve(strategy: Strategy, priority: &BTreeMap<Uuid, i32>, register: &Register) -> Option<Resolution> {
    let versions = register.versions();
    let last = register.last_writer()?;
    let conflict = versions.iter().any(|v| v.row != last.row);
    let winner = match strategy {
        Strategy::NodePriority => {
            let rank = |v: &Version| priority.get(&v.origin).copied().unwrap_or(0);
            versions.iter().max_by_key(|v| (rank(v), v.lww_key())).expect("non-empty")
        }
        Strategy::Lww | Strategy::FieldMerge | Strategy::Custom | Strategy::Manual => last,
    };
    let row = match (strategy, &winner.row) {
        (_, None) => None,
        (Strategy::FieldMerge, Some(base)) => {
            let mut merged = base.clone();
            for (column, value) in Arc::make_mut(&mut merged).iter_mut() {
                // Versions are sorted by lww_key: the last one that wrote the column wins.
                let writer = versions.iter().rev().find(|v| v.row.is_some() && v.wrote(column));
                if let Some(x) = writer.and_then(|v| v.row.as_ref()).and_then(|r| r.get(column))
                    && x != value
                {
                    *value = x.clone();
                }
            }
            Some(merged)
        }
        (_, Some(row)) => Some(row.clone()),
    };
    Some(Resolution { row, winner: winner.dot(), conflict })
}

/// How a version is kept in `sync_rows`, one JSON array of these per row: enough to decide
/// "has seen" and to resolve, no more.
///
/// Under causal delivery a version arriving from another node has never been seen by one
/// already held, and a held version can only have seen a *later-indexed* version when that is a
/// local write; so of each held version's causal context only this node's entry (`l`) is
/// kept. The row image (`r`) is kept only while the register holds several versions; a lone
/// version's row is the table row itself.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Stored {
    pub o: Uuid,
    pub s: i64,
    pub i: i32,
    pub h: u64,
    /// The version's causal context entry for this node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub l: Option<i64>,
    /// A delete.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub d: bool,
    /// Columns written, when not every column (an UPDATE).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub w: Option<BTreeSet<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub r: Option<Image>,
}

impl Stored {
    /// Keep `v` as seen from node `me`; with its row when `keep_row`.
    pub fn from_version(v: &Version, me: Uuid, keep_row: bool) -> Stored {
        Stored {
            o: v.origin,
            s: v.seq,
            i: v.idx,
            h: v.hlc.0,
            l: if v.origin == me { None } else { v.context.get(&me).copied() },
            d: v.row.is_none(),
            w: if v.row.is_none() { None } else { v.written.clone() },
            r: if keep_row { v.row.clone() } else { None },
        }
    }

    /// Back to a version; `row` stands in for the image when it was not kept (the table row).
    pub fn to_version(&self, me: Uuid, row: Option<&Image>) -> Version {
        let row = if self.d { None } else { self.r.clone().or_else(|| row.cloned()) };
        let context = self.l.map(|l| BTreeMap::from([(me, l)])).unwrap_or_default();
        Version { origin: self.o, seq: self.s, idx: self.i, hlc: Hlc(self.h), context, row, written: self.w.clone() }
    }

    /// Just what "has seen" and the dot look at (origin, numbers, clock, context), without
    /// copying the row image: for causality checks on the apply path.
    pub fn causal(&self, me: Uuid) -> Version {
        let context = self.l.map(|l| BTreeMap::from([(me, l)])).unwrap_or_default();
        Version { origin: self.o, seq: self.s, idx: self.i, hlc: Hlc(self.h), context, row: None, written: None }
    }

    /// True when the stored version lacks a row image it needs to be resolved against others.
    pub fn needs_row(&self) -> bool {
        !self.d && self.r.is_none()
    }
}

/// Store a register: row images only when it holds several versions, and then not those equal
/// to `table_row`, the row the table holds once the register is written (when that is exactly
/// the captured row): the table row stands in for them when they are read back.
pub fn store(register: &Register, me: Uuid, table_row: Option<&Row>) -> Vec<Stored> {
    let several = register.versions().len() > 1;
    let keep = |v: &Version| several && v.row.as_deref() != table_row;
    register.versions().iter().map(|v| Stored::from_version(v, me, keep(v))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::{ProptestConfig, any, prop, prop_assert, prop_assert_eq, prop_assume, proptest};
    use serde_json::json;

    fn node(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    fn version(
        origin: u128,
        seq: i64,
        hlc: u64,
        context: &[(u128, i64)],
        row: Option<Value>,
        written: &[&str],
    ) -> Version {
        Version {
            origin: node(origin),
            seq,
            idx: 1,
            hlc: Hlc(hlc),
            context: context.iter().map(|(o, s)| (node(*o), *s)).collect(),
            row: row.map(|r| Arc::new(r.as_object().unwrap().clone())),
            written: Some(written.iter().map(|s| s.to_string()).collect()),
        }
    }

    fn register(versions: &[Version]) -> Register {
        let mut r = Register::default();
        for v in versions {
            r.insert(v.clone());
        }
        r
    }

    /// DESIGN.md's counter-example: A (high priority); C (low) has seen A; B (low) is
    /// concurrent with both and has the greatest clock. Pairwise rules applied in arrival
    /// order end at C or at B depending on the order; over the maximal set {B, C} the answer
    /// is always B.
    #[test]
    fn causal_versions_see_what_full_ones_see() {
        let me = node(9);
        let a = version(1, 3, 10, &[(9, 4)], Some(json!({"id": 1, "v": 1})), &["id", "v"]);
        let b = version(9, 4, 11, &[(1, 3)], Some(json!({"id": 1, "v": 2})), &["v"]);
        for s in [Stored::from_version(&a, me, true), Stored::from_version(&b, me, false)] {
            let (full, light) = (s.to_version(me, None), s.causal(me));
            assert_eq!(full.dot(), light.dot());
            for other in [&a, &b] {
                assert_eq!(full.has_seen(other), light.has_seen(other));
                assert_eq!(other.has_seen(&full), other.has_seen(&light));
            }
        }
    }

    /// Two inserts of one key that did not see each other are a key collision; an insert
    /// concurrent with an update or a delete of an older row is an ordinary conflict.
    #[test]
    fn inserts_that_meet_are_a_same_key_conflict() {
        let insert = |origin, hlc| {
            let mut v = version(origin, 1, hlc, &[], Some(json!({"id": 1, "v": origin as i64})), &[]);
            v.written = None;
            v
        };
        let (a, b) = (insert(1, 10), insert(2, 11));
        let update = version(3, 1, 12, &[], Some(json!({"id": 1, "v": 7})), &["v"]);
        let delete = version(4, 1, 13, &[], None, &[]);
        assert_eq!(ConflictKind::of(&b, &[&a]), ConflictKind::SameKey);
        assert_eq!(ConflictKind::of(&b, &[&update, &a]), ConflictKind::SameKey);
        assert_eq!(ConflictKind::of(&b, &[&update]), ConflictKind::Update);
        assert_eq!(ConflictKind::of(&update, &[&a]), ConflictKind::Update);
        assert_eq!(ConflictKind::of(&b, &[&delete]), ConflictKind::Update);
        assert_eq!(ConflictKind::SameKey.as_str(), "same_key");
    }

    #[test]
    fn node_priority_counterexample_converges() {
        let a = version(1, 1, 10, &[], Some(json!({"id": 1, "v": "A"})), &["id", "v"]);
        let c = version(3, 1, 20, &[(1, 1)], Some(json!({"id": 1, "v": "C"})), &["v"]);
        let b = version(2, 1, 30, &[], Some(json!({"id": 1, "v": "B"})), &["id", "v"]);
        let priority = BTreeMap::from([(node(1), 10)]);
        for order in [[&a, &b, &c], [&a, &c, &b], [&b, &c, &a], [&c, &a, &b]] {
            let r = register(&order.map(|v| v.clone()));
            let res = resolve(Strategy::NodePriority, &priority, &r).unwrap();
            assert_eq!(res.row.unwrap()["v"], json!("B"), "order {:?}", order.map(|v| v.origin));
            assert!(res.conflict);
        }
    }

    #[test]
    fn the_last_writer_keeps_a_unique_value() {
        let v = version(2, 1, 20, &[], Some(json!({"id": 2, "email": "a@x"})), &[]);
        assert_eq!(unique_keeps(&v, Some((Hlc(10), node(1), 1, 1))), Keeps::Incoming);
        assert_eq!(unique_keeps(&v, Some((Hlc(30), node(1), 1, 1))), Keeps::Holder);
        // One clock: the node id decides, as in lww.
        assert_eq!(unique_keeps(&v, Some((Hlc(20), node(3), 1, 1))), Keeps::Holder);
        assert_eq!(unique_keeps(&v, Some((Hlc(20), node(1), 9, 9))), Keeps::Incoming);
        // A row no change of which is held here (older than tracking) always yields.
        assert_eq!(unique_keeps(&v, None), Keeps::Incoming);
    }

    #[test]
    fn the_winner_names_whose_row_stands() {
        let row = |v: i64| json!({"id": 1, "v": v}).as_object().unwrap().clone();
        let (a, b, c) = (row(1), row(2), row(3));
        assert_eq!(Winner::of(Some(&a), Some(&a), Some(&b)), Winner::Remote);
        assert_eq!(Winner::of(Some(&b), Some(&a), Some(&b)), Winner::Local);
        assert_eq!(Winner::of(Some(&c), Some(&a), Some(&b)), Winner::Merged);
        // A delete that wins is the remote outcome; one that loses to a row kept, local.
        assert_eq!(Winner::of(None, None, Some(&b)), Winner::Remote);
        assert_eq!(Winner::of(Some(&b), None, Some(&b)), Winner::Local);
    }

    #[test]
    fn only_set_null_keeps_an_orphan() {
        assert_eq!(Orphan::of('n'), Orphan::SetNull);
        for action in ['a', 'r', 'c', 'd'] {
            assert_eq!(Orphan::of(action), Orphan::Remove, "{action}");
        }
    }

    #[test]
    fn causally_later_write_is_not_a_conflict() {
        let a = version(1, 1, 10, &[], Some(json!({"id": 1, "v": 1})), &["id", "v"]);
        let b = version(2, 1, 5, &[(1, 1)], Some(json!({"id": 1, "v": 2})), &["v"]);
        let res = resolve(Strategy::Lww, &BTreeMap::new(), &register(&[a, b])).unwrap();
        assert_eq!(res.row.unwrap()["v"], json!(2));
        assert!(!res.conflict);
    }

    #[test]
    fn identical_concurrent_content_is_not_a_conflict() {
        let a = version(1, 1, 10, &[], Some(json!({"id": 1, "v": 1})), &["id", "v"]);
        let b = version(2, 1, 11, &[], Some(json!({"id": 1, "v": 1})), &["id", "v"]);
        assert!(!resolve(Strategy::Lww, &BTreeMap::new(), &register(&[a, b])).unwrap().conflict);
    }

    #[test]
    fn field_merge_keeps_both_columns() {
        let base = version(1, 1, 10, &[], Some(json!({"id": 1, "a": 0, "b": 0})), &["id", "a", "b"]);
        let left = version(1, 2, 20, &[], Some(json!({"id": 1, "a": 1, "b": 0})), &["a"]);
        let right = version(2, 1, 15, &[(1, 1)], Some(json!({"id": 1, "a": 0, "b": 2})), &["b"]);
        let row =
            resolve(Strategy::FieldMerge, &BTreeMap::new(), &register(&[base, left, right])).unwrap().row.unwrap();
        assert_eq!(json!(row), json!({"id": 1, "a": 1, "b": 2}));
    }

    #[test]
    fn an_update_seen_by_a_delete_does_not_resurrect_the_row() {
        let insert = version(1, 1, 10, &[], Some(json!({"id": 1, "v": 0})), &["id", "v"]);
        let update = version(2, 1, 50, &[(1, 1)], Some(json!({"id": 1, "v": 9})), &["v"]);
        // The delete has seen the update although the update's clock is greater (skewed clock).
        let delete = version(1, 2, 40, &[(2, 1)], None, &[]);
        for order in [[&insert, &update, &delete], [&delete, &update, &insert], [&update, &delete, &insert]] {
            let r = register(&order.map(|v| v.clone()));
            assert_eq!(resolve(Strategy::Lww, &BTreeMap::new(), &r).unwrap().row, None);
            assert_eq!(resolve(Strategy::FieldMerge, &BTreeMap::new(), &r).unwrap().row, None);
        }
    }

    /// A random history on three nodes writing one row: each write sees everything its node
    /// holds; syncs copy one node's whole set to another (which keeps every set causally
    /// closed, as causal delivery does). Returns every version written.
    fn history(steps: &[(u8, u8, u8, u8)]) -> Vec<Version> {
        let mut held: Vec<Vec<Version>> = vec![Vec::new(); 3];
        let mut seq = [0i64; 3];
        let mut clock = [0u64; 3];
        let mut all = Vec::new();
        for &(kind, a, b, value) in steps {
            let (a, b) = (a as usize % 3, b as usize % 3);
            if kind % 3 == 0 && a != b {
                let incoming = held[b].clone();
                for v in incoming {
                    if !held[a].iter().any(|w| w.dot() == v.dot()) {
                        clock[a] = clock[a].max(v.hlc.0);
                        held[a].push(v);
                    }
                }
                continue;
            }
            seq[a] += 1;
            clock[a] += 1 + (value as u64 % 3);
            let mut context = BTreeMap::new();
            for v in &held[a] {
                let e = context.entry(v.origin).or_insert(0);
                *e = (*e).max(v.seq);
            }
            let columns = ["a", "b", "c"];
            let written: Vec<&str> = if kind % 3 == 1 { columns.to_vec() } else { vec![columns[value as usize % 3]] };
            // The row this node sees now, with the written columns changed.
            let current = resolve(Strategy::Lww, &BTreeMap::new(), &register(&held[a])).and_then(|r| r.row);
            let row = if value % 7 == 0 {
                None
            } else {
                let mut row = current
                    .map(|r| (*r).clone())
                    .unwrap_or_else(|| json!({"a": 0, "b": 0, "c": 0}).as_object().unwrap().clone());
                for c in &written {
                    row.insert(c.to_string(), json!(value));
                }
                Some(Arc::new(row))
            };
            let v = Version {
                origin: node(a as u128 + 1),
                seq: seq[a],
                idx: 1,
                hlc: Hlc(clock[a]),
                context,
                row,
                written: Some(written.iter().map(|s| s.to_string()).collect()),
            };
            held[a].push(v.clone());
            all.push(v);
        }
        all
    }

    #[test]
    fn the_table_row_stands_in_for_an_equal_image() {
        let me = node(9);
        let a = version(1, 1, 10, &[], Some(json!({"id": 1, "v": 1})), &["id", "v"]);
        let b = version(2, 1, 11, &[], Some(json!({"id": 1, "v": 2})), &["id", "v"]);
        let r = register(&[a.clone(), b.clone()]);
        let table = b.row.clone().unwrap();
        let stored = store(&r, me, Some(&table));
        assert_eq!(stored.iter().map(|s| s.r.is_some()).collect::<Vec<_>>(), [true, false]);
        // Read back with the table row, the register is the same.
        let back: Vec<Version> = stored.iter().map(|s| s.to_version(me, Some(&table))).collect();
        assert_eq!(back.iter().map(|v| &v.row).collect::<Vec<_>>(), [&a.row, &b.row]);
        // Without a table row, or a lone version, images are kept as before.
        assert!(store(&r, me, None).iter().all(|s| s.r.is_some()));
        assert!(store(&register(&[b]), me, None).iter().all(|s| s.r.is_none()));
    }

    #[test]
    fn saw_everything_needs_every_other_origin_covered() {
        let (a, b, c) = (node(1), node(2), node(3));
        let context = BTreeMap::from([(a, 4), (b, 7)]);
        assert!(saw_everything(a, &context, &BTreeMap::from([(a, 9), (b, 7), (c, 0)])));
        assert!(!saw_everything(a, &context, &BTreeMap::from([(b, 8)])));
        assert!(!saw_everything(a, &context, &BTreeMap::from([(c, 1)])));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]
        /// When `saw_everything` says a version saw what a node holds, it has seen each held
        /// version (of another origin, or earlier of its own), so the register is just it.
        #[test]
        fn saw_everything_implies_has_seen_each_held_version(
            steps in prop::collection::vec((0u8..3, 0u8..3, 0u8..3, 0u8..50), 1..40),
            pick in any::<prop::sample::Index>(),
            cut in any::<prop::sample::Index>(),
        ) {
            let all = history(&steps);
            prop_assume!(!all.is_empty());
            let v = pick.get(&all);
            // A node holding, of each origin, the versions up to some number.
            let limit = cut.index(5) as i64;
            let held_versions: Vec<&Version> =
                all.iter().filter(|w| w.seq <= limit && (w.origin != v.origin || w.seq < v.seq)).collect();
            let mut held = BTreeMap::new();
            for w in &held_versions {
                let n = held.entry(w.origin).or_insert(0);
                *n = (*n).max(w.seq);
            }
            if saw_everything(v.origin, &v.context, &held) {
                for w in held_versions {
                    prop_assert!(v.has_seen(w), "{:?} should have seen {:?}", v.dot(), w.dot());
                }
            }
        }

        /// Every delivery order of the same versions gives the same register and the same row,
        /// for every strategy.
        #[test]
        fn any_delivery_order_converges(
            steps in prop::collection::vec((0u8..3, 0u8..3, 0u8..3, 0u8..50), 1..40),
            seed in any::<u64>(),
        ) {
            let all = history(&steps);
            let mut shuffled = all.clone();
            // A deterministic shuffle from the seed.
            let mut s = seed | 1;
            for i in (1..shuffled.len()).rev() {
                s ^= s << 13; s ^= s >> 7; s ^= s << 17;
                shuffled.swap(i, (s % (i as u64 + 1)) as usize);
            }
            let (r1, r2) = (register(&all), register(&shuffled));
            prop_assert_eq!(&r1, &r2);
            let priority = BTreeMap::from([(node(2), 5), (node(3), 1)]);
            for strategy in Strategy::ALL {
                prop_assert_eq!(resolve(strategy, &priority, &r1), resolve(strategy, &priority, &r2));
            }
            // Applying a version twice changes nothing.
            let mut again = r1.clone();
            for v in &all {
                prop_assert!(!again.insert(v.clone()));
            }
            prop_assert_eq!(again, r1);
        }
    }
}
