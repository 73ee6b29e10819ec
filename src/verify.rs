//! Checking that this node and a peer hold the same rows, and repairing what differs
//! (`sync_verify`, `sync_repair`).
//!
//! The descent (which buckets to ask for, which rows differ) is `sync_bridge::verify`; here
//! are the SQL that sums up a table's buckets, lists their rows and reads rows' values, on
//! both sides: a peer's worker answers `/v1/verify` with `serve`, and the backend that runs
//! `sync_verify` computes its own side with the same function and asks the peer directly over
//! HTTP (signed and sealed like every message between nodes).
//!
//! A row's key is its `sync_rows.pk` text, its bucket path the md5 (hex) of its key columns
//! as a row's text, and its hash the first 64 bits of the md5 of its captured columns as a
//! row's text, in name order. Tables change while they are compared: rows found to differ
//! are read again on both sides until both nodes held the same changes over two reads in a
//! row ("settled", `sync_bridge::verify::Settle`) or `SETTLE` has passed, so that a change
//! still in flight is not reported as a divergence.

use crate::apply::quote_ident;
use crate::changes::have_vector;
use crate::clock;
use crate::error::{SyncError, SyncResult};
use crate::snapshot::{Copied, copied_tables, key_text};
use pgrx::prelude::*;
use pgrx::{JsonB, PgRelation};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use sync_bridge::transport::{CallError, Client, Traffic};
use sync_bridge::verify::{self, Answer, Ask, Kind};
use uuid::Uuid;

/// Rows per table whose values a report shows, and per request when they are read.
const LISTED: usize = 1_000;
/// How long rows found to differ are read again while the two nodes' have-vectors differ.
const SETTLE: Duration = Duration::from_secs(10);
const SETTLE_STEP: Duration = Duration::from_millis(250);
/// How long the peer may take to answer one question (a bucket pass scans its table).
const PEER_TIMEOUT: Duration = Duration::from_secs(300);

// ---------------------------------------------------------------------------------------------
// Both sides: one table's buckets, rows and values

/// Answer one question about a tracked table (the worker, for a peer; the backend, for itself),
/// hashing values as every node prints them.
pub fn serve(ask: &Ask) -> Result<String, SyncError> {
    crate::gucs::printing_alike(|| answer(ask))
}

fn answer(ask: &Ask) -> Result<String, SyncError> {
    let ext = clock::ext();
    let table = copied_tables(&ext.schema)?
        .into_iter()
        .find(|c| c.table.name == ask.table())
        .ok_or_else(|| SyncError::NotTracked(ask.table().to_string()))?;
    let have = serde_json::to_string(&have_vector()?).expect("a vector serialises");
    let (field, text) = match ask {
        Ask::Buckets { depth, under, .. } => ("buckets", buckets(&table, *depth, under)?),
        Ask::Rows { under, .. } => ("rows", rows(&table, under)?),
        Ask::Values { keys, .. } => ("values", values(&table, keys)?),
    };
    Ok(format!("{{\"have\": {have}, \"{field}\": {text}}}"))
}

fn local(ask: &Ask) -> Result<Answer, SyncError> {
    let text = serve(ask)?;
    Ok(serde_json::from_str(&text).expect("this node's answer parses"))
}

/// The table's rows as `(k, h, c)`: key (`sync_rows.pk` text), bucket path (md5 of the key
/// columns as a row, in key order), and captured columns as a row's text, in name order (so a
/// column added on two nodes in another order hashes alike). Row text is about twice as fast
/// to make and hash as `jsonb`.
fn source(c: &Copied) -> String {
    let filter = c.filter.as_ref().map(|f| format!(" WHERE ({f})")).unwrap_or_default();
    let keys: Vec<String> = c.table.pk.iter().map(|k| format!("x.{}", quote_ident(k))).collect();
    let mut names: Vec<&String> = c.columns.iter().map(|(n, _)| n).collect();
    names.sort();
    let cols: Vec<String> = names.iter().map(|n| format!("x.{}", quote_ident(n))).collect();
    format!(
        "SELECT {key} AS k, md5(ROW({keys})::text) AS h, ROW({cols})::text AS c FROM {table} x{filter}",
        key = key_text(&c.table, "x"),
        keys = keys.join(", "),
        cols = cols.join(", "),
        table = c.table.name
    )
}

