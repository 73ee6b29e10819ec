//! A bounded change log (`peersync.log_retention`), on a mesh of three (workers, static peers
//! on loopback): once every peer holds a change and it is older than `peersync.log_min_age`,
//! it leaves the log; a stopped peer keeps what it lacks in the others' logs and catches up
//! when it comes back; a peer silent past the retention is told that the changes it lacks are
//! gone, and copies its tables from a peer once that peer holds its own changes.

use pg_peersync_tests::{Cluster, converged_on, have, mesh_of_three, node_id, pgbench, wait_for};
use serde_json::Value;
use std::time::Instant;

fn mesh() -> [Cluster; 3] {
    let extra = [
        "fsync = off",
        "peersync.multicast_group = ''",
        "peersync.sync_interval = 1",
        "peersync.log_retention = 3600",
        "peersync.log_min_age = 1",
    ];
    mesh_of_three(["keep-a", "keep-b", "keep-c"], "retention-lab-registration-key", &extra)
}

/// `txns` small transactions on each of `nodes` at once, on keys of their own.
fn load(nodes: &[&Cluster], txns: u32) {
    std::thread::scope(|s| {
        for n in nodes {
            s.spawn(move || {
                let script = format!(
                    "\\set id random(1, 2000)\n\
                     INSERT INTO t VALUES (:id, '{0}', 1) ON CONFLICT (id) DO UPDATE SET n = t.n + 1, who = '{0}';\n",
                    n.name
                );
                pgbench(n, &script, txns / 2);
            });
        }
    });
}

fn log_rows(c: &Cluster) -> i64 {
    c.connect().query_one("SELECT count(*) FROM sync_log", &[]).unwrap().get(0)
}

fn converged(nodes: &[&Cluster]) -> Option<()> {
    converged_on(nodes, &["t"])
}

fn log_status(c: &Cluster) -> Value {
    let text: String = c.connect().query_one("SELECT (sync_status() -> 'log')::text", &[]).unwrap().get(0);
    serde_json::from_str(&text).unwrap()
}

#[test]
fn the_log_stays_bounded_and_waits_for_a_stopped_peer() {
    let mut nodes = mesh();
    let c_id = node_id(&nodes[2]);
    // 1. 18,000 transactions over the three nodes (PEERSYNC_RETENTION_TXNS sets another
    //    number): once synced, each log shrinks to a little.
    let txns: u32 = std::env::var("PEERSYNC_RETENTION_TXNS").ok().and_then(|n| n.parse().ok()).unwrap_or(18_000);
    let started = Instant::now();
    load(&[&nodes[0], &nodes[1], &nodes[2]], txns / 3);
    wait_for(180, "the three to converge", || converged(&[&nodes[0], &nodes[1], &nodes[2]]));
    let synced = started.elapsed();
    let before: Vec<i64> = nodes.iter().map(log_rows).collect();
    wait_for(120, "every node's log to shrink below 3,000 rows", || {
        nodes.iter().all(|n| log_rows(n) < 3000).then_some(())
    });
    let after: Vec<i64> = nodes.iter().map(log_rows).collect();
    eprintln!("{txns} transactions synced in {synced:?}; log rows {before:?} once synced, then {after:?}");

    // 2. C stops; A and B go on writing: what C lacks stays in their logs, C catches up.
    nodes[2].stop_server(false);
    load(&[&nodes[0], &nodes[1]], 3000);
    wait_for(120, "A and B to converge", || converged(&[&nodes[0], &nodes[1]]));
    wait_for(60, "A to show what it keeps for C", || {
        let s = log_status(&nodes[0]);
        let kept = s["peers"].as_array()?.iter().find(|p| p["id"] == c_id.as_str())?["kept_only_for_it"].as_i64()?;
        (kept >= 6000).then_some(())
    });
    nodes[2].start_server();
    wait_for(180, "C to catch up", || converged(&[&nodes[0], &nodes[1], &nodes[2]]));
    wait_for(120, "the logs to shrink again", || nodes.iter().all(|n| log_rows(n) < 3000).then_some(()));

    // 3. C goes away holding a change of its own that no peer has, and stays silent past the
    //    retention (its last exchange dated a day back on A and B): A and B prune what it
    //    lacks. Back, C is told so, waits until a peer took its own change, copies its tables
    //    from that peer and converges, its change kept everywhere.
    let c_had = have(&mut nodes[2].connect());
    nodes[0].stop_server(false);
    nodes[1].stop_server(false);
    nodes[2].connect().execute("INSERT INTO t VALUES (999999, 'only-c', 1)", &[]).unwrap();
    nodes[2].stop_server(false);
    nodes[0].start_server();
    nodes[1].start_server();
    for n in &nodes[..2] {
        n.connect()
            .execute("UPDATE sync_peers SET heard_at = now() - interval '1 day' WHERE id = $1::text::uuid", &[&c_id])
            .unwrap();
    }
    load(&[&nodes[0], &nodes[1]], 1000);
    let ids = [node_id(&nodes[0]), node_id(&nodes[1])];
    wait_for(120, "A and B to prune changes of theirs that C lacks", || {
        nodes[..2]
            .iter()
            .all(|n| {
                let pruned = &log_status(n)["pruned"];
                ids.iter().all(|o| pruned[o].as_i64().unwrap_or(0) > c_had[o].as_i64().unwrap_or(0))
            })
            .then_some(())
    });
    nodes[2].start_server();
    wait_for(180, "C to copy from a peer and the three to converge", || converged(&[&nodes[0], &nodes[1], &nodes[2]]));
    let join: String = nodes[2].connect().query_one("SELECT (sync_status() -> 'join')::text", &[]).unwrap().get(0);
    let join: Value = serde_json::from_str(&join).unwrap();
    eprintln!("C's join: {join}");
    assert_eq!(join["state"], "done");
    assert!(ids.iter().any(|i| join["source"] == i.as_str()), "{join}");
    for n in &nodes {
        let who: String = n.connect().query_one("SELECT who FROM t WHERE id = 999999", &[]).unwrap().get(0);
        assert_eq!(who, "only-c", "C's own change survived its copy, on {}", n.name);
    }
}
