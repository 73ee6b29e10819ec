//! `make sysbench`: a workload nobody here wrote. sysbench's `oltp_write_only` (index and
//! non-index updates, a delete and re-insert of one row per transaction) runs on two nodes at
//! once against the same tracked tables, prepared on one and synced to the other by the
//! workers (loopback, static peers). Then the nodes must converge with nothing held. Prints
//! what it saw; exits non-zero if they do not converge. `k` is declared a counter (each
//! node's increments add up); `SYSBENCH_COUNTERS=0` leaves it a plain column.

use pg_peersync_tests::{Cluster, digest, free_port, wait_for, worker_status};
use std::time::Instant;

const TABLES: usize = 2;
const ROWS: usize = 5000;
const SECONDS: u64 = 20;

fn node(name: &str, port: u16, peer: u16) -> Cluster {
    let extra = ["fsync = off", "max_connections = 60", "peersync.multicast_group = ''", "peersync.sync_interval = 2"];
    Cluster::start_peer(name, "sysbench-lab-registration-key", port, &[peer], &extra)
}

/// sysbench against `c` (its Unix socket directory is the host), with `args` after the common ones.
fn sysbench(c: &Cluster, args: &[&str]) -> std::process::Output {
    let host = format!("--pgsql-host={}", c.socket_dir().display());
    let mut cmd = std::process::Command::new("sysbench");
    cmd.args(["oltp_write_only", "--db-driver=pgsql", &host, "--pgsql-port=5432", "--pgsql-user=postgres"])
        .args(["--pgsql-db=postgres", &format!("--tables={TABLES}"), &format!("--table-size={ROWS}")])
        .args(args);
    cmd.output().expect("sysbench (Debian package sysbench)")
}

fn state(c: &Cluster) -> (Vec<String>, i64, i64) {
    let mut db = c.connect();
    let digests = (1..=TABLES).map(|i| digest(&mut db, &format!("sbtest{i}"))).collect();
    let held: i64 = db.query_one("SELECT count(*) FROM sync_inbox", &[]).unwrap().get(0);
    let k: i64 = db.query_one("SELECT coalesce(sum(k), 0)::bigint FROM sbtest1", &[]).unwrap().get(0);
    (digests, held, k)
}

fn main() {
    let (pa, pb) = (free_port(), free_port());
    let (a, b) = (node("sysbench-a", pa, pb), node("sysbench-b", pb, pa));
    let out = sysbench(&a, &["prepare"]);
    assert!(out.status.success(), "sysbench prepare: {}", String::from_utf8_lossy(&out.stderr));
    // B gets the same tables, empty: the rows come from A.
    let ddl: String = (1..=TABLES)
        .map(|i| {
            format!(
                "CREATE TABLE sbtest{i} (id serial PRIMARY KEY, k integer DEFAULT 0 NOT NULL, \
                 c char(120) DEFAULT '' NOT NULL, pad char(60) DEFAULT '' NOT NULL); \
                 CREATE INDEX k_{i} ON sbtest{i} (k);"
            )
        })
        .collect();
    b.connect().batch_execute(&ddl).unwrap();
    // k is a counter unless SYSBENCH_COUNTERS=0.
    let counters = std::env::var("SYSBENCH_COUNTERS").as_deref() != Ok("0");
    for c in [&a, &b] {
        let track: String = (1..=TABLES)
            .map(|i| {
                let counter =
                    if counters { format!("SELECT sync_set_counters('sbtest{i}', '{{k}}');") } else { String::new() };
                format!("SELECT sync_track_table('sbtest{i}'); {counter}")
            })
            .collect();
        c.connect().batch_execute(&format!("CREATE EXTENSION pg_peersync; {track}")).unwrap();
    }
    let started = Instant::now();
    wait_for(120, "B to hold A's prepared rows", || {
        (state(&a).0 == state(&b).0 && worker_status(&b)["peers"][0]["state"] == "up").then_some(())
    });
    println!("prepared {TABLES} x {ROWS} rows on A; on B after {:?}", started.elapsed());

    // Both nodes at once, on the same rows.
    let run = |c: &Cluster| {
        sysbench(c, &["--threads=2", &format!("--time={SECONDS}"), "--report-interval=0", "--rand-seed=0", "run"])
    };
    let outs = std::thread::scope(|s| {
        let ha = s.spawn(|| run(&a));
        let hb = s.spawn(|| run(&b));
        [ha.join().unwrap(), hb.join().unwrap()]
    });
    for (name, out) in ["A", "B"].iter().zip(&outs) {
        let text = String::from_utf8_lossy(&out.stdout);
        let tps = text.lines().find(|l| l.contains("transactions:")).unwrap_or("(no summary)").trim().to_string();
        println!("sysbench on {name}: {tps}; exit {}", out.status);
        if !out.status.success() {
            println!("{}", String::from_utf8_lossy(&out.stderr));
        }
    }
    let ended = Instant::now();
    let converged = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_for(120, "A and B to converge with nothing held", || {
            let (sa, sb) = (state(&a), state(&b));
            (sa.0 == sb.0 && sa.1 == 0 && sb.1 == 0).then_some(sa)
        })
    }));
    match converged {
        Ok((_, _, k)) => {
            let mut db = a.connect();
            let conflicts: i64 = db.query_one("SELECT count(*) FROM sync_conflicts", &[]).unwrap().get(0);
            println!(
                "converged {:?} after the load, nothing held; sum(k) of sbtest1 = {k}; {conflicts} conflicts recorded on A",
                ended.elapsed()
            );
        }
        Err(_) => {
            // Which rows differ, and how.
            let rows = |c: &Cluster| -> std::collections::BTreeMap<i32, String> {
                c.connect()
                    .query("SELECT id, s::text FROM sbtest1 s", &[])
                    .unwrap()
                    .iter()
                    .map(|r| (r.get(0), r.get(1)))
                    .collect()
            };
            let (ra, rb) = (rows(&a), rows(&b));
            let differ: std::collections::BTreeSet<i32> =
                ra.keys().chain(rb.keys()).filter(|k| ra.get(k) != rb.get(k)).copied().collect();
            println!("sbtest1: {} rows differ; for example:", differ.len());
            for k in differ.iter().take(3) {
                println!("  A: {:?}\n  B: {:?}", ra.get(k), rb.get(k));
            }
            for c in [&a, &b] {
                let s: String = c.connect().query_one("SELECT sync_status()::text", &[]).unwrap().get(0);
                println!("{}: {s}", c.name);
            }
            // exit() skips destructors: stop the clusters first.
            drop((a, b));
            std::process::exit(1);
        }
    }
}
