//! A node's identity is never silently reused: a node restored from an older backup (its data
//! directory put back as a file-level backup left it) finds out from its peers, which hold
//! more of its own transactions than it has, says so in `sync_status()` and the log, refuses
//! changes to tracked tables, and `sync_new_identity()` sets it going again.

use pg_peersync_tests::{Cluster, PG_BIN, free_port, sh_as_postgres, wait_for, worker_status};

const KEY: &str = "identity-lab-registration-key";

fn node(name: &str, port: u16, peer: u16) -> Cluster {
    let extra = ["fsync = off", "peersync.multicast_group = ''", "peersync.sync_interval = 1"];
    let c = Cluster::start_peer(name, KEY, port, &[peer], &extra);
    c.connect()
        .batch_execute(
            "CREATE EXTENSION pg_peersync;
             CREATE TABLE t (id int PRIMARY KEY);
             SELECT sync_track_table('t');",
        )
        .unwrap();
    c
}

fn count(c: &Cluster) -> i64 {
    c.connect().query_one("SELECT count(*) FROM t", &[]).unwrap().get(0)
}

/// Nodes a and b in sync; a backed up after its first row, then restored from that backup
/// after b received two more of its rows (one transaction). Returns (a, b).
fn restored_pair(name: &str) -> (Cluster, Cluster) {
    let (pa, pb) = (free_port(), free_port());
    let mut a = node(&format!("{name}-a"), pa, pb);
    let b = node(&format!("{name}-b"), pb, pa);
    a.connect().batch_execute("INSERT INTO t VALUES (1)").unwrap();
    wait_for(60, "b to receive a's first row", || (count(&b) == 1).then_some(()));
    // A file-level backup of a, taken now.
    let backup = tempfile::Builder::new().prefix("peersync-identity-backup-").tempdir_in("/tmp").unwrap();
    let copy = backup.path().join("data");
    a.stop_server(false);
    a.copy_data(&copy);
    a.start_server();
    a.connect().batch_execute("INSERT INTO t VALUES (2); INSERT INTO t VALUES (3);").unwrap();
    wait_for(60, "b to receive a's later rows", || (count(&b) == 3).then_some(()));
    let no_doubt = worker_status(&a);
    assert!(no_doubt["identity"].is_null(), "{no_doubt}");
    // a is restored from the backup: b holds a transaction of a's that a no longer has.
    a.stop_server(false);
    a.restore_data(&copy);
    a.start_server();
    (a, b)
}

#[test]
fn a_node_restored_from_an_older_backup_says_so() {
    let (a, b) = restored_pair("identity");
    let doubt = wait_for(60, "the restored node to notice", || {
        let s = worker_status(&a);
        (!s["identity"].is_null()).then(|| s["identity"].clone())
    });
    assert_eq!(doubt["seen"], "behind", "{doubt}");
    assert!(doubt["theirs"].as_i64().unwrap() > doubt["ours"].as_i64().unwrap(), "{doubt}");
    assert!(doubt["hint"].as_str().unwrap().contains("restored from an older backup"), "{doubt}");
    wait_for(10, "the WARNING in the log", || {
        a.log().contains("holds this node's own transactions up to").then_some(())
    });
    // b, which was not restored, sees nothing wrong with itself.
    assert!(worker_status(&b)["identity"].is_null());
}

/// After the doubt, the restored node refuses changes to tracked tables (a change numbered
/// like one its peers hold would be lost); `sync_new_identity()` gives it a new id, its lost
/// transactions come back from its peer as another origin's, and its new changes flow again.
#[test]
fn a_restored_node_takes_a_new_identity_and_gets_its_lost_changes_back() {
    let (a, b) = restored_pair("renew");
    wait_for(60, "the restored node to notice", || (!worker_status(&a)["identity"].is_null()).then_some(()));
    // Capture refuses, with the way out in the hint.
    let e = wait_for(20, "capture to refuse", || a.connect().batch_execute("INSERT INTO t VALUES (4)").err());
    let db = e.as_db_error().unwrap();
    assert_eq!(db.code().code(), "55000", "{e:?}");
    assert!(db.hint().unwrap_or_default().contains("sync_new_identity()"), "{e:?}");
    let old: String = a.connect().query_one("SELECT sync_node_id()::text", &[]).unwrap().get(0);
    let renewed: String = a.connect().query_one("SELECT sync_new_identity()::text", &[]).unwrap().get(0);
    assert!(renewed.contains(&old), "{renewed}");
    let new: String = a.connect().query_one("SELECT sync_node_id()::text", &[]).unwrap().get(0);
    assert_ne!(new, old);
    // Its lost transactions come back from b, as the old identity's.
    wait_for(60, "the restored node to get rows 2 and 3 back", || (count(&a) == 3).then_some(()));
    a.connect().batch_execute("INSERT INTO t VALUES (4)").unwrap();
    wait_for(60, "b to receive the new identity's row", || (count(&b) == 4).then_some(()));
    wait_for(30, "the doubt to clear after networking restarts", || {
        worker_status(&a)["identity"].is_null().then_some(())
    });
    let digest =
        |c: &Cluster| -> String { c.connect().query_one("SELECT sync_table_digest('t')", &[]).unwrap().get(0) };
    wait_for(30, "equal tables", || (digest(&a) == digest(&b)).then_some(()));
}

