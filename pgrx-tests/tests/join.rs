//! Joining from a snapshot (`src/snapshot.rs`), on a mesh of three with workers on loopback:
//! a new node copies its tables from a peer while the others keep writing, then catches up
//! from the copy, without replaying the history; a node that comes back past its peers'
//! retention is in `retention.rs`.

use pg_peersync_tests::{Cluster, digest, have, mesh_of_three, pgbench, wait_for, worker_status};
use serde_json::Value;

fn log_rows(c: &Cluster) -> i64 {
    c.connect().query_one("SELECT count(*) FROM sync_log", &[]).unwrap().get(0)
}

fn join_status(c: &Cluster) -> Value {
    let text: String = c.connect().query_one("SELECT (sync_status() -> 'join')::text", &[]).unwrap().get(0);
    serde_json::from_str(&text).unwrap()
}

/// Equal digests and have-vectors, nothing held.
fn converged(nodes: &[&Cluster]) -> Option<()> {
    let state: Vec<(String, Value, i64)> = nodes
        .iter()
        .map(|c| {
            let mut db = c.connect();
            let inbox: i64 = db.query_one("SELECT count(*) FROM sync_inbox", &[]).unwrap().get(0);
            (digest(&mut db, "t"), have(&mut db), inbox)
        })
        .collect();
    (state.iter().all(|s| *s == state[0]) && state[0].2 == 0).then_some(())
}

/// Updates and deletes of the copied rows and inserts of new ones, on keys everyone writes.
fn writes(c: &Cluster, per_client: u32) {
    let script = format!(
        "\\set id random(1, 60000)\n\
         \\set op random(1, 10)\n\
         UPDATE t SET n = n + 1, who = '{0}' WHERE id = :id AND :op <= 7;\n\
         DELETE FROM t WHERE id = :id AND :op = 8;\n\
         INSERT INTO t VALUES (:id, '{0}', 1) ON CONFLICT (id) DO UPDATE SET n = t.n + 1 WHERE :op >= 9;\n",
        c.name
    );
    pgbench(c, &script, per_client);
}

#[test]
fn a_new_node_joins_from_a_snapshot_while_the_others_write() {
    let extra = ["fsync = off", "peersync.multicast_group = ''", "peersync.sync_interval = 1"];
    let mut nodes = mesh_of_three(["join-a", "join-b", "join-c"], "join-lab-registration-key", &extra);
    // C is new: it has written and received nothing. It stops while A and B make a history.
    nodes[2].stop_server(false);
    nodes[0].connect().batch_execute("INSERT INTO t SELECT g, 'seed', 0 FROM generate_series(1, 50000) g").unwrap();
    std::thread::scope(|s| {
        s.spawn(|| writes(&nodes[0], 1500));
        s.spawn(|| writes(&nodes[1], 1500));
    });
    wait_for(120, "A and B to converge", || converged(&[&nodes[0], &nodes[1]]));
    let seeded = |c: &Cluster| -> i64 {
        c.connect().query_one("SELECT count(*) FROM sync_log WHERE n = 50000", &[]).unwrap().get(0)
    };
    assert_eq!(seeded(&nodes[1]), 1, "B received the seed transaction by replay");

    // C comes back while A and B write on: it copies from one of them, then catches up.
    let [a, b, c] = &mut nodes;
    std::thread::scope(|s| {
        s.spawn(|| writes(a, 2000));
        s.spawn(|| writes(b, 2000));
        c.start_server();
        let done = wait_for(120, "C to finish its copy", || {
            let j = join_status(c);
            (j["state"] == "done").then_some(j)
        });
        eprintln!("C's join: {done}");
        assert!(done["rows_copied"].as_i64().unwrap() >= 45_000, "{done}");
    });
    // Writes on C too, once it may.
    writes(&nodes[2], 200);
    wait_for(180, "the three to converge", || converged(&[&nodes[0], &nodes[1], &nodes[2]]));
    assert_eq!(seeded(&nodes[2]), 0, "C has the seed's rows from the copy, not by replaying its transaction");
    eprintln!("C's log holds {} transactions, A's {}", log_rows(&nodes[2]), log_rows(&nodes[0]));
    wait_for(120, "C's pulls from both peers to succeed again", || {
        let s = worker_status(&nodes[2]);
        let ps = s["peers"].as_array()?;
        (ps.len() == 2 && ps.iter().all(|p| p["last_error"].is_null())).then_some(())
    });
}
