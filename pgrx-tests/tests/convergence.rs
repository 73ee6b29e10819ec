//! Convergence property test: three nodes (databases of one cluster) make random concurrent
//! inserts, updates and deletes on overlapping keys, exchange random partial batches in random
//! orders and directions (so events also travel through the third node; half of them without
//! one origin's events, so that what depends on those waits), then exchange fully.
//! Every node must then hold the same digest of every table and the same have-vector, for
//! every strategy (one table per strategy, cases cycle through them).
//!
//! `PEERSYNC_CASES` sets the number of cases (default 200; the long mode is simply a larger
//! number), `PEERSYNC_SEED` the seed (a failure prints the seed and case to rerun).

use pg_peersync_tests::{Cluster, digest, exchange_all, have, nodes, pull_once, two};
use postgres::Client;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

const STRATEGIES: [&str; 5] = ["lww", "field_merge", "node_priority", "custom", "manual"];

fn setup(c: &Cluster) -> Vec<Client> {
    let mut schema = String::from(
        "CREATE EXTENSION pg_peersync;
         -- Deterministic: per column the greater number, the smaller text; a delete loses.
         CREATE FUNCTION merge(l jsonb, r jsonb, info jsonb) RETURNS jsonb LANGUAGE sql IMMUTABLE AS $$
           SELECT CASE WHEN l = 'null' THEN r WHEN r = 'null' THEN l
                  ELSE jsonb_build_object('id', l->'id',
                         'a', greatest((l->>'a')::int, (r->>'a')::int),
                         'b', greatest((l->>'b')::int, (r->>'b')::int),
                         'c', least(l->>'c', r->>'c')) END $$;",
    );
    for s in STRATEGIES {
        schema.push_str(&format!(
            "CREATE TABLE t_{s} (id int PRIMARY KEY, a int, b int, c text);
             SELECT sync_track_table('t_{s}');"
        ));
    }
    schema.push_str(
        "SELECT sync_set_strategy('t_field_merge', 'field_merge');
                     SELECT sync_set_strategy('t_node_priority', 'node_priority');
                     SELECT sync_set_strategy('t_custom', 'custom', 'merge(jsonb,jsonb,jsonb)');
                     SELECT sync_set_strategy('t_manual', 'manual');",
    );
    let mut n = nodes(c, 3, &schema);
    let ids: Vec<String> =
        n.iter_mut().map(|db| db.query_one("SELECT sync_node_id()::text", &[]).unwrap().get(0)).collect();
    for db in n.iter_mut() {
        for (i, id) in ids.iter().enumerate() {
            // Node 1 highest, nodes 0 and 2 tied (ties go to lww).
            let p = if i == 1 { 5 } else { 0 };
            db.execute("SELECT sync_set_node_priority($1::text::uuid, $2)", &[id, &p]).unwrap();
        }
    }
    n
}

/// One random write transaction on `db`: one to three statements on keys `base..base+3`.
fn write(db: &mut Client, rng: &mut StdRng, table: &str, base: i32) {
    let statements = rng.gen_range(1..=3);
    let mut sql = String::new();
    for _ in 0..statements {
        let id = base + rng.gen_range(0..3);
        let v = rng.gen_range(0..100);
        sql.push_str(&match rng.gen_range(0..6) {
            0 | 1 => format!(
                "INSERT INTO {table} VALUES ({id}, {v}, {v}, 'n{v}') ON CONFLICT (id) DO UPDATE SET a = {v}, c = 'u{v}';"
            ),
            2 => format!("UPDATE {table} SET a = {v} WHERE id = {id};"),
            3 => format!("UPDATE {table} SET b = {v} WHERE id = {id};"),
            4 => format!("UPDATE {table} SET c = 'c{v}', b = b + 1 WHERE id = {id};"),
            _ => format!("DELETE FROM {table} WHERE id = {id};"),
        });
    }
    // One implicit transaction for the whole string.
    db.batch_execute(&sql).unwrap();
}