/// All prefixes of `under` have one length (they are buckets of one depth).
fn prefix_len(under: &[String]) -> usize {
    under.first().map_or(0, String::len)
}

fn buckets(c: &Copied, depth: usize, under: &[String]) -> Result<String, SyncError> {
    let sql = format!(
        "SELECT coalesce(json_object_agg(b, json_build_object('n', n, 'x', x)), '{{}}')::text FROM ( \
           SELECT left(h, {depth}) AS b, count(*) AS n, bit_xor(('x' || left(md5(c), 16))::bit(64)::bigint) AS x \
             FROM ({src}) r WHERE left(h, {plen}) = ANY($2::text[]) GROUP BY 1) g",
        src = source(c),
        plen = prefix_len(under),
    );
    run(&sql, c, under)
}

fn rows(c: &Copied, under: &[String]) -> Result<String, SyncError> {
    let sql = format!(
        "SELECT coalesce(json_object_agg(k, left(md5(c), 16)), '{{}}')::text \
           FROM ({src}) r WHERE left(h, {plen}) = ANY($2::text[])",
        src = source(c),
        plen = prefix_len(under),
    );
    run(&sql, c, under)
}

/// The rows with these keys, found through the key columns (so by the primary key's index).
fn values(c: &Copied, keys: &[String]) -> Result<String, SyncError> {
    let pk = &c.table.pk;
    let typed: Vec<String> = pk
        .iter()
        .map(|k| {
            let ty = c.columns.iter().find(|(n, _)| n == k).map_or("text", |(_, ty)| ty.as_str());
            format!("(t::jsonb ->> {})::{ty}", crate::capture::sql::quote_literal(k))
        })
        .collect();
    let cols: Vec<String> = pk.iter().map(|k| format!("x.{}", quote_ident(k))).collect();
    let filter = c.filter.as_ref().map(|f| format!(" AND ({f})")).unwrap_or_default();
    let sql = format!(
        "SELECT coalesce(json_object_agg({key}, to_jsonb(x.*) - $1::text[]), '{{}}')::text FROM {table} x \
          WHERE ({cols}) IN (SELECT {typed} FROM unnest($2::text[]) u(t)){filter}",
        key = key_text(&c.table, "x"),
        table = c.table.name,
        cols = cols.join(", "),
        typed = typed.join(", "),
    );
    run(&sql, c, keys)
}

fn run(sql: &str, c: &Copied, list: &[String]) -> Result<String, SyncError> {
    let args = [c.table.exclude.clone().into(), list.to_vec().into()];
    Ok(Spi::get_one_with_args::<String>(sql, &args)?.unwrap_or_else(|| "{}".into()))
}

// ---------------------------------------------------------------------------------------------
// The backend's side: the peer over HTTP

/// A peer this backend asks directly, with what the questions cost.
struct Peer {
    id: Uuid,
    addr: SocketAddr,
    client: Arc<Client>,
    /// One thread, signals blocked: it talks to the peer while this backend reads its own table.
    runtime: tokio::runtime::Runtime,
    traffic: Traffic,
    round_trips: u32,
}

