//! Causal delivery: which received origin transactions may be applied now.
//!
//! A node applies an origin transaction only when it already holds everything that transaction
//! could have seen: every earlier transaction of the same origin, and, for every other origin,
//! the events its causal context names. Then "has seen" between versions of a row is
//! decided by the context of the newer one alone (see `resolve`), and a child row written after
//! its parent, on any node, is never applied before the parent.
//!
//! Origin numbers have gaps (rolled-back transactions never commit). A batch covers a range
//! `(from, have]` of an origin completely, so each transaction carries `prev`: the number of the
//! transaction before it in its batch, or the batch's `from` for the first one. A transaction
//! is next in line when the node holds its origin up to at least `prev`.

use std::collections::BTreeMap;
use uuid::Uuid;

/// One received origin transaction, as far as delivery is concerned.
#[derive(Clone, Debug, PartialEq)]
pub struct Pending {
    pub origin: Uuid,
    pub seq: i64,
    /// The origin's number before this one in the batch it came in (or the batch's `from`).
    pub prev: i64,
    /// What the origin held of every origin when it wrote (its own entry is `seq`).
    pub context: BTreeMap<Uuid, i64>,
}

/// Why a transaction cannot be applied yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Wait {
    /// Already held: nothing to do.
    Known,
    /// The origin's earlier transactions up to `prev` are missing.
    Predecessor { origin: Uuid, need: i64, have: i64 },
    /// Something the origin had seen is missing.
    Context { origin: Uuid, need: i64, have: i64 },
}

/// Widen `context` to cover `other` too (per origin the greater number): a transaction's
/// context is the widest of its events' (one per `sync_log` row it was written in).
pub fn widen(context: &mut BTreeMap<Uuid, i64>, other: &BTreeMap<Uuid, i64>) {
    for (origin, n) in other {
        let c = context.entry(*origin).or_insert(*n);
        *c = (*c).max(*n);
    }
}

/// `Ok` when `t` may be applied on node `me`, holding `have` (origin -> contiguous prefix).
/// This node's own entry in a context is always held: it can only name committed local events.
pub fn check(have: &BTreeMap<Uuid, i64>, me: Uuid, t: &Pending) -> Result<(), Wait> {
    let held = |o: &Uuid| have.get(o).copied().unwrap_or(0);
    let own = held(&t.origin);
    if t.seq <= own {
        return Err(Wait::Known);
    }
    if own < t.prev {
        return Err(Wait::Predecessor { origin: t.origin, need: t.prev, have: own });
    }
    for (origin, need) in &t.context {
        if *origin != t.origin && *origin != me && held(origin) < *need {
            return Err(Wait::Context { origin: *origin, need: *need, have: held(origin) });
        }
    }
    Ok(())
}

/// Give each transaction of a batch, listed in batch order, its `prev`: the number of the
/// transaction before it of the same origin in the batch, or the batch's `from` for the first.
pub fn link(from: &BTreeMap<Uuid, i64>, txns: &mut [Pending]) {
    let mut last: BTreeMap<Uuid, i64> = BTreeMap::new();
    for t in txns {
        t.prev = last.insert(t.origin, t.seq).unwrap_or_else(|| from.get(&t.origin).copied().unwrap_or(0));
    }
}

/// The order to apply `pending` in, starting from `have`: passes over `pending` in the order
/// given (a batch's order, in which each transaction follows what it depends on, so one pass
/// usually delivers everything), each delivering what may be applied, until a pass delivers
/// nothing. Returns the indexes of the deliverable ones in order; the others wait.
/// `applied(i)` is asked whether applying index `i` succeeded: a transaction that failed is
/// held and everything that depends on it waits.
pub fn plan(
    have: &mut BTreeMap<Uuid, i64>,
    me: Uuid,
    pending: &[Pending],
    mut applied: impl FnMut(usize) -> bool,
) -> Vec<usize> {
    let mut done = vec![false; pending.len()];
    let mut delivered = Vec::new();
    loop {
        let mut progress = false;
        for (i, t) in pending.iter().enumerate() {
            if done[i] || check(have, me, t).is_err() {
                continue;
            }
            done[i] = true;
            if applied(i) {
                have.insert(t.origin, t.seq);
                delivered.push(i);
                progress = true;
            }
        }
        if !progress {
            return delivered;
        }
    }
}

