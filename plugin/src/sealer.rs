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
use crate::health::Part;
use crate::metrics::Metrics;
use crate::source::{now_ms, Outbox};
use crate::store::{SealedBatch, Store, StoreError, Unsealed};
use notary_anchor::Anchor;
use notary_proof::tree::{self, NodeSource};
use notary_proof::{BatchRecord, BatchTree, Checkpoint, Hash, NoteSigner};
use std::collections::VecDeque;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::Duration;

/// Wait between anchoring retries while a ledger fails.
const ANCHOR_RETRY_MS: u64 = 1000;
/// Most batches sealed in one transaction.
const MAX_SEAL_ROUND: usize = 32;
/// Pause after a failed seal (store error) before the next attempt.
const SEAL_RETRY: std::time::Duration = std::time::Duration::from_millis(200);

pub(crate) enum SealerMsg {
    /// Persisted leaves, in sequence order.
    Leaves(Vec<ToSeal>),
}

/// A persisted leaf, as the sealer needs it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ToSeal {
    pub seq: u64,
    pub leaf_hash: Hash,
    /// Its payload digest, for the digest index.
    pub digest: Hash,
}

impl ToSeal {
    pub fn of(leaf: &crate::store::StoredLeaf) -> Self {
        ToSeal { seq: leaf.seq, leaf_hash: notary_proof::hash::leaf_hash(&leaf.record), digest: leaf.digest }
    }
}

pub(crate) struct Sealer {
    pub store: Store,
    pub signer: NoteSigner,
    pub anchors: Vec<Arc<dyn Anchor>>,
    pub outbox: Arc<dyn Outbox>,
    /// Where the newest checkpoint is retained.
    pub checkpoint_topic: &'static str,
    pub policy: BatchPolicy,
    pub metrics: Arc<Metrics>,
    /// The digest index of unsealed leaves: sealed ones leave it once
    /// their run is stored.
    pub unsealed: Arc<Unsealed>,
}

struct State {
    batcher: Batcher,
    pending: VecDeque<ToSeal>,
    next_number: u64,
    anchor_retry_at: Option<u64>,
}

impl Sealer {
    /// Leaves persisted but not sealed (after a crash or a fast shutdown).
    pub fn recover(&self) -> Result<Vec<ToSeal>, StoreError> {
        let from = self.store.last_batch()?.map_or(0, |b| b.first_seq + b.size);
        Ok(self.store.leaves_from(from)?.iter().map(ToSeal::of).collect())
    }

