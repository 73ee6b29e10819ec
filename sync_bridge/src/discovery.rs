//! Finding peers: signed multicast announcements (`auth::Announcement`) and the roster of
//! known peers, whether announced or configured.
//!
//! `Roster` is pure bookkeeping (tested without sockets): who is known, at which address,
//! found how, and in which state. `run` is the socket side: every `interval` it announces this
//! node on each eligible interface and it listens for the others' announcements, counting what
//! it rejected and why, so that `sync_status()` can say why nodes do not see each other.

use crate::auth::{Announcement, Keys, ReplayGuard};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use uuid::Uuid;

/// Announcements older or newer than this are stale (they carry the sender's wall clock).
pub const ANNOUNCE_WINDOW_MS: u64 = 60_000;
/// Largest datagram read; an announcement is a few hundred bytes.
const MAX_DATAGRAM: usize = 4096;

/// How a peer became known.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FoundBy {
    Multicast,
    /// Listed in `peersync.peers`.
    Static,
    /// Listed and also announcing itself.
    StaticAndMulticast,
}

/// One known peer: what discovery says of it and how exchanges with it went.
#[derive(Clone, Debug, Serialize)]
pub struct Peer {
    /// As configured (`host:port`) for static peers, the node id for announced ones.
    pub key: String,
    pub node_id: Option<Uuid>,
    pub name: Option<String>,
    pub address: Option<SocketAddr>,
    pub found_by: FoundBy,
    /// Digest of the peer's tracked-table definitions, from its announcements.
    pub schema: Option<String>,
    /// Last announcement or successful exchange (epoch ms).
    pub last_heard_ms: Option<u64>,
    pub last_ok_ms: Option<u64>,
    pub last_error: Option<String>,
    /// Per origin, what the peer held at the last exchange (its have-vector).
    #[serde(skip)]
    pub their_have: BTreeMap<String, i64>,
    /// Origin transactions this node held and the peer lacked, and the reverse, at the last
    /// exchange.
    pub it_lacks: Option<i64>,
    pub we_lack: Option<i64>,
    /// Last time this node lacked nothing the peer had (epoch ms).
    pub caught_up_ms: Option<u64>,
    pub pulls: u64,
    pub events_received: u64,
    /// Set while batches from this peer bring nothing this node can apply.
    pub stall: Option<Stall>,
}

/// Batches from a peer bring only transactions that wait for events they do not bring.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Stall {
    /// When it was first seen (epoch ms).
    pub since_ms: u64,
    /// Per origin, the number this node must reach for the waiting transactions to apply.
    pub missing: BTreeMap<String, i64>,
}

impl Peer {
    fn new(key: String, found_by: FoundBy) -> Peer {
        Peer {
            key,
            node_id: None,
            name: None,
            address: None,
            found_by,
            schema: None,
            last_heard_ms: None,
            last_ok_ms: None,
            last_error: None,
            their_have: BTreeMap::new(),
            it_lacks: None,
            we_lack: None,
            caught_up_ms: None,
            pulls: 0,
            events_received: 0,
            stall: None,
        }
    }

    /// `up`: heard from within `timeout` and the last exchange worked; `unreachable`: heard
    /// from, but the last exchange failed (retrying with backoff); `found`: announced, not
    /// yet synced; `down`: silent for `timeout`; `unknown`: configured, never tried.
    pub fn state(&self, now_ms: u64, timeout: Duration) -> &'static str {
        let heard = self.last_heard_ms.is_some_and(|t| now_ms.saturating_sub(t) <= timeout.as_millis() as u64);
        match (heard, &self.last_error, self.last_ok_ms) {
            (true, Some(_), _) => "unreachable",
            (true, None, Some(_)) => "up",
            (true, None, None) => "found",
            (false, None, None) if self.pulls == 0 => "unknown",
            _ => "down",
        }
    }

    /// Seconds this node has lacked something the peer has (0 when caught up).
    pub fn lag_s(&self, now_ms: u64) -> Option<u64> {
        match (self.we_lack, self.caught_up_ms) {
            (Some(0), _) => Some(0),
            (Some(_), Some(t)) => Some(now_ms.saturating_sub(t) / 1000),
            _ => None,
        }
    }
}

