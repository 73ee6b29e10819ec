//! Apply one origin transaction's row changes: load each row's register from `sync_rows`,
//! add the incoming version (`sync_bridge::resolve`), decide the visible row with the table's
//! strategy, and write what changed, in origin order, set-based.
//!
//! Writes go in runs of consecutive changes to one table of one kind (upsert or delete), so a
//! child row the origin wrote after its parent is written after it here too, and foreign keys
//! hold without being deferred.

use super::Table;
use super::arrays::{Of, array};
use super::constraints::{Changed, Settled, Settlement, Settler, was_changed};
use super::plans;
use super::subxact;
use crate::error::SyncError;
use pgrx::prelude::*;
use serde::Serialize;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use sync_bridge::canonical::jsonb_text;
use sync_bridge::counter::{Counted, Life};
use sync_bridge::resolve::{self, ConflictKind, Image, Register, Resolution, Row, Stored, Strategy, Version, Winner};
use sync_bridge::{Event, Hlc, Op};
use uuid::Uuid;

#[derive(Default)]
pub struct Stats {
    pub applied: i64,
    pub skipped: i64,
    pub conflicts: i64,
    /// (table, canonical key text) of each event, in order.
    pub keys: Vec<(String, String)>,
    /// Rows settled races changed (`constraints`).
    pub changed: Changed,
}

/// One row's state while a transaction is applied.
struct RowState {
    stored: Vec<Stored>,
    /// The row's current life, for a table with counters (`sync_bridge::counter`).
    life: Option<Life>,
    /// Where `sync_rows` has this register already (it is updated there, not inserted).
    ctid: Option<pg_sys::ItemPointerData>,
    /// The row as the table holds it, when known (`Some(None)`: no such row).
    current: Option<Option<Image>>,
    dirty: bool,
}

#[derive(Clone)]
pub(super) struct Write<'e> {
    pub table: &'e str,
    pub key: &'e str,
    /// The row to upsert, or `None` to delete the row `pk` names.
    pub row: Option<Image>,
    pub pk: &'e Value,
    /// The change it comes from (an index into the applied events).
    pub event: usize,
}

/// A held version the incoming one had not seen, as `sync_conflicts.local` lists it.
#[derive(Serialize)]
struct Dot {
    origin: Uuid,
    seq: i64,
    idx: i32,
    hlc: i64,
}

/// One row of `sync_conflicts`; its JSON columns are serialised straight from the images it
/// shares with the apply.
struct Conflict<'e> {
    table_name: &'e str,
    /// The key in jsonb's text form, which `sync_conflicts.pk` reads back without change.
    pk: &'e str,
    strategy: Strategy,
    /// The row as this node had it, with the versions behind it.
    local: Local,
    /// The incoming version.
    remote: Remote,
    /// The row now visible.
    result: Option<Image>,
    winner: Winner,
    kind: ConflictKind,
    review: &'static str,
    note: Option<String>,
}

#[derive(Serialize)]
struct Local {
    row: Option<Image>,
    versions: Vec<Dot>,
}

#[derive(Serialize)]
struct Remote {
    row: Option<Image>,
    origin: Uuid,
    seq: i64,
    idx: i32,
    hlc: i64,
}

pub fn version_of(e: &Event) -> Version {
    let row = e.data.as_ref().and_then(Value::as_object).map(|r| Arc::new(r.clone()));
    let written = sync_bridge::event::written_columns(e.op, e.old.as_ref());
    Version {
        origin: e.origin,
        seq: e.seq,
        idx: e.idx,
        hlc: Hlc::from_i64(e.hlc),
        context: e.vclock.clone(),
        row: if e.op == Op::Delete { None } else { row },
        written,
    }
}

pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// How `apply` goes about its writes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Every change has seen everything this node holds (`fold` explains why that matters): no
    /// register is read or written, each change simply makes its row.
    Blind,
    /// Registers decide, and writes go set-based.
    Registers,
    /// As `Registers`, but row by row, settling unique and foreign-key races (`constraints`).
    Settling,
}

/// What every change of an apply is decided with.
struct Context<'a> {
    me: Uuid,
    priorities: &'a BTreeMap<Uuid, i32>,
    mode: Mode,
    /// Rows settled races changed earlier in the run.
    changed: &'a Changed,
    /// Per origin, its lowest transaction held after failing (`store::failed_floor`).
    floor: &'a BTreeMap<Uuid, i64>,
}

impl Context<'_> {
    /// How far `v`'s origin has come, for a counter row's life once `v` is counted: up to `v`,
    /// but not past a transaction of it still held (applied later, it must still count).
    fn settled_upto(&self, v: &Version) -> (i64, i32) {
        match self.floor.get(&v.origin) {
            Some(f) if *f <= v.seq => (f - 1, i32::MAX),
            _ => (v.seq, v.idx),
        }
    }
}

