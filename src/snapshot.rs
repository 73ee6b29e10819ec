//! Joining from a snapshot (see `sync_bridge::snapshot` for why a copy taken page by page is
//! safe): what a source serves, and how a joiner loads it.
//!
//! A node joins from a peer's snapshot when it is new (nothing received, nothing written, no
//! registers, some table tracked), when a peer says it no longer keeps changes this node lacks
//! (past the peer's log retention), and when an operator calls `sync_resync(peer)`. While it
//! joins, `sync_node.joining` names the source: capture refuses changes to tracked tables and
//! `sync_apply` refuses batches, so nothing is written that the copy would overwrite. A
//! rejoining node first waits until the source holds everything it holds, so that its own
//! changes survive the copy. A join interrupted (a crash, the source gone) starts again from
//! the beginning.
//!
//! A rows page travels as lines in COPY's text format (`snapshot::split_rows_page`), built by
//! one statement at the source and loaded at the joiner through PostgreSQL's own COPY FROM
//! (`crate::copy`), with `session_replication_role = replica`: no trigger fires (nothing is
//! captured) and foreign keys are not checked (a child copied after its parent was deleted is
//! deleted again by the changes that follow).

use crate::apply::{self, Table, quote_ident};
use crate::capture::sql::quote_literal;
use crate::changes::have_vector;
use crate::clock;
use crate::error::SyncError;
use crate::gucs;
use crate::sequencer;
use pgrx::prelude::*;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use sync_bridge::snapshot::{self, Ask, Finish, Manifest, TableInfo};
use uuid::Uuid;

fn uuid_arg(u: Uuid) -> pgrx::Uuid {
    pgrx::Uuid::from_bytes(*u.as_bytes())
}

/// Per origin, a number read by `sql` (rows of (origin uuid, number bigint)).
fn vector_of(sql: &str) -> Result<BTreeMap<Uuid, i64>, SyncError> {
    Spi::connect(|c| {
        let mut out = BTreeMap::new();
        for row in c.select(sql, None, &[])? {
            if let (Some(o), Some(n)) = (row.get::<pgrx::Uuid>(1)?, row.get::<i64>(2)?) {
                out.insert(Uuid::from_bytes(*o.as_bytes()), n);
            }
        }
        Ok(out)
    })
}

fn to_text(v: &impl serde::Serialize) -> String {
    serde_json::to_string(v).expect("snapshot messages serialise")
}

// ---------------------------------------------------------------------------------------------
// The source

/// A tracked table as a snapshot copies it.
pub(crate) struct Copied {
    pub table: Table,
    pub filter: Option<String>,
    /// Copied columns (captured, not generated) with their types, key columns first in key order.
    pub columns: Vec<(String, String)>,
}

pub(crate) fn copied_tables(schema: &str) -> Result<Vec<Copied>, SyncError> {
    let mut tables: Vec<Table> = apply::load_tables(schema)?.into_values().collect();
    tables.sort_by(|a, b| a.name.cmp(&b.name));
    let mut out = Vec::new();
    for t in tables {
        let filter = Spi::get_one_with_args::<String>(
            &format!("SELECT row_filter FROM {schema}.sync_tables WHERE relid = $1"),
            &[t.relid.into()],
        )?;
        let mut columns = Vec::new();
        Spi::connect(|c| {
            for row in c.select(
                "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a \
                  WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '' \
                  ORDER BY a.attnum",
                None,
                &[t.relid.into()],
            )? {
                let (Some(name), Some(ty)) = (row.get::<String>(1)?, row.get::<String>(2)?) else { continue };
                if !t.exclude.contains(&name) {
                    columns.push((name, ty));
                }
            }
            Ok::<_, SyncError>(())
        })?;
        columns.sort_by_key(|(c, _)| t.pk.iter().position(|k| k == c).unwrap_or(usize::MAX));
        out.push(Copied { table: t, filter, columns });
    }
    Ok(out)
}

