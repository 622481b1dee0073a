//! Anchor receipts: evidence that a signed checkpoint was recorded in a ledger.
//!
//! Two ledgers: the local SQLite hash chain, and EVM chains (a transaction
//! whose calldata commits to the checkpoint, see [`evm_calldata`]).
//!
//! The local ledger's entry is encoded (big-endian) and hashed as:
//!
//! ```text
//! u8   version = 1
//! u64  index            position in the chain, from 0
//! [32] previous entry hash (32 zero bytes for index 0)
//! [32] checkpoint hash  SHA-256 of the whole signed checkpoint note
//! u64  anchored_at_ms   ledger clock, Unix milliseconds
//! entry hash = SHA-256(encoding)
//! ```

use crate::hash::{hash_eq, sha256, Hash};
use serde::{Deserialize, Serialize};

pub const LOCAL_ENTRY_VERSION: u8 = 1;

/// One entry of the local ledger's hash chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalEntry {
    pub index: u64,
    pub prev_hash: Hash,
    pub checkpoint_hash: Hash,
    pub anchored_at_ms: u64,
}

impl LocalEntry {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(81);
        out.push(LOCAL_ENTRY_VERSION);
        out.extend_from_slice(&self.index.to_be_bytes());
        out.extend_from_slice(&self.prev_hash);
        out.extend_from_slice(&self.checkpoint_hash);
        out.extend_from_slice(&self.anchored_at_ms.to_be_bytes());
        out
    }

    pub fn hash(&self) -> Hash {
        sha256(&self.encode())
    }
}

/// A receipt as carried in a proof bundle, tagged by ledger type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Receipt {
    /// An entry in the broker's local SQLite ledger.
    Local {
        index: u64,
        #[serde(with = "hex32")]
        prev_hash: Hash,
        #[serde(with = "hex32")]
        checkpoint_hash: Hash,
        anchored_at_ms: u64,
        #[serde(with = "hex32")]
        entry_hash: Hash,
    },
    /// A transaction on an EVM chain whose calldata is
    /// [`evm_calldata`]`(checkpoint_hash)`. Offline, only the binding to
    /// the checkpoint can be checked; that the transaction is in the
    /// canonical chain needs an RPC endpoint.
    Evm {
        /// The broker's view when it served the bundle: `final` once the
        /// transaction had its configured confirmations. Advisory; a
        /// verifier decides finality itself, on chain.
        status: EvmStatus,
        chain_id: u64,
        #[serde(with = "hex0x")]
        tx_hash: Hash,
        block_number: u64,
        #[serde(with = "hex0x")]
        block_hash: Hash,
        /// The anchoring account.
        #[serde(with = "hex0x")]
        from: [u8; 20],
        /// The transaction's recipient.
        #[serde(with = "hex0x")]
        to: [u8; 20],
        #[serde(with = "hex32")]
        checkpoint_hash: Hash,
    },
}

/// How far an EVM anchor had got when the broker served it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EvmStatus {
    /// Mined, with fewer confirmations than the broker waits for.
    Pending,
    /// Mined, with at least the configured confirmations.
    Final,
}

impl EvmStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            EvmStatus::Pending => "pending",
            EvmStatus::Final => "final",
        }
    }
}

/// The first bytes of an anchoring transaction's calldata: ASCII `MNA1`.
pub const EVM_CALLDATA_MAGIC: [u8; 4] = *b"MNA1";

/// The calldata of a transaction that anchors a checkpoint: `MNA1` followed
/// by SHA-256 of the signed checkpoint note (36 bytes).
pub fn evm_calldata(checkpoint_hash: &Hash) -> [u8; 36] {
    let mut out = [0u8; 36];
    out[..4].copy_from_slice(&EVM_CALLDATA_MAGIC);
    out[4..].copy_from_slice(checkpoint_hash);
    out
}

/// Why a receipt does not bind the checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReceiptProblem {
    CheckpointHash,
    EntryHash,
}

impl Receipt {
    /// A local receipt for a ledger entry.
    pub fn local(entry: &LocalEntry) -> Self {
        Receipt::Local {
            index: entry.index,
            prev_hash: entry.prev_hash,
            checkpoint_hash: entry.checkpoint_hash,
            anchored_at_ms: entry.anchored_at_ms,
            entry_hash: entry.hash(),
        }
    }

    /// Checks, offline, that the receipt names this exact checkpoint note
    /// and that its entry hash is the hash of its fields.
    pub fn check(&self, checkpoint_note: &str) -> Result<(), ReceiptProblem> {
        match self {
            Receipt::Local { index, prev_hash, checkpoint_hash, anchored_at_ms, entry_hash } => {
                if !hash_eq(checkpoint_hash, &sha256(checkpoint_note.as_bytes())) {
                    return Err(ReceiptProblem::CheckpointHash);
                }
                let entry = LocalEntry {
                    index: *index,
                    prev_hash: *prev_hash,
                    checkpoint_hash: *checkpoint_hash,
                    anchored_at_ms: *anchored_at_ms,
                };
                if !hash_eq(&entry.hash(), entry_hash) {
                    return Err(ReceiptProblem::EntryHash);
                }
                Ok(())
            }
            Receipt::Evm { checkpoint_hash, .. } => {
                if !hash_eq(checkpoint_hash, &sha256(checkpoint_note.as_bytes())) {
                    return Err(ReceiptProblem::CheckpointHash);
                }
                Ok(())
            }
        }
    }

    /// The ledger's name, as anchors and the store call it.
    pub fn ledger(&self) -> &'static str {
        match self {
            Receipt::Local { .. } => "local",
            Receipt::Evm { .. } => "evm",
        }
    }

    /// A one-line human description.
    pub fn describe(&self) -> String {
        match self {
            Receipt::Local { index, anchored_at_ms, entry_hash, .. } => format!(
                "local ledger entry {index} ({}), anchored at {anchored_at_ms} ms",
                hex::encode(entry_hash)
            ),
            Receipt::Evm { status, chain_id, tx_hash, block_number, .. } => format!(
                "EVM chain {chain_id}, transaction 0x{} in block {block_number} ({} when served)",
                hex::encode(tx_hash),
                status.as_str()
            ),
        }
    }
}

/// `0x`-prefixed hex of a fixed-size byte string, as EVM tools write it.
pub(crate) mod hex0x {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer, const N: usize>(h: &[u8; N], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("0x{}", hex::encode(h)))
    }

    pub fn deserialize<'de, D: Deserializer<'de>, const N: usize>(d: D) -> Result<[u8; N], D::Error> {
        let s = String::deserialize(d)?;
        let digits =
            s.strip_prefix("0x").ok_or_else(|| serde::de::Error::custom("expected 0x-prefixed hex"))?;
        let mut out = [0u8; N];
        hex::decode_to_slice(digits, &mut out)
            .map_err(|_| serde::de::Error::custom(format!("expected 0x and {} hex digits", 2 * N)))?;
        Ok(out)
    }
}

pub(crate) mod hex32 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(h: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(h))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = String::deserialize(d)?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(&s, &mut out).map_err(|_| serde::de::Error::custom("expected 64 hex digits"))?;
        Ok(out)
    }
}
