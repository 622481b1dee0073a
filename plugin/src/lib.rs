//! The mqtt-notary pipeline, attached to a broker through a source:
//!
//! ```text
//! source ──Sink──▶ ingest ──▶ sealer ──▶ anchors
//!    │  (bounded)   (group      (batch, log,     (ledgers)
//!    │              commit)      checkpoint)
//!    └── $notary/proof/request ──▶ proof workers ──Outbox──▶ the asker
//!                           HTTP ──▶ proof service ◀── store (SQLite)
//! ```
//!
//! See ARCHITECTURE.md for the invariants each stage keeps.
#![forbid(unsafe_code)]

pub mod acl;
pub mod auth;
pub mod batcher;
pub mod embedded;
pub mod evm_anchor;
pub mod health;
pub mod http;
mod index;
mod ingest;
pub mod keys;
pub mod metrics;
pub mod mqtt_api;
pub mod proofs;
pub mod reason;
pub mod registry;
pub mod retention;
mod sealer;
pub mod sidecar;
pub mod source;
pub mod store;
pub mod tls;
pub mod topics;

pub use batcher::BatchPolicy;
pub use ingest::Intake;
pub use registry::DevicePolicy;
pub use topics::Topics;

use health::Part;
use metrics::Metrics;
use notary_anchor::Anchor;
use notary_proof::NoteSigner;
use proofs::ProofService;
use source::Outbox;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use store::{Store, StoreError};

/// Read connections of the proof service, and threads answering MQTT proof
/// requests: one per core, from 2 to 16. Lookups on different connections
/// run in parallel (WAL readers never wait for each other or the writer).
fn proof_readers() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(2, 16)
}
/// MQTT proof requests waiting for a worker.
const PROOF_QUEUE: usize = 1024;

#[derive(Debug, Clone)]
pub struct PipelineConfig {
    pub data_dir: PathBuf,
    pub policy: BatchPolicy,
    pub devices: DevicePolicy,
    /// Anchor on an EVM chain too (besides the ledgers given to `start`).
    pub evm: Option<evm_anchor::EvmAnchorConfig>,
    /// Answer MQTT proof requests only for messages this log holds (found,
    /// pending or rejected), staying silent otherwise: for sidecars that
    /// share a subscription, where another member holds the message.
    pub answer_only_holders: bool,
    /// How long a failure or a stalled queue lasts before `/healthz`
    /// reports it.
    pub stall_ms: u64,
    /// When old messages are deleted (`[retention]`); unset keeps all.
    pub retention: retention::RetentionPolicy,
}

/// The channels a pipeline reads; created before the source so the source
/// can be handed the [`Intake`] and return its [`Outbox`].
pub struct Inlets {
    ingest_rx: Receiver<ingest::IngestItem>,
    proof_rx: Receiver<source::Message>,
    metrics: Arc<Metrics>,
    topics: Topics,
}

impl Inlets {
    /// The pipeline's counters, for a source that reports its own.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }
}

/// The pipeline's inlets, for the notary's topic names `topics`.
pub fn inlets(queue_capacity: usize, topics: Topics) -> (Arc<Intake>, Inlets) {
    let metrics = Arc::new(Metrics::default());
    let (ingest_tx, ingest_rx) = sync_channel(queue_capacity.max(1));
    let (proof_tx, proof_rx) = sync_channel(PROOF_QUEUE);
    let intake = Arc::new(Intake::new(ingest_tx, proof_tx, metrics.clone(), topics));
    (intake, Inlets { ingest_rx, proof_rx, metrics, topics })
}

/// A running pipeline.
pub struct Pipeline {
    pub proofs: Arc<ProofService>,
    pub metrics: Arc<Metrics>,
    intake: Arc<Intake>,
    threads: Vec<JoinHandle<()>>,
    /// Dropped at shutdown to stop the EVM anchorer.
    evm_stop: Option<SyncSender<()>>,
    evm_thread: Option<JoinHandle<()>>,
    /// Dropped at shutdown to stop the pruner.
    /// Threads that work until told to stop (the pruner, the indexer):
    /// stopped after the pipeline's stages have finished.
    background: Vec<(SyncSender<()>, JoinHandle<()>)>,
    /// Dropped at shutdown, after the writers, to stop the WAL checkpointer.
    wal_stop: Option<SyncSender<()>>,
    wal_thread: Option<JoinHandle<()>>,
    /// Set when shutdown's deadline passes: stages stop retrying.
    give_up: Arc<AtomicBool>,
}

/// How a shutdown ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shutdown {
    /// Everything taken was committed, sealed and the pipeline stopped.
    Clean,
    /// The deadline passed first; `uncommitted` messages were not
    /// committed (each was logged) and some stage may still be stuck.
    Incomplete { uncommitted: u64 },
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot start thread: {0}")]
    Thread(#[from] std::io::Error),
}

