//! Constraint races: received rows that break a unique constraint or a foreign key here only
//! because of a concurrent change on another node (two users took one e-mail address; a parent
//! deleted on one node while a child of it was inserted on another).
//!
//! An origin transaction that fails with such an error (23505, 23503) is applied again, its
//! row writes one at a time through `write_settling`, which settles each race by the rules of
//! `sync_bridge::resolve` (`unique_keeps`, `Orphan`): the row that loses is removed, or loses
//! its reference. A received delete of a row that tracked rows still refer to deals with them
//! first, on every path (`before_delete`): those its own transaction does not change are rows
//! the deleting node had not seen. Each such change is recorded as this node's own
//! (`capture::xact::add_resolution`), with a causal context that has seen the versions it
//! settles, so that it reaches every node and supersedes them there: the outcome is the same
//! whatever order the changes arrive in, and on nodes that never met the race. Each race is
//! recorded in `sync_conflicts` (kind `unique` or `foreign_key`, left for review) with the
//! whole row that went.

use super::plans;
use super::rows::{Write, image_expr, quote_ident, upsert, version_of};
use super::{Applying, Table};
use crate::capture::sql::Part;
use crate::capture::xact::{self, Recorded};
use crate::clock;
use crate::error::SyncError;
use pgrx::prelude::*;
use serde_json::{Value, json};
use std::collections::{BTreeSet, HashMap};
use std::rc::Rc;
use std::sync::Arc;
use sync_bridge::canonical::jsonb_text;
use sync_bridge::resolve::{self, ConflictKind, Image, Keeps, Orphan, Row, Stored, Version, Winner};
use sync_bridge::{Event, Hlc, Op};
use uuid::Uuid;

/// Removing rows whose children must go first stops this deep (a cycle of foreign keys).
const MAX_DEPTH: usize = 16;

/// A foreign key, by the names `sync_tables` gives its tables.
#[derive(Clone)]
struct ForeignKey {
    child: String,
    child_columns: Vec<String>,
    parent: String,
    parent_columns: Vec<String>,
    orphan: Orphan,
}

/// What of a table's constraints a concurrent change on another node can break.
#[derive(Default)]
struct Constraints {
    /// Unique constraints and indexes other than the primary key (plain columns, no predicate).
    unique: Vec<Vec<String>>,
    /// Foreign keys from this table: the parents its rows need.
    parents: Vec<ForeignKey>,
    /// Foreign keys to this table from tracked tables: the children a delete here must deal
    /// with first, so that what becomes of them is recorded.
    children: Vec<ForeignKey>,
}

/// Why rows are removed, for their conflict records.
struct Why {
    kind: ConflictKind,
    note: String,
    /// The incoming change that met the race (an index into the applied events).
    event: usize,
    /// `Remote`: the incoming change's outcome stands; `Local`: the row here won.
    winner: Winner,
}

/// A race settled: one row removed (or changed) and why, for `sync_conflicts`.
pub(super) struct Settled {
    pub kind: ConflictKind,
    pub table: String,
    /// The key of the row that went (or lost its reference), in jsonb's text form.
    pub key: String,
    /// That row as this node had it, or as it arrived when it never was written here.
    pub local: Option<Image>,
    /// The incoming change that met the race (an index into the applied events).
    pub event: usize,
    /// What became of the row (`None`: removed).
    pub result: Option<Image>,
    /// `Remote` when the incoming change's outcome stands, `Local` when the row here won.
    pub winner: Winner,
    pub note: String,
}

/// A row register the settling changed: this node's own change is now its one version.
pub(super) struct Register {
    pub table: String,
    pub key: String,
    pub stored: Stored,
}

#[derive(Default)]
pub(super) struct Settlement {
    pub settled: Vec<Settled>,
    pub registers: Vec<Register>,
}

/// Rows, as (table, key text), that settled races changed earlier in an apply run.
pub(crate) type Changed = BTreeSet<(String, String)>;

/// One careful apply: the constraints met so far, and what the settling did.
pub(super) struct Settler<'a> {
    schema: &'a str,
    me: Uuid,
    events: &'a [&'a Event],
    /// The received transactions being applied, which every resolution change has seen (made
    /// on the first one).
    seen: Option<Vec<(Uuid, i64)>>,
    constraints: HashMap<pg_sys::Oid, Rc<Constraints>>,
    /// Rows settled races changed before this apply, in the same run.
    before: &'a Changed,
    /// Rows the settling changed. The change recorded for each has seen every transaction this
    /// run applies (its causal context is taken at commit), so later writes of these rows in
    /// the run are superseded: they are skipped.
    changed: Changed,
    out: Settlement,
}

