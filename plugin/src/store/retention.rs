//! Retention: deleting old leaves and old rejections, while the log itself
//! (batch records, tree nodes, checkpoints, receipts) stays, so every
//! bundle handed out keeps verifying and consistency proofs keep spanning
//! the pruned range.
//!
//! Batches are pruned oldest first, in steps of at most [`PRUNE_STEP`]
//! leaves, each step one short write transaction. What is kept of a pruned
//! batch:
//! - its registry leaves (enrolments, rotations, revocations), which later
//!   device-signed bundles cite as key evidence, with the low batch-tree
//!   nodes their paths need (stored in `batch_nodes` before the leaves
//!   around them go);
//! - the digest index's runs over it (`store/digests.rs`, about 20 bytes a
//!   message), so a request for a pruned message is told which batch held
//!   it. Runs are kept while they hold any of the newest pruned messages,
//!   as many as the store still holds and at least
//!   [`TOMBSTONES_KEPT_MIN`]; older runs are dropped whole, so the index
//!   too stays bounded.
//!
//! Schema version 2 kept tombstones in `pruned_digests`; a store upgraded
//! from it still answers from them, and nothing writes them any more.

use super::{log::BatchNodes, Store, StoreError, BATCH_NODE_MIN_LEVEL, U64};
use notary_proof::tree::{self, NodeSource};
use notary_proof::{BatchRecord, Hash};
use rusqlite::{params, OptionalExtension};

/// Most leaves one pruning step deletes (one write transaction).
pub const PRUNE_STEP: u64 = 4096;
/// Index runs are kept for at least this many of the newest pruned
/// messages (about 20 MiB), so they are answered as pruned, not unknown.
pub const TOMBSTONES_KEPT_MIN: u64 = 1_000_000;

/// Where pruning stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Batches `0..batches` are pruned.
    pub batches: u64,
    /// Every leaf below this sequence number is pruned (registry leaves
    /// aside); leaves of batch `batches` below it are already gone.
    pub seq: u64,
    /// Leaves deleted so far.
    pub leaves: u64,
}

/// What one pruning step did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PruneStep {
    pub leaves: u64,
    pub rejections: u64,
    /// Index runs dropped: every message they held was pruned long ago.
    pub runs_dropped: u64,
    /// The step finished its batch.
    pub batch_done: bool,
}

/// The store's size: pages in use and pages free (after deletes, SQLite
/// reuses free pages rather than shrinking the file).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreSize {
    pub used_bytes: u64,
    pub free_bytes: u64,
}

