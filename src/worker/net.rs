//! The worker's networking: a tokio runtime on its own threads runs the HTTP server, multicast
//! discovery (`sync_bridge::discovery`) and one puller per known peer, static or announced.
//! They never touch PostgreSQL: what needs the database they ask through a channel, and the
//! worker's main thread answers on each tick with SPI.

use serde::Serialize;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};
use sync_bridge::auth::{Announcement, Keys};
use sync_bridge::discovery::{self, DiscoveryStatus, Doubt, Exchanged, Identity, Observed, Roster};
use sync_bridge::transport::{self, Client, Counters, Node, NodeFuture, now_ms};
use tokio::sync::{Notify, oneshot, watch};
use uuid::Uuid;

/// The main thread's answer: JSON text.
pub type Reply = oneshot::Sender<Result<String, String>>;

/// A question for the main thread. Batches stay JSON text all the way from one node's
/// `sync_changes` to the other's apply: never parsed whole in between.
pub enum Ask {
    /// What to send a peer in a pull (`apply::pull_request`); with the peer's have-vector after
    /// a pull that applied nothing.
    Pull(Option<BTreeMap<Uuid, i64>>, Reply),
    Status(Reply),
    Changes(Value, Reply),
    Apply(String, Reply),
    /// A peer's question about this node's snapshot (`snapshot::serve`).
    Snapshot(sync_bridge::snapshot::Ask, Reply),
    /// A step of this node's join from a peer's snapshot.
    Join(JoinStep, Reply),
    /// A peer's question comparing one of this node's tables with its own (`verify::serve`).
    Verify(sync_bridge::verify::Ask, Reply),
}

/// The steps of a join (`crate::snapshot`), each in a transaction of its own.
pub enum JoinStep {
    /// Begin from the peer's manifest; `rejoin`: the peer no longer keeps what this node lacks.
    Begin {
        manifest: String,
        name: String,
        rejoin: bool,
    },
    Load {
        table: sync_bridge::snapshot::TableInfo,
        tombstones: bool,
        /// Rows in the page (the puller read its head).
        n: i64,
        page: String,
    },
    Finish(String),
}

/// What a puller reads of a batch: everything but the events, which it only counts.
#[derive(serde::Deserialize)]
struct Head {
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    gone: BTreeMap<String, i64>,
    #[serde(default)]
    more: bool,
    #[serde(default)]
    have: BTreeMap<String, i64>,
    #[serde(default)]
    node_have: BTreeMap<String, i64>,
    events: Vec<serde::de::IgnoredAny>,
    /// Pairs of transactions under one number the peer met (`Batch::twins`): applied even
    /// without events, so that a node they name learns of them.
    #[serde(default)]
    twins: Vec<Value>,
}

/// One exchange with a peer, for `sync_sessions`.
#[derive(Clone, Debug, Serialize)]
pub struct Session {
    pub peer: String,
    pub peer_id: Option<String>,
    pub address: Option<String>,
    pub direction: &'static str,
    pub started_ms: u64,
    pub duration_ms: u64,
    pub events_in: u64,
    pub events_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub error: Option<String>,
    /// The peer's have-vector after a pull (kept in `sync_peers`, for `retention`).
    pub have: Option<BTreeMap<String, i64>>,
}

/// What the network threads and the main thread share.
struct Shared {
    tx: Mutex<mpsc::Sender<Ask>>,
    client: Client,
    roster: Mutex<Roster>,
    /// Per peer key: how to wake its puller (a poke, or a fresh announcement).
    wakes: Mutex<BTreeMap<String, Arc<Notify>>>,
    sessions: Mutex<Vec<Session>>,
    /// Pokes under way, by peer address: true when another commit came meanwhile.
    pokes: Mutex<BTreeMap<SocketAddr, bool>>,
    discovery: Arc<Mutex<DiscoveryStatus>>,
    interval: Duration,
    stop: watch::Receiver<bool>,
}

