//! The SQL text of the capture statements, generated once per tracked table and operation and
//! then kept as a prepared plan. Pure string building, no database access.
//!
//! Capture runs as AFTER ... FOR EACH STATEMENT triggers with transition tables. Each statement
//! writes at most three `sync_log` rows (its UPDATEs, DELETEs and INSERTs), however many table
//! rows it touched, each holding a JSON array of row images; and
//! PostgreSQL's own `to_jsonb` makes the row images (so every type, domain, enum and array is
//! encoded the way PostgreSQL itself round-trips it through JSON).

/// Name of the transition table holding the rows before the statement.
pub const OLD_TABLE: &str = "__peersync_old";
/// Name of the transition table holding the rows after the statement.
pub const NEW_TABLE: &str = "__peersync_new";
/// Alias of the captured row. A user column may be called anything (even `t`), and a column
/// name would win over a same-named alias in `to_jsonb(t)`; `alias.*` is always the whole row.
pub const ROW: &str = "__peersync_row";

/// What a tracked table's capture needs to know.
#[derive(Clone, Debug, PartialEq)]
pub struct TableSpec {
    /// Quoted, schema-qualified name usable in SQL and stored in events (`public.items`).
    pub qualified: String,
    pub pk: Vec<String>,
    /// Primary-key attributes for the fast path's binary comparison.
    pub pk_attrs: Vec<super::fast::KeyAttr>,
    pub exclude: Vec<String>,
    pub filter: Option<String>,
}

/// Which rows a capture statement reads.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum Source {
    Inserted,
    Updated,
    Deleted,
    /// The rows already in the table when it is first tracked (captured as INSERTs).
    Existing,
}

pub fn quote_literal(s: &str) -> String {
    let body = s.replace('\'', "''");
    if body.contains('\\') { format!("E'{}'", body.replace('\\', "\\\\")) } else { format!("'{body}'") }
}

/// One `sync_log` row's worth of changes: all rows of one kind from one statement.
#[derive(Clone, Debug, PartialEq)]
pub struct Part {
    pub op: &'static str,
    pub n: i32,
    /// JSON array: row images for INSERT and DELETE, `[new, old]` pairs for UPDATE.
    pub rows: String,
}

/// The fast path's statement: one `sync_log` row from parameters.
///
/// `$1` origin, `$2` origin_seq, `$3` first_idx, `$4` n, `$5` origin xid, `$6` hlc, `$7` table,
/// `$8` op, `$9` primary key columns, `$10` vclock, `$11` rows.
pub fn log_insert_statement(schema: &str) -> String {
    format!(
        "INSERT INTO {schema}.sync_log \
           (origin, origin_seq, first_idx, n, origin_xact, hlc, table_name, op, pk_columns, vclock, rows) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
    )
}

/// A row's image as `json`: the whole row exactly as `row_to_json` prints it (what the fast
/// path stores), or without the excluded columns.
fn row_json(spec: &TableSpec) -> String {
    if spec.exclude.is_empty() {
        format!("to_json({ROW}.*)")
    } else {
        let cols: Vec<String> = spec.exclude.iter().map(|c| quote_literal(c)).collect();
        format!("to_json(to_jsonb({ROW}.*) - ARRAY[{}]::text[])", cols.join(", "))
    }
}

/// The row's primary key as a row value, for comparing old and new keys.
fn pk_row(spec: &TableSpec) -> String {
    let cols: Vec<String> = spec.pk.iter().map(|c| format!("{ROW}.\"{}\"", c.replace('"', "\"\""))).collect();
    format!("ROW({})", cols.join(", "))
}

fn pk_columns_literal(spec: &TableSpec) -> String {
    let cols: Vec<String> = spec.pk.iter().map(|c| quote_literal(c)).collect();
    format!("ARRAY[{}]::text[]", cols.join(", "))
}

fn filter_where(spec: &TableSpec) -> String {
    spec.filter.as_ref().map(|f| format!(" WHERE ({f})")).unwrap_or_default()
}

fn filter_match(spec: &TableSpec) -> String {
    spec.filter.as_ref().map(|f| format!("coalesce(({f}), false)")).unwrap_or_else(|| "true".into())
}

/// The statement that appends one statement's changes to `sync_log` (the SQL path, used for
/// tables with a row filter or excluded columns, and for the rows present when a table is first
/// tracked). It writes one row per kind of change and returns each row's change count.
///
/// Parameters: `$1` origin uuid, `$2` origin_seq, `$3` index of the statement's first change
/// minus one, `$4` origin xid, `$5` hlc, `$6` vclock.
pub fn capture_statement(schema: &str, spec: &TableSpec, source: Source) -> String {
    let row = row_json(spec);
    let tbl = quote_literal(&spec.qualified);
    let pkcols = pk_columns_literal(spec);
    let insert = format!(
        "INSERT INTO {schema}.sync_log \
           (origin, origin_seq, first_idx, n, origin_xact, hlc, table_name, op, pk_columns, vclock, rows)"
    );
    match source {
        Source::Inserted | Source::Existing | Source::Deleted => {
            let (op, from) = match source {
                Source::Existing => ("INSERT", spec.qualified.as_str()),
                Source::Inserted => ("INSERT", NEW_TABLE),
                _ => ("DELETE", OLD_TABLE),
            };
            format!(
                "{insert} SELECT $1, $2, $3 + 1, s.n, $4, $5, {tbl}, '{op}', {pkcols}, $6, s.rows \
                 FROM (SELECT count(*)::int AS n, json_agg({row}) AS rows FROM {from} {ROW}{w}) s \
                 WHERE s.n > 0 RETURNING n",
                w = filter_where(spec)
            )
        }
        // Old and new transition rows are stored pairwise, so their positions pair them.
        // Same key, new row in the filter: UPDATE. A changed primary key: DELETE old key +
        // INSERT new key; a row leaving the filter: DELETE. Parts go UPDATE, DELETE, INSERT, so
        // keys shifted onto each other by one statement apply cleanly.
        Source::Updated => format!(
            "WITH p AS MATERIALIZED ( \
               SELECT o.j AS oj, n.j AS nj, o.m AS om, n.m AS nm, o.k AS ok, n.k AS nk \
               FROM (SELECT row_number() OVER () AS rn, {row} AS j, {m} AS m, {key} AS k FROM {OLD_TABLE} {ROW}) o \
               JOIN (SELECT row_number() OVER () AS rn, {row} AS j, {m} AS m, {key} AS k FROM {NEW_TABLE} {ROW}) n \
                 ON n.rn = o.rn \
               WHERE o.j::text IS DISTINCT FROM n.j::text), \
             parts AS ( \
               SELECT 1 AS ord, 'UPDATE'::text AS op, count(*)::int AS n, json_agg(json_build_array(nj, oj)) AS rows \
                 FROM p WHERE ok IS NOT DISTINCT FROM nk AND nm \
               UNION ALL SELECT 2, 'DELETE', count(*)::int, json_agg(oj) \
                 FROM p WHERE om AND (ok IS DISTINCT FROM nk OR NOT nm) \
               UNION ALL SELECT 3, 'INSERT', count(*)::int, json_agg(nj) \
                 FROM p WHERE ok IS DISTINCT FROM nk AND nm) \
             {insert} SELECT $1, $2, \
                 ($3 + 1 + coalesce(sum(n) OVER (ORDER BY ord ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0))::int, \
                 n, $4, $5, {tbl}, op, {pkcols}, $6, rows \
               FROM parts WHERE n > 0 RETURNING n",
            key = pk_row(spec),
            m = filter_match(spec)
        ),
    }
}
