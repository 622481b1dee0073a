//! Offline verification of a proof bundle. Every part is checked and any
//! failure is fatal: there is no "partially valid".
//!
//! Order: parse → checkpoint signature → receipts → batch in log → leaf in
//! batch → payload digest. The first failing check names the error.

use crate::batch::BatchRecord;
use crate::bundle::{ProofBundle, BUNDLE_FORMAT};
use crate::checkpoint::{Checkpoint, NoteError, NoteVerifier};
use crate::leaf::LeafRecord;
use crate::receipt::{Receipt, ReceiptProblem};
use crate::tree::{verify_inclusion, ProofError};

/// Which Merkle tree a path belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tree {
    /// The leaf inside its batch.
    Batch,
    /// The batch record inside the log.
    Log,
}

impl std::fmt::Display for Tree {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Tree::Batch => "batch",
            Tree::Log => "log",
        })
    }
}

/// Why a bundle does not prove a payload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("malformed bundle: {0}")]
    Malformed(String),
    #[error("the checkpoint is not signed by the given broker key")]
    UnknownKey,
    #[error("the checkpoint signature does not verify")]
    BadCheckpointSignature,
    #[error("anchor receipt does not match the checkpoint: {0}")]
    ReceiptMismatch(&'static str),
    #[error("the {0} inclusion path does not fit the tree's size and index")]
    BadPath(Tree),
    #[error("the {0} inclusion path leads to a different root")]
    RootMismatch(Tree),
    #[error("the payload does not match the leaf's digest")]
    DigestMismatch,
}

impl VerifyError {
    /// A stable, machine-readable name for the failed check.
    pub fn code(&self) -> &'static str {
        match self {
            VerifyError::Malformed(_) => "malformed",
            VerifyError::UnknownKey => "unknown-key",
            VerifyError::BadCheckpointSignature => "bad-checkpoint-signature",
            VerifyError::ReceiptMismatch(_) => "receipt-mismatch",
            VerifyError::BadPath(_) => "bad-path",
            VerifyError::RootMismatch(_) => "root-mismatch",
            VerifyError::DigestMismatch => "digest-mismatch",
        }
    }
}

/// What a valid bundle proves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub leaf: LeafRecord,
    pub batch: BatchRecord,
    pub checkpoint: Checkpoint,
    pub receipts: Vec<Receipt>,
}

/// Parses a bundle's JSON and verifies it.
pub fn verify_bundle_json(
    json: &[u8],
    payload: &[u8],
    broker_key: &NoteVerifier,
) -> Result<Verified, VerifyError> {
    let bundle: ProofBundle =
        serde_json::from_slice(json).map_err(|e| VerifyError::Malformed(e.to_string()))?;
    verify_bundle(&bundle, payload, broker_key)
}

/// Verifies that `bundle` proves `payload` was notarized by the broker whose
/// checkpoint key is `broker_key`.
pub fn verify_bundle(
    bundle: &ProofBundle,
    payload: &[u8],
    broker_key: &NoteVerifier,
) -> Result<Verified, VerifyError> {
    let malformed = |what: &str, e: crate::FormatError| VerifyError::Malformed(format!("{what}: {e}"));
    if bundle.format != BUNDLE_FORMAT {
        return Err(VerifyError::Malformed(format!(
            "unsupported format {:?}, expected {BUNDLE_FORMAT:?}",
            bundle.format
        )));
    }
    let leaf = LeafRecord::decode(&bundle.leaf).map_err(|e| malformed("leaf record", e))?;
    let batch = BatchRecord::decode(&bundle.batch).map_err(|e| malformed("batch record", e))?;

    let checkpoint = broker_key.verify_checkpoint(&bundle.checkpoint).map_err(|e| match e {
        NoteError::Malformed(m) => VerifyError::Malformed(format!("checkpoint: {m}")),
        NoteError::UnknownKey => VerifyError::UnknownKey,
        NoteError::BadSignature => VerifyError::BadCheckpointSignature,
    })?;

    if bundle.receipts.is_empty() {
        return Err(VerifyError::ReceiptMismatch("the bundle carries no anchor receipt"));
    }
    for receipt in &bundle.receipts {
        receipt.check(&bundle.checkpoint).map_err(|p| {
            VerifyError::ReceiptMismatch(match p {
                ReceiptProblem::CheckpointHash => "it names a different checkpoint",
                ReceiptProblem::EntryHash => "its entry hash is not the hash of its fields",
            })
        })?;
    }

    let path_err = |tree| {
        move |e| match e {
            ProofError::BadShape => VerifyError::BadPath(tree),
            ProofError::RootMismatch => VerifyError::RootMismatch(tree),
        }
    };
    verify_inclusion(batch.number, checkpoint.size, &batch.leaf_hash(), &bundle.log_path, &checkpoint.root)
        .map_err(path_err(Tree::Log))?;

    if bundle.leaf_index >= batch.size || leaf.seq != batch.first_seq + bundle.leaf_index {
        return Err(VerifyError::BadPath(Tree::Batch));
    }
    let leaf_hash = crate::hash::leaf_hash(&bundle.leaf);
    verify_inclusion(bundle.leaf_index, batch.size, &leaf_hash, &bundle.batch_path, &batch.root)
        .map_err(path_err(Tree::Batch))?;

    if leaf.payload_len != payload.len() as u64
        || !crate::hash::hash_eq(blake3::hash(payload).as_bytes(), &leaf.payload_digest)
    {
        return Err(VerifyError::DigestMismatch);
    }

    Ok(Verified { leaf, batch, checkpoint, receipts: bundle.receipts.clone() })
}