/// Answer one snapshot question (the worker, for a peer that joins).
pub fn serve(ask: &Ask) -> Result<String, SyncError> {
    sequencer::require_read_committed("a snapshot")?;
    let ext = clock::ext();
    if ext.joining.is_some() {
        return Err(SyncError::Joining(ext.joining.clone().unwrap_or_default()));
    }
    let s = &ext.schema;
    let find = |name: &str| -> Result<Copied, SyncError> {
        copied_tables(s)?
            .into_iter()
            .find(|c| c.table.name == name)
            .ok_or_else(|| SyncError::NotTracked(name.to_string()))
    };
    match ask {
        Ask::Manifest => manifest(s, ext.node_id),
        Ask::Rows { format, .. } if *format != snapshot::PAGE_FORMAT => Err(SyncError::ServeFormat(*format)),
        Ask::Rows { table, after, limit, .. } => {
            crate::gucs::printing_alike(|| rows_page(s, &find(table)?, after.as_deref(), *limit))
        }
        Ask::Tombstones { table, after, limit } => tombstones_page(s, &find(table)?, after.as_deref(), *limit),
        Ask::Finish => {
            let logged = vector_of(&format!("SELECT origin, max(origin_seq) FROM {s}.sync_log GROUP BY origin"))?;
            let upto = snapshot::cover(&have_vector()?, &logged);
            Ok(to_text(&Finish { upto, hlc: clock::current().0 as i64 }))
        }
    }
}

/// The tables, and the vector to catch up from: the registers are folded first (under the
/// apply lock), then what is still not folded is left out of it.
fn manifest(s: &str, me: Uuid) -> Result<String, SyncError> {
    apply::fold_all()?;
    let have = have_vector()?;
    let unfolded = vector_of(&format!("SELECT origin, min(origin_seq) FROM {s}.sync_unfolded GROUP BY origin"))?;
    let folded = Spi::get_one::<i64>(&format!("SELECT indexed_upto FROM {s}.sync_node"))?.unwrap_or(0);
    let from = snapshot::start_vector(&have, &unfolded, me, folded);
    let logged = Spi::get_one::<i64>(&format!("SELECT coalesce(sum(n), 0)::bigint FROM {s}.sync_log"))?.unwrap_or(0);
    let pruned = Spi::get_one::<bool>(&format!("SELECT EXISTS (SELECT 1 FROM {s}.sync_pruned)"))?.unwrap_or(false);
    let shared = Spi::get_one::<bool>(&format!("SELECT EXISTS (SELECT 1 FROM {s}.sync_tables WHERE shared_rows)"))?
        .unwrap_or(false);
    let mut tables = Vec::new();
    for c in copied_tables(s)? {
        let rows = Spi::get_one_with_args::<i64>(
            "SELECT greatest(reltuples, 0)::bigint FROM pg_class WHERE oid = $1",
            &[c.table.relid.into()],
        )?
        .unwrap_or(0);
        tables.push(TableInfo {
            name: c.table.name.clone(),
            key: c.table.pk.clone(),
            columns: c.columns.iter().map(|(n, _)| n.clone()).collect(),
            rows,
        });
    }
    let page_format = snapshot::PAGE_FORMAT;
    Ok(to_text(&Manifest { source: me, have, from, logged, pruned, shared, page_format, tables }))
}

/// `sync_rows.pk` of the row `alias`, in SQL: the key as jsonb text.
pub(crate) fn key_text(t: &Table, alias: &str) -> String {
    let parts: Vec<String> = t.pk.iter().map(|k| format!("{}, {alias}.{}", quote_literal(k), quote_ident(k))).collect();
    format!("jsonb_build_object({})::text", parts.join(", "))
}

/// `expr` (text) as a value in COPY's text format: backslashes and line breaks escaped, null
/// as `\N`; `plain`: its type never prints them (`snapshot::prints_plain`).
fn copy_value(expr: &str, plain: bool) -> String {
    if plain {
        return format!("coalesce({expr}, '\\N')");
    }
    format!(
        "coalesce(replace(replace(replace(replace({expr}, '\\', '\\\\'), E'\\n', '\\n'), \
         E'\\r', '\\r'), E'\\t', '\\t'), '\\N')"
    )
}