async fn ask(tx: &Mutex<mpsc::Sender<Ask>>, make: impl FnOnce(Reply) -> Ask) -> Result<String, String> {
    let (reply, answer) = oneshot::channel();
    tx.lock().expect("channel lock").send(make(reply)).map_err(|_| "the worker is stopping".to_string())?;
    wake_main_thread();
    answer.await.map_err(|_| "the worker is stopping".to_string())?
}

/// Wake the worker's latch now rather than at its next tick. No PostgreSQL function may be
/// called from these threads, but a signal may be sent: SIGUSR1 is blocked here, so the
/// kernel delivers it to the main thread, whose handler (procsignal_sigusr1_handler) sets
/// the latch.
fn wake_main_thread() {
    // SAFETY: kill(2) on our own process; no memory is shared with the handler.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGUSR1);
    }
}

/// The server's view of this node.
struct Bridge(Arc<Shared>);

impl Node for Bridge {
    fn changes(&self, have: Value) -> NodeFuture {
        let shared = self.0.clone();
        Box::pin(async move { ask(&shared.tx, |r| Ask::Changes(have, r)).await })
    }

    fn push(&self, batch: String) -> NodeFuture {
        let shared = self.0.clone();
        Box::pin(async move { ask(&shared.tx, |r| Ask::Apply(batch, r)).await })
    }

    fn status(&self) -> NodeFuture {
        let shared = self.0.clone();
        Box::pin(async move { ask(&shared.tx, Ask::Status).await })
    }

    fn snapshot(&self, q: sync_bridge::snapshot::Ask) -> NodeFuture {
        let shared = self.0.clone();
        Box::pin(async move { ask(&shared.tx, |r| Ask::Snapshot(q, r)).await })
    }

    fn verify(&self, q: sync_bridge::verify::Ask) -> NodeFuture {
        let shared = self.0.clone();
        Box::pin(async move { ask(&shared.tx, |r| Ask::Verify(q, r)).await })
    }

    fn poke(&self, from: SocketAddr) {
        let key = self.0.roster.lock().expect("roster").by_address(from).map(|p| p.key.clone());
        if let Some(notify) = key.and_then(|k| self.0.wakes.lock().expect("wakes").get(&k).cloned()) {
            notify.notify_one();
        }
    }
}

/// What `Net::start` needs, read from the settings by the main thread.
pub struct Settings {
    pub keys: Keys,
    pub listen: Vec<String>,
    pub port: u16,
    pub peers: Vec<String>,
    pub interval: Duration,
    /// None when `peersync.multicast_group` is empty.
    pub multicast: Option<(std::net::Ipv4Addr, u16, Duration)>,
    pub identity: Identity,
}

pub struct Net {
    /// The identity it announces and pulls as.
    pub node_id: Uuid,
    runtime: tokio::runtime::Runtime,
    shared: Arc<Shared>,
    port: u16,
    asks: mpsc::Receiver<Ask>,
    shutdown: watch::Sender<bool>,
    pub listen: Vec<SocketAddr>,
    counters: Vec<Arc<Mutex<Counters>>>,
    multicast: bool,
}

/// Build a runtime of `threads` threads with every signal blocked in them: PostgreSQL's
/// handlers must run on the main thread only.
pub(crate) fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    // SAFETY: plain libc signal-mask calls on the current thread; the mask is restored below.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old);
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build();
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        rt
    }
}

/// Parse `peersync.listen_addresses` (`*` means every IPv4 address).
fn listen_ips(listen: &[String]) -> Result<Vec<IpAddr>, String> {
    listen
        .iter()
        .map(|a| match a.as_str() {
            "*" => Ok(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)),
            a => a.parse().map_err(|_| format!("peersync.listen_addresses: \"{a}\" is not an IP address")),
        })
        .collect()
}

