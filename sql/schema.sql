-- pg_peersync catalog. Created in the extension's schema; every object here belongs to the
-- extension and is never tracked itself.

-- This node's identity, made once at CREATE EXTENSION.
CREATE TABLE sync_node (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    id         uuid NOT NULL DEFAULT gen_random_uuid(),
    created_at timestamptz NOT NULL DEFAULT now(),
    -- Local transactions up to this number are folded into sync_rows (see apply/fold.rs).
    indexed_upto bigint NOT NULL DEFAULT 0,
    -- Set when another node seems to use this identity (src/identity.rs): capture stops until
    -- sync_new_identity().
    identity_doubt text,
    -- Where this identity lives: host, data directory, database and timeline (src/identity.rs).
    -- Recorded by the worker; a database started elsewhere (a base backup, a copied data
    -- directory) or on a new timeline (a point-in-time restore, a promoted standby) refuses
    -- changes until sync_new_identity() or sync_keep_identity().
    place text,
    -- Set while this node copies its tracked tables from a peer (the peer's id; src/snapshot.rs):
    -- capture and sync_apply refuse until the copy is done.
    joining text
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
    tracked_at      timestamptz NOT NULL DEFAULT now(),
    -- For strategy 'custom': f(local jsonb, remote jsonb, info jsonb) returns jsonb.
    resolver        regprocedure,
    -- Columns received from peers that this table lacks (ignored on apply).
    missing_columns text[] NOT NULL DEFAULT '{}',
    -- Counter columns (see sync_set_counters()): concurrent changes add up.
    counters        text[] NOT NULL DEFAULT '{}',
    -- The rows it held when tracked were not captured: every node held them already
    -- (existing_rows => 'shared'), or they were copied from such a node. No log holds them.
    shared_rows     boolean NOT NULL DEFAULT false
);

-- The change log: one row per committed local transaction that changed tracked tables (or per
-- received origin transaction), written once at commit. Its changes are stored in parts,
-- one per statement and kind of change, as parallel arrays: part_rows[k] is a JSON array of
-- row images (as row_to_json prints them) for INSERT and DELETE, of [new row, old values of
-- the changed columns] pairs for UPDATE; its j-th element (1-based) is change (origin, origin_seq, part_first[k] + j - 1).
-- Read it through sync_events.
CREATE TABLE sync_log (
    origin      uuid NOT NULL,
    origin_seq  bigint NOT NULL,
    first_idx   bigint NOT NULL,
    origin_xact bigint NOT NULL,
    n           integer NOT NULL,
    hlc         bigint NOT NULL,
    vclock      jsonb NOT NULL,
    part_hlc    bigint[] NOT NULL,
    part_table  text[] NOT NULL,
    part_op     text[] NOT NULL,
    part_pk     text[] NOT NULL,
    part_first  integer[] NOT NULL,
    part_n      integer[] NOT NULL,
    part_rows   text[] NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (origin, origin_seq, first_idx)
);
-- Row images compress well (padding, repeated keys). Compress from 128 bytes on, not 2 kB,
-- so even short transactions write less WAL; lz4 is several times faster than pglz.
ALTER TABLE sync_log SET (toast_tuple_target = 128);
DO $$ BEGIN
    ALTER TABLE sync_log ALTER COLUMN part_rows SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported THEN NULL;   -- PostgreSQL built without lz4
END $$;

-- One row per change, identified by (origin, origin_seq, origin_idx): origin_seq numbers the
-- origin's transactions, origin_idx orders the changes inside one transaction. data is the new
-- row image (NULL for DELETE); old holds the changed columns' old values for UPDATE and the
-- whole old row for DELETE. checksum is sha256 over the canonical text of
-- [origin, seq, idx, hlc, table, op, pk, data, old] (see sync_bridge/PROTOCOL.md).
CREATE VIEW sync_events AS
SELECT l.origin,
       l.origin_seq,
       (p.first + r.i - 1)::integer AS origin_idx,
       l.origin_xact,
       p.hlc,
       p.table_name,
       k.pk,
       p.op,
       d.data,
       d.old,
       l.vclock,
       sha256(convert_to(jsonb_build_array(l.origin, l.origin_seq, p.first + r.i - 1, p.hlc,
                                           p.table_name, p.op, k.pk, d.data, d.old)::text,
                         'UTF8')) AS checksum,
       l.created_at
  FROM sync_log l
 CROSS JOIN LATERAL unnest(l.part_hlc, l.part_table, l.part_op, l.part_pk, l.part_first, l.part_rows)
       AS p(hlc, table_name, op, pk_columns, first, rows)
 CROSS JOIN LATERAL json_array_elements(p.rows::json) WITH ORDINALITY AS r(e, i)
 CROSS JOIN LATERAL (
       SELECT CASE p.op WHEN 'INSERT' THEN r.e::jsonb WHEN 'UPDATE' THEN (r.e -> 0)::jsonb END AS data,
              CASE p.op WHEN 'DELETE' THEN r.e::jsonb WHEN 'UPDATE' THEN (r.e -> 1)::jsonb END AS old
       ) AS d
 CROSS JOIN LATERAL (
       SELECT jsonb_object_agg(c, coalesce(d.data, d.old) -> c) AS pk
         FROM json_array_elements_text(p.pk_columns::json) AS c
       ) AS k;

-- For every other origin, how far this node holds its events without a gap (the remote part of
-- the have-vector; this node's own position is computed in shared memory).
CREATE TABLE sync_origins (
    origin uuid PRIMARY KEY,
    upto   bigint NOT NULL
);

-- Per row ever changed by a received event: the causally maximal versions of the row (a
-- multi-value register, JSON array of sync_bridge::resolve::Stored), which sync_apply
-- resolves. A delete stays here as a tombstone, so a late update cannot resurrect the row.
-- json, not jsonb: only sync_apply reads it, whole; pk sorts bytewise (it is a key, not text
-- for people), which the many index probes of an apply pay for less.
CREATE TABLE sync_rows (
    relid    regclass NOT NULL,
    pk       text COLLATE "C" NOT NULL,
    versions json NOT NULL,
    -- For a table with counters: the row's current life and its counter values
    -- (sync_bridge::counter::Life).
    life     json,
    PRIMARY KEY (relid, pk)
) WITH (fillfactor = 30);

-- Received origin transactions applied blind (each change had seen everything this node
-- held, so it simply became its row's register): sync_rows does not show them yet. They are
-- folded in before registers are next read (see src/apply/fold.rs).
-- n is the order they were applied in, which folding keeps; events, how many changes each has.
CREATE TABLE sync_unfolded (
    n          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    origin     uuid NOT NULL,
    origin_seq bigint NOT NULL,
    events     integer NOT NULL
);

-- Priorities for strategy 'node_priority' (greater wins; unlisted nodes have 0). Every node
-- must hold the same rows: set them with sync_set_node_priority() on each node.
CREATE TABLE sync_node_priorities (
    node     uuid PRIMARY KEY,
    priority integer NOT NULL
);

-- Received origin transactions not applied yet: waiting for an earlier one (error IS NULL),
-- or failed to apply here (error set; see sync_apply_errors and sync_retry_errors()).
-- Stored once: a node asks its peers past what it keeps here (see sync_bridge::delivery::reach),
-- and an apply reads events only of the entries it can apply (prev and context say which).
CREATE TABLE sync_inbox (
    origin      uuid NOT NULL,
    origin_seq  bigint NOT NULL,
    prev        bigint NOT NULL,
    context     jsonb NOT NULL,
    events      jsonb NOT NULL,
    tables      text[] NOT NULL,
    sqlstate    text,
    error       text,
    waiting_for text,
    attempts    integer NOT NULL DEFAULT 0,
    received_at timestamptz NOT NULL DEFAULT now(),
    failed_at   timestamptz,
    PRIMARY KEY (origin, origin_seq)
);

CREATE VIEW sync_apply_errors AS
SELECT origin, origin_seq, tables, jsonb_array_length(events) AS events, sqlstate, error, attempts,
       received_at, failed_at
  FROM sync_inbox WHERE error IS NOT NULL;

-- Every true conflict (concurrent versions with different content) and how it was decided.
-- kind: 'update' (concurrent changes of one row); 'same_key' (two nodes inserted different
-- rows under one key: two entities got one id); 'unique' (two rows took one unique value: pk
-- names the row removed); 'foreign_key' (a row whose parent a concurrent change deleted: pk
-- names it, result is what became of it). All but 'update' are always left for review.
-- local: the row as this node had it, with the versions behind it; remote: the incoming
-- version; result: the row now visible (NULL when deleted). The three are json (kept as
-- written; cast to jsonb to compare them): recording a conflict then costs no jsonb parsing.
CREATE TABLE sync_conflicts (
    id          bigserial PRIMARY KEY,
    table_name  text NOT NULL,
    pk          jsonb NOT NULL,
    strategy    text NOT NULL,
    local       json NOT NULL,
    remote      json NOT NULL,
    result      json,
    winner      text NOT NULL CHECK (winner IN ('local', 'remote', 'merged')),
    kind        text NOT NULL DEFAULT 'update' CHECK (kind IN ('update', 'same_key', 'unique', 'foreign_key')),
    detected_at timestamptz NOT NULL DEFAULT now(),
    review      text NOT NULL DEFAULT 'none' CHECK (review IN ('none', 'pending', 'resolved')),
    resolved_at timestamptz,
    note        text
);

-- Every DDL run through sync_ddl(), here or on another node (see src/ddl.rs).
CREATE TABLE sync_ddl_history (
    id          uuid PRIMARY KEY,
    origin      uuid NOT NULL,
    command     text NOT NULL,
    search_path text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);

-- Let pg_dump include the data (a restored dump keeps its history).
SELECT pg_catalog.pg_extension_config_dump('sync_ddl_history', '');
SELECT pg_catalog.pg_extension_config_dump('sync_tables', '');
SELECT pg_catalog.pg_extension_config_dump('sync_log', '');
SELECT pg_catalog.pg_extension_config_dump('sync_origins', '');
SELECT pg_catalog.pg_extension_config_dump('sync_rows', '');
SELECT pg_catalog.pg_extension_config_dump('sync_unfolded', '');
SELECT pg_catalog.pg_extension_config_dump('sync_node_priorities', '');
SELECT pg_catalog.pg_extension_config_dump('sync_inbox', '');
SELECT pg_catalog.pg_extension_config_dump('sync_conflicts', '');

-- One row per exchange the worker started with a peer (by its announced name, else as listed
-- in peersync.peers; direction 'pull': it asked the peer
-- for what it lacked). The worker keeps the newest 10,000.
-- Each peer's have-vector at its last exchange with this node: the log keeps what a peer
-- heard from within peersync.log_retention lacks (src/retention.rs).
CREATE TABLE sync_peers (
    id       uuid PRIMARY KEY,
    name     text,
    have     jsonb NOT NULL,
    heard_at timestamptz NOT NULL
);

-- Per origin, the greatest number deleted from sync_log: a node that holds less of that
-- origin cannot be served from the log any more.
CREATE TABLE sync_pruned (
    origin uuid PRIMARY KEY,
    upto   bigint NOT NULL
);
SELECT pg_catalog.pg_extension_config_dump('sync_pruned', '');

-- What a transaction deleted from sync_log looked like (sync_bridge::log::Fingerprint), kept
-- for peersync.log_retention: a copy's transaction under the same number is still told apart
-- (src/apply/twins.rs). A transaction pruned in two slices adds up here.
CREATE TABLE sync_fingerprints (
    origin     uuid NOT NULL,
    origin_seq bigint NOT NULL,
    xact       bigint NOT NULL,
    hlc        bigint NOT NULL,
    n          bigint NOT NULL,
    pruned_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (origin, origin_seq)
);
SELECT pg_catalog.pg_extension_config_dump('sync_fingerprints', '');

-- Per origin, up to where this node's data came from a copy of a peer's tables (src/snapshot.rs):
-- its log holds nothing of that origin up to there, so a node that lacks those changes is told
-- to ask another peer, not that they are gone.
CREATE TABLE sync_copied (
    origin uuid PRIMARY KEY,
    upto   bigint NOT NULL
);
SELECT pg_catalog.pg_extension_config_dump('sync_copied', '');

-- Transactions received under a number this node holds for a different transaction (a copied or
-- restored node numbering on under another's identity; src/apply/twins.rs): the fingerprints
-- of both and the events received, kept for the operator.
CREATE TABLE sync_twins (
    origin     uuid NOT NULL,
    origin_seq bigint NOT NULL,
    seen_at    timestamptz NOT NULL DEFAULT now(),
    ours       jsonb NOT NULL,
    theirs     jsonb NOT NULL,
    events     jsonb NOT NULL,
    PRIMARY KEY (origin, origin_seq)
);
SELECT pg_catalog.pg_extension_config_dump('sync_twins', '');

-- The last join from a peer's snapshot (src/snapshot.rs), or the one under way: where it
-- started catching up from, per table what was copied, and once done, up to what the copy
-- reached (nothing is applied blind below it).
CREATE TABLE sync_join (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    source      uuid NOT NULL,
    source_name text,
    started_at  timestamptz NOT NULL,
    finished_at timestamptz,
    start       jsonb NOT NULL,
    upto        jsonb,
    tables      jsonb NOT NULL,
    -- Why a new node did not copy (it caught up by replay instead).
    note        text,
    rows_copied bigint NOT NULL DEFAULT 0
);
SELECT pg_catalog.pg_extension_config_dump('sync_join', '');

CREATE TABLE sync_sessions (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    peer        text NOT NULL,
    peer_id     uuid,
    address     text,
    direction   text NOT NULL CHECK (direction IN ('pull', 'push')),
    started_at  timestamptz NOT NULL,
    duration_ms bigint NOT NULL,
    events_in   bigint NOT NULL DEFAULT 0,
    events_out  bigint NOT NULL DEFAULT 0,
    bytes_in    bigint NOT NULL DEFAULT 0,
    bytes_out   bigint NOT NULL DEFAULT 0,
    error       text
);