impl Peer {
    /// The peer's address as this node's worker knows it, and the keys from the registration key.
    fn find(id: Uuid) -> Result<Peer, SyncError> {
        let status = crate::worker::status();
        let known = status["peers"].as_array().into_iter().flatten().find(|p| p["id"] == json!(id.to_string()));
        let addr = known
            .and_then(|p| p["address"].as_str())
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| SyncError::PeerNotFound(id.to_string()))?;
        let key = crate::gucs::registration_key().map_err(SyncError::NoKey)?;
        let keys = sync_bridge::auth::Keys::derive(&key).map_err(|e| SyncError::NoKey(e.to_string()))?;
        let runtime =
            crate::worker::net::runtime(1).map_err(|e| SyncError::PeerUnreachable(id.to_string(), e.to_string()))?;
        let client = Arc::new(Client::new(keys, PEER_TIMEOUT));
        Ok(Peer { id, addr, client, runtime, traffic: Traffic::default(), round_trips: 0 })
    }

    /// Send the question; the answer is awaited by `answer`.
    fn send(&self, ask: &Ask) -> tokio::task::JoinHandle<Result<(String, Traffic), CallError>> {
        let (client, addr, question) = (self.client.clone(), self.addr, ask.clone());
        self.runtime.spawn(async move { client.verify(addr, &question).await })
    }

    /// Wait for the peer's answer in short slices; a query cancel (or statement timeout) stops
    /// the wait (the call then finishes on its own; the runtime goes with `self`).
    fn answer(
        &mut self,
        mut call: tokio::task::JoinHandle<Result<(String, Traffic), CallError>>,
    ) -> Result<Answer, SyncError> {
        let answered = loop {
            let slice = async { tokio::time::timeout(Duration::from_millis(100), &mut call).await };
            if let Ok(r) = self.runtime.block_on(slice) {
                break r;
            }
            pgrx::check_for_interrupts!();
        };
        let unreachable = |e: String| SyncError::PeerUnreachable(self.id.to_string(), e);
        let (text, t) = answered.map_err(|e| unreachable(e.to_string()))?.map_err(|e| unreachable(e.to_string()))?;
        self.traffic.sent += t.sent;
        self.traffic.received += t.received;
        self.round_trips += 1;
        serde_json::from_str(&text).map_err(|e| unreachable(e.to_string()))
    }

    /// Ask the peer and this node at once: the peer computes its answer while this backend
    /// computes its own.
    fn both(&mut self, ask: &Ask) -> Result<(Answer, Answer), SyncError> {
        let call = self.send(ask);
        let here = local(ask);
        let there = self.answer(call)?;
        Ok((here?, there))
    }

    fn ask(&mut self, ask: &Ask) -> Result<Answer, SyncError> {
        let call = self.send(ask);
        self.answer(call)
    }
}

/// One table compared.
struct Compared {
    rows_here: i64,
    rows_there: i64,
    /// Every row that differs (after reading the listed ones again).
    differing: BTreeMap<String, Kind>,
    /// The listed rows' values here and at the peer.
    here: BTreeMap<String, Value>,
    there: BTreeMap<String, Value>,
    settled: bool,
}

fn compare(peer: &mut Peer, c: &Copied) -> Result<Compared, SyncError> {
    let estimate = Spi::get_one_with_args::<i64>(
        "SELECT greatest(reltuples, 0)::bigint FROM pg_class WHERE oid = $1",
        &[c.table.relid.into()],
    )?
    .unwrap_or(0);
    let mut settled = true;
    let out = verify::descend(&c.table.name, estimate, |ask| {
        let (h, t) = peer.both(ask)?;
        settled = verify::same_holdings(&h.have, &t.have);
        Ok::<_, SyncError>((h, t))
    })?;
    let mut differing = out.differing;
    let listed: Vec<String> = differing.keys().take(LISTED).cloned().collect();
    let (mut here, mut there) = (BTreeMap::new(), BTreeMap::new());
    if !listed.is_empty() {
        // Read the listed rows again until both nodes hold the same changes. When they are
        // settled, the previous round's rows are the ones known to have been read quietly.
        let started = Instant::now();
        let mut settle = verify::Settle::default();
        let mut previous = None;
        let last = loop {
            let (h, t) = peer.both(&Ask::Values { table: c.table.name.clone(), keys: listed.clone() })?;
            settled = settle.round(&h.have, &t.have);
            let round = (verify::differing_values(listed.iter().cloned(), &h.values, &t.values), h.values, t.values);
            if settled {
                break previous.unwrap_or(round);
            }
            if round.0.is_empty() || started.elapsed() >= SETTLE {
                break round;
            }
            previous = Some(round);
            std::thread::sleep(SETTLE_STEP);
            pgrx::check_for_interrupts!();
        };
        for k in &listed {
            differing.remove(k);
        }
        differing.extend(last.0);
        (here, there) = (last.1, last.2);
    }
    Ok(Compared { rows_here: out.rows_here, rows_there: out.rows_there, differing, here, there, settled })
}