/// The versions of register `r` (`sync_rows`) without the source's entry of each version's
/// context (`l`): it means nothing on the joiner (see `fresh_identity`). Serialized versions
/// put it right after the clock (`h`): where no version keeps a row image (`r`, whose values
/// could look alike), a pattern removes it (checked gone), else the versions are rebuilt, which
/// costs three times as much. Returns the lateral item computing the pattern's result, and
/// the expression (text).
fn without_context() -> (&'static str, &'static str) {
    (
        "LATERAL (SELECT CASE WHEN strpos(r.versions::text, '\"l\":') > 0 AND strpos(r.versions::text, '\"r\":') = 0 \
                   THEN regexp_replace(r.versions::text, '(\"h\":[0-9]+),\"l\":-?[0-9]+', '\\1', 'g') END AS z) q",
        "CASE WHEN strpos(r.versions::text, '\"l\":') = 0 THEN r.versions::text \
              WHEN strpos(q.z, '\"l\":') = 0 THEN q.z \
              ELSE (SELECT json_agg(e::jsonb - 'l')::text FROM json_array_elements(r.versions) e) END",
    )
}

/// Up to `limit` rows after key `after`, each with its register, read by one statement, as a
/// rows page (`snapshot::split_rows_page`). The register is probed per row (`LIMIT 1` keeps the
/// planner from hashing all of `sync_rows` for every page); only `last` needs key order.
fn rows_page(s: &str, c: &Copied, after: Option<&[String]>, limit: i64) -> Result<String, SyncError> {
    let t = &c.table;
    let keys: Vec<String> = t.pk.iter().map(|k| format!("x.{}", quote_ident(k))).collect();
    let mut conds = Vec::new();
    if let Some(f) = &c.filter {
        conds.push(format!("({f})"));
    }
    if after.is_some() {
        let bounds: Vec<String> = c
            .columns
            .iter()
            .take(t.pk.len())
            .enumerate()
            .map(|(i, (_, ty))| format!("($1[{}])::{ty}", i + 1))
            .collect();
        conds.push(format!("({}) > ({})", keys.join(", "), bounds.join(", ")));
    }
    let wher = if conds.is_empty() { String::new() } else { format!("WHERE {}", conds.join(" AND ")) };
    let line: Vec<String> = c
        .columns
        .iter()
        .map(|(n, ty)| copy_value(&format!("x.{}::text", quote_ident(n)), snapshot::prints_plain(ty)))
        .collect();
    let last: Vec<String> = t.pk.iter().map(|k| format!("x.{}::text", quote_ident(k))).collect();
    let (lateral, versions) = without_context();
    let register = [copy_value("p.pk", false), copy_value("r.versions", false), copy_value("r.life", false)];
    let sql = format!(
        "SELECT json_build_object('n', count(*), 'last', (array_agg(p.last ORDER BY p.o DESC))[1])::text \
                || E'\\n' || coalesce(string_agg(p.line, E'\\n') || E'\\n', '') || E'\\\\.\\n' \
                || coalesce(string_agg(CASE WHEN r.versions IS NOT NULL THEN {register} END, E'\\n') || E'\\n', '') \
                || E'\\\\.\\n' \
           FROM (SELECT row_number() OVER (ORDER BY {keys}) AS o, {key} AS pk, json_build_array({last}) AS last, \
                        {line} AS line \
                   FROM {table} x {wher} ORDER BY {keys} LIMIT {limit}) p \
           LEFT JOIN LATERAL (SELECT {versions} AS versions, r.life::text AS life FROM {s}.sync_rows r, {lateral} \
                               WHERE r.relid = {relid}::oid::regclass AND r.pk = p.pk LIMIT 1) r ON true",
        register = register.join(" || E'\\t' || "),
        keys = keys.join(", "),
        key = key_text(t, "x"),
        last = last.join(", "),
        line = line.join(" || E'\\t' || "),
        table = t.name,
        relid = t.relid.to_u32(),
    );
    let after: Vec<String> = after.map(<[String]>::to_vec).unwrap_or_default();
    Ok(Spi::get_one_with_args::<String>(&sql, &[after.into()])?.unwrap_or_default())
}

