//! Hybrid logical clock arithmetic (Kulkarni et al.), as pure functions over `u64` values.
//!
//! A timestamp packs wall-clock milliseconds in the high 48 bits and a logical counter in the
//! low 16 bits, so timestamps compare as plain integers and fit in a PostgreSQL `bigint`.
//! The shared-memory state and the time source live in the extension (`src/clock.rs`); the
//! arithmetic lives here so it can be tested with an injected clock.

use serde::{Deserialize, Serialize};

const LOGICAL_BITS: u32 = 16;
const LOGICAL_MASK: u64 = (1 << LOGICAL_BITS) - 1;

#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Hlc(pub u64);

impl Hlc {
    pub const ZERO: Hlc = Hlc(0);

    pub fn new(physical_ms: u64, logical: u16) -> Hlc {
        Hlc((physical_ms << LOGICAL_BITS) | logical as u64)
    }

    pub fn physical_ms(self) -> u64 {
        self.0 >> LOGICAL_BITS
    }

    pub fn logical(self) -> u16 {
        (self.0 & LOGICAL_MASK) as u16
    }

    /// The next local timestamp: the wall clock if it moved past `last`, otherwise `last` + 1
    /// (which carries into the millisecond when the logical counter is full). Never goes back,
    /// even when the wall clock steps backwards.
    pub fn tick(last: Hlc, now_ms: u64) -> Hlc {
        let wall = Hlc::new(now_ms, 0);
        if wall > last { wall } else { Hlc(last.0 + 1) }
    }

    /// Merge a timestamp received from a peer: the result is greater than both `last` and
    /// `remote`, so a local write made after applying a remote one is ordered after it.
    pub fn receive(last: Hlc, remote: Hlc, now_ms: u64) -> Hlc {
        Hlc::tick(last.max(remote), now_ms)
    }

    pub fn as_i64(self) -> i64 {
        self.0 as i64
    }

    pub fn from_i64(v: i64) -> Hlc {
        Hlc(v.max(0) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn follows_the_wall_clock_when_it_advances() {
        let t = Hlc::tick(Hlc::new(1000, 5), 2000);
        assert_eq!((t.physical_ms(), t.logical()), (2000, 0));
    }

    #[test]
    fn counts_logically_when_the_wall_clock_stalls_or_steps_back() {
        let last = Hlc::new(5000, 7);
        let t = Hlc::tick(last, 5000);
        assert_eq!((t.physical_ms(), t.logical()), (5000, 8));
        let back = Hlc::tick(t, 1000);
        assert_eq!((back.physical_ms(), back.logical()), (5000, 9));
    }

    #[test]
    fn logical_overflow_carries_into_milliseconds() {
        let t = Hlc::tick(Hlc::new(10, u16::MAX), 0);
        assert_eq!((t.physical_ms(), t.logical()), (11, 0));
    }

    #[test]
    fn receive_orders_after_remote() {
        let remote = Hlc::new(9000, 3);
        let t = Hlc::receive(Hlc::new(100, 0), remote, 200);
        assert!(t > remote);
    }

    proptest! {
        #[test]
        fn ticks_are_strictly_increasing(start in 0u64..1 << 40, steps in prop::collection::vec(0u64..1 << 40, 1..200)) {
            let mut last = Hlc::new(start, 0);
            for now in steps {
                let next = Hlc::tick(last, now);
                prop_assert!(next > last);
                prop_assert!(next.physical_ms() >= now.min(last.physical_ms()));
                last = next;
            }
        }

        #[test]
        fn receive_exceeds_both(last in 0u64..1 << 60, remote in 0u64..1 << 60, now in 0u64..1 << 40) {
            let t = Hlc::receive(Hlc(last), Hlc(remote), now);
            prop_assert!(t > Hlc(last) && t > Hlc(remote));
        }
    }
}