/// Evidence that another node uses this node's identity: a copy of its database (a base
/// backup, a copied data directory or VM image started as a second machine) or a restore of
/// an older backup of it. Both number transactions that peers may already hold under the same
/// numbers, so the node says so loudly (`sync_status() -> 'worker' -> 'identity'` and a
/// WARNING).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "seen", rename_all = "snake_case")]
pub enum Doubt {
    /// Announcements carrying this node's id that this node did not send.
    Twin { address: String, name: String, since_ms: u64 },
    /// A peer holds this node's own transactions beyond the last one this node has: this node
    /// lost transactions it made (a restore), or another node numbered some under its id.
    Behind { peer: String, theirs: i64, ours: i64, since_ms: u64 },
}

impl Doubt {
    pub fn hint(&self) -> &'static str {
        match self {
            Doubt::Twin { .. } => {
                "another machine runs a copy of this database with the same pg_peersync identity (a base backup, \
                 copied data directory or VM image); stop one of them: their changes may be numbered alike"
            }
            Doubt::Behind { .. } => {
                "a peer holds more of this node's own transactions than this node has: it was restored from an \
                 older backup, or a copy of it wrote under its identity; new changes here may reuse numbers \
                 the peers hold"
            }
        }
    }
}

/// What `observe` made of an announcement.
#[derive(Debug, PartialEq, Eq)]
pub enum Observed {
    /// This node's own announcement, looped back.
    Own,
    /// A peer not known before: start syncing with it.
    New(String),
    Known(String),
}

/// Every peer this node knows, by key.
#[derive(Debug)]
pub struct Roster {
    own_id: Uuid,
    peers: BTreeMap<String, Peer>,
    /// The first sign that another node uses this node's identity, if any.
    doubt: Option<Doubt>,
    /// A peer that held more of this node's own transactions than this node's have-vector
    /// said, as read before that exchange: `(peer, theirs)`. A local commit that the peer
    /// pulled meanwhile explains that; still more than this node has at that peer's next
    /// exchange does not.
    suspect: Option<(String, i64)>,
}

impl Roster {
    pub fn new(own_id: Uuid) -> Roster {
        Roster { own_id, peers: BTreeMap::new(), doubt: None, suspect: None }
    }

    pub fn own_id(&self) -> Uuid {
        self.own_id
    }

    /// The first sign, if any, that another node uses this node's identity.
    pub fn doubt(&self) -> Option<&Doubt> {
        self.doubt.as_ref()
    }

    /// Record a sign that another node uses this node's identity (the first one is kept).
    pub fn doubt_identity(&mut self, d: Doubt) {
        self.doubt.get_or_insert(d);
    }

    /// A peer from `peersync.peers`, resolved now if it can be.
    pub fn add_static(&mut self, configured: &str, resolved: Option<SocketAddr>) {
        let mut p = Peer::new(configured.to_string(), FoundBy::Static);
        p.address = resolved;
        self.peers.insert(configured.to_string(), p);
    }

    /// Record a verified announcement received from `from`.
    pub fn observe(&mut self, a: &Announcement, from: IpAddr, now_ms: u64) -> Observed {
        if a.node_id == self.own_id {
            return Observed::Own;
        }
        let address = SocketAddr::new(reachable_address(a, from), a.port);
        // A static peer announcing itself is the same peer: keep one entry, keyed as configured.
        let existing = self
            .peers
            .values()
            .find(|p| p.node_id == Some(a.node_id) || (p.found_by == FoundBy::Static && p.address == Some(address)))
            .map(|p| p.key.clone());
        let (key, new) = match existing {
            Some(k) => (k, false),
            None => {
                let key = a.node_id.to_string();
                self.peers.insert(key.clone(), Peer::new(key.clone(), FoundBy::Multicast));
                (key, true)
            }
        };
        let p = self.peers.get_mut(&key).expect("just found or inserted");
        if p.found_by == FoundBy::Static {
            p.found_by = FoundBy::StaticAndMulticast;
        }
        if p.found_by == FoundBy::Multicast {
            // An announced peer that moved is followed; a configured one keeps its address.
            p.address = Some(address);
        }
        p.node_id = Some(a.node_id);
        p.name = Some(a.name.clone());
        p.schema = Some(a.schema.clone());
        p.last_heard_ms = Some(now_ms);
        if new { Observed::New(key) } else { Observed::Known(key) }
    }