/// Up to `limit` registers of rows that are gone, after `after` (`sync_rows.pk` order).
fn tombstones_page(s: &str, c: &Copied, after: Option<&str>, limit: i64) -> Result<String, SyncError> {
    let t = &c.table;
    let mut same: Vec<String> =
        t.pk.iter()
            .map(|k| {
                let ty = c.columns.iter().find(|(n, _)| n == k).map(|(_, ty)| ty.as_str()).unwrap_or("text");
                format!("x.{} = (r.pk::jsonb ->> {})::{ty}", quote_ident(k), quote_literal(k))
            })
            .collect();
    if let Some(f) = &c.filter {
        same.push(format!("({f})"));
    }
    let (lateral, versions) = without_context();
    let sql = format!(
        "SELECT json_build_object('n', count(*), 'last', max(pk), 'pk', array_agg(pk), \
                'versions', array_agg(versions), 'life', array_agg(life::text))::text \
           FROM (SELECT r.pk, {versions} AS versions, r.life FROM {s}.sync_rows r, {lateral} \
                  WHERE r.relid = {relid}::oid::regclass AND ($1::text IS NULL OR r.pk > $1::text) \
                    AND NOT EXISTS (SELECT 1 FROM {table} x WHERE {same}) \
                  ORDER BY r.pk LIMIT {limit}) g",
        relid = t.relid.to_u32(),
        table = t.name,
        same = same.join(" AND "),
    );
    Ok(Spi::get_one_with_args::<String>(&sql, &[after.map(str::to_string).into()])?.unwrap_or_default())
}

// ---------------------------------------------------------------------------------------------
// The joiner

/// From whom this node should join now: `Some(None)` from any peer that holds something (it is
/// new), `Some(Some(id))` from that peer (a join under way, or asked for), `None`: it need not.
pub fn wanted() -> Result<Option<Option<Uuid>>, SyncError> {
    let ext = clock::ext();
    if let Some(j) = &ext.joining {
        return Ok(Some(Uuid::parse_str(j).ok()));
    }
    let s = &ext.schema;
    let fresh = Spi::get_one::<bool>(&format!(
        "SELECT NOT EXISTS (SELECT 1 FROM {s}.sync_join) AND NOT EXISTS (SELECT 1 FROM {s}.sync_origins) \
            AND NOT EXISTS (SELECT 1 FROM {s}.sync_log) AND NOT EXISTS (SELECT 1 FROM {s}.sync_rows) \
            AND EXISTS (SELECT 1 FROM {s}.sync_tables) AND NOT EXISTS (SELECT 1 FROM {s}.sync_tables WHERE shared_rows)"
    ))?;
    Ok((fresh == Some(true) && sequencer::committed_prefix(s, ext.node_id)? == 0).then_some(None))
}

/// How a join began.
pub enum Began {
    /// Copy these tables (the source's; this node tracks each with its columns).
    Copy(Vec<TableInfo>),
    /// Nothing to copy: the node need not join (or, new, its peer holds nothing either).
    Nothing,
    /// The source lacks changes only this node holds (origin -> number): it must take them
    /// first. Meanwhile the node is marked joining from it, so that it writes no more.
    SourceLacks(BTreeMap<Uuid, i64>),
}

/// Begin a join from the source of `manifest` (`rejoin`: it no longer keeps what this node
/// lacks): lock the tracked tables, check that nothing would be lost, then empty them, their
/// registers and what was received, and mark the node joining.
pub fn begin(manifest: &Manifest, name: &str, rejoin: bool) -> Result<Began, SyncError> {
    sequencer::require_read_committed("a join")?;
    let ext = clock::ext();
    let s = &ext.schema;
    let here = apply::load_tables(s)?;
    // Writers of tracked tables finish first (and count below); later ones see `joining`.
    let mut names: Vec<&str> = here.values().map(|t| t.name.as_str()).collect();
    names.sort();
    if !names.is_empty() {
        Spi::run(&format!("LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE", names.join(", ")))?;
    }
    let fresh = match wanted()? {
        None if !rejoin => return Ok(Began::Nothing),
        Some(None) if manifest.have.values().all(|n| *n == 0) && !manifest.shared => return Ok(Began::Nothing),
        Some(Some(id)) if id != manifest.source => return Err(SyncError::Joining(id.to_string())),
        w => w == Some(None),
    };
    if fresh && !snapshot::worth_copying(manifest.logged, manifest.pruned, manifest.shared, gucs::join_copy_from()) {
        let why = format!(
            "the peer's log holds {} changes, fewer than peersync.join_copy_from: replaying them is as quick",
            manifest.logged
        );
        decline(s, manifest, name, &why)?;
        return Ok(Began::Nothing);
    }
    if let Err(e) = fits(manifest, &here) {
        if !fresh {
            return Err(e);
        }
        // A new node whose tables differ from the peer's catches up by replaying the changes
        // instead, which holds what does not fit with its reason.
        decline(s, manifest, name, &e.to_string())?;
        return Ok(Began::Nothing);
    }
    let lacks = snapshot::lacking(&manifest.have, &have_vector()?);
    if !lacks.is_empty() {
        Spi::run_with_args(&format!("UPDATE {s}.sync_node SET joining = $1"), &[manifest.source.to_string().into()])?;
        clock::identity_changed();
        return Ok(Began::SourceLacks(lacks));
    }
    let me = fresh_identity(s, ext.node_id)?;
    empty(s, me, manifest, &here)?;
    record_start(s, manifest, name)?;
    if manifest.shared {
        // The copy brings rows no log holds: a node that joins from this one must copy too.
        let names: Vec<String> = manifest.tables.iter().map(|t| t.name.clone()).collect();
        Spi::run_with_args(
            &format!("UPDATE {s}.sync_tables SET shared_rows = true WHERE table_name = ANY($1)"),
            &[names.into()],
        )?;
    }
    sequencer::remote_have_changed();
    clock::identity_changed();
    Ok(Began::Copy(manifest.tables.clone()))
}

