//! The SQL text of the capture statements, generated once per tracked table and operation and
//! then kept as a prepared plan. Pure string building, no database access.
//!
//! Capture runs as AFTER ... FOR EACH STATEMENT triggers with transition tables: one set-based
//! `INSERT INTO sync_log SELECT ...` per statement, however many rows it touched, writing one
//! row that holds all of the statement's changes; and
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

/// The changes a statement produces, as JSON arrays `[op, pk, data, old]` in column `e`
/// (see `sql/schema.sql` for their meaning), plus the aggregate that collects them in the
/// order they must be applied.
fn elements(spec: &TableSpec, source: Source) -> (String, &'static str) {
    let row = row_json(spec);
    match source {
        Source::Inserted | Source::Existing => {
            let from = if source == Source::Existing { spec.qualified.as_str() } else { NEW_TABLE };
            let sql = format!(
                "SELECT jsonb_build_array('INSERT'::text, {pk}, j, NULL::jsonb) AS e \
                 FROM (SELECT {row} AS j FROM {from} {ROW}{w}) s",
                pk = pk_json(spec, "j"),
                w = filter_where(spec)
            );
            (sql, "jsonb_agg(e)")
        }
        Source::Deleted => {
            let sql = format!(
                "SELECT jsonb_build_array('DELETE'::text, {pk}, NULL::jsonb, j) AS e \
                 FROM (SELECT {row} AS j FROM {OLD_TABLE} {ROW}{w}) s",
                pk = pk_json(spec, "j"),
                w = filter_where(spec)
            );
            (sql, "jsonb_agg(e)")
        }
        // Old and new transition rows are stored pairwise, so their positions pair them.
        // UPDATE keeps the whole old image here; `sync_events` reduces it to the changed columns.
        // A changed primary key becomes DELETE old key + INSERT new key; all of a statement's
        // DELETEs and UPDATEs (k = 1) come before its INSERTs (k = 2), so keys shifted onto each
        // other apply cleanly. A row leaving the filter becomes a DELETE; a row entering it an
        // UPDATE (applied as an upsert).
        Source::Updated => {
            let sql = format!(
                "SELECT x.k, x.e FROM ( \
                   SELECT o.j AS oj, n.j AS nj, o.m AS om, n.m AS nm, {opk} AS opk, {npk} AS npk \
                   FROM (SELECT row_number() OVER () AS rn, {row} AS j, {m} AS m FROM {OLD_TABLE} {ROW}) o \
                   JOIN (SELECT row_number() OVER () AS rn, {row} AS j, {m} AS m FROM {NEW_TABLE} {ROW}) n \
                     ON n.rn = o.rn \
                   WHERE o.j IS DISTINCT FROM n.j) p \
                 CROSS JOIN LATERAL (VALUES \
                   (1, CASE WHEN p.opk = p.npk AND p.nm THEN jsonb_build_array('UPDATE'::text, p.npk, p.nj, p.oj) \
                            WHEN p.om THEN jsonb_build_array('DELETE'::text, p.opk, NULL::jsonb, p.oj) END), \
                   (2, CASE WHEN p.opk <> p.npk AND p.nm \
                            THEN jsonb_build_array('INSERT'::text, p.npk, p.nj, NULL::jsonb) END)) x(k, e) \
                 WHERE x.e IS NOT NULL",
                opk = pk_json(spec, "o.j"),
                npk = pk_json(spec, "n.j"),
                m = filter_match(spec)
            );
            (
                sql,
                "coalesce(jsonb_agg(e) FILTER (WHERE k = 1), '[]') || coalesce(jsonb_agg(e) FILTER (WHERE k = 2), '[]')",
            )
        }
    }
}

/// The statement that appends one statement's changes to `sync_log` as a single row, and
/// returns how many changes it holds (no row when there are none).
///
/// Parameters: `$1` origin uuid, `$2` origin_seq, `$3` index of the statement's first change
/// minus one, `$4` origin xid, `$5` hlc, `$6` vclock.
pub fn capture_statement(schema: &str, spec: &TableSpec, source: Source) -> String {
    let (elements, agg) = elements(spec, source);
    format!(
        "INSERT INTO {schema}.sync_log (origin, origin_seq, first_idx, n, origin_xact, hlc, table_name, vclock, changes) \
         SELECT $1, $2, $3 + 1, s.n, $4, $5, {tbl}, $6, s.changes \
         FROM (SELECT count(*)::int AS n, {agg} AS changes FROM ({elements}) c) s \
         WHERE s.n > 0 \
         RETURNING n",
        tbl = quote_literal(&spec.qualified)
    )
}