/// Rows keyed by (table, canonical key text), both borrowed from the applied events.
type States<'e> = HashMap<(&'e str, &'e str), RowState>;

/// Apply `events` (whole origin transactions, in delivery order), in four phases: load the
/// registers of the rows they touch, decide each change's row, write the rows, store the
/// registers. Changes of rows in `changed` (settled races earlier in the run) are skipped.
pub fn apply(
    schema: &str,
    me: Uuid,
    tables: &mut HashMap<String, Table>,
    events: &[&Event],
    mode: Mode,
    changed: &Changed,
) -> Result<Stats, SyncError> {
    if let Some(at) = events.iter().position(|e| crate::ddl::is_ddl(e)) {
        return apply_around_ddl(schema, me, tables, events, at, mode, changed);
    }
    if let Some(e) = events.iter().find(|e| !tables.contains_key(&e.table)) {
        return Err(SyncError::UntrackedTable(e.table.clone()));
    }
    let mut stats = Stats::default();
    let keys: Vec<String> = events.iter().map(|e| jsonb_text(&e.pk)).collect();
    // Each event's version, built once (it shares the row image).
    let versions: Vec<Version> = events.iter().map(|e| version_of(e)).collect();
    let mut states = match mode {
        Mode::Blind => HashMap::new(),
        _ => load_states(schema, me, tables, events, &keys, &versions)?,
    };
    let priorities =
        if mode != Mode::Blind && events.iter().any(|e| tables[&e.table].strategy == Strategy::NodePriority) {
            load_priorities(schema)?
        } else {
            BTreeMap::new()
        };
    let floor = if events.iter().any(|e| !tables[&e.table].counters.is_empty()) {
        super::store::failed_floor(schema)?
    } else {
        BTreeMap::new()
    };
    let context = Context { me, priorities: &priorities, mode, changed, floor: &floor };
    let (writes, conflicts) = decide_all(schema, &context, tables, events, &keys, versions, &mut states, &mut stats);
    // Conflicts borrow their table's name; recorded first (all of it rolls back together).
    record_conflicts(schema, &conflicts)?;
    drop(conflicts);
    let mut settler = Settler::new(schema, me, events, changed);
    if mode == Mode::Settling {
        settler.write_settling(tables, &writes)?;
    } else {
        write_runs(tables, &writes, &mut settler)?;
    }
    let (settlement, now_changed) = settler.finish();
    settled(schema, tables, events, settlement, &mut states, &mut stats)?;
    stats.changed = now_changed;
    if mode != Mode::Blind {
        store_changed(schema, tables, &states)?;
    }
    stats.keys = events.iter().zip(keys).map(|(e, k)| (e.table.clone(), k)).collect();
    Ok(stats)
}

/// The changes before a DDL event, the DDL, then the rest: the tables as the DDL left them
/// (columns, new tracked tables) are read again before the rest is applied.
fn apply_around_ddl(
    schema: &str,
    me: Uuid,
    tables: &mut HashMap<String, Table>,
    events: &[&Event],
    at: usize,
    mode: Mode,
    changed: &Changed,
) -> Result<Stats, SyncError> {
    let mut stats = apply(schema, me, tables, &events[..at], mode, changed)?;
    {
        // Rows the command writes were captured after it on the origin: not captured again.
        let _guard = super::Applying::start();
        crate::ddl::apply(schema, events[at])?;
    }
    stats.applied += 1;
    let mut fresh = super::load_tables(schema)?;
    // What this apply has noted so far stays with the tables.
    for (name, t) in tables.drain() {
        if let Some(f) = fresh.get_mut(&name) {
            f.written_max = t.written_max;
            f.new_missing = t.new_missing;
        }
    }
    *tables = fresh;
    let before: Changed = changed.union(&stats.changed).cloned().collect();
    let rest = apply(schema, me, tables, &events[at + 1..], mode, &before)?;
    stats.changed.extend(rest.changed);
    stats.applied += rest.applied;
    stats.skipped += rest.skipped;
    stats.conflicts += rest.conflicts;
    stats.keys.extend(rest.keys);
    Ok(stats)
}

