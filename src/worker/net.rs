//! The worker's networking: a tokio runtime on its own threads runs the HTTP server and one
//! anti-entropy puller per static peer (`sync_bridge::transport`). They never touch
//! PostgreSQL: what needs the database they ask through a channel, and the worker's main
//! thread answers on each tick with SPI (`answer`).

use serde_json::{Value, json};
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;
use sync_bridge::auth::Keys;
use sync_bridge::transport::{self, CallError, Client, Counters, Node, NodeFuture};
use tokio::sync::{Notify, oneshot, watch};

/// A question for the main thread.
pub enum Ask {
    Have(oneshot::Sender<Result<Value, String>>),
    Changes(Value, oneshot::Sender<Result<Value, String>>),
    Apply(Value, oneshot::Sender<Result<Value, String>>),
}

/// What the main thread knows of one peer, for `sync_status()`.
#[derive(Clone, Debug, Default)]
pub struct PeerState {
    pub address: String,
    pub state: &'static str,
    pub last_ok_ms: Option<u64>,
    pub last_error: Option<String>,
    pub pulls: u64,
    pub events_received: u64,
}

struct Bridge {
    tx: Mutex<mpsc::Sender<Ask>>,
    /// Per static peer: its addresses, and how to wake its puller.
    wake: Vec<(Vec<SocketAddr>, Arc<Notify>)>,
}

async fn ask(
    tx: &Mutex<mpsc::Sender<Ask>>,
    make: impl FnOnce(oneshot::Sender<Result<Value, String>>) -> Ask,
) -> Result<Value, String> {
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

impl Node for Bridge {
    fn changes(&self, have: Value) -> NodeFuture {
        let tx = Mutex::new(self.tx.lock().expect("channel lock").clone());
        Box::pin(async move { ask(&tx, |r| Ask::Changes(have, r)).await })
    }

    fn push(&self, batch: Value) -> NodeFuture {
        let tx = Mutex::new(self.tx.lock().expect("channel lock").clone());
        Box::pin(async move { ask(&tx, |r| Ask::Apply(batch, r)).await })
    }

    fn poke(&self, from: SocketAddr) {
        for (addrs, notify) in &self.wake {
            if addrs.contains(&from) {
                notify.notify_one();
            }
        }
    }
}

pub struct Net {
    runtime: tokio::runtime::Runtime,
    client: Arc<Client>,
    /// The static peers' addresses, to poke after a commit.
    targets: Vec<SocketAddr>,
    port: u16,
    asks: mpsc::Receiver<Ask>,
    shutdown: watch::Sender<bool>,
    pub listen: SocketAddr,
    pub counters: Arc<Mutex<Counters>>,
    pub peers: Arc<Mutex<Vec<PeerState>>>,
}

/// Build the runtime with every signal blocked in its threads: PostgreSQL's handlers must run
/// on the main thread only.
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    // SAFETY: plain libc signal-mask calls on the current thread; the mask is restored below.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old);
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build();
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        rt
    }
}

