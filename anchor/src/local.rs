//! The local ledger: an append-only SHA-256 hash chain of anchored
//! checkpoints in its own SQLite file.
//!
//! Trust model: it orders checkpoints and makes rewriting history on this
//! host evident to anyone who kept an earlier receipt or entry hash. It does
//! not stop the host's operator from rewriting the whole file; third-party
//! immutability is the job of a public ledger (EVM).
//!
//! Each append is signed: the broker signs the new ledger head (size and
//! newest entry hash) with its checkpoint key, and the receipt carries that
//! note, so a receipt's index and time are the broker's signed word, not
//! fields anyone holding a bundle could rewrite. An entry appended before
//! heads were signed gets its head only if its checkpoint is anchored
//! again.
//!
//! Appends are compare-and-swap on the chain head: the new row is inserted
//! only if the head is still the one its `prev_hash` names, inside a
//! `BEGIN IMMEDIATE` transaction, so two writers can never fork the chain.

use crate::{Anchor, AnchorError};
use notary_proof::hash::{hash_eq, sha256, Hash};
use notary_proof::receipt::LedgerHead;
use notary_proof::{Checkpoint, LocalEntry, NoteSigner, NoteVerifier, Receipt};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use std::path::Path;
use std::sync::Mutex;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS ledger_entries (
    idx             INTEGER PRIMARY KEY,
    prev_hash       BLOB NOT NULL,
    checkpoint_hash BLOB NOT NULL UNIQUE,
    anchored_at_ms  INTEGER NOT NULL,
    entry_hash      BLOB NOT NULL,
    checkpoint      TEXT NOT NULL,
    head            TEXT
);";

/// Ledgers written before heads were signed lack the column.
const ADD_HEAD: &str = "ALTER TABLE ledger_entries ADD COLUMN head TEXT";

/// How many times `anchor` retries when another writer moved the head.
const CAS_ATTEMPTS: usize = 8;

pub struct LocalLedger {
    conn: Mutex<Connection>,
    /// Signs ledger heads; a ledger opened only to be read has none.
    signer: Option<NoteSigner>,
}

fn fatal(e: impl std::fmt::Display) -> AnchorError {
    AnchorError::Fatal(e.to_string())
}

fn sql_err(e: rusqlite::Error) -> AnchorError {
    match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
            AnchorError::Transient(e.to_string())
        }
        _ => AnchorError::Fatal(e.to_string()),
    }
}

fn blob32(v: Vec<u8>) -> Result<Hash, AnchorError> {
    v.try_into().map_err(|_| fatal("ledger holds a hash that is not 32 bytes"))
}

