//! `make bench`: capture overhead, measured side by side in one run.
//!
//! Two databases in one throwaway cluster, identical except that one has pg_peersync tracking
//! the tables. Runs alternate plain / tracked, and each pair gives a ratio; the table shows the
//! median and range over the pairs, since this machine is noisy.

use pg_peersync_tests::Cluster;
use std::time::Instant;

/// pgbench pairs (each `BENCH_SECONDS` per side) and bulk-statement pairs.
const PAIRS: usize = 4;
const BULK_PAIRS: usize = 5;

fn pgbench_tps(c: &Cluster, db: &str, seconds: u32) -> f64 {
    // Start each run from a clean checkpoint with the OS's write-back done, so no run pays
    // for another's dirty pages (the runs are bound by fsync).
    c.connect_db(db).batch_execute("CHECKPOINT").unwrap();
    let _ = std::process::Command::new("sync").status();
    let out = c.run_client("pgbench", &["-n", "-c", "4", "-j", "2", "-M", "prepared", "-T", &seconds.to_string(), db]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "pgbench failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    text.lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no tps in pgbench output: {text}"))
}

fn timed(db: &mut postgres::Client, sql: &str) -> f64 {
    let start = Instant::now();
    db.batch_execute(sql).unwrap();
    start.elapsed().as_secs_f64()
}

fn summary(name: &str, ratios: &[f64], target: &str) {
    let mut r = ratios.to_vec();
    r.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!("| {name:<44} | {:>6.2} | {:>5.2} .. {:<5.2} | {target:<8} |", r[r.len() / 2], r[0], r[r.len() - 1]);
}

fn main() {
    let seconds: u32 = std::env::var("BENCH_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(20);
    println!("Starting a throwaway cluster (shared_buffers 256MB, fsync on, autovacuum off)...");
    let c = Cluster::start("bench", &["shared_buffers = '256MB'", "max_wal_size = '4GB'", "checkpoint_timeout = '30min'", "autovacuum = off"]);
    let mut admin = c.connect();
    admin.batch_execute("CREATE DATABASE plain").unwrap();
    admin.batch_execute("CREATE DATABASE tracked").unwrap();
    for db in ["plain", "tracked"] {
        let out = c.run_client("pgbench", &["-i", "-q", "-s", "10", db]);
        assert!(out.status.success(), "pgbench -i: {}", String::from_utf8_lossy(&out.stderr));
        // pgbench_history has no primary key; give both databases the same one.
        let mut conn = c.connect_db(db);
        conn.batch_execute("ALTER TABLE pgbench_history ADD COLUMN hid bigserial PRIMARY KEY").unwrap();
        conn.batch_execute("VACUUM ANALYZE").unwrap();
    }
    let mut tracked = c.connect_db("tracked");
    tracked
        .batch_execute(
            "CREATE EXTENSION pg_peersync;
             SELECT sync_track_table(t) FROM unnest(ARRAY['pgbench_accounts', 'pgbench_branches',
                 'pgbench_tellers', 'pgbench_history']::regclass[]) t;
             CHECKPOINT;",
        )
        .unwrap();
    let mut plain = c.connect_db("plain");

    let (mut tps, mut ins, mut upd) = (vec![], vec![], vec![]);
    for pair in 0..PAIRS {
        // Alternate which side goes first, so a drift in the machine's speed cancels out.
        let (base, with) = if pair % 2 == 0 {
            let b = pgbench_tps(&c, "plain", seconds);
            (b, pgbench_tps(&c, "tracked", seconds))
        } else {
            let w = pgbench_tps(&c, "tracked", seconds);
            (pgbench_tps(&c, "plain", seconds), w)
        };
        println!("pair {pair}: pgbench tps plain {base:.0}, tracked {with:.0}");
        tps.push(with / base);
    }
    for pair in 0..BULK_PAIRS {
        let mut times = [[0.0; 2]; 2];
        for (k, db) in [&mut plain, &mut tracked].into_iter().enumerate() {
            db.batch_execute(&format!("CREATE TABLE bulk_{pair} (id int PRIMARY KEY, a int, b text, c numeric)")).unwrap();
            if k == 1 {
                db.batch_execute(&format!("SELECT sync_track_table('bulk_{pair}')")).unwrap();
            }
            db.batch_execute("CHECKPOINT").unwrap();
            times[k][0] = timed(db, &format!(
                "INSERT INTO bulk_{pair} SELECT g, g, md5(g::text), g * 1.5 FROM generate_series(1, 100000) g"
            ));
            times[k][1] = timed(db, &format!("UPDATE bulk_{pair} SET a = a + 1"));
            db.batch_execute(&format!("DROP TABLE bulk_{pair}")).unwrap();
        }
        println!(
            "bulk {pair}: 100k INSERT plain {:.3}s tracked {:.3}s; 100k UPDATE plain {:.3}s tracked {:.3}s",
            times[0][0], times[1][0], times[0][1], times[1][1]
        );
        ins.push(times[1][0] / times[0][0]);
        upd.push(times[1][1] / times[0][1]);
    }
    println!("\n| {:<44} | median | range        | target   |", "ratio (tracked / plain)");
    println!("|{}|--------|--------------|----------|", "-".repeat(46));
    summary(&format!("pgbench tpcb-like TPS, s=10, 4 clients, {seconds}s"), &tps, ">= 0.85");
    summary("100k-row single-statement INSERT time", &ins, "<= 2.0");
    summary("100k-row single-statement UPDATE time", &upd, "<= 2.0");
}
