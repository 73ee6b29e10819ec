//! Turning a stored change-log row back into events.
//!
//! A node keeps one `sync_log` row per transaction (or run of it), its changes in parts: per
//! part a table, an operation, the primary-key columns, the number of the first change and a
//! JSON array of row images as `row_to_json` printed them (for UPDATE, `[new row, old values
//! of the changed columns]` pairs). The `sync_events` view unpacks a row in SQL; `LogRow::events`
//! does the same in Rust, to the byte: the row images go through `jsonb_value` so that
//! numbers read as PostgreSQL's `jsonb` prints them, and the checksums agree.

use crate::Event;
use crate::event::Op;
use serde_json::value::RawValue;
use serde_json::{Map, Number, Value};
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use uuid::Uuid;

/// One part of a log row: consecutive changes of one kind to one table.
#[derive(Clone, Debug)]
pub struct Part {
    pub hlc: i64,
    pub table: String,
    pub op: Op,
    /// The primary-key columns, as a JSON array text (`["id"]`).
    pub pk_columns: String,
    /// `origin_idx` of its first change.
    pub first: i32,
    /// A JSON array text of row images.
    pub rows: String,
}

/// What tells two transactions numbered alike apart: the origin's transaction id, its greatest
/// clock and its change count. One origin transaction always shows the same; two different
/// ones under one `(origin, seq)` (a copied or restored node numbering on) almost never do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Fingerprint {
    pub xact: i64,
    pub hlc: i64,
    pub n: i64,
}

impl Fingerprint {
    /// Of one origin transaction's events (all of them: a batch never splits one).
    pub fn of(events: &[Event]) -> Fingerprint {
        Fingerprint {
            xact: events.first().map_or(0, |e| e.xact),
            hlc: events.iter().map(|e| e.hlc).max().unwrap_or(0),
            n: events.len() as i64,
        }
    }
}

/// Two different transactions one node holds under one `(origin, seq)` (its `sync_twins`),
/// passed on in its batches: the node whose identity it is learns that another node uses it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Twin {
    pub origin: Uuid,
    pub seq: i64,
    pub a: Fingerprint,
    pub b: Fingerprint,
}

impl Twin {
    /// Whether this pair tells node `me`, which holds `mine` under the same number, that
    /// another node numbers under its identity: the pair is its own origin's and differs (one
    /// of the two is `mine`, the other someone else's; or neither is).
    pub fn betrays(&self, me: Uuid, mine: Option<Fingerprint>) -> bool {
        self.origin == me && self.a != self.b && mine.is_some()
    }
}

#[derive(Clone, Debug)]
pub struct LogRow {
    pub origin: Uuid,
    pub seq: i64,
    pub xact: i64,
    pub vclock: BTreeMap<Uuid, i64>,
    pub parts: Vec<Part>,
}

/// One change of a log row, unpacked: its part, `origin_idx`, primary key (the key columns
/// of the new row, or of the old one for a DELETE), new row and old values, numbers as `jsonb`
/// prints them.
struct Unpacked<'a> {
    part: &'a Part,
    idx: i32,
    pk: Value,
    data: Option<Value>,
    old: Option<Value>,
}

impl LogRow {
    /// Call `f` with each change, in `origin_idx` order. Images are parsed one at a time: a
    /// part can hold a whole bulk statement's rows.
    fn unpack(&self, mut f: impl FnMut(Unpacked)) -> Result<(), String> {
        for part in &self.parts {
            let columns: Vec<String> =
                serde_json::from_str(&part.pk_columns).map_err(|e| format!("bad primary-key list: {e}"))?;
            let rows: Vec<&RawValue> = serde_json::from_str(&part.rows).map_err(|e| format!("bad row images: {e}"))?;
            for (j, image) in rows.into_iter().enumerate() {
                let mut image: Value = serde_json::from_str(image.get()).map_err(|e| format!("bad row image: {e}"))?;
                jsonb_value(&mut image);
                let (data, old) = match part.op {
                    Op::Insert => (Some(image), None),
                    Op::Delete => (None, Some(image)),
                    Op::Update => match image {
                        Value::Array(mut pair) if pair.len() == 2 => {
                            let old = pair.pop().expect("two");
                            (Some(pair.pop().expect("two")), Some(old))
                        }
                        _ => return Err("an UPDATE image is not a [new, old] pair".into()),
                    },
                };
                let pk = key(&columns, data.as_ref().or(old.as_ref()));
                f(Unpacked { part, idx: part.first + j as i32, pk, data, old });
            }
        }
        Ok(())
    }

