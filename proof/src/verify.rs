//! Offline verification of a proof bundle. Every part is checked and any
//! failure is fatal: there is no "partially valid".
//!
//! Order (docs/PROTOCOL.md §Verification): parse, decode and the bundle's
//! structural rules → checkpoint signature → receipts and their signed
//! ledger heads → later anchors (their signatures, consistency with the
//! checkpoint, their receipts) → batch in log → leaf in batch → payload
//! digest → for device-signed leaves: key evidence, then envelope and
//! device signature; for registry leaves: the registry rule. The first
//! failing check names the error.

use crate::batch::BatchRecord;
use crate::bundle::{KeyEvidence, LaterAnchor, LeafProof, ProofBundle, BUNDLE_FORMAT};
use crate::checkpoint::{Checkpoint, NoteError, NoteVerifier};
use crate::device::{RegistryAction, RegistryEvent};
use crate::envelope::Envelope;
use crate::leaf::{Assurance, LeafRecord};
use crate::receipt::Receipt;
use crate::tree::{verify_consistency, verify_inclusion, ProofError};

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
    ReceiptMismatch(String),
    #[error("the {0} inclusion path does not fit the tree's size and index")]
    BadPath(Tree),
    #[error("the {0} inclusion path leads to a different root")]
    RootMismatch(Tree),
    #[error("the payload does not match the leaf's digest")]
    DigestMismatch,
    #[error("the device key evidence does not hold: {0}")]
    BadKeyEvidence(String),
    #[error("the payload is not the envelope the leaf describes: {0}")]
    BadEnvelope(String),
    #[error("the device signature does not verify with the enrolled key")]
    BadDeviceSignature,
    #[error("a later anchored checkpoint is not consistent with the bundle's: {0}")]
    BadConsistency(String),
    #[error("the registry leaf is not a registry change: {0}")]
    BadRegistryLeaf(&'static str),
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
            VerifyError::BadKeyEvidence(_) => "bad-key-evidence",
            VerifyError::BadEnvelope(_) => "bad-envelope",
            VerifyError::BadDeviceSignature => "bad-device-signature",
            VerifyError::BadConsistency(_) => "bad-consistency",
            VerifyError::BadRegistryLeaf(_) => "bad-registry-leaf",
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
    /// Later checkpoints proven consistent with `checkpoint`, with their
    /// receipts: they anchor this checkpoint too.
    pub later: Vec<(Checkpoint, Vec<Receipt>)>,
    /// Ledgers the broker said had not anchored this checkpoint yet.
    pub pending_ledgers: Vec<String>,
    /// Set for device-signed leaves.
    pub device: Option<VerifiedDevice>,
}

impl Verified {
    /// Every receipt: this checkpoint's, then those of later checkpoints.
    pub fn all_receipts(&self) -> impl Iterator<Item = &Receipt> {
        self.receipts.iter().chain(self.later.iter().flat_map(|(_, r)| r))
    }
}

/// What a valid bundle proves about a device-signed message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedDevice {
    pub device_id: String,
    pub counter: u64,
    pub device_time_ms: u64,
    pub content_type: String,
    /// The key that signed, and the registry leaf that enrolled it.
    pub public_key: [u8; 32],
    pub key_seq: u64,
    /// A later rotation or revocation of that key within the checkpoint.
    pub superseded: Option<(RegistryAction, u64)>,
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
    // Step 1: what parsing leaves to check.
    if bundle.format != BUNDLE_FORMAT {
        return Err(VerifyError::Malformed(format!(
            "unsupported format {:?}, expected {BUNDLE_FORMAT:?}",
            bundle.format
        )));
    }
    let (leaf, batch) = decode(&bundle.leaf_proof())?;
    if bundle.device_key.is_some() && leaf.assurance != Assurance::DeviceSigned {
        return Err(VerifyError::Malformed("key evidence for a leaf that is not device-signed".into()));
    }
    check_ledgers(bundle)?;

    let checkpoint = broker_key.verify_checkpoint(&bundle.checkpoint).map_err(|e| match e {
        NoteError::Malformed(m) => VerifyError::Malformed(format!("checkpoint: {m}")),
        NoteError::UnknownKey => VerifyError::UnknownKey,
        NoteError::BadSignature => VerifyError::BadCheckpointSignature,
    })?;

    if bundle.receipts.is_empty() {
        return Err(VerifyError::ReceiptMismatch("the bundle carries no anchor receipt".into()));
    }
    check_receipts(&bundle.receipts, &bundle.checkpoint, broker_key)?;
    let later = bundle
        .later_anchors
        .iter()
        .map(|a| verify_later(a, &checkpoint, broker_key))
        .collect::<Result<Vec<_>, _>>()?;

    prove_decoded(&bundle.leaf_proof(), &leaf, &batch, &checkpoint)?;

    if leaf.payload_len != payload.len() as u64
        || !crate::hash::hash_eq(blake3::hash(payload).as_bytes(), &leaf.payload_digest)
    {
        return Err(VerifyError::DigestMismatch);
    }

    let device = match (&leaf.assurance, &bundle.device_key) {
        (Assurance::DeviceSigned, Some(evidence)) => {
            Some(verify_device(&leaf, payload, evidence, &checkpoint)?)
        }
        (Assurance::DeviceSigned, None) => {
            return Err(VerifyError::BadKeyEvidence("a device-signed leaf needs key evidence".into()))
        }
        _ => None,
    };
    leaf.check_registry().map_err(|e| VerifyError::BadRegistryLeaf(e.0))?;

    Ok(Verified {
        leaf,
        batch,
        checkpoint,
        receipts: bundle.receipts.clone(),
        later,
        pending_ledgers: bundle.pending_ledgers.clone(),
        device,
    })
}

