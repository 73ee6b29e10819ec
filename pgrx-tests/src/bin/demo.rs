//! `make demo`: three throwaway clusters with a small shop schema, synced by their workers.
//! Where network namespaces can be made, each node runs in its own and they find each other by
//! multicast; elsewhere they run on loopback with static peers. Shows what capture records,
//! then writes on all three nodes, including a concurrent edit of one row, waits until they
//! converge, and shows what `sync_status()` reports.

use pg_peersync_tests::lab::Lab;
use pg_peersync_tests::{Cluster, digest, free_port, wait_for, worker_status};

const KEY: &str = "demo-registration-key-0123456789";

const TABLES: &str = "
    CREATE EXTENSION pg_peersync;
    CREATE TABLE customers (id int PRIMARY KEY, name text NOT NULL, email text, local_note text);
    CREATE TABLE products (sku text PRIMARY KEY, title text NOT NULL, price numeric(10,2) NOT NULL);
    CREATE TABLE orders (id int PRIMARY KEY, customer_id int REFERENCES customers, sku text REFERENCES products,
                         qty int NOT NULL, placed_at timestamptz NOT NULL DEFAULT now());
    SELECT sync_track_table('products', 'field_merge');
    SELECT sync_track_table('customers', exclude_columns => '{local_note}', row_filter => 'name NOT LIKE ''demo%''');
    SELECT sync_track_table('orders');";

fn show(db: &mut postgres::Client, title: &str, sql: &str) {
    println!("\n== {title}\n   {sql}");
    for row in db.query(sql, &[]).unwrap() {
        let cols: Vec<String> =
            (0..row.len()).map(|i| row.get::<_, Option<String>>(i).unwrap_or_else(|| "NULL".into())).collect();
        println!("   {}", cols.join(" | "));
    }
}

/// Three nodes: in namespaces with multicast discovery, or on loopback with static peers.
fn start_nodes(lab: Option<&mut Lab>) -> Vec<Cluster> {
    let names = ["shop-a", "shop-b", "shop-c"];
    let base = |name: &str| {
        vec![
            "shared_preload_libraries = 'pg_peersync'".to_string(),
            format!("peersync.node_name = '{name}'"),
            format!("peersync.registration_key = '{KEY}'"),
        ]
    };
    match lab {
        Some(lab) => names
            .iter()
            .map(|name| {
                let (ns, addrs) = lab.node(&[0]);
                println!("{name}: network namespace {ns}, address {}", addrs[0]);
                let mut conf = base(name);
                conf.extend(["peersync.listen_addresses = '0.0.0.0'".into(), "peersync.announce_interval = 1".into()]);
                Cluster::start_in(Some(&ns), name, &conf)
            })
            .collect(),
        None => {
            let ports = [free_port(), free_port(), free_port()];
            names
                .iter()
                .enumerate()
                .map(|(i, name)| {
                    let peers: Vec<String> =
                        (0..3).filter(|j| *j != i).map(|j| format!("127.0.0.1:{}", ports[j])).collect();
                    println!("{name}: loopback port {}, static peers {}", ports[i], peers.join(", "));
                    let mut conf = base(name);
                    conf.extend([
                        "peersync.listen_addresses = '127.0.0.1'".into(),
                        format!("peersync.port = {}", ports[i]),
                        format!("peersync.peers = '{}'", peers.join(",")),
                    ]);
                    Cluster::start_with(name, &conf)
                })
                .collect()
        }
    }
}

fn peers_up(c: &Cluster) -> usize {
    worker_status(c)["peers"].as_array().map_or(0, |ps| ps.iter().filter(|p| p["state"] == "up").count())
}