    /// The row's events, in `origin_idx` order, each with its checksum.
    pub fn events(&self) -> Result<Vec<Event>, String> {
        let mut out = self.events_unchecked()?;
        for e in &mut out {
            e.checksum = e.compute_checksum();
        }
        Ok(out)
    }

    /// The row's events without their checksums (left empty): for reading the changes back
    /// here, where nothing is served or verified.
    pub fn events_unchecked(&self) -> Result<Vec<Event>, String> {
        let mut out = Vec::new();
        self.unpack(|c| {
            let e = Event {
                origin: self.origin,
                seq: self.seq,
                idx: c.idx,
                xact: self.xact,
                hlc: c.part.hlc,
                table: c.part.table.clone(),
                pk: c.pk,
                op: c.part.op,
                data: c.data,
                old: c.old,
                vclock: self.vclock.clone(),
                checksum: String::new(),
            };
            out.push(e);
        })?;
        Ok(out)
    }

    /// Call `f` with each change of the row, in `origin_idx` order, without building events
    /// (no checksums, no row images kept): what folding changes into row registers needs.
    pub fn touches(&self, mut f: impl FnMut(Touch)) -> Result<(), String> {
        self.unpack(|c| {
            let written = crate::event::written_columns(c.part.op, c.old.as_ref());
            let key = crate::canonical::jsonb_text(&c.pk);
            f(Touch { table: &c.part.table, key, op: c.part.op, idx: c.idx, hlc: c.part.hlc, written });
        })
    }
}

impl LogRow {
    /// Events of one origin transaction (in `idx` order) as log rows in the layout capture
    /// writes: one row per run of events sharing a causal context and numbered without a gap
    /// (an origin writes one per `sync_flush`), one part per run of changes of one kind to
    /// one table from one statement (one clock). `events` read back gives them again.
    pub fn from_events(events: &[Event]) -> Vec<LogRow> {
        let mut out = Vec::new();
        let mut start = 0;
        while start < events.len() {
            let mut end = start + 1;
            while end < events.len()
                && events[end].vclock == events[start].vclock
                && events[end].idx == events[end - 1].idx + 1
            {
                end += 1;
            }
            out.push(LogRow::from_run(&events[start..end]));
            start = end;
        }
        out
    }

    fn from_run(events: &[Event]) -> LogRow {
        let mut parts: Vec<(Part, Vec<Value>)> = Vec::new();
        for (i, e) in events.iter().enumerate() {
            let same_part = i > 0 && {
                let p = &events[i - 1];
                p.hlc == e.hlc && p.table == e.table && p.op == e.op
            };
            if !same_part {
                let keys: Vec<&String> = e.pk.as_object().map(|o| o.keys().collect()).unwrap_or_default();
                let part = Part {
                    hlc: e.hlc,
                    table: e.table.clone(),
                    op: e.op,
                    pk_columns: serde_json::to_string(&keys).expect("strings serialise"),
                    first: e.idx,
                    rows: String::new(),
                };
                parts.push((part, Vec::new()));
            }
            parts.last_mut().expect("a part").1.push(match e.op {
                Op::Insert => e.data.clone().unwrap_or(Value::Null),
                Op::Delete => e.old.clone().unwrap_or(Value::Null),
                Op::Update => {
                    Value::Array(vec![e.data.clone().unwrap_or(Value::Null), e.old.clone().unwrap_or(Value::Null)])
                }
            });
        }
        let head = &events[0];
        LogRow {
            origin: head.origin,
            seq: head.seq,
            xact: head.xact,
            vclock: head.vclock.clone(),
            parts: parts.into_iter().map(|(p, rows)| Part { rows: Value::Array(rows).to_string(), ..p }).collect(),
        }
    }

