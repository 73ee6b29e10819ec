//! Events and batches: the units `sync_changes()` produces and `sync_apply()` consumes.
//! `PROTOCOL.md` specifies the format; this module is its reference implementation.

use crate::auth::hex;
use crate::canonical::{write_string, write_value};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;
use uuid::Uuid;

/// The batch format this code writes. Format 2 orders events causally across origins (see
/// `serve`); format 1 listed origins one after another. Both are read.
pub const FORMAT_VERSION: u32 = 2;
/// The oldest batch format this code reads.
pub const OLDEST_FORMAT: u32 = 1;

#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Op {
    Insert,
    Update,
    Delete,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Insert => "INSERT",
            Op::Update => "UPDATE",
            Op::Delete => "DELETE",
        }
    }

    /// The operation `as_str` names.
    pub fn parse(s: &str) -> Option<Op> {
        [Op::Insert, Op::Update, Op::Delete].into_iter().find(|op| op.as_str() == s)
    }
}

/// One captured row change.
///
/// `(origin, seq, idx)` identifies it everywhere: `seq` numbers the origin's transactions
/// (dense except for rolled-back ones), `idx` orders the changes inside that transaction.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub origin: Uuid,
    pub seq: i64,
    pub idx: i32,
    /// The origin's transaction id (`xid8`), for diagnostics.
    pub xact: i64,
    /// Hybrid logical clock of the statement that made the change.
    pub hlc: i64,
    /// Schema-qualified table name, each part quoted only where SQL needs it.
    pub table: String,
    pub pk: Value,
    pub op: Op,
    /// New row image (captured columns), absent for DELETE.
    pub data: Option<Value>,
    /// Old values: the changed columns for UPDATE, the whole row for DELETE.
    pub old: Option<Value>,
    /// Causal context: the origin's have-vector when it wrote, with its own entry = `seq`.
    pub vclock: BTreeMap<Uuid, i64>,
    /// Hex sha256 of [`Event::canonical_text`].
    pub checksum: String,
}

/// The columns a change wrote, when not every column: an UPDATE's `old` lists the changed ones.
pub fn written_columns(op: Op, old: Option<&Value>) -> Option<BTreeSet<String>> {
    match (op, old) {
        (Op::Update, Some(Value::Object(old))) => Some(old.keys().cloned().collect()),
        _ => None,
    }
}

impl Event {
    /// The bytes the checksum covers: a JSON array in PostgreSQL's jsonb text form.
    pub fn canonical_text(&self) -> String {
        // Written piece by piece: building a JSON array first would copy the row images.
        let mut out = String::with_capacity(256);
        let opt = |out: &mut String, v: &Option<Value>| match v {
            Some(v) => write_value(out, v),
            None => out.push_str("null"),
        };
        out.push('[');
        write_string(&mut out, &self.origin.to_string());
        let _ = write!(out, ", {}, {}, {}, ", self.seq, self.idx, self.hlc);
        write_string(&mut out, &self.table);
        out.push_str(", ");
        write_string(&mut out, self.op.as_str());
        out.push_str(", ");
        write_value(&mut out, &self.pk);
        out.push_str(", ");
        opt(&mut out, &self.data);
        out.push_str(", ");
        opt(&mut out, &self.old);
        out.push(']');
        out
    }

    pub fn compute_checksum(&self) -> String {
        hex(&Sha256::digest(self.canonical_text().as_bytes()))
    }

    pub fn checksum_ok(&self) -> bool {
        self.compute_checksum() == self.checksum
    }
}

/// What `sync_changes()` returns: for each origin, the events in `(from, have]`.
///
/// After applying it the receiver holds every event of each listed origin up to `have[origin]`
/// (the prefix property), so it can raise its own have-vector to those values.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Batch {
    pub format: u32,
    /// Node that produced the batch (not necessarily the origin of its events: relay).
    pub source: Uuid,
    /// Per origin, the caller's position the batch starts after.
    pub from: BTreeMap<Uuid, i64>,
    /// Per origin, the position the caller reaches once the batch is applied.
    pub have: BTreeMap<Uuid, i64>,
    /// Events, each transaction's together and in `idx` order, each origin's oldest first, and
    /// every transaction after those it depends on (`serve::cut`); transactions are never split.
    pub events: Vec<Event>,
    /// True when the source holds more events than fitted in this batch.
    pub more: bool,
    /// Origins the caller lacks changes of that the source no longer keeps (`peersync.log_retention`):
    /// per origin, the greatest number it deleted. The batch carries nothing of them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub gone: BTreeMap<Uuid, i64>,
    /// Origins the caller lacks changes of that the source never held (its data was copied from
    /// a peer's snapshot): per origin, up to where. The batch carries nothing of them; another
    /// peer may serve them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub absent: BTreeMap<Uuid, i64>,
    /// Per origin whose events the batch carries, the transaction at `from` (the last one the
    /// caller holds) as the source has it, when it still keeps it: the caller checks that it
    /// continues from the same one (`log::Fingerprint`; a copied node numbers on otherwise).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub at: BTreeMap<Uuid, crate::log::Fingerprint>,
    /// Pairs of transactions the source holds under one number: a node whose own origin is
    /// named, and which holds one of them, stops capturing (another node uses its identity).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub twins: Vec<crate::log::Twin>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum BatchError {
    #[error("unsupported batch format {0} (this node reads formats {OLDEST_FORMAT} to {FORMAT_VERSION})")]
    Format(u32),
    #[error("checksum mismatch on event {origin}/{seq}/{idx}")]
    Checksum { origin: Uuid, seq: i64, idx: i32 },
    #[error("event {origin}/{seq}/{idx} lies outside the batch range ({from}, {have}]")]
    OutOfRange { origin: Uuid, seq: i64, idx: i32, from: i64, have: i64 },
    #[error("events of origin {0} are not in (seq, idx) order")]
    Order(Uuid),
    #[error("the events of transaction {origin}/{seq} are not together in the batch")]
    Split { origin: Uuid, seq: i64 },
}

