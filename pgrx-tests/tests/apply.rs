//! End-to-end apply tests: several databases of one cluster act as nodes (each has its own
//! node id) and exchange batches with `sync_changes()` / `sync_apply()`.

use pg_peersync_tests::{Cluster, digest, have, pull, pull_once};
use postgres::Client;
use serde_json::{Value, json};

const SCHEMA: &str = "CREATE EXTENSION pg_peersync;
     CREATE TABLE items (id int PRIMARY KEY, name text, qty int, note text);
     SELECT sync_track_table('items');";

/// `n` databases of one cluster, each with the extension and `schema` run in it.
fn nodes(c: &Cluster, n: usize, schema: &str) -> Vec<Client> {
    let mut admin = c.connect();
    (0..n)
        .map(|i| {
            let name = format!("node{i}");
            admin.execute(&format!("DROP DATABASE IF EXISTS {name}"), &[]).unwrap();
            admin.execute(&format!("CREATE DATABASE {name}"), &[]).unwrap();
            let mut db = c.connect_db(&name);
            db.batch_execute(schema).unwrap();
            db
        })
        .collect()
}

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
    db.query(&format!("SELECT t::text FROM {table} t ORDER BY 1"), &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
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
    assert_eq!(have(&mut n2[0]), have(&mut n0[0]).as_object().unwrap().iter().fold(have(&mut n2[0]), |mut h, (k, v)| {
        h[k] = v.clone();
        h
    }));
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

    n[0].batch_execute("CREATE TABLE other (id int PRIMARY KEY); SELECT sync_track_table('other'); INSERT INTO other VALUES (1);")
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
        &["INSERT INTO items VALUES (1, 'a', 1, NULL)", "UPDATE items SET qty = 2 WHERE id = 1", "INSERT INTO items VALUES (2, 'b', 1, NULL)"],
    );
    let (a, b) = n.split_at_mut(1);
    let (out, _) = pull_once(&mut a[0], &mut b[0], 1000);
    assert_eq!((out["errors"].clone(), out["waiting"].clone(), out["applied"].clone()), (json!(1), json!(2), json!(0)), "{out}");
    let (sqlstate, error): (String, String) = b[0]
        .query_one("SELECT sqlstate, error FROM sync_apply_errors", &[])
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!(sqlstate, "23502", "{error}");
    assert!(error.contains("site"), "{error}");
    assert_eq!(count(&mut b[0], "SELECT count(*) FROM items"), 0);
    // The have-vector does not claim what is held.
    let a_id = node_id(&mut a[0]);
    assert!(have(&mut b[0]).get(&a_id).is_none());
    // Pulling again does not duplicate anything; still held.
    let (again, _) = pull_once(&mut a[0], &mut b[0], 1000);
    assert_eq!(again["applied"], json!(0));
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
    let (out, _) = pull_once(&mut a[0], &mut b[0], 1000);
    assert_eq!(out["errors"], json!(1), "{out}");
    let state: String = b[0].query_one("SELECT sqlstate FROM sync_apply_errors", &[]).unwrap().get(0);
    assert_eq!(state, "22P02");
}

#[test]
fn missing_columns_are_ignored_and_reported_once() {
    let c = Cluster::start("apply-columns", &["fsync = off"]);
    let mut n = nodes(&c, 2, SCHEMA);
    n[1].batch_execute("ALTER TABLE items DROP COLUMN note; ALTER TABLE items ADD COLUMN local_only text DEFAULT 'kept'")
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