impl Net {
    pub fn start(s: Settings) -> Result<Net, String> {
        let runtime = runtime(2).map_err(|e| format!("cannot start the network runtime: {e}"))?;
        let ips = listen_ips(&s.listen)?;
        if ips.is_empty() {
            return Err("peersync.listen_addresses is empty".into());
        }
        let mut listeners = Vec::new();
        for ip in &ips {
            let addr = SocketAddr::new(*ip, s.port);
            let l = runtime
                .block_on(tokio::net::TcpListener::bind(addr))
                .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
            listeners.push((addr, l));
        }
        let (tx, asks) = mpsc::channel();
        let (shutdown, stop) = watch::channel(false);
        let node_id = s.identity.node_id;
        let mut roster = Roster::new(node_id);
        for p in &s.peers {
            // Resolved again before each exchange; this is only for matching pokes early.
            roster.add_static(p, p.to_socket_addrs().ok().and_then(|mut a| a.next()));
        }
        let shared = Arc::new(Shared {
            tx: Mutex::new(tx),
            client: Client::new(s.keys.clone(), Duration::from_secs(30)),
            roster: Mutex::new(roster),
            wakes: Mutex::new(BTreeMap::new()),
            sessions: Mutex::new(Vec::new()),
            pokes: Mutex::new(BTreeMap::new()),
            discovery: Arc::new(Mutex::new(DiscoveryStatus::default())),
            interval: s.interval,
            stop: stop.clone(),
        });
        let mut counters = Vec::new();
        let mut listen = Vec::new();
        for (addr, l) in listeners {
            let (c, serve) = transport::serve(l, s.keys.clone(), Arc::new(Bridge(shared.clone())), stop.clone());
            runtime.spawn(serve);
            counters.push(c);
            listen.push(addr);
        }
        for p in &s.peers {
            spawn_puller(&runtime.handle().clone(), &shared, p.clone());
        }
        if let Some((group, port, every)) = s.multicast {
            let cfg = discovery::Config { group, port, interval: every, listen: ips };
            let (found_tx, found) = tokio::sync::mpsc::unbounded_channel();
            runtime.spawn(discovery::run(cfg, s.identity, s.keys, shared.discovery.clone(), found_tx, stop.clone()));
            runtime.spawn(admit(shared.clone(), found, runtime.handle().clone()));
        }
        Ok(Net {
            node_id,
            runtime,
            shared,
            port: s.port,
            asks,
            shutdown,
            listen,
            counters,
            multicast: s.multicast.is_some(),
        })
    }

    /// Tell every peer with a known address that this node has new changes (they pull at once).
    ///
    /// Peers whose last exchange failed are skipped (they pull by themselves when they come
    /// back), and at most one poke per peer is in flight: commits meanwhile are folded into
    /// one more poke after it, so a busy node does not pile up requests.
    pub fn poke_peers(&self) {
        let addrs: Vec<SocketAddr> = self
            .shared
            .roster
            .lock()
            .expect("roster")
            .peers()
            .filter(|p| p.last_error.is_none())
            .filter_map(|p| p.address)
            .collect();
        for peer in addrs {
            let mut pokes = self.shared.pokes.lock().expect("pokes");
            match pokes.get_mut(&peer) {
                Some(again) => *again = true,
                None => {
                    pokes.insert(peer, false);
                    self.runtime.spawn(poke(self.shared.clone(), peer, self.port));
                }
            }
        }
    }

    /// The questions asked since the last tick.
    pub fn asks(&self) -> Vec<Ask> {
        self.asks.try_iter().collect()
    }

    /// The exchanges finished since the last call.
    pub fn sessions(&self) -> Vec<Session> {
        std::mem::take(&mut *self.shared.sessions.lock().expect("sessions"))
    }

