//! The broker's SQLite store (`notary.sqlite`): leaves, batches, the log's
//! perfect-subtree nodes, checkpoints, anchor receipts, the device registry,
//! rejected messages and EVM anchoring transactions (`store/evm.rs`).
//!
//! One writer connection per writing task (ingest, sealer) and separate
//! read connections for proofs; WAL lets readers run beside writers.
//! Leaves are committed with `synchronous=FULL`: once `append_leaves`
//! returns, they survive a crash of the process or the host.

use notary_proof::tree::{self, NodeSource};
use notary_proof::{BatchRecord, Hash, Receipt, RegistryAction, RegistryEvent};
use rusqlite::{params, Connection, OptionalExtension};

mod int;
pub use int::U64;
use std::path::Path;

mod evm;
pub use evm::{EvmAnchorRow, EvmAnchorState};

pub const STORE_FILE: &str = "notary.sqlite";
/// Batch-tree nodes are stored from this level up (subtrees of 64 leaves);
/// lower ones are recomputed from at most 64 leaves when a path is served.
/// That costs about one hash per 32 leaves on disk.
pub const BATCH_NODE_MIN_LEVEL: u32 = 6;

/// The version of [`SCHEMA`], kept in the file as `PRAGMA user_version`.
pub const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS leaves (
    seq    INTEGER PRIMARY KEY,
    digest BLOB NOT NULL,
    record BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS leaves_by_digest ON leaves(digest);
CREATE TABLE IF NOT EXISTS batches (
    number    INTEGER PRIMARY KEY,
    first_seq INTEGER NOT NULL UNIQUE,
    size      INTEGER NOT NULL,
    record    BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS batch_nodes (
    batch INTEGER NOT NULL,
    level INTEGER NOT NULL,
    idx   INTEGER NOT NULL,
    hash  BLOB NOT NULL,
    PRIMARY KEY (batch, level, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS log_nodes (
    level INTEGER NOT NULL,
    idx   INTEGER NOT NULL,
    hash  BLOB NOT NULL,
    PRIMARY KEY (level, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS checkpoints (
    size INTEGER PRIMARY KEY,
    note TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS receipts (
    size    INTEGER NOT NULL,
    ledger  TEXT NOT NULL,
    receipt TEXT NOT NULL,
    PRIMARY KEY (size, ledger)
);
CREATE TABLE IF NOT EXISTS gaps (
    id       INTEGER PRIMARY KEY,
    at_ms    INTEGER NOT NULL,
    missed   INTEGER NOT NULL,
    after_seq INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS devices (
    id           TEXT PRIMARY KEY,
    public_key   BLOB,
    key_seq      INTEGER,
    head_seq     INTEGER NOT NULL,
    last_counter INTEGER
);
CREATE TABLE IF NOT EXISTS registry_events (
    seq      INTEGER PRIMARY KEY,
    device   TEXT NOT NULL,
    action   TEXT NOT NULL,
    prev_seq INTEGER
);
CREATE INDEX IF NOT EXISTS registry_events_by_prev ON registry_events(device, prev_seq);
CREATE TABLE IF NOT EXISTS device_commands (
    id              INTEGER PRIMARY KEY,
    action          TEXT NOT NULL,
    device          TEXT NOT NULL,
    public_key      BLOB,
    source          TEXT NOT NULL,
    requested_at_ms INTEGER NOT NULL,
    applied_seq     INTEGER,
    error           TEXT
);
CREATE TABLE IF NOT EXISTS rejections (
    id          INTEGER PRIMARY KEY,
    at_ms       INTEGER NOT NULL,
    topic       TEXT NOT NULL,
    digest      BLOB NOT NULL,
    payload_len INTEGER NOT NULL,
    reason      TEXT NOT NULL,
    detail      TEXT NOT NULL,
    device      TEXT
);
CREATE INDEX IF NOT EXISTS rejections_by_digest ON rejections(digest);
CREATE TABLE IF NOT EXISTS source_outages (
    id        INTEGER PRIMARY KEY,
    from_ms   INTEGER NOT NULL,
    to_ms     INTEGER NOT NULL,
    after_seq INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS evm_anchors (
    id            INTEGER PRIMARY KEY,
    size          INTEGER NOT NULL,
    chain_id      INTEGER NOT NULL,
    nonce         INTEGER NOT NULL,
    tx_hash       BLOB NOT NULL UNIQUE,
    raw_tx        BLOB NOT NULL,
    state         TEXT NOT NULL,
    receipt       TEXT,
    created_at_ms INTEGER NOT NULL,
    updated_at_ms INTEGER NOT NULL,
    reorgs        INTEGER NOT NULL DEFAULT 0,
    outcome       TEXT
);
CREATE INDEX IF NOT EXISTS evm_anchors_by_size ON evm_anchors(size);";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("store is corrupt: {0}")]
    Corrupt(String),
}

/// What a failed write means for what was being written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// May heal by itself (busy, locked, disk full, I/O): retry with backoff.
    Transient,
    /// This data can never be stored (a value the store cannot hold, a
    /// constraint): retrying the same write fails the same way.
    Permanent,
    /// The file is damaged: nothing can be written until an operator acts.
    Damaged,
}

impl StoreError {
    pub fn fault(&self) -> Fault {
        use rusqlite::ErrorCode as C;
        match self {
            StoreError::Corrupt(_) => Fault::Damaged,
            StoreError::Sql(rusqlite::Error::SqliteFailure(e, _)) => match e.code {
                C::ConstraintViolation | C::TooBig | C::TypeMismatch => Fault::Permanent,
                C::DatabaseCorrupt | C::NotADatabase => Fault::Damaged,
                _ => Fault::Transient,
            },
            StoreError::Sql(
                rusqlite::Error::ToSqlConversionFailure(_)
                | rusqlite::Error::IntegralValueOutOfRange(..)
                | rusqlite::Error::InvalidColumnType(..)
                | rusqlite::Error::FromSqlConversionFailure(..),
            ) => Fault::Permanent,
            StoreError::Sql(_) => Fault::Transient,
        }
    }
}

pub struct Store {
    conn: Connection,
    /// Shared by the pipeline's connections: SQLite has one writer at a
    /// time, and a connection that finds the database locked retries after
    /// sleeps of up to 100 ms, so a steady writer (ingest) would starve
    /// the others (the sealer). Taking this lock first queues them fairly.
    writer: Option<WriteLock>,
}

/// The in-process lock around the pipeline's write transactions.
pub type WriteLock = std::sync::Arc<std::sync::Mutex<()>>;

fn write_lock(lock: &Option<WriteLock>) -> Option<std::sync::MutexGuard<'_, ()>> {
    lock.as_ref().map(|l| l.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
}

/// A leaf as persisted: sequence number, BLAKE3 payload digest, record bytes.
/// A batch ready to store (see [`Store::seal`]).
pub struct SealedBatch {
    pub batch: BatchRecord,
    /// Upper nodes of the batch tree: (level, index, hash).
    pub batch_nodes: Vec<(u32, u64, Hash)>,
    /// Log nodes the batch's append completes.
    pub log_nodes: Vec<(u32, u64, Hash)>,
    /// The signed checkpoint of the log with this batch.
    pub note: String,
}

pub struct StoredLeaf {
    pub seq: u64,
    pub digest: [u8; 32],
    pub record: Vec<u8>,
}

/// A device as the registry holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRow {
    pub id: String,
    /// The current key; `None` once revoked.
    pub public_key: Option<[u8; 32]>,
    /// The registry leaf that put the current key in place.
    pub key_seq: Option<u64>,
    /// The device's latest registry leaf.
    pub head_seq: u64,
    /// The highest envelope counter accepted from the device.
    pub last_counter: Option<u64>,
}

/// A registry change requested by the CLI or the enrolment file, applied
/// by the running broker in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceCommand {
    pub id: i64,
    pub action: RegistryAction,
    pub device: String,
    pub public_key: Option<[u8; 32]>,
    pub source: String,
    pub requested_at_ms: u64,
    /// Set once applied: the sequence number of its registry leaf.
    pub applied_seq: Option<u64>,
    /// Set if the broker refused it.
    pub error: Option<String>,
}

/// A message that was received and not notarized, and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Rejection {
    pub received_at_ms: u64,
    pub topic: String,
    #[serde(serialize_with = "hex_digest")]
    pub digest: [u8; 32],
    pub payload_len: u64,
    /// Why (docs/PROTOCOL.md §Rejections).
    pub reason: crate::reason::Reason,
    pub detail: String,
    pub device: Option<String>,
}

fn hex_digest<S: serde::Serializer>(d: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&hex::encode(d))
}

/// A registry leaf and the command it applies (none for start-up changes).
pub struct RegistryChange {
    pub seq: u64,
    pub event: RegistryEvent,
    pub command: Option<i64>,
}

/// Everything one ingest group changes, committed in one transaction.
#[derive(Default)]
pub struct Commit {
    pub leaves: Vec<StoredLeaf>,
    pub registry: Vec<RegistryChange>,
    /// New highest counters: (device, counter).
    pub counters: Vec<(String, u64)>,
    pub rejections: Vec<Rejection>,
    /// Commands the broker refused: (command id, reason).
    pub refused: Vec<(i64, String)>,
}

impl Commit {
    pub fn is_empty(&self) -> bool {
        self.leaves.is_empty()
            && self.registry.is_empty()
            && self.counters.is_empty()
            && self.rejections.is_empty()
            && self.refused.is_empty()
    }
}

fn action_from_str(s: &str) -> Result<RegistryAction, StoreError> {
    match s {
        "enrol" => Ok(RegistryAction::Enrol),
        "rotate" => Ok(RegistryAction::Rotate),
        "revoke" => Ok(RegistryAction::Revoke),
        other => Err(StoreError::Corrupt(format!("unknown registry action {other:?}"))),
    }
}

fn key32(v: Option<Vec<u8>>) -> Result<Option<[u8; 32]>, StoreError> {
    v.map(|k| k.try_into().map_err(|_| StoreError::Corrupt("key is not 32 bytes".into()))).transpose()
}

fn hash32(v: Vec<u8>) -> Result<Hash, StoreError> {
    v.try_into().map_err(|_| StoreError::Corrupt("hash is not 32 bytes".into()))
}

/// Page cache of the ingest connection (KiB). The digest index takes
/// inserts at random places; with SQLite's default 2 MiB cache nearly every
/// insert evicts a page and reads another back (measured in bench/RESULTS.md).
pub const INGEST_CACHE_KIB: i64 = 64 * 1024;
/// Page cache of the proof service's connection (KiB).
pub const PROOFS_CACHE_KIB: i64 = 16 * 1024;

impl Store {
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(data_dir.join(STORE_FILE))?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(SCHEMA)?;
        // The schema's version, in the file's header (`PRAGMA user_version`):
        // 0 is a store from before versions were recorded, whose schema is
        // version 1; a newer version is refused rather than misread.
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        match version {
            0 => conn.pragma_update(None, "user_version", SCHEMA_VERSION)?,
            SCHEMA_VERSION => {}
            v => {
                return Err(StoreError::Corrupt(format!(
                    "schema version {v}; this build reads version {SCHEMA_VERSION} (a newer mqtt-notary wrote it?)"
                )))
            }
        }
        Ok(Store { conn, writer: None })
    }

    /// A connection of the running pipeline: `cache_kib` of page cache, and
    /// no automatic WAL checkpoints on commit. The pipeline's own
    /// checkpointer thread ([`Store::checkpoint_wal`]) copies the WAL into
    /// the database, so no ingest commit waits for it.
    pub fn open_pipeline(
        data_dir: &Path,
        cache_kib: Option<i64>,
        writer: WriteLock,
    ) -> Result<Self, StoreError> {
        let mut store = Self::open(data_dir)?;
        store.writer = Some(writer);
        if let Some(kib) = cache_kib {
            store.conn.pragma_update(None, "cache_size", -kib)?;
        }
        store.conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        Ok(store)
    }

    /// Copies committed WAL frames into the database file, and keeps the
    /// WAL from growing without end.
    ///
    /// A passive checkpoint never waits for, nor blocks, the writer and
    /// readers; under a steady stream of commits it copies all but the
    /// frames committed while it ran, so the WAL never starts over by
    /// itself. Once the WAL holds more than `restart_frames`, a second
    /// passive checkpoint runs holding the write lock: with no commit in
    /// between it copies every frame, and the next write transaction then
    /// starts the WAL over from its beginning (SQLite does this when the
    /// whole WAL is in the database file and no reader still holds a
    /// snapshot in it). A reader can make that restart miss; if the WAL
    /// still grows past `limit_frames`, a truncating checkpoint empties it,
    /// waiting for those readers. The lock is held only for the frames the
    /// first passive checkpoint left. Returns the frames the WAL held.
    pub fn checkpoint_wal(&self, restart_frames: i64, limit_frames: i64) -> Result<i64, StoreError> {
        let frames: i64 = self.conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get(1))?;
        if frames > restart_frames {
            let mode = if frames > limit_frames { "TRUNCATE" } else { "PASSIVE" };
            let _w = write_lock(&self.writer);
            self.conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| r.get::<_, i64>(0))?;
        }
        Ok(frames)
    }

    /// The next unused sequence number.
    pub fn next_seq(&self) -> Result<u64, StoreError> {
        let max: Option<U64> = self.conn.query_row("SELECT MAX(seq) FROM leaves", [], |r| r.get(0))?;
        Ok(max.map_or(0, |m| m.0 + 1))
    }

    /// Persists leaves in one transaction (group commit).
    pub fn append_leaves(&mut self, leaves: &[StoredLeaf]) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        insert_leaves(&tx, leaves)?;
        tx.commit()?;
        Ok(())
    }

    /// Persists one ingest group atomically: leaves, registry changes,
    /// counters, rejections and refused commands. A crash leaves either all
    /// of it or none, so counters never run ahead of the leaves they guard.
    pub fn commit(&mut self, c: &Commit) -> Result<(), StoreError> {
        let _w = write_lock(&self.writer);
        let tx = self.conn.transaction()?;
        insert_leaves(&tx, &c.leaves)?;
        for r in &c.registry {
            let e = &r.event;
            let prev = (e.prev_seq != notary_proof::device::NO_PREV).then_some(U64(e.prev_seq));
            tx.prepare_cached(
                "INSERT INTO registry_events (seq, device, action, prev_seq) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![U64(r.seq), e.device_id, e.action.as_str(), prev])?;
            let (key, key_seq) = match e.action {
                RegistryAction::Revoke => (None, None),
                _ => (Some(&e.public_key[..]), Some(U64(r.seq))),
            };
            tx.prepare_cached(
                "INSERT INTO devices (id, public_key, key_seq, head_seq) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(id) DO UPDATE SET public_key = ?2, key_seq = ?3, head_seq = ?4",
            )?
            .execute(params![e.device_id, key, key_seq, U64(r.seq)])?;
            if let Some(id) = r.command {
                tx.prepare_cached("UPDATE device_commands SET applied_seq = ?2 WHERE id = ?1")?
                    .execute(params![id, U64(r.seq)])?;
            }
        }
        for (device, counter) in &c.counters {
            tx.prepare_cached("UPDATE devices SET last_counter = ?2 WHERE id = ?1")?
                .execute(params![device, U64(*counter)])?;
        }
        for r in &c.rejections {
            tx.prepare_cached(
                "INSERT INTO rejections (at_ms, topic, digest, payload_len, reason, detail, device)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?
            .execute(params![
                U64(r.received_at_ms),
                r.topic,
                &r.digest[..],
                U64(r.payload_len),
                r.reason.as_str(),
                r.detail,
                r.device
            ])?;
        }
        for (id, error) in &c.refused {
            tx.prepare_cached("UPDATE device_commands SET error = ?2 WHERE id = ?1")?
                .execute(params![id, error])?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Every device the registry knows, by id.
    pub fn devices(&self) -> Result<Vec<DeviceRow>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT id, public_key, key_seq, head_seq, last_counter FROM devices ORDER BY id")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get(1)?,
                r.get::<_, Option<U64>>(2)?,
                r.get::<_, U64>(3)?,
                r.get::<_, Option<U64>>(4)?,
            ))
        })?;
        rows.map(|row| {
            let (id, key, key_seq, head_seq, last_counter) = row?;
            Ok(DeviceRow {
                id,
                public_key: key32(key)?,
                key_seq: key_seq.map(|v| v.0),
                head_seq: head_seq.0,
                last_counter: last_counter.map(|v| v.0),
            })
        })
        .collect()
    }

    /// Queues a registry change for the broker to apply; returns its id.
    pub fn queue_command(
        &self,
        action: RegistryAction,
        device: &str,
        public_key: Option<[u8; 32]>,
        source: &str,
        now_ms: u64,
    ) -> Result<i64, StoreError> {
        self.conn.execute(
            "INSERT INTO device_commands (action, device, public_key, source, requested_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![action.as_str(), device, public_key.as_ref().map(|k| &k[..]), source, U64(now_ms)],
        )?;
        Ok(self.conn.last_insert_rowid())
    }

    /// Commands not applied or refused yet, oldest first; with `all`, every
    /// command ever queued.
    pub fn commands(&self, all: bool) -> Result<Vec<DeviceCommand>, StoreError> {
        let sql = if all {
            "SELECT id, action, device, public_key, source, requested_at_ms, applied_seq, error
             FROM device_commands ORDER BY id"
        } else {
            "SELECT id, action, device, public_key, source, requested_at_ms, applied_seq, error
             FROM device_commands WHERE applied_seq IS NULL AND error IS NULL ORDER BY id"
        };
        let mut stmt = self.conn.prepare_cached(sql)?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, Option<Vec<u8>>>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, U64>(5)?.0,
                r.get::<_, Option<U64>>(6)?.map(|v| v.0),
                r.get::<_, Option<String>>(7)?,
            ))
        })?;
        rows.map(|row| {
            let (id, action, device, key, source, requested_at_ms, applied_seq, error) = row?;
            Ok(DeviceCommand {
                id,
                action: action_from_str(&action)?,
                device,
                public_key: key32(key)?,
                source,
                requested_at_ms,
                applied_seq,
                error,
            })
        })
        .collect()
    }

    /// The registry event of `device` that follows the one at `seq`, if it
    /// lies before `before_seq`.
    pub fn registry_successor(
        &self,
        device: &str,
        seq: u64,
        before_seq: u64,
    ) -> Result<Option<u64>, StoreError> {
        Ok(self
            .conn
            .prepare_cached(
                "SELECT seq FROM registry_events WHERE device = ?1 AND prev_seq = ?2 AND seq < ?3",
            )?
            .query_row(params![device, U64(seq), int::bound(before_seq)], |r| r.get::<_, U64>(0))
            .optional()?
            .map(|v| v.0))
    }

    /// The leaf with this sequence number.
    pub fn leaf(&self, seq: u64) -> Result<Option<StoredLeaf>, StoreError> {
        Ok(self.leaves_in(seq, seq.saturating_add(1))?.pop())
    }

    /// The first `limit` rejections of payloads with this digest.
    pub fn rejections_by_digest(
        &self,
        digest: &[u8; 32],
        limit: usize,
    ) -> Result<Vec<Rejection>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT at_ms, topic, payload_len, reason, detail, device FROM rejections
             WHERE digest = ?1 ORDER BY id LIMIT ?2",
        )?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = stmt.query_map(params![&digest[..], limit], |r| {
            Ok((
                r.get::<_, U64>(0)?.0,
                r.get(1)?,
                r.get::<_, U64>(2)?.0,
                r.get::<_, String>(3)?,
                r.get(4)?,
                r.get(5)?,
            ))
        })?;
        rows.map(|row| {
            let (received_at_ms, topic, payload_len, reason, detail, device) = row?;
            Ok(Rejection {
                received_at_ms,
                topic,
                digest: *digest,
                payload_len,
                reason: crate::reason::Reason::from_wire(&reason)
                    .ok_or_else(|| StoreError::Corrupt(format!("unknown rejection reason {reason:?}")))?,
                detail,
                device,
            })
        })
        .collect()
    }

    pub fn record_gap(&self, at_ms: u64, missed: u64, after_seq: u64) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO gaps (at_ms, missed, after_seq) VALUES (?1, ?2, ?3)",
            params![U64(at_ms), U64(missed), U64(after_seq)],
        )?;
        Ok(())
    }

    /// Records a window in which the source could not receive messages
    /// (the sidecar was disconnected or not running).
    pub fn record_outage(&self, from_ms: u64, to_ms: u64, after_seq: u64) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO source_outages (from_ms, to_ms, after_seq) VALUES (?1, ?2, ?3)",
            params![U64(from_ms), U64(to_ms), U64(after_seq)],
        )?;
        Ok(())
    }

    /// Every recorded outage: (from_ms, to_ms, after_seq), oldest first.
    pub fn outages(&self) -> Result<Vec<(u64, u64, u64)>, StoreError> {
        let mut stmt =
            self.conn.prepare("SELECT from_ms, to_ms, after_seq FROM source_outages ORDER BY id")?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, U64>(0)?.0, r.get::<_, U64>(1)?.0, r.get::<_, U64>(2)?.0)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The last sealed batch, if any.
    pub fn last_batch(&self) -> Result<Option<BatchRecord>, StoreError> {
        self.conn
            .query_row("SELECT record FROM batches ORDER BY number DESC LIMIT 1", [], |r| {
                r.get::<_, Vec<u8>>(0)
            })
            .optional()?
            .map(|b| decode_batch(&b))
            .transpose()
    }

    /// Leaves from `from_seq` on, in order.
    pub fn leaves_from(&self, from_seq: u64) -> Result<Vec<StoredLeaf>, StoreError> {
        self.leaves_in(from_seq, u64::MAX)
    }

    /// Leaves with `from <= seq < to`, in order.
    pub fn leaves_in(&self, from: u64, to: u64) -> Result<Vec<StoredLeaf>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT seq, digest, record FROM leaves WHERE seq >= ?1 AND seq < ?2 ORDER BY seq",
        )?;
        let rows = stmt.query_map(params![int::bound(from), int::bound(to)], |r| {
            Ok((r.get::<_, U64>(0)?.0, r.get::<_, Vec<u8>>(1)?, r.get::<_, Vec<u8>>(2)?))
        })?;
        rows.map(|row| {
            let (seq, digest, record) = row?;
            Ok(StoredLeaf { seq, digest: hash32(digest)?, record })
        })
        .collect()
    }

    /// Stores a sealed batch, its tree nodes (levels >= `BATCH_NODE_MIN_LEVEL`),
    /// its new log nodes and its checkpoint atomically.
    /// Stores sealed batches, oldest first, in one transaction: each
    /// batch record, its upper batch-tree nodes, the log nodes its append
    /// completes, and its signed checkpoint.
    pub fn seal(&mut self, batches: &[SealedBatch]) -> Result<(), StoreError> {
        let _w = write_lock(&self.writer);
        let tx = self.conn.transaction()?;
        for s in batches {
            let batch = &s.batch;
            tx.prepare_cached(
                "INSERT INTO batches (number, first_seq, size, record) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![
                U64(batch.number),
                U64(batch.first_seq),
                U64(batch.size),
                batch.encode()
            ])?;
            let mut stmt = tx.prepare_cached(
                "INSERT INTO batch_nodes (batch, level, idx, hash) VALUES (?1, ?2, ?3, ?4)",
            )?;
            for (level, idx, hash) in &s.batch_nodes {
                stmt.execute(params![U64(batch.number), level, U64(*idx), &hash[..]])?;
            }
            let mut stmt =
                tx.prepare_cached("INSERT INTO log_nodes (level, idx, hash) VALUES (?1, ?2, ?3)")?;
            for (level, idx, hash) in &s.log_nodes {
                stmt.execute(params![level, U64(*idx), &hash[..]])?;
            }
            tx.prepare_cached("INSERT INTO checkpoints (size, note) VALUES (?1, ?2)")?
                .execute(params![U64(batch.number.wrapping_add(1)), s.note])?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Stores anchor receipts, (checkpoint size, ledger, receipt), in one
    /// transaction.
    pub fn put_receipts(&self, receipts: &[(u64, &str, Receipt)]) -> Result<(), StoreError> {
        if receipts.is_empty() {
            return Ok(());
        }
        let _w = write_lock(&self.writer);
        let tx = self.conn.unchecked_transaction()?;
        for (size, ledger, receipt) in receipts {
            let json = serde_json::to_string(receipt).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            tx.prepare_cached("INSERT OR REPLACE INTO receipts (size, ledger, receipt) VALUES (?1, ?2, ?3)")?
                .execute(params![U64(*size), ledger, json])?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Checkpoints that `ledger` has not anchored yet, oldest first.
    pub fn unanchored(&self, ledger: &str) -> Result<Vec<(u64, String)>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT c.size, c.note FROM checkpoints c
             WHERE NOT EXISTS (SELECT 1 FROM receipts r WHERE r.size = c.size AND r.ledger = ?1)
             ORDER BY c.size",
        )?;
        let rows = stmt.query_map([ledger], |r| Ok((r.get::<_, U64>(0)?.0, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The first `limit` leaves with this payload digest, in sequence order.
    pub fn leaves_by_digest(&self, digest: &[u8; 32], limit: usize) -> Result<Vec<StoredLeaf>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT seq, record FROM leaves WHERE digest = ?1 ORDER BY seq LIMIT ?2")?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = stmt.query_map(params![&digest[..], limit], |r| {
            Ok((r.get::<_, U64>(0)?.0, r.get::<_, Vec<u8>>(1)?))
        })?;
        rows.map(|row| {
            let (seq, record) = row?;
            Ok(StoredLeaf { seq, digest: *digest, record })
        })
        .collect()
    }

    /// The sealed batch holding `seq`, if it is sealed.
    pub fn batch_of(&self, seq: u64) -> Result<Option<BatchRecord>, StoreError> {
        let rec: Option<Vec<u8>> = self
            .conn
            .prepare_cached(
                "SELECT record FROM batches WHERE first_seq <= ?1 ORDER BY first_seq DESC LIMIT 1",
            )?
            .query_row([int::bound(seq)], |r| r.get(0))
            .optional()?;
        match rec {
            Some(b) => {
                let batch = decode_batch(&b)?;
                Ok((seq < batch.first_seq + batch.size).then_some(batch))
            }
            None => Ok(None),
        }
    }

    pub fn checkpoint(&self, size: u64) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT note FROM checkpoints WHERE size = ?1")?
            .query_row([U64(size)], |r| r.get(0))
            .optional()?)
    }

    /// The newest checkpoint: (size, note).
    pub fn latest_checkpoint(&self) -> Result<Option<(u64, String)>, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT size, note FROM checkpoints ORDER BY size DESC LIMIT 1", [], |r| {
                Ok((r.get::<_, U64>(0)?.0, r.get(1)?))
            })
            .optional()?)
    }

    pub fn receipts(&self, size: u64) -> Result<Vec<Receipt>, StoreError> {
        let mut stmt =
            self.conn.prepare_cached("SELECT receipt FROM receipts WHERE size = ?1 ORDER BY ledger")?;
        let rows = stmt.query_map([U64(size)], |r| r.get::<_, String>(0))?;
        rows.map(|json| {
            serde_json::from_str(&json?).map_err(|e| StoreError::Corrupt(format!("receipt: {e}")))
        })
        .collect()
    }

    /// The log size: the number of sealed batches.
    pub fn log_size(&self) -> Result<u64, StoreError> {
        Ok(self.last_batch()?.map_or(0, |b| b.number + 1))
    }

    /// RFC 9162 inclusion path of batch `index` in the log at `size`.
    pub fn log_inclusion(&self, index: u64, size: u64) -> Result<Vec<Hash>, StoreError> {
        tree::inclusion_proof(&mut Nodes(self), index, size)
    }

    /// RFC 9162 consistency proof between two log sizes.
    pub fn log_consistency(&self, old: u64, new: u64) -> Result<Vec<Hash>, StoreError> {
        tree::consistency_proof(&mut Nodes(self), old, new)
    }

    /// The log root at `size` (>= 1).
    pub fn log_root(&self, size: u64) -> Result<Hash, StoreError> {
        tree::root(&mut Nodes(self), size)
    }

    /// Computes the log nodes completed by appending a batch at `index`.
    pub fn nodes_after_append(&self, index: u64, leaf: Hash) -> Result<Vec<(u32, u64, Hash)>, StoreError> {
        tree::perfect_nodes_after_append(index, leaf, |level, idx| Nodes(self).node(level, idx))
    }
}