impl<'a> Settler<'a> {
    pub fn new(schema: &'a str, me: Uuid, events: &'a [&'a Event], before: &'a Changed) -> Settler<'a> {
        Settler {
            schema,
            me,
            events,
            seen: None,
            constraints: HashMap::new(),
            before,
            changed: Changed::new(),
            out: Settlement::default(),
        }
    }

    /// What the settling did, and the rows it changed.
    pub fn finish(self) -> (Settlement, Changed) {
        (self.out, self.changed)
    }

    /// Whether a settled race changed this row earlier in the run: a write of it now is
    /// skipped (the change recorded for it has seen the transaction that writes it).
    pub fn changed(&self, table: &str, key: &str) -> bool {
        was_changed(self.before, table, key) || was_changed(&self.changed, table, key)
    }

    /// Execute `writes` in order, one at a time, settling the races they meet.
    pub fn write_settling(&mut self, tables: &mut HashMap<String, Table>, writes: &[Write]) -> Result<(), SyncError> {
        for w in writes {
            if self.changed(w.table, w.key) {
                continue;
            }
            match &w.row {
                None => {
                    self.before_delete(tables, w.table, w.pk, w.event)?;
                    let _guard = Applying::start();
                    super::rows::delete(&tables[w.table], std::slice::from_ref(w))?;
                }
                Some(row) => self.upsert_settling(tables, w, row)?,
            }
        }
        Ok(())
    }

    /// Write one received row, settling a race it meets.
    fn upsert_settling(
        &mut self,
        tables: &mut HashMap<String, Table>,
        w: &Write,
        row: &Image,
    ) -> Result<(), SyncError> {
        let t = &tables[w.table];
        let c = self.constraints_of(tables, t)?;
        if let Some(fk) = self.deleted_parent(tables, &c, row)? {
            let why = Why {
                kind: ConflictKind::ForeignKey,
                note: format!("its parent in {} was deleted by a change that had not seen it", fk.parent),
                event: w.event,
                winner: Winner::Local,
            };
            return match fk.orphan {
                Orphan::Remove => self.drop_incoming(tables, w, row, why),
                Orphan::SetNull => self.set_null(tables, w, row, &fk.child_columns, why),
            };
        }
        let holders = self.holders(t, &c, row)?;
        if holders.is_empty() {
            let _guard = Applying::start();
            return upsert(tables.get_mut(w.table).expect("tracked"), row, std::slice::from_ref(w));
        }
        let incoming = version_of(self.events[w.event]);
        let keys: Vec<&str> = holders.iter().map(|(k, _)| k.as_str()).collect();
        let last = super::rows::load_registers(self.schema, t.relid, &keys)?
            .into_iter()
            .flatten()
            .flat_map(|h| h.stored)
            .map(|s| s.causal(self.me).lww_key())
            .max();
        match resolve::unique_keeps(&incoming, last) {
            Keeps::Holder => {
                let note = format!("the row with key {} keeps the unique value", keys.join(", "));
                self.drop_incoming(
                    tables,
                    w,
                    row,
                    Why { kind: ConflictKind::Unique, note, event: w.event, winner: Winner::Local },
                )
            }
            Keeps::Incoming => {
                let pks: Vec<Value> = holders.iter().map(|(_, image)| key_of(t, image)).collect();
                let note = format!("the row with key {} took the unique value", w.key);
                let why = Why { kind: ConflictKind::Unique, note, event: w.event, winner: Winner::Remote };
                self.remove(tables, w.table, &pks, &why, 0)?;
                let _guard = Applying::start();
                upsert(tables.get_mut(w.table).expect("tracked"), row, std::slice::from_ref(w))
            }
        }
    }

    /// The incoming row goes: removed if this node has a row under its key, else recorded as
    /// removed so that the nodes that wrote it remove it too.
    fn drop_incoming(
        &mut self,
        tables: &HashMap<String, Table>,
        w: &Write,
        row: &Image,
        why: Why,
    ) -> Result<(), SyncError> {
        self.remove(tables, w.table, std::slice::from_ref(w.pk), &why, 0)?;
        if !was_changed(&self.changed, w.table, w.key) {
            let rec = self.record(&tables[w.table], Op::Delete, format!("[{}]", json!(row)))?;
            self.settled(&why, w.table, w.key, Some(row.clone()), None);
            self.register(w.table, w.key, &rec, None);
        }
        Ok(())
    }