    /// The networking part of `sync_status()`.
    pub fn status(&self, own_schema: &str, peer_timeout: Duration) -> Value {
        let now = now_ms();
        let mut requests = 0;
        let mut rejected: BTreeMap<&str, u64> = BTreeMap::new();
        for c in &self.counters {
            let c = c.lock().expect("counters");
            requests += c.requests;
            for (r, n) in &c.rejected {
                *rejected.entry(r).or_default() += n;
            }
        }
        let peers: Vec<Value> = self
            .shared
            .roster
            .lock()
            .expect("roster")
            .peers()
            .map(|p| {
                json!({
                    "id": p.node_id.map(|u| u.to_string()),
                    "name": p.name,
                    "address": p.address.map(|a| a.to_string()).unwrap_or_else(|| p.key.clone()),
                    "found_by": p.found_by,
                    "state": p.state(now, peer_timeout),
                    "last_seen_s_ago": p.last_heard_ms.map(|t| now.saturating_sub(t) / 1000),
                    "last_sync_s_ago": p.last_ok_ms.map(|t| now.saturating_sub(t) / 1000),
                    "it_lacks": p.it_lacks,
                    "we_lack": p.we_lack,
                    "lag_s": p.lag_s(now),
                    "last_error": p.last_error,
                    "schema_matches": p.schema.as_ref().map(|s| s == own_schema),
                    "pulls": p.pulls,
                    "events_received": p.events_received,
                    "stall": p.stall.as_ref().map(|st| json!({
                        "since_s_ago": now.saturating_sub(st.since_ms) / 1000,
                        "missing": st.missing,
                        "hint": "batches from this peer bring only transactions that wait for the events \
                                 listed (origin: number); this node now asks for those first",
                    })),
                })
            })
            .collect();
        let discovery = if self.multicast {
            serde_json::to_value(&*self.shared.discovery.lock().expect("discovery")).unwrap_or(Value::Null)
        } else {
            json!("off: peersync.multicast_group is empty")
        };
        let identity = self.identity_doubt().map(|d| {
            let mut v = serde_json::to_value(&d).unwrap_or(Value::Null);
            v["hint"] = json!(d.hint());
            v
        });
        json!({
            "identity": identity,
            "listening": self.listen.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            "requests": requests,
            "rejected": rejected,
            "discovery": discovery,
            "peers": peers,
        })
    }

    /// The first sign, if any, that another node uses this node's identity.
    /// Drop from the roster the announced peers that are down and not in `kept` (see
    /// `Roster::drop_forgotten`); their pullers stop. Returns their keys.
    pub fn drop_forgotten(&self, kept: &std::collections::BTreeSet<Uuid>, peer_timeout: Duration) -> Vec<String> {
        let gone = self.shared.roster.lock().expect("roster").drop_forgotten(kept, now_ms(), peer_timeout);
        let mut wakes = self.shared.wakes.lock().expect("wakes");
        for key in &gone {
            if let Some(w) = wakes.remove(key) {
                w.notify_one();
            }
        }
        gone
    }

    pub fn identity_doubt(&self) -> Option<Doubt> {
        let seen = self.shared.roster.lock().expect("roster").doubt().cloned();
        seen.or_else(|| self.shared.discovery.lock().expect("discovery").twin.clone())
    }

    pub fn stop(self) {
        let _ = self.shutdown.send(true);
        self.runtime.shutdown_timeout(Duration::from_secs(5));
    }
}

/// Poke `peer` until no commit came while the last poke was under way. Best effort: a peer
/// that misses one pulls at its next interval anyway.
async fn poke(shared: Arc<Shared>, peer: SocketAddr, port: u16) {
    loop {
        let _ = shared.client.poke(peer, port).await;
        let mut pokes = shared.pokes.lock().expect("pokes");
        if pokes.get(&peer) == Some(&true) {
            pokes.insert(peer, false);
        } else {
            pokes.remove(&peer);
            return;
        }
    }
}

