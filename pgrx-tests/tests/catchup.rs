//! Catch-up in a mesh of three (workers, static peers on loopback): a node many batches behind,
//! whose missing transactions depend on each other across origins, catches up while the others
//! keep writing. Served batches are in causal order across origins (PROTOCOL.md, "Batch"), so
//! every pull applies something; before that, a node one batch behind could stall for good.

use pg_peersync_tests::{Cluster, digest, have, mesh_of_three, node_id, pgbench, wait_for, worker_status};
use serde_json::Value;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

/// Small batches make "many batches behind" cheap to reach.
const BATCH: i64 = 50;

fn mesh(names: [&str; 3], batch: i64) -> [Cluster; 3] {
    let batch = format!("peersync.batch_size = {batch}");
    let extra = ["fsync = off", "peersync.multicast_group = ''", "peersync.sync_interval = 2", batch.as_str()];
    mesh_of_three(names, "catch-up-lab-registration-key", &extra)
}

/// How far `c` holds `origin`.
fn holds(c: &Cluster, origin: &str) -> i64 {
    have(&mut c.connect())[origin].as_i64().unwrap_or(0)
}

/// `c` holds at least what `want` says, for every origin.
fn holds_all(c: &Cluster, want: &Value) -> bool {
    let got = have(&mut c.connect());
    want.as_object().unwrap().iter().all(|(o, n)| got[o].as_i64().unwrap_or(0) >= n.as_i64().unwrap())
}

/// Equal digests and row counts on all three, and nothing held back anywhere.
fn converged(nodes: &[Cluster; 3]) -> Option<()> {
    let state: Vec<(String, i64, i64)> = nodes
        .iter()
        .map(|c| {
            let mut db = c.connect();
            let rows: i64 = db.query_one("SELECT count(*) FROM t", &[]).unwrap().get(0);
            let inbox: i64 = db.query_one("SELECT count(*) FROM sync_inbox", &[]).unwrap().get(0);
            (digest(&mut db, "t"), rows, inbox)
        })
        .collect();
    (state.iter().all(|s| *s == state[0]) && state[0].2 == 0).then_some(())
}