    /// Record an exchange with peer `key`: the events received, and what each side held.
    pub fn exchanged(&mut self, key: &str, outcome: Result<Exchanged, String>, now_ms: u64) {
        let Some(p) = self.peers.get_mut(key) else { return };
        p.pulls += 1;
        match outcome {
            Ok(x) => {
                let own = self.own_id.to_string();
                let (theirs, ours) = (x.theirs.get(&own).copied().unwrap_or(0), x.ours.get(&own).copied().unwrap_or(0));
                // What a peer holds of this node was served by this node, or by one with its id.
                // Checked at that peer's next exchange: one peer's exchanges follow each other,
                // while another peer's may have read this node's vector before the sign was seen.
                if let Some((peer, seen)) = self.suspect.take_if(|(peer, _)| peer == key)
                    && seen > ours
                {
                    self.doubt.get_or_insert(Doubt::Behind { peer, theirs: seen, ours, since_ms: now_ms });
                }
                if theirs > ours {
                    self.suspect = Some((key.to_string(), theirs));
                }
                let p = self.peers.get_mut(key).expect("found above");
                // A configured peer found without multicast is known by id from its batches.
                if p.node_id.is_none() {
                    p.node_id = x.source;
                }
                p.last_heard_ms = Some(now_ms);
                p.last_ok_ms = Some(now_ms);
                p.last_error = None;
                p.events_received += x.events;
                p.it_lacks = Some(lacking(&x.ours, &x.theirs));
                p.we_lack = Some(lacking(&x.theirs, &x.ours));
                if p.we_lack == Some(0) {
                    p.caught_up_ms = Some(now_ms);
                }
                p.their_have = x.theirs;
                p.stall =
                    x.stall.map(|missing| Stall { since_ms: p.stall.as_ref().map_or(now_ms, |s| s.since_ms), missing });
            }
            Err(e) => p.last_error = Some(e),
        }
    }

    /// Drop the announced peers that are down and not in `kept` (the peers the log still keeps
    /// changes for: a forgotten one is not); returns their keys. Configured peers stay, and a
    /// dropped peer that announces itself again is added again.
    pub fn drop_forgotten(&mut self, kept: &BTreeSet<Uuid>, now_ms: u64, timeout: Duration) -> Vec<String> {
        let gone: Vec<String> = self
            .peers
            .values()
            .filter(|p| p.found_by == FoundBy::Multicast && p.state(now_ms, timeout) == "down")
            .filter(|p| p.node_id.is_none_or(|id| !kept.contains(&id)))
            .map(|p| p.key.clone())
            .collect();
        for k in &gone {
            self.peers.remove(k);
        }
        gone
    }

    /// A configured peer's address, as resolved before an exchange.
    pub fn add_resolved(&mut self, key: &str, addr: SocketAddr) {
        if let Some(p) = self.peers.get_mut(key) {
            p.address = Some(addr);
        }
    }

    pub fn get(&self, key: &str) -> Option<&Peer> {
        self.peers.get(key)
    }

    /// The peer serving at `addr`, if known.
    pub fn by_address(&self, addr: SocketAddr) -> Option<&Peer> {
        self.peers.values().find(|p| p.address == Some(addr))
    }

    pub fn peers(&self) -> impl Iterator<Item = &Peer> {
        self.peers.values()
    }
}