/// The identity this node joins under. A register keeps, of each version's causal context,
/// only the holding node's entry (`resolve::Stored::l`): the copied ones say what their writers
/// held of the source, not of this node, so they load without it, which is right only for a node
/// nobody has seen a change of. A node that wrote before (rejoining) therefore takes a new
/// identity; what it wrote is then another origin's history, which the source holds.
fn fresh_identity(s: &str, me: Uuid) -> Result<Uuid, SyncError> {
    let wrote = sequencer::committed_prefix(s, me)? > 0
        || Spi::get_one_with_args::<bool>(
            &format!("SELECT EXISTS (SELECT 1 FROM {s}.sync_log WHERE origin = $1)"),
            &[uuid_arg(me).into()],
        )?
        .unwrap_or(false);
    if !wrote {
        return Ok(me);
    }
    let new = Uuid::new_v4();
    Spi::run_with_args(&format!("UPDATE {s}.sync_node SET id = $1, indexed_upto = 0"), &[uuid_arg(new).into()])?;
    clock::identity_changed();
    sequencer::forget_numbering();
    pgrx::log!("pg_peersync: this node rejoins under a new identity {new}; what it wrote as {me} is kept by its peers");
    Ok(new)
}

/// The source serves pages this node reads, and every table it copies is tracked here, with
/// every column it copies.
fn fits(manifest: &Manifest, here: &HashMap<String, Table>) -> Result<(), SyncError> {
    if manifest.page_format != snapshot::PAGE_FORMAT {
        return Err(SyncError::JoinFormat(manifest.page_format));
    }
    let untracked: Vec<&str> =
        manifest.tables.iter().filter(|t| !here.contains_key(&t.name)).map(|t| t.name.as_str()).collect();
    if !untracked.is_empty() {
        return Err(SyncError::JoinUntracked(untracked.join(", ")));
    }
    for t in &manifest.tables {
        let mine = &here[&t.name];
        if let Some(c) = t.columns.iter().find(|c| !mine.columns.contains(*c) && !mine.exclude.contains(c)) {
            return Err(SyncError::JoinColumn { table: t.name.clone(), column: c.clone() });
        }
    }
    Ok(())
}

/// Remember that this new node catches up by replay, and why (`sync_status() -> 'join'`).
fn decline(s: &str, manifest: &Manifest, name: &str, why: &str) -> Result<(), SyncError> {
    Spi::run_with_args(
        &format!(
            "INSERT INTO {s}.sync_join (source, source_name, started_at, finished_at, start, tables, note) \
             VALUES ($1, $2, clock_timestamp(), clock_timestamp(), '{{}}', '[]', $3)"
        ),
        &[uuid_arg(manifest.source).into(), name.to_string().into(), format!("not copied ({why})").into()],
    )?;
    Ok(())
}