impl Pipeline {
    pub fn start(
        cfg: &PipelineConfig,
        intake: Arc<Intake>,
        inlets: Inlets,
        outbox: Arc<dyn Outbox>,
        signer: NoteSigner,
        anchors: Vec<Arc<dyn Anchor>>,
    ) -> Result<Self, StartError> {
        let Inlets { ingest_rx, proof_rx, metrics, topics } = inlets;
        metrics.health.set_stall_ms(cfg.stall_ms);
        let give_up = Arc::new(AtomicBool::new(false));
        let writer = store::WriteLock::default();
        let ingest_store =
            Store::open_pipeline(&cfg.data_dir, Some(store::INGEST_CACHE_KIB), writer.clone())?;
        let next_seq = ingest_store.next_seq()?;
        let ledgers: Vec<String> = anchors.iter().map(|a| a.name().to_owned()).collect();
        let unsealed = Arc::new(store::Unsealed::default());
        let sealer = sealer::Sealer {
            store: Store::open_pipeline(&cfg.data_dir, None, writer.clone())?,
            signer,
            anchors,
            outbox: outbox.clone(),
            checkpoint_topic: topics.checkpoint(),
            policy: cfg.policy,
            metrics: metrics.clone(),
            unsealed: unsealed.clone(),
        };
        let recovered = sealer.recover()?;
        unsealed.add(recovered.iter().map(|l| (l.digest, l.seq)));
        let readers = proof_readers();
        let proofs = Arc::new(ProofService::open(
            &cfg.data_dir,
            cfg.evm.is_some(),
            writer.clone(),
            readers,
            unsealed.clone(),
        )?);
        let (seal_tx, seal_rx): (SyncSender<_>, _) = sync_channel(64);

        let mut threads = Vec::new();
        // Every pipeline thread reports itself stopped to /healthz if it
        // ends (or panics) while the broker is not shutting down.
        let spawn = |name: &str, part: Part, f: Box<dyn FnOnce() + Send>| {
            let m = metrics.clone();
            std::thread::Builder::new().name(name.into()).spawn(move || {
                let _guard = health::StopGuard { metrics: m, part };
                f()
            })
        };
        threads.push(spawn("notary-sealer", Part::Sealer, Box::new(move || sealer.run(seal_rx, recovered)))?);
        let registry = registry::Registry::load(&ingest_store)?;
        let shift = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (commit_tx, commit_rx) = sync_channel(ingest::JUDGED_AHEAD);
        let committer = ingest::Committer {
            writer: ingest::Writer {
                store: ingest_store,
                sealer: seal_tx.clone(),
                metrics: metrics.clone(),
                give_up: give_up.clone(),
                unsealed: unsealed.clone(),
            },
            next_seq,
            outbox: outbox.clone(),
            rejections_topic: topics.rejections(),
            shift: shift.clone(),
        };
        let judge = ingest::Ingest {
            writer: ingest::Writer {
                store: Store::open_pipeline(&cfg.data_dir, None, writer.clone())?,
                sealer: seal_tx,
                metrics: metrics.clone(),
                give_up: give_up.clone(),
                unsealed: unsealed.clone(),
            },
            next_seq,
            registry,
            policy: cfg.devices.clone(),
            committer: commit_tx,
            shift,
        };
        threads.push(spawn("notary-ingest", Part::Ingest, Box::new(move || judge.run(ingest_rx)))?);
        threads.push(spawn("notary-commit", Part::Ingest, Box::new(move || committer.run(commit_rx)))?);
        let proof_rx = Arc::new(Mutex::new(proof_rx));
        for i in 0..readers {
            let (rx, p, o, m) = (proof_rx.clone(), proofs.clone(), outbox.clone(), metrics.clone());
            let holders_only = cfg.answer_only_holders;
            threads.push(spawn(
                &format!("notary-proofs-{i}"),
                Part::Proofs,
                Box::new(move || mqtt_api::serve(rx, p, o, m, topics, holders_only)),
            )?);
        }
        let (evm_stop, evm_thread) = match &cfg.evm {
            Some(evm) => {
                let anchorer = evm_anchor::EvmAnchorer {
                    store: Store::open_pipeline(&cfg.data_dir, None, writer.clone())?,
                    cfg: evm.clone(),
                    metrics: metrics.clone(),
                };
                let (stop_tx, stop_rx) = sync_channel(1);
                (
                    Some(stop_tx),
                    Some(spawn("notary-evm", Part::Evm, Box::new(move || anchorer.run(stop_rx)))?),
                )
            }
            None => (None, None),
        };
        let mut background = Vec::new();
        if cfg.retention.is_set() {
            let pruner = retention::Pruner {
                store: Store::open_pipeline(&cfg.data_dir, None, writer.clone())?,
                policy: cfg.retention,
                ledgers,
                evm: cfg.evm.is_some(),
                metrics: metrics.clone(),
            };
            let (stop_tx, stop_rx) = sync_channel(1);
            background.push((
                stop_tx,
                spawn("notary-prune", Part::Retention, Box::new(move || pruner.run(stop_rx)))?,
            ));
        }
        let indexer = index::Indexer {
            store: Store::open_pipeline(&cfg.data_dir, None, writer.clone())?,
            unsealed,
            metrics: metrics.clone(),
        };
        let (stop_tx, stop_rx) = sync_channel(1);
        background
            .push((stop_tx, spawn("notary-index", Part::Index, Box::new(move || indexer.run(stop_rx)))?));
        let wal_store = Store::open_pipeline(&cfg.data_dir, None, writer)?;
        let (wal_stop, wal_rx) = sync_channel(1);
        let wal_thread = spawn("notary-wal", Part::Sealer, Box::new(move || checkpoints(wal_store, wal_rx)))?;
        Ok(Pipeline {
            proofs,
            metrics,
            intake,
            threads,
            evm_stop,
            evm_thread,
            background,
            wal_stop: Some(wal_stop),
            wal_thread: Some(wal_thread),
            give_up,
        })
    }