fn main() {
    println!("Starting three throwaway PostgreSQL 15 clusters with pg_peersync preloaded...");
    // PEERSYNC_DEMO_LOOPBACK=1 skips the namespaces (as where they cannot be made).
    let mut lab = if std::env::var("PEERSYNC_DEMO_LOOPBACK").is_ok_and(|v| v == "1") {
        None
    } else {
        match Lab::new(1) {
            Ok(l) => Some(l),
            Err(e) => {
                println!("(network namespaces unavailable: {e}; using loopback with static peers)");
                None
            }
        }
    };
    let nodes = start_nodes(lab.as_mut());
    for c in &nodes {
        c.connect().batch_execute(TABLES).unwrap();
    }
    wait_for(60, "every node to see its two peers up", || nodes.iter().all(|c| peers_up(c) == 2).then_some(()));
    println!("\nEvery node sees its two peers up.");

    let mut a = nodes[0].connect();
    let setup = "INSERT INTO products VALUES ('TEA-1', 'Green tea', 4.50), ('CAKE-2', 'Carrot cake', 3.20);
        INSERT INTO customers VALUES (1, 'Ada', 'ada@example.org', 'pays cash'), (2, 'demo user', NULL, NULL);
        INSERT INTO orders (id, customer_id, sku, qty) VALUES (1, 1, 'TEA-1', 2), (2, 1, 'CAKE-2', 1);
        UPDATE products SET price = price * 1.10;          -- a bulk update: one event per row
        UPDATE customers SET local_note = 'VIP';           -- excluded column only: no event
        DELETE FROM orders WHERE id = 2";
    for stmt in setup.split(";\n").filter(|s| !s.trim().is_empty()) {
        println!("shop-a sql> {}", stmt.trim());
        a.batch_execute(stmt).unwrap();
    }
    show(
        &mut a,
        "shop-a: captured events",
        "SELECT origin_seq::text, origin_idx::text, op, table_name, pk::text, coalesce(data::text, ''), coalesce(old::text, '')
           FROM sync_events ORDER BY origin_seq, origin_idx",
    );
    let truncate = a.batch_execute("TRUNCATE orders").unwrap_err();
    let e = truncate.as_db_error().unwrap();
    println!(
        "\n== TRUNCATE orders is refused: {} (SQLSTATE {})\n   HINT: {}",
        e.message(),
        e.code().code(),
        e.hint().unwrap_or("")
    );

    println!("\nshop-b and shop-c write too; all three edit TEA-1 at once (products use field_merge):");
    let writes = [
        "UPDATE products SET price = 5.00 WHERE sku = 'TEA-1'",
        "INSERT INTO customers VALUES (3, 'Grace', 'grace@example.org', NULL);
         UPDATE products SET title = 'Green tea (loose)' WHERE sku = 'TEA-1'",
        "INSERT INTO products VALUES ('SCONE-3', 'Scone', 2.10);
         UPDATE products SET price = 5.25 WHERE sku = 'TEA-1'",
    ];
    wait_for(30, "shop-a's rows on shop-b and shop-c", || {
        nodes[1..].iter().all(|c| digest(&mut c.connect(), "products") == digest(&mut a, "products")).then_some(())
    });
    std::thread::scope(|s| {
        for (c, sql) in nodes.iter().zip(writes) {
            s.spawn(move || {
                println!("{} sql> {}", c.name, sql.split_whitespace().collect::<Vec<_>>().join(" "));
                c.connect().batch_execute(sql).unwrap();
            });
        }
    });
    let started = std::time::Instant::now();
    wait_for(60, "the three nodes to converge", || {
        let d: Vec<(String, String)> = nodes
            .iter()
            .map(|c| {
                let mut db = c.connect();
                (digest(&mut db, "products"), digest(&mut db, "customers"))
            })
            .collect();
        (d[0] == d[1] && d[1] == d[2]).then_some(())
    });
    println!("\nConverged {} ms after the last write.", started.elapsed().as_millis());
    for c in &nodes {
        let mut db = c.connect();
        show(&mut db, &format!("{}: products", c.name), "SELECT sku, title, price::text FROM products ORDER BY sku");
        println!("   digest(products) = {}", digest(&mut db, "products"));
    }
    show(
        &mut a,
        "shop-a: sync_conflicts",
        "SELECT table_name, pk::text, strategy, winner, result::text, review FROM sync_conflicts",
    );
    show(&mut a, "shop-a: sync_status() -> 'worker'", "SELECT jsonb_pretty(sync_status() -> 'worker')");
    show(
        &mut a,
        "shop-a: sync_sessions (the last five exchanges)",
        "SELECT peer, direction, events_in::text, bytes_out::text, bytes_in::text, duration_ms::text, coalesce(error, '')
           FROM sync_sessions ORDER BY id DESC LIMIT 5",
    );
    let b = pg_peersync_tests::node_id(&nodes[1]);
    show(
        &mut a,
        "shop-a: sync_verify against shop-b (range digests: only bucket sums travel)",
        &format!(
            "SELECT t ->> 'table', t ->> 'rows_here', t ->> 'rows_there', t ->> 'differing', r ->> 'agree',
                    r ->> 'round_trips', r ->> 'bytes_received'
               FROM (SELECT sync_verify('{b}') AS r) v, jsonb_array_elements(r -> 'tables') t"
        ),
    );
    drop(nodes);
    println!("\nDemo finished; the clusters (and namespaces) are removed.");
}