/// Phase 1: the registers of the rows `events` touch, and the table row of those whose first
/// incoming version is concurrent with a held one that keeps no image (that image is the
/// table row) or whose counters must be added to.
fn load_states<'e>(
    schema: &str,
    me: Uuid,
    tables: &HashMap<String, Table>,
    events: &[&'e Event],
    keys: &'e [String],
    versions: &[Version],
) -> Result<States<'e>, SyncError> {
    let mut states = States::new();
    let mut by_table: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, e) in events.iter().enumerate() {
        by_table.entry(e.table.as_str()).or_default().push(i);
    }
    for (table, idx) in &by_table {
        let t = &tables[*table];
        let wanted: Vec<&str> = idx.iter().map(|&i| keys[i].as_str()).collect::<BTreeSet<_>>().into_iter().collect();
        for (key, held) in wanted.iter().zip(load_registers(schema, t.relid, &wanted)?) {
            if let Some(held) = held {
                states.insert(
                    (*table, *key),
                    RowState {
                        stored: held.stored,
                        life: held.life,
                        ctid: Some(held.ctid),
                        current: None,
                        dirty: false,
                    },
                );
            }
        }
        let mut first: BTreeMap<&str, usize> = BTreeMap::new();
        for &i in idx {
            first.entry(keys[i].as_str()).or_insert(i);
        }
        let need: Vec<&str> = first
            .iter()
            .filter(|(k, i)| {
                states.get(&(*table, **k)).is_some_and(|s| {
                    let v = &versions[**i];
                    // A counter row may change even by a change the register saw (`decide_all`).
                    !t.counters.is_empty() || s.stored.iter().any(|w| w.needs_row() && !v.has_seen(&w.causal(me)))
                })
            })
            .map(|(k, _)| *k)
            .collect();
        if !need.is_empty() {
            let pks: Vec<&Value> = need.iter().map(|k| &events[first[k]].pk).collect();
            let mut found = current_rows(t, &pks)?;
            for k in need {
                let row = found.remove(k);
                states.get_mut(&(*table, k)).expect("has a register").current = Some(row);
            }
        }
    }
    Ok(states)
}

/// Phase 2: each change in order against its row's register: skipped when held or seen,
/// the row alone when it has seen everything held, else resolved with the strategy (and
/// recorded when a true conflict). Returns the writes, in origin order, and the conflicts.
#[allow(clippy::too_many_arguments)]
fn decide_all<'e: 't, 't>(
    schema: &str,
    cx: &Context,
    tables: &'t HashMap<String, Table>,
    events: &[&'e Event],
    keys: &'e [String],
    versions: Vec<Version>,
    states: &mut States<'e>,
    stats: &mut Stats,
) -> (Vec<Write<'e>>, Vec<Conflict<'t>>) {
    let Context { me, priorities, mode, changed, .. } = *cx;
    let blind = mode == Mode::Blind;
    let (mut writes, mut conflicts) = (Vec::new(), Vec::new());
    // Rows changed more than once in this transaction: their latest image is kept in memory.
    let mut seen_keys = BTreeSet::new();
    let repeated: BTreeSet<(&str, &str)> = events
        .iter()
        .zip(keys)
        .filter_map(|(e, k)| {
            (!seen_keys.insert((e.table.as_str(), k.as_str()))).then_some((e.table.as_str(), k.as_str()))
        })
        .collect();
    for (i, (e, v)) in events.iter().zip(versions).enumerate() {
        if was_changed(changed, &e.table, &keys[i]) {
            // Superseded by the change a settled race recorded (see `constraints::Settler`).
            stats.skipped += 1;
            continue;
        }
        let t = &tables[&e.table];
        let state = states.entry((e.table.as_str(), keys[i].as_str())).or_insert_with(|| RowState {
            stored: Vec::new(),
            life: None,
            ctid: None,
            current: None,
            dirty: false,
        });
        let held: Vec<Version> = state.stored.iter().map(|s| s.causal(me)).collect();
        let seen = held.iter().any(|w| w.dot() == v.dot() || w.has_seen(&v));
        let counted = count(cx, t, e, &v, state);
        if seen && counted != Some(Counted::Current) {
            stats.skipped += 1;
            continue;
        }
        stats.applied += 1;
        state.dirty = true;
        let target = if seen {
            // A change its origin numbered before one held but made after it (the two
            // committed out of order there): the row stands, with the delta it brings.
            state.current.clone().flatten()
        } else if counted == Some(Counted::Earlier) {
            // A change of a life of the row that has ended here: it changes nothing.
            stats.conflicts += 1;
            conflicts.push(ended_life(t, e, &keys[i], &v, state));
            continue;
        } else if counted == Some(Counted::Born) || held.iter().all(|w| v.has_seen(w)) {
            // The usual case: the incoming version saw everything held (or begins a new life
            // of a counter row); it alone remains.
            if !blind {
                state.stored = vec![Stored::from_version(&v, me, false)];
            }
            v.row
        } else {
            let (row, conflict) = resolve_concurrent(schema, me, t, e, &keys[i], v, state, priorities);
            if let Some(c) = conflict {
                stats.conflicts += 1;
                conflicts.push(c);
            }
            row
        };
        let target = match &state.life {
            Some(life) if counted.is_some() => life.overlay(target),
            _ => target,
        };
        if state.current.as_ref() == Some(&target) {
            continue;
        }
        if repeated.contains(&(e.table.as_str(), keys[i].as_str())) {
            state.current = Some(target.clone());
        }
        writes.push(Write { table: &e.table, key: &keys[i], row: target, pk: &e.pk, event: i });
    }
    (writes, conflicts)
}

