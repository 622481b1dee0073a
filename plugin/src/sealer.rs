//! The sealer: turns persisted leaves into batches, appends batch records to
//! the log, signs a checkpoint per batch, stores it all atomically, then
//! anchors the checkpoint in every ledger and publishes it retained on
//! `notary/checkpoint`.
//!
//! Crash safety: leaves are already durable when they reach the sealer. At
//! start it reloads leaves past the last sealed batch and re-anchors any
//! checkpoint without a receipt (anchoring is idempotent), so a crash at any
//! point loses nothing that ingest persisted.

use crate::batcher::{BatchPolicy, Batcher};
use crate::metrics::Metrics;
use crate::source::{now_ms, Outbox};
use crate::store::{Store, StoreError};
use notary_anchor::Anchor;
use notary_proof::tree::{self, NodeSource};
use notary_proof::{BatchRecord, BatchTree, Checkpoint, Hash, NoteSigner};
use std::collections::VecDeque;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::Duration;

pub const CHECKPOINT_TOPIC: &str = "notary/checkpoint";
/// Wait between anchoring retries while a ledger fails.
const ANCHOR_RETRY_MS: u64 = 1000;
/// Pause after a failed seal (store error) before the next attempt.
const SEAL_RETRY: std::time::Duration = std::time::Duration::from_millis(200);

pub(crate) enum SealerMsg {
    /// Persisted leaves, in sequence order: (seq, leaf hash).
    Leaves(Vec<(u64, Hash)>),
}

pub(crate) struct Sealer {
    pub store: Store,
    pub signer: NoteSigner,
    pub anchors: Vec<Arc<dyn Anchor>>,
    pub outbox: Arc<dyn Outbox>,
    pub policy: BatchPolicy,
    pub metrics: Arc<Metrics>,
}

struct State {
    batcher: Batcher,
    pending: VecDeque<(u64, Hash)>,
    next_number: u64,
    anchor_retry_at: Option<u64>,
}

impl Sealer {
    /// Leaves persisted but not sealed (after a crash or a fast shutdown).
    pub fn recover(&self) -> Result<Vec<(u64, Hash)>, StoreError> {
        let from = self.store.last_batch()?.map_or(0, |b| b.first_seq + b.size);
        Ok(self
            .store
            .leaves_from(from)?
            .into_iter()
            .map(|l| (l.seq, notary_proof::hash::leaf_hash(&l.record)))
            .collect())
    }