    /// Stops taking messages, persists what was taken, seals and anchors the
    /// open batch, and returns when every pipeline thread has finished, or
    /// once `deadline` has passed: then the stages stop retrying (what they
    /// could not commit is logged and counted) and shutdown returns after
    /// at most [`GIVE_UP_GRACE`] more, even if a stage is still blocked in a
    /// call that cannot be interrupted. The EVM anchorer stops between
    /// steps; what it has in flight is in the store and resumes at the next
    /// start.
    pub fn shutdown(self, deadline: Duration) -> Shutdown {
        self.metrics.health.set_stopping();
        self.intake.close();
        let Pipeline {
            metrics,
            threads,
            evm_stop,
            evm_thread,
            background,
            wal_stop,
            wal_thread,
            give_up,
            ..
        } = self;
        let (done_tx, done_rx) = sync_channel::<()>(1);
        let joiner = std::thread::Builder::new().name("notary-stop".into()).spawn(move || {
            for t in threads {
                let _ = t.join();
            }
            drop(evm_stop);
            if let Some(t) = evm_thread {
                let _ = t.join();
            }
            for (stop, t) in background {
                drop(stop);
                let _ = t.join();
            }
            drop(wal_stop);
            if let Some(t) = wal_thread {
                let _ = t.join();
            }
            let _ = done_tx.send(());
        });
        if joiner.is_err() {
            give_up.store(true, Relaxed);
            return Shutdown::Incomplete { uncommitted: queued(&metrics) };
        }
        let before = metrics.messages_uncommitted_total.load(Relaxed);
        if done_rx.recv_timeout(deadline).is_ok() {
            return Shutdown::Clean;
        }
        tracing::error!(
            deadline_ms = deadline.as_millis() as u64,
            "shutdown deadline passed; stages stop retrying"
        );
        give_up.store(true, Relaxed);
        let finished = done_rx.recv_timeout(GIVE_UP_GRACE).is_ok();
        let uncommitted = metrics.messages_uncommitted_total.load(Relaxed) - before;
        let uncommitted = if finished { uncommitted } else { uncommitted.max(queued(&metrics)) };
        if finished && uncommitted == 0 {
            return Shutdown::Clean;
        }
        Shutdown::Incomplete { uncommitted }
    }
}

/// How long shutdown waits, after its deadline, for stages to give up.
pub const GIVE_UP_GRACE: Duration = Duration::from_secs(3);

fn queued(metrics: &Metrics) -> u64 {
    u64::try_from(metrics.queue_depth.load(Relaxed)).unwrap_or(0)
}

/// How often the checkpointer copies the WAL into the database file.
const WAL_CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(100);
/// WAL frames (pages of 4 KiB, 32 MiB) after which the checkpointer
/// copies the rest holding the write lock, so the WAL starts over.
const WAL_RESTART_FRAMES: i64 = 8192;
/// WAL frames (128 MiB) after which it is truncated, waiting for readers.
const WAL_LIMIT_FRAMES: i64 = 32768;

/// Runs passive WAL checkpoints until `stop` closes, then a last one.
/// Pipeline connections never checkpoint on commit; this thread does it
/// beside them, so ingest commits only append to the WAL.
fn checkpoints(store: Store, stop: Receiver<()>) {
    loop {
        let closed = !matches!(stop.recv_timeout(WAL_CHECKPOINT_EVERY), Err(RecvTimeoutError::Timeout));
        // The last one, after the pipeline stopped writing, empties the WAL.
        let (restart, limit) = if closed { (0, 0) } else { (WAL_RESTART_FRAMES, WAL_LIMIT_FRAMES) };
        if let Err(e) = store.checkpoint_wal(restart, limit) {
            tracing::warn!(error = %e, "WAL checkpoint failed; will retry");
        }
        if closed {
            return;
        }
    }
}
