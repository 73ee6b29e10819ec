//! End-to-end apply tests: several databases of one cluster act as nodes (each has its own
//! node id) and exchange batches with `sync_changes()` / `sync_apply()`.

use pg_peersync_tests::{Cluster, digest, exchange_all, have, nodes, pull, pull_once, two};
use postgres::Client;
use serde_json::{Value, json};

const SCHEMA: &str = "CREATE EXTENSION pg_peersync;
     CREATE TABLE items (id int PRIMARY KEY, name text, qty int, note text);
     SELECT sync_track_table('items');";

/// Run each statement as its own transaction (a multi-statement batch_execute is one).
fn each(db: &mut Client, statements: &[&str]) {
    for s in statements {
        db.batch_execute(s).unwrap();
    }
}

fn count(db: &mut Client, sql: &str) -> i64 {
    db.query_one(sql, &[]).unwrap().get(0)
}

fn node_id(db: &mut Client) -> String {
    db.query_one("SELECT sync_node_id()::text", &[]).unwrap().get(0)
}

fn rows(db: &mut Client, table: &str) -> Vec<String> {
    db.query(&format!("SELECT t::text FROM {table} t ORDER BY 1"), &[]).unwrap().iter().map(|r| r.get(0)).collect()
}

fn batch(db: &mut Client, since: &Value) -> String {
    db.query_one("SELECT sync_changes($1::text::jsonb)::text", &[&since.to_string()]).unwrap().get(0)
}

fn apply(db: &mut Client, batch: &str) -> Result<Value, postgres::Error> {
    db.query_one("SELECT sync_apply($1::text::jsonb)::text", &[&batch])
        .map(|r| serde_json::from_str(r.get::<_, &str>(0)).unwrap())
}

#[test]
fn apply_is_idempotent_creates_no_local_events_and_relays() {
    let c = Cluster::start("apply-basic", &["fsync = off"]);
    let mut n = nodes(&c, 3, SCHEMA);
    let a_id = node_id(&mut n[0]);
    each(
        &mut n[0],
        &[
            "INSERT INTO items SELECT g, 'item ' || g, g, NULL FROM generate_series(1, 50) g",
            "UPDATE items SET qty = qty * 10 WHERE id % 5 = 0",
            "DELETE FROM items WHERE id > 45",
        ],
    );
    let b = batch(&mut n[0], &json!({}));
    let first = apply(&mut n[1], &b).unwrap();
    assert_eq!(first["applied"], json!(50 + 10 + 5), "{first}");
    assert_eq!(first["transactions"], json!(3));
    assert_eq!(first["conflicts"], json!(0));
    assert_eq!(rows(&mut n[0], "items"), rows(&mut n[1], "items"));
    assert_eq!(digest(&mut n[0], "items"), digest(&mut n[1], "items"));
    // Echo: B stored A's events under A's id and made none of its own.
    let b_id = node_id(&mut n[1]);
    assert_eq!(count(&mut n[1], &format!("SELECT count(*) FROM sync_events WHERE origin = '{b_id}'")), 0);
    assert_eq!(count(&mut n[1], &format!("SELECT count(*) FROM sync_events WHERE origin = '{a_id}'")), 65);
    assert_eq!(have(&mut n[1])[&a_id], have(&mut n[0])[&a_id]);

    // The same batch again changes nothing.
    let digest_before = digest(&mut n[1], "items");
    let again = apply(&mut n[1], &b).unwrap();
    assert_eq!((again["applied"].clone(), again["skipped"].clone()), (json!(0), json!(65)), "{again}");
    assert_eq!(digest(&mut n[1], "items"), digest_before);
    assert_eq!(count(&mut n[1], "SELECT count(*) FROM sync_events"), 65);
    // The text form is the same function: a fresh node applies what the jsonb form applied on B.
    c.connect().batch_execute("CREATE DATABASE textform").unwrap();
    let mut t = c.connect_db("textform");
    t.batch_execute(SCHEMA).unwrap();
    let text: String = t.query_one("SELECT sync_apply($1::text)::text", &[&b.to_string()]).unwrap().get(0);
    let by_text: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(by_text["applied"], first["applied"], "{by_text}");
    assert_eq!(by_text["transactions"], first["transactions"], "{by_text}");
    assert_eq!(digest(&mut t, "items"), digest(&mut n[1], "items"));

    // Relay: C never talks to A, yet receives A's events, with A's numbers and checksums.
    let (n0, rest) = n.split_at_mut(1);
    let (n1, n2) = rest.split_at_mut(1);
    pull(&mut n1[0], &mut n2[0]);
    assert_eq!(digest(&mut n0[0], "items"), digest(&mut n2[0], "items"));
    let sums = |db: &mut Client| -> Vec<String> {
        db.query("SELECT encode(checksum, 'hex') FROM sync_events ORDER BY origin_seq, origin_idx", &[])
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    };
    assert_eq!(sums(&mut n0[0]), sums(&mut n2[0]));
    assert_eq!(
        have(&mut n2[0]),
        have(&mut n0[0]).as_object().unwrap().iter().fold(have(&mut n2[0]), |mut h, (k, v)| {
            h[k] = v.clone();
            h
        })
    );
    // C's local writes still replicate after applying (capture is only suspended while applying).
    n2[0].execute("UPDATE items SET note = 'from C' WHERE id = 1", &[]).unwrap();
    pull(&mut n2[0], &mut n0[0]);
    assert_eq!(digest(&mut n0[0], "items"), digest(&mut n2[0], "items"));
}

