//! The proof service: builds proof bundles for a payload digest from the
//! store. Shared by the MQTT and HTTP front ends; read-only.

use crate::store::{Rejection, RunCache, Store, StoreError, Unsealed};
use notary_proof::{
    BatchRecord, KeyEvidence, LaterAnchor, LeafProof, LeafRecord, ProofBundle, BUNDLE_FORMAT,
};
use std::path::Path;
use std::sync::{Condvar, Mutex};

/// Most bundles in one answer: a payload such as `ON` may be notarized
/// millions of times, and one request must not build them all.
pub const MAX_BUNDLES: usize = 100;

pub enum ProofAnswer {
    /// One bundle per time the payload was notarized and anchored.
    Ready(Vec<ProofBundle>),
    /// Known, but its batch is not sealed or not anchored yet.
    Pending,
    /// Never notarized: received and rejected, for these reasons.
    Rejected(Vec<Rejection>),
    /// No leaf has this digest.
    Unknown,
    /// Notarized, and deleted since by retention; `batch` held it (the
    /// newest batch that did, when the payload was notarized more than once).
    Pruned { batch: u64 },
}

pub struct ProofService {
    readers: Readers,
    /// The digest index: unsealed leaves in memory, the runs' filters.
    unsealed: std::sync::Arc<Unsealed>,
    runs: RunCache,
    /// An EVM chain is configured: bundles not yet covered by an EVM anchor
    /// list `evm` as pending.
    evm: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ProofError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("internal lock poisoned")]
    Poisoned,
    #[error("{0}")]
    BadRange(String),
}

impl ProofError {
    /// The stable error code answered over HTTP and MQTT: `store_damaged`
    /// when the stored data does not check out (a batch that does not match
    /// its root, a missing node), else `internal`.
    pub fn code(&self) -> &'static str {
        match self {
            ProofError::Store(StoreError::Corrupt(_)) => "store_damaged",
            ProofError::Store(StoreError::Pruned { .. }) => "pruned",
            ProofError::Store(e) if e.fault() == crate::store::Fault::Damaged => "store_damaged",
            ProofError::BadRange(_) => "bad_request",
            _ => "internal",
        }
    }
}

impl ProofService {
    /// The proof service of a running pipeline (`writer`: its write lock),
    /// with `readers` read connections (at least one).
    pub fn open(
        data_dir: &Path,
        evm: bool,
        writer: crate::store::WriteLock,
        readers: usize,
        unsealed: std::sync::Arc<Unsealed>,
    ) -> Result<Self, StoreError> {
        let idle = (0..readers.max(1))
            .map(|_| Store::open_pipeline(data_dir, Some(crate::store::PROOFS_CACHE_KIB), writer.clone()))
            .collect::<Result<_, _>>()?;
        Ok(ProofService {
            readers: Readers { idle: Mutex::new(idle), freed: Condvar::new() },
            unsealed,
            runs: RunCache::default(),
            evm,
        })
    }

    /// Runs `f` on an idle read connection, inside one read transaction: it
    /// sees one snapshot of the store, whatever ingest, the sealer or
    /// retention commit meanwhile.
    fn read<T>(&self, f: impl FnOnce(&Store) -> Result<T, ProofError>) -> Result<T, ProofError> {
        let reader = self.readers.take()?;
        reader.store()?.snapshot(|s| f(s))
    }

    pub fn lookup(&self, digest: &[u8; 32]) -> Result<ProofAnswer, ProofError> {
        // Before the snapshot: a leaf the sealer takes out of `unsealed`
        // after this is in a run the snapshot sees (docs: ARCHITECTURE.md).
        let unsealed = self.unsealed.seqs(digest);
        self.read(|store| self.lookup_in(store, digest, &unsealed))
    }

    fn lookup_in(
        &self,
        store: &Store,
        digest: &[u8; 32],
        unsealed: &[u64],
    ) -> Result<ProofAnswer, ProofError> {
        let runs = self.runs.runs(store)?;
        let hits = store.find_digest(digest, &runs, unsealed, MAX_BUNDLES)?;
        let leaves = hits.leaves;
        if leaves.is_empty() {
            let rejections = store.rejections_by_digest(digest, MAX_BUNDLES)?;
            if !rejections.is_empty() {
                return Ok(ProofAnswer::Rejected(rejections));
            }
            let pruned = match hits.pruned_seq {
                Some(seq) => store.batch_of(seq)?.map(|b| b.number),
                None => store.pruned_batch(digest)?,
            };
            return Ok(match pruned {
                Some(batch) => ProofAnswer::Pruned { batch },
                None => ProofAnswer::Unknown,
            });
        }
        let mut bundles = Vec::new();
        let mut pruned = None;
        for leaf in leaves {
            let Some(batch) = store.batch_of(leaf.seq)? else { continue };
            let size = batch.number + 1;
            let mut receipts = store.receipts(size)?;
            let Some(checkpoint) = store.checkpoint(size)? else { continue };
            if receipts.is_empty() {
                continue;
            }
            let mut later_anchors = Vec::new();
            let mut pending_ledgers = Vec::new();
            match store.evm_covering(size)? {
                Some((at, receipt)) if at == size => receipts.push(receipt),
                Some((at, receipt)) => later_anchors.push(LaterAnchor {
                    checkpoint: store
                        .checkpoint(at)?
                        .ok_or_else(|| StoreError::Corrupt(format!("no checkpoint of size {at}")))?,
                    consistency: store.log_consistency(size, at)?,
                    receipts: vec![receipt],
                }),
                None if self.evm => pending_ledgers.push("evm".to_owned()),
                None => {}
            }
            let device_key = key_evidence(store, &leaf.record, &batch)?;
            let p = match leaf_proof(store, leaf.seq, leaf.record, &batch, size) {
                // Its batch is being pruned (the leaf is among the next to
                // go): no path can be built any more.
                Err(StoreError::Pruned { batch }) => {
                    pruned = Some(batch);
                    continue;
                }
                p => p?,
            };
            bundles.push(ProofBundle {
                format: BUNDLE_FORMAT.to_owned(),
                leaf: p.leaf,
                leaf_index: p.leaf_index,
                batch_path: p.batch_path,
                batch: p.batch,
                log_path: p.log_path,
                checkpoint,
                receipts,
                later_anchors,
                pending_ledgers,
                device_key,
            });
        }
        Ok(match pruned {
            _ if !bundles.is_empty() => ProofAnswer::Ready(bundles),
            Some(batch) => ProofAnswer::Pruned { batch },
            None => ProofAnswer::Pending,
        })
    }