/// Empty the tables the source copies and their registers; forget what was received (it is
/// caught up again from `manifest.from`; `sync_copied` says this node cannot serve what came
/// before, see `changes::batch`).
fn empty(s: &str, me: Uuid, manifest: &Manifest, here: &HashMap<String, Table>) -> Result<(), SyncError> {
    Spi::run("SET LOCAL session_replication_role = replica")?;
    let copied: Vec<&Table> = manifest.tables.iter().map(|t| &here[&t.name]).collect();
    if !copied.is_empty() {
        let names: Vec<&str> = copied.iter().map(|t| t.name.as_str()).collect();
        Spi::run(&format!("TRUNCATE {}", names.join(", ")))?;
        let oids: Vec<String> = copied.iter().map(|t| t.relid.to_u32().to_string()).collect();
        Spi::run(&format!("DELETE FROM {s}.sync_rows WHERE relid::oid = ANY ('{{{}}}'::oid[])", oids.join(",")))?;
    }
    Spi::run_with_args(
        &format!(
            "DELETE FROM {s}.sync_unfolded; DELETE FROM {s}.sync_inbox; \
             DELETE FROM {s}.sync_log WHERE origin <> $1; DELETE FROM {s}.sync_origins; DELETE FROM {s}.sync_pruned; DELETE FROM {s}.sync_copied; \
             INSERT INTO {s}.sync_origins SELECT key::uuid, value::bigint FROM jsonb_each_text($2::jsonb) WHERE key::uuid <> $1; \
             INSERT INTO {s}.sync_copied SELECT key::uuid, value::bigint FROM jsonb_each_text($2::jsonb) WHERE key::uuid <> $1; \
             UPDATE {s}.sync_node SET joining = $3, \
                    indexed_upto = least(indexed_upto, coalesce(($2::jsonb ->> $1::text)::bigint, 0))"
        ),
        &[uuid_arg(me).into(), to_text(&manifest.from).into(), manifest.source.to_string().into()],
    )?;
    Ok(())
}

fn record_start(s: &str, manifest: &Manifest, name: &str) -> Result<(), SyncError> {
    let tables: Vec<Value> = manifest
        .tables
        .iter()
        .map(|t| json!({"table": t.name, "expected": t.rows, "copied": 0, "done": false}))
        .collect();
    Spi::run_with_args(
        &format!(
            "DELETE FROM {s}.sync_join; \
             INSERT INTO {s}.sync_join (source, source_name, started_at, start, tables) \
             VALUES ($1, $2, clock_timestamp(), $3::jsonb, $4::jsonb)"
        ),
        &[
            uuid_arg(manifest.source).into(),
            name.to_string().into(),
            to_text(&manifest.from).into(),
            Value::Array(tables).to_string().into(),
        ],
    )?;
    Ok(())
}

/// Load one page of `table` (`info`, as the source has it): its `n` rows with their registers
/// through COPY, or `tombstones`.
pub fn load(info: &TableInfo, tombstones: bool, n: i64, page: &str) -> Result<(), SyncError> {
    let ext = clock::ext();
    let s = &ext.schema;
    let here = apply::load_tables(s)?;
    let t = here.get(&info.name).ok_or_else(|| SyncError::NotTracked(info.name.clone()))?;
    // No trigger fires (nothing is captured), no foreign key is checked (a child copied after
    // its parent was deleted is deleted again by the changes that follow).
    Spi::run("SET LOCAL session_replication_role = replica")?;
    if tombstones {
        load_tombstones(s, t, n, page)?;
    } else {
        crate::gucs::printing_alike(|| load_rows(s, t, info, page))?;
    }
    Spi::run_with_args(
        &format!(
            "UPDATE {s}.sync_join SET rows_copied = rows_copied + $2, tables = (
                SELECT jsonb_agg(CASE WHEN e ->> 'table' = $1 THEN e || jsonb_build_object(
                           'copied', (e ->> 'copied')::bigint + CASE WHEN $3 THEN 0 ELSE $2 END,
                           'done', $3 AND $4) ELSE e END ORDER BY i)
                  FROM jsonb_array_elements(tables) WITH ORDINALITY AS a(e, i))"
        ),
        &[info.name.clone().into(), n.into(), tombstones.into(), (n < snapshot::PAGE_ROWS).into()],
    )?;
    Ok(())
}