#[test]
fn foreign_keys_hold_in_origin_order() {
    let c = Cluster::start("apply-fk", &["fsync = off"]);
    let schema = "CREATE EXTENSION pg_peersync;
        CREATE TABLE parent (id int PRIMARY KEY, name text);
        CREATE TABLE child (id int PRIMARY KEY, parent_id int NOT NULL REFERENCES parent, v text);
        SELECT sync_track_table('parent'); SELECT sync_track_table('child');";
    let mut n = nodes(&c, 2, schema);
    each(
        &mut n[0],
        &[
            "INSERT INTO parent VALUES (1, 'p1');
             INSERT INTO child VALUES (10, 1, 'a'), (11, 1, 'b');
             INSERT INTO parent VALUES (2, 'p2');
             UPDATE child SET parent_id = 2 WHERE id = 11;",
            "INSERT INTO child VALUES (12, 2, 'later transaction')",
            "DELETE FROM child WHERE parent_id = 1; DELETE FROM parent WHERE id = 1;",
        ],
    );
    assert_eq!(count(&mut n[0], "SELECT count(DISTINCT origin_seq) FROM sync_events"), 3);
    let (a, b) = n.split_at_mut(1);
    let out = pull(&mut a[0], &mut b[0]);
    assert_eq!(out["errors"], json!(0), "{out:?}");
    assert_eq!(rows(&mut a[0], "parent"), rows(&mut b[0], "parent"));
    assert_eq!(rows(&mut a[0], "child"), rows(&mut b[0], "child"));
    assert_eq!(rows(&mut b[0], "child").len(), 2);
}