/// Add announced peers to the roster; a new one gets a puller, a known one a nudge when it
/// was not up (it may have come back).
async fn admit(
    shared: Arc<Shared>,
    mut found: tokio::sync::mpsc::UnboundedReceiver<(Announcement, IpAddr)>,
    handle: tokio::runtime::Handle,
) {
    while let Some((a, from)) = found.recv().await {
        let observed = shared.roster.lock().expect("roster").observe(&a, from, now_ms());
        match observed {
            Observed::New(key) => spawn_puller(&handle, &shared, key),
            Observed::Known(key) => {
                let failing = shared.roster.lock().expect("roster").get(&key).is_some_and(|p| p.last_error.is_some());
                if failing && let Some(n) = shared.wakes.lock().expect("wakes").get(&key) {
                    n.notify_one();
                }
            }
            Observed::Own => {}
        }
    }
}

fn spawn_puller(handle: &tokio::runtime::Handle, shared: &Arc<Shared>, key: String) {
    let wake = Arc::new(Notify::new());
    shared.wakes.lock().expect("wakes").insert(key.clone(), wake.clone());
    handle.spawn(Puller { key, shared: shared.clone(), wake, stalled: None, twins_applied: None }.run());
}

struct Puller {
    key: String,
    shared: Arc<Shared>,
    /// Notified when the peer says it has new changes.
    wake: Arc<Notify>,
    /// The peer's have-vector when its last batch applied nothing: the next pull asks only for
    /// what the waiting transactions miss (`delivery::ask_for`).
    stalled: Option<BTreeMap<Uuid, i64>>,
    /// The peer's pairs (`Head::twins`) last applied from a batch without events: the same
    /// list is not applied again at every pull.
    twins_applied: Option<String>,
}

