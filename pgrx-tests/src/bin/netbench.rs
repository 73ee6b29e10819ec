//! `make bench`, network part: pg_peersync and pglogical 2 side by side in one run, each
//! between two local clusters replicating both ways (pg_peersync: static peers on loopback;
//! pglogical: subscriptions both ways with `forward_origins := '{}'`).
//!
//! - Commit-to-visible lag at 200 single-row transactions per second for 20 s: each row
//!   carries `clock_timestamp()` from the inserting statement; a trigger on the peer stamps
//!   the row as it is inserted there. p50 and p99 over all rows.
//! - Bulk: one statement inserting 100k rows; rows per second from its commit until the peer
//!   has them all.
//! - Catch-up: the peer stops syncing while pgbench (tpcb-like, scale 1) runs 30 s on the
//!   other node; then time until it holds every transaction, divided by 30 s.
//! - Resident memory of the process that receives (pg_peersync's worker, pglogical's apply
//!   worker) at idle and under that load.

use pg_peersync_tests::{Cluster, free_port, wait_for, worker_status};
use std::time::{Duration, Instant};

const KEY: &str = "bench-registration-key-0123456789";
const SCHEMA: &str = "CREATE TABLE lag (id int PRIMARY KEY, t0 timestamptz NOT NULL, t1 timestamptz);
                      CREATE TABLE bulk (id int PRIMARY KEY, a int, b text, c numeric);";
/// On the receiving node only: stamp each row as it arrives (ALWAYS: also under pglogical's
/// replica role).
const STAMP: &str = "CREATE FUNCTION stamp() RETURNS trigger LANGUAGE plpgsql AS
                       $$BEGIN NEW.t1 := clock_timestamp(); RETURN NEW; END$$;
                     CREATE TRIGGER stamp BEFORE INSERT ON lag FOR EACH ROW EXECUTE FUNCTION stamp();
                     ALTER TABLE lag ENABLE ALWAYS TRIGGER stamp;";
const RATE: u64 = 200;
const LAG_SECONDS: u64 = 20;
const BULK_ROWS: i64 = 100_000;
const CATCHUP_SECONDS: u64 = 30;

#[derive(Clone, Copy, PartialEq)]
enum System {
    Peersync,
    Pglogical,
}

impl System {
    fn name(self) -> &'static str {
        match self {
            System::Peersync => "pg_peersync",
            System::Pglogical => "pglogical 2",
        }
    }
}

struct Pair {
    system: System,
    a: Cluster,
    b: Cluster,
}

const BASE_CONF: [&str; 4] =
    ["shared_buffers = '256MB'", "max_wal_size = '4GB'", "checkpoint_timeout = '30min'", "autovacuum = off"];

/// Both nodes with the pgbench tables (identical content, made before replication starts) and
/// the bench tables.
fn prepare(c: &Cluster) {
    let out = c.run_client("pgbench", &["-i", "-q", "-s", "1", "postgres"]);
    assert!(out.status.success(), "pgbench -i: {}", String::from_utf8_lossy(&out.stderr));
    // pgbench_history has no primary key; both systems need one.
    c.connect()
        .batch_execute(&format!("ALTER TABLE pgbench_history ADD COLUMN hid bigserial PRIMARY KEY; {SCHEMA}"))
        .unwrap();
}

fn peersync_pair() -> Pair {
    let (pa, pb) = (free_port(), free_port());
    let node = |name: &str, port: u16, peer: u16| {
        let mut conf: Vec<&str> = BASE_CONF.to_vec();
        let (key, listen, port, peers) = (
            format!("peersync.registration_key = '{KEY}'"),
            "peersync.listen_addresses = '127.0.0.1'".to_string(),
            format!("peersync.port = {port}"),
            format!("peersync.peers = '127.0.0.1:{peer}'"),
        );
        conf.extend([key.as_str(), listen.as_str(), port.as_str(), peers.as_str()]);
        let c = Cluster::start(name, &conf);
        prepare(&c);
        c.connect()
            .batch_execute(
                "CREATE EXTENSION pg_peersync;
                 SELECT sync_track_table(t) FROM unnest(ARRAY['pgbench_accounts', 'pgbench_branches',
                     'pgbench_tellers', 'pgbench_history', 'lag', 'bulk']::regclass[]) t;",
            )
            .unwrap();
        c
    };
    let a = node("nb-peersync-a", pa, pb);
    let b = node("nb-peersync-b", pb, pa);
    b.connect().batch_execute(STAMP).unwrap();
    let pair = Pair { system: System::Peersync, a, b };
    wait_for(60, "both pg_peersync workers to see each other up", || {
        (worker_status(&pair.a)["peers"][0]["state"] == "up" && worker_status(&pair.b)["peers"][0]["state"] == "up")
            .then_some(())
    });
    pair
}