/// A rows page: the rows into the table (the columns this node neither keeps to itself nor
/// computes), their registers into `sync_rows`. Its keys are new here: the copy began with no
/// registers, and each page starts after the last.
fn load_rows(s: &str, t: &Table, info: &TableInfo, page: &str) -> Result<(), SyncError> {
    let page = snapshot::split_rows_page(page).map_err(SyncError::BadBatch)?;
    let keep: Vec<bool> = info.columns.iter().map(|c| !t.exclude.contains(c) && !t.generated.contains(c)).collect();
    let columns: Vec<String> = info.columns.iter().zip(&keep).filter(|(_, k)| **k).map(|(c, _)| c.clone()).collect();
    let rows = if keep.iter().all(|k| *k) {
        std::borrow::Cow::Borrowed(page.rows)
    } else {
        std::borrow::Cow::Owned(snapshot::keep_values(page.rows, &keep))
    };
    crate::copy::copy_from(t.relid, &columns, &rows)?;
    let registers = snapshot::prefix_lines(page.registers, &format!("{}\t", t.relid.to_u32()));
    let (sync_rows, fillfactor) = Spi::get_two::<pg_sys::Oid, String>(&format!(
        "SELECT c.oid, coalesce((SELECT option_value FROM pg_options_to_table(c.reloptions) \
                                  WHERE option_name = 'fillfactor'), '100') \
           FROM pg_class c WHERE c.oid = '{s}.sync_rows'::regclass"
    ))?;
    let (Some(sync_rows), Some(fillfactor)) = (sync_rows, fillfactor) else {
        return Err(SyncError::NotTracked(format!("{s}.sync_rows")));
    };
    let names = ["relid", "pk", "versions", "life"].map(String::from);
    // Copied registers fill their pages: sync_rows leaves most of each page free for the
    // in-place updates of apply, which would triple what a copy writes. A register's first
    // update after the copy moves it to a page with room. The setting is back before commit.
    Spi::run(&format!("ALTER TABLE {s}.sync_rows SET (fillfactor = 100)"))?;
    crate::copy::copy_from(sync_rows, &names, &registers)?;
    Spi::run(&format!("ALTER TABLE {s}.sync_rows SET (fillfactor = {})", fillfactor.parse::<u8>().unwrap_or(100)))?;
    Ok(())
}

/// A tombstones page: registers whose row is gone at the source. A tombstone's key may have
/// been copied as a row just before it went: the row is deleted, the register replaced.
fn load_tombstones(s: &str, t: &Table, n: i64, page: &str) -> Result<(), SyncError> {
    if n == 0 {
        return Ok(());
    }
    let types = column_types(t)?;
    let same: Vec<String> =
        t.pk.iter()
            .map(|k| {
                let ty = types.get(k).map(String::as_str).unwrap_or("text");
                format!("x.{} = (g.p::jsonb ->> {})::{ty}", quote_ident(k), quote_literal(k))
            })
            .collect();
    Spi::run_with_args(
        &format!(
            "WITH j AS MATERIALIZED (SELECT * FROM json_to_record($1::json) AS j(pk text[], versions text[], life text[])), \
                  w AS (DELETE FROM {table} x USING (SELECT unnest(pk) AS p FROM j) g WHERE {same}) \
             INSERT INTO {s}.sync_rows (relid, pk, versions, life) \
             SELECT {relid}::oid::regclass, u.p, u.v::json, u.l::json \
               FROM j, unnest(j.pk, j.versions, j.life) AS u(p, v, l) \
              WHERE u.v IS NOT NULL \
             ON CONFLICT (relid, pk) DO UPDATE SET versions = excluded.versions, life = excluded.life",
            table = t.name,
            same = same.join(" AND "),
            relid = t.relid.to_u32(),
        ),
        &[page.into()],
    )?;
    Ok(())
}

/// A table's columns and their types, as `format_type` prints them (usable in casts).
fn column_types(t: &Table) -> Result<HashMap<String, String>, SyncError> {
    Spi::connect(|c| {
        let mut out = HashMap::new();
        for row in c.select(
            "SELECT attname::text, format_type(atttypid, atttypmod) FROM pg_attribute \
              WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped",
            None,
            &[t.relid.into()],
        )? {
            if let (Some(n), Some(ty)) = (row.get::<String>(1)?, row.get::<String>(2)?) {
                out.insert(n, ty);
            }
        }
        Ok::<_, SyncError>(out)
    })
}