impl Store {
    /// RFC 9162 inclusion path of leaf `index` in `batch`, from the stored
    /// upper nodes and at most two 64-leaf ranges. Checked against the batch
    /// root before it is returned, so a damaged store never serves a bad path.
    pub fn batch_path(&self, batch: &BatchRecord, index: u64) -> Result<Vec<Hash>, StoreError> {
        let mut src = BatchNodes { store: self, batch, chunks: Vec::new() };
        let path = tree::inclusion_proof(&mut src, index, batch.size)?;
        let leaf = src.node(0, index)?;
        tree::verify_inclusion(index, batch.size, &leaf, &path, &batch.root)
            .map_err(|_| StoreError::Corrupt(format!("batch {} does not match its root", batch.number)))?;
        Ok(path)
    }

    /// A perfect-subtree node of the log.
    pub fn log_node(&self, level: u32, index: u64) -> Result<Hash, StoreError> {
        Nodes(self).node(level, index)
    }
}

struct Nodes<'a>(&'a Store);

impl NodeSource for Nodes<'_> {
    type Error = StoreError;
    fn node(&mut self, level: u32, index: u64) -> Result<Hash, StoreError> {
        let hash: Option<Vec<u8>> = self
            .0
            .conn
            .prepare_cached("SELECT hash FROM log_nodes WHERE level = ?1 AND idx = ?2")?
            .query_row(params![level, U64(index)], |r| r.get(0))
            .optional()?;
        hash32(hash.ok_or_else(|| StoreError::Corrupt(format!("missing log node {level}/{index}")))?)
    }
}

