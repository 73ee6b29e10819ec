//! The multi-node lab: real clusters in network namespaces joined by bridges (see
//! `pg_peersync_tests::lab`), finding each other by multicast alone. Where namespaces cannot
//! be made, each test says SKIPPED and why, and returns.

use pg_peersync_tests::lab::Lab;
use pg_peersync_tests::{Cluster, digest, try_worker_status, wait_for, worker_status};

const KEY: &str = "lab-registration-key-0123456789";

fn lab(bridges: usize) -> Option<Lab> {
    match Lab::new(bridges) {
        Ok(l) => Some(l),
        Err(e) => {
            eprintln!("SKIPPED: network namespaces cannot be created here ({e}); the lab needs root and iproute2");
            None
        }
    }
}

/// A node in its own namespace on `bridges`, discovering by multicast only (no static peers).
fn node(lab: &mut Lab, bridges: &[usize], name: &str, key: &str) -> Cluster {
    let (ns, _) = lab.node(bridges);
    let conf: Vec<String> = [
        "shared_preload_libraries = 'pg_peersync'",
        &format!("peersync.node_name = '{name}'"),
        "fsync = off",
        &format!("peersync.registration_key = '{key}'"),
        "peersync.listen_addresses = '0.0.0.0'",
        "peersync.announce_interval = 1",
        "peersync.peer_timeout = 4",
        // Anti-entropy often, so that a healed partition is noticed within seconds.
        "peersync.sync_interval = 2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let c = Cluster::start_in(Some(&ns), name, &conf);
    c.connect()
        .batch_execute(
            "CREATE EXTENSION pg_peersync;
             CREATE TABLE items (id int PRIMARY KEY, name text, qty int);
             CREATE TABLE notes (id int PRIMARY KEY, title text, body text);
             SELECT sync_track_table('items');
             SELECT sync_track_table('notes', strategy => 'field_merge');",
        )
        .unwrap();
    c
}

/// The names of the peers `c` shows in `state`.
fn peers_in(c: &Cluster, state: &str) -> Vec<String> {
    let s = worker_status(c);
    let mut names: Vec<String> = s["peers"]
        .as_array()
        .map(|ps| {
            ps.iter().filter(|p| p["state"] == state).filter_map(|p| p["name"].as_str().map(str::to_owned)).collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn exec(c: &Cluster, sql: &str) {
    c.connect().batch_execute(sql).unwrap_or_else(|e| panic!("{}: {sql}: {e:?}", c.name));
}

fn count(c: &Cluster, table: &str) -> i64 {
    c.connect().query_one(&format!("SELECT count(*) FROM {table}"), &[]).unwrap().get(0)
}

/// Wait until every node has the same digest of both tables (and at least `rows` items).
fn converged(nodes: &[&Cluster], rows: i64, what: &str) {
    wait_for(90, what, || {
        let first = nodes[0];
        let want = (digest(&mut first.connect(), "items"), digest(&mut first.connect(), "notes"));
        let same = nodes.iter().all(|c| {
            let mut db = c.connect();
            (digest(&mut db, "items"), digest(&mut db, "notes")) == want && count(c, "items") >= rows
        });
        same.then_some(())
    });
}

/// Concurrent writes on every node: its own rows, and the same overlapping rows.
fn write_everywhere(nodes: &[&Cluster], round: i32) {
    std::thread::scope(|s| {
        for (i, c) in nodes.iter().enumerate() {
            s.spawn(move || {
                let base = round * 10_000 + i as i32 * 1000;
                // Field merge: even nodes edit the title, odd ones the body.
                let col = if i % 2 == 0 { "title" } else { "body" };
                exec(
                    c,
                    &format!(
                        "INSERT INTO items SELECT g, 'n{i}', g FROM generate_series({base}, {base} + 99) g;
                         INSERT INTO items SELECT g, 'shared n{i}', {i} FROM generate_series(1, 10) g
                           ON CONFLICT (id) DO UPDATE SET name = excluded.name, qty = excluded.qty;
                         INSERT INTO notes VALUES (1, 'title n{i} r{round}', 'body n{i} r{round}')
                           ON CONFLICT (id) DO UPDATE SET {col} = excluded.{col};",
                    ),
                );
            });
        }
    });
}

#[test]
fn multicast_discovery_partition_restart_crash_and_a_stranger() {
    let Some(mut lab) = lab(1) else { return };
    let a = node(&mut lab, &[0], "lab-a", KEY);
    let b = node(&mut lab, &[0], "lab-b", KEY);
    let mut c = node(&mut lab, &[0], "lab-c", KEY);

    // Found by multicast alone, and synced with.
    for (n, others) in [(&a, ["lab-b", "lab-c"]), (&b, ["lab-a", "lab-c"]), (&c, ["lab-a", "lab-b"])] {
        wait_for(60, "every node to see the two others up", || (peers_in(n, "up") == others).then_some(()));
    }
    let s = worker_status(&a);
    assert_eq!(s["peers"][0]["found_by"], "multicast", "{s}");
    assert_eq!(s["peers"][0]["schema_matches"], true, "{s}");
    assert_eq!(s["discovery"]["interfaces"][0]["name"], "eth0", "{s}");

    // Concurrent writes on all three converge.
    write_everywhere(&[&a, &b, &c], 1);
    converged(&[&a, &b, &c], 310, "convergence after concurrent writes");

    // Partition: C's link goes down while both sides write; A marks C down after
    // peer_timeout; healed, all converge.
    lab.link(2, 0, false);
    write_everywhere(&[&a, &b, &c], 2);
    wait_for(30, "A to mark C down", || peers_in(&a, "up").eq(&["lab-b"]).then_some(()));
    assert!(!peers_in(&a, "down").is_empty() || !peers_in(&a, "unreachable").is_empty(), "{}", worker_status(&a));
    lab.link(2, 0, true);
    converged(&[&a, &b, &c], 610, "convergence after the partition healed");
    wait_for(30, "A to see C up again", || (peers_in(&a, "up") == ["lab-b", "lab-c"]).then_some(()));

    // C stopped while the others write, restarted later: it catches up.
    c.stop_server(false);
    write_everywhere(&[&a, &b], 3);
    c.start_server();
    converged(&[&a, &b, &c], 810, "C to catch up after a restart");

    // A's worker killed with SIGKILL (the postmaster restarts everything): nothing lost, nothing
    // applied twice.
    let pid = worker_status(&a)["pid"].as_i64().expect("A's worker pid");
    assert!(std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status().unwrap().success());
    exec(&b, "INSERT INTO items SELECT g, 'while a restarts', g FROM generate_series(50000, 50099) g");
    wait_for(60, "A's worker to restart", || {
        // None while the postmaster restarts everything after the crash.
        let s = try_worker_status(&a)?;
        (s["pid"].as_i64().is_some_and(|p| p != pid) && s["state"] == "running").then_some(())
    });
    converged(&[&a, &b, &c], 910, "convergence after A's worker was killed");
    for n in [&a, &b, &c] {
        let inbox: i64 = n.connect().query_one("SELECT count(*) FROM sync_inbox", &[]).unwrap().get(0);
        assert_eq!(inbox, 0, "{} holds transactions it could not apply", n.name);
    }

    // Every exchange is recorded.
    let (sessions, moved): (i64, i64) = a
        .connect()
        .query_one(
            "SELECT count(*), coalesce(sum(events_in), 0)::bigint FROM sync_sessions WHERE direction = 'pull'",
            &[],
        )
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert!(sessions > 0 && moved >= 600, "A recorded {sessions} sessions moving {moved} events");

    // A node with another key on the same bridge: rejected by name of the reason, never
    // listed as a peer, and given nothing; the capture holds no row value in clear.
    let pcap = tempfile::NamedTempFile::new().unwrap();
    let mut tcpdump = lab.capture(0, pcap.path());
    let d = node(&mut lab, &[0], "lab-stranger", "another-registration-key-987");
    wait_for(30, "A to reject the stranger's announcements", || {
        (worker_status(&a)["discovery"]["rejected"]["wrong_key"].as_u64().unwrap_or(0) >= 2).then_some(())
    });
    wait_for(30, "the stranger to reject A's", || {
        (worker_status(&d)["discovery"]["rejected"]["wrong_key"].as_u64().unwrap_or(0) >= 2).then_some(())
    });
    exec(&a, "INSERT INTO items VALUES (77777, 'plaintext-canary-7f3a', 1)");
    converged(&[&a, &b, &c], 911, "the canary row to reach B and C");
    let _ = tcpdump.kill();
    let _ = tcpdump.wait();
    for n in [&a, &b, &c] {
        let s = worker_status(n);
        let names: Vec<&str> = s["peers"].as_array().unwrap().iter().filter_map(|p| p["name"].as_str()).collect();
        assert!(!names.contains(&"lab-stranger"), "{} lists the stranger: {s}", n.name);
    }
    assert_eq!(worker_status(&d)["peers"], serde_json::json!([]), "the stranger found no peer");
    assert_eq!(count(&d, "items"), 0);
    let captured = std::fs::read(pcap.path()).unwrap();
    assert!(captured.len() > 1000, "the capture holds traffic ({} bytes)", captured.len());
    for secret in ["plaintext-canary-7f3a", "while a restarts", KEY] {
        assert!(!captured.windows(secret.len()).any(|w| w == secret.as_bytes()), "{secret:?} was on the wire");
    }
}

#[test]
fn relay_through_a_node_on_two_networks() {
    let Some(mut lab) = lab(2) else { return };
    // A on network 0, C on network 1, B on both: A and C cannot reach each other.
    let a = node(&mut lab, &[0], "relay-a", KEY);
    let b = node(&mut lab, &[0, 1], "relay-b", KEY);
    let c = node(&mut lab, &[1], "relay-c", KEY);
    wait_for(60, "B to see A and C up", || (peers_in(&b, "up") == ["relay-a", "relay-c"]).then_some(()));
    wait_for(60, "A and C to see B up", || {
        (peers_in(&a, "up") == ["relay-b"] && peers_in(&c, "up") == ["relay-b"]).then_some(())
    });
    let sb = worker_status(&b);
    assert_eq!(sb["discovery"]["interfaces"].as_array().map(Vec::len), Some(2), "B announces on both: {sb}");
    exec(&a, "INSERT INTO items SELECT g, 'from a', g FROM generate_series(1, 100) g");
    exec(&c, "INSERT INTO items SELECT g, 'from c', g FROM generate_series(1001, 1100) g");
    converged(&[&a, &b, &c], 200, "A's rows to reach C and C's to reach A through B");
    // Still strangers to each other: nothing went directly.
    assert_eq!(peers_in(&a, "up"), ["relay-b"]);
    let names: Vec<String> = worker_status(&a)["peers"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["name"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(names, ["relay-b"]);
}

/// A node's data directory copied to a second machine (a cloned disk image) keeps its
/// identity: each hears the other announce it, says so, and refuses changes to tracked tables.
/// The copy takes a new identity, the original keeps its own, and both sync again.
#[test]
fn a_copied_node_is_heard_as_a_twin_and_takes_a_new_identity() {
    let Some(mut lab) = lab(1) else { return };
    let mut a = node(&mut lab, &[0], "twin-a", KEY);
    a.connect().batch_execute("INSERT INTO items VALUES (1, 'before the copy', 1)").unwrap();
    wait_for(30, "a's worker to run", || try_worker_status(&a).filter(|s| s["state"] == "running"));
    a.stop_server(false);
    let (ns, _) = lab.node(&[0]);
    let copy = a.copy_into(Some(&ns), "twin-copy");
    a.start_server();
    for c in [&a, &copy] {
        let doubt = wait_for(60, "the twin to be heard", || {
            try_worker_status(c).filter(|s| !s["identity"].is_null()).map(|s| s["identity"].clone())
        });
        assert_eq!(doubt["seen"], "twin", "{}: {doubt}", c.name);
        let e = wait_for(20, "capture to refuse", || {
            c.connect().batch_execute("INSERT INTO items VALUES (2, 'x', 1)").err()
        });
        assert_eq!(e.as_db_error().unwrap().code().code(), "55000", "{e:?}");
    }
    // The copy takes a new identity; once it announces that one, the original keeps its own.
    copy.connect().batch_execute("SELECT sync_new_identity()").unwrap();
    wait_for(60, "the copy to restart with its new identity", || {
        try_worker_status(&copy).filter(|s| s["state"] == "running" && s["identity"].is_null())
    });
    a.connect().batch_execute("SELECT sync_keep_identity()").unwrap();
    wait_for(60, "the original to be sure of itself again", || {
        try_worker_status(&a).filter(|s| s["state"] == "running" && s["identity"].is_null())
    });
    a.connect().batch_execute("INSERT INTO items VALUES (2, 'from the original', 1)").unwrap();
    copy.connect().batch_execute("INSERT INTO items VALUES (3, 'from the copy', 1)").unwrap();
    wait_for(60, "both rows on both", || {
        let n = |c: &Cluster| -> i64 { c.connect().query_one("SELECT count(*) FROM items", &[]).unwrap().get(0) };
        (n(&a) == 3 && n(&copy) == 3 && digest(&mut a.connect(), "items") == digest(&mut copy.connect(), "items"))
            .then_some(())
    });
}