    pub fn run(mut self, rx: Receiver<SealerMsg>, recovered: Vec<(u64, Hash)>) {
        let next_number = match self.store.log_size() {
            Ok(n) => n,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the log; sealer stops");
                return;
            }
        };
        let mut st = State {
            batcher: Batcher::new(self.policy),
            pending: VecDeque::new(),
            next_number,
            anchor_retry_at: Some(0),
        };
        if !recovered.is_empty() {
            tracing::info!(count = recovered.len(), "sealing leaves persisted before the last stop");
            st.batcher.add(recovered.len() as u64, now_ms());
            st.pending.extend(recovered);
        }
        self.publish_latest();
        loop {
            let deadline = match (st.batcher.deadline_ms(), st.anchor_retry_at) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            match recv_until(&rx, deadline) {
                Ok(Some(SealerMsg::Leaves(leaves))) => {
                    st.batcher.add(leaves.len() as u64, now_ms());
                    st.pending.extend(leaves);
                }
                Ok(None) => {}
                Err(()) => break,
            }
            self.seal_due(&mut st, false);
            if st.anchor_retry_at.is_some_and(|t| now_ms() >= t) {
                self.anchor_pending(&mut st);
            }
        }
        // Shutdown: seal everything left, then make a last anchoring attempt.
        self.seal_due(&mut st, true);
        self.anchor_pending(&mut st);
        tracing::info!(log_size = st.next_number, "sealer finished");
    }

    fn seal_due(&mut self, st: &mut State, flush: bool) {
        loop {
            let now = now_ms();
            let n = if flush { st.batcher.flush() } else { st.batcher.due(now) };
            if n == 0 {
                return;
            }
            match self.seal(st, n as usize, now) {
                Ok(()) => {
                    st.batcher.sealed(n);
                    self.anchor_pending(st);
                }
                Err(e) => {
                    // Leaves stay pending and are sealed on the next attempt;
                    // pause so a failing disk is not hammered.
                    tracing::error!(error = %e, "sealing failed; will retry");
                    std::thread::sleep(SEAL_RETRY);
                    return;
                }
            }
        }
    }

    fn seal(&mut self, st: &mut State, n: usize, now: u64) -> Result<(), StoreError> {
        let leaves: Vec<Hash> = st.pending.iter().take(n).map(|(_, h)| *h).collect();
        let first_seq = st.pending.front().map_or(0, |(s, _)| *s);
        let Some(tree) = BatchTree::new(&leaves) else { return Ok(()) };
        let batch = BatchRecord {
            number: st.next_number,
            first_seq,
            size: leaves.len() as u64,
            root: tree.root(),
            sealed_at_ms: now,
        };
        // Upper batch-tree nodes, stored so any path is served from at most
        // 64 leaves; rs_merkle's root above is the one the batch commits to.
        let mut full = tree::MemoryTree::new();
        leaves.iter().for_each(|h| full.append(*h));
        let batch_nodes = full.perfect_nodes(crate::store::BATCH_NODE_MIN_LEVEL);
        let nodes = self.store.nodes_after_append(batch.number, batch.leaf_hash())?;
        let root = tree::root(&mut Overlay { store: &self.store, extra: &nodes }, batch.number + 1)?;
        let checkpoint = Checkpoint { origin: self.signer.name().to_owned(), size: batch.number + 1, root };
        let note = self.signer.sign(&checkpoint.body());
        // One transaction: on failure nothing changed and the caller retries.
        self.store.seal(&batch, &batch_nodes, &nodes, &note)?;
        st.pending.drain(..n);
        st.next_number += 1;
        Metrics::inc(&self.metrics.batches_sealed_total);
        Metrics::inc(&self.metrics.checkpoints_signed_total);
        tracing::debug!(batch = batch.number, size = batch.size, "sealed");
        st.anchor_retry_at = Some(0);
        Ok(())
    }

    /// Anchors every checkpoint some ledger has not recorded yet, oldest
    /// first, then publishes the newest checkpoint.
    fn anchor_pending(&self, st: &mut State) {
        let mut failed = false;
        for anchor in &self.anchors {
            let todo = match self.store.unanchored(anchor.name()) {
                Ok(t) => t,
                Err(e) => {
                    tracing::error!(error = %e, "cannot list unanchored checkpoints");
                    failed = true;
                    continue;
                }
            };
            for (size, note) in todo {
                match anchor.anchor(&note, now_ms()) {
                    Ok(receipt) => {
                        if let Err(e) = self.store.put_receipt(size, anchor.name(), &receipt) {
                            tracing::error!(error = %e, size, "cannot store receipt");
                            failed = true;
                            break;
                        }
                        Metrics::inc(&self.metrics.anchors_total);
                    }
                    Err(e) => {
                        Metrics::inc(&self.metrics.anchor_failures_total);
                        tracing::warn!(ledger = anchor.name(), size, error = %e, "anchoring failed; will retry");
                        failed = true;
                        break;
                    }
                }
            }
        }
        st.anchor_retry_at = failed.then(|| now_ms() + ANCHOR_RETRY_MS);
        self.publish_latest();
    }

    fn publish_latest(&self) {
        if let Ok(Some((_, note))) = self.store.latest_checkpoint() {
            if !self.outbox.publish(CHECKPOINT_TOPIC, note.into_bytes(), true) {
                Metrics::inc(&self.metrics.outbox_dropped_total);
            }
        }
    }
}

/// The store's log nodes plus those of a batch being sealed.
struct Overlay<'a> {
    store: &'a Store,
    extra: &'a [(u32, u64, Hash)],
}

impl NodeSource for Overlay<'_> {
    type Error = StoreError;
    fn node(&mut self, level: u32, index: u64) -> Result<Hash, StoreError> {
        match self.extra.iter().find(|(l, i, _)| *l == level && *i == index) {
            Some((_, _, h)) => Ok(*h),
            None => self.store.log_node(level, index),
        }
    }
}

/// Waits on a receiver until `deadline_ms` (or forever).
fn recv_until<T>(rx: &Receiver<T>, deadline_ms: Option<u64>) -> Result<Option<T>, ()> {
    match deadline_ms {
        None => rx.recv().map(Some).map_err(|_| ()),
        Some(d) => {
            let wait = Duration::from_millis(d.saturating_sub(now_ms()));
            match rx.recv_timeout(wait) {
                Ok(v) => Ok(Some(v)),
                Err(RecvTimeoutError::Timeout) => Ok(None),
                Err(RecvTimeoutError::Disconnected) => Err(()),
            }
        }
    }
}