/// A copy of a node's database (here `CREATE DATABASE ... TEMPLATE`, a file-level copy of one
/// database, identity included) numbers a transaction like one its original made. A node that
/// holds the original's and receives the copy's keeps the second in `sync_twins` with a
/// WARNING, instead of skipping it as already held; and a batch of the copy's later
/// transactions, which starts from its own (A, 2), is not applied after the original's.
#[test]
fn two_transactions_under_one_number_are_reported_where_they_meet() {
    use pg_peersync_tests::{nodes, pull};
    let c = Cluster::start("identity-twins", &["fsync = off"]);
    let schema =
        "CREATE EXTENSION pg_peersync; CREATE TABLE t (id int PRIMARY KEY, v text); SELECT sync_track_table('t');";
    let mut n = nodes(&c, 2, schema);
    n[0].batch_execute("INSERT INTO t VALUES (1, 'before the copy')").unwrap();
    let (a, third) = n.split_at_mut(1);
    pull(&mut a[0], &mut third[0]);
    drop(n);
    c.connect().batch_execute("CREATE DATABASE node0_copy TEMPLATE node0").unwrap();
    let (mut a, mut copy, mut third) = (c.connect_db("node0"), c.connect_db("node0_copy"), c.connect_db("node1"));
    let id = |db: &mut postgres::Client| -> String { db.query_one("SELECT sync_node_id()::text", &[]).unwrap().get(0) };
    assert_eq!(id(&mut a), id(&mut copy), "the copy keeps its original's identity");
    a.batch_execute("INSERT INTO t VALUES (2, 'the original''s')").unwrap();
    copy.batch_execute("INSERT INTO t VALUES (3, 'the copy''s')").unwrap();
    pull(&mut a, &mut third);
    // The copy's history as a node that holds nothing is served it (a relay, a re-sent batch).
    let batch: String = copy.query_one("SELECT sync_changes('{}')::text", &[]).unwrap().get(0);
    let counts: String = third.query_one("SELECT sync_apply($1::text)::text", &[&batch]).unwrap().get(0);
    let counts: serde_json::Value = serde_json::from_str(&counts).unwrap();
    assert_eq!(counts["skipped"], serde_json::json!(2), "(A, 1) alike and (A, 2) twice: {counts}");
    let row = third.query_one("SELECT origin::text, origin_seq, events::text FROM sync_twins", &[]).unwrap();
    let (origin, seq, events): (String, i64, String) = (row.get(0), row.get(1), row.get(2));
    assert_eq!((origin, seq), (id(&mut a), 2));
    assert!(events.contains("the copy's"), "the copy's transaction is kept: {events}");
    assert!(c.log().contains("two different transactions are numbered"), "a WARNING in the log");
    let twins: i64 = third.query_one("SELECT (sync_status() -> 'apply' ->> 'twins')::bigint", &[]).unwrap().get(0);
    assert_eq!(twins, 1);
    // The copy numbers on: its (A, 3) continues its own (A, 2), not the original's that the
    // third node holds. A batch says what its start looks like, so the third node applies none
    // of it, rather than its next transaction under A.
    copy.batch_execute("INSERT INTO t VALUES (4, 'the copy''s next')").unwrap();
    let counts = pull(&mut copy, &mut third);
    assert_eq!(counts["transactions"], serde_json::json!(0), "{counts:?}");
    let held: i64 = third.query_one("SELECT (sync_have() ->> $1)::bigint", &[&id(&mut a)]).unwrap().get(0);
    assert_eq!(held, 2, "the third node still holds A up to its (A, 2)");
    let rows: i64 = third.query_one("SELECT count(*) FROM t WHERE id IN (3, 4)", &[]).unwrap().get(0);
    assert_eq!(rows, 0, "none of the copy's rows went in under the original's identity");
    // The third node passes the pair on in its batches: the original and the copy, each
    // holding one of the two, learn that another node uses their identity and stop capturing.
    for (name, db) in [("the original", &mut a), ("the copy", &mut copy)] {
        pull(&mut third, db);
        let e = db.batch_execute("INSERT INTO t VALUES (10, 'after the pair was seen')").unwrap_err();
        let e = e.as_db_error().unwrap();
        assert_eq!(e.code().code(), "55000", "{name}: {e:?}");
        assert!(e.message().contains("identity"), "{name}: {e:?}");
        assert!(e.hint().unwrap_or_default().contains("sync_new_identity()"), "{name}: {e:?}");
    }
}

