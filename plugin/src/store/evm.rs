//! EVM anchoring transactions: one row per signed transaction, written
//! *before* it is broadcast, so a crash or a timed-out send never loses
//! track of a transaction that may be mined.
//!
//! States: `signed` (persisted; sent at most partly) → `sent` (the node took
//! it) → `mined` (in a canonical block, fewer confirmations than required)
//! → `final`. A row whose transaction can never be mined (its nonce was
//! used by another transaction, the node refused it, it reverted) becomes
//! `abandoned` with the reason in `outcome`; the anchor is made again with
//! a new transaction. A reorganization that removes a mined or final
//! transaction moves it back to `sent` (it is broadcast again) and counts
//! in `reorgs`.

use super::{hash32, int, Store, StoreError, U64};
use notary_proof::{Hash, Receipt};
use rusqlite::{params, OptionalExtension, Row};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvmAnchorState {
    Signed,
    Sent,
    Mined,
    Final,
    Abandoned,
}

impl EvmAnchorState {
    pub fn as_str(self) -> &'static str {
        match self {
            EvmAnchorState::Signed => "signed",
            EvmAnchorState::Sent => "sent",
            EvmAnchorState::Mined => "mined",
            EvmAnchorState::Final => "final",
            EvmAnchorState::Abandoned => "abandoned",
        }
    }

    fn parse(s: &str) -> Result<Self, StoreError> {
        Ok(match s {
            "signed" => EvmAnchorState::Signed,
            "sent" => EvmAnchorState::Sent,
            "mined" => EvmAnchorState::Mined,
            "final" => EvmAnchorState::Final,
            "abandoned" => EvmAnchorState::Abandoned,
            other => return Err(StoreError::Corrupt(format!("unknown EVM anchor state {other:?}"))),
        })
    }
}

/// One anchoring transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EvmAnchorRow {
    pub id: i64,
    /// The size of the checkpoint it anchors.
    pub size: u64,
    pub chain_id: u64,
    pub nonce: u64,
    pub tx_hash: Hash,
    pub raw_tx: Vec<u8>,
    pub state: EvmAnchorState,
    /// Set while mined or final.
    pub receipt: Option<Receipt>,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    /// Times a reorganization removed its block.
    pub reorgs: u64,
    /// Why it was abandoned.
    pub outcome: Option<String>,
}

const COLUMNS: &str =
    "id, size, chain_id, nonce, tx_hash, raw_tx, state, receipt, created_at_ms, updated_at_ms, reorgs, outcome";

fn row(r: &Row<'_>) -> rusqlite::Result<(EvmAnchorRow, String, Option<String>, Vec<u8>)> {
    Ok((
        EvmAnchorRow {
            id: r.get(0)?,
            size: r.get::<_, U64>(1)?.0,
            chain_id: r.get::<_, U64>(2)?.0,
            nonce: r.get::<_, U64>(3)?.0,
            tx_hash: [0; 32],
            raw_tx: r.get(5)?,
            state: EvmAnchorState::Abandoned,
            receipt: None,
            created_at_ms: r.get::<_, U64>(8)?.0,
            updated_at_ms: r.get::<_, U64>(9)?.0,
            reorgs: r.get::<_, U64>(10)?.0,
            outcome: r.get(11)?,
        },
        r.get(6)?,
        r.get(7)?,
        r.get(4)?,
    ))
}

fn finish(
    (mut a, state, receipt, hash): (EvmAnchorRow, String, Option<String>, Vec<u8>),
) -> Result<EvmAnchorRow, StoreError> {
    a.state = EvmAnchorState::parse(&state)?;
    a.tx_hash = hash32(hash)?;
    a.receipt = receipt
        .map(|j| serde_json::from_str(&j).map_err(|e| StoreError::Corrupt(format!("EVM receipt: {e}"))))
        .transpose()?;
    Ok(a)
}

impl Store {
    fn evm_rows(&self, where_: &str, args: impl rusqlite::Params) -> Result<Vec<EvmAnchorRow>, StoreError> {
        let mut stmt =
            self.conn.prepare_cached(&format!("SELECT {COLUMNS} FROM evm_anchors WHERE {where_}"))?;
        let rows = stmt.query_map(args, row)?;
        rows.map(|r| finish(r?)).collect()
    }

    /// Records a signed anchoring transaction before it is broadcast.
    pub fn evm_insert(
        &self,
        size: u64,
        chain_id: u64,
        nonce: u64,
        tx_hash: &Hash,
        raw_tx: &[u8],
        now_ms: u64,
    ) -> Result<i64, StoreError> {
        // Signing the same checkpoint at the same nonce and fees gives the
        // same transaction: an abandoned row for it is taken up again.
        self.write(|tx| {
        Ok(tx.query_row(
            "INSERT INTO evm_anchors (size, chain_id, nonce, tx_hash, raw_tx, state, created_at_ms, updated_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, 'signed', ?6, ?6)
             ON CONFLICT(tx_hash) DO UPDATE SET state = 'signed', receipt = NULL, outcome = NULL,
                 created_at_ms = ?6, updated_at_ms = ?6
             RETURNING id",
            params![U64(size), U64(chain_id), U64(nonce), &tx_hash[..], raw_tx, U64(now_ms)],
            |r| r.get(0),
        )?)
        })
    }

    /// Moves a transaction to a new state, with its receipt while mined or
    /// final, counting a reorganization or recording why it was abandoned.
    pub fn evm_update(
        &self,
        id: i64,
        state: EvmAnchorState,
        receipt: Option<&Receipt>,
        reorged: bool,
        outcome: Option<&str>,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let receipt =
            receipt.map(serde_json::to_string).transpose().map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.write(|tx| {
            tx.execute(
                "UPDATE evm_anchors SET state = ?2, receipt = ?3, reorgs = reorgs + ?4,
                 outcome = COALESCE(?5, outcome), updated_at_ms = ?6 WHERE id = ?1",
                params![id, state.as_str(), receipt, i64::from(reorged), outcome, U64(now_ms)],
            )?;
            Ok(())
        })
    }