#[test]
fn bad_batches_are_refused_whole() {
    let c = Cluster::start("apply-bad", &["fsync = off"]);
    let mut n = nodes(&c, 2, SCHEMA);
    n[0].batch_execute("INSERT INTO items VALUES (1, 'a', 1, NULL), (2, 'b', 2, NULL)").unwrap();
    let good: Value = serde_json::from_str(&batch(&mut n[0], &json!({}))).unwrap();
    let have_before = have(&mut n[1]);
    let state = |e: postgres::Error| e.code().map(|c| c.code().to_string()).unwrap_or_default();
    let hint = |e: &postgres::Error| e.as_db_error().and_then(|d| d.hint()).unwrap_or_default().to_string();

    let shape = apply(&mut n[1], r#"{"events": 3}"#).unwrap_err();
    assert!(!hint(&shape).is_empty());
    assert_eq!(state(shape), "22023");

    let mut format = good.clone();
    format["format"] = json!(99);
    assert_eq!(state(apply(&mut n[1], &format.to_string()).unwrap_err()), "0A000");

    let mut tampered = good.clone();
    tampered["events"][1]["data"]["name"] = json!("evil");
    assert_eq!(state(apply(&mut n[1], &tampered.to_string()).unwrap_err()), "XX001");

    n[0].batch_execute(
        "CREATE TABLE other (id int PRIMARY KEY); SELECT sync_track_table('other'); INSERT INTO other VALUES (1);",
    )
    .unwrap();
    let untracked = batch(&mut n[0], &json!({}));
    let e = apply(&mut n[1], &untracked).unwrap_err();
    assert!(hint(&e).contains("sync_track_table"), "{}", hint(&e));
    assert_eq!(state(e), "42P01");

    // Nothing of any of them was applied.
    assert_eq!(count(&mut n[1], "SELECT count(*) FROM items"), 0);
    assert_eq!(have(&mut n[1]), have_before);
    assert_eq!(apply(&mut n[1], &good.to_string()).unwrap()["applied"], json!(2));
}

#[test]
fn unappliable_transactions_are_held_and_retried() {
    let c = Cluster::start("apply-errors", &["fsync = off"]);
    let mut n = nodes(&c, 2, SCHEMA);
    // B's table has a column A does not send, NOT NULL and without a default.
    n[1].batch_execute("ALTER TABLE items ADD COLUMN site text NOT NULL").unwrap();
    each(
        &mut n[0],
        &[
            "INSERT INTO items VALUES (1, 'a', 1, NULL)",
            "UPDATE items SET qty = 2 WHERE id = 1",
            "INSERT INTO items VALUES (2, 'b', 1, NULL)",
        ],
    );
    let (a, b) = n.split_at_mut(1);
    let (out, _) = pull_once(&mut a[0], &mut b[0], 1000);
    // Each fails on its own (the update brings the whole row, without site): none waits
    // behind another.
    assert_eq!(
        (out["errors"].clone(), out["waiting"].clone(), out["applied"].clone()),
        (json!(3), json!(0), json!(0)),
        "{out}"
    );
    let (sqlstate, error): (String, String) = b[0]
        .query_one("SELECT sqlstate, error FROM sync_apply_errors ORDER BY origin_seq LIMIT 1", &[])
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!(sqlstate, "23502", "{error}");
    assert!(error.contains("site"), "{error}");
    assert_eq!(count(&mut b[0], "SELECT count(*) FROM items"), 0);
    // The have-vector counts what is held: B stores it (and relays it), and A's later
    // transactions go on being applied.
    let a_id = node_id(&mut a[0]);
    assert_eq!(have(&mut b[0])[&a_id], have(&mut a[0])[&a_id]);
    assert_eq!(count(&mut b[0], "SELECT count(*) FROM sync_log"), 3);
    // sync_status() names them per origin and table, with the oldest's age and reason.
    let held: String = b[0].query_one("SELECT (sync_status() #> '{apply,held}')::text", &[]).unwrap().get(0);
    let held: Value = serde_json::from_str(&held).unwrap();
    assert_eq!((held[0]["origin"].as_str(), held[0]["table"].as_str()), (Some(a_id.as_str()), Some("public.items")));
    assert_eq!(held[0]["transactions"], json!(3), "{held}");
    assert!(held[0]["reason"].as_str().unwrap_or("").contains("site"), "{held}");
    // Pulling again brings nothing; still held, once.
    let (again, _) = pull_once(&mut a[0], &mut b[0], 1000);
    assert_eq!((again["applied"].clone(), again["errors"].clone()), (json!(0), json!(0)), "{again}");
    assert_eq!(count(&mut b[0], "SELECT count(*) FROM sync_inbox"), 3);

    b[0].batch_execute("ALTER TABLE items ALTER COLUMN site SET DEFAULT 'here'").unwrap();
    let retried: String = b[0].query_one("SELECT sync_retry_errors()::text", &[]).unwrap().get(0);
    let retried: Value = serde_json::from_str(&retried).unwrap();
    assert_eq!((retried["transactions"].clone(), retried["errors"].clone()), (json!(3), json!(0)), "{retried}");
    assert_eq!(count(&mut b[0], "SELECT count(*) FROM sync_inbox"), 0);
    // (B's digest covers its extra column; compare the shared ones.)
    let shared = |db: &mut Client| rows(db, "(SELECT id, name, qty, note FROM items)");
    assert_eq!(shared(&mut a[0]), shared(&mut b[0]));
    assert_eq!(have(&mut b[0])[&a_id], have(&mut a[0])[&a_id]);

    // A value that does not convert is held too, with PostgreSQL's reason.
    b[0].batch_execute("ALTER TABLE items ALTER COLUMN note TYPE int USING NULL").unwrap();
    a[0].batch_execute("UPDATE items SET note = 'not a number' WHERE id = 2").unwrap();
    // A later transaction of A, on another row, is not held up by it.
    a[0].batch_execute("INSERT INTO items VALUES (3, 'c', 1, NULL)").unwrap();
    let (out, _) = pull_once(&mut a[0], &mut b[0], 1000);
    assert_eq!((out["errors"].clone(), out["transactions"].clone()), (json!(1), json!(1)), "{out}");
    let state: String = b[0].query_one("SELECT sqlstate FROM sync_apply_errors", &[]).unwrap().get(0);
    assert_eq!(state, "22P02");
    assert_eq!(count(&mut b[0], "SELECT count(*) FROM items WHERE id = 3"), 1);
    // Made appliable, it goes in late without undoing what came after it.
    b[0].batch_execute("ALTER TABLE items ALTER COLUMN note TYPE text").unwrap();
    let retried: String = b[0].query_one("SELECT sync_retry_errors()::text", &[]).unwrap().get(0);
    assert!(retried.contains("\"errors\": 0"), "{retried}");
    assert_eq!(shared(&mut a[0]), shared(&mut b[0]));
}

#[test]
fn missing_columns_are_ignored_and_reported_once() {
    let c = Cluster::start("apply-columns", &["fsync = off"]);
    let mut n = nodes(&c, 2, SCHEMA);
    n[1].batch_execute(
        "ALTER TABLE items DROP COLUMN note; ALTER TABLE items ADD COLUMN local_only text DEFAULT 'kept'",
    )
    .unwrap();
    n[0].batch_execute("INSERT INTO items VALUES (1, 'a', 1, 'dropped on B')").unwrap();
    let (a, b) = n.split_at_mut(1);
    let (out, _) = pull_once(&mut a[0], &mut b[0], 1000);
    assert_eq!(out["ignored_columns"], json!(["public.items.note"]), "{out}");
    let row: (String, String) =
        b[0].query_one("SELECT name, local_only FROM items WHERE id = 1", &[]).map(|r| (r.get(0), r.get(1))).unwrap();
    assert_eq!(row, ("a".to_string(), "kept".to_string()));
    a[0].batch_execute("UPDATE items SET note = 'again', name = 'b'").unwrap();
    let (out, _) = pull_once(&mut a[0], &mut b[0], 1000);
    assert!(out.get("ignored_columns").is_none(), "reported once: {out}");
    let status: String = b[0].query_one("SELECT sync_status()::text", &[]).unwrap().get(0);
    let status: Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["tables"][0]["ignored_columns"], json!(["note"]), "{status}");
}