/// One receipt per ledger in the whole bundle, and `pending_ledgers` naming
/// each ledger at most once and none that has a receipt.
fn check_ledgers(bundle: &ProofBundle) -> Result<(), VerifyError> {
    let mut seen: Vec<&str> = Vec::new();
    let anchored = bundle.receipts.iter().chain(bundle.later_anchors.iter().flat_map(|a| &a.receipts));
    let pending = bundle.pending_ledgers.iter().map(String::as_str);
    for ledger in anchored.map(|r| -> &str { r.ledger() }).chain(pending) {
        if seen.contains(&ledger) {
            return Err(VerifyError::Malformed(format!(
                "ledger {ledger:?} has two receipts, or a receipt and a pending entry"
            )));
        }
        seen.push(ledger);
    }
    Ok(())
}

/// Each receipt must name exactly this checkpoint note, and a signed
/// ledger head must be the broker's.
fn check_receipts(receipts: &[Receipt], note: &str, broker_key: &NoteVerifier) -> Result<(), VerifyError> {
    for receipt in receipts {
        receipt
            .check(note, broker_key)
            .map_err(|p| VerifyError::ReceiptMismatch(format!("{} receipt: {p}", receipt.ledger())))?;
    }
    Ok(())
}

/// A later checkpoint: signed by the same key, strictly larger, consistent
/// with the bundle's checkpoint, and with receipts that name it.
fn verify_later(
    a: &LaterAnchor,
    checkpoint: &Checkpoint,
    broker_key: &NoteVerifier,
) -> Result<(Checkpoint, Vec<Receipt>), VerifyError> {
    let later = broker_key.verify_checkpoint(&a.checkpoint).map_err(|e| match e {
        NoteError::Malformed(m) => VerifyError::Malformed(format!("later checkpoint: {m}")),
        NoteError::UnknownKey => VerifyError::UnknownKey,
        NoteError::BadSignature => VerifyError::BadCheckpointSignature,
    })?;
    if later.origin != checkpoint.origin || later.size <= checkpoint.size {
        return Err(VerifyError::BadConsistency(format!(
            "the later checkpoint ({} size {}) is not a larger size of the same log",
            later.origin, later.size
        )));
    }
    verify_consistency(checkpoint.size, later.size, &checkpoint.root, &later.root, &a.consistency).map_err(
        |e| {
            VerifyError::BadConsistency(
                match e {
                    ProofError::BadShape => "the proof does not fit the two sizes",
                    ProofError::RootMismatch => "the proof leads to different roots",
                }
                .into(),
            )
        },
    )?;
    if a.receipts.is_empty() {
        return Err(VerifyError::ReceiptMismatch("a later checkpoint carries no anchor receipt".into()));
    }
    check_receipts(&a.receipts, &a.checkpoint, broker_key)?;
    Ok((later, a.receipts.clone()))
}

/// Decodes a leaf proof's leaf and batch records (step 1).
fn decode(p: &LeafProof) -> Result<(LeafRecord, BatchRecord), VerifyError> {
    let malformed = |what: &str, e: crate::FormatError| VerifyError::Malformed(format!("{what}: {e}"));
    let leaf = LeafRecord::decode(&p.leaf).map_err(|e| malformed("leaf record", e))?;
    let batch = BatchRecord::decode(&p.batch).map_err(|e| malformed("batch record", e))?;
    Ok((leaf, batch))
}