/// End a join: from now on, nothing is applied blind until this node holds `finish.upto`; the
/// clock passes the source's; sequences pass the copied keys; capture and apply resume.
pub fn finish(finish: &Finish) -> Result<i64, SyncError> {
    let ext = clock::ext();
    let s = &ext.schema;
    clock::observe(sync_bridge::Hlc(finish.hlc.max(0) as u64));
    let mut tables = apply::load_tables(s)?;
    for t in tables.values_mut() {
        let types = column_types(t)?;
        for (column, _) in t.sequences.clone() {
            if !matches!(types.get(&column).map(String::as_str), Some("smallint" | "integer" | "bigint")) {
                continue;
            }
            let top = Spi::get_one::<i64>(&format!("SELECT max({})::bigint FROM {}", quote_ident(&column), t.name))?;
            if let Some(top) = top {
                t.written_max.insert(column, top);
            }
        }
    }
    apply::advance_sequences(&tables)?;
    Spi::run_with_args(
        &format!(
            "UPDATE {s}.sync_join SET finished_at = clock_timestamp(), upto = $1::jsonb; \
             UPDATE {s}.sync_node SET joining = NULL"
        ),
        &[to_text(&finish.upto).into()],
    )?;
    let rows = Spi::get_one::<i64>(&format!("SELECT rows_copied FROM {s}.sync_join"))?.unwrap_or(0);
    sequencer::remote_have_changed();
    clock::identity_changed();
    Ok(rows)
}

/// Per origin, up to where this node's data was copied (its log has nothing of it up to there).
pub fn copied_marks(schema: &str) -> Result<BTreeMap<Uuid, i64>, SyncError> {
    vector_of(&format!("SELECT origin, upto FROM {schema}.sync_copied"))
}

/// What a finished join copied cover: nothing is applied blind below it (see the module doc of
/// `sync_bridge::snapshot`).
pub fn copied_upto(schema: &str) -> Result<BTreeMap<Uuid, i64>, SyncError> {
    let text =
        Spi::get_one::<String>(&format!("SELECT (SELECT upto::text FROM {schema}.sync_join WHERE upto IS NOT NULL)"))?;
    Ok(text.and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default())
}

/// `sync_status() -> 'join'`: the last join, or the one under way, with its progress.
pub fn status(schema: &str) -> Result<Value, SyncError> {
    Ok(Spi::get_one::<pgrx::JsonB>(&format!(
        "SELECT (SELECT jsonb_build_object('source', source, 'source_name', source_name,
                'state', CASE WHEN note IS NOT NULL THEN 'declined' WHEN finished_at IS NULL THEN 'copying' ELSE 'done' END,
                'started_at', started_at, 'finished_at', finished_at, 'tables', tables,
                'note', note, 'rows_copied', rows_copied,
                'rows_per_s', round(rows_copied / greatest(extract(epoch FROM
                        coalesce(finished_at, clock_timestamp()) - started_at), 0.001)))
           FROM {schema}.sync_join)"
    ))?
    .map(|j| j.0)
    .unwrap_or(Value::Null))
}

/// Ask this node to copy its tracked tables again from peer `peer` (by id), after that peer
/// has taken everything only this node holds. The worker does it; `sync_status() -> 'join'`
/// shows the progress.
#[pg_extern]
fn sync_resync(peer: pgrx::Uuid) -> crate::error::SyncResult<()> {
    if !unsafe { pg_sys::superuser() } {
        return Err(SyncError::ResyncNotAllowed.into());
    }
    let ext = clock::ext();
    let s = &ext.schema;
    let known = Spi::get_one_with_args::<bool>(
        &format!("SELECT EXISTS (SELECT 1 FROM {s}.sync_peers WHERE id = $1)"),
        &[peer.into()],
    )
    .map_err(SyncError::from)?;
    let id = Uuid::from_bytes(*peer.as_bytes());
    if known != Some(true) {
        return Err(SyncError::UnknownPeer(id.to_string()).into());
    }
    Spi::run_with_args(&format!("UPDATE {s}.sync_node SET joining = $1"), &[id.to_string().into()])
        .map_err(SyncError::from)?;
    clock::identity_changed();
    Ok(())
}