    /// The number of changes in the row.
    pub fn len(&self) -> i32 {
        self.parts.iter().map(|p| p.len()).sum()
    }

    /// True when the row holds no change.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `origin_idx` of its first change.
    pub fn first(&self) -> i32 {
        self.parts.first().map_or(0, |p| p.first)
    }

    /// The greatest clock of its parts.
    pub fn hlc(&self) -> i64 {
        self.parts.iter().map(|p| p.hlc).max().unwrap_or(0)
    }
}

impl Part {
    /// The number of changes in the part (its row images).
    pub fn len(&self) -> i32 {
        serde_json::from_str::<Vec<&RawValue>>(&self.rows).map_or(0, |r| r.len() as i32)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One change of a log row as far as row registers are concerned: which row, what kind of
/// change, its place and clock, and the columns an UPDATE changed.
#[derive(Clone, Debug, PartialEq)]
pub struct Touch<'a> {
    pub table: &'a str,
    /// The primary key in `jsonb`'s text form, as `canonical::jsonb_text` prints an event's `pk`.
    pub key: String,
    pub op: Op,
    pub idx: i32,
    pub hlc: i64,
    pub written: Option<BTreeSet<String>>,
}

/// The primary key of a row image: its key columns, in order (a missing one is null).
fn key(columns: &[String], image: Option<&Value>) -> Value {
    let row = image.and_then(Value::as_object);
    let pk: Map<String, Value> =
        columns.iter().map(|c| (c.clone(), row.and_then(|r| r.get(c)).cloned().unwrap_or(Value::Null))).collect();
    Value::Object(pk)
}

/// Rewrite every number in `v` as `jsonb` prints it (see `jsonb_number`).
pub fn jsonb_value(v: &mut Value) {
    match v {
        Value::Number(n) => {
            if let Cow::Owned(s) = jsonb_number(n.as_str()) {
                *n = serde_json::from_str::<Number>(&s).expect("a normalised number parses");
            }
        }
        Value::Array(items) => items.iter_mut().for_each(jsonb_value),
        Value::Object(map) => map.values_mut().for_each(jsonb_value),
        _ => {}
    }
}

/// A JSON number as PostgreSQL's `jsonb` prints it, which is `numeric`'s output of the
/// number read as `numeric`: the exponent applied (the scale is the fraction's digits minus
/// the exponent, at least 0) and zero without a sign. `row_to_json` prints an exponent only
/// for floats (`1e+20`, `1.5e-07`) and `-0` for a negative float zero; everything else is
/// returned as it is.
pub fn jsonb_number(s: &str) -> Cow<'_, str> {
    let (negative, body) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (mantissa, exponent) = match body.find(['e', 'E']) {
        Some(i) => match body[i + 1..].parse::<i64>() {
            Ok(e) => (&body[..i], e),
            Err(_) => return Cow::Borrowed(s),
        },
        None => (body, 0),
    };
    let is_zero = mantissa.bytes().all(|b| b == b'0' || b == b'.');
    if exponent == 0 && !(negative && is_zero) {
        return Cow::Borrowed(s);
    }
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits = format!("{int}{frac}").into_bytes();
    let scale = (frac.len() as i64 - exponent).max(0);
    // The decimal point sits after `point` digits (possibly before the first, or past the end);
    // positions outside the digits are zeros.
    let point = int.len() as i64 + exponent;
    let digit = |k: i64| usize::try_from(k).ok().and_then(|k| digits.get(k)).map_or('0', |d| *d as char);
    let whole: String = (0..point).map(digit).collect();
    let fraction: String = (point..point + scale).map(digit).collect();
    let whole = whole.trim_start_matches('0');
    let whole = if whole.is_empty() { "0" } else { whole };
    let zero = whole == "0" && fraction.bytes().all(|b| b == b'0');
    let mut out = String::new();
    if negative && !zero {
        out.push('-');
    }
    out.push_str(whole);
    if scale > 0 {
        out.push('.');
        out.push_str(&fraction);
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pair_under_this_nodes_identity_betrays_a_copy_only_to_a_holder() {
        let (me, other) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let f = |xact| Fingerprint { xact, hlc: 10, n: 1 };
        let pair = Twin { origin: me, seq: 2, a: f(100), b: f(200) };
        assert!(pair.betrays(me, Some(f(100))), "the original");
        assert!(pair.betrays(me, Some(f(200))), "the copy");
        assert!(!pair.betrays(me, None), "nothing held under that number here");
        assert!(!pair.betrays(other, Some(f(100))), "another node's identity");
        assert!(!Twin { b: f(100), ..pair }.betrays(me, Some(f(100))), "one transaction seen twice");
    }

    #[test]
    fn numbers_read_as_jsonb_prints_them() {
        for (given, jsonb) in [
            ("1e+20", "100000000000000000000"),
            ("1.5e-07", "0.00000015"),
            ("-2.5e+3", "-2500"),
            ("1.25e+1", "12.5"),
            ("6.02214076e+23", "602214076000000000000000"),
            ("-0", "0"),
            ("-0.0", "0.0"),
            ("1E2", "100"),
            ("5e-324", &format!("0.{}5", "0".repeat(323))),
            ("42", "42"),
            ("-7.50", "-7.50"),
            ("0.001", "0.001"),
        ] {
            assert_eq!(jsonb_number(given), jsonb, "{given}");
        }
        assert!(matches!(jsonb_number("123.45"), Cow::Borrowed(_)));
    }

    #[test]
    fn a_log_row_unpacks_into_checked_events() {
        let origin = Uuid::from_u128(7);
        let row = LogRow {
            origin,
            seq: 3,
            xact: 900,
            vclock: BTreeMap::from([(origin, 3)]),
            parts: vec![
                Part {
                    hlc: 10,
                    table: "public.t".into(),
                    op: Op::Update,
                    pk_columns: r#"["id"]"#.into(),
                    first: 1,
                    rows: r#"[[{"id":1,"v":1e+2},{"v":5}],[{"id":2,"v":-0},{"v":1}]]"#.into(),
                },
                Part {
                    hlc: 11,
                    table: "public.t".into(),
                    op: Op::Delete,
                    pk_columns: r#"["id"]"#.into(),
                    first: 3,
                    rows: r#"[{"id":9,"v":null}]"#.into(),
                },
            ],
        };
        let events = row.events().unwrap();
        assert_eq!(events.iter().map(|e| e.idx).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(events[0].data.as_ref().unwrap()["v"].to_string(), "100");
        assert_eq!(events[1].data.as_ref().unwrap()["v"].to_string(), "0");
        assert_eq!(events[0].old, Some(serde_json::json!({"v": 5})));
        assert_eq!(events[2].pk, serde_json::json!({"id": 9}));
        assert_eq!((events[2].data.clone(), events[2].hlc), (None, 11));
        assert!(events.iter().all(Event::checksum_ok));
        // The light unpacking gives the same rows, keys and columns written.
        let mut touched = Vec::new();
        row.touches(|t| {
            touched.push(t.clone().key + t.table + &format!("{:?}{}{}{:?}", t.op, t.idx, t.hlc, t.written))
        })
        .unwrap();
        let expected: Vec<String> = events
            .iter()
            .map(|e| {
                let written = match (&e.op, &e.old) {
                    (Op::Update, Some(Value::Object(o))) => Some(o.keys().cloned().collect::<BTreeSet<String>>()),
                    _ => None,
                };
                crate::canonical::jsonb_text(&e.pk) + &e.table + &format!("{:?}{}{}{:?}", e.op, e.idx, e.hlc, written)
            })
            .collect();
        assert_eq!(touched, expected);
        // Received events are stored back in the same layout, and read back unchanged.
        let again = LogRow::from_events(&events);
        assert_eq!(again.len(), 1);
        assert_eq!((again[0].len(), again[0].first(), again[0].hlc()), (3, 1, 11));
        assert_eq!(again[0].parts.iter().map(|p| p.len()).collect::<Vec<_>>(), [2, 1]);
        assert_eq!(again[0].events().unwrap(), events);
    }

    #[test]
    fn one_transaction_keeps_its_fingerprint_and_another_under_its_number_does_not() {
        let origin = Uuid::from_u128(7);
        let part = |hlc, rows: &str| Part {
            hlc,
            table: "public.t".into(),
            op: Op::Insert,
            pk_columns: r#"["id"]"#.into(),
            first: 1,
            rows: rows.into(),
        };
        let row = |xact, hlc, rows: &str| LogRow {
            origin,
            seq: 2,
            xact,
            vclock: BTreeMap::from([(origin, 2)]),
            parts: vec![part(hlc, rows)],
        };
        let a = row(731, 50, r#"[{"id":1}]"#).events().unwrap();
        // Served again, through any node, it shows the same.
        let relayed = LogRow::from_events(&a).remove(0).events().unwrap();
        assert_eq!(Fingerprint::of(&a), Fingerprint::of(&relayed));
        assert_eq!(Fingerprint::of(&a), Fingerprint { xact: 731, hlc: 50, n: 1 });
        // The copy's transaction (A, 2): same xid, a later clock; or two rows.
        assert_ne!(Fingerprint::of(&a), Fingerprint::of(&row(731, 61, r#"[{"id":1}]"#).events().unwrap()));
        assert_ne!(Fingerprint::of(&a), Fingerprint::of(&row(731, 50, r#"[{"id":1},{"id":2}]"#).events().unwrap()));
    }

    #[test]
    fn received_events_split_into_rows_where_the_context_or_numbering_changes() {
        let origin = Uuid::from_u128(7);
        let event = |idx: i32, hlc: i64, ctx: i64, table: &str, op: Op| {
            let (data, old) = match op {
                Op::Delete => (None, Some(serde_json::json!({"id": idx}))),
                _ => (Some(serde_json::json!({"id": idx})), None),
            };
            let mut e = Event {
                origin,
                seq: 5,
                idx,
                xact: 1,
                hlc,
                table: table.into(),
                pk: serde_json::json!({"id": idx}),
                op,
                data,
                old,
                vclock: BTreeMap::from([(origin, 5), (Uuid::from_u128(9), ctx)]),
                checksum: String::new(),
            };
            e.checksum = e.compute_checksum();
            e
        };
        let events = vec![
            event(1, 10, 1, "public.a", Op::Insert),
            event(2, 10, 1, "public.a", Op::Insert),
            event(3, 10, 1, "public.b", Op::Insert),
            event(4, 11, 1, "public.b", Op::Delete),
            // A sync_flush: a later context.
            event(5, 12, 2, "public.b", Op::Delete),
        ];
        let rows = LogRow::from_events(&events);
        assert_eq!(
            rows.iter().map(|r| (r.first(), r.len(), r.parts.len())).collect::<Vec<_>>(),
            [(1, 4, 3), (5, 1, 1)]
        );
        let back: Vec<Event> = rows.iter().flat_map(|r| r.events().unwrap()).collect();
        assert_eq!(back, events);
    }
}