    /// The newest signed checkpoint note.
    pub fn latest_checkpoint(&self) -> Result<Option<(u64, String)>, ProofError> {
        self.read(|store| Ok(store.latest_checkpoint()?))
    }

    /// RFC 9162 consistency proof between two log sizes, with both notes.
    pub fn consistency(&self, from: u64, to: u64) -> Result<Consistency, ProofError> {
        self.read(|store| Self::consistency_in(store, from, to))
    }

    fn consistency_in(store: &Store, from: u64, to: u64) -> Result<Consistency, ProofError> {
        let size = store.log_size()?;
        if from == 0 || from > to || to > size {
            return Err(ProofError::BadRange(format!("need 1 <= from <= to <= {size} (the log size)")));
        }
        let note = |s| -> Result<String, ProofError> {
            store.checkpoint(s)?.ok_or_else(|| StoreError::Corrupt(format!("no checkpoint {s}")).into())
        };
        Ok(Consistency {
            from,
            to,
            from_checkpoint: note(from)?,
            to_checkpoint: note(to)?,
            proof: store.log_consistency(from, to)?,
        })
    }
}

/// The proof service's read connections: a lookup takes an idle one, or
/// waits for one to be put back.
struct Readers {
    idle: Mutex<Vec<Store>>,
    freed: Condvar,
}

impl Readers {
    fn take(&self) -> Result<Reader<'_>, ProofError> {
        let mut idle = self.idle.lock().map_err(|_| ProofError::Poisoned)?;
        loop {
            if let Some(store) = idle.pop() {
                return Ok(Reader { pool: self, store: Some(store) });
            }
            idle = self.freed.wait(idle).map_err(|_| ProofError::Poisoned)?;
        }
    }
}

/// A read connection taken from [`Readers`]; put back when dropped.
struct Reader<'a> {
    pool: &'a Readers,
    store: Option<Store>,
}

impl Reader<'_> {
    fn store(&self) -> Result<&Store, ProofError> {
        self.store.as_ref().ok_or(ProofError::Poisoned)
    }
}

impl Drop for Reader<'_> {
    fn drop(&mut self) {
        if let (Some(store), Ok(mut idle)) = (self.store.take(), self.pool.idle.lock()) {
            idle.push(store);
            self.pool.freed.notify_one();
        }
    }
}

/// Proves the leaf at `seq` (in `batch`) into the log at `size`.
fn leaf_proof(
    store: &Store,
    seq: u64,
    record: Vec<u8>,
    batch: &BatchRecord,
    size: u64,
) -> Result<LeafProof, StoreError> {
    let leaf_index = seq - batch.first_seq;
    Ok(LeafProof {
        leaf: record,
        leaf_index,
        batch_path: store.batch_path(batch, leaf_index)?,
        batch: batch.encode(),
        log_path: store.log_inclusion(batch.number, size)?,
    })
}

/// For a device-signed leaf: the registry leaf of its key and the device's
/// next registry event, if the same checkpoint (the one of `batch`) holds it.
fn key_evidence(
    store: &Store,
    record: &[u8],
    batch: &BatchRecord,
) -> Result<Option<KeyEvidence>, StoreError> {
    let corrupt = |m: String| StoreError::Corrupt(m);
    let leaf = LeafRecord::decode(record).map_err(|e| corrupt(format!("leaf record: {e}")))?;
    let Some(fields) = leaf.device_fields() else { return Ok(None) };
    let size = batch.number + 1;
    let end_seq = batch.first_seq + batch.size;
    let prove = |seq: u64| -> Result<LeafProof, StoreError> {
        let l = store.leaf(seq)?.ok_or_else(|| corrupt(format!("registry leaf {seq} is missing")))?;
        let b = store.batch_of(seq)?.ok_or_else(|| corrupt(format!("registry leaf {seq} is not sealed")))?;
        leaf_proof(store, seq, l.record, &b, size)
    };
    let superseded_by = match store.registry_successor(&fields.device_id, fields.key_seq, end_seq)? {
        Some(seq) => Some(prove(seq)?),
        None => None,
    };
    Ok(Some(KeyEvidence { enrolment: prove(fields.key_seq)?, superseded_by }))
}

/// A consistency proof between two signed checkpoints of the log.
#[derive(Debug, serde::Serialize)]
pub struct Consistency {
    pub from: u64,
    pub to: u64,
    pub from_checkpoint: String,
    pub to_checkpoint: String,
    #[serde(serialize_with = "b64_hashes")]
    pub proof: Vec<notary_proof::Hash>,
}

fn b64_hashes<S: serde::Serializer>(v: &[notary_proof::Hash], s: S) -> Result<S::Ok, S::Error> {
    use base64::Engine as _;
    s.collect_seq(v.iter().map(|h| base64::engine::general_purpose::STANDARD.encode(h)))
}
