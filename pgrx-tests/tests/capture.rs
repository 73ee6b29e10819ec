//! End-to-end capture tests: several sessions on a real cluster, restarts and crashes.

use pg_peersync_tests::{Cluster, changes};
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

fn setup(c: &Cluster) -> postgres::Client {
    let mut db = c.connect();
    db.batch_execute(
        "CREATE EXTENSION pg_peersync;
         CREATE TABLE items (id int PRIMARY KEY, writer int, n int, note text);
         SELECT sync_track_table('items');",
    )
    .unwrap();
    db
}

/// Apply a batch to a have-vector the way a receiver would; returns the events.
fn advance(have: &mut Value, batch: &Value) -> Vec<Value> {
    let parsed: sync_bridge::Batch = serde_json::from_value(batch.clone()).unwrap();
    parsed.validate().expect("batch validates: format, checksums, ranges, order");
    for (origin, upto) in batch["have"].as_object().unwrap() {
        have[origin] = upto.clone();
    }
    batch["events"].as_array().unwrap().clone()
}

#[test]
fn prefix_property_holds_under_concurrent_writers_and_rollbacks() {
    let c = Cluster::start("prefix", &["fsync = off"]);
    let mut reader = setup(&c);
    let done = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let conn = c.conn_string("postgres");
            std::thread::spawn(move || {
                let mut db = postgres::Client::connect(&conn, postgres::NoTls).unwrap();
                let mut rng = rand::rngs::StdRng::seed_from_u64(w as u64);
                let mut committed = 0;
                for t in 0..120 {
                    let mut tx = db.transaction().unwrap();
                    let rows = rng.gen_range(1..4);
                    for r in 0..rows {
                        let id = w * 100_000 + t * 10 + r;
                        tx.execute("INSERT INTO items VALUES ($1, $2, 0, 'x')", &[&id, &w]).unwrap();
                    }
                    if rng.gen_bool(0.3) {
                        // A rolled-back subtransaction inside a committed transaction.
                        let mut sp = tx.transaction().unwrap();
                        sp.execute("UPDATE items SET note = 'savepoint rolled back' WHERE writer = $1", &[&w]).unwrap();
                        sp.rollback().unwrap();
                    }
                    tx.execute("UPDATE items SET n = n + 1 WHERE writer = $1 AND id % 7 = 0", &[&w]).unwrap();
                    if rng.gen_bool(1.0 / 3.0) {
                        tx.execute("UPDATE items SET note = 'rolled back' WHERE writer = $1", &[&w]).unwrap();
                        tx.rollback().unwrap();
                    } else {
                        tx.commit().unwrap();
                        committed += 1;
                    }
                }
                committed
            })
        })
        .collect();
    let stopper = {
        let done = done.clone();
        std::thread::spawn(move || {
            let total: i32 = writers.into_iter().map(|h| h.join().unwrap()).sum();
            done.store(true, Ordering::SeqCst);
            total
        })
    };

    let mut have = json!({});
    let mut seen: HashSet<(String, i64, i64)> = HashSet::new();
    let mut batch_of_txn: HashMap<(String, i64), usize> = HashMap::new();
    let mut batches = 0usize;
    let mut rounds_after_done = 0;
    // Bounded: the writers finish in well under this many rounds.
    for _ in 0..200_000 {
        let finished = done.load(Ordering::SeqCst);
        let batch = changes(&mut reader, &have, 50);
        batches += 1;
        for e in advance(&mut have, &batch) {
            let key =
                (e["origin"].as_str().unwrap().to_string(), e["seq"].as_i64().unwrap(), e["idx"].as_i64().unwrap());
            assert!(seen.insert(key.clone()), "event {key:?} received twice");
            let txn = (key.0.clone(), key.1);
            let b = *batch_of_txn.entry(txn.clone()).or_insert(batches);
            assert_eq!(b, batches, "transaction {txn:?} was split across batches");
            let note = e["data"]["note"].as_str().unwrap_or("");
            assert!(!note.contains("rolled back"), "rolled-back change delivered: {e}");
        }
        if finished && batch["events"].as_array().unwrap().is_empty() {
            rounds_after_done += 1;
            if rounds_after_done > 1 {
                break;
            }
        }
    }
    let committed_txns = stopper.join().unwrap();
    assert!(done.load(Ordering::SeqCst));

    let stored: HashSet<(String, i64, i64)> = reader
        .query("SELECT origin::text, origin_seq, origin_idx::int8 FROM sync_events", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(seen, stored, "the reader holds exactly the committed events");
    let txns: HashSet<i64> = seen.iter().map(|k| k.1).collect();
    assert_eq!(txns.len() as i32, committed_txns, "one number per committed transaction");
    let final_have: Value =
        serde_json::from_str(reader.query_one("SELECT sync_have()::text", &[]).unwrap().get::<_, &str>(0)).unwrap();
    assert_eq!(final_have, have);
    assert!(batches > 10, "the reader pulled while writers ran ({batches} batches)");
}