    /// `ON DELETE SET NULL`: the row is written without its reference, and that change is
    /// recorded as this node's.
    fn set_null(
        &mut self,
        tables: &mut HashMap<String, Table>,
        w: &Write,
        row: &Image,
        columns: &[String],
        why: Why,
    ) -> Result<(), SyncError> {
        let mut nulled = row.clone();
        let mut old = Row::new();
        for c in columns {
            if let Some(v) = Arc::make_mut(&mut nulled).insert(c.clone(), Value::Null) {
                old.insert(c.clone(), v);
            }
        }
        {
            let _guard = Applying::start();
            let write = Write { row: Some(nulled.clone()), ..w.clone() };
            upsert(tables.get_mut(w.table).expect("tracked"), &nulled, std::slice::from_ref(&write))?;
        }
        let t = &tables[w.table];
        let rec = self.record(t, Op::Update, format!("[[{}, {}]]", json!(nulled), json!(old)))?;
        let written = Some(old.keys().cloned().collect());
        self.register(w.table, w.key, &rec, Some((nulled.clone(), written)));
        self.settled(&why, w.table, w.key, Some(row.clone()), Some(nulled));
        Ok(())
    }

    /// Remove rows `pks` of `table` (the rows that refer to them first), each recorded as this
    /// node's delete and as a conflict.
    fn remove(
        &mut self,
        tables: &HashMap<String, Table>,
        table: &str,
        pks: &[Value],
        why: &Why,
        depth: usize,
    ) -> Result<(), SyncError> {
        let t = &tables[table];
        self.remove_children(tables, table, pks, why.event, depth)?;
        let images = {
            let _guard = Applying::start();
            delete_returning(t, pks)?
        };
        for image in images {
            let key = jsonb_text(&key_of(t, &image));
            let rec = self.record(t, Op::Delete, format!("[{}]", json!(image)))?;
            self.register(table, &key, &rec, None);
            self.settled(why, table, &key, Some(Arc::new(image)), None);
        }
        Ok(())
    }

    /// Before a received delete of row `pk` of `table`: deal with the rows of tracked tables
    /// that still refer to it (`remove_children`).
    pub fn before_delete(
        &mut self,
        tables: &HashMap<String, Table>,
        table: &str,
        pk: &Value,
        event: usize,
    ) -> Result<(), SyncError> {
        self.remove_children(tables, table, std::slice::from_ref(pk), event, 0)
    }

    /// Before rows `pks` of `table` are deleted: the rows of tracked tables that refer to them
    /// are removed, or lose the reference (`ON DELETE SET NULL`), as changes of this node's.
    /// Children the deleting transaction changes itself are left to it (the deleting node
    /// captured its cascade); the others are ones the delete had not seen. Leaving those to
    /// PostgreSQL's cascade would change them on this node only, and a node that meets the
    /// child after the parent was inserted again would keep it.
    fn remove_children(
        &mut self,
        tables: &HashMap<String, Table>,
        table: &str,
        pks: &[Value],
        event: usize,
        depth: usize,
    ) -> Result<(), SyncError> {
        let t = &tables[table];
        let c = self.constraints_of(tables, t)?;
        if depth >= MAX_DEPTH {
            return Ok(());
        }
        for fk in &c.children {
            let Some(child) = tables.get(&fk.child) else { continue };
            // The deleting transaction's own changes of these rows (its cascade, captured after
            // the parent's delete) come next: they are not races.
            let children: Vec<Row> = referring(t, child, fk, pks)?
                .into_iter()
                .filter(|image| !self.changed_by(event, &fk.child, &key_of(child, image)))
                .collect();
            if children.is_empty() {
                continue;
            }
            let why = Why {
                kind: ConflictKind::ForeignKey,
                note: format!("its parent in {} was deleted by a change that had not seen it", fk.parent),
                event,
                winner: Winner::Remote,
            };
            match fk.orphan {
                Orphan::Remove => {
                    let keys: Vec<Value> = children.iter().map(|image| key_of(child, image)).collect();
                    self.remove(tables, &fk.child, &keys, &why, depth + 1)?;
                }
                Orphan::SetNull => self.null_references(child, fk, children, &why)?,
            }
        }
        Ok(())
    }

