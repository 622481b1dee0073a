//! Formats and offline verification for mqtt-notary proofs.
//!
//! This crate does no I/O and reads no clock: times are passed in. A client
//! that only verifies proofs depends on this crate alone. The byte-exact
//! formats are specified in `docs/PROTOCOL.md`; the glossary there (leaf,
//! batch, log, checkpoint, anchor, receipt, proof bundle) names the types here.
#![forbid(unsafe_code)]

pub mod batch;
pub mod bundle;
mod cbor;
pub mod checkpoint;
mod codec;
pub mod device;
pub mod envelope;
pub mod hash;
pub mod leaf;
pub mod receipt;
pub mod request;
pub mod tree;
pub mod verify;

pub use batch::{BatchRecord, BatchTree};
pub use bundle::{KeyEvidence, LaterAnchor, LeafProof, ProofBundle, BUNDLE_FORMAT};
pub use checkpoint::{Checkpoint, NoteError, NoteSigner, NoteVerifier};
pub use device::{DeviceFields, RegistryAction, RegistryEvent};
pub use envelope::{DeviceKey, Envelope, EnvelopeError};
pub use hash::Hash;
pub use leaf::{Assurance, LeafRecord, Publisher};
pub use receipt::{EvmStatus, LocalEntry, Receipt};
pub use verify::{verify_bundle, verify_bundle_json, Tree, Verified, VerifiedDevice, VerifyError};

/// A byte string that is not in the canonical encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FormatError(pub &'static str);