/// For a table with counters: count `v` (of event `e`) into its row's life.
fn count(cx: &Context, t: &Table, e: &Event, v: &Version, state: &mut RowState) -> Option<Counted> {
    if t.counters.is_empty() {
        return None;
    }
    let life = state.life.get_or_insert_with(Life::default);
    let counted = life.count(v, e.old.as_ref(), &t.counters);
    life.settle(v.origin, cx.settled_upto(v));
    Some(counted)
}

/// The record of a change to a counter row that came after its life ended here (a concurrent
/// DELETE, or the key inserted again): the row stays as it is.
fn ended_life<'e>(t: &'e Table, e: &Event, key: &'e str, v: &Version, state: &RowState) -> Conflict<'e> {
    let row = state.current.clone().flatten();
    let versions = state.stored.iter().map(|s| Dot { origin: s.o, seq: s.s, idx: s.i, hlc: s.h as i64 }).collect();
    Conflict {
        table_name: &t.name,
        pk: key,
        strategy: t.strategy,
        local: Local { row: row.clone(), versions },
        remote: Remote { row: v.row.clone(), origin: v.origin, seq: v.seq, idx: v.idx, hlc: e.hlc },
        result: row,
        winner: Winner::Local,
        kind: ConflictKind::Update,
        review: if t.strategy.reviewed() { "pending" } else { "none" },
        note: Some("a change of a counter row whose life had ended (deleted, or inserted again)".into()),
    }
}

/// A change concurrent with versions held: add it to the register, decide the row with the
/// table's strategy (the counters as the row's life has them), and describe the conflict if
/// there is one.
#[allow(clippy::too_many_arguments)]
fn resolve_concurrent<'e>(
    schema: &str,
    me: Uuid,
    t: &'e Table,
    e: &Event,
    key: &'e str,
    v: Version,
    state: &mut RowState,
    priorities: &BTreeMap<Uuid, i32>,
) -> (Option<Image>, Option<Conflict<'e>>) {
    let table_row = state.current.as_ref().and_then(|r| r.as_ref());
    let mut register = Register::default();
    for s in &state.stored {
        register.insert(s.to_version(me, table_row));
    }
    let before = match &state.current {
        Some(row) => row.clone(),
        None => decide(schema, t, &register, priorities, &e.pk).0.row,
    };
    let concurrent: Vec<&Version> = register.versions().iter().filter(|w| !v.has_seen(w)).collect();
    let kind = ConflictKind::of(&v, &concurrent);
    let unseen: Vec<Dot> =
        concurrent.iter().map(|w| Dot { origin: w.origin, seq: w.seq, idx: w.idx, hlc: w.hlc.as_i64() }).collect();
    let remote = Remote { row: v.row.clone(), origin: v.origin, seq: v.seq, idx: v.idx, hlc: e.hlc };
    register.insert(v);
    let (mut res, note) = decide(schema, t, &register, priorities, &e.pk);
    if let Some(life) = &state.life {
        res.row = life.overlay(res.row);
    }
    // The row the table holds after this: an image equal to it need not be kept, provided
    // reading the table row back gives that image.
    state.stored = resolve::store(&register, me, res.row.as_deref().filter(|r| t.captures_exactly(r)));
    if !res.conflict {
        return (res.row, None);
    }
    let winner = Winner::of(res.row.as_deref(), remote.row.as_deref(), before.as_deref());
    let review = if t.strategy.reviewed() || note.is_some() || kind.reviewed() { "pending" } else { "none" };
    let conflict = Conflict {
        table_name: &t.name,
        pk: key,
        strategy: t.strategy,
        local: Local { row: before, versions: unseen },
        remote,
        result: res.row.clone(),
        winner,
        kind,
        review,
        note,
    };
    (res.row, Some(conflict))
}

/// After phase 3: the races the writes settled (`constraints`) recorded, and the registers
/// the settling changed replaced.
fn settled(
    schema: &str,
    tables: &HashMap<String, Table>,
    events: &[&Event],
    settlement: Settlement,
    states: &mut States,
    stats: &mut Stats,
) -> Result<(), SyncError> {
    if settlement.settled.is_empty() && settlement.registers.is_empty() {
        return Ok(());
    }
    stats.conflicts += settlement.settled.len() as i64;
    record_settled(schema, tables, events, &settlement.settled)?;
    let mut elsewhere: BTreeMap<&str, Vec<(&str, &Stored)>> = BTreeMap::new();
    for r in &settlement.registers {
        match states.iter_mut().find(|((t, k), _)| *t == r.table && *k == r.key) {
            Some((_, state)) => {
                state.stored = vec![r.stored.clone()];
                state.dirty = true;
            }
            None => elsewhere.entry(r.table.as_str()).or_default().push((r.key.as_str(), &r.stored)),
        }
    }
    for (table, regs) in elsewhere {
        let relid = tables[table].relid;
        let keys: Vec<&str> = regs.iter().map(|(k, _)| *k).collect();
        let held = load_registers(schema, relid, &keys)?;
        let rows: Vec<RegisterRow> = regs
            .iter()
            .zip(held)
            .map(|((key, stored), h)| RegisterRow {
                key,
                stored: std::slice::from_ref(*stored),
                life: None,
                ctid: h.map(|h| h.ctid),
            })
            .collect();
        store_registers(schema, relid, &rows)?;
    }
    Ok(())
}