impl Net {
    pub fn start(keys: Keys, listen: &str, port: u16, peers: &[String], interval: Duration) -> Result<Net, String> {
        let runtime = runtime().map_err(|e| format!("cannot start the network runtime: {e}"))?;
        let listen: SocketAddr = format!("{listen}:{port}")
            .parse()
            .map_err(|_| format!("peersync.listen_address \"{listen}\" is not an IP address"))?;
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(listen))
            .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
        let (tx, asks) = mpsc::channel();
        let (shutdown, stop) = watch::channel(false);
        // Resolved once: a peer that cannot be resolved now is reported by its puller.
        let resolved: Vec<Vec<SocketAddr>> =
            peers.iter().map(|p| p.to_socket_addrs().map(|a| a.collect()).unwrap_or_default()).collect();
        let notifies: Vec<Arc<Notify>> = peers.iter().map(|_| Arc::new(Notify::new())).collect();
        let wake = resolved.iter().cloned().zip(notifies.iter().cloned()).collect();
        let node = Arc::new(Bridge { tx: Mutex::new(tx.clone()), wake });
        let (counters, serve) = transport::serve(listener, keys.clone(), node, stop.clone());
        runtime.spawn(serve);
        let client = Arc::new(Client::new(keys, Duration::from_secs(30)));
        let states: Vec<PeerState> =
            peers.iter().map(|p| PeerState { address: p.clone(), state: "unknown", ..Default::default() }).collect();
        let states = Arc::new(Mutex::new(states));
        for (i, peer) in peers.iter().enumerate() {
            let job = Puller {
                index: i,
                peer: peer.clone(),
                client: client.clone(),
                tx: Mutex::new(tx.clone()),
                states: states.clone(),
                interval,
                wake: notifies[i].clone(),
            };
            runtime.spawn(job.run(stop.clone()));
        }
        let targets = resolved.into_iter().filter_map(|a| a.into_iter().next()).collect();
        Ok(Net { runtime, client, targets, port, asks, shutdown, listen, counters, peers: states })
    }

    /// Tell every static peer that this node has new changes (they pull at once).
    pub fn poke_peers(&self) {
        for peer in &self.targets {
            let (client, peer, port) = (self.client.clone(), *peer, self.port);
            // Best effort: a peer that misses it pulls at its next interval anyway.
            self.runtime.spawn(async move {
                let _ = client.poke(peer, port).await;
            });
        }
    }

    /// The questions asked since the last tick.
    pub fn asks(&self) -> Vec<Ask> {
        self.asks.try_iter().collect()
    }

    pub fn stop(self) {
        let _ = self.shutdown.send(true);
        self.runtime.shutdown_timeout(Duration::from_secs(5));
    }
}

struct Puller {
    index: usize,
    peer: String,
    client: Arc<Client>,
    tx: Mutex<mpsc::Sender<Ask>>,
    states: Arc<Mutex<Vec<PeerState>>>,
    interval: Duration,
    /// Notified when the peer says it has new changes.
    wake: Arc<Notify>,
}

impl Puller {
    async fn run(self, mut stop: watch::Receiver<bool>) {
        // After a failure, try again soon, backing off up to a minute (or the interval).
        let mut backoff = Duration::from_secs(1);
        loop {
            let outcome = self.exchange().await;
            let wait = if outcome.is_ok() {
                backoff = Duration::from_secs(1);
                self.interval
            } else {
                let w = backoff.min(self.interval);
                backoff = (backoff * 2).min(Duration::from_secs(60));
                w
            };
            {
                let mut states = self.states.lock().expect("peer states");
                let s = &mut states[self.index];
                s.pulls += 1;
                match outcome {
                    Ok(events) => {
                        s.state = "up";
                        s.last_ok_ms = Some(transport::now_ms());
                        s.last_error = None;
                        s.events_received += events;
                    }
                    Err(e) => {
                        s.state = "down";
                        s.last_error = Some(e);
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.wake.notified() => {}
                _ = stop.changed() => return,
            }
        }
    }

    /// Pull until the peer has nothing more for us (bounded); returns the events received.
    async fn exchange(&self) -> Result<u64, String> {
        let addr = self
            .peer
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve {}: {e}", self.peer))?
            .next()
            .ok_or_else(|| format!("{} resolves to no address", self.peer))?;
        let mut received = 0;
        for _ in 0..1000 {
            let have = ask(&self.tx, Ask::Have).await?;
            let batch = self.client.pull(addr, &have).await.map_err(|e: CallError| e.to_string())?;
            let n = batch["events"].as_array().map(Vec::len).unwrap_or(0) as u64;
            let mut progress = false;
            if n > 0 {
                let counts = ask(&self.tx, |r| Ask::Apply(batch.clone(), r)).await?;
                progress = counts["transactions"].as_i64().unwrap_or(0) > 0;
                received += n;
            }
            // Stop when the peer has no more, or nothing more could be applied yet.
            if !progress || batch["more"] != json!(true) {
                break;
            }
        }
        Ok(received)
    }
}