    /// Transactions of `chain_id` still on their way: signed, sent or mined.
    pub fn evm_in_flight(&self, chain_id: u64) -> Result<Vec<EvmAnchorRow>, StoreError> {
        self.evm_rows("chain_id = ?1 AND state IN ('signed', 'sent', 'mined') ORDER BY id", [U64(chain_id)])
    }

    /// Final transactions of `chain_id` created since `since_ms`, newest first.
    pub fn evm_final_since(&self, chain_id: u64, since_ms: u64) -> Result<Vec<EvmAnchorRow>, StoreError> {
        self.evm_rows(
            "chain_id = ?1 AND state = 'final' AND created_at_ms >= ?2 ORDER BY id DESC",
            params![U64(chain_id), int::bound(since_ms)],
        )
    }

    pub fn evm_rows_by_id(&self, id: i64) -> Result<EvmAnchorRow, StoreError> {
        self.evm_rows("id = ?1", [id])?
            .pop()
            .ok_or_else(|| StoreError::Corrupt(format!("EVM anchor {id} vanished")))
    }

    /// The newest final transaction of `chain_id`.
    pub fn evm_newest_final(&self, chain_id: u64) -> Result<Option<EvmAnchorRow>, StoreError> {
        Ok(self
            .evm_rows("chain_id = ?1 AND state = 'final' ORDER BY id DESC LIMIT 1", [U64(chain_id)])?
            .pop())
    }

    /// Every transaction, oldest first (for operators and tests).
    pub fn evm_all(&self) -> Result<Vec<EvmAnchorRow>, StoreError> {
        self.evm_rows("1 ORDER BY id", [])
    }

    /// The newest transaction of `chain_id` that was not abandoned: when the
    /// last anchor was made and the largest checkpoint anchored or on its way.
    pub fn evm_latest_live(&self, chain_id: u64) -> Result<Option<EvmAnchorRow>, StoreError> {
        Ok(self
            .evm_rows("chain_id = ?1 AND state != 'abandoned' ORDER BY id DESC LIMIT 1", [U64(chain_id)])?
            .pop())
    }

    /// The anchor that covers checkpoint `size`: the smallest final one at
    /// or after it, else the smallest mined one. (anchored size, receipt).
    pub fn evm_covering(&self, size: u64) -> Result<Option<(u64, Receipt)>, StoreError> {
        for state in ["final", "mined"] {
            let found: Option<(u64, String)> = self
                .conn
                .prepare_cached(
                    "SELECT size, receipt FROM evm_anchors
                     WHERE state = ?1 AND size >= ?2 AND receipt IS NOT NULL ORDER BY size, id LIMIT 1",
                )?
                .query_row(params![state, int::bound(size)], |r| Ok((r.get::<_, U64>(0)?.0, r.get(1)?)))
                .optional()?;
            if let Some((at, json)) = found {
                let receipt = serde_json::from_str(&json)
                    .map_err(|e| StoreError::Corrupt(format!("EVM receipt: {e}")))?;
                return Ok(Some((at, receipt)));
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use notary_proof::EvmStatus;

    fn receipt(status: EvmStatus, block: u8) -> Receipt {
        Receipt::Evm {
            status,
            chain_id: 1,
            tx_hash: [block; 32],
            block_number: u64::from(block),
            block_hash: [block; 32],
            from: [1; 20],
            to: [1; 20],
            checkpoint_hash: [0; 32],
        }
    }

    #[test]
    fn bundles_get_the_smallest_final_anchor_else_the_smallest_mined_one() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = Store::open(dir.path()).expect("store");
        let a = store.evm_insert(3, 1, 0, &[3; 32], b"a", 10).expect("insert");
        let b = store.evm_insert(7, 1, 1, &[7; 32], b"b", 20).expect("insert");
        let c = store.evm_insert(9, 1, 2, &[9; 32], b"c", 30).expect("insert");
        assert_eq!(store.evm_covering(1).expect("query"), None, "nothing mined yet");
        store
            .evm_update(b, EvmAnchorState::Mined, Some(&receipt(EvmStatus::Pending, 7)), false, None, 40)
            .expect("up");
        store
            .evm_update(c, EvmAnchorState::Final, Some(&receipt(EvmStatus::Final, 9)), false, None, 40)
            .expect("up");
        assert_eq!(store.evm_covering(1).expect("q").map(|(s, _)| s), Some(9), "final beats pending");
        store.evm_update(c, EvmAnchorState::Abandoned, None, true, Some("reorged"), 50).expect("up");
        assert_eq!(store.evm_covering(1).expect("q").map(|(s, _)| s), Some(7), "abandoned rows never serve");
        assert_eq!(store.evm_covering(8).expect("q"), None);
        assert_eq!(store.evm_latest_live(1).expect("q").map(|r| r.id), Some(b));
        assert_eq!(store.evm_in_flight(1).expect("q").iter().map(|r| r.id).collect::<Vec<_>>(), vec![a, b]);

        // Signing the abandoned anchor again gives the same transaction: the
        // row is taken up again, not duplicated.
        let again = store.evm_insert(9, 1, 2, &[9; 32], b"c", 60).expect("revive");
        assert_eq!(again, c);
        let row = store.evm_rows_by_id(c).expect("row");
        assert_eq!(
            (row.state, row.created_at_ms, row.reorgs, row.outcome),
            (EvmAnchorState::Signed, 60, 1, None)
        );
        assert_eq!(store.evm_all().expect("all").len(), 3);
    }
}
