//! Throwaway PostgreSQL clusters for pg_peersync's end-to-end tests, demo and benchmarks.
//!
//! Each `Cluster` is a fresh `initdb` under /tmp, owned by user `postgres` (PostgreSQL refuses
//! to run as root), listening only on a Unix socket inside its own directory, with the
//! installed extension preloaded. Dropping it stops the server and removes the directory.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub mod lab;

pub use postgres;

pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

pub struct Cluster {
    pub name: String,
    dir: tempfile::TempDir,
    stopped: bool,
    /// The network namespace its server runs in (see `lab`); None: the test's own.
    netns: Option<String>,
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Run a PostgreSQL program as user postgres.
fn as_postgres(program: &str, args: &[&str]) -> Output {
    as_postgres_in(None, program, args)
}

/// Run a PostgreSQL program as user postgres, in network namespace `netns` if given.
fn as_postgres_in(netns: Option<&str>, program: &str, args: &[&str]) -> Output {
    let path = format!("{PG_BIN}/{program}");
    let mut cmd = if let Some(ns) = netns {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, "runuser", "-u", "postgres", "--", &path]);
        c
    } else if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", &path]);
        c
    } else {
        Command::new(&path)
    };
    cmd.args(args).output().unwrap_or_else(|e| panic!("{program}: {e}"))
}