impl Batch {
    /// Check everything that can be checked without a database: format, checksums, ranges, order.
    pub fn validate(&self) -> Result<(), BatchError> {
        if !(OLDEST_FORMAT..=FORMAT_VERSION).contains(&self.format) {
            return Err(BatchError::Format(self.format));
        }
        let mut last: BTreeMap<Uuid, (i64, i32)> = BTreeMap::new();
        for (i, e) in self.events.iter().enumerate() {
            // A transaction's events are together: the one before is of the same transaction,
            // or this is the first of its transaction seen.
            let follows = i > 0 && (self.events[i - 1].origin, self.events[i - 1].seq) == (e.origin, e.seq);
            if !follows && last.get(&e.origin).is_some_and(|l| l.0 == e.seq) {
                return Err(BatchError::Split { origin: e.origin, seq: e.seq });
            }
            if !e.checksum_ok() {
                return Err(BatchError::Checksum { origin: e.origin, seq: e.seq, idx: e.idx });
            }
            let from = self.from.get(&e.origin).copied().unwrap_or(0);
            let have = self.have.get(&e.origin).copied().unwrap_or(i64::MIN);
            if e.seq <= from || e.seq > have {
                return Err(BatchError::OutOfRange { origin: e.origin, seq: e.seq, idx: e.idx, from, have });
            }
            if let Some(prev) = last.insert(e.origin, (e.seq, e.idx))
                && prev >= (e.seq, e.idx)
            {
                return Err(BatchError::Order(e.origin));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(seq: i64, idx: i32) -> Event {
        let mut e = Event {
            origin: Uuid::from_u128(7),
            seq,
            idx,
            xact: 900,
            hlc: 1 << 20,
            table: "public.items".into(),
            pk: json!({"id": 1}),
            op: Op::Update,
            data: Some(json!({"id": 1, "name": "Grüße \"x\""})),
            old: Some(json!({"name": "a"})),
            vclock: BTreeMap::from([(Uuid::from_u128(7), seq)]),
            checksum: String::new(),
        };
        e.checksum = e.compute_checksum();
        e
    }

    fn batch(events: Vec<Event>) -> Batch {
        let o = Uuid::from_u128(7);
        Batch {
            format: FORMAT_VERSION,
            source: o,
            from: BTreeMap::from([(o, 0)]),
            have: BTreeMap::from([(o, 10)]),
            events,
            more: false,
            gone: BTreeMap::new(),
            absent: BTreeMap::new(),
            at: BTreeMap::new(),
            twins: Vec::new(),
        }
    }

    #[test]
    fn operations_parse_back_from_their_names() {
        for op in [Op::Insert, Op::Update, Op::Delete] {
            assert_eq!(Op::parse(op.as_str()), Some(op));
        }
        assert_eq!(Op::parse("TRUNCATE"), None);
    }

    #[test]
    fn canonical_text_is_jsonb_form() {
        let e = event(3, 1);
        assert_eq!(
            e.canonical_text(),
            r#"["00000000-0000-0000-0000-000000000007", 3, 1, 1048576, "public.items", "UPDATE", {"id": 1}, {"id": 1, "name": "Grüße \"x\""}, {"name": "a"}]"#
        );
    }

    #[test]
    fn valid_batch_round_trips_through_json() {
        let b = batch(vec![event(1, 1), event(1, 2), event(2, 1)]);
        b.validate().unwrap();
        let text = serde_json::to_string(&b).unwrap();
        let back: Batch = serde_json::from_str(&text).unwrap();
        assert_eq!(back, b);
        back.validate().unwrap();
    }

    #[test]
    fn tampered_event_fails_checksum() {
        let mut e = event(1, 1);
        e.data = Some(json!({"id": 1, "name": "evil"}));
        assert!(matches!(batch(vec![e]).validate(), Err(BatchError::Checksum { .. })));
    }

    #[test]
    fn unknown_format_is_refused() {
        let mut b = batch(vec![]);
        b.format = 99;
        assert_eq!(b.validate(), Err(BatchError::Format(99)));
    }

    #[test]
    fn a_transaction_split_by_another_is_refused() {
        let mut other = event(1, 1);
        other.origin = Uuid::from_u128(8);
        other.vclock = BTreeMap::from([(other.origin, 1)]);
        other.checksum = other.compute_checksum();
        let mut b = batch(vec![event(1, 1), other.clone(), event(1, 2)]);
        b.from.insert(other.origin, 0);
        b.have.insert(other.origin, 1);
        assert_eq!(b.validate(), Err(BatchError::Split { origin: Uuid::from_u128(7), seq: 1 }));
        // Interleaved whole transactions are fine (format 2).
        let mut b = batch(vec![event(1, 1), event(1, 2), other, event(2, 1)]);
        b.from.insert(Uuid::from_u128(8), 0);
        b.have.insert(Uuid::from_u128(8), 1);
        assert_eq!(b.validate(), Ok(()));
        b.format = 1;
        assert_eq!(b.validate(), Ok(()));
    }

    #[test]
    fn out_of_range_and_disorder_are_refused() {
        assert!(matches!(batch(vec![event(11, 1)]).validate(), Err(BatchError::OutOfRange { .. })));
        assert!(matches!(batch(vec![event(2, 1), event(1, 1)]).validate(), Err(BatchError::Order(_))));
    }
}