impl LocalLedger {
    /// Opens (creating if needed) the ledger file.
    pub fn open(path: &Path) -> Result<Self, AnchorError> {
        let conn = Connection::open(path).map_err(fatal)?;
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(fatal)?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(fatal)?;
        conn.pragma_update(None, "synchronous", "FULL").map_err(fatal)?;
        conn.execute_batch(SCHEMA).map_err(fatal)?;
        let has_head: bool = conn
            .query_row(
                "SELECT COUNT(*) FROM pragma_table_info('ledger_entries') WHERE name = 'head'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map_err(fatal)?
            > 0;
        if !has_head {
            conn.execute_batch(ADD_HEAD).map_err(fatal)?;
        }
        Ok(LocalLedger { conn: Mutex::new(conn), signer: None })
    }

    /// Signs the head of every entry this ledger appends (and of older
    /// entries whose receipt it gives again) with the checkpoint key.
    pub fn signing(mut self, signer: NoteSigner) -> Self {
        self.signer = Some(signer);
        self
    }

    /// The signed head at `entry`, if this ledger signs.
    fn sign_head(&self, entry: &LocalEntry) -> Option<String> {
        let signer = self.signer.as_ref()?;
        let head = LedgerHead { origin: signer.name().to_owned(), size: entry.index + 1, head: entry.hash() };
        Some(signer.sign(&head.body()))
    }

    fn receipt_for(&self, conn: &Connection, checkpoint_hash: &Hash) -> Result<Option<Receipt>, AnchorError> {
        conn.query_row(
            "SELECT idx, prev_hash, anchored_at_ms, head FROM ledger_entries WHERE checkpoint_hash = ?1",
            params![&checkpoint_hash[..]],
            |r| {
                Ok((
                    r.get::<_, u64>(0)?,
                    r.get::<_, Vec<u8>>(1)?,
                    r.get::<_, u64>(2)?,
                    r.get::<_, Option<String>>(3)?,
                ))
            },
        )
        .optional()
        .map_err(sql_err)?
        .map(|(index, prev, anchored_at_ms, head)| {
            let entry = LocalEntry {
                index,
                prev_hash: blob32(prev)?,
                checkpoint_hash: *checkpoint_hash,
                anchored_at_ms,
            };
            let head = head.or_else(|| self.sign_head(&entry));
            Ok(Receipt::local(&entry, head))
        })
        .transpose()
    }

    fn try_append(
        &self,
        conn: &mut Connection,
        note: &str,
        now_ms: u64,
    ) -> Result<Option<Receipt>, AnchorError> {
        let checkpoint_hash = sha256(note.as_bytes());
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(sql_err)?;
        if let Some(existing) = self.receipt_for(&tx, &checkpoint_hash)? {
            return Ok(Some(existing));
        }
        let head: Option<(u64, Vec<u8>)> = tx
            .query_row("SELECT idx, entry_hash FROM ledger_entries ORDER BY idx DESC LIMIT 1", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()
            .map_err(sql_err)?;
        let (index, prev_hash) = match head {
            Some((idx, hash)) => (idx + 1, blob32(hash)?),
            None => (0, [0u8; 32]),
        };
        let entry = LocalEntry { index, prev_hash, checkpoint_hash, anchored_at_ms: now_ms };
        let head = self.sign_head(&entry);
        let inserted = tx
            .execute(
                "INSERT INTO ledger_entries
                   (idx, prev_hash, checkpoint_hash, anchored_at_ms, entry_hash, checkpoint, head)
                 SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7
                 WHERE COALESCE((SELECT MAX(idx) FROM ledger_entries), -1) = ?1 - 1",
                params![index, &prev_hash[..], &checkpoint_hash[..], now_ms, &entry.hash()[..], note, head],
            )
            .map_err(sql_err)?;
        if inserted != 1 {
            return Ok(None); // the head moved: retry from the new head
        }
        tx.commit().map_err(sql_err)?;
        Ok(Some(Receipt::local(&entry, head)))
    }

    /// Walks the whole chain: every entry hash, every link, every checkpoint
    /// signature, and that checkpoint sizes never shrink. `each` is called
    /// with every verified checkpoint, for checks against other sources.
    pub fn verify(
        &self,
        broker_key: &NoteVerifier,
        mut each: impl FnMut(&Checkpoint) -> Result<(), String>,
    ) -> Result<LedgerCheck, String> {
        let conn = self.conn.lock().map_err(|_| "ledger lock poisoned".to_string())?;
        let mut stmt = conn
            .prepare(
                "SELECT idx, prev_hash, checkpoint_hash, anchored_at_ms, entry_hash, checkpoint, head
                 FROM ledger_entries ORDER BY idx",
            )
            .map_err(|e| e.to_string())?;
        let mut rows = stmt.query([]).map_err(|e| e.to_string())?;
        let mut check = LedgerCheck::default();
        let mut prev = [0u8; 32];
        while let Some(row) = rows.next().map_err(|e| e.to_string())? {
            let get = |i| -> Result<Hash, String> {
                let v: Vec<u8> = row.get(i).map_err(|e| e.to_string())?;
                v.try_into().map_err(|_| "hash is not 32 bytes".to_string())
            };
            let index: u64 = row.get(0).map_err(|e| e.to_string())?;
            let entry = LocalEntry {
                index,
                prev_hash: get(1)?,
                checkpoint_hash: get(2)?,
                anchored_at_ms: row.get(3).map_err(|e| e.to_string())?,
            };
            let stored_hash = get(4)?;
            let note: String = row.get(5).map_err(|e| e.to_string())?;
            let broken = |why: &str| format!("entry {index}: {why}");
            if index != check.entries {
                return Err(broken(&format!("expected index {}", check.entries)));
            }
            if !hash_eq(&entry.prev_hash, &prev) {
                return Err(broken("previous-entry hash does not match the chain"));
            }
            if !hash_eq(&entry.hash(), &stored_hash) {
                return Err(broken("entry hash does not match its fields"));
            }
            if !hash_eq(&sha256(note.as_bytes()), &entry.checkpoint_hash) {
                return Err(broken("stored checkpoint does not match its hash"));
            }
            let head: Option<String> = row.get(6).map_err(|e| e.to_string())?;
            if let Some(head) = head {
                let head =
                    broker_key.verify_ledger_head(&head).map_err(|e| broken(&format!("signed head: {e}")))?;
                if head.size != index + 1 || !hash_eq(&head.head, &stored_hash) {
                    return Err(broken("signed head names another entry"));
                }
                check.signed_heads += 1;
            }
            let cp = broker_key.verify_checkpoint(&note).map_err(|e| broken(&format!("checkpoint: {e}")))?;
            if cp.size < check.last_size {
                return Err(broken("checkpoint size shrinks"));
            }
            each(&cp).map_err(|e| broken(&e))?;
            check.last_size = cp.size;
            check.last_checkpoint = Some(note);
            check.head = Some(stored_hash);
            check.entries += 1;
            prev = stored_hash;
        }
        Ok(check)
    }
}

/// What `verify` established about a whole chain.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LedgerCheck {
    pub entries: u64,
    /// Entries whose signed head was checked (those appended since heads
    /// were signed).
    pub signed_heads: u64,
    pub last_size: u64,
    pub head: Option<Hash>,
    pub last_checkpoint: Option<String>,
}

impl Anchor for LocalLedger {
    fn name(&self) -> &str {
        "local"
    }