fn pglogical_pair() -> Pair {
    let node = |name: &str| {
        let mut conf: Vec<String> = BASE_CONF.iter().map(|s| s.to_string()).collect();
        conf.extend(
            [
                "shared_preload_libraries = 'pglogical'",
                "wal_level = logical",
                "max_worker_processes = 16",
                "max_replication_slots = 8",
                "max_wal_senders = 8",
                "track_commit_timestamp = on",
                // Debian's PostgreSQL 15.20 admits only the output plugins named here.
                "output_plugin_libraries = 'pgoutput, test_decoding, pglogical_output'",
            ]
            .map(String::from),
        );
        let c = Cluster::start_with(name, &conf);
        prepare(&c);
        let dsn = c.conn_string("postgres");
        c.connect()
            .batch_execute(&format!(
                "CREATE EXTENSION pglogical;
                 SELECT pglogical.create_node(node_name := '{name}', dsn := '{dsn}');
                 SELECT pglogical.replication_set_add_all_tables('default', ARRAY['public']);"
            ))
            .unwrap();
        c
    };
    let a = node("nb_pglogical_a");
    let b = node("nb_pglogical_b");
    b.connect().batch_execute(STAMP).unwrap();
    for (from, to, sub) in [(&a, &b, "b_from_a"), (&b, &a, "a_from_b")] {
        to.connect()
            .batch_execute(&format!(
                "SELECT pglogical.create_subscription(subscription_name := '{sub}', provider_dsn := '{}',
                     synchronize_structure := false, synchronize_data := false, forward_origins := '{{}}');",
                from.conn_string("postgres")
            ))
            .unwrap();
    }
    let pair = Pair { system: System::Pglogical, a, b };
    for (c, sub) in [(&pair.b, "b_from_a"), (&pair.a, "a_from_b")] {
        let mut last = String::new();
        for _ in 0..600 {
            last = c
                .connect()
                .query_one("SELECT status FROM pglogical.show_subscription_status($1)", &[&sub])
                .unwrap()
                .get(0);
            if last == "replicating" {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(last, "replicating", "pglogical subscription {sub}: {}", c.log());
    }
    pair
}

/// The process on B that applies what A sends.
fn receiver_pid(p: &Pair) -> Option<i32> {
    let mut db = postgres::Client::connect(&p.b.conn_string("postgres"), postgres::NoTls).ok()?;
    let kind = match p.system {
        System::Peersync => "pg_peersync worker",
        // B subscribes to A only: one apply worker.
        System::Pglogical => "pglogical apply%",
    };
    db.query_opt("SELECT pid FROM pg_stat_activity WHERE backend_type LIKE $1 LIMIT 1", &[&kind])
        .ok()?
        .map(|r| r.get(0))
}

/// Resident memory in KiB: all of it, and the process's own (anonymous) part, without the
/// shared buffers it touched.
fn rss_kib(pid: i32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("RssAnon:"))
}

fn count(c: &Cluster, table: &str) -> i64 {
    c.connect().query_one(&format!("SELECT count(*) FROM {table}"), &[]).unwrap().get(0)
}

/// Poll `f` every 10 ms until true, at most `limit`; returns the time it took.
fn until(limit: Duration, what: &str, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
    start.elapsed()
}

/// p50 and p99 lag in ms.
fn lag(p: &Pair) -> (f64, f64) {
    let mut a = p.a.connect();
    let n = (RATE * LAG_SECONDS) as i32;
    let start = Instant::now();
    for i in 0..n {
        let due = start + Duration::from_micros(i as u64 * 1_000_000 / RATE);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        a.execute("INSERT INTO lag VALUES ($1, clock_timestamp())", &[&i]).unwrap();
    }
    until(Duration::from_secs(120), "every lag row on B", || count(&p.b, "lag") == n as i64);
    let row = p
        .b
        .connect()
        .query_one(
            "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY ms), percentile_cont(0.99) WITHIN GROUP (ORDER BY ms)
               FROM (SELECT extract(epoch FROM t1 - t0) * 1000 AS ms FROM lag) l",
            &[],
        )
        .unwrap();
    (row.get(0), row.get(1))
}

/// Rows per second from the bulk statement's commit until B has them all.
fn bulk(p: &Pair) -> f64 {
    p.a.connect()
        .batch_execute(&format!(
            "INSERT INTO bulk SELECT g, g, md5(g::text), g * 1.5 FROM generate_series(1, {BULK_ROWS}) g"
        ))
        .unwrap();
    let took = until(Duration::from_secs(600), "every bulk row on B", || count(&p.b, "bulk") == BULK_ROWS);
    BULK_ROWS as f64 / took.as_secs_f64()
}

