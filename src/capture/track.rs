//! Table tracking: `sync_track_table`, `sync_untrack_table`, `sync_track_schema`.
//!
//! Tracking installs the capture triggers, records the table in `sync_tables`, and captures the
//! rows already present as INSERT events so that peers receive them. The trigger arguments
//! carry the row filter and excluded columns, so cached capture plans follow any change.

use super::fast::KeyAttr;
use super::sql::{ROW, Source, TableSpec, quote_literal};
use crate::clock;
use crate::error::{SyncError, SyncResult};
use pgrx::PgRelation;
use pgrx::prelude::*;
use sync_bridge::resolve::Strategy;

const TRIGGERS: [(&str, &str); 3] = [
    ("peersync_capture_insert", "AFTER INSERT ON {t} REFERENCING NEW TABLE AS __peersync_new"),
    (
        "peersync_capture_update",
        "AFTER UPDATE ON {t} REFERENCING OLD TABLE AS __peersync_old NEW TABLE AS __peersync_new",
    ),
    ("peersync_capture_delete", "AFTER DELETE ON {t} REFERENCING OLD TABLE AS __peersync_old"),
];
const TRUNCATE_TRIGGER: &str = "peersync_refuse_truncate";

/// Build the capture spec of `relid` from the catalog and the trigger arguments
/// `[row filter or '', excluded columns as a JSON array]`.
pub fn table_spec(relid: pg_sys::Oid, args: &[String]) -> Result<TableSpec, SyncError> {
    let (qualified, pk, pk_attrs) = Spi::connect(|client| {
        let row = client
            .select(
                "SELECT format('%I.%I', n.nspname, c.relname), k.names, k.nums, k.byvals, k.lens \
                   FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                   LEFT JOIN LATERAL ( \
                     SELECT array_agg(a.attname::text ORDER BY k.ord) AS names, \
                            array_agg(a.attnum::int ORDER BY k.ord) AS nums, \
                            array_agg(a.attbyval ORDER BY k.ord) AS byvals, \
                            array_agg(a.attlen::int ORDER BY k.ord) AS lens \
                       FROM pg_index i \
                      CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY k(attnum, ord) \
                       JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
                      WHERE i.indrelid = c.oid AND i.indisprimary) k ON true \
                  WHERE c.oid = $1",
                None,
                &[relid.into()],
            )?
            .first();
        let names: Vec<String> = row.get(2)?.unwrap_or_default();
        let nums: Vec<i32> = row.get(3)?.unwrap_or_default();
        let byvals: Vec<bool> = row.get(4)?.unwrap_or_default();
        let lens: Vec<i32> = row.get(5)?.unwrap_or_default();
        let attrs =
            (0..nums.len()).map(|i| KeyAttr { attnum: nums[i], byval: byvals[i], len: lens[i] as i16 }).collect();
        Ok::<_, SyncError>((row.get::<String>(1)?.unwrap_or_default(), names, attrs))
    })?;
    let filter = args.first().filter(|f| !f.is_empty()).cloned();
    let exclude: Vec<String> = args.get(1).and_then(|e| serde_json::from_str(e).ok()).unwrap_or_default();
    Ok(TableSpec { qualified, pk, pk_attrs, exclude, filter })
}

/// The table's name as PostgreSQL shows it (schema-qualified only when not on the search path),
/// for messages.
pub fn display_name(relid: pg_sys::Oid) -> Result<String, SyncError> {
    Ok(Spi::get_one_with_args::<String>("SELECT $1::regclass::text", &[relid.into()])?.unwrap_or_default())
}

pub fn check_strategy(strategy: &str) -> Result<Strategy, SyncError> {
    Strategy::parse(strategy).ok_or_else(|| SyncError::UnknownStrategy(strategy.into()))
}