/// The tables to compare: `tbl`, or every tracked table; the caller must hold `privilege` on them.
fn chosen(tbl: Option<&PgRelation>, privilege: &str) -> Result<Vec<Copied>, SyncError> {
    let allowed = |relid: pg_sys::Oid, name: &str| -> Result<(), SyncError> {
        let ok =
            Spi::get_one_with_args::<bool>("SELECT has_table_privilege($1, $2)", &[relid.into(), privilege.into()])?;
        match ok {
            Some(true) => Ok(()),
            _ => Err(SyncError::NotAllowedOn(name.to_string(), privilege.to_string())),
        }
    };
    if let Some(t) = tbl {
        allowed(t.oid(), &crate::capture::display_name(t.oid())?)?;
    }
    let all = copied_tables(&clock::ext().schema)?;
    let chosen: Vec<Copied> = match tbl {
        Some(t) => {
            let name = crate::capture::display_name(t.oid())?;
            vec![all.into_iter().find(|c| c.table.relid == t.oid()).ok_or(SyncError::NotTracked(name))?]
        }
        None => all,
    };
    for c in &chosen {
        allowed(c.table.relid, &c.table.name)?;
    }
    Ok(chosen)
}

fn key_json(k: &str) -> Value {
    serde_json::from_str(k).unwrap_or_else(|_| json!(k))
}

fn table_report(c: &Copied, r: &Compared) -> Value {
    let rows: Vec<Value> = r
        .differing
        .iter()
        .filter(|(k, _)| r.here.contains_key(*k) || r.there.contains_key(*k))
        .map(|(k, kind)| json!({"key": key_json(k), "kind": kind, "here": r.here.get(k), "there": r.there.get(k)}))
        .collect();
    json!({
        "table": c.table.name,
        "rows_here": r.rows_here,
        "rows_there": r.rows_there,
        "agree": r.differing.is_empty(),
        "differing": r.differing.len(),
        "rows": rows,
    })
}

fn report(peer: &Peer, tables: Vec<Value>, settled: bool) -> Value {
    let agree = tables.iter().all(|t| t["agree"] == json!(true));
    let mut out = json!({
        "peer": peer.id.to_string(),
        "agree": agree,
        "settled": settled,
        "tables": tables,
        "round_trips": peer.round_trips,
        "bytes_sent": peer.traffic.sent,
        "bytes_received": peer.traffic.received,
    });
    if !agree {
        out["hint"] = json!(if settled {
            "Both nodes hold the same changes, so these rows diverged (written with triggers off, or \
             restored from different backups): SELECT sync_repair(peer, table) makes this node's rows the \
             peer's, as ordinary changes every node receives."
        } else {
            "Changes were still arriving on one of the nodes: run it again when writes pause, or wait \
             until sync_status() shows nothing left to exchange."
        });
    }
    out
}

/// Compare a tracked table (or every tracked table) with the peer's copy of it: the rows that
/// differ, found by comparing range digests, with both sides' values for up to 1,000 rows per
/// table.
#[pg_extern]
fn sync_verify(peer: pgrx::Uuid, tbl: default!(Option<PgRelation>, "NULL")) -> SyncResult<JsonB> {
    let chosen = chosen(tbl.as_ref(), "SELECT")?;
    let mut p = Peer::find(Uuid::from_bytes(*peer.as_bytes()))?;
    let mut settled = true;
    let mut tables = Vec::new();
    for c in chosen {
        let r = compare(&mut p, &c)?;
        settled &= r.settled;
        tables.push(table_report(&c, &r));
    }
    Ok(JsonB(report(&p, tables, settled)))
}

