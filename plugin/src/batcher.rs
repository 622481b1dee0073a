//! When to seal a batch: a plain state machine that is handed `now`, so it
//! is tested without clocks or sleeps. The sealer task drives it.

use std::collections::VecDeque;

/// Sealing policy: whichever of size and age is reached first.
#[derive(Debug, Clone, Copy)]
pub struct BatchPolicy {
    pub max_batch_size: u64,
    pub max_batch_age_ms: u64,
}

#[derive(Debug, Clone)]
pub struct Batcher {
    policy: BatchPolicy,
    /// Leaves waiting in the open batch.
    pending: u64,
    /// When the pending leaves arrived, oldest first: (count, at_ms). Leaves
    /// left over after a seal by size keep their own arrival time, so no
    /// leaf waits longer than the maximum age.
    arrivals: VecDeque<(u64, u64)>,
}

impl Batcher {
    pub fn new(policy: BatchPolicy) -> Self {
        Batcher { policy, pending: 0, arrivals: VecDeque::new() }
    }

    /// Records `n` new leaves at `now_ms`.
    pub fn add(&mut self, n: u64, now_ms: u64) {
        if n > 0 {
            self.pending += n;
            self.arrivals.push_back((n, now_ms));
        }
    }

    /// How many leaves to seal now (0: none). Never more than the max size.
    pub fn due(&self, now_ms: u64) -> u64 {
        if self.pending >= self.policy.max_batch_size {
            return self.policy.max_batch_size;
        }
        match self.deadline_ms() {
            Some(d) if now_ms >= d => self.pending,
            _ => 0,
        }
    }

    /// Everything pending, for a final seal at shutdown, capped at max size.
    pub fn flush(&self) -> u64 {
        self.pending.min(self.policy.max_batch_size)
    }

    /// Records that the `n` oldest leaves were sealed.
    pub fn sealed(&mut self, n: u64) {
        let mut left = n.min(self.pending);
        self.pending -= left;
        while left > 0 {
            let Some(front) = self.arrivals.front_mut() else { break };
            let take = front.0.min(left);
            front.0 -= take;
            left -= take;
            if front.0 == 0 {
                self.arrivals.pop_front();
            }
        }
    }

    /// When the open batch must be sealed by age: the oldest pending
    /// leaf's arrival plus the maximum age.
    pub fn deadline_ms(&self) -> Option<u64> {
        self.arrivals.front().map(|(_, t)| t.saturating_add(self.policy.max_batch_age_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batcher() -> Batcher {
        Batcher::new(BatchPolicy { max_batch_size: 10, max_batch_age_ms: 100 })
    }

    #[test]
    fn seals_by_age() {
        let mut b = batcher();
        assert_eq!(b.deadline_ms(), None);
        b.add(3, 1000);
        assert_eq!(b.due(1099), 0);
        assert_eq!(b.deadline_ms(), Some(1100));
        assert_eq!(b.due(1100), 3);
        b.sealed(3);
        assert_eq!(b.deadline_ms(), None);
    }

    #[test]
    fn seals_by_size_and_carries_leftovers() {
        let mut b = batcher();
        b.add(25, 0);
        assert_eq!(b.due(0), 10);
        b.sealed(10);
        assert_eq!(b.due(5), 10);
        b.sealed(10);
        assert_eq!(b.due(6), 0);
        // The 5 left over arrived at 0: they are due at 0 + 100, not 100
        // after the last seal.
        assert_eq!(b.deadline_ms(), Some(100));
        assert_eq!(b.flush(), 5);
    }

    #[test]
    fn no_leaf_waits_longer_than_the_max_age() {
        let mut b = batcher();
        b.add(8, 0);
        b.add(4, 50);
        b.add(1, 60);
        assert_eq!(b.due(60), 10);
        b.sealed(10);
        // Left: 2 leaves from 50 and 1 from 60. They are due at 50 + 100,
        // not 100 after the seal at 60.
        assert_eq!(b.deadline_ms(), Some(150));
        assert_eq!(b.due(149), 0);
        assert_eq!(b.due(150), 3);
        b.sealed(3);
        assert_eq!((b.deadline_ms(), b.due(1000), b.flush()), (None, 0, 0));
    }
}
