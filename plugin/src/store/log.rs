//! The log: sealed batches, their tree nodes, the log's perfect-subtree
//! nodes, signed checkpoints and anchor receipts, with the tree code that
//! serves inclusion and consistency paths from them.

use super::{hash32, int, Store, StoreError, BATCH_NODE_MIN_LEVEL, U64};
use notary_proof::tree::{self, NodeSource};
use notary_proof::{BatchRecord, Hash, Receipt};
use rusqlite::{params, OptionalExtension};

/// A batch ready to store (see [`Store::seal`]).
pub struct SealedBatch {
    pub batch: BatchRecord,
    /// Upper nodes of the batch tree: (level, index, hash).
    pub batch_nodes: Vec<(u32, u64, Hash)>,
    /// Log nodes the batch's append completes.
    pub log_nodes: Vec<(u32, u64, Hash)>,
    /// The signed checkpoint of the log with this batch.
    pub note: String,
}

impl Store {
    /// The batch with this number, if it is sealed.
    pub fn batch(&self, number: u64) -> Result<Option<BatchRecord>, StoreError> {
        self.conn
            .prepare_cached("SELECT record FROM batches WHERE number = ?1")?
            .query_row([U64(number)], |r| r.get::<_, Vec<u8>>(0))
            .optional()?
            .map(|b| decode_batch(&b))
            .transpose()
    }

