//! The broker's SQLite store (`notary.sqlite`): leaves, batches, the log's
//! perfect-subtree nodes, checkpoints, anchor receipts, the device registry,
//! rejected messages and EVM anchoring transactions (`store/evm.rs`).
//!
//! One writer connection per writing task (ingest, sealer) and separate
//! read connections for proofs; WAL lets readers run beside writers.
//! Leaves are committed with `synchronous=FULL`: once `append_leaves`
//! returns, they survive a crash of the process or the host.

use notary_proof::Hash;
use rusqlite::Connection;
use std::path::Path;

mod digests;
mod evm;
mod int;
mod leaves;
mod log;
mod registry;
mod retention;
pub use digests::{DigestHits, IndexWork, Run, RunCache, Unsealed};
pub use evm::{EvmAnchorRow, EvmAnchorState};
pub use int::U64;
pub use leaves::{Commit, Rejection, StoredLeaf};
pub use log::SealedBatch;
pub use registry::{DeviceCommand, DeviceRow, RegistryChange};
pub use retention::{PruneStep, Pruned, StoreSize, PRUNE_STEP, TOMBSTONES_KEPT_MIN};

pub const STORE_FILE: &str = "notary.sqlite";
/// Batch-tree nodes are stored from this level up (subtrees of 64 leaves);
/// lower ones are recomputed from at most 64 leaves when a path is served.
/// That costs about one hash per 32 leaves on disk.
pub const BATCH_NODE_MIN_LEVEL: u32 = 6;