fn check(what: &str, out: Output) {
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Cluster {
    /// A running cluster with pg_peersync preloaded; `conf` lines are appended to postgresql.conf.
    pub fn start(name: &str, conf: &[&str]) -> Cluster {
        let mut lines = vec!["shared_preload_libraries = 'pg_peersync'".to_string()];
        lines.push(format!("peersync.node_name = '{name}'"));
        lines.extend(conf.iter().map(|s| s.to_string()));
        Self::start_with(name, &lines)
    }

    /// A node whose worker listens on loopback `port` and syncs with the nodes listening on
    /// `peers` (static peers), admitted by `key`; `extra` lines are appended to postgresql.conf.
    pub fn start_peer(name: &str, key: &str, port: u16, peers: &[u16], extra: &[&str]) -> Cluster {
        let peers: Vec<String> = peers.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let mut conf = vec![
            format!("peersync.registration_key = '{key}'"),
            "peersync.listen_addresses = '127.0.0.1'".to_string(),
            format!("peersync.port = {port}"),
            format!("peersync.peers = '{}'", peers.join(",")),
        ];
        conf.extend(extra.iter().map(|s| s.to_string()));
        Self::start(name, &conf.iter().map(String::as_str).collect::<Vec<_>>())
    }

    /// A running cluster with exactly these postgresql.conf lines (plus socket settings).
    pub fn start_with(name: &str, conf: &[String]) -> Cluster {
        Self::start_in(None, name, conf)
    }

    /// Like `start_with`, the server running in network namespace `netns` (the tests still
    /// reach it through its Unix socket, which namespaces do not separate).
    pub fn start_in(netns: Option<&str>, name: &str, conf: &[String]) -> Cluster {
        let dir = tempfile::Builder::new().prefix(&format!("peersync-{name}-")).tempdir_in("/tmp").unwrap();
        if is_root() {
            check("chown", Command::new("chown").args(["postgres:", dir.path().to_str().unwrap()]).output().unwrap());
        }
        let cluster = Cluster { name: name.into(), dir, stopped: true, netns: netns.map(str::to_owned) };
        let data = cluster.data_dir();
        check(
            "initdb",
            as_postgres(
                "initdb",
                &["-D", data.to_str().unwrap(), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8"],
            ),
        );
        let mut text = format!(
            "\nlisten_addresses = ''\nunix_socket_directories = '{}'\nport = 5432\nmax_connections = 40\n",
            cluster.dir.path().display()
        );
        for l in conf {
            text.push_str(l);
            text.push('\n');
        }
        let conf_path = data.join("postgresql.conf");
        let mut existing = std::fs::read_to_string(&conf_path).unwrap();
        existing.push_str(&text);
        std::fs::write(&conf_path, existing).unwrap();
        let mut cluster = cluster;
        cluster.start_server();
        cluster
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    pub fn start_server(&mut self) {
        let log = self.dir.path().join("server.log");
        let out = as_postgres_in(
            self.netns.as_deref(),
            "pg_ctl",
            &["-D", self.data_dir().to_str().unwrap(), "-l", log.to_str().unwrap(), "-w", "-t", "60", "start"],
        );
        if !out.status.success() {
            panic!("pg_ctl start failed for {}: {}\n{}", self.name, String::from_utf8_lossy(&out.stderr), self.log());
        }
        self.stopped = false;
    }

    /// Stop the server; `immediate` simulates a crash (no checkpoint, no clean shutdown).
    pub fn stop_server(&mut self, immediate: bool) {
        let mode = if immediate { "immediate" } else { "fast" };
        check(
            "pg_ctl stop",
            as_postgres_in(
                self.netns.as_deref(),
                "pg_ctl",
                &["-D", self.data_dir().to_str().unwrap(), "-m", mode, "-w", "stop"],
            ),
        );
        self.stopped = true;
    }

    /// A cold copy of the stopped cluster's data directory, as a file-level backup makes it.
    pub fn copy_data(&self, to: &Path) {
        assert!(self.stopped, "copy a stopped cluster");
        check(
            "cp",
            Command::new("cp").args(["-a", self.data_dir().to_str().unwrap(), to.to_str().unwrap()]).output().unwrap(),
        );
    }

    /// A second cluster made from a cold copy of this stopped one's data directory (a copied
    /// disk image), started in network namespace `netns`: it keeps the node's identity.
    pub fn copy_into(&self, netns: Option<&str>, name: &str) -> Cluster {
        let dir = tempfile::Builder::new().prefix(&format!("peersync-{name}-")).tempdir_in("/tmp").unwrap();
        if is_root() {
            check("chown", Command::new("chown").args(["postgres:", dir.path().to_str().unwrap()]).output().unwrap());
        }
        let mut copy = Cluster { name: name.into(), dir, stopped: true, netns: netns.map(str::to_owned) };
        self.copy_data(&copy.data_dir());
        // Its own socket directory; everything else as the original has it.
        let conf_path = copy.data_dir().join("postgresql.conf");
        let mut conf = std::fs::read_to_string(&conf_path).unwrap();
        conf.push_str(&format!("\nunix_socket_directories = '{}'\n", copy.dir.path().display()));
        std::fs::write(&conf_path, conf).unwrap();
        copy.start_server();
        copy
    }

    /// A second cluster made with `pg_basebackup` of this running one, as a second machine is
    /// set up from a base backup: it keeps the node's identity (and the system identifier).
    /// `conf` lines are appended to the copy's postgresql.conf (its own port, its peers).
    pub fn base_backup_into(&self, name: &str, conf: &[String]) -> Cluster {
        let dir = tempfile::Builder::new().prefix(&format!("peersync-{name}-")).tempdir_in("/tmp").unwrap();
        if is_root() {
            check("chown", Command::new("chown").args(["postgres:", dir.path().to_str().unwrap()]).output().unwrap());
        }
        let mut copy = Cluster { name: name.into(), dir, stopped: true, netns: None };
        let host = self.dir.path().to_str().unwrap().to_string();
        let target = copy.data_dir().to_str().unwrap().to_string();
        check(
            "pg_basebackup",
            as_postgres("pg_basebackup", &["-h", &host, "-p", "5432", "-U", "postgres", "-D", &target, "-X", "stream"]),
        );
        let conf_path = copy.data_dir().join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf_path).unwrap();
        text.push_str(&format!("\nunix_socket_directories = '{}'\n", copy.dir.path().display()));
        for l in conf {
            text.push_str(l);
            text.push('\n');
        }
        std::fs::write(&conf_path, text).unwrap();
        copy.start_server();
        copy
    }

    /// Put back a copy made by `copy_data` (the cluster stopped): a restore of that backup.
    pub fn restore_data(&mut self, from: &Path) {
        assert!(self.stopped, "restore into a stopped cluster");
        std::fs::remove_dir_all(self.data_dir()).unwrap();
        check(
            "cp",
            Command::new("cp")
                .args(["-a", from.to_str().unwrap(), self.data_dir().to_str().unwrap()])
                .output()
                .unwrap(),
        );
    }

    pub fn restart(&mut self, immediate: bool) {
        self.stop_server(immediate);
        self.start_server();
    }

    pub fn conn_string(&self, db: &str) -> String {
        format!("host={} port=5432 user=postgres dbname={db}", self.dir.path().display())
    }

    pub fn connect(&self) -> postgres::Client {
        self.connect_db("postgres")
    }

    pub fn connect_db(&self, db: &str) -> postgres::Client {
        postgres::Client::connect(&self.conn_string(db), postgres::NoTls)
            .unwrap_or_else(|e| panic!("connect to {}: {e}\n{}", self.name, self.log()))
    }

    /// Run a PostgreSQL client program (pgbench, psql) against this cluster as user postgres.
    pub fn run_client(&self, program: &str, args: &[&str]) -> Output {
        let host = self.dir.path().to_str().unwrap().to_string();
        let mut all: Vec<&str> = vec!["-h", &host, "-p", "5432", "-U", "postgres"];
        all.extend_from_slice(args);
        as_postgres(program, &all)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if !self.stopped {
            let _ = as_postgres_in(
                self.netns.as_deref(),
                "pg_ctl",
                &["-D", self.data_dir().to_str().unwrap(), "-m", "immediate", "-w", "stop"],
            );
        }
    }
}

/// One `sync_changes()` call, parsed.
pub fn changes(client: &mut postgres::Client, since: &serde_json::Value, max: i32) -> serde_json::Value {
    let row = client.query_one("SELECT sync_changes($1::text::jsonb, $2)::text", &[&since.to_string(), &max]).unwrap();
    serde_json::from_str(row.get::<_, &str>(0)).unwrap()
}

/// Pull one batch of what `to` lacks from `from` and apply it on `to`; returns
/// `(sync_apply's answer, the batch's "more")`.
pub fn pull_once(from: &mut postgres::Client, to: &mut postgres::Client, max: i32) -> (serde_json::Value, bool) {
    let have: String = to.query_one("SELECT sync_have()::text", &[]).unwrap().get(0);
    let batch: String =
        from.query_one("SELECT sync_changes($1::text::jsonb, $2)::text", &[&have, &max]).unwrap().get(0);
    let more = serde_json::from_str::<serde_json::Value>(&batch).unwrap()["more"].as_bool().unwrap_or(false);
    let out: String = to
        .query_one("SELECT sync_apply($1::text::jsonb)::text", &[&batch])
        .unwrap_or_else(|e| panic!("sync_apply failed: {e:?}"))
        .get(0);
    (serde_json::from_str(&out).unwrap(), more)
}

/// Pull from `from` into `to` until `from` has nothing more `to` can take; returns the summed
/// counts of the applies.
pub fn pull(from: &mut postgres::Client, to: &mut postgres::Client) -> serde_json::Map<String, serde_json::Value> {
    let mut total = serde_json::Map::new();
    // Bounded: each round moves at least one transaction or stops.
    for _ in 0..10_000 {
        let (out, more) = pull_once(from, to, 1000);
        for key in ["applied", "skipped", "conflicts", "errors", "waiting", "transactions"] {
            let sum = total.get(key).and_then(|v| v.as_i64()).unwrap_or(0) + out[key].as_i64().unwrap_or(0);
            total.insert(key.into(), sum.into());
        }
        if !more || out["transactions"].as_i64() == Some(0) {
            break;
        }
    }
    total
}

pub fn have(db: &mut postgres::Client) -> serde_json::Value {
    let text: String = db.query_one("SELECT sync_have()::text", &[]).unwrap().get(0);
    serde_json::from_str(&text).unwrap()
}

pub fn digest(db: &mut postgres::Client, table: &str) -> String {
    db.query_one("SELECT sync_table_digest($1::text::regclass)", &[&table]).unwrap().get(0)
}

/// `n` databases of one cluster acting as nodes (each gets its own node id at CREATE
/// EXTENSION), with `schema` run in each.
pub fn nodes(c: &Cluster, n: usize, schema: &str) -> Vec<postgres::Client> {
    let mut admin = c.connect();
    (0..n)
        .map(|i| {
            let name = format!("node{i}");
            admin.execute(&format!("DROP DATABASE IF EXISTS {name}"), &[]).unwrap();
            admin.execute(&format!("CREATE DATABASE {name}"), &[]).unwrap();
            let mut db = c.connect_db(&name);
            db.batch_execute(schema).unwrap();
            db
        })
        .collect()
}

/// Two distinct nodes of the slice, mutably.
pub fn two(n: &mut [postgres::Client], i: usize, j: usize) -> (&mut postgres::Client, &mut postgres::Client) {
    assert_ne!(i, j);
    if i < j {
        let (l, r) = n.split_at_mut(j);
        (&mut l[i], &mut r[0])
    } else {
        let (l, r) = n.split_at_mut(i);
        (&mut r[0], &mut l[j])
    }
}

/// Every node pulls from every other until a whole round applies nothing (bounded).
pub fn exchange_all(n: &mut [postgres::Client]) {
    for _ in 0..5 {
        let mut moved = 0;
        for from in 0..n.len() {
            for to in 0..n.len() {
                if from != to {
                    let (a, b) = two(n, from, to);
                    moved += pull(a, b)["transactions"].as_i64().unwrap_or(0);
                }
            }
        }
        if moved == 0 {
            return;
        }
    }
}

/// A TCP port that is free on loopback now (for a worker's HTTP server).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `sync_status() -> 'worker'`, or None while the cluster cannot answer (restarting after a
/// crash, say).
pub fn try_worker_status(c: &Cluster) -> Option<serde_json::Value> {
    let mut db = postgres::Client::connect(&c.conn_string("postgres"), postgres::NoTls).ok()?;
    let text: String = db.query_one("SELECT (sync_status() -> 'worker')::text", &[]).ok()?.get(0);
    serde_json::from_str(&text).ok()
}

/// `sync_status() -> 'worker'`.
pub fn worker_status(c: &Cluster) -> serde_json::Value {
    try_worker_status(c).unwrap_or_else(|| panic!("{}: no worker status\n{}", c.name, c.log()))
}

/// Poll `f` every 100 ms until it returns `Some`, for at most `secs` seconds (then panic).
pub fn wait_for<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    for _ in 0..secs * 10 {
        if let Some(v) = f() {
            return v;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("timed out after {secs} s waiting for {what}");
}

/// Three worker nodes on loopback, each with the other two as static peers (`key` their
/// registration key, `extra` more settings) and table `t (id bigint PRIMARY KEY, who text,
/// n int)` tracked; returned once each sees both peers up.
pub fn mesh_of_three(names: [&str; 3], key: &str, extra: &[&str]) -> [Cluster; 3] {
    mesh_of_three_with(
        names,
        key,
        extra,
        "CREATE EXTENSION pg_peersync;
         CREATE TABLE t (id bigint PRIMARY KEY, who text, n int);
         SELECT sync_track_table('t');",
    )
}

/// `mesh_of_three`, each node set up with `setup` (SQL) instead of table `t`.
pub fn mesh_of_three_with(names: [&str; 3], key: &str, extra: &[&str], setup: &str) -> [Cluster; 3] {
    let ports = [free_port(), free_port(), free_port()];
    let nodes = [0, 1, 2].map(|i| {
        let others: Vec<u16> = (0..3).filter(|j| *j != i).map(|j| ports[j]).collect();
        let c = Cluster::start_peer(names[i], key, ports[i], &others, extra);
        c.connect().batch_execute(setup).unwrap();
        c
    });
    for n in &nodes {
        wait_for(60, "every node to see its two peers up", || {
            let s = worker_status(n);
            let up = s["peers"].as_array().map_or(0, |ps| ps.iter().filter(|p| p["state"] == "up").count());
            (up == 2).then_some(())
        });
    }
    nodes
}

/// Equal digests of `tables` and have-vectors, nothing held.
pub fn converged_on(nodes: &[&Cluster], tables: &[&str]) -> Option<()> {
    let state: Vec<(Vec<String>, serde_json::Value, i64)> = nodes
        .iter()
        .map(|c| {
            let mut db = c.connect();
            let inbox: i64 = db.query_one("SELECT count(*) FROM sync_inbox", &[]).unwrap().get(0);
            // (An origin held up to 0 is the same as one not listed: a node that joined under a
            // new identity has written nothing under it yet.)
            let mut held = have(&mut db);
            held.as_object_mut().unwrap().retain(|_, v| v != &serde_json::json!(0));
            (tables.iter().map(|t| digest(&mut db, t)).collect(), held, inbox)
        })
        .collect();
    (state.iter().all(|s| *s == state[0]) && state[0].2 == 0).then_some(())
}

/// The node's id, as `sync_status()` reports it.
pub fn node_id(c: &Cluster) -> String {
    c.connect().query_one("SELECT sync_status() ->> 'node_id'", &[]).unwrap().get(0)
}

/// pgbench on `c`'s `postgres` database: `script` (written into its socket directory) run
/// `per_client` times by each of two clients; panics if pgbench fails.
pub fn pgbench(c: &Cluster, script: &str, per_client: u32) {
    let path = c.socket_dir().join("bench-script.sql");
    std::fs::write(&path, script).unwrap();
    let per_client = per_client.to_string();
    let out = c.run_client(
        "pgbench",
        &["-n", "-c", "2", "-j", "2", "-t", &per_client, "-f", path.to_str().unwrap(), "postgres"],
    );
    assert!(out.status.success(), "pgbench on {}: {}", c.name, String::from_utf8_lossy(&out.stderr));
}

/// Run shell `script` as user postgres (pg_dump, psql and friends); `what` names it in a failure.
pub fn sh_as_postgres(what: &str, script: &str) {
    let mut cmd = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", "sh", "-c", script]);
        c
    } else {
        let mut c = Command::new("sh");
        c.args(["-c", script]);
        c
    };
    check(what, cmd.output().unwrap());
}

/// `pg_dump -t table` of `from`'s `postgres` database piped into `psql` on `to`'s database
/// `db`, as user postgres (the baseline a snapshot copy is measured against), without the
/// table's triggers (pg_peersync's capture, which `db` need not have).
pub fn pg_dump_into(from: &Cluster, table: &str, to: &Cluster, db: &str) {
    let pipe = format!(
        "{PG_BIN}/pg_dump -h {} -p 5432 -U postgres -t {table} postgres | sed '/^CREATE TRIGGER/d' | {PG_BIN}/psql -q -v ON_ERROR_STOP=1 -h {} -p 5432 -U postgres -d {db}",
        from.socket_dir().display(),
        to.socket_dir().display()
    );
    sh_as_postgres("pg_dump | psql", &pipe);
}