fn strategy_nodes(c: &Cluster, strategy: &str) -> Vec<Client> {
    let mut n = nodes(
        c,
        3,
        "CREATE EXTENSION pg_peersync;
         CREATE TABLE items (id int PRIMARY KEY, name text, qty int, note text);
         CREATE FUNCTION pick(l jsonb, r jsonb, info jsonb) RETURNS jsonb LANGUAGE sql IMMUTABLE AS $$
           SELECT CASE WHEN l = 'null' THEN r WHEN r = 'null' THEN l
                  ELSE r || jsonb_build_object('qty', greatest((l->>'qty')::int, (r->>'qty')::int),
                                               'note', concat_ws('+', l->>'note', r->>'note')) END $$;
         SELECT sync_track_table('items');",
    );
    let ids: Vec<String> = n.iter_mut().map(node_id).collect();
    for db in n.iter_mut() {
        db.execute(
            "SELECT sync_set_strategy('items', $1, CASE WHEN $1 = 'custom' THEN 'pick(jsonb,jsonb,jsonb)' END)",
            &[&strategy],
        )
        .unwrap();
        // node0 first, node2 last, the same on every node.
        for (i, id) in ids.iter().enumerate() {
            db.execute("SELECT sync_set_node_priority($1::text::uuid, $2)", &[id, &(10 - 5 * i as i32)]).unwrap();
        }
    }
    n
}

fn row(db: &mut Client, id: i32) -> Option<(String, i32, Option<String>)> {
    db.query_opt("SELECT name, qty, note FROM items WHERE id = $1", &[&id])
        .unwrap()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
}

fn assert_converged(n: &mut [Client]) {
    let d: Vec<String> = n.iter_mut().map(|db| digest(db, "items")).collect();
    if !d.iter().all(|x| *x == d[0]) {
        let dump: Vec<(Vec<String>, Vec<String>)> =
            n.iter_mut().map(|db| (rows(db, "items"), rows(db, "(SELECT pk, versions FROM sync_rows)"))).collect();
        panic!("digests differ: {d:?}\n{dump:#?}");
    }
    // An origin at 0 (a node that never wrote) is the same as an absent one.
    let h: Vec<Value> = n
        .iter_mut()
        .map(|db| {
            let mut h = have(db);
            h.as_object_mut().unwrap().retain(|_, v| v != &json!(0));
            h
        })
        .collect();
    assert!(h.iter().all(|x| *x == h[0]), "have-vectors differ: {h:?}");
}