/// After a batch: it covers each origin's `(from[o], top[o]]` whole, so once the node holds
/// every transaction of `o` the batch carried (`last[o]`, the greatest) and at least `from[o]`,
/// it holds `o` up to `top[o]` (the numbers in between were rolled back at the origin).
pub fn raise(
    have: &mut BTreeMap<Uuid, i64>,
    me: Uuid,
    from: &BTreeMap<Uuid, i64>,
    top: &BTreeMap<Uuid, i64>,
    last: &BTreeMap<Uuid, i64>,
) {
    for (origin, &top) in top {
        if *origin == me {
            continue;
        }
        let held = have.get(origin).copied().unwrap_or(0);
        let from = from.get(origin).copied().unwrap_or(0);
        let last = last.get(origin).copied().unwrap_or(from);
        if held >= from && held >= last && top > held {
            have.insert(*origin, top);
        }
    }
}

/// What to ask a peer for: the have-vector, raised per origin over the transactions kept
/// waiting (`waiting`, each with its `prev`) that follow on without a gap. Those are held
/// already and need not come again; they are applied once what they wait for arrives.
pub fn reach(have: &BTreeMap<Uuid, i64>, waiting: &[Pending]) -> BTreeMap<Uuid, i64> {
    let mut out = have.clone();
    let mut sorted: Vec<&Pending> = waiting.iter().collect();
    sorted.sort_by_key(|t| (t.origin, t.seq));
    for t in sorted {
        let at = out.entry(t.origin).or_insert(0);
        if t.prev <= *at && t.seq > *at {
            *at = t.seq;
        }
    }
    out
}

/// What the `waiting` transactions wait for that no waiting transaction supplies: per origin,
/// the number this node must reach. Empty when they only wait for each other (or for one that
/// failed here, which a peer cannot supply either).
pub fn missing(have: &BTreeMap<Uuid, i64>, me: Uuid, waiting: &[Pending]) -> BTreeMap<Uuid, i64> {
    let kept = reach(have, waiting);
    let held = |o: &Uuid| kept.get(o).copied().unwrap_or(0);
    let mut out: BTreeMap<Uuid, i64> = BTreeMap::new();
    let mut need = |origin: Uuid, n: i64| {
        let e = out.entry(origin).or_insert(n);
        *e = (*e).max(n);
    };
    for t in waiting {
        if held(&t.origin) < t.seq {
            // Not reached without a gap: the numbers before it are missing.
            need(t.origin, t.prev);
        }
        for (origin, n) in &t.context {
            if *origin != t.origin && *origin != me && held(origin) < *n {
                need(*origin, *n);
            }
        }
    }
    out
}

