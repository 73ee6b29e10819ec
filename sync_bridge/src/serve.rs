//! Which transactions a node serves to a peer that lacks them, and in what order.
//!
//! The rule (PROTOCOL.md, "Batch"): every transaction in a batch comes after everything it
//! depends on that the batch holds: the earlier transactions of its origin, and for every
//! other origin what its causal context names. Any prefix of a batch is then applicable by a
//! node that holds what its have-vector says, so every pull makes progress however far behind
//! the puller is and however small the batch. (Cutting each origin's range in turn, as format 1
//! did, filled a batch with one origin's transactions that depended on another origin's left
//! out: the puller held them all as waiting and asked for the same batch again, forever.)
//!
//! The serving node holds everything its transactions depend on (it applied them in causal
//! order), so such an order always exists: `cut` merges the origins' ranges, taking at each
//! step, among the transactions whose dependencies are already in the batch or held by the
//! caller, the one with the smallest clock.

use std::collections::BTreeMap;
use uuid::Uuid;

/// One transaction this node can serve.
#[derive(Clone, Debug, PartialEq)]
pub struct Offer {
    pub seq: i64,
    /// How many events it has (what the batch budget counts).
    pub events: i64,
    /// Its greatest clock: among ready transactions the oldest goes first.
    pub hlc: i64,
    /// What its origin held of every origin when it wrote (the events' `vclock`).
    pub context: BTreeMap<Uuid, i64>,
}

/// What this node holds of one origin beyond what the caller holds.
#[derive(Clone, Debug, PartialEq)]
pub struct Window {
    pub origin: Uuid,
    /// The caller holds the origin up to here.
    pub from: i64,
    /// This node holds it up to here.
    pub top: i64,
    /// The origin's transactions after `from`, oldest first: every one in `(from, top]` when
    /// `complete`, else only the first of them (the rest were not read).
    pub offers: Vec<Offer>,
    pub complete: bool,
}

/// A batch's contents: which transactions, in which order, and the range it covers.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Cut {
    /// `(origin, seq)` in the order to send them.
    pub order: Vec<(Uuid, i64)>,
    /// Per origin with a window: the caller's position, and where the batch takes it.
    pub from: BTreeMap<Uuid, i64>,
    pub have: BTreeMap<Uuid, i64>,
    /// True when this node holds more than the batch carries.
    pub more: bool,
}

/// The transactions to send, about `budget` events of them (a transaction is never split, so
/// the last one may go beyond), each after what it depends on. `since` is the caller's
/// have-vector (what it holds needs no sending).
pub fn cut(since: &BTreeMap<Uuid, i64>, windows: &[Window], budget: i64) -> Cut {
    let mut next = vec![0usize; windows.len()];
    let index: BTreeMap<Uuid, usize> = windows.iter().enumerate().map(|(i, w)| (w.origin, i)).collect();
    // Whether every transaction of `origin` up to `need` is held by the caller or already sent.
    let covered = |next: &[usize], origin: &Uuid, need: i64| {
        if since.get(origin).copied().unwrap_or(0) >= need {
            return true;
        }
        let Some(&w) = index.get(origin) else { return false };
        let win = &windows[w];
        match win.offers.get(next[w]) {
            Some(head) => head.seq > need,
            None if win.complete => need <= win.top,
            None => win.offers.last().is_some_and(|last| last.seq >= need),
        }
    };
    let mut order = Vec::new();
    let mut left = budget;
    while left > 0 {
        let ready = windows
            .iter()
            .enumerate()
            .filter_map(|(w, win)| win.offers.get(next[w]).map(|head| (w, win, head)))
            .filter(|(_, win, head)| head.context.iter().all(|(o, need)| *o == win.origin || covered(&next, o, *need)))
            .min_by_key(|(_, win, head)| (head.hlc, win.origin));
        let Some((w, win, head)) = ready else { break };
        order.push((win.origin, head.seq));
        left -= head.events.max(1);
        next[w] += 1;
    }
    let mut out = Cut { order, ..Cut::default() };
    for (w, win) in windows.iter().enumerate() {
        let all_sent = next[w] == win.offers.len();
        let reached = if all_sent && win.complete {
            win.top
        } else {
            next[w].checked_sub(1).map_or(win.from, |i| win.offers[i].seq)
        };
        out.more |= reached < win.top;
        out.from.insert(win.origin, win.from);
        out.have.insert(win.origin, reached);
    }
    out
}

