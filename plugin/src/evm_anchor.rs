//! The EVM anchorer: anchors the newest checkpoint on an EVM chain at most
//! once per interval, and follows every anchoring transaction to finality.
//!
//! One checkpoint covers every earlier one through the log's consistency,
//! so the cost is one transaction per interval whatever the message rate.
//! Bundles for messages whose own checkpoint was not anchored carry the
//! consistency proof to the anchored one (`proofs.rs`).
//!
//! Crash and fault safety comes from the order of operations: a
//! transaction is signed locally, persisted with its hash and raw bytes
//! (`store/evm.rs`), and only then broadcast. Whatever happens next (the
//! send times out after the node took it, the process dies, the node drops
//! it, a reorganization removes it), the anchorer looks the hash up and
//! either finds it or sends the *same* bytes again. A new transaction is
//! signed only when the old one can never be mined: its nonce was used by
//! another transaction, the node refused it, or it reverted. So a
//! checkpoint is never anchored twice by transactions that can both land.
//!
//! It runs on its own thread with its own store connection; an unreachable
//! or misconfigured chain slows only this thread (retries with backoff),
//! never ingest or the local ledger.

use crate::metrics::Metrics;
use crate::source::now_ms;
use crate::store::{EvmAnchorRow, EvmAnchorState, Store, StoreError};
use notary_anchor::evm::{redact, EvmClient, EvmError, EvmSettings, TxState};
use notary_proof::{EvmStatus, Receipt};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::Duration;

/// How and how often to anchor on an EVM chain.
#[derive(Debug, Clone)]
pub struct EvmAnchorConfig {
    pub settings: EvmSettings,
    /// At most one new anchor per interval.
    pub interval_ms: u64,
    /// How often in-flight transactions are followed.
    pub poll_ms: u64,
    /// Longest wait between retries while the chain fails.
    pub max_retry_ms: u64,
}

/// Final anchors are re-checked for reorganizations: the newest at every
/// poll, all of the last day's at every this many polls.
const RECHECK_ALL_EVERY: u64 = 12;
const RECHECK_WINDOW_MS: u64 = 24 * 3600 * 1000;

/// Which checkpoint to anchor now, if any: the newest, when nothing is in
/// flight, it is newer than the last anchor, and the interval since the
/// last anchor has passed. `last` is (created at, size) of the newest
/// anchor that was not abandoned.
pub fn due(
    now_ms: u64,
    latest_size: Option<u64>,
    in_flight: bool,
    last: Option<(u64, u64)>,
    interval_ms: u64,
) -> Option<u64> {
    let latest = latest_size?;
    if in_flight {
        return None;
    }
    match last {
        Some((_, size)) if size >= latest => None,
        Some((at, _)) if now_ms < at.saturating_add(interval_ms) => None,
        _ => Some(latest),
    }
}

#[derive(Debug, thiserror::Error)]
enum StepError {
    #[error(transparent)]
    Evm(#[from] EvmError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub(crate) struct EvmAnchorer {
    pub store: Store,
    pub cfg: EvmAnchorConfig,
    pub metrics: Arc<Metrics>,
}

struct Run {
    client: Option<EvmClient>,
    retry_ms: Option<u64>,
    polls: u64,
}

impl EvmAnchorer {
    /// Runs until `stop` is dropped.
    pub fn run(self, stop: Receiver<()>) {
        let mut run = Run { client: None, retry_ms: None, polls: 0 };
        if let Ok(rows) = self.store.evm_all() {
            let anchored = rows.iter().filter(|r| r.state == EvmAnchorState::Final).map(|r| r.size).max();
            self.metrics.evm_anchored_size.store(anchored.unwrap_or(0), Relaxed);
        }
        loop {
            match self.step(&mut run) {
                Ok(()) => run.retry_ms = None,
                Err(e) => {
                    let e = Redacted(redact(&e.to_string(), &self.cfg.settings.rpc_url), e);
                    let wait =
                        run.retry_ms.map_or(self.cfg.poll_ms.max(1000), |w| w * 2).min(self.cfg.max_retry_ms);
                    run.retry_ms = Some(wait);
                    let Redacted(m, e) = e;
                    match &e {
                        StepError::Evm(EvmError::Config(_)) => {
                            Metrics::inc(&self.metrics.evm_config_errors_total);
                            tracing::error!(error = %m, retry_in_ms = wait, "EVM anchoring needs an operator");
                        }
                        StepError::Evm(EvmError::Rpc(_)) => {
                            Metrics::inc(&self.metrics.evm_rpc_errors_total);
                            run.client = None; // reconnect, and check the chain id again
                            tracing::warn!(error = %m, retry_in_ms = wait, "EVM RPC failed; will retry");
                        }
                        _ => {
                            tracing::warn!(error = %m, retry_in_ms = wait, "EVM anchoring failed; will retry")
                        }
                    }
                }
            }
            let wait = run.retry_ms.unwrap_or(self.cfg.poll_ms);
            match stop.recv_timeout(Duration::from_millis(wait)) {
                Err(RecvTimeoutError::Timeout) => {}
                _ => break,
            }
        }
        tracing::info!("EVM anchorer stopped");
    }

