//! Catch-up at the batch level, without a network: random causal histories on several nodes
//! (with rolled-back numbers), then a node that was away pulls from random peers with random
//! batch sizes down to 1. Every pull makes progress, every batch applies whole in its order,
//! and pulling until nothing is lacking terminates with the node holding everything.
//!
//! The puller is modelled as `sync_apply` and the worker do it: `delivery::ask_for` for the
//! request, `serve::cut` on the peer, `delivery::link`, `plan` and `raise` on the way back.

use proptest::prelude::*;
use std::collections::BTreeMap;
use sync_bridge::delivery::{self, Pending};
use sync_bridge::serve::{self, Offer, Window};
use uuid::Uuid;

#[derive(Clone, Debug)]
struct Tx {
    origin: Uuid,
    seq: i64,
    hlc: i64,
    events: i64,
    context: BTreeMap<Uuid, i64>,
}

struct Batch {
    txns: Vec<Tx>,
    from: BTreeMap<Uuid, i64>,
    top: BTreeMap<Uuid, i64>,
}

#[derive(Clone, Debug, Default)]
struct Node {
    id: Uuid,
    have: BTreeMap<Uuid, i64>,
    store: BTreeMap<(Uuid, i64), Tx>,
    next: i64,
    /// Received, not applied yet (kept between pulls).
    waiting: Vec<(Pending, Tx)>,
}

impl Node {
    fn new(n: u128) -> Node {
        Node { id: Uuid::from_u128(n), ..Node::default() }
    }

    /// A transaction whose statements took their clock `hlc` (any value: a statement's clock
    /// may be older than what the transaction has seen by the time it commits).
    fn write(&mut self, rolled_back: i64, events: i64, hlc: i64) {
        self.next += 1 + rolled_back;
        let mut context = self.have.clone();
        context.insert(self.id, self.next);
        let tx = Tx { origin: self.id, seq: self.next, hlc, events, context };
        self.store.insert((self.id, self.next), tx);
        self.have.insert(self.id, self.next);
    }

    /// Take everything `other` holds (a perfect sync, to build histories).
    fn merge(&mut self, other: &Node) {
        for (k, t) in &other.store {
            if k.0 != self.id {
                self.store.insert(*k, t.clone());
            }
        }
        for (o, n) in &other.have {
            if *o != self.id {
                let h = self.have.entry(*o).or_insert(0);
                *h = (*h).max(*n);
            }
        }
    }

    /// Serve `since` as `sync_changes` does: windows read at most `budget` transactions deep.
    fn serve(&self, since: &BTreeMap<Uuid, i64>, budget: i64, causal: bool) -> Batch {
        let windows: Vec<Window> = self
            .have
            .iter()
            .filter(|(o, top)| since.get(o).copied().unwrap_or(0) < **top)
            .map(|(o, top)| {
                let from = since.get(o).copied().unwrap_or(0);
                let all: Vec<Offer> = self
                    .store
                    .range((*o, from + 1)..=(*o, *top))
                    .map(|(_, t)| Offer { seq: t.seq, events: t.events, hlc: t.hlc, context: t.context.clone() })
                    .collect();
                let complete = all.len() as i64 <= budget;
                Window {
                    origin: *o,
                    from,
                    top: *top,
                    offers: all.into_iter().take(budget as usize).collect(),
                    complete,
                }
            })
            .collect();
        let cut = if causal {
            serve::cut(since, &windows, budget)
        } else {
            // Format 1's cut: each origin's range in turn, by origin id.
            let mut left = budget;
            let mut cut = serve::Cut::default();
            for w in &windows {
                let mut reached = w.from;
                for o in &w.offers {
                    if left <= 0 {
                        break;
                    }
                    cut.order.push((w.origin, o.seq));
                    left -= o.events;
                    reached = o.seq;
                }
                if reached == w.offers.last().map_or(w.from, |o| o.seq) && w.complete {
                    reached = w.top;
                }
                cut.more |= reached < w.top;
                cut.from.insert(w.origin, w.from);
                cut.have.insert(w.origin, reached);
            }
            cut
        };
        Batch { txns: cut.order.iter().map(|k| self.store[k].clone()).collect(), from: cut.from, top: cut.have }
    }

    /// Apply a batch as `sync_apply` does; returns how many of its transactions went in.
    fn apply(&mut self, b: Batch) -> usize {
        let (batch, from, top) = (b.txns, &b.from, &b.top);
        let mut fresh: Vec<Pending> = batch
            .iter()
            .map(|t| Pending { origin: t.origin, seq: t.seq, prev: 0, context: t.context.clone() })
            .collect();
        delivery::link(from, &mut fresh);
        let mut last = BTreeMap::new();
        for t in &batch {
            last.insert(t.origin, t.seq);
        }
        let kept = std::mem::take(&mut self.waiting);
        let mut all: Vec<(Pending, Tx)> = kept;
        for (p, t) in fresh.into_iter().zip(batch) {
            if !all.iter().any(|(q, _)| q.origin == p.origin && q.seq == p.seq) {
                all.push((p, t));
            }
        }
        let pending: Vec<Pending> = all.iter().map(|(p, _)| p.clone()).collect();
        let delivered = delivery::plan(&mut self.have, self.id, &pending, |_| true);
        for &i in &delivered {
            let t = &all[i].1;
            self.store.insert((t.origin, t.seq), t.clone());
        }
        self.waiting = all
            .into_iter()
            .enumerate()
            .filter(|(i, (p, _))| !delivered.contains(i) && self.have.get(&p.origin).copied().unwrap_or(0) < p.seq)
            .map(|(_, x)| x)
            .collect();
        delivery::raise(&mut self.have, self.id, from, top, &last);
        delivered.len()
    }