impl Puller {
    async fn run(mut self) {
        let mut stop = self.shared.stop.clone();
        // After a failure, try again soon, backing off up to a minute (or the interval).
        let mut backoff = Duration::from_secs(1);
        loop {
            if self.shared.roster.lock().expect("roster").get(&self.key).is_none() {
                return; // forgotten
            }
            let outcome = self.exchange().await;
            let wait = if outcome.is_ok() {
                backoff = Duration::from_secs(1);
                self.shared.interval
            } else {
                let w = backoff.min(self.shared.interval);
                backoff = (backoff * 2).min(Duration::from_secs(60));
                w
            };
            self.shared.roster.lock().expect("roster").exchanged(&self.key, outcome, now_ms());
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.wake.notified() => {}
                _ = stop.changed() => return,
            }
        }
    }

    /// Where the peer is now: a configured peer is resolved again (its DNS may change), an
    /// announced one is where it last announced.
    fn address(&self) -> Result<(SocketAddr, Option<String>), String> {
        let mut roster = self.shared.roster.lock().expect("roster");
        let p = roster.get(&self.key).ok_or("peer forgotten")?;
        let id = p.node_id.map(|u| u.to_string());
        if p.found_by == discovery::FoundBy::Multicast {
            return p.address.map(|a| (a, id)).ok_or_else(|| "no address".into());
        }
        drop(roster);
        let addr = self
            .key
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve {}: {e}", self.key))?
            .next()
            .ok_or_else(|| format!("{} resolves to no address", self.key))?;
        roster = self.shared.roster.lock().expect("roster");
        roster.add_resolved(&self.key, addr);
        Ok((addr, id))
    }

    /// Pull until the peer has nothing more for us (bounded); recorded in `sync_sessions`.
    async fn exchange(&mut self) -> Result<Exchanged, String> {
        let started = (now_ms(), Instant::now());
        let target = self.address();
        // Shown by name when the peer announced one, else as configured.
        let name = self.shared.roster.lock().expect("roster").get(&self.key).and_then(|p| p.name.clone());
        let mut session = Session {
            peer: name.unwrap_or_else(|| self.key.clone()),
            peer_id: target.as_ref().ok().and_then(|t| t.1.clone()),
            address: target.as_ref().ok().map(|t| t.0.to_string()),
            direction: "pull",
            started_ms: started.0,
            duration_ms: 0,
            events_in: 0,
            events_out: 0,
            bytes_in: 0,
            bytes_out: 0,
            error: None,
            have: None,
        };
        let result = match target {
            Ok((addr, _)) => self.pull_all(addr, &mut session).await,
            Err(e) => Err(e),
        };
        session.duration_ms = started.1.elapsed().as_millis() as u64;
        session.error = result.as_ref().err().cloned();
        self.shared.sessions.lock().expect("sessions").push(session);
        result
    }

    async fn pull_all(&mut self, addr: SocketAddr, session: &mut Session) -> Result<Exchanged, String> {
        let mut x = Exchanged::default();
        for _ in 0..1000 {
            let stalled = self.stalled.clone();
            let request = ask(&self.shared.tx, |r| Ask::Pull(stalled, r)).await?;
            let request: Value = serde_json::from_str(&request).map_err(|e| e.to_string())?;
            if let Some(from) = request["join"].as_str() {
                if from != "any" && session.peer_id.as_deref().is_some_and(|p| p != from) {
                    return Err(format!(
                        "this node is copying its tables from peer {from}; it pulls from the others once done"
                    ));
                }
                if self.join(addr, session, false).await? {
                    // Catch up from the copy at once.
                    self.wake.notify_one();
                    return Ok(x);
                }
            }
            let (batch, traffic) = self.shared.client.pull(addr, &request["ask"]).await.map_err(|e| e.to_string())?;
            session.bytes_out += traffic.sent;
            session.bytes_in += traffic.received;
            let head: Head = serde_json::from_str(&batch).map_err(|e| format!("malformed batch: {e}"))?;
            if session.peer_id.is_none() {
                session.peer_id = head.source.clone();
            }
            if !head.gone.is_empty() {
                if self.join(addr, session, true).await? {
                    self.wake.notify_one();
                    return Ok(x);
                }
                return Err(format!(
                    "the peer no longer keeps changes this node lacks (origin up to number: {:?}); \
                     this node copies its tables from it once the peer holds this node's own changes",
                    head.gone
                ));
            }
            let n = head.events.len() as u64;
            let mut progress = false;
            let mut complete = true;
            let mut missing = BTreeMap::new();
            let twins = (!head.twins.is_empty()).then(|| Value::Array(head.twins.clone()).to_string());
            let new_twins = twins.is_some() && twins != self.twins_applied;
            if n > 0 || new_twins {
                let counts = ask(&self.shared.tx, |r| Ask::Apply(batch, r)).await?;
                self.twins_applied = twins;
                let counts: Value = serde_json::from_str(&counts).map_err(|e| e.to_string())?;
                progress = counts["transactions"].as_i64().unwrap_or(0) > 0;
                // Held failures count as held (see PROTOCOL.md, Applying a batch); waiting ones do not.
                complete = counts["waiting"].as_i64() == Some(0);
                missing = vector(&counts["missing"]);
                x.events += n;
            }
            // What each side holds now: the peer's have-vector, and ours raised by the batch.
            x.theirs = head.node_have;
            x.ours = vector(&request["have"]);
            if complete {
                // Not this node's own origin: what the peer holds of it says nothing of what this
                // node has (see `discovery::Doubt::Behind`).
                let own = self.shared.roster.lock().expect("roster").own_id().to_string();
                for (o, n) in head.have.into_iter().filter(|(o, _)| *o != own) {
                    let e = x.ours.entry(o).or_insert(0);
                    *e = (*e).max(n);
                }
            }
            // A batch that brought only transactions waiting for what it did not bring: ask
            // again at once, for what they miss (once; then at the next interval).
            let was_stalled = self.stalled.is_some();
            if progress || missing.is_empty() {
                self.stalled = None;
                x.stall = None;
            } else {
                self.stalled =
                    Some(x.theirs.iter().filter_map(|(o, n)| Some((Uuid::parse_str(o).ok()?, *n))).collect());
                x.stall = Some(missing);
                if !was_stalled {
                    continue;
                }
            }
            // Stop when the peer has no more, or nothing more could be applied yet.
            if !progress || !head.more {
                break;
            }
        }
        session.events_in = x.events;
        session.have = Some(x.theirs.clone());
        x.source = session.peer_id.as_deref().and_then(|id| Uuid::parse_str(id).ok());
        Ok(x)
    }
}