#[test]
fn batches_keep_transactions_whole_and_report_more() {
    let c = Cluster::start("batches", &["fsync = off"]);
    let mut db = setup(&c);
    db.batch_execute("INSERT INTO items SELECT g, 0, 0, 'bulk' FROM generate_series(1, 25) g").unwrap();
    for i in 0..5 {
        db.execute("INSERT INTO items VALUES ($1, 1, 0, 'single')", &[&(100 + i)]).unwrap();
    }
    let first = changes(&mut db, &json!({}), 10);
    assert_eq!(first["events"].as_array().unwrap().len(), 25, "a 25-event transaction comes whole");
    assert_eq!(first["more"], json!(true));
    let mut have = json!({});
    advance(&mut have, &first);
    let second = changes(&mut db, &have, 2);
    assert_eq!(second["events"].as_array().unwrap().len(), 2);
    advance(&mut have, &second);
    let rest = changes(&mut db, &have, 1000);
    assert_eq!(rest["events"].as_array().unwrap().len(), 3);
    assert_eq!(rest["more"], json!(false));
    advance(&mut have, &rest);
    assert_eq!(changes(&mut db, &have, 1000)["events"], json!([]));
}

#[test]
fn numbers_are_never_reused_after_a_crash() {
    let mut c = Cluster::start("crash", &["fsync = off"]);
    let mut db = setup(&c);
    db.execute("INSERT INTO items VALUES (1, 0, 0, 'a')", &[]).unwrap();
    // A captured-then-rolled-back transaction burns the next number.
    let mut tx = db.transaction().unwrap();
    tx.execute("INSERT INTO items VALUES (2, 0, 0, 'b')", &[]).unwrap();
    tx.rollback().unwrap();
    let mut have = json!({});
    advance(&mut have, &changes(&mut db, &json!({}), 1000));
    let node: String = db.query_one("SELECT sync_node_id()::text", &[]).unwrap().get(0);
    let hlc_before: i64 = db.query_one("SELECT max(hlc) FROM sync_events", &[]).unwrap().get(0);
    drop(db);
    c.restart(true);
    let mut db = c.connect();
    assert_eq!(
        db.query_one("SELECT sync_node_id()::text", &[]).unwrap().get::<_, String>(0),
        node,
        "identity survives restart"
    );
    db.execute("INSERT INTO items VALUES (3, 0, 0, 'after crash')", &[]).unwrap();
    let batch = changes(&mut db, &have, 1000);
    let events = advance(&mut have, &batch);
    assert_eq!(events.len(), 1, "the reader still receives the first event committed after the crash");
    assert_eq!(events[0]["data"]["note"], json!("after crash"));
    assert!(events[0]["hlc"].as_i64().unwrap() > hlc_before, "the clock does not go back across restarts");
}