// ---------------------------------------------------------------------------------------------
// Repair

/// Write the peer's version of these rows here as ordinary changes (captured, so every node
/// receives them and they win as the newest): present rows upserted, absent ones deleted.
fn write_peers_rows(c: &Copied, keys: &[String], there: &BTreeMap<String, Value>) -> Result<usize, SyncError> {
    let t = &c.table;
    let written: Vec<&String> = c.columns.iter().map(|(n, _)| n).collect();
    let list: Vec<String> = written.iter().map(|n| quote_ident(n)).collect();
    let pk: Vec<String> = t.pk.iter().map(|k| quote_ident(k)).collect();
    let set: Vec<String> = written
        .iter()
        .filter(|n| !t.pk.contains(n) && !t.identity_always.contains(**n))
        .map(|n| format!("{0} = EXCLUDED.{0}", quote_ident(n)))
        .collect();
    let action = if set.is_empty() { "NOTHING".to_string() } else { format!("UPDATE SET {}", set.join(", ")) };
    let (present, absent): (Vec<&String>, Vec<&String>) = keys.iter().partition(|k| there.contains_key(*k));
    if !present.is_empty() {
        let rows: Vec<&Value> = present.iter().filter_map(|k| there.get(*k)).collect();
        Spi::run_with_args(
            &format!(
                "INSERT INTO {table} ({list}) OVERRIDING SYSTEM VALUE \
                 SELECT {list} FROM jsonb_populate_recordset(NULL::{table}, $1::jsonb) \
                 ON CONFLICT ({pk}) DO {action}",
                table = t.name,
                list = list.join(", "),
                pk = pk.join(", "),
            ),
            &[serde_json::to_string(&rows).expect("rows serialise").into()],
        )?;
    }
    if !absent.is_empty() {
        let keys: Vec<String> = absent.into_iter().cloned().collect();
        Spi::run_with_args(
            &format!(
                "DELETE FROM {table} WHERE ({pk}) IN \
                   (SELECT {pk} FROM jsonb_populate_recordset(NULL::{table}, $1::jsonb))",
                table = t.name,
                pk = pk.join(", "),
            ),
            &[format!("[{}]", keys.join(", ")).into()],
        )?;
    }
    Ok(keys.len())
}

/// Make this node's rows of a tracked table (or of every tracked table) the peer's where they
/// differ, as ordinary changes that every node receives. Run it on the other node to keep this
/// node's rows instead.
#[pg_extern]
fn sync_repair(peer: pgrx::Uuid, tbl: default!(Option<PgRelation>, "NULL")) -> SyncResult<JsonB> {
    let chosen = chosen(tbl.as_ref(), "SELECT, INSERT, UPDATE, DELETE")?;
    let mut p = Peer::find(Uuid::from_bytes(*peer.as_bytes()))?;
    let mut settled = true;
    let mut tables = Vec::new();
    for c in chosen {
        if !c.table.counters.is_empty() {
            return Err(SyncError::RepairCounters(c.table.name.clone()).into());
        }
        let r = compare(&mut p, &c)?;
        settled &= r.settled;
        let mut report = table_report(&c, &r);
        if !r.settled {
            // A row still in flight would be overwritten by the peer's older version.
            report["repaired"] = json!(0);
            tables.push(report);
            continue;
        }
        let mut repaired = 0;
        let keys: Vec<String> = r.differing.keys().cloned().collect();
        for chunk in keys.chunks(LISTED) {
            // The peer's values as they are now (the listed ones were read last round already).
            let there = if chunk.iter().all(|k| r.here.contains_key(k) || r.there.contains_key(k)) {
                r.there.clone()
            } else {
                p.ask(&Ask::Values { table: c.table.name.clone(), keys: chunk.to_vec() })?.values
            };
            repaired += write_peers_rows(&c, chunk, &there)?;
        }
        report["repaired"] = json!(repaired);
        tables.push(report);
    }
    Ok(JsonB(report(&p, tables, settled)))
}