/// Checks that one leaf is in its batch and its batch in the checkpoint's log.
fn prove_leaf(p: &LeafProof, checkpoint: &Checkpoint) -> Result<(LeafRecord, BatchRecord), VerifyError> {
    let (leaf, batch) = decode(p)?;
    prove_decoded(p, &leaf, &batch, checkpoint)?;
    Ok((leaf, batch))
}

/// Steps 4 and 5 for a leaf proof whose records are decoded.
fn prove_decoded(
    p: &LeafProof,
    leaf: &LeafRecord,
    batch: &BatchRecord,
    checkpoint: &Checkpoint,
) -> Result<(), VerifyError> {
    let path_err = |tree| {
        move |e| match e {
            ProofError::BadShape => VerifyError::BadPath(tree),
            ProofError::RootMismatch => VerifyError::RootMismatch(tree),
        }
    };
    verify_inclusion(batch.number, checkpoint.size, &batch.leaf_hash(), &p.log_path, &checkpoint.root)
        .map_err(path_err(Tree::Log))?;
    if p.leaf_index >= batch.size || batch.first_seq.checked_add(p.leaf_index) != Some(leaf.seq) {
        return Err(VerifyError::BadPath(Tree::Batch));
    }
    let leaf_hash = crate::hash::leaf_hash(&p.leaf);
    verify_inclusion(p.leaf_index, batch.size, &leaf_hash, &p.batch_path, &batch.root)
        .map_err(path_err(Tree::Batch))
}

/// A registry leaf of `device_id`, proven into the checkpoint.
fn registry_leaf(
    p: &LeafProof,
    checkpoint: &Checkpoint,
    device_id: &str,
) -> Result<(u64, RegistryEvent), VerifyError> {
    let (leaf, _) = prove_leaf(p, checkpoint)?;
    let event = leaf
        .registry_event()
        .ok_or_else(|| VerifyError::BadKeyEvidence("evidence leaf is not a registry event".into()))?;
    leaf.check_registry().map_err(|e| VerifyError::BadKeyEvidence(e.to_string()))?;
    if event.device_id != device_id {
        return Err(VerifyError::BadKeyEvidence(format!("evidence is about device {:?}", event.device_id)));
    }
    Ok((leaf.seq, event))
}

/// Checks a device-signed leaf: the key was enrolled before it and not
/// replaced before it (within the checkpoint), and the payload is an
/// envelope for this topic signed by that key.
fn verify_device(
    leaf: &LeafRecord,
    payload: &[u8],
    evidence: &KeyEvidence,
    checkpoint: &Checkpoint,
) -> Result<VerifiedDevice, VerifyError> {
    let bad_evidence = |m: &str| VerifyError::BadKeyEvidence(m.to_owned());
    let fields = leaf.device_fields().ok_or_else(|| VerifyError::Malformed("device fields".into()))?;
    let (key_seq, enrolment) = registry_leaf(&evidence.enrolment, checkpoint, &fields.device_id)?;
    if key_seq != fields.key_seq || key_seq >= leaf.seq {
        return Err(bad_evidence("the enrolment is not the one the leaf names"));
    }
    if !matches!(enrolment.action, RegistryAction::Enrol | RegistryAction::Rotate) {
        return Err(bad_evidence("the named registry event does not put a key in place"));
    }
    let superseded = match &evidence.superseded_by {
        None => None,
        Some(p) => {
            let (seq, next) = registry_leaf(p, checkpoint, &fields.device_id)?;
            if next.prev_seq != key_seq {
                return Err(bad_evidence("the later event does not follow the enrolment"));
            }
            if seq < leaf.seq {
                return Err(bad_evidence("the key was replaced or revoked before the message"));
            }
            Some((next.action, seq))
        }
    };
    let key = ed25519_dalek::VerifyingKey::from_bytes(&enrolment.public_key)
        .map_err(|_| bad_evidence("the enrolled key is not an ed25519 point"))?;
    let env = Envelope::parse(payload, &leaf.topic).map_err(|e| VerifyError::BadEnvelope(e.to_string()))?;
    if env.device_id != fields.device_id
        || env.counter != fields.counter
        || env.device_time_ms != fields.device_time_ms
    {
        return Err(VerifyError::BadEnvelope("device id, counter or time differ from the leaf".into()));
    }
    env.verify(&key).map_err(|_| VerifyError::BadDeviceSignature)?;
    Ok(VerifiedDevice {
        device_id: fields.device_id,
        counter: fields.counter,
        device_time_ms: fields.device_time_ms,
        content_type: env.content_type,
        public_key: enrolment.public_key,
        key_seq,
        superseded,
    })
}
