//! RFC 9162 Merkle tree algorithms: roots, inclusion and consistency proofs,
//! and their verification (§2.1.3 and §2.1.4).
//!
//! Proof *generation* works over a [`NodeSource`]: anything that can return
//! the hash of a perfect subtree (2^level leaves, aligned). A log store keeps
//! those nodes as leaves are appended ([`perfect_nodes_after_append`]), so a
//! proof costs O(log² n) lookups and never a walk over all leaves.
//! Proof *verification* needs only hashes and sizes.

use crate::hash::{hash_eq, node_hash, Hash};

/// Where perfect-subtree hashes come from.
///
/// `node(level, index)` is the root of leaves `[index << level, (index + 1) << level)`;
/// the caller only asks for subtrees that lie entirely inside the tree.
pub trait NodeSource {
    type Error;
    fn node(&mut self, level: u32, index: u64) -> Result<Hash, Self::Error>;
}

/// Largest power of two strictly smaller than `n` (n >= 2).
fn split(n: u64) -> u64 {
    debug_assert!(n >= 2);
    1u64 << (63 - (n - 1).leading_zeros())
}

/// MTH over leaves `[lo, hi)`, hi > lo.
pub fn subtree_root<S: NodeSource>(src: &mut S, lo: u64, hi: u64) -> Result<Hash, S::Error> {
    let n = hi - lo;
    if n.is_power_of_two() && lo.is_multiple_of(n) {
        return src.node(n.trailing_zeros(), lo >> n.trailing_zeros());
    }
    let k = split(n);
    let left = subtree_root(src, lo, lo + k)?;
    let right = subtree_root(src, lo + k, hi)?;
    Ok(node_hash(&left, &right))
}

/// The root of a tree of `size` leaves (size >= 1).
pub fn root<S: NodeSource>(src: &mut S, size: u64) -> Result<Hash, S::Error> {
    subtree_root(src, 0, size)
}

/// RFC 9162 PATH(index, D[size]), ordered leaf to root. Requires index < size.
pub fn inclusion_proof<S: NodeSource>(src: &mut S, index: u64, size: u64) -> Result<Vec<Hash>, S::Error> {
    let mut path = Vec::new();
    path_rec(src, index, 0, size, &mut path)?;
    Ok(path)
}

fn path_rec<S: NodeSource>(
    src: &mut S,
    m: u64,
    lo: u64,
    hi: u64,
    out: &mut Vec<Hash>,
) -> Result<(), S::Error> {
    let n = hi - lo;
    if n <= 1 {
        return Ok(());
    }
    let k = split(n);
    if m < k {
        path_rec(src, m, lo, lo + k, out)?;
        out.push(subtree_root(src, lo + k, hi)?);
    } else {
        path_rec(src, m - k, lo + k, hi, out)?;
        out.push(subtree_root(src, lo, lo + k)?);
    }
    Ok(())
}

/// RFC 9162 PROOF(old_size, D[new_size]). Empty when old_size is 0 or equals
/// new_size. Requires old_size <= new_size.
pub fn consistency_proof<S: NodeSource>(
    src: &mut S,
    old_size: u64,
    new_size: u64,
) -> Result<Vec<Hash>, S::Error> {
    let mut out = Vec::new();
    if old_size > 0 && old_size < new_size {
        subproof_rec(src, old_size, 0, new_size, true, &mut out)?;
    }
    Ok(out)
}

fn subproof_rec<S: NodeSource>(
    src: &mut S,
    m: u64,
    lo: u64,
    hi: u64,
    whole: bool,
    out: &mut Vec<Hash>,
) -> Result<(), S::Error> {
    let n = hi - lo;
    if m == n {
        if !whole {
            out.push(subtree_root(src, lo, hi)?);
        }
        return Ok(());
    }
    let k = split(n);
    if m <= k {
        subproof_rec(src, m, lo, lo + k, whole, out)?;
        out.push(subtree_root(src, lo + k, hi)?);
    } else {
        subproof_rec(src, m - k, lo + k, hi, false, out)?;
        out.push(subtree_root(src, lo, lo + k)?);
    }
    Ok(())
}

/// The perfect-subtree nodes that become complete when the leaf at `index`
/// (with hash `leaf`) is appended: `(level, index, hash)`, level 0 first.
/// `left_sibling(level, index)` returns existing nodes.
pub fn perfect_nodes_after_append<E>(
    index: u64,
    leaf: Hash,
    mut left_sibling: impl FnMut(u32, u64) -> Result<Hash, E>,
) -> Result<Vec<(u32, u64, Hash)>, E> {
    let mut nodes = vec![(0, index, leaf)];
    let (mut level, mut idx, mut hash) = (0u32, index, leaf);
    while idx % 2 == 1 {
        let left = left_sibling(level, idx - 1)?;
        hash = node_hash(&left, &hash);
        level += 1;
        idx /= 2;
        nodes.push((level, idx, hash));
    }
    Ok(nodes)
}

