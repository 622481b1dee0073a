//! The proof bundle: one JSON document that proves one notarized message
//! offline, from payload to ledger anchor (docs/PROTOCOL.md §Proof bundle).
//!
//! Binary records travel as base64 of their canonical bytes, so a verifier
//! hashes exactly what the log committed to and never re-serializes.

use crate::receipt::Receipt;
use crate::Hash;
use serde::{Deserialize, Serialize};

/// The value of the `format` field of a version 1 bundle.
pub const BUNDLE_FORMAT: &str = "mqtt-notary/bundle/v1";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProofBundle {
    pub format: String,
    /// The leaf record (base64).
    #[serde(with = "b64")]
    pub leaf: Vec<u8>,
    /// The leaf's index inside its batch.
    pub leaf_index: u64,
    /// RFC 9162 inclusion path of the leaf in the batch tree, leaf to root.
    #[serde(with = "b64_list")]
    pub batch_path: Vec<Hash>,
    /// The batch record (base64); its number is its index in the log.
    #[serde(with = "b64")]
    pub batch: Vec<u8>,
    /// RFC 9162 inclusion path of the batch record in the log at the
    /// checkpoint's size.
    #[serde(with = "b64_list")]
    pub log_path: Vec<Hash>,
    /// The signed checkpoint note.
    pub checkpoint: String,
    /// Anchors of this checkpoint, one per ledger.
    pub receipts: Vec<Receipt>,
    /// Anchors of later checkpoints that cover this one, for ledgers that
    /// did not anchor `checkpoint` itself (a chain anchors only the newest
    /// checkpoint once per interval). Each carries the consistency proof
    /// from `checkpoint` to the anchored one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub later_anchors: Vec<LaterAnchor>,
    /// Configured ledgers that have not yet anchored this checkpoint or a
    /// later one (e.g. `evm` before the next anchoring transaction is
    /// mined). Ask again later for the upgraded bundle.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending_ledgers: Vec<String>,
    /// For a device-signed leaf: the registry leaves that show which key
    /// the device held at the leaf's position. Absent for other leaves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_key: Option<KeyEvidence>,
}

/// A later signed checkpoint, the RFC 9162 consistency proof from the
/// bundle's checkpoint to it, and its receipts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LaterAnchor {
    /// The later signed checkpoint note (same log, same key, larger size).
    pub checkpoint: String,
    /// RFC 9162 consistency proof from the bundle's checkpoint to this one.
    #[serde(with = "b64_list")]
    pub consistency: Vec<Hash>,
    /// Anchors of this later checkpoint.
    pub receipts: Vec<Receipt>,
}

/// The registry leaves behind a device-signed leaf, each proven into the
/// same checkpoint as the bundle's leaf.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyEvidence {
    /// The enrolment or rotation that put the signing key in place.
    pub enrolment: LeafProof,
    /// The device's next registry event, if the checkpoint holds one: a
    /// later rotation or revocation. It must come after the message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub superseded_by: Option<LeafProof>,
}

/// One leaf proven into a checkpoint: leaf, batch path, batch, log path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeafProof {
    #[serde(with = "b64")]
    pub leaf: Vec<u8>,
    pub leaf_index: u64,
    #[serde(with = "b64_list")]
    pub batch_path: Vec<Hash>,
    #[serde(with = "b64")]
    pub batch: Vec<u8>,
    #[serde(with = "b64_list")]
    pub log_path: Vec<Hash>,
}

impl ProofBundle {
    pub fn to_json(&self) -> String {
        // A struct of strings, numbers and lists always serializes.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// The bundle's own leaf and its paths.
    pub fn leaf_proof(&self) -> LeafProof {
        LeafProof {
            leaf: self.leaf.clone(),
            leaf_index: self.leaf_index,
            batch_path: self.batch_path.clone(),
            batch: self.batch.clone(),
            log_path: self.log_path.clone(),
        }
    }
}

mod b64 {
    use base64::engine::general_purpose::STANDARD as B64;
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&B64.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        B64.decode(s).map_err(|_| serde::de::Error::custom("invalid base64"))
    }
}

mod b64_list {
    use base64::engine::general_purpose::STANDARD as B64;
    use base64::Engine as _;
    use serde::ser::SerializeSeq;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[[u8; 32]], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(v.len()))?;
        for h in v {
            seq.serialize_element(&B64.encode(h))?;
        }
        seq.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<[u8; 32]>, D::Error> {
        let v = Vec::<String>::deserialize(d)?;
        v.into_iter()
            .map(|s| {
                B64.decode(s)
                    .ok()
                    .and_then(|b| b.try_into().ok())
                    .ok_or_else(|| serde::de::Error::custom("hash is not 32 bytes of base64"))
            })
            .collect()
    }
}
