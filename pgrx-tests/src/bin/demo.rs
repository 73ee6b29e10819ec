//! `make demo`: a throwaway cluster with a small shop schema in three databases acting as three
//! nodes. Shows what capture records on one, then moves batches between them with
//! `sync_changes()` / `sync_apply()` (the worker that will do this by itself is not built
//! yet): relay through the middle node, a conflict, and convergence.

use pg_peersync_tests::{Cluster, digest, exchange_all, pull, two};

fn show(db: &mut postgres::Client, title: &str, sql: &str) {
    println!("\n== {title}\n   {sql}");
    for row in db.query(sql, &[]).unwrap() {
        let cols: Vec<String> =
            (0..row.len()).map(|i| row.get::<_, Option<String>>(i).unwrap_or_else(|| "NULL".into())).collect();
        println!("   {}", cols.join(" | "));
    }
}

fn main() {
    println!("Starting a throwaway PostgreSQL 15 cluster with pg_peersync preloaded...");
    let c = Cluster::start("demo-shop", &[]);
    println!("cluster socket: {}", c.socket_dir().display());
    // Every node has the same tables, tracked the same way; node A also has two products from
    // before tracking (captured as its inserts) and the writes below.
    let tables = "
        CREATE EXTENSION pg_peersync;
        CREATE TABLE customers (id int PRIMARY KEY, name text NOT NULL, email text, local_note text);
        CREATE TABLE products (sku text PRIMARY KEY, title text NOT NULL, price numeric(10,2) NOT NULL);
        CREATE TABLE orders (id int PRIMARY KEY, customer_id int REFERENCES customers, sku text REFERENCES products,
                             qty int NOT NULL, placed_at timestamptz NOT NULL DEFAULT now());";
    let track = "
        SELECT sync_track_table('products', 'field_merge');
        SELECT sync_track_table('customers', exclude_columns => '{local_note}', row_filter => 'name NOT LIKE ''demo%''');
        SELECT sync_track_table('orders');";
    let mut admin = c.connect();
    for name in ["shop_b", "shop_c"] {
        admin.batch_execute(&format!("CREATE DATABASE {name}")).unwrap();
        c.connect_db(name).batch_execute(&format!("{tables}{track}")).unwrap();
    }
    let mut db = c.connect();
    let setup = format!(
        "{tables}
        INSERT INTO products VALUES ('TEA-1', 'Green tea', 4.50), ('CAKE-2', 'Carrot cake', 3.20);{track}
        INSERT INTO customers VALUES (1, 'Ada', 'ada@example.org', 'pays cash'), (2, 'demo user', NULL, NULL);
        INSERT INTO orders (id, customer_id, sku, qty) VALUES (1, 1, 'TEA-1', 2), (2, 1, 'CAKE-2', 1);
        UPDATE products SET price = price * 1.10;          -- a bulk update: one event per row
        UPDATE customers SET local_note = 'VIP';           -- excluded column only: no event
        DELETE FROM orders WHERE id = 2;"
    );
    for stmt in setup.split(";\n").filter(|s| !s.trim().is_empty()) {
        println!("sql> {}", stmt.trim());
        db.batch_execute(stmt).unwrap();
    }
    show(
        &mut db,
        "captured events",
        "SELECT origin_seq::text, origin_idx::text, op, table_name, pk::text, coalesce(data::text, ''), coalesce(old::text, '')
           FROM sync_events ORDER BY origin_seq, origin_idx",
    );
    show(&mut db, "sync_have()", "SELECT sync_have()::text");
    show(&mut db, "sync_changes('{}', 3) (what a peer would pull)", "SELECT jsonb_pretty(sync_changes('{}', 3))");
    show(&mut db, "sync_status()", "SELECT jsonb_pretty(sync_status())");
    let truncate = db.batch_execute("TRUNCATE orders").unwrap_err();
    let e = truncate.as_db_error().unwrap();
    println!(
        "\n== TRUNCATE orders is refused: {} (SQLSTATE {})\n   HINT: {}",
        e.message(),
        e.code().code(),
        e.hint().unwrap_or("")
    );

    println!("\n== Three nodes: this database (A), shop_b (B), shop_c (C)");
    let mut n = vec![db, c.connect_db("shop_b"), c.connect_db("shop_c")];
    {
        let (a, b) = two(&mut n, 0, 1);
        println!("B pulls from A: {:?}", pull(a, b));
    }
    {
        let (b, cc) = two(&mut n, 1, 2);
        println!("C pulls from B (A's changes, relayed by B): {:?}", pull(b, cc));
    }
    println!("A and C change the price of TEA-1 concurrently; B changes its title (products use field_merge).");
    n[0].batch_execute("UPDATE products SET price = 5.00 WHERE sku = 'TEA-1'").unwrap();
    n[2].batch_execute("UPDATE products SET price = 5.25 WHERE sku = 'TEA-1'").unwrap();
    n[1].batch_execute("UPDATE products SET title = 'Green tea (loose)' WHERE sku = 'TEA-1'").unwrap();
    exchange_all(&mut n);
    for (i, db) in n.iter_mut().enumerate() {
        let name = ["A", "B", "C"][i];
        show(db, &format!("node {name}: products"), "SELECT sku, title, price::text FROM products ORDER BY sku");
        println!("   digest(products) = {}", digest(db, "products"));
    }
    show(
        &mut n[0],
        "node A: sync_conflicts",
        "SELECT table_name, pk::text, strategy, winner, local->'row'->>'price', remote->'row'->>'price', review
           FROM sync_conflicts",
    );
    show(
        &mut n[0],
        "node A: sync_status() -> have, apply",
        "SELECT (sync_status() -> 'have')::text, (sync_status() -> 'apply')::text",
    );
    println!("\nDemo finished; the cluster is removed.");
}