#[test]
fn create_extension_without_preload_fails_with_hint() {
    let c = Cluster::start_with("nopreload", &["fsync = off".to_string()]);
    let mut db = c.connect();
    let err = db.batch_execute("CREATE EXTENSION pg_peersync").unwrap_err();
    let db_err = err.as_db_error().expect("a server error");
    assert_eq!(db_err.code().code(), "55000");
    assert!(db_err.message().contains("shared_preload_libraries"), "{}", db_err.message());
    assert!(db_err.hint().unwrap_or("").contains("shared_preload_libraries = 'pg_peersync'"));
}

#[test]
fn changes_refuse_repeatable_read_and_bad_have_vectors() {
    let c = Cluster::start("refuse", &["fsync = off"]);
    let mut db = setup(&c);
    let mut tx = db.build_transaction().isolation_level(postgres::IsolationLevel::RepeatableRead).start().unwrap();
    let err = tx.query_one("SELECT sync_changes()", &[]).unwrap_err();
    assert_eq!(err.as_db_error().unwrap().code().code(), "25001");
    drop(tx);
    let err = db.query_one("SELECT sync_changes('{\"not-a-uuid\": 1}')", &[]).unwrap_err();
    let e = err.as_db_error().unwrap();
    assert_eq!(e.code().code(), "22023");
    assert!(e.hint().unwrap().contains("uuid"));
}

#[test]
fn status_reports_tables_and_events() {
    let c = Cluster::start("status", &["fsync = off"]);
    let mut db = setup(&c);
    db.batch_execute(
        "INSERT INTO items SELECT g, 0, 0, 'x' FROM generate_series(1, 10) g; DELETE FROM items WHERE id = 1",
    )
    .unwrap();
    let status: Value =
        serde_json::from_str(db.query_one("SELECT sync_status()::text", &[]).unwrap().get::<_, &str>(0)).unwrap();
    assert_eq!(status["node_name"], json!("status"));
    assert_eq!(status["tables"][0]["events"], json!(11));
    assert_eq!(status["events"]["total"], json!(11));
    let node = status["node_id"].as_str().unwrap();
    let max_seq: i64 = db.query_one("SELECT max(origin_seq) FROM sync_events", &[]).unwrap().get(0);
    assert_eq!(status["have"][node], json!(max_seq), "nothing is in flight: the prefix is the last number");
    let by_origin: BTreeMap<String, Value> = serde_json::from_value(status["have"].clone()).unwrap();
    assert_eq!(by_origin.len(), 1);
}

#[test]
fn prepared_transactions_that_captured_are_refused() {
    let c = Cluster::start("twophase", &["fsync = off", "max_prepared_transactions = 2"]);
    let mut db = setup(&c);
    db.batch_execute("BEGIN; INSERT INTO items VALUES (1, 0, 0, 'x')").unwrap();
    let err = db.batch_execute("PREPARE TRANSACTION 'p1'").unwrap_err();
    let e = err.as_db_error().expect("a server error");
    assert_eq!(e.code().code(), "0A000");
    assert!(e.hint().unwrap_or("").contains("PREPARE TRANSACTION"));
    db.batch_execute("ROLLBACK").ok();
    // A prepared transaction that captured nothing is fine.
    db.batch_execute("BEGIN; SELECT 1; PREPARE TRANSACTION 'p2'").unwrap();
    db.batch_execute("COMMIT PREPARED 'p2'").unwrap();
    let events: i64 = db.query_one("SELECT count(*) FROM sync_events", &[]).unwrap().get(0);
    assert_eq!(events, 0);
}

#[test]
fn node_name_defaults_to_the_host_name() {
    let c = Cluster::start_with(
        "hostname",
        &["shared_preload_libraries = 'pg_peersync'".to_string(), "fsync = off".to_string()],
    );
    let mut db = c.connect();
    db.batch_execute("CREATE EXTENSION pg_peersync").unwrap();
    let name: String = db.query_one("SELECT sync_status()->>'node_name'", &[]).unwrap().get(0);
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert_eq!(name, host.trim());
}
