//! RFC 9162 §2.1 Merkle tree hashing with SHA-256.
//!
//! Leaf hashes and interior node hashes are domain-separated by a one-byte
//! prefix so that a leaf can never be passed off as a node (second-preimage
//! resistance). BLAKE3 is used only for payload digests, never here.

use sha2::{Digest, Sha256};

/// A SHA-256 tree hash.
pub type Hash = [u8; 32];

/// Prefix of a leaf hash input.
pub const LEAF_PREFIX: u8 = 0x00;
/// Prefix of an interior node hash input.
pub const NODE_PREFIX: u8 = 0x01;

/// `SHA-256(0x00 || leaf)`.
pub fn leaf_hash(leaf: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([LEAF_PREFIX]);
    h.update(leaf);
    h.finalize().into()
}

/// `SHA-256(0x01 || left || right)`.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([NODE_PREFIX]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// Plain SHA-256, for hashes of whole objects (checkpoints, ledger entries).
pub fn sha256(data: &[u8]) -> Hash {
    Sha256::digest(data).into()
}

/// Compares two hashes in constant time.
pub fn hash_eq(a: &Hash, b: &Hash) -> bool {
    a.iter().zip(b.iter()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The rs_merkle hasher for batch trees: interior nodes get the RFC 9162
/// `0x01` prefix. Callers hand rs_merkle leaf hashes that already carry the
/// `0x00` prefix ([`leaf_hash`]), so `hash` itself is never used on leaves.
///
/// rs_merkle promotes a lone right-most node unchanged to the next level,
/// which yields exactly RFC 9162's MTH split at the largest power of two
/// (tested against the RFC's recursive definition in `batch.rs`).
#[derive(Clone, Copy, Debug)]
pub struct Rfc9162Sha256;

impl rs_merkle::Hasher for Rfc9162Sha256 {
    type Hash = Hash;

    fn hash(data: &[u8]) -> Hash {
        sha256(data)
    }

    fn concat_and_hash(left: &Hash, right: Option<&Hash>) -> Hash {
        match right {
            Some(right) => node_hash(left, right),
            None => *left,
        }
    }
}
