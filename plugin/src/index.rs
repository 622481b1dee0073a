//! The index thread: keeps the digest index's runs few (merging them) and
//! deletes the runs merging or retention replaced (`store/digests.rs`),
//! each step one short write transaction.

use crate::health::Part;
use crate::metrics::Metrics;
use crate::store::{IndexWork, Store, Unsealed};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::Duration;

/// Pause between two steps while there is work, so ingest and the sealer
/// find the write lock free in between.
const STEP_PAUSE: Duration = Duration::from_millis(2);
/// How often it looks for work when there was none.
const IDLE_WAIT: Duration = Duration::from_millis(200);

pub struct Indexer {
    pub store: Store,
    pub unsealed: Arc<Unsealed>,
    pub metrics: Arc<Metrics>,
}

impl Indexer {
    /// Works until `stop` closes.
    pub fn run(self, stop: Receiver<()>) {
        let mut started = false;
        loop {
            let wait = match self.step(&mut started) {
                Ok(true) => STEP_PAUSE,
                Ok(false) => IDLE_WAIT,
                Err(e) => {
                    tracing::warn!(error = %e, "digest index upkeep failed; will retry");
                    self.metrics.health.failing(Part::Index, format!("cannot merge the digest index: {e}"));
                    IDLE_WAIT
                }
            };
            if !matches!(stop.recv_timeout(wait), Err(RecvTimeoutError::Timeout)) {
                return;
            }
        }
    }

    /// One step; true if it changed something (there may be more to do).
    fn step(&self, started: &mut bool) -> Result<bool, crate::store::StoreError> {
        if !*started {
            self.store.abandon_merges()?;
            *started = true;
        }
        let work = self.store.index_step()?;
        self.metrics.health.recovered(Part::Index);
        if work == IndexWork::Merged {
            Metrics::inc(&self.metrics.index_merges_total);
        }
        self.metrics.index_runs.store(self.store.index_runs()?, Relaxed);
        self.metrics.index_unsealed.store(self.unsealed.len() as u64, Relaxed);
        Ok(work != IndexWork::Idle)
    }
}