/// One exchange's result, for `Roster::exchanged`.
#[derive(Debug, Default)]
pub struct Exchanged {
    pub events: u64,
    /// Have-vectors (origin → transactions held) of this node and the peer, after it.
    pub ours: BTreeMap<String, i64>,
    pub theirs: BTreeMap<String, i64>,
    /// What the waiting transactions miss, when the last batch applied nothing.
    pub stall: Option<BTreeMap<String, i64>>,
    /// The peer's node id, as its batches name it.
    pub source: Option<Uuid>,
}

/// Transactions `have` holds that `other` lacks.
fn lacking(have: &BTreeMap<String, i64>, other: &BTreeMap<String, i64>) -> i64 {
    have.iter().map(|(o, n)| (n - other.get(o).copied().unwrap_or(0)).max(0)).sum()
}

/// The address to reach an announcing node at: the datagram's source when the node lists it
/// (it is on a network we share), else the first it lists (`peersync.advertise_address`,
/// say), else the source.
pub fn reachable_address(a: &Announcement, from: IpAddr) -> IpAddr {
    let listed: Vec<IpAddr> = a.addresses.iter().filter_map(|s| s.parse().ok()).collect();
    if listed.contains(&from) { from } else { listed.first().copied().unwrap_or(from) }
}

/// An interface announcements go out on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Interface {
    pub name: String,
    pub address: Ipv4Addr,
}

/// The interfaces to announce on: IPv4, not loopback, not down, and covered by `listen`
/// (the HTTP server's addresses; an unspecified address covers all). A node listening on
/// loopback only therefore announces nowhere.
pub fn eligible_interfaces(listen: &[IpAddr]) -> std::io::Result<Vec<Interface>> {
    let all = listen.iter().any(|a| a.is_unspecified());
    let mut out: Vec<Interface> = if_addrs::get_if_addrs()?
        .into_iter()
        .filter(|i| !i.is_loopback())
        .filter(|i| !matches!(i.oper_status, if_addrs::IfOperStatus::Down | if_addrs::IfOperStatus::NotPresent))
        .filter_map(|i| match i.ip() {
            IpAddr::V4(address) if all || listen.contains(&IpAddr::V4(address)) => {
                Some(Interface { name: i.name, address })
            }
            _ => None,
        })
        .collect();
    out.sort_by(|a, b| (&a.name, a.address).cmp(&(&b.name, b.address)));
    out.dedup();
    Ok(out)
}

/// What discovery did, for `sync_status()`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DiscoveryStatus {
    pub group: String,
    pub interfaces: Vec<Interface>,
    pub sent: u64,
    pub received: u64,
    pub accepted: u64,
    /// Announcements rejected, by reason (`wrong_key`, `stale`, `replay`, `version`,
    /// `malformed`).
    pub rejected: BTreeMap<&'static str, u64>,
    /// The last socket error, if any (a network that drops multicast shows here or as
    /// `received` staying at `sent`'s echo only).
    pub last_error: Option<String>,
    /// Announcements with this node's id that it did not send (see `Doubt::Twin`).
    pub twin: Option<Doubt>,
}

/// The nonces of the last announcements this node sent (a few intervals' worth).
#[derive(Default)]
struct SentNonces(std::collections::VecDeque<String>);

impl SentNonces {
    const KEPT: usize = 256;

    fn push(&mut self, nonce: String) {
        if self.0.len() == Self::KEPT {
            self.0.pop_front();
        }
        self.0.push_back(nonce);
    }

    fn contains(&self, nonce: &str) -> bool {
        self.0.iter().any(|n| n == nonce)
    }
}

/// What a node announces about itself (the rest of `Announcement` is filled per message).
#[derive(Clone, Debug)]
pub struct Identity {
    pub node_id: Uuid,
    pub name: String,
    pub http_port: u16,
    /// Updated by the worker when tables are tracked or changed.
    pub schema: Arc<Mutex<String>>,
    /// `peersync.advertise_address`, if set: announced instead of the interface's address.
    pub advertise: Option<IpAddr>,
}