/// The version of [`SCHEMA`], kept in the file as `PRAGMA user_version`.
/// Version 2 added retention's tables (`pruned_digests`, `retention`);
/// version 3 replaced the index `leaves_by_digest` by sorted runs
/// (`digest_runs`, `digest_filters`, `digest_index`; `store/digests.rs`). An older file is
/// upgraded in place: the new tables are created, and the sealed leaves
/// are indexed in runs once.
pub const SCHEMA_VERSION: i64 = 3;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS leaves (
    seq    INTEGER PRIMARY KEY,
    digest BLOB NOT NULL,
    record BLOB NOT NULL
);
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
CREATE INDEX IF NOT EXISTS evm_anchors_by_size ON evm_anchors(size);
CREATE TABLE IF NOT EXISTS pruned_digests (
    prefix BLOB PRIMARY KEY,
    batch  INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS digest_runs (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    level    INTEGER NOT NULL,
    from_seq INTEGER NOT NULL,
    to_seq   INTEGER NOT NULL,
    entries  INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS digest_filters (
    run    INTEGER PRIMARY KEY,
    filter BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS digest_index (
    run    INTEGER NOT NULL,
    prefix INTEGER NOT NULL,
    seq    INTEGER NOT NULL,
    PRIMARY KEY (run, prefix, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS retention (
    id      INTEGER PRIMARY KEY CHECK (id = 0),
    batches INTEGER NOT NULL,
    seq     INTEGER NOT NULL,
    leaves  INTEGER NOT NULL,
    slice   INTEGER NOT NULL
);";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("store is corrupt: {0}")]
    Corrupt(String),
    /// Retention deleted what was asked for; `batch` held it.
    #[error("pruned by retention (batch {batch})")]
    Pruned { batch: u64 },
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
            StoreError::Pruned { .. } => Fault::Permanent,
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

impl Store {
    /// Runs `f` inside one read transaction: every query it makes sees the
    /// same snapshot of the store, whatever other connections commit.
    pub fn snapshot<T, E: From<StoreError>>(&self, f: impl FnOnce(&Store) -> Result<T, E>) -> Result<T, E> {
        let tx = self.conn.unchecked_transaction().map_err(StoreError::from)?;
        let out = f(self);
        // Nothing was written: ending the transaction ends the snapshot.
        drop(tx);
        out
    }

    /// Runs `f` in one write transaction while holding the pipeline's write
    /// lock. Every write of the store goes through here (the schema set-up
    /// at open aside), so no writer can bypass the lock, and a write is
    /// either wholly committed or not at all.
    fn write<T>(
        &self,
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let _w = write_lock(&self.writer);
        let tx = self.conn.unchecked_transaction()?;
        let out = f(&tx)?;
        tx.commit()?;
        Ok(out)
    }
}

fn hash32(v: Vec<u8>) -> Result<Hash, StoreError> {
    v.try_into().map_err(|_| StoreError::Corrupt("hash is not 32 bytes".into()))
}

/// Page cache of the ingest connection (KiB). Its commits append leaves
/// in sequence order and update a few device rows; 64 MiB was needed while
/// the digest index took inserts at random places (schema version 2,
/// bench/RESULTS.md), and is not since.
pub const INGEST_CACHE_KIB: i64 = 8 * 1024;
/// Page cache of each of the proof service's read connections (KiB); the
/// operating system's page cache serves what they miss.
pub const PROOFS_CACHE_KIB: i64 = 8 * 1024;

impl Store {
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        let mut conn = Connection::open(data_dir.join(STORE_FILE))?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        // The schema's version, in the file's header (`PRAGMA user_version`):
        // 0 is a store from before versions were recorded, whose schema is
        // version 1; an older version gains the tables `SCHEMA` creates
        // and, before version 3, its digest index is rebuilt as runs; a
        // newer version is refused rather than misread (an older build
        // would take a pruned batch for a damaged one). One immediate
        // transaction: a second connection opening meanwhile waits, then
        // finds the upgrade done.
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        tx.execute_batch(SCHEMA)?;
        let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        match version {
            0..=2 => {
                digests::upgrade_to_runs(&tx)?;
                tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
            }
            SCHEMA_VERSION => {}
            v => {
                return Err(StoreError::Corrupt(format!(
                    "schema version {v}; this build reads version {SCHEMA_VERSION} (a newer mqtt-notary wrote it?)"
                )))
            }
        }
        tx.commit()?;
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
}

/// Stores built as the pipeline builds them, for tests.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use notary_proof::tree;
    use notary_proof::{BatchRecord, BatchTree, LeafRecord};

    /// The payload of leaf `seq` in [`persist_leaves`].
    pub fn payload(seq: u64) -> [u8; 8] {
        seq.to_be_bytes()
    }

    pub fn digest(seq: u64) -> Hash {
        *blake3::hash(&payload(seq)).as_bytes()
    }

    /// Leaves `from..from + n` (payload [`payload`]), persisted, with
    /// their leaf hashes.
    pub fn persist_leaves(store: &mut Store, from: u64, n: u64) -> Vec<Hash> {
        persist_payloads(store, from, &(from..from + n).map(payload).collect::<Vec<_>>())
    }

    /// Leaves from `from` on with these payloads, persisted, with their
    /// leaf hashes.
    pub fn persist_payloads<P: AsRef<[u8]>>(store: &mut Store, from: u64, payloads: &[P]) -> Vec<Hash> {
        let leaves: Vec<StoredLeaf> = payloads
            .iter()
            .zip(from..)
            .map(|(p, s)| {
                let rec = LeafRecord::broker_received(s, s, "t", p.as_ref());
                StoredLeaf { seq: s, digest: rec.payload_digest, record: rec.encode().expect("encodes") }
            })
            .collect();
        store.append_leaves(&leaves).expect("append");
        leaves.iter().map(|l| notary_proof::hash::leaf_hash(&l.record)).collect()
    }

    /// Seals the stored leaves `first_seq..first_seq + hashes.len()`
    /// (leaf hashes `hashes`) as batch `number`, as the sealer does, with
    /// their run of the digest index; returns the record.
    pub fn seal(store: &mut Store, number: u64, first_seq: u64, hashes: &[Hash]) -> BatchRecord {
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
        let end = first_seq + hashes.len() as u64;
        let digests: Vec<(Hash, u64)> =
            store.leaves_in(first_seq, end).expect("leaves").iter().map(|l| (l.digest, l.seq)).collect();
        store.seal(&[sealed], &digests).expect("seal");
        batch
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{digest, persist_leaves, persist_payloads, seal};
    use super::*;
    use log::decode_batch;
    use notary_proof::{BatchRecord, BatchTree, LeafRecord};

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

            let (seq, back): (U64, Vec<u8>) = store
                .conn
                .query_row(
                    "SELECT seq, record FROM leaves WHERE digest = ?1",
                    [&leaf.payload_digest[..]],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .expect("the leaf");
            assert_eq!(seq.0, v);
            assert_eq!(back, record);
            let decoded = LeafRecord::decode(&back).expect("decodes");
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
                store.seal(&[sealed], &[]).expect("seal");
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

    /// What a lookup of `d` finds: the sequence numbers of its leaves
    /// (sealed, and `unsealed`), and the batch of the newest pruned one.
    fn lookup(store: &Store, d: &Hash, unsealed: &[u64], limit: usize) -> (Vec<u64>, Option<u64>) {
        lookup_with(&RunCache::default(), store, d, unsealed, limit)
    }

    /// [`lookup`] through `cache`, as the proof service looks up.
    fn lookup_with(
        cache: &RunCache,
        store: &Store,
        d: &Hash,
        unsealed: &[u64],
        limit: usize,
    ) -> (Vec<u64>, Option<u64>) {
        let runs = cache.runs(store).expect("runs");
        let hits = store.find_digest(d, &runs, unsealed, limit).expect("lookup");
        let batch = hits.pruned_seq.map(|s| store.batch_of(s).expect("batch").expect("sealed").number);
        (hits.leaves.iter().map(|l| l.seq).collect(), batch)
    }

    fn step_index_until_idle(store: &Store) {
        while store.index_step().expect("index step") != IndexWork::Idle {}
    }

    fn index_rows(store: &Store) -> i64 {
        store.conn.query_row("SELECT COUNT(*) FROM digest_index", [], |r| r.get(0)).expect("count")
    }

    /// Every leaf is found by its digest, in sequence order, whether its
    /// run is fresh from a seal or merged, and whether it is sealed at all;
    /// a merge cut short by a crash leaves nothing behind.
    #[test]
    fn the_digest_index_finds_every_leaf_across_runs_merges_and_the_unsealed_tail() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut store = Store::open(dir.path()).expect("store");
        // Every third payload is "ON": one digest in every run.
        let payload = |s: u64| if s.is_multiple_of(3) { b"ON".to_vec() } else { s.to_be_bytes().to_vec() };
        for b in 0..20u64 {
            let hashes =
                persist_payloads(&mut store, b * 10, &(b * 10..b * 10 + 10).map(payload).collect::<Vec<_>>());
            seal(&mut store, b, b * 10, &hashes);
        }
        persist_payloads(&mut store, 200, &(200..205).map(payload).collect::<Vec<_>>());
        let on = *blake3::hash(b"ON").as_bytes();
        let all_on: Vec<u64> = (0..205u64).filter(|s| s.is_multiple_of(3)).collect();
        let unsealed: Vec<u64> = (200..205u64).filter(|s| s.is_multiple_of(3)).collect();
        // One cache throughout, as the proof service keeps it: it must
        // notice every change of the visible runs.
        let cache = RunCache::default();
        let check = |store: &Store| {
            let lookup = |d: &Hash, unsealed: &[u64], limit| lookup_with(&cache, store, d, unsealed, limit);
            assert_eq!(lookup(&on, &unsealed, 1000).0, all_on);
            assert_eq!(lookup(&on, &unsealed, 5).0, all_on[..5], "the first ones, in order");
            for s in [1, 77, 199] {
                assert_eq!(lookup(&digest(s), &[], 10), (vec![s], None), "leaf {s}");
            }
            assert_eq!(lookup(&digest(201), &[], 10), (vec![], None), "unsealed: not in a run");
            assert_eq!(lookup(&[7; 32], &[], 10), (vec![], None), "unknown");
        };
        assert_eq!(cache.runs(&store).expect("runs").len(), 20, "one run per seal");
        check(&store);
        // The first merge, by halves: looked up while its run is written
        // and not yet visible, and again once it is switched in.
        let written = store.write_merge(0).expect("merge written");
        check(&store);
        store.switch_merge(written).expect("merge switched in");
        check(&store);
        // Step by step, checking between steps: while a merge is being
        // written, once it is switched in, while the runs it replaced are
        // deleted.
        let mut merges = 0;
        loop {
            match store.index_step().expect("index step") {
                IndexWork::Idle => break,
                IndexWork::Merged => merges += 1,
                IndexWork::Deleted => {}
            }
            check(&store);
        }
        assert_eq!(merges, 1, "the second merge");
        assert_eq!(store.index_runs().expect("runs"), 6, "two merged runs of 8, and 4 fresh ones");
        assert_eq!(cache.runs(&store).expect("runs").len(), 6, "the cache sees the merge");
        assert_eq!(index_rows(&store), 200, "the merged runs are deleted");

        // A crash in the middle of a merge: a half-written run.
        store
            .write(|tx| {
                let id = digests::new_run_for_test(tx)?;
                tx.execute("INSERT INTO digest_index (run, prefix, seq) VALUES (?1, 1, 1)", [id])?;
                Ok(())
            })
            .expect("half a merge");
        store.abandon_merges().expect("abandon");
        step_index_until_idle(&store);
        assert_eq!(index_rows(&store), 200);
        check(&store);
    }

    /// Opening a store of schema version 2 replaces its digest B-tree
    /// index by runs over the sealed leaves.
    #[test]
    fn a_version_2_store_is_indexed_in_runs_when_opened() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut store = Store::open(dir.path()).expect("store");
        for b in 0..3u64 {
            let hashes = persist_leaves(&mut store, b * 100, 100);
            seal(&mut store, b, b * 100, &hashes);
        }
        persist_leaves(&mut store, 300, 5);
        store
            .conn
            .execute_batch(
                "DELETE FROM digest_index; DELETE FROM digest_runs; DELETE FROM digest_filters;
                 CREATE INDEX leaves_by_digest ON leaves(digest); PRAGMA user_version = 2;",
            )
            .expect("as version 2 left it");
        drop(store);
        let store = Store::open(dir.path()).expect("upgraded");
        let version: i64 = store.conn.query_row("PRAGMA user_version", [], |r| r.get(0)).expect("version");
        assert_eq!(version, SCHEMA_VERSION);
        let index: i64 = store
            .conn
            .query_row("SELECT COUNT(*) FROM sqlite_master WHERE name = 'leaves_by_digest'", [], |r| r.get(0))
            .expect("schema");
        assert_eq!(index, 0, "the B-tree index is gone");
        for s in [0, 150, 299] {
            assert_eq!(lookup(&store, &digest(s), &[], 10).0, vec![s]);
        }
        assert_eq!(index_rows(&store), 300, "unsealed leaves are indexed in memory, not in runs");
    }

    /// Retention deletes a batch's leaves but keeps what proofs need:
    /// registry leaves (with their paths), batch records, log nodes and the
    /// index runs naming the batch; sequence numbers never go back.
    #[test]
    fn pruning_keeps_the_log_and_registry_leaves_and_names_the_batch() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut store = Store::open(dir.path()).expect("store");
        let sizes = [100u64, 64, 10];
        let (mut seq, mut batches) = (0, Vec::new());
        for (number, &size) in sizes.iter().enumerate() {
            let hashes = persist_leaves(&mut store, seq, size);
            batches.push(seal(&mut store, number as u64, seq, &hashes));
            seq += size;
        }
        store
            .conn
            .execute("INSERT INTO registry_events (seq, device, action) VALUES (70, 'd', 'enrol')", [])
            .expect("a registry leaf");
        let registry_path = store.batch_path(&batches[0], 70).expect("path");
        let consistency = store.log_consistency(1, 3).expect("consistency");
        let step = store.prune_step(&batches[0], 0).expect("prune");
        assert_eq!(step, PruneStep { leaves: 99, rejections: 0, runs_dropped: 0, batch_done: true });
        assert_eq!(lookup(&store, &digest(5), &[], 10), (vec![], Some(0)), "pruned, in batch 0");
        assert_eq!(lookup(&store, &digest(150), &[], 10), (vec![150], None), "batch 1 is held");
        assert_eq!(store.batch_path(&batches[0], 70).expect("registry leaf path"), registry_path);
        assert!(matches!(store.batch_path(&batches[0], 5), Err(StoreError::Pruned { batch: 0 })));
        assert_eq!(store.batch_path(&batches[1], 3).expect("held").len(), 6);
        assert_eq!(store.log_consistency(1, 3).expect("consistency"), consistency);
        assert!(store.prune_step(&batches[2], 0).is_err(), "batches are pruned in order");
        // 10 messages held: batch 0's run, wholly older than the 10 newest
        // pruned messages, is dropped.
        let step = store.prune_step(&batches[1], 0).expect("prune");
        assert_eq!(step.runs_dropped, 1);
        assert_eq!(lookup(&store, &digest(5), &[], 10), (vec![], None), "no longer known");
        assert_eq!(lookup(&store, &digest(150), &[], 10), (vec![], Some(1)));
        store.prune_step(&batches[2], 0).expect("prune");
        assert_eq!(store.pruned().expect("state").batches, 3);
        assert_eq!(store.next_seq().expect("next"), 174, "sequence numbers never go back");
        assert_eq!(store.leaf(70).expect("read").map(|l| l.seq), Some(70));
        // Nothing is held now: every run goes.
        step_index_until_idle(&store);
        assert_eq!(index_rows(&store), 0);
        assert_eq!(lookup(&store, &digest(170), &[], 10), (vec![], None));
    }
}
