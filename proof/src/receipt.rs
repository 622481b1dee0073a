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
//!
//! The broker signs each entry it appends as a ledger head, a signed note
//! with the checkpoint key (docs/PROTOCOL.md §Local ledger):
//!
//! ```text
//! <origin>                        the key name, as in checkpoints
//! mqtt-notary/local-ledger/v1     tells it apart from a checkpoint
//! <size>                          entries in the chain: index + 1
//! <base64 entry hash>             the newest entry's hash
//! ```

use crate::checkpoint::{base64_hash, canonical_u64, NoteError, NoteVerifier};
use crate::hash::{hash_eq, sha256, Hash};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

pub const LOCAL_ENTRY_VERSION: u8 = 1;

/// The second line of a signed ledger head. A checkpoint's second line is
/// a number, so neither note can pass for the other.
pub const LEDGER_HEAD_TYPE: &str = "mqtt-notary/local-ledger/v1";

/// The head of the local ledger: how many entries it holds and the newest
/// entry's hash. Signed, it proves every field of that entry, and through
/// the `prev_hash` links every earlier one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerHead {
    pub origin: String,
    pub size: u64,
    pub head: Hash,
}

impl LedgerHead {
    pub fn body(&self) -> String {
        format!("{}\n{LEDGER_HEAD_TYPE}\n{}\n{}\n", self.origin, self.size, B64.encode(self.head))
    }

    pub fn parse_body(body: &str) -> Result<Self, NoteError> {
        let lines: Vec<&str> = body
            .strip_suffix('\n')
            .ok_or(NoteError::Malformed("body must end with a newline"))?
            .split('\n')
            .collect();
        let [origin, kind, size, head] = lines[..] else {
            return Err(NoteError::Malformed("a ledger head has exactly four lines"));
        };
        if origin.is_empty() || kind != LEDGER_HEAD_TYPE {
            return Err(NoteError::Malformed("not a local ledger head"));
        }
        Ok(LedgerHead { origin: origin.to_owned(), size: canonical_u64(size)?, head: base64_hash(head)? })
    }
}

impl NoteVerifier {
    /// Verifies a signed ledger head and parses it. Its origin must be the
    /// key's name, as a checkpoint's must.
    pub fn verify_ledger_head(&self, note: &str) -> Result<LedgerHead, NoteError> {
        let head = LedgerHead::parse_body(self.verify(note)?)?;
        if head.origin != self.name() {
            return Err(NoteError::UnknownKey);
        }
        Ok(head)
    }
}

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
        /// The ledger head the broker signed when it appended this entry
        /// (size `index + 1`, hash `entry_hash`). Receipts of releases
        /// before it was added lack it; their index and time are then the
        /// broker's unsigned claim.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        head: Option<String>,
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReceiptProblem {
    CheckpointHash,
    EntryHash,
    /// Index 0 with a non-zero previous hash, or a later index with zero.
    FirstEntry,
    /// The signed ledger head does not verify with the broker key.
    Head(NoteError),
    /// The signed ledger head is not this entry's.
    HeadMismatch,
}

impl std::fmt::Display for ReceiptProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReceiptProblem::CheckpointHash => f.write_str("it names a different checkpoint"),
            ReceiptProblem::EntryHash => f.write_str("its entry hash is not the hash of its fields"),
            ReceiptProblem::FirstEntry => {
                f.write_str("only entry 0 has an all-zero previous hash, and entry 0 must have it")
            }
            ReceiptProblem::Head(e) => write!(f, "its signed ledger head does not verify: {e}"),
            ReceiptProblem::HeadMismatch => f.write_str("its signed ledger head names another entry"),
        }
    }
}

impl Receipt {
    /// A local receipt for a ledger entry, with the signed ledger head
    /// written when it was appended.
    pub fn local(entry: &LocalEntry, head: Option<String>) -> Self {
        Receipt::Local {
            index: entry.index,
            prev_hash: entry.prev_hash,
            checkpoint_hash: entry.checkpoint_hash,
            anchored_at_ms: entry.anchored_at_ms,
            entry_hash: entry.hash(),
            head,
        }
    }

    /// Checks, offline, that the receipt names this exact checkpoint note,
    /// that its entry hash is the hash of its fields, and, for a local
    /// receipt with a signed ledger head, that the broker key signed a
    /// head at this entry.
    pub fn check(&self, checkpoint_note: &str, broker_key: &NoteVerifier) -> Result<(), ReceiptProblem> {
        match self {
            Receipt::Local { index, prev_hash, checkpoint_hash, anchored_at_ms, entry_hash, head } => {
                if !hash_eq(checkpoint_hash, &sha256(checkpoint_note.as_bytes())) {
                    return Err(ReceiptProblem::CheckpointHash);
                }
                if (*index == 0) != (*prev_hash == [0u8; 32]) {
                    return Err(ReceiptProblem::FirstEntry);
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
                if let Some(note) = head {
                    let head = broker_key.verify_ledger_head(note).map_err(ReceiptProblem::Head)?;
                    if head.size != index.saturating_add(1) || !hash_eq(&head.head, entry_hash) {
                        return Err(ReceiptProblem::HeadMismatch);
                    }
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

    /// Whether every field `describe` prints is covered by a signature the
    /// check verified: a local receipt with its signed head. An EVM
    /// receipt's block and transaction are proven only on chain.
    pub fn is_signed(&self) -> bool {
        matches!(self, Receipt::Local { head: Some(_), .. })
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

/// Hex as this crate writes it: lower-case digits only, so that each byte
/// string has one spelling (EIP-55 mixed-case addresses are refused).
pub(crate) fn lower_hex(digits: &str, out: &mut [u8]) -> Result<(), ()> {
    if !digits.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(());
    }
    hex::decode_to_slice(digits, out).map_err(|_| ())
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
        super::lower_hex(digits, &mut out).map_err(|_| {
            serde::de::Error::custom(format!("expected 0x and {} lower-case hex digits", 2 * N))
        })?;
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
        super::lower_hex(&s, &mut out)
            .map_err(|_| serde::de::Error::custom("expected 64 lower-case hex digits"))?;
        Ok(out)
    }
}