/// Phase 4: write back the registers that changed.
fn store_changed(schema: &str, tables: &HashMap<String, Table>, states: &States) -> Result<(), SyncError> {
    let mut dirty: BTreeMap<&str, Vec<RegisterRow<'_>>> = BTreeMap::new();
    for ((table, key), s) in states {
        if s.dirty {
            dirty.entry(table).or_default().push(RegisterRow {
                key,
                stored: &s.stored,
                life: s.life.as_ref(),
                ctid: s.ctid,
            });
        }
    }
    for (table, regs) in dirty {
        store_registers(schema, tables[table].relid, &regs)?;
    }
    Ok(())
}

/// The visible row for a register under the table's strategy, and a note when a custom
/// resolver failed (the `lww` result applies then).
fn decide(
    schema: &str,
    t: &Table,
    register: &Register,
    priorities: &BTreeMap<Uuid, i32>,
    pk: &Value,
) -> (Resolution, Option<String>) {
    let res = resolve::resolve(t.strategy, priorities, register).expect("register is not empty");
    if t.strategy != Strategy::Custom || !res.conflict {
        return (res, None);
    }
    let Some(resolver) = &t.resolver else {
        return (res, Some(SyncError::NoResolver(t.name.clone()).to_string()));
    };
    // Fold the versions in the canonical (lww) order, so every node asks the same questions.
    let versions = register.versions();
    let mut acc = json!(versions[0].row);
    for w in &versions[1..] {
        let info = json!({"table": t.name, "pk": pk, "schema": schema,
                          "local": {"origin": versions[0].origin, "hlc": versions[0].hlc.as_i64()},
                          "remote": {"origin": w.origin, "seq": w.seq, "hlc": w.hlc.as_i64()}});
        let call = format!("SELECT {resolver}($1::jsonb, $2::jsonb, $3::jsonb)::text");
        let args = [acc.to_string(), json!(w.row).to_string(), info.to_string()];
        let result = subxact::run(|| {
            Spi::get_one_with_args::<String>(
                &call,
                &[args[0].clone().into(), args[1].clone().into(), args[2].clone().into()],
            )
        });
        match result {
            Ok(Ok(text)) => acc = text.map(|s| serde_json::from_str(&s).unwrap_or(Value::Null)).unwrap_or(Value::Null),
            Ok(Err(e)) => return (res, Some(format!("resolver {resolver} failed: {e}"))),
            Err(f) => {
                return (res, Some(format!("resolver {resolver} failed: {} ({})", f.message, f.sqlstate)));
            }
        }
    }
    let row = match acc {
        Value::Object(mut row) => {
            // The key identifies the row; a resolver cannot move it.
            if let Some(pk) = pk.as_object() {
                for (k, v) in pk {
                    row.insert(k.clone(), v.clone());
                }
            }
            Some(Arc::new(row))
        }
        Value::Null => None,
        other => {
            return (res, Some(format!("resolver {resolver} returned {other}, not an object or null")));
        }
    };
    (Resolution { row, ..res }, None)
}

/// A row's register as `sync_rows` holds it.
pub(super) struct Held {
    pub stored: Vec<Stored>,
    /// The row's life, for a table with counters.
    pub life: Option<Life>,
    /// Where it is, to update it in place.
    pub ctid: pg_sys::ItemPointerData,
}

/// The registers of rows `keys` of table `relid`, in the same order (`None`: the row has none).
pub(super) fn load_registers(schema: &str, relid: pg_sys::Oid, keys: &[&str]) -> Result<Vec<Option<Held>>, SyncError> {
    plans::query(
        // One index probe per key, whatever the sizes: `pk = ANY($2)` and a plain join are
        // both planned as a scan of every register of the table once the batch is large
        // (a hash join over all of them), which grows with the table. LIMIT 1 keeps the
        // lateral subquery from being flattened into such a join.
        &format!(
            "SELECT k.n, r.versions::text, r.ctid, r.life::text FROM unnest($2::text[]) WITH ORDINALITY AS k(pk, n) \
               CROSS JOIN LATERAL (SELECT versions, ctid, life FROM {schema}.sync_rows \
                                    WHERE relid = $1::oid::regclass AND pk = k.pk LIMIT 1) r"
        ),
        &[relid.into(), array(Of::Text, keys.iter().map(|k| Some(*k)))],
        |rows| {
            let mut out: Vec<Option<Held>> = keys.iter().map(|_| None).collect();
            for row in rows {
                let i = row.get::<i64>(1)?.expect("ordinality") as usize - 1;
                let text: &str = row.get(2)?.expect("versions");
                let unreadable = |e: serde_json::Error| {
                    SyncError::BadBatch(format!("sync_rows entry for {} is unreadable: {e}", keys[i]))
                };
                let stored: Vec<Stored> = serde_json::from_str(text).map_err(unreadable)?;
                let life = row.get::<&str>(4)?.map(serde_json::from_str).transpose().map_err(unreadable)?;
                out[i] = Some(Held { stored, life, ctid: row.get(3)?.expect("ctid") });
            }
            Ok(out)
        },
    )
}

