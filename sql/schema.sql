-- pg_peersync catalog. Created in the extension's schema; every object here belongs to the
-- extension and is never tracked itself.

-- This node's identity, made once at CREATE EXTENSION.
CREATE TABLE sync_node (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    id         uuid NOT NULL DEFAULT gen_random_uuid(),
    created_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO sync_node DEFAULT VALUES;

-- Tracked tables and their settings (see sync_track_table()).
CREATE TABLE sync_tables (
    relid           regclass PRIMARY KEY,
    table_name      text NOT NULL,
    strategy        text NOT NULL DEFAULT 'lww'
                    CHECK (strategy IN ('lww', 'field_merge', 'node_priority', 'custom', 'manual')),
    row_filter      text,
    exclude_columns text[] NOT NULL DEFAULT '{}',
    pk_columns      text[] NOT NULL,
    tracked_at      timestamptz NOT NULL DEFAULT now()
);

-- The change log, one row per capturing statement (or per received origin statement): all of
-- its changes in one JSON array, so a 100k-row UPDATE writes one row, not 100k. Each element
-- is [op, pk, data, old]: op 'INSERT' | 'UPDATE' | 'DELETE'; pk the primary key as an object;
-- data the new row image (null for DELETE); old the whole old row image (null for INSERT).
-- Change k (1-based) of a row is change (origin, origin_seq, first_idx + k - 1).
CREATE TABLE sync_log (
    origin      uuid NOT NULL,
    origin_seq  bigint NOT NULL,
    first_idx   integer NOT NULL,
    n           integer NOT NULL,
    origin_xact bigint NOT NULL,
    hlc         bigint NOT NULL,
    table_name  text NOT NULL,
    vclock      jsonb NOT NULL,
    changes     jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (origin, origin_seq, first_idx)
);

-- One row per change, identified by (origin, origin_seq, origin_idx). origin_seq numbers the
-- origin's transactions; origin_idx orders the changes inside one transaction. For UPDATE,
-- old holds only the changed columns. checksum is sha256 over the canonical text of
-- [origin, seq, idx, hlc, table, op, pk, data, old] (see sync_bridge/PROTOCOL.md).
CREATE VIEW sync_events AS
SELECT l.origin,
       l.origin_seq,
       (l.first_idx + c.i - 1)::integer AS origin_idx,
       l.origin_xact,
       l.hlc,
       l.table_name,
       c.e -> 1 AS pk,
       c.e ->> 0 AS op,
       d.data,
       d.old,
       l.vclock,
       sha256(convert_to(jsonb_build_array(l.origin, l.origin_seq, l.first_idx + c.i - 1, l.hlc,
                                           l.table_name, c.e ->> 0, c.e -> 1, d.data, d.old)::text,
                         'UTF8')) AS checksum,
       l.created_at
  FROM sync_log l
 CROSS JOIN LATERAL jsonb_array_elements(l.changes) WITH ORDINALITY AS c(e, i)
 CROSS JOIN LATERAL (
       SELECT nullif(c.e -> 2, 'null') AS data,
              CASE WHEN c.e ->> 0 = 'UPDATE'
                   THEN (SELECT jsonb_object_agg(x.key, x.value)
                           FROM jsonb_each(c.e -> 3) AS x
                          WHERE c.e -> 2 -> x.key IS DISTINCT FROM x.value)
                   ELSE nullif(c.e -> 3, 'null') END AS old) AS d;

-- For every other origin, how far this node holds its events without a gap (the remote part of
-- the have-vector; this node's own position is computed in shared memory).
CREATE TABLE sync_origins (
    origin uuid PRIMARY KEY,
    upto   bigint NOT NULL
);

-- Let pg_dump include the data (a restored dump keeps its history).
SELECT pg_catalog.pg_extension_config_dump('sync_tables', '');
SELECT pg_catalog.pg_extension_config_dump('sync_log', '');
SELECT pg_catalog.pg_extension_config_dump('sync_origins', '');