/// Why an inclusion or consistency proof does not check out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProofError {
    /// The proof's length or the indices do not fit the tree sizes.
    BadShape,
    /// The hashes lead to a root other than the expected one.
    RootMismatch,
}

/// Recomputes the root from a leaf hash and its RFC 9162 inclusion path
/// (§2.1.3.2). Fails with `BadShape` on any length or index mismatch.
pub fn root_from_inclusion_proof(
    index: u64,
    size: u64,
    leaf: &Hash,
    path: &[Hash],
) -> Result<Hash, ProofError> {
    if index >= size {
        return Err(ProofError::BadShape);
    }
    let (mut fn_, mut sn, mut r) = (index, size - 1, *leaf);
    for p in path {
        if sn == 0 {
            return Err(ProofError::BadShape);
        }
        if fn_ & 1 == 1 || fn_ == sn {
            r = node_hash(p, &r);
            while fn_ & 1 == 0 && fn_ != 0 {
                fn_ >>= 1;
                sn >>= 1;
            }
        } else {
            r = node_hash(&r, p);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    if sn != 0 {
        return Err(ProofError::BadShape);
    }
    Ok(r)
}

/// Verifies an inclusion proof against an expected root.
pub fn verify_inclusion(
    index: u64,
    size: u64,
    leaf: &Hash,
    path: &[Hash],
    root: &Hash,
) -> Result<(), ProofError> {
    let computed = root_from_inclusion_proof(index, size, leaf, path)?;
    if hash_eq(&computed, root) {
        Ok(())
    } else {
        Err(ProofError::RootMismatch)
    }
}

/// Verifies an RFC 9162 consistency proof (§2.1.4.2) between two tree heads.
pub fn verify_consistency(
    old_size: u64,
    new_size: u64,
    old_root: &Hash,
    new_root: &Hash,
    proof: &[Hash],
) -> Result<(), ProofError> {
    if old_size > new_size {
        return Err(ProofError::BadShape);
    }
    if old_size == new_size {
        if !proof.is_empty() {
            return Err(ProofError::BadShape);
        }
        return if hash_eq(old_root, new_root) { Ok(()) } else { Err(ProofError::RootMismatch) };
    }
    if old_size == 0 {
        // Every tree extends the empty tree; nothing to prove.
        return if proof.is_empty() { Ok(()) } else { Err(ProofError::BadShape) };
    }
    let mut path: Vec<Hash> = Vec::with_capacity(proof.len() + 1);
    if old_size.is_power_of_two() {
        path.push(*old_root);
    }
    path.extend_from_slice(proof);
    let Some((first, rest)) = path.split_first() else {
        return Err(ProofError::BadShape);
    };
    let (mut fn_, mut sn) = (old_size - 1, new_size - 1);
    while fn_ & 1 == 1 {
        fn_ >>= 1;
        sn >>= 1;
    }
    let (mut fr, mut sr) = (*first, *first);
    for c in rest {
        if sn == 0 {
            return Err(ProofError::BadShape);
        }
        if fn_ & 1 == 1 || fn_ == sn {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            while fn_ & 1 == 0 && fn_ != 0 {
                fn_ >>= 1;
                sn >>= 1;
            }
        } else {
            sr = node_hash(&sr, c);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    if sn != 0 {
        return Err(ProofError::BadShape);
    }
    if hash_eq(&fr, old_root) && hash_eq(&sr, new_root) {
        Ok(())
    } else {
        Err(ProofError::RootMismatch)
    }
}

/// An in-memory append-only tree that keeps every perfect node. Used by the
/// test-vector generator and tests; stores use their own [`NodeSource`].
#[derive(Debug, Default, Clone)]
pub struct MemoryTree {
    levels: Vec<Vec<Hash>>,
}

impl MemoryTree {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn size(&self) -> u64 {
        self.levels.first().map_or(0, |l| l.len() as u64)
    }

    /// Every perfect-subtree node at `min_level` or above: (level, index, hash).
    pub fn perfect_nodes(&self, min_level: u32) -> Vec<(u32, u64, Hash)> {
        self.levels
            .iter()
            .enumerate()
            .skip(min_level as usize)
            .flat_map(|(level, hashes)| {
                hashes.iter().enumerate().map(move |(idx, h)| (level as u32, idx as u64, *h))
            })
            .collect()
    }

    pub fn append(&mut self, leaf: Hash) {
        let index = self.size();
        let levels = &self.levels;
        let nodes = perfect_nodes_after_append::<()>(index, leaf, |level, idx| {
            levels.get(level as usize).and_then(|l| l.get(idx as usize)).copied().ok_or(())
        })
        .unwrap_or_default();
        for (level, _, hash) in nodes {
            if self.levels.len() <= level as usize {
                self.levels.push(Vec::new());
            }
            self.levels[level as usize].push(hash);
        }
    }
}

/// Asked for a node that the tree does not hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MissingNode;

impl NodeSource for MemoryTree {
    type Error = MissingNode;
    fn node(&mut self, level: u32, index: u64) -> Result<Hash, MissingNode> {
        self.levels.get(level as usize).and_then(|l| l.get(index as usize)).copied().ok_or(MissingNode)
    }
}

#[cfg(test)]
mod tests {
    //! Checked against naive implementations written from the RFC 9162 text.
    use super::*;
    use crate::hash::leaf_hash;

    fn leaves(n: u64) -> Vec<Hash> {
        (0..n).map(|i| leaf_hash(&i.to_be_bytes())).collect()
    }

    // RFC 9162 §2.1.1: MTH({d(0)}) = leaf hash; MTH(D[n]) = HASH(0x01 || MTH(D[0:k]) || MTH(D[k:n])).
    fn mth(d: &[Hash]) -> Hash {
        if d.len() == 1 {
            return d[0];
        }
        let k = split(d.len() as u64) as usize;
        node_hash(&mth(&d[..k]), &mth(&d[k..]))
    }

    // §2.1.3.1 PATH(m, D[n]).
    fn path(m: usize, d: &[Hash]) -> Vec<Hash> {
        if d.len() == 1 {
            return vec![];
        }
        let k = split(d.len() as u64) as usize;
        if m < k {
            let mut p = path(m, &d[..k]);
            p.push(mth(&d[k..]));
            p
        } else {
            let mut p = path(m - k, &d[k..]);
            p.push(mth(&d[..k]));
            p
        }
    }

    // §2.1.4.1 SUBPROOF(m, D[n], b).
    fn subproof(m: usize, d: &[Hash], b: bool) -> Vec<Hash> {
        let n = d.len();
        if m == n {
            return if b { vec![] } else { vec![mth(d)] };
        }
        let k = split(n as u64) as usize;
        if m <= k {
            let mut p = subproof(m, &d[..k], b);
            p.push(mth(&d[k..]));
            p
        } else {
            let mut p = subproof(m - k, &d[k..], false);
            p.push(mth(&d[..k]));
            p
        }
    }

    #[test]
    fn roots_and_inclusion_match_rfc_for_every_size_and_index() {
        let all = leaves(130);
        let mut tree = MemoryTree::new();
        for (i, leaf) in all.iter().enumerate() {
            tree.append(*leaf);
            let n = i + 1;
            let d = &all[..n];
            let r = root(&mut tree, n as u64).expect("root");
            assert_eq!(r, mth(d), "root size {n}");
            for m in 0..n {
                let p = inclusion_proof(&mut tree, m as u64, n as u64).expect("path");
                assert_eq!(p, path(m, d), "path {m} in {n}");
                verify_inclusion(m as u64, n as u64, &d[m], &p, &r).expect("verifies");
            }
        }
    }

    #[test]
    fn consistency_matches_rfc_and_verifies() {
        let all = leaves(70);
        let mut tree = MemoryTree::new();
        for l in &all {
            tree.append(*l);
        }
        for n in 1..=70u64 {
            let new_root = mth(&all[..n as usize]);
            for m in 1..=n {
                let p = consistency_proof(&mut tree, m, n).expect("proof");
                if m < n {
                    assert_eq!(p, subproof(m as usize, &all[..n as usize], true), "{m}->{n}");
                }
                let old_root = mth(&all[..m as usize]);
                verify_consistency(m, n, &old_root, &new_root, &p).expect("consistent");
                // A wrong old root must fail.
                let bad = leaf_hash(b"not the old root");
                assert!(verify_consistency(m, n, &bad, &new_root, &p).is_err(), "{m}->{n}");
            }
        }
    }

    #[test]
    fn tampered_inclusion_proofs_fail() {
        let all = leaves(13);
        let mut tree = MemoryTree::new();
        all.iter().for_each(|l| tree.append(*l));
        let r = mth(&all);
        let p = inclusion_proof(&mut tree, 5, 13).expect("path");
        let mut flipped = p.clone();
        flipped[1][3] ^= 0x08;
        assert_eq!(verify_inclusion(5, 13, &all[5], &flipped, &r), Err(ProofError::RootMismatch));
        let mut longer = p.clone();
        longer.push(r);
        assert_eq!(verify_inclusion(5, 13, &all[5], &longer, &r), Err(ProofError::BadShape));
        assert_eq!(verify_inclusion(5, 13, &all[5], &p[..p.len() - 1], &r), Err(ProofError::BadShape));
        assert_eq!(verify_inclusion(13, 13, &all[5], &p, &r), Err(ProofError::BadShape));
        assert_eq!(verify_inclusion(4, 13, &all[5], &p, &r), Err(ProofError::RootMismatch));
    }
}