    /// Whether the origin transaction of `events[event]` also changes row `pk` of `table`.
    fn changed_by(&self, event: usize, table: &str, pk: &Value) -> bool {
        let (origin, seq) = (self.events[event].origin, self.events[event].seq);
        self.events.iter().any(|e| e.origin == origin && e.seq == seq && e.table == table && e.pk == *pk)
    }

    /// `ON DELETE SET NULL` children of a parent about to be deleted lose the reference.
    fn null_references(&mut self, child: &Table, fk: &ForeignKey, rows: Vec<Row>, why: &Why) -> Result<(), SyncError> {
        for old in rows {
            let key = key_of(child, &old);
            let mut nulled = old.clone();
            let mut before = Row::new();
            for c in &fk.child_columns {
                if let Some(v) = nulled.insert(c.clone(), Value::Null) {
                    before.insert(c.clone(), v);
                }
            }
            {
                let _guard = Applying::start();
                set_null(child, &fk.child_columns, &key)?;
            }
            let nulled = Arc::new(nulled);
            let rec = self.record(child, Op::Update, format!("[[{}, {}]]", json!(nulled), json!(before)))?;
            let key = jsonb_text(&key);
            let written = Some(before.keys().cloned().collect());
            self.register(&fk.child, &key, &rec, Some((nulled.clone(), written)));
            self.settled(why, &fk.child, &key, Some(Arc::new(old)), Some(nulled));
        }
        Ok(())
    }

    /// Record a change of this node's (a part of one row) that settles a race.
    fn record(&mut self, t: &Table, op: Op, rows: String) -> Result<Recorded, SyncError> {
        let events = self.events;
        let seen = self.seen.get_or_insert_with(|| {
            // Resolution changes come after what they settle, in every node's clock order too.
            if let Some(top) = events.iter().map(|e| e.hlc).max() {
                clock::observe(Hlc::from_i64(top));
            }
            let mut seen: Vec<(Uuid, i64)> = events.iter().map(|e| (e.origin, e.seq)).collect();
            seen.dedup();
            seen
        });
        let ext = clock::ext();
        let pk = serde_json::to_string(&t.pk).expect("strings serialise");
        let op = match op {
            Op::Insert => "INSERT",
            Op::Update => "UPDATE",
            Op::Delete => "DELETE",
        };
        xact::add_resolution(&ext, &t.name, &pk, Part { op, n: 1, rows }, seen)
    }

    /// The row's register is now this node's change alone (it has seen every version held).
    fn register(&mut self, table: &str, key: &str, rec: &Recorded, row: Option<(Image, Option<BTreeSet<String>>)>) {
        let (row, written) = match row {
            Some((r, w)) => (Some(r), w),
            None => (None, None),
        };
        let v = Version {
            origin: self.me,
            seq: rec.seq,
            idx: rec.idx,
            hlc: Hlc::from_i64(rec.hlc),
            context: Default::default(),
            row,
            written,
        };
        let stored = Stored::from_version(&v, self.me, false);
        self.changed.insert((table.to_string(), key.to_string()));
        self.out.registers.push(Register { table: table.to_string(), key: key.to_string(), stored });
    }

    fn settled(&mut self, why: &Why, table: &str, key: &str, local: Option<Image>, result: Option<Image>) {
        self.out.settled.push(Settled {
            kind: why.kind,
            table: table.to_string(),
            key: key.to_string(),
            local,
            event: why.event,
            result,
            winner: why.winner,
            note: why.note.clone(),
        });
    }

    fn constraints_of(&mut self, tables: &HashMap<String, Table>, t: &Table) -> Result<Rc<Constraints>, SyncError> {
        if let Some(c) = self.constraints.get(&t.relid) {
            return Ok(c.clone());
        }
        let c = Rc::new(load(t, tables)?);
        self.constraints.insert(t.relid, c.clone());
        Ok(c)
    }

