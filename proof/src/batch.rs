//! Batches: the Merkle tree over a run of consecutive leaves, and the batch
//! record that becomes one leaf of the log.
//!
//! Batch record, version 1, big-endian (docs/PROTOCOL.md §Batch record):
//!
//! ```text
//! u8   version       = 1
//! u64  batch number  = its index in the log
//! u64  first sequence number
//! u64  size          number of leaves, >= 1
//! [32] batch root    RFC 9162 MTH over the leaf hashes
//! u64  sealed_at_ms  broker clock, Unix milliseconds
//! ```

use crate::hash::{Hash, Rfc9162Sha256};
use crate::FormatError;
use rs_merkle::MerkleTree;

pub const BATCH_VERSION: u8 = 1;
pub const BATCH_RECORD_LEN: usize = 65;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchRecord {
    pub number: u64,
    pub first_seq: u64,
    pub size: u64,
    pub root: Hash,
    pub sealed_at_ms: u64,
}

impl BatchRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(BATCH_RECORD_LEN);
        out.push(BATCH_VERSION);
        out.extend_from_slice(&self.number.to_be_bytes());
        out.extend_from_slice(&self.first_seq.to_be_bytes());
        out.extend_from_slice(&self.size.to_be_bytes());
        out.extend_from_slice(&self.root);
        out.extend_from_slice(&self.sealed_at_ms.to_be_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, FormatError> {
        let mut r = crate::codec::Reader::new(bytes);
        if r.u8()? != BATCH_VERSION {
            return Err(FormatError("unsupported batch record version"));
        }
        let rec = BatchRecord {
            number: r.u64()?,
            first_seq: r.u64()?,
            size: r.u64()?,
            root: r.array32()?,
            sealed_at_ms: r.u64()?,
        };
        r.finish()?;
        if rec.size == 0 {
            return Err(FormatError("empty batch"));
        }
        if rec.first_seq.checked_add(rec.size).is_none() {
            return Err(FormatError("batch sequence range overflows"));
        }
        Ok(rec)
    }

    /// The RFC 9162 leaf hash of this record in the log.
    pub fn leaf_hash(&self) -> Hash {
        crate::hash::leaf_hash(&self.encode())
    }
}

/// The Merkle tree of one batch, built with rs_merkle over leaf hashes.
pub struct BatchTree {
    tree: MerkleTree<Rfc9162Sha256>,
}

impl BatchTree {
    /// Builds the tree; `leaf_hashes` must be non-empty.
    pub fn new(leaf_hashes: &[Hash]) -> Option<Self> {
        if leaf_hashes.is_empty() {
            return None;
        }
        Some(BatchTree { tree: MerkleTree::from_leaves(leaf_hashes) })
    }

    pub fn size(&self) -> u64 {
        self.tree.leaves_len() as u64
    }

    pub fn root(&self) -> Hash {
        // A tree built from at least one leaf always has a root.
        self.tree.root().unwrap_or_default()
    }

    /// The RFC 9162 inclusion path of leaf `index`, ordered leaf to root.
    pub fn path(&self, index: u64) -> Option<Vec<Hash>> {
        if index >= self.size() {
            return None;
        }
        Some(self.tree.proof(&[index as usize]).proof_hashes().to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::{verify_inclusion, MemoryTree, NodeSource};

    // Naive RFC 9162 §2.1.1 MTH and §2.1.3.1 PATH, written from the RFC text.
    fn k_of(n: usize) -> usize {
        let mut k = 1;
        while k * 2 < n {
            k *= 2;
        }
        k
    }
    fn mth(d: &[Hash]) -> Hash {
        if d.len() == 1 {
            return d[0];
        }
        let k = k_of(d.len());
        crate::hash::node_hash(&mth(&d[..k]), &mth(&d[k..]))
    }
    fn path(m: usize, d: &[Hash]) -> Vec<Hash> {
        if d.len() == 1 {
            return vec![];
        }
        let k = k_of(d.len());
        let (mut p, sib) =
            if m < k { (path(m, &d[..k]), mth(&d[k..])) } else { (path(m - k, &d[k..]), mth(&d[..k])) };
        p.push(sib);
        p
    }

    #[test]
    fn rs_merkle_batch_trees_equal_rfc9162_for_sizes_1_to_300() {
        let all: Vec<Hash> = (0u32..300).map(|i| crate::hash::leaf_hash(&i.to_be_bytes())).collect();
        for n in 1..=300usize {
            let d = &all[..n];
            let tree = BatchTree::new(d).expect("non-empty");
            let root = mth(d);
            assert_eq!(tree.root(), root, "root of size {n}");
            for m in 0..n {
                let p = tree.path(m as u64).expect("in range");
                assert_eq!(p, path(m, d), "path of {m} in size {n}");
                verify_inclusion(m as u64, n as u64, &d[m], &p, &root).expect("verifies");
            }
            assert!(tree.path(n as u64).is_none());
        }
        // The log's own tree code agrees with rs_merkle too.
        let mut mem = MemoryTree::new();
        all.iter().for_each(|h| mem.append(*h));
        assert_eq!(mem.node(8, 0).ok(), Some(mth(&all[..256])));
    }

    #[test]
    fn batch_record_round_trips() {
        let rec = BatchRecord { number: 3, first_seq: 100, size: 7, root: [9; 32], sealed_at_ms: 5 };
        let bytes = rec.encode();
        assert_eq!(bytes.len(), BATCH_RECORD_LEN);
        assert_eq!(BatchRecord::decode(&bytes).expect("decodes"), rec);
        assert!(BatchRecord::decode(&bytes[..64]).is_err());
    }
}