/// Refuse what cannot be tracked: non-tables and the extension's own tables.
fn check_trackable(relid: pg_sys::Oid, name: &str) -> Result<(), SyncError> {
    let (relkind, own, inherits) = Spi::connect(|client| {
        let row = client
            .select(
                "SELECT c.relkind::text, EXISTS (SELECT 1 FROM pg_depend d JOIN pg_extension e ON e.oid = d.refobjid \
                         WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e' \
                           AND e.extname = 'pg_peersync'), \
                        EXISTS (SELECT 1 FROM pg_inherits i WHERE i.inhrelid = c.oid OR i.inhparent = c.oid) \
                   FROM pg_class c WHERE c.oid = $1",
                None,
                &[relid.into()],
            )?
            .first();
        Ok::<_, SyncError>((
            row.get::<String>(1)?.unwrap_or_default(),
            row.get::<bool>(2)?.unwrap_or(false),
            row.get::<bool>(3)?.unwrap_or(false),
        ))
    })?;
    if own {
        return Err(SyncError::OwnTable(name.into()));
    }
    // Statement triggers fire only for the table a statement names, so a write through a
    // parent would be captured under the parent's name and a direct write under the child's:
    // one row, two identities. Refused until capture handles the hierarchy as one table.
    if relkind == "p" || inherits {
        return Err(SyncError::Partitioned(name.into()));
    }
    if relkind != "r" {
        return Err(SyncError::NotATable(name.into()));
    }
    Ok(())
}

fn check_columns(relid: pg_sys::Oid, spec: &TableSpec) -> Result<(), SyncError> {
    let columns: Vec<String> = Spi::get_one_with_args(
        "SELECT array_agg(attname::text) FROM pg_attribute WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped",
        &[relid.into()],
    )?
    .unwrap_or_default();
    for c in &spec.exclude {
        if !columns.contains(c) {
            return Err(SyncError::UnknownColumn { table: spec.qualified.clone(), column: c.clone() });
        }
        if spec.pk.contains(c) {
            return Err(SyncError::ExcludedKey { table: spec.qualified.clone(), column: c.clone() });
        }
    }
    Ok(())
}

#[pg_extern]
fn sync_track_table(
    tbl: PgRelation,
    strategy: default!(&str, "'lww'"),
    row_filter: default!(Option<&str>, "NULL"),
    exclude_columns: default!(Vec<String>, "'{}'"),
    existing_rows: default!(&str, "'capture'"),
) -> SyncResult<()> {
    track(tbl.oid(), strategy, row_filter, exclude_columns, existing_rows)
}

/// What tracking does with the rows a table already holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Existing {
    /// Captured as this node's inserts: every peer receives them.
    Capture,
    /// Not captured: every node already holds the same rows (restored from one dump).
    Shared,
}

impl Existing {
    fn parse(s: &str) -> Result<Existing, SyncError> {
        match s {
            "capture" => Ok(Existing::Capture),
            "shared" => Ok(Existing::Shared),
            other => Err(SyncError::BadExistingRows(other.to_string())),
        }
    }
}