/// The have-vector to send a peer in a pull. Normally `reach(have, waiting)`. When the last
/// pull from this peer applied nothing (`stalled`, with the peer's have-vector), ask only for
/// the origins the waiting transactions miss: every other origin is asked from where the peer
/// holds it, so the peer sends nothing of them. A peer that serves in causal order never causes
/// this; one that does not (a bug, an old version) still cannot keep this node waiting for ever.
pub fn ask_for(
    have: &BTreeMap<Uuid, i64>,
    me: Uuid,
    waiting: &[Pending],
    stalled: Option<&BTreeMap<Uuid, i64>>,
) -> BTreeMap<Uuid, i64> {
    let mut ask = reach(have, waiting);
    let Some(theirs) = stalled else { return ask };
    let missing = missing(have, me, waiting);
    if missing.is_empty() {
        return ask;
    }
    for (origin, n) in theirs {
        if !missing.contains_key(origin) {
            let a = ask.entry(*origin).or_insert(0);
            *a = (*a).max(*n);
        }
    }
    ask
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn node(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    fn pending(origin: u128, seq: i64, prev: i64, context: &[(u128, i64)]) -> Pending {
        Pending { origin: node(origin), seq, prev, context: context.iter().map(|(o, s)| (node(*o), *s)).collect() }
    }

    #[test]
    fn waits_for_predecessor_and_context() {
        let have = BTreeMap::from([(node(1), 2)]);
        assert_eq!(check(&have, node(9), &pending(1, 2, 1, &[])), Err(Wait::Known));
        assert_eq!(
            check(&have, node(9), &pending(1, 5, 4, &[])),
            Err(Wait::Predecessor { origin: node(1), need: 4, have: 2 })
        );
        // Numbers 3 and 4 rolled back at the origin: the batch says 5 follows 2.
        assert_eq!(check(&have, node(9), &pending(1, 5, 2, &[(1, 5)])), Ok(()));
        assert_eq!(
            check(&have, node(9), &pending(2, 1, 0, &[(1, 3)])),
            Err(Wait::Context { origin: node(1), need: 3, have: 2 })
        );
        // Our own events named in a context are always held.
        assert_eq!(check(&have, node(9), &pending(2, 1, 0, &[(9, 100)])), Ok(()));
    }

    #[test]
    fn failed_transaction_holds_its_dependents() {
        let mut have = BTreeMap::new();
        let txns = [pending(1, 1, 0, &[]), pending(1, 2, 1, &[]), pending(2, 1, 0, &[(1, 2)]), pending(3, 1, 0, &[])];
        let delivered = plan(&mut have, node(9), &txns, |i| i != 1);
        assert_eq!(delivered, vec![0, 3]);
        assert_eq!(have.get(&node(1)), Some(&1));
        assert_eq!(have.get(&node(2)), None);
    }

    proptest! {
        /// Transactions of a causally consistent history, offered in any order, are all
        /// delivered, each after everything in its context.
        #[test]
        fn any_arrival_order_delivers_everything_causally(
            steps in prop::collection::vec((0u8..3, any::<bool>()), 1..60),
            seed in any::<u64>(),
        ) {
            // Three origins; each write sees what its node holds; a sync copies a prefix.
            let mut held = [[0i64; 3]; 3];
            let mut txns = Vec::new();
            for (i, &(n, write)) in steps.iter().enumerate() {
                let n = n as usize;
                if write {
                    held[n][n] += 1;
                    let context = (0..3).map(|o| (node(o as u128 + 1), held[n][o])).collect();
                    txns.push(Pending { origin: node(n as u128 + 1), seq: held[n][n], prev: held[n][n] - 1, context });
                } else {
                    let from = (n + 1 + i % 2) % 3;
                    // Copying a node's whole holdings keeps every node causally closed.
                    let source = held[from];
                    for (mine, theirs) in held[n].iter_mut().zip(source) {
                        *mine = (*mine).max(theirs);
                    }
                }
            }
            let mut shuffled: Vec<Pending> = txns.clone();
            let mut s = seed | 1;
            for i in (1..shuffled.len()).rev() {
                s ^= s << 13; s ^= s >> 7; s ^= s << 17;
                shuffled.swap(i, (s % (i as u64 + 1)) as usize);
            }
            let mut have = BTreeMap::new();
            let mut seen: Vec<Pending> = Vec::new();
            let delivered = plan(&mut have, node(9), &shuffled, |i| {
                let t = &shuffled[i];
                // Everything it depends on was delivered before it.
                for (o, need) in &t.context {
                    let got = seen.iter().filter(|p| p.origin == *o).map(|p| p.seq).max().unwrap_or(0);
                    let need = if *o == t.origin { *need - 1 } else { *need };
                    assert!(got >= need, "{t:?} delivered before {o}:{need}");
                }
                seen.push(t.clone());
                true
            });
            prop_assert_eq!(delivered.len(), txns.len());
        }
    }
}