/// Nodes of one batch tree: stored ones from `BATCH_NODE_MIN_LEVEL` up,
/// lower ones computed from the 64-leaf chunk that holds them.
struct BatchNodes<'a> {
    store: &'a Store,
    batch: &'a BatchRecord,
    chunks: Vec<(u64, tree::MemoryTree)>,
}

impl NodeSource for BatchNodes<'_> {
    type Error = StoreError;
    fn node(&mut self, level: u32, index: u64) -> Result<Hash, StoreError> {
        if level >= BATCH_NODE_MIN_LEVEL {
            let hash: Option<Vec<u8>> = self
                .store
                .conn
                .prepare_cached("SELECT hash FROM batch_nodes WHERE batch = ?1 AND level = ?2 AND idx = ?3")?
                .query_row(params![U64(self.batch.number), level, U64(index)], |r| r.get(0))
                .optional()?;
            let missing =
                || StoreError::Corrupt(format!("missing batch node {}/{level}/{index}", self.batch.number));
            return hash32(hash.ok_or_else(missing)?);
        }
        let chunk = (index << level) >> BATCH_NODE_MIN_LEVEL;
        let pos = match self.chunks.iter().position(|(c, _)| *c == chunk) {
            Some(p) => p,
            None => {
                let from = self.batch.first_seq + (chunk << BATCH_NODE_MIN_LEVEL);
                let to = (from + (1 << BATCH_NODE_MIN_LEVEL)).min(self.batch.first_seq + self.batch.size);
                let mut t = tree::MemoryTree::new();
                for leaf in self.store.leaves_in(from, to)? {
                    t.append(notary_proof::hash::leaf_hash(&leaf.record));
                }
                self.chunks.push((chunk, t));
                self.chunks.len() - 1
            }
        };
        let local = index - ((chunk << BATCH_NODE_MIN_LEVEL) >> level);
        self.chunks[pos]
            .1
            .node(level, local)
            .map_err(|_| StoreError::Corrupt(format!("batch {} is missing leaves", self.batch.number)))
    }
}