    pub fn run(mut self, rx: Receiver<SealerMsg>, recovered: Vec<ToSeal>) {
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

    /// Seals every batch that is due. When the sealer is behind, the due
    /// batches (up to [`MAX_SEAL_ROUND`]) go into one transaction: ingest
    /// holds the write lock for a whole group commit, so one transaction
    /// per batch would let the sealer fall further behind.
    fn seal_due(&mut self, st: &mut State, flush: bool) {
        loop {
            let now = now_ms();
            let mut plan = st.batcher.clone();
            let mut sealed = Vec::new();
            let mut taken = 0usize;
            let mut extra: Vec<(u32, u64, Hash)> = Vec::new();
            while sealed.len() < MAX_SEAL_ROUND {
                let n = if flush { plan.flush() } else { plan.due(now) };
                if n == 0 {
                    break;
                }
                let leaves: Vec<Hash> =
                    st.pending.iter().skip(taken).take(n as usize).map(|p| p.leaf_hash).collect();
                let first_seq = st.pending.get(taken).map_or(0, |p| p.seq);
                let number = st.next_number + sealed.len() as u64;
                match self.prepare(&leaves, first_seq, number, now, &mut extra) {
                    Ok(Some(batch)) => sealed.push(batch),
                    Ok(None) => {}
                    Err(e) => return self.seal_failed(&e),
                }
                plan.sealed(n);
                taken += n as usize;
            }
            if taken == 0 {
                return;
            }
            // One transaction: on failure nothing changed, the leaves stay
            // pending and are sealed on the next attempt.
            let digests: Vec<(Hash, u64)> =
                st.pending.iter().take(taken).map(|p| (p.digest, p.seq)).collect();
            if let Err(e) = self.store.seal(&sealed, &digests) {
                return self.seal_failed(&e);
            }
            // Only now: a lookup that misses them here finds their run.
            self.unsealed.remove(&digests);
            st.batcher = plan;
            st.pending.drain(..taken.min(st.pending.len()));
            st.next_number += sealed.len() as u64;
            self.metrics.health.recovered(Part::Sealer);
            Metrics::add(&self.metrics.batches_sealed_total, sealed.len() as u64);
            Metrics::add(&self.metrics.checkpoints_signed_total, sealed.len() as u64);
            tracing::debug!(batches = sealed.len(), log_size = st.next_number, "sealed");
            st.anchor_retry_at = Some(0);
            self.anchor_pending(st);
        }
    }

    /// Pauses after a failed seal, so a failing disk is not hammered.
    fn seal_failed(&self, e: &StoreError) {
        Metrics::inc(&self.metrics.seal_failures_total);
        self.metrics.health.failing(Part::Sealer, format!("cannot seal: {e}"));
        tracing::error!(error = %e, "sealing failed; will retry");
        std::thread::sleep(SEAL_RETRY);
    }

    /// Builds batch `number` over `leaves`: its record, stored batch-tree
    /// nodes, the log nodes its append completes (on top of the store and
    /// of `extra`, the nodes of batches prepared before it in this round,
    /// which it extends) and its signed checkpoint.
    fn prepare(
        &self,
        leaves: &[Hash],
        first_seq: u64,
        number: u64,
        now: u64,
        extra: &mut Vec<(u32, u64, Hash)>,
    ) -> Result<Option<SealedBatch>, StoreError> {
        let Some(tree) = BatchTree::new(leaves) else { return Ok(None) };
        let batch = BatchRecord {
            number,
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
        let log_nodes = tree::perfect_nodes_after_append(number, batch.leaf_hash(), |level, idx| {
            Overlay { store: &self.store, extra }.node(level, idx)
        })?;
        extra.extend_from_slice(&log_nodes);
        let root = tree::root(&mut Overlay { store: &self.store, extra }, number + 1)?;
        let checkpoint = Checkpoint { origin: self.signer.name().to_owned(), size: number + 1, root };
        let note = self.signer.sign(&checkpoint.body());
        Ok(Some(SealedBatch { batch, batch_nodes, log_nodes, note }))
    }

    /// Anchors every checkpoint some ledger has not recorded yet, oldest
    /// first, then publishes the newest checkpoint.
    fn anchor_pending(&self, st: &mut State) {
        let mut failed: Option<String> = None;
        for anchor in &self.anchors {
            let todo = match self.store.unanchored(anchor.name()) {
                Ok(t) => t,
                Err(e) => {
                    tracing::error!(error = %e, "cannot list unanchored checkpoints");
                    failed = Some(format!("cannot list unanchored checkpoints: {e}"));
                    continue;
                }
            };
            let mut receipts = Vec::with_capacity(todo.len());
            for (size, note) in todo {
                match anchor.anchor(&note, now_ms()) {
                    Ok(receipt) => receipts.push((size, anchor.name(), receipt)),
                    Err(e) => {
                        Metrics::inc(&self.metrics.anchor_failures_total);
                        tracing::warn!(ledger = anchor.name(), size, error = %e, "anchoring failed; will retry");
                        failed = Some(format!("anchoring in ledger {} failed: {e}", anchor.name()));
                        break;
                    }
                }
            }
            // Anchoring is idempotent: receipts not stored are fetched again
            // from the ledger at the next attempt.
            match self.store.put_receipts(&receipts) {
                Ok(()) => Metrics::add(&self.metrics.anchors_total, receipts.len() as u64),
                Err(e) => {
                    tracing::error!(error = %e, "cannot store receipts");
                    failed = Some(format!("cannot store receipts: {e}"));
                }
            }
        }
        match &failed {
            Some(why) => self.metrics.health.failing(Part::Anchor, why),
            None => self.metrics.health.recovered(Part::Anchor),
        }
        st.anchor_retry_at = failed.map(|_| now_ms() + ANCHOR_RETRY_MS);
        self.publish_latest();
    }

    fn publish_latest(&self) {
        if let Ok(Some((_, note))) = self.store.latest_checkpoint() {
            if !self.outbox.publish(self.checkpoint_topic, note.into_bytes(), true) {
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
