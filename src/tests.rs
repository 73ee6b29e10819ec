//! Single-session behaviour, run inside PostgreSQL by `cargo pgrx test`. Each test runs in one
//! transaction that is rolled back afterwards. Multi-session behaviour (commit order, the
//! prefix property, batches) is tested end to end in the `pgrx-tests` crate.

use pgrx::prelude::*;

#[pg_schema]
mod tests {
    use super::*;
    use pgrx::JsonB;
    use serde_json::{Value, json};

    fn run(sql: &str) {
        Spi::run(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    fn one<T: IntoDatum + FromDatum>(sql: &str) -> T {
        Spi::get_one::<T>(sql).unwrap_or_else(|e| panic!("{sql}: {e}")).expect("NULL")
    }

    /// Events of `table` as `[op, pk, data, old]`, in capture order.
    fn events(table: &str) -> Vec<Value> {
        // Changes are written to sync_log at commit; a test never commits, so write them now.
        run("SELECT sync_flush()");
        let sql = format!(
            "SELECT coalesce(jsonb_agg(jsonb_build_array(op, pk, data, old) ORDER BY origin_seq, origin_idx), '[]') \
             FROM sync_events WHERE table_name = '{table}'"
        );
        match one::<JsonB>(&sql).0 {
            Value::Array(a) => a,
            other => panic!("{other}"),
        }
    }

    /// JSON from text, keeping numbers exactly as written (`json!` would turn 2.50 into 2.5).
    fn j(text: &str) -> Value {
        serde_json::from_str(text).unwrap()
    }

    /// The SQLSTATE and hint of the error `statement` (PL/pgSQL) raises, as `{state, hint}`.
    fn caught(statement: &str) -> Value {
        one::<JsonB>(&format!(
            "DO $$ DECLARE s text; h text; m text; BEGIN
                 {statement};
             EXCEPTION WHEN others THEN
                 GET STACKED DIAGNOSTICS s = RETURNED_SQLSTATE, h = PG_EXCEPTION_HINT, m = MESSAGE_TEXT;
                 PERFORM set_config('test.err', jsonb_build_object('state', s, 'hint', h, 'message', m)::text, true);
             END $$; SELECT current_setting('test.err')::jsonb"
        ))
        .0
    }

    fn shop() {
        run("CREATE TABLE items (id int PRIMARY KEY, name text, price numeric(10,2), note text)");
    }

    #[pg_test]
    fn node_id_is_made_at_create_extension_and_reported() {
        let id = one::<pgrx::Uuid>("SELECT sync_node_id()").to_string();
        let status = one::<JsonB>("SELECT sync_status()").0;
        assert_eq!(status["node_id"], json!(id));
        assert_eq!(status["node_name"], json!("test-node"));
        assert_eq!(one::<pgrx::Uuid>("SELECT sync_node_id()").to_string(), id);
    }

    #[pg_test]
    fn existing_rows_are_captured_once_when_tracked() {
        shop();
        run("INSERT INTO items VALUES (1, 'tea', 2.50, NULL), (2, 'cake', 3.00, 'x')");
        run("SELECT sync_track_table('items')");
        run("SELECT sync_track_table('items')");
        let ev = events("public.items");
        assert_eq!(ev.len(), 2, "{ev:?}");
        assert_eq!(ev[0], j(r#"["INSERT", {"id": 1}, {"id": 1, "name": "tea", "note": null, "price": 2.50}, null]"#));
        let status = one::<JsonB>("SELECT sync_status()").0;
        assert_eq!(status["tables"][0]["table"], json!("public.items"));
        assert_eq!(status["tables"][0]["events"], json!(2));
        assert_eq!(status["tables"][0]["strategy"], json!("lww"));
    }

    /// A session that prints floats rounded (`extra_float_digits` below 1) still captures them
    /// exactly, on both capture paths, and keeps its own setting.
    #[pg_test]
    fn floats_are_captured_exactly_whatever_the_session_prints() {
        run("CREATE TABLE fl (id int PRIMARY KEY, x float8, y real, note text)");
        run("CREATE TABLE fl_filtered (id int PRIMARY KEY, x float8)");
        run("SELECT sync_track_table('fl'); SELECT sync_track_table('fl_filtered', row_filter => 'id > 0')");
        run("SET extra_float_digits = -2");
        run("INSERT INTO fl VALUES (1, 1 / 3.0, 1 / 3.0, 'a')");
        run("INSERT INTO fl_filtered VALUES (1, 2 / 3.0)");
        assert_eq!(one::<String>("SHOW extra_float_digits"), "-2");
        run("SET extra_float_digits = 1");
        let fast = &events("public.fl")[0][2];
        assert_eq!((fast["x"].to_string(), fast["y"].to_string()), ("0.3333333333333333".into(), "0.33333334".into()));
        let planned = &events("public.fl_filtered")[0][2];
        assert_eq!(planned["x"].to_string(), "0.6666666666666666");
    }

    #[pg_test]
    fn insert_update_delete_are_captured_with_old_values() {
        shop();
        run("SELECT sync_track_table('items')");
        run("INSERT INTO items VALUES (1, 'tea', 2.50, NULL), (2, 'cake', 3.00, NULL), (3, 'pie', 4, NULL)");
        run("UPDATE items SET price = price * 2 WHERE id <= 2");
        run("UPDATE items SET name = name");
        run("DELETE FROM items WHERE id = 3");
        let ev = events("public.items");
        let ops: Vec<&str> = ev.iter().map(|e| e[0].as_str().unwrap()).collect();
        assert_eq!(ops, ["INSERT", "INSERT", "INSERT", "UPDATE", "UPDATE", "DELETE"]);
        assert_eq!(ev[3][2]["price"], j("5.00"));
        assert_eq!(ev[3][3], j(r#"{"price": 2.50}"#), "old holds only the changed columns");
        assert_eq!(ev[5][1], json!({"id": 3}));
        assert_eq!(ev[5][3]["name"], json!("pie"), "a delete carries the old row");
    }

    #[pg_test]
    fn primary_key_update_moves_the_row() {
        // Checked at the end of the statement, so keys may shift onto each other.
        run("CREATE TABLE items (id int PRIMARY KEY DEFERRABLE INITIALLY IMMEDIATE, name text)");
        run("SELECT sync_track_table('items')");
        run("INSERT INTO items SELECT g, 'n' || g FROM generate_series(1, 3) g");
        // Keys 1..3 become 3..5: key 3 is both deleted and inserted by one statement.
        run("UPDATE items SET id = id + 2");
        let ev = events("public.items");
        let moves: Vec<(String, i64)> =
            ev[3..].iter().map(|e| (e[0].as_str().unwrap().to_string(), e[1]["id"].as_i64().unwrap())).collect();
        // Every old key is deleted before any new key is inserted.
        assert_eq!(&moves[..3].iter().map(|m| m.0.as_str()).collect::<Vec<_>>(), &["DELETE"; 3]);
        assert_eq!(&moves[3..].iter().map(|m| m.0.as_str()).collect::<Vec<_>>(), &["INSERT"; 3]);
        let mut new_keys: Vec<i64> = moves[3..].iter().map(|m| m.1).collect();
        new_keys.sort();
        assert_eq!(new_keys, [3, 4, 5]);
        for e in &ev[6..] {
            let id = e[1]["id"].as_i64().unwrap();
            assert_eq!(e[2]["name"], json!(format!("n{}", id - 2)), "data pairs with its own old row");
        }
    }

    #[pg_test]
    fn bulk_update_pairs_old_and_new_rows() {
        shop();
        run("SELECT sync_track_table('items')");
        run("INSERT INTO items SELECT g, 'n' || g, g FROM generate_series(1, 2000) g");
        run("UPDATE items SET name = name || '!' WHERE id % 3 = 0");
        let ev = events("public.items");
        let updates: Vec<&Value> = ev.iter().filter(|e| e[0] == "UPDATE").collect();
        assert_eq!(updates.len(), 666);
        for u in updates {
            let id = u[1]["id"].as_i64().unwrap();
            assert_eq!(u[2]["name"], json!(format!("n{id}!")));
            assert_eq!(u[3], json!({"name": format!("n{id}")}));
        }
    }

    #[pg_test]
    fn row_filter_and_excluded_columns() {
        shop();
        run("SELECT sync_track_table('items', 'field_merge', 'name NOT LIKE ''demo%''', '{note}')");
        run("INSERT INTO items VALUES (1, 'demo a', 1, 'x'), (2, 'real', 2, 'y')");
        run("UPDATE items SET note = 'local only'");
        run("UPDATE items SET name = 'demo now' WHERE id = 2");
        run("UPDATE items SET name = 'real now' WHERE id = 1");
        let ev = events("public.items");
        assert_eq!(
            ev,
            vec![
                j(r#"["INSERT", {"id": 2}, {"id": 2, "name": "real", "price": 2.00}, null]"#),
                j(r#"["DELETE", {"id": 2}, null, {"id": 2, "name": "real", "price": 2.00}]"#),
                j(r#"["UPDATE", {"id": 1}, {"id": 1, "name": "real now", "price": 1.00}, {"name": "demo a"}]"#),
            ]
        );
    }

    #[pg_test(error = "table public.nopk has no primary key")]
    fn table_without_primary_key_is_refused() {
        run("CREATE TABLE nopk (a int)");
        run("SELECT sync_track_table('nopk')");
    }

    #[pg_test(error = "unknown conflict strategy \"newest\"")]
    fn unknown_strategy_is_refused() {
        shop();
        run("SELECT sync_track_table('items', 'newest')");
    }

    #[pg_test(error = "primary key column \"id\" of table public.items cannot be excluded from sync")]
    fn primary_key_cannot_be_excluded() {
        shop();
        run("SELECT sync_track_table('items', exclude_columns => '{id}')");
    }

    #[pg_test(error = "sync_events belongs to the pg_peersync extension and cannot be tracked")]
    fn own_tables_are_refused() {
        run("SELECT sync_track_table('sync_events')");
    }

    #[pg_test(error = "TRUNCATE of tracked table public.items is not replicated")]
    fn truncate_is_refused() {
        shop();
        run("SELECT sync_track_table('items')");
        run("TRUNCATE items");
    }

    #[pg_test]
    fn errors_carry_sqlstate_and_hint() {
        shop();
        run("CREATE TABLE nopk (a int)");
        let caught = caught("PERFORM sync_track_table('nopk')");
        assert_eq!(caught["state"], json!("55000"));
        assert!(caught["hint"].as_str().unwrap().contains("ADD PRIMARY KEY"));
    }

    #[pg_test]
    fn a_peer_forgotten_no_longer_holds_the_log_back() {
        let peer = "00000000-0000-0000-0000-00000000000a";
        run(&format!("INSERT INTO sync_peers VALUES ('{peer}', 'till', '{{}}', now())"));
        run(&format!("SELECT sync_forget_peer('{peer}')"));
        assert_eq!(one::<i64>("SELECT count(*) FROM sync_peers"), 0);
        let caught = caught(&format!("PERFORM sync_forget_peer('{peer}')"));
        assert_eq!(caught["state"], json!("42704"));
        assert!(caught["hint"].as_str().unwrap().contains("sync_status()"));
    }

    /// A transaction pruned from the log keeps its fingerprint, so that a copy's transaction
    /// under the same number is still told apart (`apply::twins`), and it adds up over the
    /// transaction's log rows.
    #[pg_test]
    fn a_pruned_transaction_keeps_its_fingerprint() {
        let x = "00000000-0000-0000-0000-0000000000aa";
        for (seq, first, xact, hlc) in [(1, 0, 700, 10), (1, 2, 700, 12), (2, 0, 701, 20)] {
            run(&format!(
                "INSERT INTO sync_log (origin, origin_seq, first_idx, origin_xact, n, hlc, vclock, part_hlc, part_table,
                                       part_op, part_pk, part_first, part_n, part_rows, created_at)
                 VALUES ('{x}', {seq}, {first}, {xact}, 2, {hlc}, '{{}}', '{{}}', '{{}}', '{{}}', '{{}}', '{{}}', '{{}}', '{{}}',
                         now() - interval '1 day')"
            ));
        }
        run(&format!(
            "INSERT INTO sync_peers VALUES ('00000000-0000-0000-0000-0000000000bb', 'bo', '{{\"{x}\": 2}}', now())"
        ));
        let ext = crate::clock::ext();
        let deleted = crate::log::retention::prune(&ext.schema, ext.node_id).unwrap();
        assert_eq!(deleted, 2, "both rows of (x, 1); (x, 2), the newest, stays");
        let origin = uuid::Uuid::parse_str(x).unwrap();
        let kept = crate::apply::twins::fingerprints(&ext.schema, &[(origin, 1), (origin, 2)]).unwrap();
        let f = |xact, hlc, n| sync_bridge::log::Fingerprint { xact, hlc, n };
        assert_eq!(kept.get(&(origin, 1)), Some(&f(700, 12, 4)), "from sync_fingerprints");
        assert_eq!(kept.get(&(origin, 2)), Some(&f(701, 20, 2)), "from sync_log");
    }

    /// A node that lacks changes deleted from the log is told so, and sent nothing of that
    /// origin (what is left would have a hole in it); one that holds them is not. (Serving
    /// what is left after a prune is tested end to end, in `retention.rs`.)
    #[pg_test]
    fn a_node_behind_what_was_deleted_is_told_it_is_gone() {
        let me: String = one("SELECT sync_node_id()::text");
        run("INSERT INTO sync_pruned SELECT sync_node_id(), 1");
        let batch = one::<JsonB>("SELECT sync_changes('{}')").0;
        assert_eq!(batch["gone"], json!({ me.as_str(): 1 }));
        assert_eq!(batch["events"], json!([]));
        let batch = one::<JsonB>(&format!("SELECT sync_changes('{{\"{me}\": 1}}')")).0;
        assert_eq!(batch.get("gone"), None);
    }

    /// While a node copies its tables from a peer, local changes and received batches are
    /// refused (the copy would overwrite them), with the reason and a hint; `sync_resync`
    /// names a known peer.
    #[pg_test]
    fn changes_wait_while_the_node_copies_from_a_peer() {
        shop();
        run("SELECT sync_track_table('items')");
        let peer = "00000000-0000-0000-0000-00000000000b";
        let unknown = caught(&format!("PERFORM sync_resync('{peer}')"));
        assert_eq!(unknown["state"], json!("42704"));
        run(&format!("INSERT INTO sync_peers VALUES ('{peer}', 'bo', '{{}}', now())"));
        run(&format!("SELECT sync_resync('{peer}')"));
        let write = caught("INSERT INTO items VALUES (91, 'written during the copy')");
        assert_eq!(write["state"], json!("55000"));
        assert!(write["message"].as_str().unwrap().contains(peer));
        assert!(write["hint"].as_str().unwrap().contains("'join'"));
        let apply = caught("PERFORM sync_apply(sync_changes('{}'))");
        assert_eq!(apply["state"], json!("55000"));
        assert_eq!(one::<i64>("SELECT count(*) FROM items WHERE id = 91"), 0);
    }

    /// The two sides of `sync_verify` compute the same buckets from the same rows whatever
    /// their physical order, and a changed row changes exactly its bucket and its listing.
    /// Values hash as every node prints them: a session's DateStyle, IntervalStyle,
    /// bytea_output or extra_float_digits changes no bucket, and is back afterwards.
    #[pg_test]
    fn verify_hashes_values_alike_in_any_session() {
        use sync_bridge::verify::{Answer, Ask};
        run(r"CREATE TABLE vt (id int PRIMARY KEY, at timestamptz, d date, span interval, raw bytea, x float8);
             INSERT INTO vt SELECT g, '2026-12-03 10:00+01'::timestamptz + g * interval '1 day', '2026-01-31'::date + g,
                                   g * interval '90 minutes', '\x5c00'::bytea, g / 3.0
               FROM generate_series(1, 500) g;
             SELECT sync_track_table('vt');");
        let ask = Ask::Buckets { table: "public.vt".into(), depth: 1, under: vec!["".into()] };
        let answer = || -> Answer { serde_json::from_str(&crate::verify::serve(&ask).unwrap()).unwrap() };
        let plain = answer();
        run("SET datestyle = 'SQL, DMY'; SET intervalstyle = 'sql_standard'; SET bytea_output = 'escape';
             SET extra_float_digits = 0");
        assert_eq!(answer().buckets, plain.buckets);
        assert_eq!(one::<String>("SHOW datestyle"), "SQL, DMY", "the session's setting is back");
    }

    #[pg_test]
    fn verify_buckets_find_the_changed_row() {
        use sync_bridge::verify::{Answer, Ask};
        run("CREATE TABLE va (id int PRIMARY KEY, name text, twice int GENERATED ALWAYS AS (id * 2) STORED);
             CREATE TABLE vb (LIKE va INCLUDING ALL);
             INSERT INTO va (id, name) SELECT g, 'n' || g FROM generate_series(1, 3000) g;
             INSERT INTO vb (id, name) SELECT g, 'n' || g FROM generate_series(3000, 1, -1) g;
             SELECT sync_track_table('va'); SELECT sync_track_table('vb');");
        let ask = |t: &str, depth: usize, under: &[&str]| Ask::Buckets {
            table: t.into(),
            depth,
            under: under.iter().map(|u| u.to_string()).collect(),
        };
        let answer = |a: &Ask| -> Answer { serde_json::from_str(&crate::verify::serve(a).unwrap()).unwrap() };
        let (a, b) = (answer(&ask("public.va", 1, &[""])), answer(&ask("public.vb", 1, &[""])));
        assert_eq!(a.buckets.len(), 16);
        assert_eq!(a.buckets, b.buckets, "same rows, other order");
        assert_eq!(a.buckets.values().map(|b| b.n).sum::<i64>(), 3000);
        run("UPDATE vb SET name = 'changed' WHERE id = 1234");
        let b = answer(&ask("public.vb", 1, &[""]));
        let differing: Vec<&String> = a.buckets.keys().filter(|k| a.buckets[*k] != b.buckets[*k]).collect();
        assert_eq!(differing.len(), 1, "{differing:?}");
        let under = vec![differing[0].clone()];
        let rows = |t: &str| answer(&Ask::Rows { table: t.into(), under: under.clone() }).rows;
        let changed = sync_bridge::verify::differing_rows(&rows("public.va"), &rows("public.vb"));
        assert_eq!(changed.keys().collect::<Vec<_>>(), vec!["{\"id\": 1234}"]);
        let values = answer(&Ask::Values {
            table: "public.vb".into(),
            keys: vec!["{\"id\": 1234}".into(), "{\"id\": 0}".into()],
        });
        assert_eq!(values.values.len(), 1);
        assert_eq!(values.values["{\"id\": 1234}"], json!({"id": 1234, "name": "changed", "twice": 2468}));
    }

    /// Buckets and values on the tables applications have: a composite key with text in it,
    /// a column kept to each node (excluded), a row filter. Rows outside the filter and the
    /// excluded column's values do not count; rows are found again by their composite key.
    #[pg_test]
    fn verify_buckets_follow_composite_keys_exclusions_and_filters() {
        use sync_bridge::verify::{Answer, Ask};
        run("CREATE TABLE ca (shop int, sku text, qty int, private_note text, archived bool NOT NULL DEFAULT false,
                              PRIMARY KEY (shop, sku));
             CREATE TABLE cb (LIKE ca INCLUDING ALL);
             INSERT INTO ca SELECT g % 7, 'sku \"' || g || E'\\'', g, 'a' FROM generate_series(1, 500) g;
             INSERT INTO cb SELECT g % 7, 'sku \"' || g || E'\\'', g, 'b' FROM generate_series(1, 500) g;
             INSERT INTO ca VALUES (1, 'old', 1, NULL, true);
             INSERT INTO cb VALUES (1, 'old', 2, NULL, true);
             SELECT sync_track_table('ca', row_filter => 'NOT archived', exclude_columns => '{private_note}');
             SELECT sync_track_table('cb', row_filter => 'NOT archived', exclude_columns => '{private_note}');");
        let answer = |a: &Ask| -> Answer { serde_json::from_str(&crate::verify::serve(a).unwrap()).unwrap() };
        let buckets = |t: &str| answer(&Ask::Buckets { table: t.into(), depth: 2, under: vec![String::new()] }).buckets;
        assert_eq!(buckets("public.ca"), buckets("public.cb"), "only excluded values and filtered rows differ");
        assert_eq!(buckets("public.ca").values().map(|b| b.n).sum::<i64>(), 500);
        let key = r#"{"sku": "sku \"17'", "shop": 3}"#.to_string();
        let values = answer(&Ask::Values { table: "public.cb".into(), keys: vec![key.clone()] }).values;
        assert_eq!(values.len(), 1, "{values:?}");
        assert_eq!(values[&key], json!({"shop": 3, "sku": "sku \"17'", "qty": 17, "archived": false}));
    }

    /// `sync_verify` names the peer it cannot reach and the table it may not read, with hints.
    #[pg_test]
    fn verify_refuses_an_unknown_peer_and_an_unreadable_table() {
        shop();
        run("SELECT sync_track_table('items')");
        let peer = "00000000-0000-0000-0000-00000000000b";
        let unknown = caught(&format!("PERFORM sync_verify('{peer}')"));
        assert_eq!(unknown["state"], json!("08003"), "{unknown}");
        assert!(unknown["hint"].as_str().unwrap().contains("sync_status() -> 'worker' -> 'peers'"), "{unknown}");
        run("CREATE ROLE verify_reader; GRANT USAGE ON SCHEMA public TO verify_reader");
        let denied = caught(&format!("SET LOCAL ROLE verify_reader; PERFORM sync_verify('{peer}', 'items')"));
        assert_eq!(denied["state"], json!("42501"), "{denied}");
        assert!(denied["hint"].as_str().unwrap().contains("GRANT SELECT"), "{denied}");
    }

    #[pg_test]
    fn capture_refuses_while_the_identity_is_in_doubt() {
        shop();
        run("SELECT sync_track_table('items')");
        crate::identity::record_doubt("a copy seen in a test").unwrap();
        let caught = caught("INSERT INTO items VALUES (90, 'numbered like a peer''s')");
        assert_eq!(caught["state"], json!("55000"));
        assert!(caught["hint"].as_str().unwrap().contains("sync_new_identity()"));
        run("SELECT sync_keep_identity()");
        run("INSERT INTO items VALUES (90, 'captured again')");
        assert_eq!(events("public.items").len(), 1);
    }

    /// A database started elsewhere than its identity was recorded (a base backup, a copied
    /// data directory) or on a new timeline refuses changes before its first capture, saying
    /// both places.
    #[pg_test]
    fn a_database_started_elsewhere_refuses_changes_before_its_first_capture() {
        shop();
        run("SELECT sync_track_table('items')");
        let here = crate::identity::here();
        assert!(here.contains(" (database ") && here.ends_with(", timeline 1)"), "{here}");
        // Promoted from a standby, or restored to a point in time: the same place, a new timeline.
        run(&format!("UPDATE sync_node SET place = '{}'", here.replace("timeline 1)", "timeline 0)")));
        crate::clock::identity_changed();
        let promoted = caught("INSERT INTO items VALUES (90, 'numbered like a lost one')");
        assert_eq!(promoted["state"], json!("55000"), "{promoted}");
        assert!(promoted["message"].as_str().unwrap().contains("(a new timeline)"), "{promoted}");
        run("UPDATE sync_node SET place = 'shop-1:/var/lib/postgresql/15/main (database 5, timeline 1)'");
        crate::clock::identity_changed();
        let caught = caught("INSERT INTO items VALUES (91, 'numbered like the original''s')");
        assert_eq!(caught["state"], json!("55000"), "{caught}");
        let message = caught["message"].as_str().unwrap();
        assert!(message.contains("shop-1:/var/lib/postgresql/15/main") && message.contains(&here), "{caught}");
        assert!(caught["hint"].as_str().unwrap().contains("sync_keep_identity()"), "{caught}");
        // It moved here: kept, and the place recorded.
        run("SELECT sync_keep_identity()");
        run("INSERT INTO items VALUES (91, 'captured')");
        assert_eq!(events("public.items").len(), 1);
        assert_eq!(one::<String>("SELECT place FROM sync_node"), here);
    }

    #[pg_test]
    fn rolled_back_subtransaction_leaves_no_event() {
        shop();
        run("SELECT sync_track_table('items')");
        run("DO $$ BEGIN
               INSERT INTO items VALUES (1, 'kept');
               BEGIN
                 INSERT INTO items VALUES (2, 'rolled back');
                 RAISE EXCEPTION 'undo';
               EXCEPTION WHEN others THEN NULL;
               END;
               INSERT INTO items VALUES (3, 'kept too');
             END $$");
        let keys: Vec<i64> = events("public.items").iter().map(|e| e[1]["id"].as_i64().unwrap()).collect();
        assert_eq!(keys, [1, 3]);
    }

    #[pg_test]
    fn copy_and_functions_are_captured() {
        shop();
        run("SELECT sync_track_table('items')");
        let path = format!("/tmp/pg_peersync_copy_{}.csv", std::process::id());
        std::fs::write(&path, "10,copied,1.5,\n11,copied too,2,n\n").unwrap();
        run(&format!("COPY items (id, name, price, note) FROM '{path}' WITH (FORMAT csv)"));
        std::fs::remove_file(&path).ok();
        run("CREATE FUNCTION bump() RETURNS void LANGUAGE sql AS $$ UPDATE items SET price = price + 1 $$");
        run("SELECT bump()");
        let ops: Vec<String> = events("public.items").iter().map(|e| e[0].as_str().unwrap().to_string()).collect();
        assert_eq!(ops, ["INSERT", "INSERT", "UPDATE", "UPDATE"]);
    }

    #[pg_test]
    fn types_round_trip_through_the_row_image() {
        run("CREATE TYPE mood AS ENUM ('sad', 'happy')");
        run("CREATE DOMAIN positive AS int CHECK (VALUE > 0)");
        run("CREATE TABLE kinds (
               id uuid PRIMARY KEY, n numeric, tz timestamptz, d date, b bytea, arr int[], tags text[],
               j jsonb, m mood, p positive, f float8, t text, big text, nothing text)");
        run("SELECT sync_track_table('kinds')");
        run("INSERT INTO kinds VALUES (
               'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 12345678901234567890.000100, '2024-02-29 23:59:59.123456+05:30',
               '0044-03-15', '\\x00ff10', '{1,NULL,3}', '{\"a,b\",\"c\\\"d\"}', '{\"k\": [1, 2.50, null]}', 'happy', 7,
               0.1, 'Grüße 👋 \t\n\\', repeat('x', 1024 * 1024), NULL)");
        run("SELECT sync_flush()");
        // The stored image rebuilds a row equal to the original, column by column.
        let same: bool = one("SELECT bool_and(r IS NOT DISTINCT FROM k) FROM kinds k,
                    LATERAL (SELECT jsonb_populate_record(NULL::kinds, e.data) AS r
                               FROM sync_events e WHERE e.table_name = 'public.kinds') x");
        assert!(same);
    }

    #[pg_test]
    fn checksums_match_the_canonical_encoding() {
        shop();
        run("SELECT sync_track_table('items')");
        run("INSERT INTO items VALUES (1, 'Grüße \"q\" \\ \n', 1.10, NULL)");
        run("UPDATE items SET price = 2");
        run("DELETE FROM items");
        run("SELECT sync_flush()");
        let evs = one::<JsonB>(&format!(
            "SELECT jsonb_agg({} ORDER BY origin_seq, origin_idx) FROM sync_events",
            crate::changes::EVENT_JSON
        ));
        let evs: Vec<sync_bridge::Event> = serde_json::from_value(evs.0).unwrap();
        assert_eq!(evs.len(), 3);
        for e in &evs {
            assert!(e.checksum_ok(), "checksum of {e:?}");
        }
    }

    #[pg_test]
    fn batches_carry_exactly_the_events_the_view_shows() {
        // Floats are where row_to_json and jsonb print numbers differently (1e+20, -0).
        run("CREATE TABLE nums (id int PRIMARY KEY, f float8, r real, n numeric, t text, j jsonb, a int[])");
        run("SELECT sync_track_table('nums')");
        run("INSERT INTO nums VALUES (1, 1e20, 1.5e-7, 1.50, 'x', '{\"b\": 1e3}', '{1,2}'),
                                     (2, '-0', '-0', -0.0, NULL, NULL, NULL),
                                     (3, 5e-324, 3.4e38, 1e-5, 'é \"q\"', '[1.0]', '{}')");
        run("UPDATE nums SET f = f * 2, r = 6.02e23 WHERE id = 1");
        run("DELETE FROM nums WHERE id = 2");
        run("SELECT sync_flush()");
        let view = one::<JsonB>(&format!(
            "SELECT jsonb_agg({} ORDER BY origin_seq, origin_idx) FROM sync_events",
            crate::changes::EVENT_JSON
        ))
        .0;
        assert_eq!(view.as_array().unwrap().len(), 5);
        // Uncommitted here, so not yet in this node's have-vector: ask for them by number.
        let origin = uuid::Uuid::parse_str(view[0]["origin"].as_str().unwrap()).unwrap();
        let upto = std::collections::BTreeMap::from([(origin, view[0]["seq"].as_i64().unwrap())]);
        let built = crate::changes::batch(&Default::default(), &upto, 1000).unwrap();
        let batch: Value = serde_json::from_str(&serde_json::to_string(&built).unwrap()).unwrap();
        // Number for number as jsonb prints them, and the same checksums.
        assert_eq!(batch["events"], view);
    }

    #[pg_test]
    fn one_transaction_shares_one_number_and_orders_its_events() {
        shop();
        run("SELECT sync_track_table('items')");
        run("INSERT INTO items VALUES (1, 'a')");
        run("INSERT INTO items VALUES (2, 'b'), (3, 'c')");
        run("SELECT sync_flush()");
        let seqs: Vec<i64> = Spi::connect(|c| {
            c.select("SELECT origin_seq, origin_idx FROM sync_events ORDER BY origin_idx", None, &[])
                .unwrap()
                .map(|r| r.get::<i64>(1).unwrap().unwrap() * 100 + r.get::<i32>(2).unwrap().unwrap() as i64)
                .collect()
        });
        let seq = seqs[0] / 100;
        assert_eq!(seqs, [seq * 100 + 1, seq * 100 + 2, seq * 100 + 3]);
        let vclock = one::<JsonB>("SELECT vclock FROM sync_events LIMIT 1").0;
        assert_eq!(vclock[one::<pgrx::Uuid>("SELECT sync_node_id()").to_string()], json!(seq));
    }

    #[pg_test]
    fn track_schema_tracks_tables_with_keys() {
        run("CREATE SCHEMA shop");
        run("CREATE TABLE shop.a (id int PRIMARY KEY)");
        run("CREATE TABLE shop.b (id int PRIMARY KEY)");
        run("CREATE TABLE shop.c (x int)");
        run("CREATE TABLE shop.skip (id int PRIMARY KEY)");
        let n: i32 = one("SELECT sync_track_schema('shop', '{skip}')");
        assert_eq!(n, 2);
        let tracked: i64 = one("SELECT count(*) FROM sync_tables");
        assert_eq!(tracked, 2);
        run("SELECT sync_untrack_table('shop.a')");
        run("INSERT INTO shop.a VALUES (1)");
        assert!(events("shop.a").is_empty());
    }

    #[pg_test]
    fn clock_advances_per_statement() {
        shop();
        run("SELECT sync_track_table('items')");
        run("INSERT INTO items VALUES (1)");
        run("INSERT INTO items VALUES (2)");
        run("SELECT sync_flush()");
        let ordered: bool = one(
            "SELECT bool_and(hlc > prev) FROM (SELECT hlc, lag(hlc) OVER (ORDER BY origin_idx) prev FROM sync_events) s WHERE prev IS NOT NULL",
        );
        assert!(ordered);
    }

    /// The fast path (no filter, no excluded columns) and the SQL path (here forced by a filter
    /// that keeps every row) must record the same changes for the same statements.
    #[pg_test]
    fn fast_and_sql_capture_paths_agree() {
        for t in ["fast", "viasql"] {
            run(&format!(
                "CREATE TABLE {t} (id int PRIMARY KEY DEFERRABLE INITIALLY IMMEDIATE, n numeric, tz timestamptz,
                                   tags text[], j jsonb, b bytea, t text)"
            ));
        }
        run("SELECT sync_track_table('fast')");
        run("SELECT sync_track_table('viasql', row_filter => 'true')");
        for t in ["fast", "viasql"] {
            run(&format!(
                "INSERT INTO {t} SELECT g, g * 1.50, '2024-01-01 00:00+00'::timestamptz + g * interval '1 h',
                        ARRAY['a', 'b\"c'], jsonb_build_object('g', g), '\\x00ff', 'Grüße ' || g
                   FROM generate_series(1, 50) g"
            ));
            run(&format!("UPDATE {t} SET n = n + 1 WHERE id % 5 = 0"));
            run(&format!("UPDATE {t} SET t = t WHERE id < 10"));
            run(&format!("UPDATE {t} SET id = id + 3 WHERE id > 45"));
            run(&format!("UPDATE {t} SET id = id + 100, t = 'moved' WHERE id = 1"));
            run(&format!("DELETE FROM {t} WHERE id BETWEEN 20 AND 24"));
        }
        let fast = events("public.fast");
        let viasql = events("public.viasql");
        assert_eq!(fast.len(), 50 + 10 + 5 + 5 + 1 + 1 + 5, "{fast:?}");
        assert_eq!(fast, viasql);
    }

    #[pg_test(error = "sync_flush() cannot run inside a subtransaction")]
    fn flush_is_refused_inside_a_savepoint() {
        shop();
        run("SELECT sync_track_table('items')");
        run("DO $$ BEGIN
               BEGIN  -- a block with an EXCEPTION clause runs in a subtransaction
                 INSERT INTO items VALUES (1);
                 PERFORM sync_flush();
               EXCEPTION WHEN division_by_zero THEN NULL;
               END;
             END $$");
    }

    #[pg_test(
        error = "parted is partitioned or part of an inheritance hierarchy, which pg_peersync does not track yet"
    )]
    fn partitioned_tables_are_refused() {
        run("CREATE TABLE parted (id int PRIMARY KEY) PARTITION BY RANGE (id)");
        run("CREATE TABLE parted_1 PARTITION OF parted FOR VALUES FROM (0) TO (100)");
        let skipped: i32 = one("SELECT sync_track_schema('public')");
        assert_eq!(skipped, 0, "track_schema leaves partitions and their parent alone");
        run("SELECT sync_track_table('parted')");
    }

    #[pg_test]
    fn table_digest_ignores_order_and_local_only_data() {
        for t in ["left_t", "right_t"] {
            run(&format!("CREATE TABLE {t} (id int PRIMARY KEY, v text, note text)"));
            run(&format!("SELECT sync_track_table('{t}', row_filter => 'id < 100', exclude_columns => '{{note}}')"));
        }
        run("INSERT INTO left_t SELECT g, 'v' || g, 'a' FROM generate_series(1, 50) g");
        run("INSERT INTO right_t SELECT g, 'v' || g, 'b' FROM generate_series(50, 1, -1) g");
        run("INSERT INTO right_t VALUES (500, 'filtered out', NULL)");
        let digest = |t: &str| one::<String>(&format!("SELECT sync_table_digest('{t}')"));
        assert_eq!(digest("left_t"), digest("right_t"), "same captured content, other order");
        run("UPDATE right_t SET v = 'changed' WHERE id = 7");
        assert_ne!(digest("left_t"), digest("right_t"), "a captured value differs");
    }

    #[pg_test(error = "table items is not tracked")]
    fn digest_of_an_untracked_table_is_refused() {
        shop();
        run("SELECT sync_table_digest('items')");
    }

    #[pg_test(error = "strategy custom needs a resolver function for table items")]
    fn custom_strategy_needs_a_resolver() {
        shop();
        run("SELECT sync_track_table('items')");
        run("SELECT sync_set_strategy('items', 'custom')");
    }

    #[pg_test]
    fn strategy_can_be_changed_and_tracking_keeps_the_resolver() {
        shop();
        run("CREATE FUNCTION keep_left(l jsonb, r jsonb, i jsonb) RETURNS jsonb LANGUAGE sql AS 'SELECT l'");
        run("SELECT sync_track_table('items')");
        run("SELECT sync_set_strategy('items', 'custom', 'keep_left(jsonb,jsonb,jsonb)')");
        // Tracking again with 'custom' keeps the resolver already named.
        run("SELECT sync_track_table('items', 'custom')");
        assert_eq!(
            one::<String>("SELECT strategy || ' ' || resolver::text FROM sync_tables"),
            "custom keep_left(jsonb,jsonb,jsonb)"
        );
        run("SELECT sync_set_strategy('items', 'field_merge')");
        assert_eq!(one::<String>("SELECT strategy FROM sync_tables"), "field_merge");
    }

    #[pg_test(error = "table items is not tracked")]
    fn strategy_of_an_untracked_table_is_refused() {
        shop();
        run("SELECT sync_set_strategy('items', 'lww')");
    }

    #[pg_test(error = "conflict 42 does not exist")]
    fn resolving_an_unknown_conflict_is_refused() {
        run("SELECT sync_resolve_conflict(42, '\"local\"')");
    }

    #[pg_test]
    fn applying_an_empty_batch_changes_nothing() {
        let node = one::<String>("SELECT sync_node_id()::text");
        let batch =
            format!(r#"{{"format": 1, "source": "{node}", "from": {{}}, "have": {{}}, "events": [], "more": false}}"#);
        let out = one::<JsonB>(&format!("SELECT sync_apply('{batch}')")).0;
        assert_eq!(out["applied"], json!(0));
        assert_eq!(out["transactions"], json!(0));
    }

    /// A received transaction that waits (here for events of another origin) is stored once:
    /// the same batch again leaves its inbox row as it was, and the worker asks its peers past
    /// it, and after a stall only for what it misses.
    #[pg_test]
    fn a_waiting_transaction_is_kept_once_and_asked_past() {
        use std::collections::BTreeMap;
        use sync_bridge::{Batch, Event, Op};
        use uuid::Uuid;
        shop();
        run("SELECT sync_track_table('items')");
        let (x, y) = (Uuid::from_u128(0xa1), Uuid::from_u128(0xb2));
        let mut e = Event {
            origin: x,
            seq: 1,
            idx: 1,
            xact: 1,
            hlc: 1 << 20,
            table: "public.items".into(),
            pk: json!({"id": 1}),
            op: Op::Insert,
            data: Some(json!({"id": 1, "name": "a"})),
            old: None,
            // X had seen Y's first five transactions, which this node lacks.
            vclock: BTreeMap::from([(x, 1), (y, 5)]),
            checksum: String::new(),
        };
        e.checksum = e.compute_checksum();
        let batch = Batch {
            format: sync_bridge::FORMAT_VERSION,
            source: x,
            from: BTreeMap::from([(x, 0)]),
            have: BTreeMap::from([(x, 1)]),
            events: vec![e],
            more: false,
            gone: Default::default(),
            absent: Default::default(),
            at: Default::default(),
            twins: Default::default(),
        };
        let text = serde_json::to_string(&batch).unwrap();
        let apply = || {
            Spi::get_one_with_args::<JsonB>("SELECT sync_apply($1::text)", &[text.clone().into()]).unwrap().unwrap().0
        };
        let out = apply();
        assert_eq!((out["waiting"].clone(), out["missing"].clone()), (json!(1), json!({y.to_string(): 5})), "{out}");
        let stored = || one::<String>("SELECT xmin::text || '/' || waiting_for FROM sync_inbox");
        let first = stored();
        assert!(first.contains(&format!("origin {y} up to 5")), "{first}");
        let again = apply();
        assert_eq!(again["waiting"], json!(1), "{again}");
        assert_eq!(stored(), first, "the inbox row was written again");
        // Asked past what the inbox keeps; after a stall, only for Y (X at the peer's position).
        let request = crate::apply::pull_request(None).unwrap();
        assert_eq!(request["ask"][x.to_string()], json!(1), "{request}");
        assert!(request["have"].get(x.to_string()).is_none(), "{request}");
        let peer = BTreeMap::from([(x, 40), (y, 9)]);
        let request = crate::apply::pull_request(Some(&peer)).unwrap();
        assert_eq!((request["ask"][x.to_string()].clone(), request["ask"].get(y.to_string())), (json!(40), None));
    }

    /// The arrays apply builds in one pass hold what pgrx's conversion would: NULLs, empty and
    /// non-ASCII strings, lengths that need padding between elements, and no elements at all.
    #[pg_test]
    fn bulk_arrays_hold_their_elements() {
        use crate::apply::arrays::{Of, array};
        let long = "x".repeat(3000);
        let items = [Some("a"), None, Some(""), Some("ab"), Some("abc"), Some("ünïcode ☃"), Some(long.as_str()), None];
        let expected: Vec<Option<String>> = items.iter().map(|s| s.map(str::to_string)).collect();
        let same = Spi::get_one_with_args::<bool>(
            "SELECT $1::text[] IS NOT DISTINCT FROM $2::text[]",
            &[array(Of::Text, items), expected.into()],
        );
        assert_eq!(same, Ok(Some(true)));
        let keys = Spi::get_one_with_args::<String>(
            "SELECT string_agg(coalesce(j->>'k', '-'), ',' ORDER BY n) FROM unnest($1::json[]) WITH ORDINALITY u(j, n)",
            &[array(Of::Json, [Some(r#"{"k":"one"}"#), None, Some(r#"{"k":"☃"}"#)])],
        );
        assert_eq!(keys, Ok(Some("one,-,☃".to_string())));
        let empty = Spi::get_one_with_args::<i32>("SELECT cardinality($1::text[])", &[array(Of::Text, [])]);
        assert_eq!(empty, Ok(Some(0)));
    }

    /// A rows page carries every value through COPY's text format unchanged (tabs, line breaks,
    /// backslashes, COPY's own markers as text, empty and null values, in keys too), with the
    /// registers of its rows, and loads through `copy::copy_from`.
    #[pg_test]
    fn a_rows_page_carries_awkward_values_through_copy() {
        use sync_bridge::snapshot::{Ask, PAGE_FORMAT, prefix_lines, split_rows_page};
        let columns =
            "(k text PRIMARY KEY, body text, doc jsonb, tags text[], raw bytea, at timestamptz, price numeric(10,2))";
        run(&format!("CREATE TABLE notes {columns}"));
        run(&format!("CREATE TABLE notes_copy {columns}"));
        run("SELECT sync_track_table('notes')");
        run(r#"INSERT INTO notes VALUES
                 (E'tab\tkey', E'line1\nline2\r\n\\.\n\\N', '{"a": "q\"uote\\back"}', ARRAY[E'x\ty', 'NULL', NULL, '{}'],
                  '\x00ff5c0a'::bytea, '2026-12-03 10:00:00+01', 12.5),
                 (E'back\\slash "quoted"', '', 'null', '{}', '', NULL, NULL),
                 ('ünïcødé ✓', NULL, NULL, NULL, NULL, NULL, -0.01),
                 (E'\\.', E'\\.', '[]', ARRAY[E'\\.'], '\x5c2e'::bytea, '2026-01-01', 0),
                 (E'\\N', E'a\\Nb\tc', '"\\u00e9"', ARRAY[''], '\x'::bytea, 'infinity', 'NaN')"#);
        // Written to the log (a test never commits); the manifest folds them into registers, as
        // a source does before its first page.
        run("SELECT sync_flush()");
        crate::snapshot::serve(&Ask::Manifest).unwrap();
        let ask = |format| Ask::Rows { table: "public.notes".into(), after: None, limit: 100, format };
        let text = crate::snapshot::serve(&ask(PAGE_FORMAT)).unwrap();
        let page = split_rows_page(&text).unwrap();
        assert_eq!(page.head.n, 5, "{text}");
        let names: Vec<String> = ["k", "body", "doc", "tags", "raw", "at", "price"].map(String::from).into();
        let oid = one::<pg_sys::Oid>("SELECT 'notes_copy'::regclass::oid");
        assert_eq!(crate::copy::copy_from(oid, &names, page.rows).unwrap(), 5, "{text}");
        let differ = one::<i64>(
            "SELECT count(*) FROM ((TABLE notes EXCEPT TABLE notes_copy) UNION ALL (TABLE notes_copy EXCEPT TABLE notes)) d",
        );
        assert_eq!(differ, 0, "{}", page.rows);
        // The registers: one per row, under the keys sync_rows has, loaded as they came.
        run("CREATE TABLE regs (relid regclass, pk text, versions json, life json)");
        let regs = one::<pg_sys::Oid>("SELECT 'regs'::regclass::oid");
        let lines = prefix_lines(page.registers, &format!("{}\t", oid.to_u32()));
        let cols: Vec<String> = ["relid", "pk", "versions", "life"].map(String::from).into();
        assert_eq!(crate::copy::copy_from(regs, &cols, &lines).unwrap(), 5, "{text}");
        let same = one::<bool>(
            "SELECT array_agg(pk ORDER BY pk) = (SELECT array_agg(pk ORDER BY pk) FROM sync_rows \
              WHERE relid = 'notes'::regclass) FROM regs WHERE versions::text LIKE '[{%'",
        );
        assert!(same, "{}", page.registers);
        // An older joiner's question is refused with the reason.
        let refused = crate::snapshot::serve(&ask(0)).unwrap_err();
        assert!(matches!(refused, crate::error::SyncError::ServeFormat(0)), "{refused}");
    }
}
