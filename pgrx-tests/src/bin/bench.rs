//! `make bench`: capture and apply overhead, measured side by side in one run.
//!
//! Capture: two databases in one throwaway cluster, identical except that one has pg_peersync
//! tracking the tables. Apply: a 100k-event stream from a third database, applied in batches
//! of 1,000 with `sync_apply()`, against a plain upsert of the same rows. Runs alternate, and
//! each pair gives a ratio; the table shows the median and range over the pairs, since this
//! machine is noisy.

use pg_peersync_tests::Cluster;
use std::time::Instant;

/// pgbench pairs (each `BENCH_SECONDS` per side) and bulk-statement pairs.
const PAIRS: usize = 4;
const BULK_PAIRS: usize = 5;
const APPLY_PAIRS: usize = 5;
const STREAM_ROWS: i64 = 100_000;
const APPLY_BATCH: i32 = 1000;

const ITEMS: &str = "CREATE TABLE items (id int PRIMARY KEY, name text, qty int, price numeric, note text)";

/// The stream: `STREAM_ROWS` rows inserted 1,000 per transaction on a source node, read back
/// as `sync_changes()` batches of `APPLY_BATCH` events.
fn stream(c: &Cluster) -> Vec<String> {
    c.connect().batch_execute("CREATE DATABASE source").unwrap();
    let mut src = c.connect_db("source");
    src.batch_execute(&format!("CREATE EXTENSION pg_peersync; {ITEMS}; SELECT sync_track_table('items');")).unwrap();
    for k in 0..STREAM_ROWS / 1000 {
        src.batch_execute(&format!(
            "INSERT INTO items SELECT g, md5(g::text), g % 100, g * 1.5, 'stream row' FROM generate_series({}, {}) g",
            k * 1000 + 1,
            (k + 1) * 1000
        ))
        .unwrap();
    }
    let mut have = serde_json::json!({});
    let mut batches = Vec::new();
    loop {
        let b: String = src
            .query_one("SELECT sync_changes($1::text::jsonb, $2)::text", &[&have.to_string(), &APPLY_BATCH])
            .unwrap()
            .get(0);
        let v: serde_json::Value = serde_json::from_str(&b).unwrap();
        if v["events"].as_array().unwrap().is_empty() {
            break;
        }
        for (k, n) in v["have"].as_object().unwrap() {
            have[k] = n.clone();
        }
        batches.push(b);
    }
    batches
}

/// A database ready to receive the stream; with `local_rows`, it first wrote every one of the
/// stream's rows itself (concurrently, as far as the stream is concerned), so each event
/// conflicts.
fn receiver(c: &Cluster, name: &str, local_rows: bool) -> postgres::Client {
    c.connect().batch_execute(&format!("CREATE DATABASE {name}")).unwrap();
    let mut db = c.connect_db(name);
    db.batch_execute(&format!("CREATE EXTENSION pg_peersync; {ITEMS}; SELECT sync_track_table('items');")).unwrap();
    if local_rows {
        db.batch_execute(&format!(
            "INSERT INTO items SELECT g, 'local', 0, 0, NULL FROM generate_series(1, {STREAM_ROWS}) g"
        ))
        .unwrap();
        // Fold the local writes into the row registers now (sync_apply would do it first).
        db.batch_execute("SELECT sync_retry_errors()").unwrap();
    }
    db.batch_execute("CHECKPOINT").unwrap();
    db
}

/// Apply every batch, given as text like the baselines' input: with `sync_apply(text)`, or with
/// `as_jsonb` through `sync_apply(jsonb)` (parsed into jsonb first, printed back inside).
fn apply_all(db: &mut postgres::Client, batches: &[String], as_jsonb: bool) -> (f64, i64) {
    let sql = if as_jsonb { "SELECT sync_apply($1::text::jsonb)::text" } else { "SELECT sync_apply($1::text)::text" };
    let start = Instant::now();
    let mut conflicts = 0;
    for b in batches {
        let out: String = db.query_one(sql, &[b]).unwrap().get(0);
        let out: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(out["errors"], serde_json::json!(0), "{out}");
        conflicts += out["conflicts"].as_i64().unwrap_or(0);
    }
    (start.elapsed().as_secs_f64(), conflicts)
}