impl Store {
    /// How far pruning has gone.
    pub fn pruned(&self) -> Result<Pruned, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT batches, seq, leaves FROM retention WHERE id = 0")?
            .query_row([], |r| {
                Ok(Pruned {
                    batches: r.get::<_, U64>(0)?.0,
                    seq: r.get::<_, U64>(1)?.0,
                    leaves: r.get::<_, U64>(2)?.0,
                })
            })
            .optional()?
            .unwrap_or_default())
    }

    /// The batch a pruned payload digest was last notarized in, if a
    /// tombstone of schema version 2 names it.
    pub fn pruned_batch(&self, digest: &[u8; 32]) -> Result<Option<u64>, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT batch FROM pruned_digests WHERE prefix = ?1")?
            .query_row([&digest[..8]], |r| r.get::<_, U64>(0))
            .optional()?
            .map(|b| b.0))
    }

    /// Pages in use and free, in bytes.
    pub fn size(&self) -> Result<StoreSize, StoreError> {
        let page: u64 = self.conn.query_row("PRAGMA page_size", [], |r| r.get::<_, U64>(0))?.0;
        let pages: u64 = self.conn.query_row("PRAGMA page_count", [], |r| r.get::<_, U64>(0))?.0;
        let free: u64 = self.conn.query_row("PRAGMA freelist_count", [], |r| r.get::<_, U64>(0))?.0;
        Ok(StoreSize {
            used_bytes: pages.saturating_sub(free).saturating_mul(page),
            free_bytes: free.saturating_mul(page),
        })
    }

    /// Deletes up to [`PRUNE_STEP`] more leaves of `batch`, which must be
    /// the oldest batch not wholly pruned ([`Pruned::batches`]); rejections
    /// received before the batch was sealed; and the index runs wholly
    /// older than the horizon: those holding any of the newest
    /// `max(held, tombstones_min)` pruned messages are kept, `held` being
    /// the messages the store still holds.
    pub fn prune_step(&self, batch: &BatchRecord, tombstones_min: u64) -> Result<PruneStep, StoreError> {
        let state = self.pruned()?;
        if batch.number != state.batches {
            return Err(StoreError::Corrupt(format!(
                "pruning batch {} out of order (next is {})",
                batch.number, state.batches
            )));
        }
        let end = batch.first_seq + batch.size;
        let from = state.seq.max(batch.first_seq);
        let to = end.min(from.saturating_add(PRUNE_STEP));
        // Before any leaf of the batch goes: the low nodes that the paths
        // of its registry leaves need.
        let kept_nodes = if from == batch.first_seq { self.registry_leaf_nodes(batch)? } else { Vec::new() };
        let held = self.next_seq()?.saturating_sub(to);
        let keep_from = to.saturating_sub(held.max(tombstones_min));
        self.write(|tx| {
            let mut stmt = tx.prepare_cached(
                "INSERT OR IGNORE INTO batch_nodes (batch, level, idx, hash) VALUES (?1, ?2, ?3, ?4)",
            )?;
            for (level, idx, hash) in &kept_nodes {
                stmt.execute(params![U64(batch.number), level, U64(*idx), &hash[..]])?;
            }
            let leaves = tx
                .prepare_cached(
                    "DELETE FROM leaves WHERE seq >= ?1 AND seq < ?2
                     AND seq NOT IN (SELECT seq FROM registry_events WHERE seq >= ?1 AND seq < ?2)",
                )?
                .execute(params![U64(from), U64(to)])? as u64;
            let rejections =
                tx.prepare_cached(
                    "DELETE FROM rejections WHERE id IN
                     (SELECT id FROM rejections WHERE at_ms < ?1 ORDER BY id LIMIT ?2)",
                )?
                .execute(params![U64(batch.sealed_at_ms), PRUNE_STEP as i64])? as u64;
            let runs_dropped = super::digests::drop_runs_below(tx, keep_from)?;
            let batch_done = to == end;
            tx.prepare_cached(
                "INSERT INTO retention (id, batches, seq, leaves, slice) VALUES (0, ?1, ?2, ?3, 0)
                 ON CONFLICT(id) DO UPDATE SET batches = ?1, seq = ?2, leaves = ?3",
            )?
            .execute(params![
                U64(state.batches + u64::from(batch_done)),
                U64(to),
                U64(state.leaves + leaves)
            ])?;
            Ok(PruneStep { leaves, rejections, runs_dropped, batch_done })
        })
    }

    /// For each registry leaf of `batch`: every batch-tree node below
    /// [`BATCH_NODE_MIN_LEVEL`] that serving its path reads, computed while
    /// the batch's leaves are all there.
    fn registry_leaf_nodes(&self, batch: &BatchRecord) -> Result<Vec<(u32, u64, Hash)>, StoreError> {
        let end = batch.first_seq + batch.size;
        let seqs: Vec<u64> = self
            .conn
            .prepare_cached("SELECT seq FROM registry_events WHERE seq >= ?1 AND seq < ?2 ORDER BY seq")?
            .query_map(params![U64(batch.first_seq), U64(end)], |r| r.get::<_, U64>(0))?
            .map(|s| s.map(|s| s.0))
            .collect::<Result<_, _>>()?;
        let mut src = Recording { inner: BatchNodes::new(self, batch, false), seen: Vec::new() };
        for seq in seqs {
            let index = seq - batch.first_seq;
            tree::inclusion_proof(&mut src, index, batch.size)?;
            src.node(0, index)?;
        }
        let mut seen = src.seen;
        seen.sort_unstable_by_key(|(l, i, _)| (*l, *i));
        seen.dedup_by_key(|(l, i, _)| (*l, *i));
        Ok(seen)
    }
}

/// Records the low nodes it serves.
struct Recording<'a> {
    inner: BatchNodes<'a>,
    seen: Vec<(u32, u64, Hash)>,
}

impl NodeSource for Recording<'_> {
    type Error = StoreError;
    fn node(&mut self, level: u32, index: u64) -> Result<Hash, StoreError> {
        let hash = self.inner.node(level, index)?;
        if level < BATCH_NODE_MIN_LEVEL {
            self.seen.push((level, index, hash));
        }
        Ok(hash)
    }
}
