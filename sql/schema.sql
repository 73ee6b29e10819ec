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

-- The change log: every captured change, local or received, identified by
-- (origin, origin_seq, origin_idx). origin_seq numbers the origin's transactions; origin_idx
-- orders the changes inside one transaction.
CREATE TABLE sync_events (
    origin      uuid NOT NULL,
    origin_seq  bigint NOT NULL,
    origin_idx  integer NOT NULL,
    origin_xact bigint NOT NULL,
    hlc         bigint NOT NULL,
    table_name  text NOT NULL,
    pk          jsonb NOT NULL,
    op          text NOT NULL CHECK (op IN ('INSERT', 'UPDATE', 'DELETE')),
    data        jsonb,
    old         jsonb,
    vclock      jsonb NOT NULL,
    checksum    bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (origin, origin_seq, origin_idx)
);

-- For every other origin, how far this node holds its events without a gap (the remote part of
-- the have-vector; this node's own position is computed in shared memory).
CREATE TABLE sync_origins (
    origin uuid PRIMARY KEY,
    upto   bigint NOT NULL
);

-- Let pg_dump include the data (a restored dump keeps its history).
SELECT pg_catalog.pg_extension_config_dump('sync_tables', '');
SELECT pg_catalog.pg_extension_config_dump('sync_events', '');
SELECT pg_catalog.pg_extension_config_dump('sync_origins', '');