#[test]
fn concurrent_updates_resolve_per_strategy() {
    let c = Cluster::start("apply-strategies", &["fsync = off"]);
    for strategy in ["lww", "field_merge", "node_priority", "custom", "manual"] {
        let mut n = strategy_nodes(&c, strategy);
        n[0].execute("INSERT INTO items VALUES (1, 'x', 1, 'base')", &[]).unwrap();
        exchange_all(&mut n);
        // Concurrent: node1 changes qty, then node0 changes name (greater clock, higher priority
        // than node1 but node1's write is the later one under node_priority... see below).
        n[1].execute("UPDATE items SET qty = 5, note = 'one' WHERE id = 1", &[]).unwrap();
        n[0].execute("UPDATE items SET name = 'y', note = 'zero' WHERE id = 1", &[]).unwrap();
        exchange_all(&mut n);
        assert_converged(&mut n);
        let got = row(&mut n[2], 1).unwrap();
        let want = match strategy {
            // node0 wrote last: its whole row.
            "lww" | "manual" | "node_priority" => ("y".to_string(), 1, Some("zero".to_string())),
            // Each column from its last writer: name from node0, qty from node1, note from node0.
            "field_merge" => ("y".to_string(), 5, Some("zero".to_string())),
            // pick(): the later row, greatest qty, notes joined in canonical order.
            "custom" => ("y".to_string(), 5, Some("one+zero".to_string())),
            _ => unreachable!(),
        };
        assert_eq!(got, want, "{strategy}");
        // Both nodes that received a concurrent version recorded the conflict.
        for i in [0, 1] {
            let (n_conf, review): (i64, Option<String>) = n[i]
                .query_one("SELECT count(*), max(review) FROM sync_conflicts", &[])
                .map(|r| (r.get(0), r.get(1)))
                .unwrap();
            assert_eq!(n_conf, 1, "{strategy} node{i}");
            assert_eq!(review.as_deref(), Some(if strategy == "manual" { "pending" } else { "none" }));
        }
        if strategy == "node_priority" {
            // Now node2 (lowest priority) writes last, concurrently with node0: node0 still wins.
            n[2].execute("UPDATE items SET note = 'two' WHERE id = 1", &[]).unwrap();
            n[0].execute("UPDATE items SET note = 'zero again' WHERE id = 1", &[]).unwrap();
            exchange_all(&mut n);
            assert_converged(&mut n);
            assert_eq!(row(&mut n[1], 1).unwrap().2.as_deref(), Some("zero again"));
        }
        if strategy == "manual" {
            // Review on node1: keep node1's own version; it replicates as a new change.
            let id: i64 = n[1].query_one("SELECT id FROM sync_conflicts", &[]).unwrap().get(0);
            let e = n[1].execute("SELECT sync_resolve_conflict($1, '\"mine\"')", &[&id]).unwrap_err();
            assert_eq!(e.code().unwrap().code(), "22023");
            n[1].execute("SELECT sync_resolve_conflict($1, '\"local\"')", &[&id]).unwrap();
            exchange_all(&mut n);
            assert_converged(&mut n);
            assert_eq!(row(&mut n[0], 1).unwrap(), ("x".to_string(), 5, Some("one".to_string())));
            let review: String =
                n[1].query_one("SELECT review FROM sync_conflicts WHERE id = $1", &[&id]).unwrap().get(0);
            assert_eq!(review, "resolved");
        }
        drop(n);
    }
}

#[test]
fn custom_resolver_that_raises_falls_back_to_lww_and_is_recorded() {
    let c = Cluster::start("apply-custom-raise", &["fsync = off"]);
    let mut n = strategy_nodes(&c, "lww");
    for db in n.iter_mut() {
        db.batch_execute(
            "CREATE FUNCTION boom(l jsonb, r jsonb, info jsonb) RETURNS jsonb LANGUAGE plpgsql AS
               $$ BEGIN RAISE EXCEPTION 'no opinion'; END $$;
             SELECT sync_set_strategy('items', 'custom', 'boom(jsonb,jsonb,jsonb)');",
        )
        .unwrap();
    }
    n[0].execute("INSERT INTO items VALUES (1, 'a', 1, NULL)", &[]).unwrap();
    n[1].execute("INSERT INTO items VALUES (1, 'b', 2, NULL)", &[]).unwrap();
    exchange_all(&mut n);
    assert_converged(&mut n);
    assert_eq!(row(&mut n[2], 1).unwrap().0, "b");
    let note: String = n[0].query_one("SELECT note FROM sync_conflicts", &[]).unwrap().get(0);
    assert!(note.contains("no opinion"), "{note}");
    // A wrong signature is refused when it is set.
    let e = n[0].execute("SELECT sync_set_strategy('items', 'custom', 'lower(text)')", &[]).unwrap_err();
    assert_eq!(e.code().unwrap().code(), "22023");
}