/// The origins a caller holding `since` lacks changes of that the source deleted from its log
/// (`pruned`: per origin, the greatest number deleted): per origin, that number. None of them
/// may be served, since a batch of what is left would have a hole in it.
pub fn gone(pruned: &BTreeMap<Uuid, i64>, since: &BTreeMap<Uuid, i64>) -> BTreeMap<Uuid, i64> {
    pruned.iter().filter(|(o, n)| since.get(o).copied().unwrap_or(0) < **n).map(|(o, n)| (*o, *n)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    fn offer(seq: i64, hlc: i64, context: &[(u128, i64)]) -> Offer {
        Offer { seq, events: 1, hlc, context: context.iter().map(|(o, s)| (node(*o), *s)).collect() }
    }

    fn window(origin: u128, from: i64, top: i64, offers: Vec<Offer>) -> Window {
        Window { origin: node(origin), from, top, offers, complete: true }
    }

    /// The case: origin 1's transactions all depend on origin 2's, which sort after it.
    /// A batch of two takes origin 2's first transaction first.
    #[test]
    fn a_dependency_of_another_origin_comes_first() {
        let windows = [
            window(1, 0, 2, vec![offer(1, 10, &[(2, 1)]), offer(2, 30, &[(2, 2)])]),
            window(2, 0, 2, vec![offer(1, 5, &[]), offer(2, 20, &[(1, 1)])]),
        ];
        let c = cut(&BTreeMap::new(), &windows, 2);
        assert_eq!(c.order, vec![(node(2), 1), (node(1), 1)]);
        assert_eq!(c.have, BTreeMap::from([(node(1), 1), (node(2), 1)]));
        assert!(c.more);
        let all = cut(&BTreeMap::new(), &windows, 10);
        assert_eq!(all.order, vec![(node(2), 1), (node(1), 1), (node(2), 2), (node(1), 2)]);
        assert_eq!(all.have, BTreeMap::from([(node(1), 2), (node(2), 2)]));
        assert!(!all.more);
    }

    /// What the caller holds counts as sent; a window that was not read to its end does not
    /// cover what lies beyond what was read.
    #[test]
    fn held_and_unread_dependencies() {
        let since = BTreeMap::from([(node(2), 7)]);
        let c = cut(&since, &[window(1, 0, 1, vec![offer(1, 1, &[(2, 7)])])], 5);
        assert_eq!(c.order, vec![(node(1), 1)]);
        let mut partial = window(2, 0, 9, vec![offer(3, 1, &[])]);
        partial.complete = false;
        let c = cut(&BTreeMap::new(), &[window(1, 0, 1, vec![offer(1, 2, &[(2, 5)])]), partial], 5);
        assert_eq!(c.order, vec![(node(2), 3)]);
        assert_eq!(c.have, BTreeMap::from([(node(1), 0), (node(2), 3)]));
        assert!(c.more);
    }

    /// Numbers of rolled-back transactions are covered once the batch passes them, and a range
    /// with no transaction at all is covered whole.
    #[test]
    fn gaps_are_covered() {
        let c = cut(&BTreeMap::new(), &[window(1, 0, 9, vec![offer(4, 1, &[])]), window(2, 3, 8, vec![])], 5);
        assert_eq!(c.have, BTreeMap::from([(node(1), 9), (node(2), 8)]));
        assert_eq!(c.from, BTreeMap::from([(node(1), 0), (node(2), 3)]));
        assert!(!c.more);
    }

    #[test]
    fn only_origins_pruned_past_the_caller_are_gone() {
        let (a, b, c) = (Uuid::from_u128(1), Uuid::from_u128(2), Uuid::from_u128(3));
        let pruned = BTreeMap::from([(a, 10), (b, 5)]);
        // Holds a up to 10 (nothing it lacks was deleted), b up to 4, and nothing of c.
        let since = BTreeMap::from([(a, 10), (b, 4), (c, 7)]);
        assert_eq!(gone(&pruned, &since), BTreeMap::from([(b, 5)]));
        // A node that never heard of a lacks what was pruned of it.
        assert_eq!(gone(&pruned, &BTreeMap::new()), pruned);
    }
}