    fn anchor(&self, checkpoint_note: &str, now_ms: u64) -> Result<Receipt, AnchorError> {
        let mut conn = self.conn.lock().map_err(|_| fatal("ledger lock poisoned"))?;
        for _ in 0..CAS_ATTEMPTS {
            if let Some(receipt) = self.try_append(&mut conn, checkpoint_note, now_ms)? {
                return Ok(receipt);
            }
        }
        Err(AnchorError::Transient("the ledger head kept moving; try again".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use notary_proof::NoteSigner;

    fn note(signer: &NoteSigner, size: u64) -> String {
        signer.sign(&Checkpoint { origin: signer.name().into(), size, root: [size as u8; 32] }.body())
    }

    #[test]
    fn appends_chains_and_is_idempotent() {
        let dir = tempfile::tempdir().expect("temp dir");
        let signer = NoteSigner::new("test/log", [1; 32]).expect("signer");
        let ledger = LocalLedger::open(&dir.path().join("ledger.sqlite")).expect("opens");
        let r1 = ledger.anchor(&note(&signer, 1), 10).expect("anchors");
        let r2 = ledger.anchor(&note(&signer, 2), 11).expect("anchors");
        let again = ledger.anchor(&note(&signer, 1), 99).expect("idempotent");
        assert_eq!(r1, again);
        let (Receipt::Local { entry_hash: h1, .. }, Receipt::Local { prev_hash: p2, index, .. }) = (&r1, &r2)
        else {
            panic!("local receipts")
        };
        assert_eq!(h1, p2);
        assert_eq!(*index, 1);
        r2.check(&note(&signer, 2), &signer.verifier()).expect("receipt binds its checkpoint");
        let check = ledger.verify(&signer.verifier(), |_| Ok(())).expect("valid chain");
        assert_eq!((check.entries, check.last_size), (2, 2));
    }

    #[test]
    fn two_writers_never_fork_the_chain() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("ledger.sqlite");
        let signer = NoteSigner::new("test/log", [1; 32]).expect("signer");
        let a = LocalLedger::open(&path).expect("opens");
        let b = LocalLedger::open(&path).expect("opens");
        std::thread::scope(|s| {
            s.spawn(|| {
                (0..50).for_each(|i| {
                    a.anchor(&note(&signer, 2 * i), 0).expect("a");
                })
            });
            s.spawn(|| {
                (0..50).for_each(|i| {
                    b.anchor(&note(&signer, 2 * i + 1), 0).expect("b");
                })
            });
        });
        // Sizes interleave between writers, so only the chain itself is checked here.
        let conn = Connection::open(&path).expect("opens");
        let n: u64 = conn.query_row("SELECT COUNT(*) FROM ledger_entries", [], |r| r.get(0)).expect("count");
        assert_eq!(n, 100);
        let mut stmt =
            conn.prepare("SELECT prev_hash, entry_hash FROM ledger_entries ORDER BY idx").expect("prepare");
        let rows: Vec<(Vec<u8>, Vec<u8>)> = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .expect("query")
            .map(|r| r.expect("row"))
            .collect();
        for w in rows.windows(2) {
            assert_eq!(w[1].0, w[0].1, "each entry links to the one before");
        }
    }

    #[test]
    fn verify_detects_a_rewritten_entry() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("ledger.sqlite");
        let signer = NoteSigner::new("test/log", [1; 32]).expect("signer");
        let ledger = LocalLedger::open(&path).expect("opens");
        for i in 1..=3 {
            ledger.anchor(&note(&signer, i), i).expect("anchors");
        }
        let conn = Connection::open(&path).expect("opens");
        conn.execute("UPDATE ledger_entries SET anchored_at_ms = 77 WHERE idx = 1", []).expect("tamper");
        let err = ledger.verify(&signer.verifier(), |_| Ok(())).expect_err("tampered");
        assert!(err.contains("entry 1"), "{err}");
    }

    #[test]
    fn receipts_carry_a_signed_head_that_fixes_every_field() {
        let dir = tempfile::tempdir().expect("temp dir");
        let signer = NoteSigner::new("test/log", [1; 32]).expect("signer");
        let ledger =
            LocalLedger::open(&dir.path().join("ledger.sqlite")).expect("opens").signing(signer.clone());
        let cp = note(&signer, 1);
        ledger.anchor(&note(&signer, 0), 5).expect("anchors");
        let receipt = ledger.anchor(&cp, 10).expect("anchors");
        assert!(receipt.is_signed());
        receipt.check(&cp, &signer.verifier()).expect("valid");
        // Re-dated and re-indexed by whoever holds it, entry hash recomputed:
        // the signed head no longer matches.
        let Receipt::Local { index, prev_hash, checkpoint_hash, head, .. } = receipt.clone() else {
            panic!("a local receipt")
        };
        let forged =
            LocalEntry { index: 999_999, prev_hash, checkpoint_hash, anchored_at_ms: 4_102_444_800_000 };
        let forged = Receipt::local(&forged, head.clone());
        assert_eq!(
            forged.check(&cp, &signer.verifier()),
            Err(notary_proof::receipt::ReceiptProblem::HeadMismatch)
        );
        // The same head under another key is not the broker's.
        let other = NoteSigner::new("test/log", [2; 32]).expect("signer");
        let entry = LocalEntry { index, prev_hash, checkpoint_hash, anchored_at_ms: 10 };
        let foreign = LedgerHead { origin: "test/log".into(), size: index + 1, head: entry.hash() };
        let foreign = Receipt::local(&entry, Some(other.sign(&foreign.body())));
        assert!(matches!(
            foreign.check(&cp, &signer.verifier()),
            Err(notary_proof::receipt::ReceiptProblem::Head(notary_proof::NoteError::UnknownKey))
        ));
        let check = ledger.verify(&signer.verifier(), |_| Ok(())).expect("valid");
        assert_eq!((check.entries, check.signed_heads), (2, 2));
    }

    #[test]
    fn a_ledger_from_before_signed_heads_gets_them() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("ledger.sqlite");
        let signer = NoteSigner::new("test/log", [1; 32]).expect("signer");
        let cp = note(&signer, 1);
        let entry = LocalEntry {
            index: 0,
            prev_hash: [0; 32],
            checkpoint_hash: sha256(cp.as_bytes()),
            anchored_at_ms: 3,
        };
        let conn = Connection::open(&path).expect("opens");
        conn.execute_batch(
            "CREATE TABLE ledger_entries (idx INTEGER PRIMARY KEY, prev_hash BLOB NOT NULL,
               checkpoint_hash BLOB NOT NULL UNIQUE, anchored_at_ms INTEGER NOT NULL,
               entry_hash BLOB NOT NULL, checkpoint TEXT NOT NULL)",
        )
        .expect("the earlier schema");
        conn.execute(
            "INSERT INTO ledger_entries VALUES (0, ?1, ?2, 3, ?3, ?4)",
            params![&entry.prev_hash[..], &entry.checkpoint_hash[..], &entry.hash()[..], cp],
        )
        .expect("an earlier entry");
        drop(conn);
        let ledger = LocalLedger::open(&path).expect("opens and adds the column").signing(signer.clone());
        assert_eq!(ledger.verify(&signer.verifier(), |_| Ok(())).expect("valid").signed_heads, 0);
        let again = ledger.anchor(&cp, 50).expect("the existing entry");
        assert_eq!(
            again,
            Receipt::local(
                &entry,
                again.is_signed().then(|| signer
                    .sign(&LedgerHead { origin: "test/log".into(), size: 1, head: entry.hash() }.body()))
            )
        );
        assert!(again.is_signed());
        again.check(&cp, &signer.verifier()).expect("valid");
        let next = ledger.anchor(&note(&signer, 2), 60).expect("appends");
        assert!(next.is_signed());
        assert_eq!(ledger.verify(&signer.verifier(), |_| Ok(())).expect("valid").signed_heads, 1);
    }
}