#[derive(Clone, Debug)]
pub struct Config {
    pub group: Ipv4Addr,
    pub port: u16,
    pub interval: Duration,
    /// The HTTP server's listen addresses (they choose the interfaces, see
    /// `eligible_interfaces`).
    pub listen: Vec<IpAddr>,
}

fn receiver(cfg: &Config) -> std::io::Result<tokio::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    // Several nodes on one host may share the port; each gets every datagram.
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    s.bind(&SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, cfg.port).into())?;
    tokio::net::UdpSocket::from_std(s.into())
}

fn sender() -> std::io::Result<socket2::Socket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    // One hop: announcements stay on the LAN.
    s.set_multicast_ttl_v4(1)?;
    s.set_multicast_loop_v4(true)?;
    Ok(s)
}

/// Announce and listen until `stop` turns true. Verified announcements from others go to
/// `found` with the datagram's source address.
pub async fn run(
    cfg: Config,
    me: Identity,
    keys: Keys,
    status: Arc<Mutex<DiscoveryStatus>>,
    found: mpsc::UnboundedSender<(Announcement, IpAddr)>,
    mut stop: watch::Receiver<bool>,
) {
    let fail = |e: String| status.lock().expect("discovery status").last_error = Some(e);
    status.lock().expect("discovery status").group = format!("{}:{}", cfg.group, cfg.port);
    let (recv, send) = match (receiver(&cfg), sender()) {
        (Ok(r), Ok(s)) => (r, s),
        (Err(e), _) | (_, Err(e)) => {
            return fail(format!("cannot open the multicast socket on port {}: {e}", cfg.port));
        }
    };
    let mut joined: Vec<Ipv4Addr> = Vec::new();
    let mut guard = ReplayGuard::new(ANNOUNCE_WINDOW_MS);
    // Nonces of the announcements this node sent lately: one with its id and another nonce
    // was sent by a copy of it.
    let mut sent = SentNonces::default();
    // Announcements of this node sent before this task started (a reload restarts it) are not
    // in `sent`: those are not a copy's.
    let started_ms = crate::transport::now_ms();
    let mut tick = tokio::time::interval(cfg.interval);
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => {
                // Interfaces are looked up each time: one that comes up later is used then.
                let interfaces = match eligible_interfaces(&cfg.listen) {
                    Ok(i) => i,
                    Err(e) => { fail(format!("cannot list network interfaces: {e}")); continue; }
                };
                for i in &interfaces {
                    if !joined.contains(&i.address) {
                        match recv.join_multicast_v4(cfg.group, i.address) {
                            Ok(()) => joined.push(i.address),
                            Err(e) => fail(format!("cannot join {} on {}: {e}", cfg.group, i.name)),
                        }
                    }
                    let a = Announcement {
                        protocol: crate::auth::PROTOCOL_VERSION,
                        node_id: me.node_id,
                        name: me.name.clone(),
                        addresses: vec![me.advertise.unwrap_or(IpAddr::V4(i.address)).to_string()],
                        port: me.http_port,
                        schema: me.schema.lock().expect("schema").clone(),
                        ts_ms: crate::transport::now_ms(),
                        nonce: crate::auth::hex(&crate::auth::new_nonce()),
                    };
                    sent.push(a.nonce.clone());
                    let to = SocketAddrV4::new(cfg.group, cfg.port).into();
                    let sent = send.set_multicast_if_v4(&i.address).and_then(|_| send.send_to(&a.sign(&keys), &to));
                    match sent {
                        Ok(_) => status.lock().expect("discovery status").sent += 1,
                        Err(e) => fail(format!("cannot announce on {}: {e}", i.name)),
                    }
                }
                status.lock().expect("discovery status").interfaces = interfaces;
            }
            got = recv.recv_from(&mut buf) => {
                let Ok((n, from)) = got else { continue };
                let verdict = Announcement::verify(&buf[..n], &keys, crate::transport::now_ms(), &mut guard);
                let mut s = status.lock().expect("discovery status");
                match verdict {
                    // Our own, looped back (multicast loop is on so nodes on one host meet).
                    Ok(a) if a.node_id == me.node_id && (sent.contains(&a.nonce) || a.ts_ms < started_ms) => {}
                    Ok(a) if a.node_id == me.node_id => {
                        s.received += 1;
                        let address = SocketAddr::new(reachable_address(&a, from.ip()), a.port).to_string();
                        s.twin.get_or_insert(Doubt::Twin {
                            address,
                            name: a.name.clone(),
                            since_ms: crate::transport::now_ms(),
                        });
                    }
                    Ok(a) => {
                        s.received += 1;
                        s.accepted += 1;
                        let _ = found.send((a, from.ip()));
                    }
                    Err(r) => {
                        s.received += 1;
                        *s.rejected.entry(r.as_str()).or_default() += 1;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn announcement(id: Uuid, addresses: &[&str], port: u16) -> Announcement {
        Announcement {
            protocol: crate::auth::PROTOCOL_VERSION,
            node_id: id,
            name: "shop-b".into(),
            addresses: addresses.iter().map(|s| s.to_string()).collect(),
            port,
            schema: "abc".into(),
            ts_ms: 1,
            nonce: "00".into(),
        }
    }

    const T: Duration = Duration::from_secs(120);

    #[test]
    fn forgotten_peers_leave_the_roster_once_down_and_configured_ones_stay() {
        let (me, other) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let mut r = Roster::new(me);
        r.add_static("db-c:8765", None);
        let ip: IpAddr = "10.0.0.2".parse().unwrap();
        r.observe(&announcement(other, &["10.0.0.2"], 8765), ip, 1_000);
        let key = other.to_string();
        r.exchanged(&key, Ok(Exchanged::default()), 1_000);
        let kept = BTreeSet::new();
        // Up: kept, even though forgotten (it counts again from its next exchange).
        assert!(r.drop_forgotten(&kept, 2_000, T).is_empty());
        // Down and still kept by the log: stays.
        let later = 1_000 + T.as_millis() as u64 + 1;
        assert!(r.drop_forgotten(&BTreeSet::from([other]), later, T).is_empty());
        // Down and forgotten: dropped; the configured peer stays.
        assert_eq!(r.drop_forgotten(&kept, later, T), vec![key.clone()]);
        assert!(r.get(&key).is_none());
        assert!(r.get("db-c:8765").is_some());
        // It announces itself again: back.
        assert_eq!(r.observe(&announcement(other, &["10.0.0.2"], 8765), ip, later), Observed::New(key));
    }

    #[test]
    fn a_configured_peer_is_known_by_the_id_its_batches_carry() {
        let mut r = Roster::new(Uuid::from_u128(1));
        r.add_static("db-b:8765", None);
        assert_eq!(r.get("db-b:8765").unwrap().node_id, None);
        r.exchanged("db-b:8765", Ok(Exchanged { source: Some(Uuid::from_u128(2)), ..Default::default() }), 10);
        assert_eq!(r.get("db-b:8765").unwrap().node_id, Some(Uuid::from_u128(2)));
    }

    #[test]
    fn a_peer_holding_more_of_this_nodes_own_transactions_raises_a_doubt() {
        let (me, peer) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let mut r = Roster::new(me);
        r.add_static("db-b:8765", None);
        let vector = |mine: i64| BTreeMap::from([(me.to_string(), mine), (peer.to_string(), 4)]);
        // Equal, or the peer behind: nothing wrong.
        r.exchanged("db-b:8765", Ok(Exchanged { ours: vector(5), theirs: vector(5), ..Default::default() }), 10);
        r.exchanged("db-b:8765", Ok(Exchanged { ours: vector(5), theirs: vector(3), ..Default::default() }), 11);
        assert_eq!(r.doubt(), None);
        // The peer holds 6 of this node's transactions, this node's vector said 5: a commit the
        // peer pulled meanwhile. At the next exchange this node has it: nothing wrong.
        r.exchanged("db-b:8765", Ok(Exchanged { ours: vector(5), theirs: vector(6), ..Default::default() }), 12);
        r.exchanged("db-b:8765", Ok(Exchanged { ours: vector(6), theirs: vector(6), ..Default::default() }), 13);
        assert_eq!(r.doubt(), None);
        // Another peer's exchange, whose request read this node's vector before the sign above
        // was seen: it says nothing of it. The first peer's next exchange clears it.
        r.add_static("db-c:8765", None);
        r.exchanged("db-b:8765", Ok(Exchanged { ours: vector(6), theirs: vector(7), ..Default::default() }), 13);
        r.exchanged("db-c:8765", Ok(Exchanged { ours: vector(6), theirs: vector(2), ..Default::default() }), 13);
        assert_eq!(r.doubt(), None);
        r.exchanged("db-b:8765", Ok(Exchanged { ours: vector(7), theirs: vector(7), ..Default::default() }), 13);
        assert_eq!(r.doubt(), None);
        // The peer holds 7; this node has 5, and still 5 at the next exchange: it lost two.
        r.exchanged("db-b:8765", Ok(Exchanged { ours: vector(5), theirs: vector(7), ..Default::default() }), 14);
        assert_eq!(r.doubt(), None);
        r.exchanged("db-b:8765", Ok(Exchanged { ours: vector(5), theirs: vector(7), ..Default::default() }), 15);
        let first = Doubt::Behind { peer: "db-b:8765".into(), theirs: 7, ours: 5, since_ms: 15 };
        assert_eq!(r.doubt(), Some(&first));
        // The first sign is kept.
        r.exchanged("db-b:8765", Ok(Exchanged { ours: vector(6), theirs: vector(9), ..Default::default() }), 16);
        r.exchanged("db-b:8765", Ok(Exchanged { ours: vector(6), theirs: vector(9), ..Default::default() }), 17);
        assert_eq!(r.doubt(), Some(&first));
        assert!(first.hint().contains("restored from an older backup"));
    }

    #[test]
    fn own_announcements_are_known_by_their_nonces() {
        let mut sent = SentNonces::default();
        for i in 0..SentNonces::KEPT + 10 {
            sent.push(format!("n{i}"));
        }
        assert!(sent.contains(&format!("n{}", SentNonces::KEPT + 9)));
        assert!(sent.contains("n10"));
        // The oldest were forgotten; one never sent was never known.
        assert!(!sent.contains("n9"));
        assert!(!sent.contains("from-a-copy"));
    }

    #[test]
    fn announced_peers_are_added_once_and_own_announcements_ignored() {
        let (me, other) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let mut r = Roster::new(me);
        let ip: IpAddr = "10.0.0.2".parse().unwrap();
        assert_eq!(r.observe(&announcement(me, &["10.0.0.1"], 8765), ip, 10), Observed::Own);
        let a = announcement(other, &["10.0.0.2"], 8765);
        assert_eq!(r.observe(&a, ip, 10), Observed::New(other.to_string()));
        assert_eq!(r.observe(&a, ip, 20), Observed::Known(other.to_string()));
        let p = r.get(&other.to_string()).unwrap();
        assert_eq!(p.address, Some("10.0.0.2:8765".parse().unwrap()));
        assert_eq!((p.found_by, p.last_heard_ms, p.state(20, T)), (FoundBy::Multicast, Some(20), "found"));
        assert_eq!(r.peers().count(), 1);
    }

    #[test]
    fn a_static_peer_that_announces_itself_stays_one_peer() {
        let mut r = Roster::new(Uuid::from_u128(3));
        r.add_static("db-b:8765", Some("10.0.0.2:8765".parse().unwrap()));
        assert_eq!(r.get("db-b:8765").unwrap().state(0, T), "unknown");
        let id = Uuid::from_u128(4);
        let got = r.observe(&announcement(id, &["10.0.0.2"], 8765), "10.0.0.2".parse().unwrap(), 5);
        assert_eq!(got, Observed::Known("db-b:8765".into()));
        assert_eq!(r.peers().count(), 1);
        assert_eq!(r.get("db-b:8765").unwrap().found_by, FoundBy::StaticAndMulticast);
        assert_eq!(r.get("db-b:8765").unwrap().node_id, Some(id));
    }

    #[test]
    fn the_reachable_address_is_the_source_when_listed_else_the_advertised_one() {
        let id = Uuid::from_u128(5);
        let from: IpAddr = "10.1.0.7".parse().unwrap();
        assert_eq!(reachable_address(&announcement(id, &["10.9.9.9", "10.1.0.7"], 1), from), from);
        let adv: IpAddr = "192.168.5.5".parse().unwrap();
        assert_eq!(reachable_address(&announcement(id, &["192.168.5.5"], 1), from), adv);
        assert_eq!(reachable_address(&announcement(id, &["not an ip"], 1), from), from);
    }

    #[test]
    fn states_follow_exchanges_and_silence() {
        let id = Uuid::from_u128(6);
        let mut r = Roster::new(Uuid::from_u128(7));
        let key = id.to_string();
        r.observe(&announcement(id, &["10.0.0.2"], 8765), "10.0.0.2".parse().unwrap(), 1_000);
        let have = |pairs: &[(&str, i64)]| pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        let missing = have(&[("b", 4)]);
        let x = Exchanged {
            events: 7,
            ours: have(&[("a", 5), ("b", 1)]),
            theirs: have(&[("a", 3), ("b", 4)]),
            stall: Some(missing),
            source: None,
        };
        r.exchanged(&key, Ok(x), 2_000);
        let p = r.get(&key).unwrap();
        assert_eq!((p.state(2_000, T), p.it_lacks, p.we_lack, p.events_received), ("up", Some(2), Some(3), 7));
        assert_eq!(p.lag_s(2_000), None, "never caught up yet");
        // A stall is dated from when it was first seen, and named until a pull applies again.
        let x = Exchanged {
            events: 7,
            ours: have(&[("a", 5), ("b", 1)]),
            theirs: have(&[("a", 3), ("b", 4)]),
            stall: Some(have(&[("b", 4)])),
            source: None,
        };
        r.exchanged(&key, Ok(x), 2_500);
        let stall = r.get(&key).unwrap().stall.clone().expect("a stall");
        assert_eq!((stall.since_ms, stall.missing), (2_000, have(&[("b", 4)])));
        r.exchanged(&key, Err("unreachable: connection refused".into()), 3_000);
        assert_eq!(r.get(&key).unwrap().state(3_000, T), "unreachable");
        // Silent for longer than the timeout: down; heard again: back.
        assert_eq!(r.get(&key).unwrap().state(2_000 + 121_000, T), "down");
        r.observe(&announcement(id, &["10.0.0.2"], 8765), "10.0.0.2".parse().unwrap(), 200_000);
        let x = Exchanged {
            events: 0,
            ours: have(&[("a", 5), ("b", 4)]),
            theirs: have(&[("a", 5), ("b", 4)]),
            stall: None,
            source: None,
        };
        r.exchanged(&key, Ok(x), 200_500);
        let p = r.get(&key).unwrap();
        assert_eq!((p.state(200_500, T), p.we_lack, p.lag_s(200_500)), ("up", Some(0), Some(0)));
        assert_eq!(p.stall, None);
    }

    #[test]
    fn loopback_only_listening_announces_nowhere() {
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(eligible_interfaces(&[lo]).unwrap(), vec![]);
        for i in eligible_interfaces(&["0.0.0.0".parse().unwrap()]).unwrap() {
            assert!(!i.address.is_loopback(), "{i:?}");
        }
    }
}