/// Why a node did not converge, for the failure message.
fn explain(nodes: &[Cluster; 3]) -> String {
    nodes
        .iter()
        .map(|c| {
            let s: String = c.connect().query_one("SELECT sync_status()::text", &[]).unwrap().get(0);
            format!("{}: {s}", c.name)
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// One upsert per transaction on `id`, written by `who`.
fn upsert(db: &mut postgres::Client, id: i64, who: &str) {
    db.execute(
        "INSERT INTO t VALUES ($1, $2, 1) ON CONFLICT (id) DO UPDATE SET n = t.n + 1, who = excluded.who",
        &[&id, &who],
    )
    .unwrap();
}

#[test]
fn a_node_many_batches_behind_catches_up_while_the_others_write() {
    let mut nodes = mesh(["up-a", "up-b", "up-c"], BATCH);
    nodes[2].stop_server(false);
    let [a, b, _] = &nodes;
    let (ida, idb) = (node_id(a), node_id(b));

    // A and B write in turns, each turn after receiving the other's: every turn's transactions
    // depend on the other node's previous turn, so C's backlog is one causal chain across two
    // origins, 20 batches long on each.
    const TURN: i64 = 25;
    let turns = 20 * BATCH / TURN;
    let (mut da, mut db) = (a.connect(), b.connect());
    for turn in 0..turns {
        for k in 0..TURN {
            upsert(&mut da, turn * TURN + k, "a");
        }
        let want = holds(a, &ida);
        wait_for(30, "B to receive A's turn", || (holds(b, &ida) >= want).then_some(()));
        for k in 0..TURN {
            upsert(&mut db, 100_000 + turn * TURN + k, "b");
        }
        let want = holds(b, &idb);
        wait_for(30, "A to receive B's turn", || (holds(a, &idb) >= want).then_some(()));
    }
    let backlog = have(&mut da);
    assert!(backlog[&ida].as_i64().unwrap() >= 20 * BATCH && backlog[&idb].as_i64().unwrap() >= 20 * BATCH);

    // C comes back while A and B go on writing (bounded), each on keys of its own and both on
    // one shared row: applying the other's write to it races with local writers (a transient
    // failure, held and retried by the worker), so nothing may stay held at the end.
    let started = Instant::now();
    nodes[2].start_server();
    let [a, b, c] = &nodes;
    let stop = AtomicBool::new(false);
    let written = AtomicI64::new(0);
    let caught_up = std::thread::scope(|s| {
        for (n, who) in [(a, "a"), (b, "b")] {
            let (stop, written) = (&stop, &written);
            s.spawn(move || {
                let mut db = n.connect();
                let base = if who == "a" { 200_000 } else { 300_000 };
                for i in 0..2000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    upsert(&mut db, base + i % 500, who);
                    upsert(&mut db, 1, who);
                    written.fetch_add(2, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(5));
                }
            });
        }
        let waited = std::panic::catch_unwind(AssertUnwindSafe(|| {
            wait_for(60, "C to hold A's and B's backlog", || holds_all(c, &backlog).then(|| started.elapsed()))
        }));
        stop.store(true, Ordering::Relaxed);
        waited
    });
    let caught_up = caught_up.unwrap_or_else(|_| panic!("C never caught up:\n{}", explain(&nodes)));
    wait_for(60, "all three to converge", || converged(&nodes));
    eprintln!(
        "C caught up with a backlog of {} transactions in {caught_up:?}, while A and B wrote {} more; converged after {:?}",
        backlog[&ida].as_i64().unwrap() + backlog[&idb].as_i64().unwrap(),
        written.load(Ordering::Relaxed),
        started.elapsed()
    );
    for n in &nodes {
        let s = worker_status(n);
        for p in s["peers"].as_array().unwrap() {
            assert!(p["stall"].is_null(), "{} reports a stall: {s}", n.name);
        }
    }
}

/// The scenario: pgbench on all three at once, one upsert per transaction on keys of
/// each node's own, with the default batch size. C's worker is frozen (SIGSTOP) during the
/// load, so C falls thousands of transactions behind while A and B exchange theirs (each
/// depending on the other's), as a slow node would, then thaws and catches up.
#[test]
fn three_nodes_under_pgbench_load_converge() {
    let nodes = mesh(["load-a", "load-b", "load-c"], 1000);
    let frozen = worker_status(&nodes[2])["pid"].as_i64().expect("C's worker pid").to_string();
    let signal =
        |sig: &str| assert!(std::process::Command::new("kill").args([sig, &frozen]).status().unwrap().success());
    signal("-STOP");
    let started = Instant::now();
    std::thread::scope(|s| {
        for (i, n) in nodes.iter().enumerate() {
            s.spawn(move || {
                let script = format!(
                    "\\set id random(1, 1000) + {}\n\
                     INSERT INTO t VALUES (:id, '{}', 1) ON CONFLICT (id) DO UPDATE SET n = t.n + 1;\n",
                    i * 10_000,
                    n.name
                );
                pgbench(n, &script, 1500);
            });
        }
    });
    let written = started.elapsed();
    signal("-CONT");
    let thawed = Instant::now();
    let result =
        std::panic::catch_unwind(AssertUnwindSafe(|| wait_for(60, "all three to converge", || converged(&nodes))));
    if result.is_err() {
        panic!("no convergence within 60 s of the load's end:\n{}", explain(&nodes));
    }
    let total: i64 = nodes[0].connect().query_one("SELECT sum(n)::bigint FROM t", &[]).unwrap().get(0);
    assert_eq!(total, 9000, "every one of the 9,000 increments is there");
    eprintln!("load took {written:?}; all three converged {:?} after C's worker thawed", thawed.elapsed());
}
