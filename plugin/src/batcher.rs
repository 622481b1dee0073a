//! When to seal a batch: a plain state machine that is handed `now`, so it
//! is tested without clocks or sleeps. The sealer task drives it.

/// Sealing policy: whichever of size and age is reached first.
#[derive(Debug, Clone, Copy)]
pub struct BatchPolicy {
    pub max_batch_size: u64,
    pub max_batch_age_ms: u64,
}

#[derive(Debug)]
pub struct Batcher {
    policy: BatchPolicy,
    /// Leaves waiting in the open batch.
    pending: u64,
    /// When the open batch received its first leaf.
    opened_at_ms: Option<u64>,
}

impl Batcher {
    pub fn new(policy: BatchPolicy) -> Self {
        Batcher { policy, pending: 0, opened_at_ms: None }
    }

    /// Records `n` new leaves at `now_ms`.
    pub fn add(&mut self, n: u64, now_ms: u64) {
        if n > 0 && self.pending == 0 {
            self.opened_at_ms = Some(now_ms);
        }
        self.pending += n;
    }

    /// How many leaves to seal now (0: none). Never more than the max size.
    pub fn due(&self, now_ms: u64) -> u64 {
        if self.pending >= self.policy.max_batch_size {
            return self.policy.max_batch_size;
        }
        match self.opened_at_ms {
            Some(t) if now_ms >= t.saturating_add(self.policy.max_batch_age_ms) => self.pending,
            _ => 0,
        }
    }

    /// Everything pending, for a final seal at shutdown, capped at max size.
    pub fn flush(&self) -> u64 {
        self.pending.min(self.policy.max_batch_size)
    }

    /// Records that `n` leaves were sealed at `now_ms`; leftovers open a new batch.
    pub fn sealed(&mut self, n: u64, now_ms: u64) {
        self.pending -= n.min(self.pending);
        self.opened_at_ms = (self.pending > 0).then_some(now_ms);
    }

    /// When the open batch must be sealed by age, if one is open.
    pub fn deadline_ms(&self) -> Option<u64> {
        self.opened_at_ms.map(|t| t.saturating_add(self.policy.max_batch_age_ms))
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
        b.sealed(3, 1100);
        assert_eq!(b.deadline_ms(), None);
    }

    #[test]
    fn seals_by_size_and_carries_leftovers() {
        let mut b = batcher();
        b.add(25, 0);
        assert_eq!(b.due(0), 10);
        b.sealed(10, 5);
        assert_eq!(b.due(5), 10);
        b.sealed(10, 6);
        assert_eq!(b.due(6), 0);
        assert_eq!(b.deadline_ms(), Some(106));
        assert_eq!(b.flush(), 5);
    }
}
