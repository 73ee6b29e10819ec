//! The SQL text of the capture statements, generated once per tracked table and operation and
//! then kept as a prepared plan. Pure string building, no database access.
//!
//! Capture runs as AFTER ... FOR EACH STATEMENT triggers with transition tables. A statement
//! yields at most three parts (its UPDATEs, DELETEs and INSERTs), however many rows it touched,
//! each a JSON array of row images; and
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

/// The `&'static` name of an operation read back from SQL.
pub fn op_name(op: &str) -> &'static str {
    match op {
        "INSERT" => "INSERT",
        "UPDATE" => "UPDATE",
        _ => "DELETE",
    }
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

fn filter_where(spec: &TableSpec) -> String {
    spec.filter.as_ref().map(|f| format!(" WHERE ({f})")).unwrap_or_default()
}

fn filter_match(spec: &TableSpec) -> String {
    spec.filter.as_ref().map(|f| format!("coalesce(({f}), false)")).unwrap_or_else(|| "true".into())
}

/// The SQL path's statement (tables with a row filter or excluded columns, and the rows
/// present when a table is first tracked): returns the statement's parts as rows
/// `(op, n, rows)`, in the order they must be applied, only the non-empty ones.
pub fn capture_statement(spec: &TableSpec, source: Source) -> String {
    let row = row_json(spec);
    match source {
        Source::Inserted | Source::Existing | Source::Deleted => {
            let (op, from) = match source {
                Source::Existing => ("INSERT", spec.qualified.as_str()),
                Source::Inserted => ("INSERT", NEW_TABLE),
                _ => ("DELETE", OLD_TABLE),
            };
            format!(
                "SELECT '{op}'::text, count(*)::int, json_agg({row}) FROM {from} {ROW}{w} HAVING count(*) > 0",
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
               SELECT 1 AS ord, 'UPDATE'::text AS op, count(*)::int AS n, \
                      json_agg(json_build_array(nj, (SELECT json_object_agg(a.key, a.value) \
                                                       FROM json_each(oj) a JOIN json_each(nj) b USING (key) \
                                                      WHERE a.value::text IS DISTINCT FROM b.value::text))) AS rows \
                 FROM p WHERE ok IS NOT DISTINCT FROM nk AND nm \
               UNION ALL SELECT 2, 'DELETE', count(*)::int, json_agg(oj) \
                 FROM p WHERE om AND (ok IS DISTINCT FROM nk OR NOT nm) \
               UNION ALL SELECT 3, 'INSERT', count(*)::int, json_agg(nj) \
                 FROM p WHERE ok IS DISTINCT FROM nk AND nm) \
             SELECT op, n, rows FROM parts WHERE n > 0 ORDER BY ord",
            key = pk_row(spec),
            m = filter_match(spec)
        ),
    }
}