    fn step(&self, run: &mut Run) -> Result<(), StepError> {
        if run.client.is_none() {
            let c = EvmClient::connect(&self.cfg.settings)?;
            tracing::info!(
                chain_id = c.chain_id(),
                account = %format!("0x{}", hex::encode(c.from())),
                confirmations = c.confirmations(),
                "EVM chain connected"
            );
            run.client = Some(c);
        }
        let Some(client) = run.client.as_ref() else { return Ok(()) };
        let chain = client.chain_id();
        for row in self.store.evm_in_flight(chain)? {
            self.follow(client, row)?;
        }
        run.polls += 1;
        let finals = if run.polls % RECHECK_ALL_EVERY == 1 {
            self.store.evm_final_since(chain, now_ms().saturating_sub(RECHECK_WINDOW_MS))?
        } else {
            self.store.evm_newest_final(chain)?.into_iter().collect()
        };
        for row in finals {
            self.follow(client, row)?;
        }
        let in_flight = !self.store.evm_in_flight(chain)?.is_empty();
        let last = self.store.evm_latest_live(chain)?;
        let latest = self.store.latest_checkpoint()?.map(|(size, _)| size);
        if let Some(size) =
            due(now_ms(), latest, in_flight, last.map(|r| (r.created_at_ms, r.size)), self.cfg.interval_ms)
        {
            self.anchor(client, size)?;
        }
        Ok(())
    }

    fn note(&self, size: u64) -> Result<String, StepError> {
        Ok(self
            .store
            .checkpoint(size)?
            .ok_or_else(|| StoreError::Corrupt(format!("no checkpoint of size {size}")))?)
    }

    /// Signs, records, then sends a new anchoring transaction.
    fn anchor(&self, client: &EvmClient, size: u64) -> Result<(), StepError> {
        let note = self.note(size)?;
        let nonce = client.nonce(true)?;
        let signed = client.sign(&note, nonce)?;
        let id =
            self.store.evm_insert(size, client.chain_id(), nonce, &signed.tx_hash, &signed.raw, now_ms())?;
        Metrics::inc(&self.metrics.evm_anchors_signed_total);
        tracing::info!(size, nonce, tx = %format!("0x{}", hex::encode(signed.tx_hash)), "anchoring checkpoint on chain");
        let row = self.store.evm_rows_by_id(id)?;
        self.send(client, &row, false)
    }

    /// Broadcasts a recorded transaction (again). A refusal that means it
    /// can never be mined abandons it, so the next step anchors anew.
    fn send(&self, client: &EvmClient, row: &EvmAnchorRow, reorged: bool) -> Result<(), StepError> {
        match client.broadcast(&row.raw_tx) {
            Ok(()) => {
                self.store.evm_update(row.id, EvmAnchorState::Sent, None, reorged, None, now_ms())?;
                if row.state != EvmAnchorState::Signed {
                    Metrics::inc(&self.metrics.evm_rebroadcasts_total);
                    tracing::warn!(size = row.size, tx = %hex0x(&row.tx_hash), "anchoring transaction was gone from the chain and its pool; sent it again");
                }
                Ok(())
            }
            // Used by this very transaction (mined while the answer to an
            // earlier send was lost) or by another one: the next look-up
            // tells which, and abandons it only in the second case.
            Err(EvmError::NonceUsed(m)) => {
                tracing::warn!(size = row.size, tx = %hex0x(&row.tx_hash), error = %m, "anchoring transaction's nonce is used; checking which transaction used it");
                Ok(())
            }
            Err(e @ (EvmError::Refused(_) | EvmError::Config(_))) => {
                self.abandon(row, &e.to_string())?;
                Err(e.into())
            }
            Err(e) => Err(e.into()),
        }
    }

    fn abandon(&self, row: &EvmAnchorRow, why: &str) -> Result<(), StepError> {
        self.store.evm_update(row.id, EvmAnchorState::Abandoned, None, false, Some(why), now_ms())?;
        Metrics::inc(&self.metrics.evm_abandoned_total);
        tracing::warn!(size = row.size, tx = %hex0x(&row.tx_hash), reason = why, "anchoring transaction abandoned; the newest checkpoint will be anchored anew");
        Ok(())
    }