fn track(
    tbl: pg_sys::Oid,
    strategy: &str,
    row_filter: Option<&str>,
    exclude: Vec<String>,
    existing: &str,
) -> SyncResult<()> {
    let existing = Existing::parse(existing)?;
    let strategy = check_strategy(strategy)?;
    let ext = clock::ext();
    let name = display_name(tbl)?;
    check_trackable(tbl, &name)?;
    let filter = row_filter.map(str::trim).filter(|f| !f.is_empty()).map(str::to_owned);
    let args = vec![filter.clone().unwrap_or_default(), serde_json::to_string(&exclude).expect("strings serialise")];
    let spec = table_spec(tbl, &args)?;
    if spec.pk.is_empty() {
        return Err(SyncError::NoPrimaryKey(spec.qualified).into());
    }
    check_columns(tbl, &spec)?;
    let t = &spec.qualified;
    Spi::connect_mut(|client| {
        // Writers wait while triggers are installed and existing rows are captured, so no
        // change falls between the snapshot of existing rows and the triggers.
        client.update(&format!("LOCK TABLE {t} IN SHARE ROW EXCLUSIVE MODE"), None, &[])?;
        if let Some(f) = &filter {
            // Fails with PostgreSQL's own error (syntax, unknown column, type) before anything changes.
            client.update(&format!("SELECT ({f})::boolean FROM {t} {ROW} LIMIT 0"), None, &[])?;
        }
        if strategy == Strategy::Custom {
            // The resolver is named with sync_set_strategy(); keep it if already set.
            let has: bool = client
                .select(
                    &format!(
                        "SELECT EXISTS (SELECT 1 FROM {}.sync_tables WHERE relid = $1 AND resolver IS NOT NULL)",
                        ext.schema
                    ),
                    None,
                    &[tbl.into()],
                )?
                .first()
                .get_one()?
                .unwrap_or(false);
            if !has {
                return Err(SyncError::NoResolver(t.clone()));
            }
        }
        let already: bool = client
            .select(
                &format!("SELECT EXISTS (SELECT 1 FROM {}.sync_tables WHERE relid = $1)", ext.schema),
                None,
                &[tbl.into()],
            )?
            .first()
            .get_one()?
            .unwrap_or(false);
        client.update(
            &format!(
                "INSERT INTO {s}.sync_tables (relid, table_name, strategy, row_filter, exclude_columns, pk_columns) \
                 VALUES ($1, $2, $3, $4, $5, $6) \
                 ON CONFLICT (relid) DO UPDATE SET table_name = EXCLUDED.table_name, strategy = EXCLUDED.strategy, \
                   row_filter = EXCLUDED.row_filter, exclude_columns = EXCLUDED.exclude_columns, \
                   pk_columns = EXCLUDED.pk_columns",
                s = ext.schema
            ),
            None,
            &[
                tbl.into(),
                t.clone().into(),
                strategy.name().into(),
                filter.clone().into(),
                exclude.clone().into(),
                spec.pk.clone().into(),
            ],
        )?;
        let fn_args = format!("{}, {}", quote_literal(&args[0]), quote_literal(&args[1]));
        for (trig, when) in TRIGGERS {
            client.update(&format!("DROP TRIGGER IF EXISTS {trig} ON {t}"), None, &[])?;
            client.update(
                &format!(
                    "CREATE TRIGGER {trig} {} FOR EACH STATEMENT EXECUTE FUNCTION {}._sync_capture({fn_args})",
                    when.replace("{t}", t),
                    ext.schema
                ),
                None,
                &[],
            )?;
        }
        client.update(&format!("DROP TRIGGER IF EXISTS {TRUNCATE_TRIGGER} ON {t}"), None, &[])?;
        client.update(
            &format!(
                "CREATE TRIGGER {TRUNCATE_TRIGGER} BEFORE TRUNCATE ON {t} FOR EACH STATEMENT \
                 EXECUTE FUNCTION {}._sync_refuse_truncate()",
                ext.schema
            ),
            None,
            &[],
        )?;
        match (already, existing) {
            (true, _) => {}
            (false, Existing::Capture) => {
                super::capture(tbl, Source::Existing, PgTriggerOperation::Insert, &args, None)?;
            }
            (false, Existing::Shared) => {
                client.update(
                    &format!("UPDATE {}.sync_tables SET shared_rows = true WHERE relid = $1", ext.schema),
                    None,
                    &[tbl.into()],
                )?;
            }
        }
        Ok::<_, SyncError>(())
    })?;
    super::ids::warn_if_shared(tbl, &name)?;
    Ok(())
}

#[pg_extern]
fn sync_untrack_table(tbl: PgRelation) -> SyncResult<()> {
    let tbl = tbl.oid();
    let ext = clock::ext();
    let name = display_name(tbl)?;
    Spi::connect_mut(|client| {
        let removed = client.update(
            &format!("DELETE FROM {}.sync_tables WHERE relid = $1 RETURNING table_name", ext.schema),
            None,
            &[tbl.into()],
        )?;
        if removed.is_empty() {
            return Err(SyncError::NotTracked(name.clone()));
        }
        let qualified: String = removed.first().get_one()?.unwrap_or_default();
        client.update(&format!("DELETE FROM {}.sync_rows WHERE relid = $1", ext.schema), None, &[tbl.into()])?;
        for trig in TRIGGERS.iter().map(|(n, _)| *n).chain([TRUNCATE_TRIGGER]) {
            client.update(&format!("DROP TRIGGER IF EXISTS {trig} ON {qualified}"), None, &[])?;
        }
        Ok(())
    })?;
    Ok(())
}

