//! Retention: deleting old leaves, their payload index and old rejections,
//! while the log itself (batch records, tree nodes, checkpoints, receipts)
//! stays, so every bundle handed out keeps verifying and consistency
//! proofs keep spanning the pruned range.
//!
//! Batches are pruned oldest first, in steps of at most [`PRUNE_STEP`]
//! leaves, each step one short write transaction. What is kept of a pruned
//! batch:
//! - its registry leaves (enrolments, rotations, revocations), which later
//!   device-signed bundles cite as key evidence, with the low batch-tree
//!   nodes their paths need (stored in `batch_nodes` before the leaves
//!   around them go);
//! - a tombstone per distinct payload digest (its first 8 bytes and the
//!   batch number, about 20 bytes), so a request for a pruned message is
//!   told which batch held it. Tombstones are kept for the newest pruned
//!   messages, as many as the store still holds and at least
//!   [`TOMBSTONES_KEPT_MIN`]; older ones are dropped a slice of the digest
//!   space per step, so tombstones too stay bounded.

use super::{log::BatchNodes, Store, StoreError, BATCH_NODE_MIN_LEVEL, U64};
use notary_proof::tree::{self, NodeSource};
use notary_proof::{BatchRecord, Hash};
use rusqlite::{params, OptionalExtension};

/// Most leaves one pruning step deletes (one write transaction).
pub const PRUNE_STEP: u64 = 4096;
/// Tombstones are kept for at least this many of the newest pruned
/// messages (about 20 MiB).
pub const TOMBSTONES_KEPT_MIN: u64 = 1_000_000;
/// Tombstone trimming walks the 8-byte prefix space in this many slices,
/// one slice per step.
pub(super) const TOMBSTONE_SLICES: u64 = 1024;

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
    /// Where the tombstone trimmer is: the next slice.
    pub slice: u64,
}

/// What one pruning step did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PruneStep {
    pub leaves: u64,
    pub rejections: u64,
    pub tombstones: u64,
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
            .prepare_cached("SELECT batches, seq, leaves, slice FROM retention WHERE id = 0")?
            .query_row([], |r| {
                Ok(Pruned {
                    batches: r.get::<_, U64>(0)?.0,
                    seq: r.get::<_, U64>(1)?.0,
                    leaves: r.get::<_, U64>(2)?.0,
                    slice: r.get::<_, U64>(3)?.0,
                })
            })
            .optional()?
            .unwrap_or_default())
    }

    /// The batch a pruned payload digest was last notarized in, if a
    /// tombstone for it is still kept.
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
    /// the oldest batch not wholly pruned ([`Pruned::batches`]), with their
    /// payload index; rejections received before the batch was sealed; and
    /// one slice of tombstones older than the horizon: those of the newest
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
        // Tombstones of batches wholly below `keep_from` go.
        let tomb_horizon = match self.batch_of(keep_from)? {
            Some(b) => b.number,
            None if keep_from == 0 => 0,
            None => self.log_size()?,
        };
        self.write(|tx| {
            let mut stmt = tx.prepare_cached(
                "INSERT OR IGNORE INTO batch_nodes (batch, level, idx, hash) VALUES (?1, ?2, ?3, ?4)",
            )?;
            for (level, idx, hash) in &kept_nodes {
                stmt.execute(params![U64(batch.number), level, U64(*idx), &hash[..]])?;
            }
            tx.prepare_cached(
                "INSERT OR REPLACE INTO pruned_digests (prefix, batch)
                 SELECT substr(digest, 1, 8), ?3 FROM leaves WHERE seq >= ?1 AND seq < ?2",
            )?
            .execute(params![U64(from), U64(to), U64(batch.number)])?;
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
            let tombstones = trim_tombstones(tx, state.slice, tomb_horizon)?;
            let batch_done = to == end;
            tx.prepare_cached(
                "INSERT INTO retention (id, batches, seq, leaves, slice) VALUES (0, ?1, ?2, ?3, ?4)
                 ON CONFLICT(id) DO UPDATE SET batches = ?1, seq = ?2, leaves = ?3, slice = ?4",
            )?
            .execute(params![
                U64(state.batches + u64::from(batch_done)),
                U64(to),
                U64(state.leaves + leaves),
                U64((state.slice + 1) % TOMBSTONE_SLICES)
            ])?;
            Ok(PruneStep { leaves, rejections, tombstones, batch_done })
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

/// Deletes the tombstones of batches below `horizon` in one slice of the
/// digest space.
pub(super) fn trim_tombstones(
    tx: &rusqlite::Transaction<'_>,
    slice: u64,
    horizon: u64,
) -> Result<u64, StoreError> {
    let (lo, hi) = slice_bounds(slice);
    Ok(tx
        .prepare_cached(
            "DELETE FROM pruned_digests WHERE prefix >= ?1 AND (?2 IS NULL OR prefix < ?2) AND batch < ?3",
        )?
        .execute(params![&lo[..], hi.as_ref().map(|h| &h[..]), U64(horizon)])? as u64)
}

/// The 8-byte prefix range of tombstone slice `slice`: `[lo, hi)`, with no
/// upper bound for the last one.
fn slice_bounds(slice: u64) -> ([u8; 8], Option<[u8; 8]>) {
    let width = u64::MAX / TOMBSTONE_SLICES + 1;
    let lo = slice.saturating_mul(width);
    let hi = (slice + 1 < TOMBSTONE_SLICES).then(|| ((slice + 1) * width).to_be_bytes());
    (lo.to_be_bytes(), hi)
}