/// A register to write back: its key, its versions, and where `sync_rows` has it, if it does.
pub(super) struct RegisterRow<'a> {
    pub key: &'a str,
    pub stored: &'a [Stored],
    /// The row's life (a table with counters); `None` leaves the one kept as it is.
    pub life: Option<&'a Life>,
    pub ctid: Option<pg_sys::ItemPointerData>,
}

/// Write registers: new ones with a plain INSERT, the others updated where they were read.
/// Registers are only written by the one applier holding the apply lock, between reading and
/// writing them nothing moves them, and a key not found when read is still absent. Keys (or
/// places) and versions go as two arrays: no JSON document around them.
pub(super) fn store_registers(schema: &str, relid: pg_sys::Oid, regs: &[RegisterRow]) -> Result<(), SyncError> {
    // Handed over as json values, not text to cast: serde_json wrote them, so PostgreSQL's
    // json input need not lex them again to check them.
    let serialise = |r: &RegisterRow| serde_json::to_string(r.stored).expect("serialises");
    let life = |r: &RegisterRow| r.life.map(|l| serde_json::to_string(l).expect("serialises"));
    let new: Vec<&RegisterRow> = regs.iter().filter(|r| r.ctid.is_none()).collect();
    if !new.is_empty() {
        let lives: Vec<Option<String>> = new.iter().map(|r| life(r)).collect();
        plans::run(
            &format!(
                "INSERT INTO {schema}.sync_rows (relid, pk, versions, life) \
                 SELECT $1::oid::regclass, unnest($2::text[]), unnest($3::json[]), unnest($4::json[])"
            ),
            &[
                relid.into(),
                array(Of::Text, new.iter().map(|r| Some(r.key))),
                array(Of::Json, new.iter().map(|r| serialise(r)).collect::<Vec<_>>().iter().map(|v| Some(v.as_str()))),
                array(Of::Json, lives.iter().map(|l| l.as_deref())),
            ],
        )?;
    }
    let old: Vec<(&RegisterRow, pg_sys::ItemPointerData)> =
        regs.iter().filter_map(|r| r.ctid.map(|c| (r, c))).collect();
    if !old.is_empty() {
        let changed: Vec<String> = old.iter().map(|(r, _)| serialise(r)).collect();
        let lives: Vec<Option<String>> = old.iter().map(|(r, _)| life(r)).collect();
        plans::run(
            &format!(
                "UPDATE {schema}.sync_rows r SET versions = u.v, life = coalesce(u.l, r.life) \
                   FROM unnest($1::tid[], $2::json[], $3::json[]) AS u(t, v, l) WHERE r.ctid = u.t"
            ),
            &[
                old.iter().map(|(_, c)| *c).collect::<Vec<_>>().into(),
                array(Of::Json, changed.iter().map(|v| Some(v.as_str()))),
                array(Of::Json, lives.iter().map(|l| l.as_deref())),
            ],
        )?;
    }
    Ok(())
}

/// A row `x` of `t` as capture records it, as text; `$2` must be the excluded columns.
pub(super) fn image_expr(t: &Table) -> &'static str {
    if t.exclude.is_empty() { "row_to_json(x)::text" } else { "(to_jsonb(x) - $2::text[])::text" }
}

/// The table rows (captured columns) for these keys, by canonical key text.
fn current_rows(t: &Table, pks: &[&Value]) -> Result<HashMap<String, Image>, SyncError> {
    // One index probe per key (see load_registers for why LIMIT 1). row_to_json prints the row
    // as capture does, and faster than going through jsonb; that is needed only to leave out
    // excluded columns.
    let image = image_expr(t);
    let sql = format!(
        "SELECT {image} FROM json_populate_recordset(NULL::{tbl}, $1::json) k \
          CROSS JOIN LATERAL (SELECT * FROM {tbl} x WHERE {on} LIMIT 1) x",
        tbl = t.name,
        on = t.pk.iter().map(|c| format!("x.{q} = k.{q}", q = quote_ident(c))).collect::<Vec<_>>().join(" AND ")
    );
    plans::query(&sql, &[json!(pks).to_string().into(), t.exclude.clone().into()], |rows| {
        let mut out = HashMap::new();
        for row in rows {
            let text: &str = row.get(1)?.expect("row");
            if let Ok(r) = serde_json::from_str::<Row>(text) {
                // The key as events carry it: the primary-key columns, in jsonb's text form.
                let pk: Row = t.pk.iter().filter_map(|c| r.get(c).map(|v| (c.clone(), v.clone()))).collect();
                out.insert(jsonb_text(&Value::Object(pk)), Arc::new(r));
            }
        }
        Ok(out)
    })
}