fn insert_leaves(tx: &rusqlite::Transaction<'_>, leaves: &[StoredLeaf]) -> Result<(), StoreError> {
    let mut stmt = tx.prepare_cached("INSERT INTO leaves (seq, digest, record) VALUES (?1, ?2, ?3)")?;
    for l in leaves {
        stmt.execute(params![U64(l.seq), &l.digest[..], &l.record])?;
    }
    Ok(())
}

fn decode_batch(bytes: &[u8]) -> Result<BatchRecord, StoreError> {
    BatchRecord::decode(bytes).map_err(|e| StoreError::Corrupt(format!("batch record: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use notary_proof::{BatchTree, LeafRecord};

    /// Leaves `from..from + n`, persisted, with their leaf hashes.
    fn persist_leaves(store: &mut Store, from: u64, n: u64) -> Vec<Hash> {
        let leaves: Vec<StoredLeaf> = (from..from + n)
            .map(|s| {
                let rec = LeafRecord::broker_received(s, s, "t", &s.to_be_bytes());
                StoredLeaf { seq: s, digest: rec.payload_digest, record: rec.encode().expect("encodes") }
            })
            .collect();
        store.append_leaves(&leaves).expect("append");
        leaves.iter().map(|l| notary_proof::hash::leaf_hash(&l.record)).collect()
    }

    /// Seals `hashes` as batch `number`, as the sealer does; returns the record.
    fn seal(store: &mut Store, number: u64, first_seq: u64, hashes: &[Hash]) -> BatchRecord {
        let root = BatchTree::new(hashes).expect("non-empty").root();
        let mut mem = tree::MemoryTree::new();
        hashes.iter().for_each(|h| mem.append(*h));
        let batch = BatchRecord { number, first_seq, size: hashes.len() as u64, root, sealed_at_ms: 0 };
        let log_nodes = store.nodes_after_append(number, batch.leaf_hash()).expect("nodes");
        let sealed = SealedBatch {
            batch: batch.clone(),
            batch_nodes: mem.perfect_nodes(BATCH_NODE_MIN_LEVEL),
            log_nodes,
            note: format!("note {number}"),
        };
        store.seal(&[sealed]).expect("seal");
        batch
    }

    /// Seals batches of many sizes into a real store, then checks that every
    /// served path equals rs_merkle's path over all the batch's leaves.
    #[test]
    fn served_batch_paths_equal_rs_merkle_paths() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut store = Store::open(dir.path()).expect("store");
        let sizes: Vec<u64> = (1..=200).chain([255, 256, 257, 1000, 4097]).collect();
        let mut seq = 0u64;
        for (number, &size) in sizes.iter().enumerate() {
            let hashes = persist_leaves(&mut store, seq, size);
            let rs = BatchTree::new(&hashes).expect("non-empty");
            let batch = seal(&mut store, number as u64, seq, &hashes);
            for i in 0..size {
                assert_eq!(
                    store.batch_path(&batch, i).expect("path"),
                    rs.path(i).expect("in range"),
                    "{i}/{size}"
                );
            }
            seq += size;
        }
    }

    /// Every u64 field of leaves, envelopes (counter, device time),
    /// registry events and batches is stored and read back exactly,
    /// including the values above i64::MAX that once wedged ingest.
    #[test]
    fn every_u64_round_trips_through_the_store() {
        use notary_proof::{DeviceFields, RegistryAction, RegistryEvent};
        for v in [0, i64::MAX as u64, 1u64 << 63, u64::MAX] {
            let dir = tempfile::tempdir().expect("temp dir");
            let mut store = Store::open(dir.path()).expect("store");
            let fields =
                DeviceFields { key_seq: v, counter: v, device_time_ms: v, device_id: "dev-1".into() };
            let leaf = LeafRecord::device_signed(v, v, "t/u64", &v.to_be_bytes(), &fields).expect("leaf");
            let record = leaf.encode().expect("encodes");
            let event = RegistryEvent {
                action: RegistryAction::Enrol,
                device_id: "dev-1".into(),
                public_key: [7; 32],
                prev_seq: v,
            };
            let rejection = Rejection {
                received_at_ms: v,
                topic: "t/u64".into(),
                digest: [v as u8; 32],
                payload_len: v,
                reason: crate::reason::Reason::Replay,
                detail: "d".into(),
                device: Some("dev-1".into()),
            };
            let commit = Commit {
                leaves: vec![StoredLeaf { seq: v, digest: leaf.payload_digest, record: record.clone() }],
                registry: vec![RegistryChange { seq: v, event, command: None }],
                counters: vec![("dev-1".into(), v)],
                rejections: vec![rejection.clone()],
                refused: vec![],
            };
            store.commit(&commit).expect("commit");

            let back = store.leaves_by_digest(&leaf.payload_digest, 10).expect("leaves");
            assert_eq!(back.len(), 1, "{v}");
            assert_eq!(back[0].seq, v);
            assert_eq!(back[0].record, record);
            let decoded = LeafRecord::decode(&back[0].record).expect("decodes");
            assert_eq!((decoded.seq, decoded.received_at_ms), (v, v));
            let device = store.devices().expect("devices").pop().expect("one device");
            assert_eq!((device.key_seq, device.head_seq, device.last_counter), (Some(v), v, Some(v)));
            // NULL stands for NO_PREV (u64::MAX): "no earlier event".
            let (seq, prev): (U64, Option<U64>) = store
                .conn
                .query_row("SELECT seq, prev_seq FROM registry_events", [], |r| Ok((r.get(0)?, r.get(1)?)))
                .expect("registry event");
            assert_eq!((seq.0, prev.map_or(notary_proof::device::NO_PREV, |p| p.0)), (v, v));
            assert_eq!(
                store.rejections_by_digest(&rejection.digest, 10).expect("rejections"),
                vec![rejection]
            );
            store.record_outage(v, v, v).expect("outage");
            assert_eq!(store.outages().expect("outages"), vec![(v, v, v)]);
            store.record_gap(v, v, v).expect("gap");

            // A batch holds at least one leaf, and first_seq + size fits in
            // a u64: one batch carries v as its number and first sequence
            // number, another as its size.
            let batches = [
                BatchRecord {
                    number: v,
                    first_seq: v.min(u64::MAX - 1),
                    size: 1,
                    root: [3; 32],
                    sealed_at_ms: v,
                },
                BatchRecord {
                    number: v ^ 1,
                    first_seq: u64::from(v == 0),
                    size: v.max(1),
                    root: [4; 32],
                    sealed_at_ms: v,
                },
            ];
            for batch in &batches {
                let sealed = SealedBatch {
                    batch: batch.clone(),
                    batch_nodes: vec![(6, v, [1; 32])],
                    log_nodes: vec![(0, batch.number, [2; 32])],
                    note: "n".into(),
                };
                store.seal(&[sealed]).expect("seal");
                let (record, first_seq, size): (Vec<u8>, U64, U64) = store
                    .conn
                    .query_row(
                        "SELECT record, first_seq, size FROM batches WHERE number = ?1",
                        [U64(batch.number)],
                        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                    )
                    .expect("batch row");
                assert_eq!(decode_batch(&record).expect("decodes"), *batch, "{v}");
                assert_eq!((first_seq.0, size.0), (batch.first_seq, batch.size));
            }
            assert_eq!(store.log_node(0, v).expect("log node"), [2; 32]);
        }
    }

    #[test]
    fn a_damaged_batch_is_refused_not_served() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut store = Store::open(dir.path()).expect("store");
        let hashes = persist_leaves(&mut store, 0, 100);
        let batch = seal(&mut store, 0, 0, &hashes);
        // Leaves 0..64 form a stored perfect node; paths for leaves 64..100
        // use that node and never read the damaged leaf.
        store.conn.execute("UPDATE leaves SET record = x'00' WHERE seq = 10", []).expect("damage");
        assert!(store.batch_path(&batch, 70).is_ok(), "paths that do not touch the damage still work");
        assert!(matches!(store.batch_path(&batch, 10), Err(StoreError::Corrupt(_))));
        assert!(matches!(store.batch_path(&batch, 3), Err(StoreError::Corrupt(_))));
    }

    /// The checkpointer bounds the WAL under a steady writer: past
    /// `restart_frames` the next commit starts the WAL over; a reader that
    /// makes that restart miss lets it grow only until `limit_frames`,
    /// where it is truncated. One thread writes here, so the unlocked
    /// passive checkpoint already copies every frame; the locked one
    /// matters when commits land while that runs, which only the benchmark
    /// exercises (bench/RESULTS.md).
    #[test]
    fn the_wal_starts_over_and_is_truncated_past_its_limit() {
        let dir = tempfile::tempdir().expect("temp dir");
        let lock = WriteLock::default();
        let mut writer = Store::open_pipeline(dir.path(), None, lock.clone()).expect("writer");
        let checkpointer = Store::open_pipeline(dir.path(), None, lock).expect("checkpointer");
        let wal = dir.path().join(format!("{STORE_FILE}-wal"));
        let wal_bytes = || std::fs::metadata(&wal).expect("WAL file").len();
        // Only reports the frames: thresholds no WAL here reaches.
        let frames = || checkpointer.checkpoint_wal(i64::MAX, i64::MAX).expect("checkpoint");

        persist_leaves(&mut writer, 0, 2000);
        let grown = checkpointer.checkpoint_wal(10, i64::MAX).expect("checkpoint");
        assert!(grown > 10, "{grown} frames");
        persist_leaves(&mut writer, 2000, 1);
        let restarted = frames();
        assert!(
            restarted < grown / 2,
            "the commit after the locked checkpoint starts the WAL over: {restarted} of {grown} frames"
        );
        assert!(wal_bytes() > 0, "starting over reuses the file");

        // A reader holding a snapshot: no restart, the WAL grows.
        let reader = Store::open(dir.path()).expect("reader");
        reader.conn.execute_batch("BEGIN").expect("begin");
        let _: i64 = reader.conn.query_row("SELECT COUNT(*) FROM leaves", [], |r| r.get(0)).expect("read");
        let held = frames();
        persist_leaves(&mut writer, 2001, 2000);
        checkpointer.checkpoint_wal(10, i64::MAX).expect("checkpoint");
        persist_leaves(&mut writer, 4001, 1);
        let past = frames();
        assert!(
            past > held + 10,
            "a reader's snapshot keeps the WAL from starting over: {held} -> {past} frames"
        );
        reader.conn.execute_batch("COMMIT").expect("end the read");

        checkpointer.checkpoint_wal(10, past - 1).expect("checkpoint");
        assert_eq!(wal_bytes(), 0, "past the limit the WAL is truncated");
        assert_eq!(writer.next_seq().expect("seq"), 4002, "nothing lost");
    }
}