    /// The foreign key of `row` whose parent row this node deleted (its register ends in a
    /// delete). A parent that is missing for another reason (its transaction is held, or its
    /// table is not tracked) is not a race: the row fails, and its transaction is held.
    fn deleted_parent<'c>(
        &self,
        tables: &HashMap<String, Table>,
        c: &'c Constraints,
        row: &Row,
    ) -> Result<Option<&'c ForeignKey>, SyncError> {
        for fk in &c.parents {
            let Some(parent) = tables.get(&fk.parent) else { continue };
            let values: Vec<&Value> = fk.child_columns.iter().filter_map(|col| row.get(col)).collect();
            if values.len() != fk.child_columns.len() || values.iter().any(|v| v.is_null()) {
                continue;
            }
            // Only a reference to the parent's primary key names its register.
            if fk.parent_columns != parent.pk {
                continue;
            }
            let pk: Row = fk.parent_columns.iter().cloned().zip(values.into_iter().cloned()).collect();
            let pk = Value::Object(pk);
            if exists(parent, &pk)? {
                continue;
            }
            let key = jsonb_text(&pk);
            let held = super::rows::load_registers(self.schema, parent.relid, &[key.as_str()])?;
            let deleted = held
                .into_iter()
                .flatten()
                .flat_map(|h| h.stored)
                .max_by_key(|s| s.causal(self.me).lww_key())
                .is_some_and(|s| s.d);
            if deleted {
                return Ok(Some(fk));
            }
        }
        Ok(None)
    }

    /// Rows of `t` other than `row`'s that hold one of its unique values: (key text, image).
    fn holders(&self, t: &Table, c: &Constraints, row: &Row) -> Result<Vec<(String, Image)>, SyncError> {
        let mut out: Vec<(String, Image)> = Vec::new();
        for columns in &c.unique {
            // NULLs never collide in a unique index.
            if columns.iter().any(|col| row.get(col).is_none_or(Value::is_null)) {
                continue;
            }
            let sql = format!(
                "SELECT {image} FROM {tbl} x, jsonb_populate_record(NULL::{tbl}, $1::jsonb) k \
                  WHERE {same} AND NOT ({key})",
                image = image_expr(t),
                tbl = t.name,
                same = equal_on(columns, "x", "k", |c| c),
                key = equal_on(&t.pk, "x", "k", |c| c),
            );
            let images = plans::query(&sql, &[json!(row).to_string().into(), t.exclude.clone().into()], read_images)?;
            for image in images {
                let key = jsonb_text(&key_of(t, &image));
                if !out.iter().any(|(k, _)| *k == key) {
                    out.push((key, Arc::new(image)));
                }
            }
        }
        Ok(out)
    }
}

pub(super) fn was_changed(changed: &Changed, table: &str, key: &str) -> bool {
    !changed.is_empty() && changed.contains(&(table.to_string(), key.to_string()))
}

/// The primary key of a row image, as events carry it.
fn key_of(t: &Table, image: &Row) -> Value {
    Value::Object(t.pk.iter().filter_map(|c| image.get(c).map(|v| (c.clone(), v.clone()))).collect())
}