/// The baselines: the same rows upserted in batches of the same size, given either the same
/// batch documents `sync_apply` gets (the rows extracted in SQL) or just the rows.
fn upsert_all(db: &mut postgres::Client, table: &str, inputs: &[String], whole_batch: bool) -> f64 {
    let source =
        if whole_batch { "jsonb_path_query_array($1::text::jsonb, '$.events[*].data')" } else { "$1::text::jsonb" };
    let sql = format!(
        "INSERT INTO {table} SELECT * FROM jsonb_to_recordset({source}) \
           AS x(id int, name text, qty int, price numeric, note text) \
         ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, qty = EXCLUDED.qty, price = EXCLUDED.price, note = EXCLUDED.note"
    );
    let start = Instant::now();
    for r in inputs {
        db.execute(&sql, &[r]).unwrap();
    }
    start.elapsed().as_secs_f64()
}

/// Returns the ratios: apply / upsert throughput (from the same batches, from bare rows),
/// conflicting / clean apply throughput, and apply through `sync_apply(jsonb)` / upsert.
fn apply_bench(c: &Cluster) -> ApplyRatios {
    let batches = stream(c);
    let rows: Vec<String> = batches
        .iter()
        .map(|b| {
            let v: serde_json::Value = serde_json::from_str(b).unwrap();
            let data: Vec<&serde_json::Value> = v["events"].as_array().unwrap().iter().map(|e| &e["data"]).collect();
            serde_json::to_string(&data).unwrap()
        })
        .collect();
    let events: usize = rows.iter().map(|r| serde_json::from_str::<Vec<serde_json::Value>>(r).unwrap().len()).sum();
    assert_eq!(events as i64, STREAM_ROWS);
    let mut plain = c.connect_db("plain");
    let mut r = ApplyRatios::default();
    for pair in 0..APPLY_PAIRS {
        let (table, rows_table) = (format!("upsert_{pair}"), format!("upsert_rows_{pair}"));
        for t in [&table, &rows_table] {
            plain.batch_execute(&format!("{}; CHECKPOINT", ITEMS.replace("items", t))).unwrap();
        }
        let mut clean = receiver(c, &format!("clean_{pair}"), false);
        let mut conflicting = receiver(c, &format!("conflicting_{pair}"), true);
        let mut via_jsonb = receiver(c, &format!("via_jsonb_{pair}"), false);
        // Alternate the order, so a drift in the machine's speed cancels out.
        let mut t = [0.0f64; 6];
        let mut conflicts = 0;
        let order: [usize; 5] = if pair % 2 == 0 { [0, 1, 2, 3, 4] } else { [4, 3, 2, 1, 0] };
        for k in order {
            match k {
                0 => t[0] = upsert_all(&mut plain, &table, &batches, true),
                1 => {
                    t[1] = apply_all(&mut clean, &batches, false).0;
                    // What blind apply left for later: folding it into the row registers, as
                    // happens before registers are next read (the worst case: every change).
                    t[5] = timed(&mut clean, "SELECT sync_retry_errors()");
                    let left: i64 = clean.query_one("SELECT count(*) FROM sync_unfolded", &[]).unwrap().get(0);
                    assert_eq!(left, 0, "the fold leaves nothing unfolded");
                }
                2 => (t[2], conflicts) = apply_all(&mut conflicting, &batches, false),
                3 => t[3] = upsert_all(&mut plain, &rows_table, &rows, false),
                _ => t[4] = apply_all(&mut via_jsonb, &batches, true).0,
            }
        }
        assert_eq!(conflicts, STREAM_ROWS, "every event conflicts");
        let rate = |t: f64| STREAM_ROWS as f64 / t;
        println!(
            "apply {pair}: upsert from the batches {:.0} rows/s (from bare rows {:.0}), sync_apply(text) {:.0} rows/s \
             ({:.0} with the fold it deferred, {:.2} s), every event conflicting {:.0} rows/s, sync_apply(jsonb) {:.0} rows/s",
            rate(t[0]),
            rate(t[3]),
            rate(t[1]),
            rate(t[1] + t[5]),
            t[5],
            rate(t[2]),
            rate(t[4])
        );
        r.vs_upsert.push(t[0] / t[1]);
        r.folded_vs_upsert.push(t[0] / (t[1] + t[5]));
        r.vs_rows.push(t[3] / t[1]);
        r.vs_clean.push(t[1] / t[2]);
        r.jsonb_vs_upsert.push(t[0] / t[4]);
    }
    r
}

