//! `sync_verify` compares a table with a peer's by range digests, and `sync_repair` mends what
//! differs with ordinary changes that every node receives: three worker nodes on loopback, an
//! application table (identity key, unique column, generated column).

use pg_peersync_tests::{converged_on, mesh_of_three_with, node_id, wait_for};
use serde_json::{Value, json};

const KEY: &str = "verify-lab-registration-key";
const ROWS: i64 = 50_000;

const SETUP: &str = "CREATE EXTENSION pg_peersync;
     CREATE TABLE accounts (
         id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
         email text NOT NULL UNIQUE,
         balance numeric NOT NULL,
         doubled numeric GENERATED ALWAYS AS (balance * 2) STORED);
     SELECT sync_track_table('accounts');";

fn verify(c: &pg_peersync_tests::Cluster, peer: &str) -> Value {
    let text: String = c.connect().query_one("SELECT sync_verify($1::text::uuid)::text", &[&peer]).unwrap().get(0);
    serde_json::from_str(&text).unwrap()
}

fn balance(c: &pg_peersync_tests::Cluster, id: i64) -> Option<String> {
    c.connect().query_opt("SELECT balance::text FROM accounts WHERE id = $1", &[&id]).unwrap().map(|r| r.get(0))
}

#[test]
fn verify_finds_rows_written_behind_capture_and_repair_mends_them_everywhere() {
    let extra = ["fsync = off", "peersync.multicast_group = ''", "peersync.sync_interval = 1"];
    let [a, b, c] = mesh_of_three_with(["verify-a", "verify-b", "verify-c"], KEY, &extra, SETUP);
    a.connect()
        .batch_execute(&format!(
            "INSERT INTO accounts (email, balance) SELECT 'u' || g || '@example.org', g FROM generate_series(1, {ROWS}) g"
        ))
        .unwrap();
    wait_for(120, "the three nodes to converge", || converged_on(&[&a, &b, &c], &["accounts"]));
    let (id_a, id_b) = (node_id(&a), node_id(&b));

    // Tables that agree: one round trip, buckets only.
    let same = verify(&a, &id_b);
    assert_eq!(same["agree"], json!(true), "{same}");
    assert_eq!(same["settled"], json!(true), "{same}");
    assert_eq!(same["round_trips"], json!(1), "{same}");
    assert_eq!(same["tables"][0]["rows_here"], json!(ROWS), "{same}");
    let size: i64 = a.connect().query_one("SELECT pg_table_size('accounts')", &[]).unwrap().get(0);
    let received = same["bytes_received"].as_i64().unwrap();
    assert!(received * 100 < size, "{received} bytes received for a table of {size}");

    // b's rows changed with its triggers off: nothing captured, nothing sent.
    b.connect()
        .batch_execute(
            "SET session_replication_role = replica;
             UPDATE accounts SET balance = -7 WHERE id = 7;
             DELETE FROM accounts WHERE id = 8;
             INSERT INTO accounts (id, email, balance) OVERRIDING SYSTEM VALUE VALUES (900001, 'ghost@example.org', 5);",
        )
        .unwrap();
    let found = verify(&a, &id_b);
    assert_eq!(found["agree"], json!(false), "{found}");
    assert_eq!(found["settled"], json!(true), "{found}");
    assert!(found["round_trips"].as_i64().unwrap() <= 5, "{found}");
    assert!(found["hint"].as_str().unwrap().contains("sync_repair"), "{found}");
    let t = &found["tables"][0];
    assert_eq!(t["differing"], json!(3), "{found}");
    let kinds: Vec<(i64, &str)> = t["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["key"]["id"].as_i64().unwrap(), r["kind"].as_str().unwrap()))
        .collect();
    let mut kinds = kinds;
    kinds.sort();
    assert_eq!(kinds, vec![(7, "differs"), (8, "only_here"), (900001, "only_there")], "{found}");
    let seven = t["rows"].as_array().unwrap().iter().find(|r| r["key"]["id"] == json!(7)).unwrap();
    assert_eq!((seven["here"]["balance"].clone(), seven["there"]["balance"].clone()), (json!(7), json!(-7)), "{seven}");
    assert_eq!(seven["there"]["doubled"], json!(-14), "{seven}");

    // b takes a's rows back, as changes: every node ends with a's values.
    let repaired: String =
        b.connect().query_one("SELECT sync_repair($1::text::uuid, 'accounts')::text", &[&id_a]).unwrap().get(0);
    let repaired: Value = serde_json::from_str(&repaired).unwrap();
    assert_eq!(repaired["tables"][0]["repaired"], json!(3), "{repaired}");
    wait_for(60, "the repair to reach every node", || converged_on(&[&a, &b, &c], &["accounts"]));
    for n in [&a, &b, &c] {
        assert_eq!(balance(n, 7).as_deref(), Some("7"), "{}", n.name);
        assert_eq!(balance(n, 8).as_deref(), Some("8"), "{}", n.name);
        assert_eq!(balance(n, 900001), None, "{}", n.name);
    }
    let after = verify(&c, &id_b);
    assert_eq!(after["agree"], json!(true), "{after}");
}

/// While two nodes write the same rows, `sync_verify` may see rows that differ, but never calls
/// them settled: a settled divergence here would be a false alarm. Once writes stop and the
/// nodes converge, it finds the tables agree.
#[test]
fn verify_under_writes_reports_no_settled_divergence() {
    let extra = ["fsync = off", "peersync.multicast_group = ''", "peersync.sync_interval = 1"];
    let setup = "CREATE EXTENSION pg_peersync;
         CREATE TABLE t (id int PRIMARY KEY, n int NOT NULL, who text);
         SELECT sync_track_table('t');";
    let [a, b, c] = mesh_of_three_with(["vload-a", "vload-b", "vload-c"], KEY, &extra, setup);
    a.connect().batch_execute("INSERT INTO t SELECT g, 0, 'seed' FROM generate_series(1, 5000) g").unwrap();
    wait_for(120, "the seed everywhere", || converged_on(&[&a, &b, &c], &["t"]));
    let id_b = node_id(&b);
    let script = |who: &str| {
        format!(
            "\\set k random(1, 5000)\nUPDATE t SET n = n + 1, who = '{who}' WHERE id = :k;\nINSERT INTO t VALUES (5000 + :k * 2 + {}, 1, '{who}') ON CONFLICT (id) DO NOTHING;\n",
            if who == "a" { 0 } else { 1 }
        )
    };
    let reports = std::thread::scope(|s| {
        let wa = s.spawn(|| pg_peersync_tests::pgbench(&a, &script("a"), 1500));
        let wb = s.spawn(|| pg_peersync_tests::pgbench(&b, &script("b"), 1500));
        let mut reports = Vec::new();
        // Bounded: a few comparisons while the writers run.
        while reports.len() < 6 && !(wa.is_finished() && wb.is_finished()) {
            reports.push(verify(&a, &id_b));
        }
        reports
    });
    assert!(!reports.is_empty());
    for r in &reports {
        assert!(r["agree"] == json!(true) || r["settled"] == json!(false), "a settled divergence under writes: {r}");
    }
    wait_for(120, "the writers' changes everywhere", || converged_on(&[&a, &b, &c], &["t"]));
    let quiet = verify(&a, &id_b);
    assert_eq!((quiet["agree"].clone(), quiet["settled"].clone()), (json!(true), json!(true)), "{quiet}");
}
