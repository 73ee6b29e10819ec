//! The background worker's life cycle: it waits for the extension, runs, reloads settings,
//! never shows the registration key, and comes back after being killed.

use pg_peersync_tests::{Cluster, free_port, try_worker_status, wait_for};

fn worker_pid(c: &Cluster) -> Option<i32> {
    let mut db = postgres::Client::connect(&c.conn_string("postgres"), postgres::NoTls).ok()?;
    db.query_opt("SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_peersync worker'", &[])
        .ok()?
        .map(|r| r.get(0))
}

#[test]
fn worker_waits_for_the_extension_runs_reloads_and_restarts() {
    let port = free_port();
    let c = Cluster::start(
        "worker",
        &["fsync = off", "peersync.listen_addresses = '127.0.0.1'", &format!("peersync.port = {port}")],
    );
    let first = wait_for(30, "the worker process", || worker_pid(&c));
    wait_for(30, "the worker's log line about the missing extension", || {
        c.log().contains("the extension is not created in database \"postgres\"").then_some(())
    });
    let mut db = c.connect();
    db.batch_execute("CREATE EXTENSION pg_peersync").unwrap();
    let status = wait_for(30, "state running", || try_worker_status(&c).filter(|s| s["state"] == "running"));
    assert_eq!(status["pid"], first);
    assert_eq!(status["networking"], "networking is off: peersync.registration_key is not set");

    // A short key is refused by name; a good one, from a file, is taken on reload and never shown.
    db.batch_execute("ALTER SYSTEM SET peersync.registration_key = 'too-short'").unwrap();
    db.batch_execute("SELECT pg_reload_conf()").unwrap();
    wait_for(30, "the short key's reason", || {
        try_worker_status(&c).filter(|s| s["networking"].as_str().unwrap_or("").contains("shorter than 16"))
    });
    let key = "a-long-enough-registration-key-4711";
    let file = c.socket_dir().join("peersync.key");
    std::fs::write(&file, format!("{key}\n")).unwrap();
    std::process::Command::new("chown").args(["postgres:", file.to_str().unwrap()]).status().unwrap();
    db.batch_execute(&format!("ALTER SYSTEM SET peersync.registration_key_file = '{}'", file.display())).unwrap();
    db.batch_execute("SELECT pg_reload_conf()").unwrap();
    let status = wait_for(30, "the key from the file", || {
        try_worker_status(&c).filter(|s| s["listening"][0] == format!("127.0.0.1:{port}"))
    });
    assert_eq!(status["state"], "running");
    assert_eq!(status["networking"], "networking is on");
    // Listening on loopback only, it announces on no interface (see README, Discovery).
    assert_eq!(status["discovery"]["interfaces"], serde_json::json!([]), "{status}");
    let all: String = db.query_one("SELECT sync_status()::text", &[]).unwrap().get(0);
    assert!(!all.contains(key), "the key leaked into sync_status()");
    let leaks: Vec<String> = c.log().lines().filter(|l| l.contains(key)).map(str::to_owned).collect();
    assert!(leaks.is_empty(), "the key leaked into the log: {leaks:?}");
    // Only superusers read it.
    db.batch_execute("CREATE ROLE app LOGIN").unwrap();
    let mut app =
        postgres::Client::connect(&format!("{} user=app", c.conn_string("postgres")), postgres::NoTls).unwrap();
    for guc in ["peersync.registration_key", "peersync.registration_key_file"] {
        let e = app.query_one(&format!("SHOW {guc}"), &[]).unwrap_err();
        assert_eq!(e.code().unwrap().code(), "42501", "{guc}");
    }
    drop(app);
    drop(db);

    // Killed, it comes back (the postmaster resets the cluster, then starts it again).
    let status = std::process::Command::new("kill").args(["-9", &first.to_string()]).status().unwrap();
    assert!(status.success());
    let second = wait_for(60, "a new worker", || worker_pid(&c).filter(|p| *p != first));
    let status = wait_for(30, "state running again", || try_worker_status(&c).filter(|s| s["state"] == "running"));
    assert_eq!(status["pid"], second);
}

/// A stream applied blind leaves the row registers to be folded later (src/apply/fold.rs); the
/// worker does it once it has been quiet for a second, so the apply that next needs them does
/// not have to.
#[test]
fn worker_folds_what_was_applied_blind_while_quiet() {
    let c = Cluster::start("worker-fold", &["fsync = off"]);
    let schema = "CREATE EXTENSION pg_peersync;
         CREATE TABLE items (id int PRIMARY KEY, name text);
         SELECT sync_track_table('items');";
    let mut db = c.connect();
    db.batch_execute(schema).unwrap();
    wait_for(30, "state running", || try_worker_status(&c).filter(|s| s["state"] == "running"));
    c.connect().batch_execute("CREATE DATABASE source").unwrap();
    let mut source = c.connect_db("source");
    source.batch_execute(schema).unwrap();
    for k in 0..3 {
        source
            .batch_execute(&format!(
                "INSERT INTO items SELECT g, 'row ' || g FROM generate_series({}, {}) g",
                k * 500 + 1,
                k * 500 + 500
            ))
            .unwrap();
    }
    let batch: String = source.query_one("SELECT sync_changes('{}'::jsonb, 10000)::text", &[]).unwrap().get(0);
    let out: String = db.query_one("SELECT sync_apply($1::text)::text", &[&batch]).unwrap().get(0);
    let out: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(out["applied"], 1500, "{out}");
    let folded = wait_for(30, "the worker's fold", || {
        let left: i64 = db.query_one("SELECT count(*) FROM sync_unfolded", &[]).unwrap().get(0);
        let registers: i64 = db.query_one("SELECT count(*) FROM sync_rows", &[]).unwrap().get(0);
        (left == 0).then_some(registers)
    });
    assert_eq!(folded, 1500);
    assert!(!c.log().contains("cannot fold"), "{}", c.log());
}