    /// Looks a recorded transaction up on chain and moves its state on.
    fn follow(&self, client: &EvmClient, row: EvmAnchorRow) -> Result<(), StepError> {
        let note = self.note(row.size)?;
        let was_mined = matches!(row.state, EvmAnchorState::Mined | EvmAnchorState::Final);
        match client.state(&row.tx_hash, &note)? {
            TxState::Mined { receipt, .. } => {
                let state = match &receipt {
                    Receipt::Evm { status: EvmStatus::Final, .. } => EvmAnchorState::Final,
                    _ => EvmAnchorState::Mined,
                };
                if state == row.state && row.receipt.as_ref() == Some(&receipt) {
                    return Ok(());
                }
                let moved =
                    block_of(row.receipt.as_ref()).is_some_and(|b| Some(b) != block_of(Some(&receipt)));
                self.store.evm_update(row.id, state, Some(&receipt), moved, None, now_ms())?;
                if moved {
                    Metrics::inc(&self.metrics.evm_reorgs_total);
                    tracing::warn!(size = row.size, tx = %hex0x(&row.tx_hash), "a reorganization moved the anchoring transaction to another block");
                }
                if state == EvmAnchorState::Final && row.state != EvmAnchorState::Final {
                    Metrics::inc(&self.metrics.evm_anchors_final_total);
                    self.metrics.evm_anchored_size.fetch_max(row.size, Relaxed);
                    tracing::info!(size = row.size, tx = %hex0x(&row.tx_hash), "checkpoint anchored on chain (final)");
                }
                Ok(())
            }
            TxState::Unmined => {
                if row.state != EvmAnchorState::Sent {
                    if was_mined {
                        Metrics::inc(&self.metrics.evm_reorgs_total);
                        tracing::warn!(size = row.size, tx = %hex0x(&row.tx_hash), "a reorganization returned the anchoring transaction to the pool");
                    }
                    self.store.evm_update(row.id, EvmAnchorState::Sent, None, was_mined, None, now_ms())?;
                }
                Ok(())
            }
            TxState::Reverted => self.abandon(&row, "the transaction reverted"),
            TxState::Unknown => {
                if was_mined {
                    Metrics::inc(&self.metrics.evm_reorgs_total);
                    tracing::warn!(size = row.size, tx = %hex0x(&row.tx_hash), "a reorganization removed the anchoring transaction");
                }
                if client.nonce(false)? > row.nonce {
                    let why = if was_mined {
                        "removed by a reorganization; its nonce was then used by another transaction"
                    } else {
                        "its nonce was used by another transaction (replaced or conflicting)"
                    };
                    return self.abandon(&row, why);
                }
                self.send(client, &row, was_mined)
            }
        }
    }
}

struct Redacted(String, StepError);

fn block_of(r: Option<&Receipt>) -> Option<[u8; 32]> {
    match r {
        Some(Receipt::Evm { block_hash, .. }) => Some(*block_hash),
        _ => None,
    }
}

fn hex0x(h: &[u8]) -> String {
    format!("0x{}", hex::encode(h))
}

#[cfg(test)]
mod tests {
    use super::due;

    const H: u64 = 3_600_000;

    #[test]
    fn the_first_checkpoint_is_anchored_at_once() {
        assert_eq!(due(5, Some(1), false, None, H), Some(1));
        assert_eq!(due(5, None, false, None, H), None, "nothing to anchor yet");
    }

    #[test]
    fn at_most_one_anchor_per_interval_whatever_the_rate() {
        // A 10k msg/s stream seals a batch every second: 3600 checkpoints an
        // hour. Stepping through an hour second by second makes one anchor.
        let mut last = Some((0, 1));
        let mut anchors = 0;
        for second in 1..=3 * 3600u64 {
            let now = second * 1000;
            if let Some(size) = due(now, Some(second + 1), false, last, H) {
                anchors += 1;
                last = Some((now, size));
            }
        }
        assert_eq!(anchors, 3, "one anchor per hour over three hours");
    }

    #[test]
    fn nothing_new_or_something_in_flight_waits() {
        assert_eq!(due(10 * H, Some(7), false, Some((0, 7)), H), None, "the newest is anchored already");
        assert_eq!(due(10 * H, Some(8), true, Some((0, 7)), H), None, "one transaction at a time");
        assert_eq!(due(10 * H, Some(8), false, Some((0, 7)), H), Some(8));
        assert_eq!(due(H - 1, Some(8), false, Some((0, 7)), H), None);
    }
}