/// Track every table of `schema` that has a primary key (except those named in `exclude`);
/// tables without one are skipped with a WARNING; partitioned and inherited tables are left
/// out (see `check_trackable`). Tables already tracked keep their settings. Returns how many tables were newly tracked.
#[pg_extern]
fn sync_track_schema(schema: &str, exclude: default!(Vec<String>, "'{}'")) -> SyncResult<i32> {
    let ext = clock::ext();
    let tables: Vec<(pg_sys::Oid, String, bool)> = Spi::connect(|client| {
        let query = format!(
            "SELECT c.oid, format('%I.%I', n.nspname, c.relname), \
                    EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary) \
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
              WHERE n.nspname = $1 AND c.relkind = 'r' \
                AND NOT EXISTS (SELECT 1 FROM pg_inherits i WHERE i.inhrelid = c.oid OR i.inhparent = c.oid) \
                AND NOT (c.relname = ANY ($2)) \
                AND NOT EXISTS (SELECT 1 FROM {s}.sync_tables t WHERE t.relid = c.oid) \
                AND NOT EXISTS (SELECT 1 FROM pg_depend d JOIN pg_extension e ON e.oid = d.refobjid \
                                 WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid \
                                   AND d.deptype = 'e' AND e.extname = 'pg_peersync') \
              ORDER BY c.relname",
            s = ext.schema
        );
        let rows = client.select(&query, None, &[schema.into(), exclude.into()])?;
        let mut out = Vec::new();
        for row in rows {
            out.push((row.get(1)?.unwrap(), row.get(2)?.unwrap(), row.get(3)?.unwrap_or(false)));
        }
        Ok::<_, SyncError>(out)
    })?;
    let mut tracked = 0;
    for (oid, name, has_pk) in tables {
        if !has_pk {
            pgrx::warning!("pg_peersync: skipping {name}: it has no primary key");
            continue;
        }
        track(oid, "lww", None, vec![], "capture")?;
        tracked += 1;
    }
    Ok(tracked)
}

/// An order-independent digest of a tracked table's captured content: the captured columns
/// of the rows that match its filter. Nodes that have converged report the same digest; any
/// captured value that differs changes it.
#[pg_extern]
fn sync_table_digest(tbl: PgRelation) -> SyncResult<String> {
    let ext = clock::ext();
    let relid = tbl.oid();
    let name = display_name(relid)?;
    let digest = Spi::connect(|client| {
        let rows = client.select(
            &format!("SELECT table_name, row_filter, exclude_columns FROM {}.sync_tables WHERE relid = $1", ext.schema),
            None,
            &[relid.into()],
        )?;
        if rows.is_empty() {
            return Err(SyncError::NotTracked(name.clone()));
        }
        let row = rows.first();
        let qualified: String = row.get(1)?.unwrap_or_default();
        let filter = row.get::<String>(2)?.map(|f| format!(" WHERE ({f})")).unwrap_or_default();
        let exclude: Vec<String> = row.get(3)?.unwrap_or_default();
        // Each row's canonical jsonb text is hashed; the sorted hashes are hashed again.
        let query = format!(
            "SELECT encode(sha256(convert_to(coalesce(string_agg(h, '' ORDER BY h), ''), 'UTF8')), 'hex') \
               FROM (SELECT encode(sha256(convert_to((to_jsonb({ROW}.*) - $1::text[])::text, 'UTF8')), 'hex') AS h \
                       FROM {qualified} {ROW}{filter}) s"
        );
        Ok(client.select(&query, None, &[exclude.into()])?.first().get_one::<String>()?.unwrap_or_default())
    })?;
    Ok(digest)
}
