//! `make bench`, join part: a new node copying a pgbench_accounts-like table from a peer's
//! snapshot (pg_peersync's join, over loopback, encrypted), side by side with
//! `pg_dump -t accounts | psql` of the same table in the same run.
//!
//! `PEERSYNC_JOIN_ROWS` sets the table's size (default 500,000 rows).

use pg_peersync_tests::{Cluster, free_port, pg_dump_into, wait_for};
use serde_json::Value;
use std::time::Instant;

const SETUP: &str = "CREATE EXTENSION pg_peersync;
     CREATE TABLE accounts (aid int PRIMARY KEY, bid int, abalance int, filler char(84));
     SELECT sync_track_table('accounts');";

fn count(c: &Cluster, db: &str) -> i64 {
    c.connect_db(db).query_one("SELECT count(*) FROM accounts", &[]).unwrap().get(0)
}

fn main() {
    let rows: i64 = std::env::var("PEERSYNC_JOIN_ROWS").ok().and_then(|n| n.parse().ok()).unwrap_or(500_000);
    let key = "joinbench-registration-key";
    let (pa, pc) = (free_port(), free_port());
    let extra = ["fsync = off", "peersync.multicast_group = ''", "peersync.sync_interval = 1"];
    let a = Cluster::start_peer("jb-source", key, pa, &[pc], &extra);
    a.connect().batch_execute(SETUP).unwrap();
    a.connect()
        .batch_execute(&format!(
            "INSERT INTO accounts SELECT g, 1 + g / 100000, 0, '' FROM generate_series(1, {rows}) g; ANALYZE accounts;"
        ))
        .unwrap();
    // The source's registers folded (its worker does it once quiet), as on a node in use.
    wait_for(300, "the source to fold its registers", || {
        let folded: i64 = a.connect().query_one("SELECT indexed_upto FROM sync_node", &[]).unwrap().get(0);
        (folded >= 1).then_some(())
    });

    let d = Cluster::start("jb-dump", &["fsync = off"]);
    d.connect().batch_execute("CREATE DATABASE target").unwrap();
    let t = Instant::now();
    pg_dump_into(&a, "accounts", &d, "target");
    let dump = t.elapsed().as_secs_f64();
    assert_eq!(count(&d, "target"), rows);

    let c = Cluster::start_peer("jb-joiner", key, pc, &[pa], &extra);
    let t = Instant::now();
    c.connect().batch_execute(SETUP).unwrap();
    // One connection polls: a new backend per poll would take CPU from the copy.
    let mut watch = c.connect();
    let join: Value = wait_for(600, "the new node to copy the table", || {
        let text: String = watch.query_one("SELECT (sync_status() -> 'join')::text", &[]).unwrap().get(0);
        let j: Value = serde_json::from_str(&text).unwrap();
        (j["state"] == "done").then_some(j)
    });
    let total = t.elapsed().as_secs_f64();
    assert_eq!(count(&c, "postgres"), rows);
    let copy = join["rows_copied"].as_f64().unwrap() / join["rows_per_s"].as_f64().unwrap().max(1.0);
    println!("join from a snapshot, {rows} pgbench_accounts-like rows (one run, side by side):");
    println!("  pg_dump | psql           {dump:6.2} s  {:>9.0} rows/s", rows as f64 / dump);
    println!("  pg_peersync copy         {copy:6.2} s  {:>9.0} rows/s", rows as f64 / copy);
    println!("  pg_peersync, from CREATE EXTENSION to done {total:6.2} s  {:>9.0} rows/s", rows as f64 / total);
    println!("  copy time / pg_dump | psql time: {:.2}", copy / dump);
}
