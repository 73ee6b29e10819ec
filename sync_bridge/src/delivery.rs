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

/// The order to apply `pending` in, starting from `have`: repeatedly the first (by origin,
/// number) transaction that may be applied. Returns the indexes of the deliverable ones in
/// order; the others wait. `applied(i)` is asked whether applying index `i` succeeded: a
/// transaction that failed is held and everything that depends on it waits.
pub fn plan(
    have: &mut BTreeMap<Uuid, i64>,
    me: Uuid,
    pending: &[Pending],
    mut applied: impl FnMut(usize) -> bool,
) -> Vec<usize> {
    let mut order: Vec<usize> = (0..pending.len()).collect();
    order.sort_by_key(|&i| (pending[i].origin, pending[i].seq));
    let mut done = vec![false; pending.len()];
    let mut delivered = Vec::new();
    loop {
        let mut progress = false;
        for &i in &order {
            if done[i] || check(have, me, &pending[i]).is_err() {
                continue;
            }
            done[i] = true;
            if applied(i) {
                have.insert(pending[i].origin, pending[i].seq);
                delivered.push(i);
                progress = true;
            }
        }
        if !progress {
            return delivered;
        }
    }
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