    /// Whether `ledger` holds a receipt for the checkpoint of `size`.
    pub fn has_receipt(&self, size: u64, ledger: &str) -> Result<bool, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT 1 FROM receipts WHERE size = ?1 AND ledger = ?2")?
            .query_row(params![U64(size), ledger], |_| Ok(()))
            .optional()?
            .is_some())
    }

    /// The last sealed batch, if any.
    pub fn last_batch(&self) -> Result<Option<BatchRecord>, StoreError> {
        self.conn
            .query_row("SELECT record FROM batches ORDER BY number DESC LIMIT 1", [], |r| {
                r.get::<_, Vec<u8>>(0)
            })
            .optional()?
            .map(|b| decode_batch(&b))
            .transpose()
    }

    /// Stores sealed batches, oldest first, in one transaction: each
    /// batch record, its upper batch-tree nodes (levels >=
    /// `BATCH_NODE_MIN_LEVEL`), the log nodes its append completes, and its
    /// signed checkpoint; and one run of the digest index over all their
    /// leaves, `digests` being (payload digest, seq) of each.
    pub fn seal(&mut self, batches: &[SealedBatch], digests: &[(Hash, u64)]) -> Result<(), StoreError> {
        self.write(|tx| {
            if let (Some(first), Some(last)) = (batches.first(), batches.last()) {
                let to = last.batch.first_seq.saturating_add(last.batch.size);
                super::digests::seal_run(tx, first.batch.first_seq, to, digests)?;
            }
            for s in batches {
                let batch = &s.batch;
                tx.prepare_cached(
                    "INSERT INTO batches (number, first_seq, size, record) VALUES (?1, ?2, ?3, ?4)",
                )?
                .execute(params![
                    U64(batch.number),
                    U64(batch.first_seq),
                    U64(batch.size),
                    batch.encode()
                ])?;
                let mut stmt = tx.prepare_cached(
                    "INSERT INTO batch_nodes (batch, level, idx, hash) VALUES (?1, ?2, ?3, ?4)",
                )?;
                for (level, idx, hash) in &s.batch_nodes {
                    stmt.execute(params![U64(batch.number), level, U64(*idx), &hash[..]])?;
                }
                let mut stmt =
                    tx.prepare_cached("INSERT INTO log_nodes (level, idx, hash) VALUES (?1, ?2, ?3)")?;
                for (level, idx, hash) in &s.log_nodes {
                    stmt.execute(params![level, U64(*idx), &hash[..]])?;
                }
                tx.prepare_cached("INSERT INTO checkpoints (size, note) VALUES (?1, ?2)")?
                    .execute(params![U64(batch.number.wrapping_add(1)), s.note])?;
            }
            Ok(())
        })
    }

    /// Stores anchor receipts, (checkpoint size, ledger, receipt), in one
    /// transaction.
    pub fn put_receipts(&self, receipts: &[(u64, &str, Receipt)]) -> Result<(), StoreError> {
        if receipts.is_empty() {
            return Ok(());
        }
        self.write(|tx| {
            for (size, ledger, receipt) in receipts {
                let json = serde_json::to_string(receipt).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                tx.prepare_cached(
                    "INSERT OR REPLACE INTO receipts (size, ledger, receipt) VALUES (?1, ?2, ?3)",
                )?
                .execute(params![U64(*size), ledger, json])?;
            }
            Ok(())
        })
    }

    /// Checkpoints that `ledger` has not anchored yet, oldest first.
    pub fn unanchored(&self, ledger: &str) -> Result<Vec<(u64, String)>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT c.size, c.note FROM checkpoints c
             WHERE NOT EXISTS (SELECT 1 FROM receipts r WHERE r.size = c.size AND r.ledger = ?1)
             ORDER BY c.size",
        )?;
        let rows = stmt.query_map([ledger], |r| Ok((r.get::<_, U64>(0)?.0, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The sealed batch holding `seq`, if it is sealed.
    pub fn batch_of(&self, seq: u64) -> Result<Option<BatchRecord>, StoreError> {
        let rec: Option<Vec<u8>> = self
            .conn
            .prepare_cached(
                "SELECT record FROM batches WHERE first_seq <= ?1 ORDER BY first_seq DESC LIMIT 1",
            )?
            .query_row([int::bound(seq)], |r| r.get(0))
            .optional()?;
        match rec {
            Some(b) => {
                let batch = decode_batch(&b)?;
                Ok((seq < batch.first_seq + batch.size).then_some(batch))
            }
            None => Ok(None),
        }
    }

    pub fn checkpoint(&self, size: u64) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT note FROM checkpoints WHERE size = ?1")?
            .query_row([U64(size)], |r| r.get(0))
            .optional()?)
    }

    /// The newest checkpoint: (size, note).
    pub fn latest_checkpoint(&self) -> Result<Option<(u64, String)>, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT size, note FROM checkpoints ORDER BY size DESC LIMIT 1", [], |r| {
                Ok((r.get::<_, U64>(0)?.0, r.get(1)?))
            })
            .optional()?)
    }

    pub fn receipts(&self, size: u64) -> Result<Vec<Receipt>, StoreError> {
        let mut stmt =
            self.conn.prepare_cached("SELECT receipt FROM receipts WHERE size = ?1 ORDER BY ledger")?;
        let rows = stmt.query_map([U64(size)], |r| r.get::<_, String>(0))?;
        rows.map(|json| {
            serde_json::from_str(&json?).map_err(|e| StoreError::Corrupt(format!("receipt: {e}")))
        })
        .collect()
    }

    /// The log size: the number of sealed batches.
    pub fn log_size(&self) -> Result<u64, StoreError> {
        Ok(self.last_batch()?.map_or(0, |b| b.number + 1))
    }

    /// RFC 9162 inclusion path of batch `index` in the log at `size`.
    pub fn log_inclusion(&self, index: u64, size: u64) -> Result<Vec<Hash>, StoreError> {
        tree::inclusion_proof(&mut Nodes(self), index, size)
    }

    /// RFC 9162 consistency proof between two log sizes.
    pub fn log_consistency(&self, old: u64, new: u64) -> Result<Vec<Hash>, StoreError> {
        tree::consistency_proof(&mut Nodes(self), old, new)
    }

    /// The log root at `size` (>= 1).
    pub fn log_root(&self, size: u64) -> Result<Hash, StoreError> {
        tree::root(&mut Nodes(self), size)
    }

    /// Computes the log nodes completed by appending a batch at `index`.
    pub fn nodes_after_append(&self, index: u64, leaf: Hash) -> Result<Vec<(u32, u64, Hash)>, StoreError> {
        tree::perfect_nodes_after_append(index, leaf, |level, idx| Nodes(self).node(level, idx))
    }
}