/// Pull one batch; with `scrambled`, leave out the events of the origin the batch starts with
/// (and that origin's range), as if they came another way later: what depends on them must
/// wait for them.
fn pull_scrambled(from: &mut Client, to: &mut Client, max: i32, scrambled: bool) -> Value {
    if !scrambled {
        return pull_once(from, to, max).0;
    }
    let since: String = to.query_one("SELECT sync_have()::text", &[]).unwrap().get(0);
    let text: String =
        from.query_one("SELECT sync_changes($1::text::jsonb, $2)::text", &[&since, &max]).unwrap().get(0);
    let mut batch: Value = serde_json::from_str(&text).unwrap();
    let Some(first) = batch["events"][0]["origin"].as_str().map(str::to_owned) else {
        return pull_once(from, to, max).0;
    };
    let events: Vec<Value> =
        batch["events"].as_array().unwrap().iter().filter(|e| e["origin"] != first.as_str()).cloned().collect();
    batch["events"] = Value::Array(events);
    batch["from"].as_object_mut().unwrap().remove(&first);
    batch["have"].as_object_mut().unwrap().remove(&first);
    let out: String = to.query_one("SELECT sync_apply($1::text)::text", &[&batch.to_string()]).unwrap().get(0);
    serde_json::from_str(&out).unwrap()
}

fn normalised_have(db: &mut Client) -> Value {
    let mut h = have(db);
    h.as_object_mut().unwrap().retain(|_, v| v != &json!(0));
    h
}

#[test]
fn random_histories_converge_for_every_strategy() {
    let cases: usize = std::env::var("PEERSYNC_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(200);
    let seed: u64 = std::env::var("PEERSYNC_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(20261122);
    let c = Cluster::start("convergence", &["fsync = off", "synchronous_commit = off"]);
    let mut n = setup(&c);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut waited = 0;
    for case in 0..cases {
        let strategy = STRATEGIES[case % STRATEGIES.len()];
        let table = format!("t_{strategy}");
        let base = (case * 10) as i32;
        for _ in 0..rng.gen_range(6..16) {
            if rng.gen_bool(0.6) {
                let node = rng.gen_range(0..3);
                write(&mut n[node], &mut rng, &table, base);
            } else {
                let from = rng.gen_range(0..3);
                let to = (from + rng.gen_range(1..3)) % 3;
                let (f, t) = two(&mut n, from, to);
                let scrambled = rng.gen_bool(0.5);
                let out = pull_scrambled(f, t, rng.gen_range(1..5), scrambled);
                assert_eq!(out["errors"], json!(0), "seed {seed} case {case}: {out}");
                waited += out["waiting"].as_i64().unwrap_or(0);
            }
        }
        exchange_all(&mut n);
        let digests: Vec<String> = n.iter_mut().map(|db| digest(db, &table)).collect();
        let haves: Vec<Value> = n.iter_mut().map(normalised_have).collect();
        let held: Vec<i64> =
            n.iter_mut().map(|db| db.query_one("SELECT count(*) FROM sync_inbox", &[]).unwrap().get(0)).collect();
        if digests.iter().any(|d| *d != digests[0])
            || haves.iter().any(|h| *h != haves[0])
            || held.iter().any(|h| *h > 0)
        {
            let rows: Vec<Vec<String>> = n
                .iter_mut()
                .map(|db| {
                    db.query(&format!("SELECT t::text FROM {table} t WHERE id >= {base} ORDER BY id"), &[])
                        .unwrap()
                        .iter()
                        .map(|r| r.get(0))
                        .collect()
                })
                .collect();
            panic!(
                "seed {seed} case {case} ({strategy}) did not converge:\ndigests {digests:?}\nhave {haves:?}\ninbox {held:?}\nrows {rows:#?}"
            );
        }
    }
    // The scrambled exchanges did exercise causal waiting, not only the easy path.
    assert!(waited > 0, "no transaction ever had to wait in {cases} cases");
    let conflicts: i64 = n[0].query_one("SELECT count(*) FROM sync_conflicts", &[]).unwrap().get(0);
    assert!(conflicts > 0, "no conflicts in {cases} cases");
    eprintln!("{cases} cases converged (seed {seed}); {waited} waits, {conflicts} conflicts recorded on node0");
}
