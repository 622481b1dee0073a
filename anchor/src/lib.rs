//! Ledgers that anchor signed checkpoints.
//!
//! Every ledger implements [`Anchor`]. One small file per backend; backends
//! share no code beyond the trait and the receipt format in `notary-proof`.
#![forbid(unsafe_code)]

pub mod evm;
pub mod local;

pub use local::{LedgerCheck, LocalLedger};
use notary_proof::Receipt;

/// Why an anchor did not happen.
#[derive(Debug, thiserror::Error)]
pub enum AnchorError {
    /// Worth retrying later (ledger unreachable, busy). Nothing was recorded,
    /// or what was recorded will be found again by the idempotent retry.
    #[error("transient ledger failure: {0}")]
    Transient(String),
    /// Retrying will not help without an operator (corrupt ledger, bad config).
    #[error("ledger failure: {0}")]
    Fatal(String),
}

/// A ledger that records signed checkpoints.
///
/// Contract, for every implementation:
/// - **Durable once it returns.** `Ok(receipt)` means the entry is in the
///   ledger and survives a crash of this process or host (for the local
///   ledger: committed with `synchronous=FULL`).
/// - **Idempotent.** Anchoring a checkpoint note that the ledger already
///   holds returns the receipt of the existing entry and adds nothing.
/// - **Retries transient failures itself** within one call, as far as that
///   is cheap; an `Err` means "not anchored now", and the caller keeps the
///   checkpoint and calls again later. Nothing is ever anchored twice.
/// - **May block.** Call it from a blocking context, not an async executor.
pub trait Anchor: Send + Sync {
    /// A short name for logs and metrics, e.g. `local`.
    fn name(&self) -> &str;

    /// Anchors the signed checkpoint note; `now_ms` is the caller's clock.
    fn anchor(&self, checkpoint_note: &str, now_ms: u64) -> Result<Receipt, AnchorError>;
}