impl Store {
    /// RFC 9162 inclusion path of leaf `index` in `batch`, from the stored
    /// upper nodes and at most two 64-leaf ranges. Checked against the batch
    /// root before it is returned, so a damaged store never serves a bad path.
    pub fn batch_path(&self, batch: &BatchRecord, index: u64) -> Result<Vec<Hash>, StoreError> {
        let pruned = batch.first_seq < self.pruned()?.seq;
        let mut src = BatchNodes::new(self, batch, pruned);
        let path = tree::inclusion_proof(&mut src, index, batch.size)?;
        let leaf = src.node(0, index)?;
        tree::verify_inclusion(index, batch.size, &leaf, &path, &batch.root)
            .map_err(|_| StoreError::Corrupt(format!("batch {} does not match its root", batch.number)))?;
        Ok(path)
    }

    /// A perfect-subtree node of the log.
    pub fn log_node(&self, level: u32, index: u64) -> Result<Hash, StoreError> {
        Nodes(self).node(level, index)
    }
}

struct Nodes<'a>(&'a Store);

impl NodeSource for Nodes<'_> {
    type Error = StoreError;
    fn node(&mut self, level: u32, index: u64) -> Result<Hash, StoreError> {
        let hash: Option<Vec<u8>> = self
            .0
            .conn
            .prepare_cached("SELECT hash FROM log_nodes WHERE level = ?1 AND idx = ?2")?
            .query_row(params![level, U64(index)], |r| r.get(0))
            .optional()?;
        hash32(hash.ok_or_else(|| StoreError::Corrupt(format!("missing log node {level}/{index}")))?)
    }
}

/// Nodes of one batch tree: stored ones from `BATCH_NODE_MIN_LEVEL` up,
/// lower ones computed from the 64-leaf chunk that holds them.
pub(super) struct BatchNodes<'a> {
    store: &'a Store,
    batch: &'a BatchRecord,
    chunks: Vec<(u64, tree::MemoryTree)>,
    /// Retention pruned the batch's leaves: low nodes come from the store,
    /// where pruning kept those its registry leaves' paths need.
    pruned: bool,
}

impl<'a> BatchNodes<'a> {
    pub(super) fn new(store: &'a Store, batch: &'a BatchRecord, pruned: bool) -> Self {
        BatchNodes { store, batch, chunks: Vec::new(), pruned }
    }

    fn stored(&self, level: u32, index: u64) -> Result<Hash, StoreError> {
        let hash: Option<Vec<u8>> = self
            .store
            .conn
            .prepare_cached("SELECT hash FROM batch_nodes WHERE batch = ?1 AND level = ?2 AND idx = ?3")?
            .query_row(params![U64(self.batch.number), level, U64(index)], |r| r.get(0))
            .optional()?;
        let missing = || {
            let n = self.batch.number;
            if self.pruned {
                StoreError::Pruned { batch: n }
            } else {
                StoreError::Corrupt(format!("missing batch node {n}/{level}/{index}"))
            }
        };
        hash32(hash.ok_or_else(missing)?)
    }
}

impl NodeSource for BatchNodes<'_> {
    type Error = StoreError;
    fn node(&mut self, level: u32, index: u64) -> Result<Hash, StoreError> {
        if level >= BATCH_NODE_MIN_LEVEL || self.pruned {
            return self.stored(level, index);
        }
        let chunk = (index << level) >> BATCH_NODE_MIN_LEVEL;
        let pos = match self.chunks.iter().position(|(c, _)| *c == chunk) {
            Some(p) => p,
            None => {
                let from = self.batch.first_seq + (chunk << BATCH_NODE_MIN_LEVEL);
                let to = (from + (1 << BATCH_NODE_MIN_LEVEL)).min(self.batch.first_seq + self.batch.size);
                let mut t = tree::MemoryTree::new();
                for leaf in self.store.leaves_in(from, to)? {
                    t.append(notary_proof::hash::leaf_hash(&leaf.record));
                }
                self.chunks.push((chunk, t));
                self.chunks.len() - 1
            }
        };
        let local = index - ((chunk << BATCH_NODE_MIN_LEVEL) >> level);
        self.chunks[pos]
            .1
            .node(level, local)
            .map_err(|_| StoreError::Corrupt(format!("batch {} is missing leaves", self.batch.number)))
    }
}

pub(super) fn decode_batch(bytes: &[u8]) -> Result<BatchRecord, StoreError> {
    BatchRecord::decode(bytes).map_err(|e| StoreError::Corrupt(format!("batch record: {e}")))
}