/// A second machine set up with `pg_basebackup` of a running node keeps that node's identity
/// (and its system identifier), but not its place: it refuses changes from the first. Told to
/// keep the identity anyway (as a cloned VM, which runs where its original ran, would be
/// unseen), off the network, it writes; the original writes too; both number alike. Once the copy is on the network, their peer finds that the copy's
/// changes continue another transaction than the one it holds under that number, reports the
/// pair and passes it on: the original and the copy both stop capturing.
/// `sync_new_identity()` on the copy and `sync_keep_identity()` on the original set them going.
#[test]
fn a_base_backup_started_as_a_second_machine_is_caught() {
    let (pa, pb, pc) = (free_port(), free_port(), free_port());
    let extra = ["fsync = off", "peersync.multicast_group = ''", "peersync.sync_interval = 1"];
    let setup = "CREATE EXTENSION pg_peersync; CREATE TABLE t (id int PRIMARY KEY); SELECT sync_track_table('t');";
    let a = Cluster::start_peer("bb-a", KEY, pa, &[pb], &extra);
    a.connect().batch_execute(setup).unwrap();
    let b = Cluster::start_peer("bb-b", KEY, pb, &[pa, pc], &extra);
    b.connect().batch_execute(setup).unwrap();
    a.connect().batch_execute("INSERT INTO t VALUES (1)").unwrap();
    wait_for(60, "b to receive a's first row", || (count(&b) == 1).then_some(()));
    let copy = a.base_backup_into(
        "bb-copy",
        &[
            format!("peersync.port = {pc}"),
            format!("peersync.peers = '127.0.0.1:{pb}'"),
            "peersync.node_name = 'bb-copy'".into(),
            "peersync.enabled = off".into(),
        ],
    );
    let id = |c: &Cluster| -> String { c.connect().query_one("SELECT sync_node_id()::text", &[]).unwrap().get(0) };
    assert_eq!(id(&copy), id(&a), "the base backup keeps its original's identity");
    // It runs in another data directory than its identity was recorded in: it refuses changes
    // before its first capture, and the original goes on.
    let e = copy.connect().batch_execute("INSERT INTO t VALUES (3)").unwrap_err();
    let e = e.as_db_error().unwrap();
    assert_eq!(e.code().code(), "55000", "{e:?}");
    assert!(e.message().contains("its identity was recorded at"), "{e:?}");
    let doubt = |c: &Cluster| -> Option<String> {
        c.connect().query_one("SELECT sync_status() ->> 'identity_doubt'", &[]).unwrap().get(0)
    };
    assert!(doubt(&a).is_none(), "the original is not in doubt");
    // An operator who takes it for a move (or a VM image, which runs where its original ran)
    // lets it go on under the original's identity: the network still catches the pair.
    copy.connect().batch_execute("SELECT sync_keep_identity()").unwrap();
    // Both number their next transactions alike; b holds the original's.
    a.connect().batch_execute("INSERT INTO t VALUES (2)").unwrap();
    wait_for(60, "b to receive a's second row", || (count(&b) == 2).then_some(()));
    copy.connect().batch_execute("INSERT INTO t VALUES (3)").unwrap();
    copy.connect().batch_execute("INSERT INTO t VALUES (4)").unwrap();
    // The copy joins the network.
    let mut db = copy.connect();
    db.batch_execute("ALTER SYSTEM SET peersync.enabled = on").unwrap();
    db.batch_execute("SELECT pg_reload_conf()").unwrap();
    wait_for(60, "b to meet the pair", || {
        let n: i64 = b.connect().query_one("SELECT count(*) FROM sync_twins", &[]).unwrap().get(0);
        (n > 0).then_some(())
    });
    let rows: i64 = b.connect().query_one("SELECT count(*) FROM t WHERE id IN (3, 4)", &[]).unwrap().get(0);
    assert_eq!(rows, 0, "none of the copy's rows went in under the original's identity");
    for c in [&a, &copy] {
        let why = wait_for(60, "the pair to be passed on", || doubt(c));
        assert!(why.contains("another node numbers under this node's identity"), "{}: {why}", c.name);
        let e = c.connect().batch_execute("INSERT INTO t VALUES (10)").unwrap_err();
        assert_eq!(e.as_db_error().unwrap().code().code(), "55000", "{}: {e:?}", c.name);
    }
    // The copy becomes a node of its own; the original keeps its identity.
    copy.connect().batch_execute("SELECT sync_new_identity()").unwrap();
    assert_ne!(id(&copy), id(&a));
    a.connect().batch_execute("SELECT sync_keep_identity()").unwrap();
    copy.connect().batch_execute("INSERT INTO t VALUES (5)").unwrap();
    a.connect().batch_execute("INSERT INTO t VALUES (6)").unwrap();
    wait_for(60, "both to write again and b to receive it", || {
        let n: i64 = b.connect().query_one("SELECT count(*) FROM t WHERE id IN (5, 6)", &[]).unwrap().get(0);
        (n == 2).then_some(())
    });
}