impl Puller {
    /// Copy this node's tracked tables from the peer's snapshot (`crate::snapshot`), when the
    /// node wants to (new, told `gone` with `rejoin`, or asked by `sync_resync`). Returns false
    /// when there was nothing to copy; an error when the peer must first take this node's own
    /// changes, or the copy failed (it starts again at the next exchange).
    async fn join(&mut self, addr: SocketAddr, session: &mut Session, rejoin: bool) -> Result<bool, String> {
        use sync_bridge::snapshot::{Ask as Q, PAGE_FORMAT, PAGE_ROWS, TableInfo, page_head};
        let client = &self.shared.client;
        let (manifest, t) = client.snapshot(addr, &Q::Manifest).await.map_err(|e| e.to_string())?;
        session.bytes_in += t.received;
        let name = session.peer.clone();
        let begun = ask(&self.shared.tx, |r| Ask::Join(JoinStep::Begin { manifest, name, rejoin }, r)).await?;
        let begun: Value = serde_json::from_str(&begun).map_err(|e| e.to_string())?;
        if let Some(lacks) = begun.get("source_lacks") {
            return Err(format!(
                "waiting for the peer to take the changes only this node holds ({lacks}) before copying from it"
            ));
        }
        let Some(tables) = begun.get("tables") else { return Ok(false) };
        let tables: Vec<TableInfo> = serde_json::from_value(tables.clone()).map_err(|e| e.to_string())?;
        // The next page travels while this node loads the last one.
        let mut loading: Option<tokio::task::JoinHandle<Result<String, String>>> = None;
        for info in &tables {
            let table = info.name.as_str();
            for tombstones in [false, true] {
                let mut after = Value::Null;
                loop {
                    let q = if tombstones {
                        Q::Tombstones { table: table.into(), after: after.as_str().map(Into::into), limit: PAGE_ROWS }
                    } else {
                        let key = after
                            .as_array()
                            .map(|a| a.iter().map(|v| v.as_str().unwrap_or_default().to_string()).collect());
                        Q::Rows { table: table.into(), after: key, limit: PAGE_ROWS, format: PAGE_FORMAT }
                    };
                    let (page, t) = client.snapshot(addr, &q).await.map_err(|e| e.to_string())?;
                    session.bytes_in += t.received;
                    let head = page_head(&page)?;
                    if let Some(previous) = loading.take() {
                        previous.await.map_err(|e| e.to_string())??;
                    }
                    let shared = self.shared.clone();
                    let step = JoinStep::Load { table: info.clone(), tombstones, n: head.n, page };
                    loading = Some(tokio::spawn(async move { ask(&shared.tx, |r| Ask::Join(step, r)).await }));
                    if head.n < PAGE_ROWS {
                        break;
                    }
                    after = head.last.unwrap_or(Value::Null);
                }
            }
        }
        if let Some(previous) = loading.take() {
            previous.await.map_err(|e| e.to_string())??;
        }
        let (finish, _) = client.snapshot(addr, &Q::Finish).await.map_err(|e| e.to_string())?;
        ask(&self.shared.tx, |r| Ask::Join(JoinStep::Finish(finish), r)).await?;
        Ok(true)
    }
}

fn vector(v: &Value) -> BTreeMap<String, i64> {
    v.as_object().map(|m| m.iter().filter_map(|(k, n)| Some((k.clone(), n.as_i64()?))).collect()).unwrap_or_default()
}