/// The apply ratios, one per pair.
#[derive(Default)]
struct ApplyRatios {
    vs_upsert: Vec<f64>,
    /// Counting the later fold of what blind apply deferred.
    folded_vs_upsert: Vec<f64>,
    vs_rows: Vec<f64>,
    vs_clean: Vec<f64>,
    jsonb_vs_upsert: Vec<f64>,
}

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
    // BENCH_ONLY=network: only the network part (the netbench binary).
    if std::env::var("BENCH_ONLY").as_deref() == Ok("network") {
        return;
    }
    if std::env::var("BENCH_ONLY").as_deref() == Ok("apply") {
        let c = Cluster::start("bench", &["shared_buffers = '256MB'", "max_wal_size = '4GB'", "autovacuum = off"]);
        c.connect().batch_execute("CREATE DATABASE plain").unwrap();
        apply_summary(&apply_bench(&c));
        return;
    }
    let seconds: u32 = std::env::var("BENCH_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(20);
    println!("Starting a throwaway cluster (shared_buffers 256MB, fsync on, autovacuum off)...");
    let c = Cluster::start(
        "bench",
        &["shared_buffers = '256MB'", "max_wal_size = '4GB'", "checkpoint_timeout = '30min'", "autovacuum = off"],
    );
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
            db.batch_execute(&format!("CREATE TABLE bulk_{pair} (id int PRIMARY KEY, a int, b text, c numeric)"))
                .unwrap();
            if k == 1 {
                db.batch_execute(&format!("SELECT sync_track_table('bulk_{pair}')")).unwrap();
            }
            db.batch_execute("CHECKPOINT").unwrap();
            times[k][0] = timed(
                db,
                &format!(
                    "INSERT INTO bulk_{pair} SELECT g, g, md5(g::text), g * 1.5 FROM generate_series(1, 100000) g"
                ),
            );
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
    // BENCH_ONLY=capture skips the apply part (for comparing capture between builds).
    let apply = (std::env::var("BENCH_ONLY").as_deref() != Ok("capture")).then(|| apply_bench(&c));
    println!("\n| {:<44} | median | range        | target   |", "ratio (tracked / plain)");
    println!("|{}|--------|--------------|----------|", "-".repeat(46));
    summary(&format!("pgbench tpcb-like TPS, s=10, 4 clients, {seconds}s"), &tps, ">= 0.85");
    summary("100k-row single-statement INSERT time", &ins, "<= 2.0");
    summary("100k-row single-statement UPDATE time", &upd, "<= 2.0");
    if let Some(r) = apply {
        apply_summary(&r);
    }
}

fn apply_summary(r: &ApplyRatios) {
    summary("apply / upsert of the same batches (100k, 1k)", &r.vs_upsert, ">= 0.6");
    summary("the same, with the fold it deferred", &r.folded_vs_upsert, "(info)");
    summary("apply / upsert of the bare rows (100k, 1k)", &r.vs_rows, "(info)");
    summary("apply, every event conflicting / none", &r.vs_clean, ">= 0.5");
    summary("sync_apply(jsonb) / upsert of the same batches", &r.jsonb_vs_upsert, "(info)");
}