/// A node restored from an older `pg_dump` of its database (dropped, created again, the dump
/// loaded with psql, as a shop restores last week's dump) gets a new identity at the restore's
/// CREATE EXTENSION (`sync_node` is not dumped): what it made before the dump stays its old
/// identity's history, what it made after comes back from its peer, and nothing is numbered
/// twice, so no doubt and no pair.
#[test]
fn a_node_restored_from_a_pg_dump_gets_a_new_identity_and_loses_nothing() {
    let (pa, pb) = (free_port(), free_port());
    let a = node("dump-a", pa, pb);
    let b = node("dump-b", pb, pa);
    a.connect().batch_execute("INSERT INTO t VALUES (1)").unwrap();
    b.connect().batch_execute("INSERT INTO t VALUES (100)").unwrap();
    wait_for(60, "a and b to hold both rows", || (count(&a) == 2 && count(&b) == 2).then_some(()));
    let id = |c: &Cluster| -> String { c.connect().query_one("SELECT sync_node_id()::text", &[]).unwrap().get(0) };
    let old = id(&a);
    let dir = tempfile::Builder::new().prefix("peersync-identity-dump-").tempdir_in("/tmp").unwrap();
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let dump = dir.path().join("a.sql");
    let host = a.socket_dir().display().to_string();
    sh_as_postgres(
        "pg_dump",
        &format!("{PG_BIN}/pg_dump -h {host} -p 5432 -U postgres -f {} postgres", dump.display()),
    );
    // After the dump, a makes two more transactions, which b receives.
    a.connect().batch_execute("INSERT INTO t VALUES (2)").unwrap();
    a.connect().batch_execute("INSERT INTO t VALUES (3)").unwrap();
    wait_for(60, "b to receive a's later rows", || (count(&b) == 4).then_some(()));
    // The restore.
    let psql = format!("{PG_BIN}/psql -q -v ON_ERROR_STOP=1 -h {host} -p 5432 -U postgres");
    sh_as_postgres(
        "drop and create the database",
        &format!("{psql} -d template1 -c 'DROP DATABASE postgres WITH (FORCE)' -c 'CREATE DATABASE postgres'"),
    );
    // In one transaction, as a restore should be: the worker sees all of it or none.
    sh_as_postgres("psql < dump", &format!("{psql} -1 -d postgres -f {}", dump.display()));
    let new = id(&a);
    assert_ne!(new, old, "the restored database has a new identity");
    assert_eq!(count(&a), 2, "the dump's rows");
    // What a made after the dump comes back from b, as its old identity's.
    wait_for(90, "the restored node to get rows 2 and 3 back", || (count(&a) == 4).then_some(()));
    assert!(a.log().contains(&format!("transactions of node {old} up to 1 under another identity")), "{}", a.log());
    a.connect().batch_execute("INSERT INTO t VALUES (4)").unwrap();
    b.connect().batch_execute("INSERT INTO t VALUES (101)").unwrap();
    let digest =
        |c: &Cluster| -> String { c.connect().query_one("SELECT sync_table_digest('t')", &[]).unwrap().get(0) };
    wait_for(60, "equal tables", || (count(&a) == 6 && digest(&a) == digest(&b)).then_some(()));
    for c in [&a, &b] {
        let (doubt, twins): (Option<String>, i64) = {
            let row = c
                .connect()
                .query_one(
                    "SELECT sync_status() ->> 'identity_doubt', (sync_status() -> 'apply' ->> 'twins')::bigint",
                    &[],
                )
                .unwrap();
            (row.get(0), row.get(1))
        };
        assert_eq!((doubt, twins), (None, 0), "{}", c.name);
    }
}
