//! The pruner: deletes old leaves, their payload index and old rejections
//! once they pass the configured horizon (`[retention]`), online, in short
//! steps, so ingest never waits long for the write lock. What is kept and
//! why: `store/retention.rs`.

use crate::health::Part;
use crate::metrics::Metrics;
use crate::store::{Store, StoreError};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::Duration;

/// When messages may be deleted. Either limit alone, or both (a batch is
/// pruned once either says so). Only a batch anchored in every ledger is
/// ever pruned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RetentionPolicy {
    /// Prune a batch once it was sealed this long ago.
    pub max_age_ms: Option<u64>,
    /// Prune the oldest batches while the store uses more bytes than this.
    pub max_bytes: Option<u64>,
}

impl RetentionPolicy {
    pub fn is_set(&self) -> bool {
        self.max_age_ms.is_some() || self.max_bytes.is_some()
    }
}

/// Pause between two pruning steps while there is work: the write lock is
/// free for ingest and the sealer in between.
const STEP_PAUSE: Duration = Duration::from_millis(2);
/// How often the pruner looks for work when there was none.
const IDLE_WAIT: Duration = Duration::from_millis(500);

pub struct Pruner {
    pub store: Store,
    pub policy: RetentionPolicy,
    /// Ledgers (by name) whose receipts the store holds: a batch is pruned
    /// only once each anchored its checkpoint.
    pub ledgers: Vec<String>,
    /// An EVM chain anchors too: wait for it to cover the batch as well.
    pub evm: bool,
    pub metrics: Arc<Metrics>,
}

impl Pruner {
    /// Prunes until `stop` closes.
    pub fn run(self, stop: Receiver<()>) {
        loop {
            let wait = match self.step() {
                Ok(true) => STEP_PAUSE,
                Ok(false) => IDLE_WAIT,
                Err(e) => {
                    tracing::warn!(error = %e, "pruning failed; will retry");
                    self.metrics.health.failing(Part::Retention, format!("cannot prune: {e}"));
                    IDLE_WAIT
                }
            };
            if !matches!(stop.recv_timeout(wait), Err(RecvTimeoutError::Timeout)) {
                return;
            }
        }
    }

    /// One step; true if it deleted something (there may be more to do).
    pub fn step(&self) -> Result<bool, StoreError> {
        let size = self.store.size()?;
        self.metrics.store_used_bytes.store(size.used_bytes, Relaxed);
        let pruned = self.store.pruned()?;
        self.metrics.pruned_batches.store(pruned.batches, Relaxed);
        self.metrics.pruned_seq.store(pruned.seq, Relaxed);
        let Some(batch) = self.store.batch(pruned.batches)? else { return Ok(false) };
        let now = crate::source::now_ms();
        let old = self.policy.max_age_ms.is_some_and(|age| batch.sealed_at_ms.saturating_add(age) <= now);
        let big = self.policy.max_bytes.is_some_and(|max| size.used_bytes > max);
        if !(old || big) {
            self.metrics.retention_blocked.store(0, Relaxed);
            return Ok(false);
        }
        if !self.anchored(batch.number + 1)? {
            self.metrics.retention_blocked.store(1, Relaxed);
            return Ok(false);
        }
        self.metrics.retention_blocked.store(0, Relaxed);
        let step = self.store.prune_step(&batch, crate::store::TOMBSTONES_KEPT_MIN)?;
        self.metrics.health.recovered(Part::Retention);
        Metrics::add(&self.metrics.pruned_leaves_total, step.leaves);
        Metrics::add(&self.metrics.pruned_rejections_total, step.rejections);
        if step.batch_done {
            tracing::debug!(batch = batch.number, "batch pruned");
        }
        Ok(true)
    }

    /// Every ledger anchored the checkpoint of `size`.
    fn anchored(&self, size: u64) -> Result<bool, StoreError> {
        for ledger in &self.ledgers {
            if !self.store.has_receipt(size, ledger)? {
                return Ok(false);
            }
        }
        Ok(!self.evm || self.store.evm_covering(size)?.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing;
    use notary_proof::Receipt;

    /// A store with one sealed batch of 10 leaves, sealed at time 0.
    fn store_with_a_batch(dir: &std::path::Path) -> Store {
        let mut store = Store::open(dir).expect("store");
        let hashes = testing::persist_leaves(&mut store, 0, 10);
        testing::seal(&mut store, 0, 0, &hashes);
        store
    }

    fn pruner(store: Store, max_age_ms: u64) -> Pruner {
        Pruner {
            store,
            policy: RetentionPolicy { max_age_ms: Some(max_age_ms), max_bytes: None },
            ledgers: vec!["local".into()],
            evm: false,
            metrics: Arc::new(Metrics::default()),
        }
    }

    /// A batch past the age limit is pruned only once the ledger anchored
    /// it; one within the limit is left alone.
    #[test]
    fn a_batch_is_pruned_past_its_age_once_anchored() {
        let dir = tempfile::tempdir().expect("temp dir");
        let young = pruner(store_with_a_batch(dir.path()), u64::MAX);
        assert!(!young.step().expect("step"), "within the age limit");
        drop(young);
        let old = pruner(Store::open(dir.path()).expect("store"), 1);
        assert!(!old.step().expect("step"), "not anchored yet");
        assert_eq!(old.metrics.retention_blocked.load(Relaxed), 1);
        let receipt = Receipt::Local {
            index: 0,
            prev_hash: [0; 32],
            checkpoint_hash: [1; 32],
            anchored_at_ms: 0,
            entry_hash: [2; 32],
            head: None,
        };
        old.store.put_receipts(&[(1, "local", receipt)]).expect("receipt");
        assert!(old.step().expect("step"), "anchored: pruned");
        assert_eq!(old.metrics.pruned_leaves_total.load(Relaxed), 10);
        assert_eq!(old.store.pruned().expect("state").batches, 1);
        assert!(!old.step().expect("step"), "nothing left to prune");
        assert_eq!(old.store.next_seq().expect("next"), 10);
    }
}