#[test]
fn deletes_and_late_updates() {
    let c = Cluster::start("apply-deletes", &["fsync = off"]);
    for strategy in ["lww", "field_merge", "node_priority"] {
        let mut n = strategy_nodes(&c, strategy);
        each(&mut n[0], &["INSERT INTO items VALUES (1, 'a', 1, NULL), (2, 'b', 1, NULL)"]);
        exchange_all(&mut n);
        // Row 1: node0 updates, node1 then deletes it concurrently (the delete is later).
        n[0].execute("UPDATE items SET qty = 9 WHERE id = 1", &[]).unwrap();
        n[1].execute("DELETE FROM items WHERE id = 1", &[]).unwrap();
        // Row 2: node1 deletes, node2 then updates concurrently (the update is later).
        n[1].execute("DELETE FROM items WHERE id = 2", &[]).unwrap();
        n[2].execute("UPDATE items SET qty = 7 WHERE id = 2", &[]).unwrap();
        exchange_all(&mut n);
        assert_converged(&mut n);
        match strategy {
            // The later of the two wins.
            "lww" | "field_merge" => {
                assert_eq!(row(&mut n[0], 1), None, "{strategy}");
                assert_eq!(row(&mut n[0], 2), Some(("b".into(), 7, None)), "{strategy}");
            }
            // Priority first: node0 (update) beats node1 (delete); node1 (delete) beats node2.
            _ => {
                assert_eq!(row(&mut n[0], 1), Some(("a".into(), 9, None)));
                assert_eq!(row(&mut n[0], 2), None);
            }
        }
        drop(n);
    }

    // A delete that has seen an update: the update, arriving again later, changes nothing.
    let mut n = strategy_nodes(&c, "lww");
    n[0].execute("INSERT INTO items VALUES (5, 'a', 1, NULL)", &[]).unwrap();
    n[0].execute("UPDATE items SET qty = 50 WHERE id = 5", &[]).unwrap();
    {
        let (a, b) = two(&mut n, 0, 1);
        pull(a, b);
    }
    n[1].execute("DELETE FROM items WHERE id = 5", &[]).unwrap();
    {
        // node2 gets the delete (and, causally first, the update) through node1...
        let (b, c2) = two(&mut n, 1, 2);
        pull(b, c2);
    }
    assert_eq!(row(&mut n[2], 5), None);
    // ...then from node0 itself: already held, skipped, not resurrected.
    let (a, c2) = two(&mut n, 0, 2);
    let out = pull(a, c2);
    assert_eq!(out["applied"], json!(0), "{out:?}");
    assert_eq!(row(&mut n[2], 5), None);
}

/// DESIGN.md invariant 4's counter-example: A (node0, highest priority) writes; C (node2,
/// lowest) has seen A and writes; B (node1) is concurrent with both and writes last. Delivered
/// in different orders, every node ends at B: A is not causally maximal (C has seen it), and of
/// the maximal set {B, C}, equal in priority, B has the greatest clock. Pairwise rules
/// applied in arrival order would end at C on one node and at B on another.
#[test]
fn node_priority_counterexample_converges_in_every_order() {
    let c = Cluster::start("apply-counterexample", &["fsync = off"]);
    let mut n = strategy_nodes(&c, "node_priority");
    let b_id = node_id(&mut n[1]);
    for db in n.iter_mut() {
        // B and C both low: node1 down to node2's 0.
        db.execute("SELECT sync_set_node_priority($1::text::uuid, 0)", &[&b_id]).unwrap();
    }
    n[0].execute("INSERT INTO items VALUES (1, 'A', 0, NULL)", &[]).unwrap();
    {
        let (a, c2) = two(&mut n, 0, 2);
        pull(a, c2);
    }
    n[2].execute("UPDATE items SET name = 'C' WHERE id = 1", &[]).unwrap();
    n[1].execute("INSERT INTO items VALUES (1, 'B', 0, NULL)", &[]).unwrap();
    // node0: A, B, C. node1: B, A, C. node2: A, C, B.
    for (to, order) in [(0usize, [1usize, 2]), (1, [0, 2]), (2, [1, 0])] {
        for from in order {
            let (f, t) = two(&mut n, from, to);
            pull(f, t);
        }
    }
    for db in n.iter_mut() {
        assert_eq!(row(db, 1).unwrap().0, "B");
    }
    assert_converged(&mut n);
}

