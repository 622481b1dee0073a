//! The pipeline in-process: intake → ingest → sealer → ledger, with a real
//! store and a real local ledger on disk, and a fault-injecting anchor
//! wrapped around that ledger. It fails "not saved" (nothing reached the
//! ledger) and "failed but saved" (the ledger recorded the checkpoint, the
//! answer was lost): either way every checkpoint ends up anchored exactly
//! once, every message provable, and `/healthz`'s view reports the outage
//! while it lasts.

use notary_anchor::{Anchor, AnchorError, LocalLedger};
use notary_plugin::health::Part;
use notary_plugin::proofs::ProofAnswer;
use notary_plugin::source::{Message, Outbox, Sink};
use notary_plugin::{BatchPolicy, DevicePolicy, Pipeline, PipelineConfig, Shutdown};
use notary_proof::{NoteSigner, Receipt};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

const OK: u8 = 0;
const NOT_SAVED: u8 = 1;
const FAILED_BUT_SAVED: u8 = 2;

/// The real local ledger, with faults injected around it.
struct Faulty {
    ledger: LocalLedger,
    mode: AtomicU8,
    calls: AtomicUsize,
}

impl Anchor for Faulty {
    fn name(&self) -> &str {
        "local"
    }

    fn anchor(&self, note: &str, now_ms: u64) -> Result<Receipt, AnchorError> {
        self.calls.fetch_add(1, SeqCst);
        match self.mode.load(SeqCst) {
            NOT_SAVED => Err(AnchorError::Transient("injected: the ledger is unreachable".into())),
            FAILED_BUT_SAVED => {
                self.ledger.anchor(note, now_ms)?;
                Err(AnchorError::Transient("injected: the answer was lost after the ledger saved it".into()))
            }
            _ => self.ledger.anchor(note, now_ms),
        }
    }
}

struct NoOutbox;

impl Outbox for NoOutbox {
    fn publish(&self, _topic: &str, _payload: Vec<u8>, _retain: bool) -> bool {
        true
    }
}

fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Small batches, sealed within 20 ms; problems reported at once.
fn config(dir: &std::path::Path) -> PipelineConfig {
    PipelineConfig {
        data_dir: dir.to_owned(),
        policy: BatchPolicy { max_batch_size: 4, max_batch_age_ms: 20 },
        devices: DevicePolicy::default(),
        evm: None,
        answer_only_holders: false,
        stall_ms: 0,
    }
}

fn message(i: usize) -> Message {
    Message { topic: "t/pipeline".into(), payload: format!("message {i}").into_bytes(), received_at_ms: 1 }
}

fn digest(i: usize) -> [u8; 32] {
    *blake3::hash(format!("message {i}").as_bytes()).as_bytes()
}

#[test]
fn anchoring_faults_lose_nothing_and_anchor_each_checkpoint_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let anchor = Arc::new(Faulty {
        ledger: LocalLedger::open(&dir.path().join("ledger.sqlite")).expect("ledger"),
        mode: AtomicU8::new(NOT_SAVED),
        calls: AtomicUsize::new(0),
    });
    let cfg = config(dir.path());
    let signer = NoteSigner::new("test/pipeline", [9; 32]).expect("signer");
    let (intake, inlets) = notary_plugin::inlets(64);
    let pipeline =
        Pipeline::start(&cfg, intake.clone(), inlets, Arc::new(NoOutbox), signer, vec![anchor.clone()])
            .expect("pipeline starts");
    let health = |p: Part| pipeline.metrics.health.problems(0).iter().any(|(q, _)| *q == p);

    for i in 0..10 {
        intake.deliver(message(i)).expect("delivered");
    }
    // Not saved: sealed and committed, so pending; the outage is reported.
    wait_for("the anchoring outage to be reported", || health(Part::Anchor).then_some(()));
    assert!(matches!(pipeline.proofs.lookup(&digest(0)).expect("lookup"), ProofAnswer::Pending));

    // Failed but saved: the ledger holds the checkpoints, the sealer does not know.
    anchor.mode.store(FAILED_BUT_SAVED, SeqCst);
    let calls = anchor.calls.load(SeqCst);
    wait_for("more anchoring attempts", || (anchor.calls.load(SeqCst) > calls + 1).then_some(()));
    assert!(health(Part::Anchor));

    anchor.mode.store(OK, SeqCst);
    for i in 10..12 {
        intake.deliver(message(i)).expect("delivered");
    }
    for i in 0..12 {
        wait_for("every message to be provable", || {
            matches!(pipeline.proofs.lookup(&digest(i)), Ok(ProofAnswer::Ready(_))).then_some(())
        });
    }
    wait_for("the outage to clear", || (!health(Part::Anchor)).then_some(()));

    let log_size = pipeline.proofs.latest_checkpoint().expect("checkpoint").map_or(0, |(s, _)| s);
    assert_eq!(pipeline.shutdown(Duration::from_secs(30)), Shutdown::Clean);
    // Each checkpoint in the ledger exactly once, the chain intact.
    let ledger = LocalLedger::open(&dir.path().join("ledger.sqlite")).expect("ledger");
    let verifier = NoteSigner::new("test/pipeline", [9; 32]).expect("signer").verifier();
    let mut seen = Vec::new();
    ledger
        .verify(&verifier, |c| {
            seen.push(c.size);
            Ok(())
        })
        .expect("the ledger verifies");
    let mut unique = seen.clone();
    unique.dedup();
    assert_eq!(seen, unique, "no checkpoint anchored twice");
    assert_eq!(seen.last().copied(), Some(log_size), "the newest checkpoint is anchored");
}

#[test]
fn a_stopped_pipeline_thread_is_reported_and_shutdown_is_bounded() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cfg = config(dir.path());
    let ledger = Arc::new(LocalLedger::open(&dir.path().join("ledger.sqlite")).expect("ledger"));
    let signer = NoteSigner::new("test/pipeline", [9; 32]).expect("signer");
    let (intake, inlets) = notary_plugin::inlets(64);
    let pipeline = Pipeline::start(&cfg, intake.clone(), inlets, Arc::new(NoOutbox), signer, vec![ledger])
        .expect("pipeline starts");
    intake.deliver(message(0)).expect("delivered");
    wait_for("the message to be provable", || {
        matches!(pipeline.proofs.lookup(&digest(0)), Ok(ProofAnswer::Ready(_))).then_some(())
    });
    assert!(pipeline.metrics.health.problems(0).is_empty());
    // The source's link closing is a stopped part: reported at once.
    intake.stopped("the test closed the link");
    let problems = pipeline.metrics.health.problems(0);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].0, Part::Source);
    assert_eq!(pipeline.shutdown(Duration::from_secs(30)), Shutdown::Clean);
}
