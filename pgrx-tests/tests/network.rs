//! Two and three nodes over loopback with static peers: the workers pull from each other and
//! converge; a node with another registration key is never served.

use pg_peersync_tests::{Cluster, digest, free_port, wait_for, worker_status};
use std::time::Duration;

fn node(name: &str, key: &str, port: u16, peers: &[u16]) -> Cluster {
    // Long interval: what arrives quickly was pushed by a poke after the commit, not polled.
    let c = Cluster::start_peer(name, key, port, peers, &["fsync = off", "peersync.sync_interval = 3600"]);
    c.connect()
        .batch_execute(
            "CREATE EXTENSION pg_peersync;
             CREATE TABLE items (id int PRIMARY KEY, name text, qty int);
             SELECT sync_track_table('items');",
        )
        .unwrap();
    c
}

fn count(c: &Cluster) -> i64 {
    c.connect().query_one("SELECT count(*) FROM items", &[]).unwrap().get(0)
}

#[test]
fn static_peers_on_loopback_converge_and_strangers_are_refused() {
    const KEY: &str = "loopback-lab-registration-key";
    let (pa, pb, pc) = (free_port(), free_port(), free_port());
    let a = node("net-a", KEY, pa, &[pb]);
    let b = node("net-b", KEY, pb, &[pa]);
    // Each worker pulls once when its network starts: both up means both are listening.
    wait_for(60, "both peers up", || {
        (worker_status(&a)["peers"][0]["state"] == "up" && worker_status(&b)["peers"][0]["state"] == "up").then_some(())
    });
    a.connect().batch_execute("INSERT INTO items SELECT g, 'from a', g FROM generate_series(1, 500) g").unwrap();
    b.connect().batch_execute("INSERT INTO items SELECT g, 'from b', g FROM generate_series(1001, 1100) g").unwrap();
    wait_for(60, "both nodes to hold all 600 rows", || (count(&a) == 600 && count(&b) == 600).then_some(()));
    a.connect().batch_execute("UPDATE items SET qty = qty + 1 WHERE id % 2 = 0").unwrap();
    b.connect().batch_execute("DELETE FROM items WHERE id > 1050").unwrap();
    wait_for(60, "equal digests", || {
        let (mut ca, mut cb) = (a.connect(), b.connect());
        (count(&b) == 550 && digest(&mut ca, "items") == digest(&mut cb, "items")).then_some(())
    });
    // The authenticated status route answers who A is and what it holds.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let client =
        sync_bridge::transport::Client::new(sync_bridge::auth::Keys::derive(KEY).unwrap(), Duration::from_secs(10));
    let remote = rt.block_on(client.status(format!("127.0.0.1:{pa}").parse().unwrap())).unwrap();
    assert_eq!(remote["node_name"], "net-a", "{remote}");
    assert_eq!(remote["have"], pg_peersync_tests::have(&mut a.connect()), "{remote}");
    let s = worker_status(&a);
    assert_eq!(s["listening"], serde_json::json!([format!("127.0.0.1:{pa}")]), "{s}");
    assert_eq!(s["peers"][0]["state"], "up", "{s}");

    // One committed row, from commit to visible on the other node.
    let mut lags = Vec::new();
    let mut reader = b.connect();
    for i in 0..5 {
        let start = std::time::Instant::now();
        a.connect().execute("INSERT INTO items VALUES ($1, 'lag probe', 0)", &[&(5000 + i)]).unwrap();
        // Polled every 2 ms (bounded to 10 s), so the figure is the lag, not the polling.
        let mut seen = false;
        while !seen && start.elapsed() < Duration::from_secs(10) {
            seen =
                reader.query_one("SELECT count(*) FROM items WHERE id = $1", &[&(5000 + i)]).unwrap().get::<_, i64>(0)
                    == 1;
            std::thread::sleep(Duration::from_millis(2));
        }
        assert!(seen, "probe {i} did not arrive within 10 s");
        lags.push(start.elapsed());
    }
    eprintln!("commit-to-visible lags over loopback: {lags:?}");

    // A node with another key pulls from A and is refused every time; it gets nothing.
    let c = node("net-c", "a-different-registration-key", pc, &[pa]);
    wait_for(60, "A to count the stranger's requests", || {
        (worker_status(&a)["rejected"]["wrong_key"].as_u64().unwrap_or(0) >= 2).then_some(())
    });
    let sc = worker_status(&c);
    assert_eq!(sc["peers"][0]["state"], "down", "{sc}");
    assert!(sc["peers"][0]["last_error"].as_str().unwrap_or("").contains("refused"), "{sc}");
    assert_eq!(count(&c), 0);
    let log = a.log() + &b.log() + &c.log();
    assert!(!log.contains(KEY), "the registration key is in a server log");
}