/// `a.c = b.c AND ...` for columns `cols` (`b`'s column named by `other`).
fn equal_on<'c>(cols: &'c [String], a: &str, b: &str, other: impl Fn(&'c String) -> &'c String) -> String {
    cols.iter()
        .map(|c| format!("{a}.{} = {b}.{}", quote_ident(c), quote_ident(other(c))))
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// Rows whose first column is a row image as text (`image_expr`).
fn read_images(rows: pgrx::spi::SpiTupleTable) -> Result<Vec<Row>, SyncError> {
    let mut out = Vec::new();
    for r in rows {
        let text: &str = r.get(1)?.expect("row");
        out.push(serde_json::from_str(text).map_err(|e| SyncError::BadBatch(e.to_string()))?);
    }
    Ok(out)
}

fn exists(t: &Table, pk: &Value) -> Result<bool, SyncError> {
    let on = equal_on(&t.pk, "x", "k", |c| c);
    let sql = format!(
        "SELECT EXISTS (SELECT 1 FROM {tbl} x, jsonb_populate_record(NULL::{tbl}, $1::jsonb) k WHERE {on})",
        tbl = t.name
    );
    plans::query(&sql, &[pk.to_string().into()], |rows| Ok(rows.first().get_one::<bool>()?.unwrap_or(false)))
}

/// Delete rows `pks` of `t`; returns the images of the rows deleted.
fn delete_returning(t: &Table, pks: &[Value]) -> Result<Vec<Row>, SyncError> {
    let pk = t.pk.iter().map(|c| quote_ident(c)).collect::<Vec<_>>().join(", ");
    let sql = format!(
        "DELETE FROM {tbl} x WHERE ({pk}) IN (SELECT {pk} FROM jsonb_populate_recordset(NULL::{tbl}, $1::jsonb)) \
         RETURNING {image}",
        tbl = t.name,
        image = image_expr(t),
    );
    plans::query(&sql, &[json!(pks).to_string().into(), t.exclude.clone().into()], read_images)
}

/// `child`'s rows (as capture records them) that refer through `fk` to rows `pks` of `parent`.
fn referring(parent: &Table, child: &Table, fk: &ForeignKey, pks: &[Value]) -> Result<Vec<Row>, SyncError> {
    let parent_of = |c: &String| &fk.parent_columns[fk.child_columns.iter().position(|x| x == c).expect("listed")];
    let join = equal_on(&fk.child_columns, "x", "p", parent_of);
    let on = equal_on(&parent.pk, "p", "k", |c| c);
    let sql = format!(
        "SELECT {image} FROM {ctbl} x JOIN {ptbl} p ON {join} \
          WHERE EXISTS (SELECT 1 FROM jsonb_populate_recordset(NULL::{ptbl}, $1::jsonb) k WHERE {on})",
        image = image_expr(child),
        ctbl = child.name,
        ptbl = parent.name,
    );
    plans::query(&sql, &[json!(pks).to_string().into(), child.exclude.clone().into()], read_images)
}

/// Set `columns` of row `pk` of `t` to NULL.
fn set_null(t: &Table, columns: &[String], pk: &Value) -> Result<(), SyncError> {
    let set = columns.iter().map(|c| format!("{} = NULL", quote_ident(c))).collect::<Vec<_>>().join(", ");
    let on = equal_on(&t.pk, "x", "k", |c| c);
    let sql = format!(
        "UPDATE {tbl} x SET {set} FROM jsonb_populate_record(NULL::{tbl}, $1::jsonb) k WHERE {on}",
        tbl = t.name
    );
    plans::run(&sql, &[pk.to_string().into()])
}

/// A table's unique constraints and foreign keys, from the catalog. Tables are named as
/// `sync_tables` names them, so tracked ones are found in `tables`.
fn load(t: &Table, tables: &HashMap<String, Table>) -> Result<Constraints, SyncError> {
    let mut c = Constraints::default();
    let unique = "SELECT array_agg(a.attname::text ORDER BY k.n) \
                    FROM pg_index i CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, n) \
                    JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
                   WHERE i.indrelid = $1 AND i.indisunique AND NOT i.indisprimary \
                     AND i.indpred IS NULL AND i.indexprs IS NULL \
                   GROUP BY i.indexrelid";
    plans::query(unique, &[t.relid.into()], |rows| {
        for r in rows {
            c.unique.push(r.get::<Vec<String>>(1)?.unwrap_or_default());
        }
        Ok(())
    })?;
    let columns = |rel: &str, keys: &str| {
        format!(
            "ARRAY(SELECT a.attname::text FROM unnest(f.{keys}) WITH ORDINALITY AS k(attnum, n) \
                     JOIN pg_attribute a ON a.attrelid = f.{rel} AND a.attnum = k.attnum ORDER BY k.n)"
        )
    };
    // Named as capture names tables (`capture::table_spec`).
    let name = |rel: &str| {
        format!(
            "(SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c \
               JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = f.{rel})"
        )
    };
    let fks = format!(
        "SELECT {child_name}, {child}, {parent_name}, {parent}, f.confdeltype::text \
           FROM pg_constraint f WHERE f.contype = 'f' AND (f.conrelid = $1 OR f.confrelid = $1)",
        child_name = name("conrelid"),
        child = columns("conrelid", "conkey"),
        parent_name = name("confrelid"),
        parent = columns("confrelid", "confkey"),
    );
    plans::query(&fks, &[t.relid.into()], |rows| {
        for r in rows {
            let action: String = r.get(5)?.unwrap_or_default();
            let fk = ForeignKey {
                child: r.get(1)?.unwrap_or_default(),
                child_columns: r.get(2)?.unwrap_or_default(),
                parent: r.get(3)?.unwrap_or_default(),
                parent_columns: r.get(4)?.unwrap_or_default(),
                orphan: Orphan::of(action.chars().next().unwrap_or('a')),
            };
            if fk.parent == t.name && tables.contains_key(&fk.child) {
                c.children.push(fk.clone());
            }
            if fk.child == t.name {
                c.parents.push(fk);
            }
        }
        Ok(())
    })?;
    Ok(c)
}
