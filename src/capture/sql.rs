//! The SQL text of the capture statements, generated once per tracked table and operation and
//! then kept as a prepared plan. Pure string building, no database access.
//!
//! Capture runs as AFTER ... FOR EACH STATEMENT triggers with transition tables: one set-based
//! `INSERT INTO sync_events SELECT ...` per statement, however many rows it touched, and
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

/// `to_jsonb(t)` without the excluded columns.
fn row_json(spec: &TableSpec) -> String {
    if spec.exclude.is_empty() {
        format!("to_jsonb({ROW}.*)")
    } else {
        let cols: Vec<String> = spec.exclude.iter().map(|c| quote_literal(c)).collect();
        format!("(to_jsonb({ROW}.*) - ARRAY[{}]::text[])", cols.join(", "))
    }
}

/// The primary key as a JSON object, taken from a row image `j`.
fn pk_json(spec: &TableSpec, j: &str) -> String {
    let parts: Vec<String> =
        spec.pk.iter().map(|c| format!("{lit}, {j}->{lit}", lit = quote_literal(c))).collect();
    format!("jsonb_build_object({})", parts.join(", "))
}

fn filter_where(spec: &TableSpec) -> String {
    spec.filter.as_ref().map(|f| format!(" WHERE ({f})")).unwrap_or_default()
}

fn filter_match(spec: &TableSpec) -> String {
    spec.filter.as_ref().map(|f| format!("coalesce(({f}), false)")).unwrap_or_else(|| "true".into())
}

/// The rows `(op, pk, data, old)` a statement produces, in the order they must be applied.
fn changes(spec: &TableSpec, source: Source) -> String {
    let row = row_json(spec);
    match source {
        Source::Inserted | Source::Existing => {
            let from = if source == Source::Existing { spec.qualified.as_str() } else { NEW_TABLE };
            format!(
                "SELECT 'INSERT'::text AS op, {pk} AS pk, j AS data, NULL::jsonb AS old \
                 FROM (SELECT {row} AS j FROM {from} {ROW}{w}) s",
                pk = pk_json(spec, "j"),
                w = filter_where(spec)
            )
        }
        Source::Deleted => format!(
            "SELECT 'DELETE'::text AS op, {pk} AS pk, NULL::jsonb AS data, j AS old \
             FROM (SELECT {row} AS j FROM {OLD_TABLE} {ROW}{w}) s",
            pk = pk_json(spec, "j"),
            w = filter_where(spec)
        ),
        // Old and new transition rows are stored pairwise, so their positions pair them.
        // A changed primary key becomes DELETE old key + INSERT new key; all of a statement's
        // DELETEs come before its INSERTs so that keys shifted onto each other apply cleanly.
        // A row leaving the filter becomes a DELETE; a row entering it an UPDATE (an upsert).
        Source::Updated => format!(
            "WITH p AS MATERIALIZED ( \
               SELECT o.rn, o.j AS oj, n.j AS nj, o.m AS om, n.m AS nm, {opk} AS opk, {npk} AS npk \
               FROM (SELECT row_number() OVER () AS rn, {row} AS j, {m} AS m FROM {OLD_TABLE} {ROW}) o \
               JOIN (SELECT row_number() OVER () AS rn, {row} AS j, {m} AS m FROM {NEW_TABLE} {ROW}) n \
                 ON n.rn = o.rn \
               WHERE o.j IS DISTINCT FROM n.j) \
             SELECT op, pk, data, old FROM ( \
               SELECT rn, 1 AS k, 'UPDATE'::text AS op, npk AS pk, nj AS data, \
                      (SELECT jsonb_object_agg(x.key, x.value) FROM jsonb_each(oj) x \
                        WHERE nj -> x.key IS DISTINCT FROM x.value) AS old \
                 FROM p WHERE opk = npk AND nm \
               UNION ALL SELECT rn, 1, 'DELETE', opk, NULL::jsonb, oj FROM p WHERE om AND (opk <> npk OR NOT nm) \
               UNION ALL SELECT rn, 2, 'INSERT', npk, nj, NULL::jsonb FROM p WHERE opk <> npk AND nm \
             ) u ORDER BY k, rn",
            opk = pk_json(spec, "o.j"),
            npk = pk_json(spec, "n.j"),
            m = filter_match(spec)
        ),
    }
}

/// The statement that appends a statement's changes to `sync_events`.
///
/// Parameters: `$1` origin uuid, `$2` origin_seq, `$3` index of the statement's first event
/// minus one, `$4` origin xid, `$5` hlc, `$6` vclock. The checksum is sha256 over the jsonb text
/// of `[origin, seq, idx, hlc, table, op, pk, data, old]` (`sync_bridge::Event::canonical_text`).
pub fn capture_statement(schema: &str, spec: &TableSpec, source: Source) -> String {
    let tbl = quote_literal(&spec.qualified);
    format!(
        "INSERT INTO {schema}.sync_events \
           (origin, origin_seq, origin_idx, origin_xact, hlc, table_name, pk, op, data, old, vclock, checksum) \
         SELECT $1, $2, $3 + e.n, $4, $5, {tbl}, e.pk, e.op, e.data, e.old, $6, \
                sha256(convert_to(jsonb_build_array($1, $2, $3 + e.n, $5, {tbl}, e.op, e.pk, e.data, e.old)::text, 'UTF8')) \
         FROM (SELECT (row_number() OVER ())::int AS n, c.* FROM ({changes}) c) e",
        changes = changes(spec, source)
    )
}