fn load_priorities(schema: &str) -> Result<BTreeMap<Uuid, i32>, SyncError> {
    Spi::connect_mut(|client| {
        let mut out = BTreeMap::new();
        for row in client.update(&format!("SELECT node, priority FROM {schema}.sync_node_priorities"), None, &[])? {
            if let (Some(n), Some(p)) = (row.get::<pgrx::Uuid>(1)?, row.get::<i32>(2)?) {
                out.insert(Uuid::from_bytes(*n.as_bytes()), p);
            }
        }
        Ok(out)
    })
}

/// Execute the writes in origin order, grouping consecutive ones that one statement can do.
/// Before a delete from a table that tracked tables refer to, `settler` deals with the rows
/// that still refer to it.
fn write_runs(tables: &mut HashMap<String, Table>, writes: &[Write], settler: &mut Settler) -> Result<(), SyncError> {
    let mut start = 0;
    while start < writes.len() {
        let first = &writes[start];
        let columns = |w: &Write| w.row.as_ref().map(|r| r.keys().cloned().collect::<Vec<_>>());
        let mut keys = BTreeSet::from([first.key]);
        let mut end = start + 1;
        while end < writes.len() {
            let w = &writes[end];
            if w.table != first.table || columns(w) != columns(first) || !keys.insert(w.key) {
                break;
            }
            end += 1;
        }
        let mut run = &writes[start..end];
        if first.row.is_none() && tables[first.table].referenced {
            for w in run {
                settler.before_delete(tables, w.table, w.pk, w.event)?;
            }
        }
        // Rows a settled race changed earlier in this apply: the change recorded for them has
        // seen the transactions that write them here.
        let kept: Vec<Write>;
        if run.iter().any(|w| settler.changed(w.table, w.key)) {
            kept = run.iter().filter(|w| !settler.changed(w.table, w.key)).cloned().collect();
            run = &kept;
        }
        start = end;
        let Some(first) = run.first() else { continue };
        let _guard = super::Applying::start();
        let t = tables.get_mut(first.table).expect("checked tracked");
        match &first.row {
            Some(row) => upsert(t, row, run)?,
            None => delete(t, run)?,
        }
    }
    Ok(())
}

pub(super) fn upsert(t: &mut Table, sample: &Row, run: &[Write]) -> Result<(), SyncError> {
    let mut cols = Vec::new();
    for c in sample.keys() {
        if t.generated.contains(c) {
            // Each node computes it from the row.
        } else if t.columns.contains(c) {
            cols.push(c.as_str());
        } else if !t.missing.contains(c) {
            t.new_missing.insert(c.clone());
        }
    }
    let list = cols.iter().map(|c| quote_ident(c)).collect::<Vec<_>>().join(", ");
    let pk = t.pk.iter().map(|c| quote_ident(c)).collect::<Vec<_>>().join(", ");
    // An identity column that is ALWAYS generated takes the value that travelled, and is
    // never updated (it cannot change).
    let set: Vec<String> = cols
        .iter()
        .filter(|c| !t.pk.iter().any(|p| p == *c) && !t.identity_always.contains(**c))
        .map(|c| format!("{q} = EXCLUDED.{q}", q = quote_ident(c)))
        .collect();
    let action = if set.is_empty() { "NOTHING".to_string() } else { format!("UPDATE SET {}", set.join(", ")) };
    let overriding = if cols.iter().any(|c| t.identity_always.contains(*c)) { "OVERRIDING SYSTEM VALUE " } else { "" };
    let rows: Vec<&Image> = run.iter().map(|w| w.row.as_ref().expect("an upsert run")).collect();
    for c in t.sequences.keys() {
        if let Some(top) = rows.iter().filter_map(|r| r.get(c).and_then(Value::as_i64)).max() {
            let m = t.written_max.entry(c.clone()).or_insert(top);
            *m = (*m).max(top);
        }
    }
    plans::run(
        &format!(
            "INSERT INTO {tbl} ({list}) {overriding}SELECT {list} \
             FROM jsonb_populate_recordset(NULL::{tbl}, $1::jsonb) ON CONFLICT ({pk}) DO {action}",
            tbl = t.name
        ),
        &[serde_json::to_string(&rows).expect("rows serialise").into()],
    )?;
    Ok(())
}

