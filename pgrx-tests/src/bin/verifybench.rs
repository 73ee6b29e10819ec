//! `make bench`, verify part: `sync_verify` between two nodes holding the same
//! pgbench_accounts-like table, then with a few rows changed on one of them, side by side with
//! `pg_dump -t accounts | psql` of the same table (what moving the table to compare it would
//! take) in the same run.
//!
//! `PEERSYNC_VERIFY_ROWS` sets the table's size (default 1,000,000 rows).

use pg_peersync_tests::{Cluster, free_port, node_id, pg_dump_into, wait_for, worker_status};
use serde_json::Value;
use std::time::Instant;

const CHANGED: i64 = 10;

fn verify(c: &Cluster, peer: &str) -> (Value, f64) {
    let t = Instant::now();
    let text: String = c.connect().query_one("SELECT sync_verify($1::text::uuid)::text", &[&peer]).unwrap().get(0);
    (serde_json::from_str(&text).unwrap(), t.elapsed().as_secs_f64())
}

fn main() {
    let rows: i64 = std::env::var("PEERSYNC_VERIFY_ROWS").ok().and_then(|n| n.parse().ok()).unwrap_or(1_000_000);
    let key = "verifybench-registration-key";
    let (pa, pb) = (free_port(), free_port());
    let extra = ["fsync = off", "peersync.multicast_group = ''", "peersync.sync_interval = 1"];
    // The same rows on both nodes, written with capture off: nothing to exchange.
    let fill = format!(
        "CREATE EXTENSION pg_peersync;
         CREATE TABLE accounts (aid int PRIMARY KEY, bid int, abalance int, filler char(84));
         SELECT sync_track_table('accounts');
         SET session_replication_role = replica;
         INSERT INTO accounts SELECT g, 1 + g / 100000, 0, '' FROM generate_series(1, {rows}) g;
         RESET session_replication_role;
         ANALYZE accounts;"
    );
    let a = Cluster::start_peer("vb-a", key, pa, &[pb], &extra);
    let b = Cluster::start_peer("vb-b", key, pb, &[pa], &extra);
    a.connect().batch_execute(&fill).unwrap();
    b.connect().batch_execute(&fill).unwrap();
    let id_b = node_id(&b);
    wait_for(60, "a to know b by id", || {
        let s = worker_status(&a);
        s["peers"].as_array()?.iter().any(|p| p["id"] == Value::String(id_b.clone())).then_some(())
    });

    let d = Cluster::start("vb-dump", &["fsync = off"]);
    d.connect().batch_execute("CREATE DATABASE target").unwrap();
    let t = Instant::now();
    pg_dump_into(&a, "accounts", &d, "target");
    let dump = t.elapsed().as_secs_f64();
    let size: i64 = a.connect().query_one("SELECT pg_table_size('accounts')", &[]).unwrap().get(0);

    let (same, t_same) = verify(&a, &id_b);
    assert_eq!(same["agree"], Value::Bool(true), "{same}");
    b.connect()
        .batch_execute(&format!(
            "SET session_replication_role = replica;
             UPDATE accounts SET abalance = -1 WHERE aid IN (SELECT g * ({rows} / {CHANGED}) FROM generate_series(1, {CHANGED}) g);"
        ))
        .unwrap();
    let (found, t_found) = verify(&a, &id_b);
    assert_eq!(found["tables"][0]["differing"], Value::from(CHANGED), "{found}");

    let kib = |v: &Value| v.as_f64().unwrap_or(0.0) / 1024.0;
    println!(
        "sync_verify, {rows} pgbench_accounts-like rows ({:.0} MiB) on two nodes (one run, side by side):",
        size as f64 / 1048576.0
    );
    println!("  pg_dump | psql of the table           {dump:6.2} s");
    println!(
        "  sync_verify, tables agree             {t_same:6.2} s  {} round trip(s), {:.1} KiB received",
        same["round_trips"],
        kib(&same["bytes_received"])
    );
    println!(
        "  sync_verify, {CHANGED} rows differ           {t_found:6.2} s  {} round trip(s), {:.1} KiB received",
        found["round_trips"],
        kib(&found["bytes_received"])
    );
    println!(
        "  time / pg_dump | psql time: {:.2} (agree), {:.2} (differ); bytes received / table size: {:.5}",
        t_same / dump,
        t_found / dump,
        same["bytes_received"].as_f64().unwrap_or(0.0) / size as f64
    );
}