    fn lacks_from(&self, peer: &Node) -> bool {
        peer.have.iter().any(|(o, n)| *o != self.id && self.have.get(o).copied().unwrap_or(0) < *n)
    }
}

/// A history: `nodes` nodes, each step a write (with 0 or 1 rolled-back numbers before it,
/// 1 to 3 events) or a full sync from another node. The last node is the one that was away:
/// it stops taking part at `away`.
fn history(nodes: usize, steps: &[(u8, u8, u8)], away: usize) -> Vec<Node> {
    let mut ns: Vec<Node> = (0..nodes).map(|i| Node::new(i as u128 + 1)).collect();
    for (k, &(who, what, arg)) in steps.iter().enumerate() {
        let last = nodes - 1;
        let who = who as usize % if k >= away { last } else { nodes };
        if what % 3 == 0 {
            let from = (who + 1 + arg as usize % (nodes - 1)) % nodes;
            if k >= away && from == last {
                continue;
            }
            let other = ns[from].clone();
            ns[who].merge(&other);
        } else {
            ns[who].write((arg % 2) as i64, 1 + (arg % 3) as i64, (what as i64 * 31 + arg as i64) % 97);
        }
    }
    ns
}

/// Pull into the last node from random peers until it lacks nothing; returns the pulls made.
fn catch_up(ns: &mut [Node], picks: &[(u8, u8)], causal: bool) -> Result<usize, TestCaseError> {
    let me = ns.len() - 1;
    let total: usize = ns.iter().map(|n| n.store.len()).sum();
    // Bounded: each pull moves the node or (after a stall) asks differently.
    let bound = 4 * total + 50;
    let mut stalled: BTreeMap<usize, bool> = BTreeMap::new();
    for round in 0..bound {
        if !ns[..me].iter().any(|p| ns[me].lacks_from(p)) {
            return Ok(round);
        }
        let (_, size) = picks[round % picks.len()];
        // A random start, then every peer in turn, as the worker pulls each peer every interval.
        let q = (picks[(round / me) % picks.len()].0 as usize + round) % me;
        let budget = 1 + size as i64 % 8;
        let puller = &ns[me];
        let waiting: Vec<Pending> = puller.waiting.iter().map(|(p, _)| p.clone()).collect();
        let theirs = stalled.get(&q).copied().unwrap_or(false).then_some(&ns[q].have);
        let ask = delivery::ask_for(&puller.have, puller.id, &waiting, theirs);
        let batch = ns[q].serve(&ask, budget, causal);
        let lacked = ns[me].lacks_from(&ns[q]);
        let before: i64 = ns[me].have.values().sum();
        let n = batch.txns.len();
        let applied = ns[me].apply(batch);
        let after: i64 = ns[me].have.values().sum();
        if causal {
            prop_assert_eq!(applied, n, "a causal batch applies whole, in its order");
            prop_assert!(ns[me].waiting.is_empty());
            if lacked {
                prop_assert!(after > before, "pull {} from node {} made no progress", round, q);
            }
        }
        stalled.insert(q, lacked && after == before);
    }
    Err(TestCaseError::fail(format!("still lacking after {bound} pulls")))
}

fn check_caught_up(ns: &[Node]) -> Result<(), TestCaseError> {
    let me = ns.len() - 1;
    for p in &ns[..me] {
        for (o, n) in &p.have {
            if *o != ns[me].id {
                prop_assert!(ns[me].have.get(o).copied().unwrap_or(0) >= *n);
                for (k, _) in p.store.range((*o, 0)..=(*o, *n)) {
                    prop_assert!(ns[me].store.contains_key(k), "{:?} missing", k);
                }
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Served in causal order: every pull applies its whole batch and moves the node.
    #[test]
    fn every_pull_makes_progress_and_catching_up_terminates(
        nodes in 3usize..5,
        steps in prop::collection::vec((any::<u8>(), any::<u8>(), any::<u8>()), 1..120),
        away in 0usize..120,
        picks in prop::collection::vec((any::<u8>(), any::<u8>()), 1..20),
    ) {
        let mut ns = history(nodes, &steps, away);
        catch_up(&mut ns, &picks, true)?;
        check_caught_up(&ns)?;
    }

    /// A peer serving in format 1's order (each origin in turn) cannot keep a node waiting for
    /// ever: it keeps what waits, asks past it, and after a pull that applied nothing asks only
    /// for what the waiting transactions miss.
    #[test]
    fn a_peer_serving_out_of_causal_order_cannot_stall_the_node(
        nodes in 3usize..5,
        steps in prop::collection::vec((any::<u8>(), any::<u8>(), any::<u8>()), 1..120),
        away in 0usize..120,
        picks in prop::collection::vec((any::<u8>(), any::<u8>()), 1..20),
    ) {
        let mut ns = history(nodes, &steps, away);
        catch_up(&mut ns, &picks, false)?;
        check_caught_up(&ns)?;
    }
}
