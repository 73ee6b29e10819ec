//! Joining from a snapshot (`src/snapshot.rs`), on a mesh of three with workers on loopback:
//! a new node copies its tables from a peer while the others keep writing, then catches up
//! from the copy, without replaying the history; a node that comes back past its peers'
//! retention is in `retention.rs`.

use pg_peersync_tests::{
    Cluster, converged_on, digest, mesh_of_three, mesh_of_three_with, pgbench, wait_for, worker_status,
};
use serde_json::Value;

/// Every new node copies, however short its peer's log (a seed of 50,000 rows stands for a
/// long history).
const EXTRA: [&str; 4] =
    ["fsync = off", "peersync.multicast_group = ''", "peersync.sync_interval = 1", "peersync.join_copy_from = 0"];

fn log_rows(c: &Cluster) -> i64 {
    c.connect().query_one("SELECT count(*) FROM sync_log", &[]).unwrap().get(0)
}

fn join_status(c: &Cluster) -> Value {
    let text: String = c.connect().query_one("SELECT (sync_status() -> 'join')::text", &[]).unwrap().get(0);
    serde_json::from_str(&text).unwrap()
}

/// Wait for `converged_on`; on a timeout, print what differs first.
fn await_convergence(secs: u64, what: &str, nodes: &[&Cluster], tables: &[&str]) {
    let started = std::time::Instant::now();
    while started.elapsed().as_secs() < secs {
        if converged_on(nodes, tables).is_some() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    for c in nodes {
        let mut db = c.connect();
        let state: String = db
            .query_one(
                "SELECT jsonb_build_object('have', sync_have(), 'apply', sync_status() -> 'apply',                         'join', sync_status() -> 'join', 'peers', sync_status() -> 'worker' -> 'peers')::text",
                &[],
            )
            .unwrap()
            .get(0);
        let digests: Vec<String> = tables.iter().map(|t| digest(&mut db, t)).collect();
        eprintln!("{}: {digests:?} {state}", c.name);
    }
    panic!("timed out after {secs} s waiting for {what}");
}

fn converged(nodes: &[&Cluster]) -> Option<()> {
    converged_on(nodes, &["t"])
}

/// Updates and deletes of the copied rows and inserts of new ones, on keys everyone writes.
fn writes(c: &Cluster, per_client: u32) {
    let script = format!(
        "\\set id random(1, 60000)\n\
         \\set op random(1, 10)\n\
         UPDATE t SET n = n + 1, who = '{0}' WHERE id = :id AND :op <= 7;\n\
         DELETE FROM t WHERE id = :id AND :op = 8;\n\
         INSERT INTO t VALUES (:id, '{0}', 1) ON CONFLICT (id) DO UPDATE SET n = t.n + 1 WHERE :op >= 9;\n",
        c.name
    );
    pgbench(c, &script, per_client);
}

#[test]
fn a_new_node_joins_from_a_snapshot_while_the_others_write() {
    let extra = EXTRA;
    let mut nodes = mesh_of_three(["join-a", "join-b", "join-c"], "join-lab-registration-key", &extra);
    // C is new: it has written and received nothing. It stops while A and B make a history.
    nodes[2].stop_server(false);
    nodes[0].connect().batch_execute("INSERT INTO t SELECT g, 'seed', 0 FROM generate_series(1, 50000) g").unwrap();
    // B, new too, copies the seed from A (or replays it, if it wrote first).
    wait_for(120, "B to hold the seed", || converged(&[&nodes[0], &nodes[1]]));
    std::thread::scope(|s| {
        s.spawn(|| writes(&nodes[0], 1500));
        s.spawn(|| writes(&nodes[1], 1500));
    });
    wait_for(120, "A and B to converge", || converged(&[&nodes[0], &nodes[1]]));
    let seeded = |c: &Cluster| -> i64 {
        c.connect().query_one("SELECT count(*) FROM sync_log WHERE n = 50000", &[]).unwrap().get(0)
    };
    assert_eq!(seeded(&nodes[0]), 1, "A's log holds the seed transaction");

    // C comes back while A and B write on: it copies from one of them, then catches up.
    let [a, b, c] = &mut nodes;
    std::thread::scope(|s| {
        s.spawn(|| writes(a, 2000));
        s.spawn(|| writes(b, 2000));
        c.start_server();
        let done = wait_for(120, "C to finish its copy", || {
            let j = join_status(c);
            (j["state"] == "done").then_some(j)
        });
        eprintln!("C's join: {done}");
        assert!(done["rows_copied"].as_i64().unwrap() >= 45_000, "{done}");
    });
    // Writes on C too, once it may.
    writes(&nodes[2], 200);
    wait_for(180, "the three to converge", || converged(&[&nodes[0], &nodes[1], &nodes[2]]));
    assert_eq!(seeded(&nodes[2]), 0, "C has the seed's rows from the copy, not by replaying its transaction");
    eprintln!("C's log holds {} transactions, A's {}", log_rows(&nodes[2]), log_rows(&nodes[0]));
    wait_for(120, "C's pulls from both peers to succeed again", || {
        let s = worker_status(&nodes[2]);
        let ps = s["peers"].as_array()?;
        (ps.len() == 2 && ps.iter().all(|p| p["last_error"].is_null())).then_some(())
    });
}

/// The copy holds on tables the way applications write them: an identity key, a unique column,
/// a generated column, a serial key, a foreign key whose parent deletes cascade, a counter
/// column that every node increments, while the new node copies and afterwards, and a table of
/// 61 columns.
#[test]
fn a_node_joins_with_application_schemas() {
    let extra = EXTRA;
    let setup = "CREATE EXTENSION pg_peersync;
         CREATE TABLE customers (id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, email text UNIQUE NOT NULL,
                                 name text, shout text GENERATED ALWAYS AS (upper(name)) STORED);
         CREATE TABLE orders (id serial PRIMARY KEY, customer bigint NOT NULL REFERENCES customers ON DELETE CASCADE,
                              qty int NOT NULL);
         CREATE TABLE stock (sku text PRIMARY KEY, on_hand int NOT NULL);
         SELECT sync_track_table('customers'); SELECT sync_track_table('orders'); SELECT sync_track_table('stock');
         SELECT sync_set_counters('stock', '{on_hand}');
         DO $$ BEGIN EXECUTE 'CREATE TABLE wide (id int PRIMARY KEY, '
             || (SELECT string_agg('c' || g || ' int', ', ') FROM generate_series(1, 60) g) || ')'; END $$;
         SELECT sync_track_table('wide');
         CREATE TABLE notes (k text PRIMARY KEY, body text, doc jsonb, tags text[], raw bytea, at timestamptz,
                             price numeric(10,2));
         SELECT sync_track_table('notes');";
    let mut nodes = mesh_of_three_with(["apps-a", "apps-b", "apps-c"], "join-apps-registration-key", &extra, setup);
    let tables = ["customers", "orders", "stock", "wide", "notes"];
    nodes[2].stop_server(false);
    nodes[0]
        .connect()
        .batch_execute(
            "INSERT INTO customers (email, name) SELECT 'c' || g || '@shop', 'name ' || g FROM generate_series(1, 2000) g;
             INSERT INTO orders (customer, qty) SELECT 1 + g % 2000, g % 7 FROM generate_series(1, 6000) g;
             INSERT INTO stock SELECT 'sku' || g, 0 FROM generate_series(1, 100) g;
             INSERT INTO wide (id, c1, c30, c60) SELECT g, g, g % 3, -g FROM generate_series(1, 500) g;",
        )
        .unwrap();
    // Values that COPY's text format must escape: tabs, line breaks, backslashes, its own
    // end-of-data and null markers as text, in keys too; empty and null values.
    nodes[0]
        .connect()
        .batch_execute(
            r#"INSERT INTO notes VALUES
                 (E'tab\tkey', E'line1\nline2\r\n\\.\n\\N', '{"a": "q\"uote\\back"}', ARRAY[E'x\ty', 'NULL', NULL, '{}'],
                  '\x00ff5c0a'::bytea, '2026-12-03 10:00:00+01', 12.5),
                 (E'back\\slash "quoted"', '', 'null', '{}', '', NULL, NULL),
                 ('ünïcødé ✓', NULL, NULL, NULL, NULL, NULL, -0.01),
                 (E'\\.', E'\\.', '[]', ARRAY[E'\\.'], '\x5c2e'::bytea, '2026-01-01', 0),
                 (E'\\N', E'a\\Nb\tc', '"\\u00e9"', ARRAY[''], '\x'::bytea, 'infinity', 'NaN');"#,
        )
        .unwrap();
    await_convergence(120, "B to hold A's rows", &[&nodes[0], &nodes[1]], &tables);
    // A sells and restocks; B counts stock and closes accounts (their orders go with them).
    let a_script = "\\set s random(1, 100)\n\\set c random(1, 2000)\n\
        UPDATE stock SET on_hand = on_hand + 1 WHERE sku = 'sku' || :s;\n\
        INSERT INTO orders (customer, qty) SELECT id, 1 FROM customers WHERE id = :c;\n";
    let b_script = "\\set s random(1, 100)\n\\set c random(1, 2000)\n\
        UPDATE stock SET on_hand = on_hand + 1 WHERE sku = 'sku' || :s;\n\
        DELETE FROM customers WHERE id = :c AND :c % 20 = 0;\n";
    let run = |a: &Cluster, b: &Cluster, per_client: u32| {
        std::thread::scope(|s| {
            s.spawn(|| pgbench(a, a_script, per_client));
            s.spawn(|| pgbench(b, b_script, per_client));
        });
    };
    run(&nodes[0], &nodes[1], 500);
    await_convergence(120, "A and B to converge", &[&nodes[0], &nodes[1]], &tables);
    let [a, b, c] = &mut nodes;
    std::thread::scope(|s| {
        s.spawn(|| run(a, b, 1000));
        c.start_server();
        wait_for(120, "C to finish its copy", || (join_status(c)["state"] == "done").then_some(()));
    });
    await_convergence(180, "C to catch up", &[&nodes[0], &nodes[1], &nodes[2]], &tables);
    // C sells too: its serial and identity sequences are past the keys it holds.
    nodes[2]
        .connect()
        .batch_execute(
            "INSERT INTO customers (email, name) VALUES ('new@shop', 'new customer');
             INSERT INTO orders (customer, qty) SELECT id, 3 FROM customers WHERE email = 'new@shop';
             UPDATE stock SET on_hand = on_hand + 1 WHERE sku = 'sku1';",
        )
        .unwrap();
    await_convergence(180, "the three to converge", &[&nodes[0], &nodes[1], &nodes[2]], &tables);
    // Every increment counted once: two clients on A and on B, 1,500 each, and C's one.
    for n in &nodes {
        let total: i64 = n.connect().query_one("SELECT sum(on_hand)::bigint FROM stock", &[]).unwrap().get(0);
        assert_eq!(total, 2 * 2 * 1500 + 1, "stock on {}", n.name);
        let orphans: i64 = n
            .connect()
            .query_one(
                "SELECT count(*) FROM orders o WHERE NOT EXISTS (SELECT 1 FROM customers c WHERE c.id = o.customer)",
                &[],
            )
            .unwrap()
            .get(0);
        assert_eq!(orphans, 0, "orders without their customer on {}", n.name);
    }
}

/// Nodes restored from one dump track their tables with `existing_rows => 'shared'`: their
/// rows are not captured, so nothing is exchanged for them and nothing conflicts; a new node
/// with empty tables copies them from a peer however short its log (no log holds them); and
/// the rows change everywhere as usual afterwards.
#[test]
fn nodes_restored_from_one_dump_share_their_rows_and_a_new_node_copies_them() {
    let extra = ["fsync = off", "peersync.multicast_group = ''", "peersync.sync_interval = 1"];
    // The dump's rows on dump-a and dump-b; dump-c starts empty.
    let setup = "CREATE EXTENSION pg_peersync;
         CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL, qty int NOT NULL);
         DO $$ BEGIN
             IF current_setting('peersync.node_name') <> 'dump-c' THEN
                 INSERT INTO items SELECT g, 'item ' || g, g % 10 FROM generate_series(1, 20000) g;
                 PERFORM sync_track_table('items', existing_rows => 'shared');
             ELSE
                 PERFORM sync_track_table('items');
             END IF;
         END $$;";
    let [a, b, c] = mesh_of_three_with(["dump-a", "dump-b", "dump-c"], "join-dump-registration-key", &extra, setup);
    await_convergence(120, "the new node to copy the shared rows", &[&a, &b, &c], &["items"]);
    for n in [&a, &b, &c] {
        assert_eq!(log_rows(n), 0, "{}: no change captured or received for the shared rows", n.name);
    }
    let join = join_status(&c);
    assert_eq!(
        (join["state"].clone(), join["rows_copied"].clone()),
        (Value::from("done"), Value::from(20000)),
        "{join}"
    );
    assert!(join_status(&b).is_null(), "dump-b holds the rows already: it copies nothing");
    // The check the README recommends once the nodes are up.
    let id_b = pg_peersync_tests::node_id(&b);
    let text: String = a.connect().query_one("SELECT sync_verify($1::text::uuid)::text", &[&id_b]).unwrap().get(0);
    let verified: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(verified["agree"], Value::Bool(true), "{verified}");
    // Writes on each node, two of them to one shared row.
    a.connect().batch_execute("UPDATE items SET qty = qty + 100 WHERE id = 1").unwrap();
    b.connect()
        .batch_execute("UPDATE items SET name = 'renamed on b' WHERE id = 2; DELETE FROM items WHERE id = 3")
        .unwrap();
    c.connect()
        .batch_execute("INSERT INTO items VALUES (20001, 'new on c', 1); UPDATE items SET qty = 7 WHERE id = 2")
        .unwrap();
    await_convergence(120, "the writes everywhere", &[&a, &b, &c], &["items"]);
    for n in [&a, &b, &c] {
        let mut db = n.connect();
        let rows: i64 = db.query_one("SELECT count(*) FROM items", &[]).unwrap().get(0);
        assert_eq!(rows, 20000, "{}", n.name);
        let conflicts: i64 =
            db.query_one("SELECT count(*) FROM sync_conflicts WHERE pk <> '{\"id\": 2}'::jsonb", &[]).unwrap().get(0);
        assert_eq!(conflicts, 0, "{}: only row 2 was written concurrently", n.name);
        let one: i32 = db.query_one("SELECT qty FROM items WHERE id = 1", &[]).unwrap().get(0);
        assert_eq!(one, 101, "{}", n.name);
    }
}