#[test]
fn identical_content_on_both_sides_is_not_a_conflict() {
    let c = Cluster::start("apply-same-dump", &["fsync = off"]);
    // Both databases restored from one dump, then tracked: their existing rows are captured
    // as each node's own inserts, with the same content.
    let mut n = nodes(
        &c,
        2,
        "CREATE EXTENSION pg_peersync;
         CREATE TABLE items (id int PRIMARY KEY, name text, qty int, note text);
         INSERT INTO items SELECT g, 'n' || g, g, NULL FROM generate_series(1, 100) g;
         SELECT sync_track_table('items');",
    );
    let (a, b) = two(&mut n, 0, 1);
    let out = pull(a, b);
    assert_eq!((out["applied"].clone(), out["conflicts"].clone()), (json!(100), json!(0)), "{out:?}");
    let out = pull(b, a);
    assert_eq!(out["conflicts"], json!(0), "{out:?}");
    assert_eq!(digest(a, "items"), digest(b, "items"));
    assert_eq!(count(a, "SELECT count(*) FROM sync_conflicts") + count(b, "SELECT count(*) FROM sync_conflicts"), 0);
}

/// A local transaction writes a row while sync_apply is about to write the same row: apply
/// waits for its row lock, notices the local write committed meanwhile, and applies the origin
/// transaction again with it folded in, so both nodes still resolve the same way.
#[test]
fn local_write_racing_an_apply_is_folded_in() {
    let c = Cluster::start("apply-race", &["fsync = off"]);
    let mut n = nodes(&c, 2, SCHEMA);
    n[0].execute("INSERT INTO items VALUES (1, 'from node0', 1, NULL)", &[]).unwrap();
    let b = batch(&mut n[0], &json!({}));
    // node1 writes the same key in a transaction left open...
    let mut local = c.connect_db("node1");
    let mut tx = local.transaction().unwrap();
    tx.execute("INSERT INTO items VALUES (1, 'from node1', 2, NULL)", &[]).unwrap();
    // ...while another session applies node0's batch, which must wait for that row.
    let conn = c.conn_string("node1");
    let applier = std::thread::spawn(move || {
        let mut db = postgres::Client::connect(&conn, postgres::NoTls).unwrap();
        apply(&mut db, &b).unwrap()
    });
    let mut watch = c.connect_db("node1");
    let mut waiting = false;
    for _ in 0..600 {
        waiting = count(
            &mut watch,
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%sync_apply%'",
        ) > 0;
        if waiting {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(waiting, "sync_apply never waited for the local row lock");
    tx.commit().unwrap();
    let out = applier.join().unwrap();
    assert_eq!(out["conflicts"], json!(1), "{out}");
    exchange_all(&mut n);
    assert_eq!(digest(&mut n[0], "items"), digest(&mut n[1], "items"));
    // node1's insert came later: last writer wins on both nodes.
    let name: String = n[0].query_one("SELECT name FROM items WHERE id = 1", &[]).unwrap().get(0);
    assert_eq!(name, "from node1");
}

/// A transaction whose changes saw everything the receiver holds is applied without the row
/// registers (listed in sync_unfolded instead); the registers are brought up to date before a
/// change that may conflict is decided, so a conflict with a blind change is still seen.
#[test]
fn blind_transactions_are_folded_before_a_conflict_is_decided() {
    let c = Cluster::start("apply-blind", &["fsync = off"]);
    let mut n = nodes(&c, 3, SCHEMA);
    // C writes row 1, then A writes it too, later, without having seen C's.
    each(&mut n[2], &["INSERT INTO items VALUES (1, 'from c', 3, NULL)"]);
    each(&mut n[0], &["INSERT INTO items VALUES (1, 'from a', 1, NULL), (2, 'from a', 2, NULL)"]);
    let (a, b) = two(&mut n, 0, 1);
    pull(a, b);
    // B held nothing A had not seen: applied blind, no register yet.
    assert_eq!(count(b, "SELECT count(*) FROM sync_unfolded"), 1);
    assert_eq!(count(b, "SELECT count(*) FROM sync_rows"), 0);
    // C's insert has not seen A's, which B holds: not blind. B folds A's in first, so it sees
    // the conflict, and A's later write stays (lww).
    let (b, c_node) = two(&mut n, 1, 2);
    let out = pull(c_node, b);
    assert_eq!(out["conflicts"], json!(1), "{out:?}");
    assert_eq!(count(b, "SELECT count(*) FROM sync_unfolded"), 0);
    assert_eq!(count(b, "SELECT count(*) FROM sync_rows"), 2);
    assert_eq!(count(b, "SELECT count(*) FROM items WHERE id = 1 AND name = 'from a'"), 1);
    // A local edit on B after that is folded in too: A's next change has seen it (blind again).
    each(b, &["UPDATE items SET qty = 7 WHERE id = 2"]);
    exchange_all(&mut n);
    assert_converged(&mut n);
    assert_eq!(count(&mut n[2], "SELECT count(*) FROM items WHERE id = 1 AND name = 'from a'"), 1);
}

/// A long run of blind transactions is folded a slice at a time, in the order they were
/// applied: a change that saw an earlier one (in an earlier slice) stands for its row.
#[test]
fn blind_transactions_fold_in_the_order_they_were_applied() {
    let c = Cluster::start("apply-blind-order", &["fsync = off"]);
    let mut n = nodes(&c, 3, SCHEMA);
    // P writes row 1, then enough rows that what follows falls in another slice of the fold.
    each(
        &mut n[0],
        &[
            "INSERT INTO items VALUES (1, 'p', 1, NULL)",
            "INSERT INTO items SELECT g, 'filler', g, NULL FROM generate_series(1000, 21000) g",
        ],
    );
    // Q receives that and edits row 1; B receives P's and then Q's, all blind.
    let (p, q) = two(&mut n, 0, 2);
    pull(p, q);
    each(q, &["UPDATE items SET name = 'q' WHERE id = 1"]);
    let (p, b) = two(&mut n, 0, 1);
    pull(p, b);
    let (b, q) = two(&mut n, 1, 2);
    pull(q, b);
    assert_eq!(count(b, "SELECT count(*) FROM sync_unfolded"), 3);
    // P edits row 1 without having seen Q's edit: not blind on B, so B folds first and must
    // find Q's edit (not P's insert) in row 1's register: a conflict.
    each(&mut n[0], &["UPDATE items SET name = 'p again' WHERE id = 1"]);
    let (p, b) = two(&mut n, 0, 1);
    let out = pull(p, b);
    assert_eq!(out["conflicts"], json!(1), "{out:?}");
    assert_eq!(count(b, "SELECT count(*) FROM sync_unfolded"), 0);
    exchange_all(&mut n);
    assert_converged(&mut n);
}

/// Apply keeps its per-chunk statements planned for the life of the backend
/// (src/apply/plans.rs). In one session of B, conflicting rounds are applied around a column
/// type change and around the extension being dropped and created again: every statement of
/// the conflict path (registers, table rows, conflict records, writes) must follow.
#[test]
fn kept_plans_follow_schema_changes_in_the_same_session() {
    let c = Cluster::start("apply-plans", &["fsync = off"]);
    let mut n = nodes(&c, 2, SCHEMA);
    // A and B write rows 10k+1 .. 10k+5 concurrently; B then applies A's, which conflict.
    let round = |n: &mut [Client], k: i32| -> Value {
        let (lo, hi) = (k * 10 + 1, k * 10 + 5);
        each(&mut n[0], &[&format!("INSERT INTO items SELECT g, 'a', {k}, NULL FROM generate_series({lo}, {hi}) g")]);
        each(&mut n[1], &[&format!("INSERT INTO items SELECT g, 'b', {k}, NULL FROM generate_series({lo}, {hi}) g")]);
        let (a, b) = two(n, 0, 1);
        let out = pull(a, b);
        assert_eq!(out["errors"], json!(0), "{out:?}");
        Value::Object(out)
    };
    assert_eq!(round(&mut n, 1)["conflicts"], json!(5));
    for db in n.iter_mut() {
        db.batch_execute("ALTER TABLE items ALTER COLUMN qty TYPE bigint").unwrap();
    }
    assert_eq!(round(&mut n, 2)["conflicts"], json!(5));
    // B starts over as a new node in the same session: its tables and plans' targets are new.
    n[1].batch_execute(
        "DROP EXTENSION pg_peersync CASCADE; CREATE EXTENSION pg_peersync; SELECT sync_track_table('items');",
    )
    .unwrap();
    let first = round(&mut n, 3);
    // Tracking items again captured B's 10 rows as its own inserts, concurrent with A's rounds
    // 1 and 2; round 3 conflicts as before.
    assert_eq!(first["conflicts"], json!(15), "{first}");
    assert_eq!(round(&mut n, 4)["conflicts"], json!(5));
    exchange_all(&mut n);
    assert_eq!(digest(&mut n[0], "items"), digest(&mut n[1], "items"));
    assert_eq!(count(&mut n[1], "SELECT count(*) FROM items WHERE qty = 4"), 5);
}