pub(super) fn delete(t: &Table, run: &[Write]) -> Result<(), SyncError> {
    let pk = t.pk.iter().map(|c| quote_ident(c)).collect::<Vec<_>>().join(", ");
    let pks: Vec<&Value> = run.iter().map(|w| w.pk).collect();
    plans::run(
        &format!(
            "DELETE FROM {tbl} WHERE ({pk}) IN (SELECT {pk} FROM jsonb_populate_recordset(NULL::{tbl}, $1::jsonb))",
            tbl = t.name
        ),
        &[json!(pks).to_string().into()],
    )?;
    Ok(())
}

/// Record the races a settling apply settled (`constraints`), each left for review.
fn record_settled(
    schema: &str,
    tables: &HashMap<String, Table>,
    events: &[&Event],
    settled: &[Settled],
) -> Result<(), SyncError> {
    let conflicts: Vec<Conflict> = settled
        .iter()
        .map(|s| {
            let e = events[s.event];
            Conflict {
                table_name: &s.table,
                pk: &s.key,
                strategy: tables[&s.table].strategy,
                local: Local { row: s.local.clone(), versions: Vec::new() },
                remote: Remote { row: version_of(e).row, origin: e.origin, seq: e.seq, idx: e.idx, hlc: e.hlc },
                result: s.result.clone(),
                winner: s.winner,
                kind: s.kind,
                review: "pending",
                note: Some(s.note.clone()),
            }
        })
        .collect();
    record_conflicts(schema, &conflicts)
}

fn record_conflicts(schema: &str, conflicts: &[Conflict]) -> Result<(), SyncError> {
    if conflicts.is_empty() {
        return Ok(());
    }
    // One array per column, so each value is read once (a JSON document of them would be
    // lexed whole, then each value again). local, remote and result are json, not jsonb, and
    // go as json values: the row images are kept as serde_json wrote them, neither parsed into
    // jsonb's binary form nor checked again by json's input function. The arrays are unnested
    // in the select list, where arrays of one length advance together, not in FROM, which
    // first copies every row into a tuplestore.
    fn text<T: Serialize + ?Sized>(v: &T) -> String {
        serde_json::to_string(v).expect("serialises")
    }
    let local: Vec<String> = conflicts.iter().map(|c| text(&c.local)).collect();
    let remote: Vec<String> = conflicts.iter().map(|c| text(&c.remote)).collect();
    let result: Vec<Option<String>> = conflicts.iter().map(|c| c.result.as_ref().map(text)).collect();
    let column = |f: &dyn for<'c> Fn(&'c Conflict<'c>) -> Option<&'c str>| array(Of::Text, conflicts.iter().map(f));
    plans::run(
        &format!(
            "INSERT INTO {schema}.sync_conflicts (table_name, pk, strategy, local, remote, result, winner, review, note, \
                                                  kind) \
             SELECT unnest($1::text[]), unnest($2::text[])::jsonb, unnest($3::text[]), unnest($4::json[]), \
                    unnest($5::json[]), unnest($6::json[]), unnest($7::text[]), unnest($8::text[]), unnest($9::text[]), \
                    unnest($10::text[])"
        ),
        &[
            column(&|c| Some(c.table_name)),
            column(&|c| Some(c.pk)),
            column(&|c| Some(c.strategy.name())),
            array(Of::Json, local.iter().map(|s| Some(s.as_str()))),
            array(Of::Json, remote.iter().map(|s| Some(s.as_str()))),
            array(Of::Json, result.iter().map(Option::as_deref)),
            column(&|c| Some(c.winner.as_str())),
            column(&|c| Some(c.review)),
            column(&|c| c.note.as_deref()),
            column(&|c| Some(c.kind.as_str())),
        ],
    )?;
    Ok(())
}

/// Keep each sequence that feeds a column ahead of the values that arrived in it, so this node
/// never hands out an id a peer already used. Only sequences that step by 1: one set up for
/// node-unique ids (see `sync_global_ids`) cannot meet a peer's values. `nextval` first, so the
/// sequence never moves back below what a concurrent session was handed.
pub fn advance_sequences(tables: &HashMap<String, Table>) -> Result<(), SyncError> {
    for t in tables.values() {
        for (column, top) in &t.written_max {
            let Some(seq) = t.sequences.get(column) else { continue };
            Spi::run_with_args(
                "SELECT CASE WHEN $2 > coalesce(pg_sequence_last_value($1::regclass), 0) \
                              AND (SELECT seqincrement FROM pg_sequence WHERE seqrelid = $1::regclass) = 1 \
                         THEN CASE WHEN $2 > nextval($1::regclass) THEN setval($1::regclass, $2) END END",
                &[seq.clone().into(), (*top).into()],
            )?;
        }
    }
    Ok(())
}