/// Stop B's syncing, or start it again.
fn set_syncing(p: &Pair, on: bool) {
    let sql = match (p.system, on) {
        (System::Peersync, _) => {
            // ALTER SYSTEM refuses to run in the implicit transaction of a multi-statement call.
            p.b.connect().batch_execute(&format!("ALTER SYSTEM SET peersync.enabled = {on}")).unwrap();
            "SELECT pg_reload_conf()".to_string()
        }
        (System::Pglogical, false) => "SELECT pglogical.alter_subscription_disable('b_from_a', true);".into(),
        (System::Pglogical, true) => "SELECT pglogical.alter_subscription_enable('b_from_a', true);".into(),
    };
    p.b.connect().batch_execute(&sql).unwrap();
}

/// Catch-up time ÷ the outage, and the receiver's peak RSS (KiB) while catching up.
fn catch_up(p: &Pair) -> (f64, (u64, u64)) {
    set_syncing(p, false);
    if p.system == System::Peersync {
        wait_for(30, "B's network to stop", || (worker_status(&p.b)["networking"] != "networking is on").then_some(()));
    }
    let out = p.a.run_client(
        "pgbench",
        &["-n", "-c", "4", "-j", "2", "-M", "prepared", "-T", &CATCHUP_SECONDS.to_string(), "postgres"],
    );
    assert!(out.status.success(), "pgbench: {}", String::from_utf8_lossy(&out.stderr));
    let want = count(&p.a, "pgbench_history");
    set_syncing(p, true);
    let start = Instant::now();
    let mut peak = (0, 0);
    until(Duration::from_secs(600), "B to catch up", || {
        if let Some(pid) = receiver_pid(p) {
            let (all, own) = rss_kib(pid);
            peak = (peak.0.max(all), peak.1.max(own));
        }
        count(&p.b, "pgbench_history") >= want
    });
    (start.elapsed().as_secs_f64() / CATCHUP_SECONDS as f64, peak)
}

fn main() {
    if std::env::var("BENCH_ONLY").is_ok_and(|o| o != "network") {
        return;
    }
    println!("Network: pg_peersync and pglogical 2, two local clusters each, fsync on...");
    let mut rows = Vec::new();
    // NETBENCH_SYSTEM=pg_peersync or pglogical measures one of them only.
    let only = std::env::var("NETBENCH_SYSTEM").ok();
    for system in [System::Peersync, System::Pglogical] {
        if only.as_deref().is_some_and(|o| !system.name().starts_with(o)) {
            continue;
        }
        let p = if system == System::Peersync { peersync_pair() } else { pglogical_pair() };
        std::thread::sleep(Duration::from_secs(2));
        let idle = receiver_pid(&p).map(rss_kib).unwrap_or_default();
        let (p50, p99) = lag(&p);
        println!("{}: lag p50 {p50:.1} ms, p99 {p99:.1} ms", system.name());
        let rate = bulk(&p);
        println!("{}: bulk {rate:.0} rows/s", system.name());
        let (ratio, peak) = catch_up(&p);
        println!(
            "{}: catch-up {ratio:.2} of the outage; receiver RSS (all, own) idle {idle:?} KiB, catching up {peak:?} KiB",
            system.name()
        );
        rows.push((system, p50, p99, rate, ratio, idle, peak));
    }
    println!("\n| {:<44} | {:>11} | {:>11} | target      |", "measure", "pg_peersync", "pglogical 2");
    println!("|{}|-------------|-------------|-------------|", "-".repeat(46));
    if rows.len() < 2 {
        return;
    }
    let (s, l) = (&rows[0], &rows[1]);
    println!("| {:<44} | {:>11.1} | {:>11.1} | <= 10       |", "lag p50 ms (200 tx/s, 20 s)", s.1, l.1);
    println!("| {:<44} | {:>11.1} | {:>11.1} | <= 50       |", "lag p99 ms", s.2, l.2);
    println!("| {:<44} | {:>11.0} | {:>11.0} | >= 25000    |", "bulk 100k rows, rows/s commit-to-all", s.3, l.3);
    println!("| {:<44} | {:>11.2} | {:>11.2} | (pgl. 0.31) |", "catch-up time / 30 s outage (pgbench)", s.4, l.4);
    println!("| {:<44} | {:>11} | {:>11} | (info)      |", "receiver RSS idle, KiB", s.5.0, l.5.0);
    println!("| {:<44} | {:>11} | {:>11} | (info)      |", "  of which its own (RssAnon), KiB", s.5.1, l.5.1);
    println!("| {:<44} | {:>11} | {:>11} | (info)      |", "receiver RSS catching up (peak), KiB", s.6.0, l.6.0);
    println!("| {:<44} | {:>11} | {:>11} | (info)      |", "  of which its own (RssAnon), KiB", s.6.1, l.6.1);
}
