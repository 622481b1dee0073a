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
use notary_plugin::{BatchPolicy, DevicePolicy, Pipeline, PipelineConfig, Shutdown, Topics};
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
        retention: Default::default(),
    }
}

fn message(i: usize) -> Message {
    Message::new("t/pipeline", format!("message {i}").into_bytes(), 1)
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
    let (intake, inlets) = notary_plugin::inlets(64, Topics::CURRENT);
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
    let (intake, inlets) = notary_plugin::inlets(64, Topics::CURRENT);
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

/// `submit` answers each message with what became of it, once committed:
/// the leaf's sequence number, or the rejection's reason. An embedded
/// broker acknowledges and routes only after this answer.
#[test]
fn submitted_messages_are_answered_after_their_commit() {
    use notary_plugin::reason::Reason;
    use notary_plugin::source::Outcome;
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cfg = config(dir.path());
    cfg.devices.require_signature = vec!["signed/#".into()];
    let ledger = Arc::new(LocalLedger::open(&dir.path().join("ledger.sqlite")).expect("ledger"));
    let signer = NoteSigner::new("test/pipeline", [9; 32]).expect("signer");
    let (intake, inlets) = notary_plugin::inlets(64, Topics::CURRENT);
    let pipeline = Pipeline::start(&cfg, intake.clone(), inlets, Arc::new(NoOutbox), signer, vec![ledger])
        .expect("pipeline starts");
    let (tx, rx) = std::sync::mpsc::channel();
    let topics = ["plain/a", "signed/x", "$notary/proof/request", "plain/b"];
    for (i, topic) in topics.into_iter().enumerate() {
        let tx = tx.clone();
        let msg = Message::new(topic, format!("submitted {i}").into_bytes(), 1);
        intake.submit(msg, Box::new(move |o| tx.send((i, o)).expect("answer"))).expect("taken");
    }
    let mut answers: Vec<(usize, Outcome)> =
        (0..topics.len()).map(|_| rx.recv_timeout(Duration::from_secs(60)).expect("answered")).collect();
    answers.sort_by_key(|(i, _)| *i);
    let seq_a = match &answers[0].1 {
        Outcome::Notarized { seq } => *seq,
        other => panic!("plain/a: {other:?}"),
    };
    assert!(
        matches!(&answers[1].1, Outcome::Rejected { reason: Reason::SignatureRequired, .. }),
        "{answers:?}"
    );
    assert_eq!(answers[2].1, Outcome::NotLogged);
    assert_eq!(answers[3].1, Outcome::Notarized { seq: seq_a + 1 }, "leaves are numbered in order");
    // The answer comes after the commit: the leaf is already in the store.
    let digest = *blake3::hash(b"submitted 0").as_bytes();
    assert!(!matches!(pipeline.proofs.lookup(&digest), Ok(ProofAnswer::Unknown)));
    assert_eq!(pipeline.shutdown(Duration::from_secs(30)), Shutdown::Clean);
}

/// A pipeline on a store that refuses, for good, a leaf of payload digest
/// `poison` (an SQLite trigger), and whose committer waits (in a barrier)
/// until the returned gate is dropped.
fn gated_with_poison(
    dir: &std::path::Path,
    poison: [u8; 32],
) -> (Arc<notary_plugin::Intake>, Pipeline, std::sync::mpsc::Sender<()>) {
    notary_plugin::store::Store::open(dir).expect("store");
    let conn = rusqlite::Connection::open(dir.join("notary.sqlite")).expect("open");
    conn.execute_batch(&format!(
        "CREATE TRIGGER poison BEFORE INSERT ON leaves WHEN NEW.digest = X'{}'
         BEGIN SELECT RAISE(ABORT, 'refused by the test'); END;",
        poison.iter().map(|b| format!("{b:02x}")).collect::<String>()
    ))
    .expect("trigger");
    let ledger = Arc::new(LocalLedger::open(&dir.join("ledger.sqlite")).expect("ledger"));
    let signer = NoteSigner::new("test/pipeline", [9; 32]).expect("signer");
    let (intake, inlets) = notary_plugin::inlets(64, Topics::CURRENT);
    let (gate_tx, gate_rx) = std::sync::mpsc::channel::<()>();
    intake
        .after_commit(Box::new(move || {
            let _ = gate_rx.recv();
        }))
        .expect("barrier");
    let pipeline =
        Pipeline::start(&config(dir), intake.clone(), inlets, Arc::new(NoOutbox), signer, vec![ledger])
            .expect("pipeline starts");
    (intake, pipeline, gate_tx)
}

/// A message the store refuses for good is answered as rejected
/// (`unstorable`); the others of its group are answered with the sequence
/// numbers they were renumbered to, without holes.
#[test]
fn a_refused_message_is_answered_unstorable_and_the_rest_renumbered() {
    use notary_plugin::reason::Reason;
    use notary_plugin::source::Outcome;
    let dir = tempfile::tempdir().expect("temp dir");
    // The committer is held until all three are judged: they are
    // committed together, and the store refuses message 1's leaf.
    let (intake, pipeline, gate_tx) = gated_with_poison(dir.path(), digest(1));
    let (tx, rx) = std::sync::mpsc::channel();
    for i in 0..3 {
        let tx = tx.clone();
        intake.submit(message(i), Box::new(move |o| tx.send((i, o)).expect("answer"))).expect("taken");
    }
    drop(gate_tx);
    let mut answers: Vec<(usize, Outcome)> =
        (0..3).map(|_| rx.recv_timeout(Duration::from_secs(60)).expect("answered")).collect();
    answers.sort_by_key(|(i, _)| *i);
    let Outcome::Notarized { seq } = answers[0].1 else { panic!("{answers:?}") };
    assert!(matches!(&answers[1].1, Outcome::Rejected { reason: Reason::Unstorable, .. }), "{answers:?}");
    assert_eq!(answers[2].1, Outcome::Notarized { seq: seq + 1 }, "no hole where the refused one was");
    assert_eq!(pipeline.shutdown(Duration::from_secs(30)), Shutdown::Clean);
}

/// The judge works ahead of the committer: while a commit is held back,
/// later messages still get their verdicts (a QoS 0 publish is delivered on
/// its verdict). When the store then refuses one of the judged leaves, the
/// groups judged meanwhile are renumbered: the log keeps no hole, and the
/// numbering goes on from where the committer really is.
#[test]
fn verdicts_do_not_wait_for_commits_and_a_refused_leaf_leaves_no_hole() {
    use notary_plugin::source::Outcome;
    let dir = tempfile::tempdir().expect("temp dir");
    let (intake, pipeline, gate_tx) = gated_with_poison(dir.path(), digest(0));
    let (tx, rx) = std::sync::mpsc::channel();
    // Message 0 (which the store will refuse) and 1 are judged, one after
    // the other, while nothing can commit.
    for i in 0..2 {
        let tx = tx.clone();
        intake.submit_judged(message(i), Box::new(move |o| tx.send((i, o)).expect("answer"))).expect("taken");
        let (n, verdict) =
            rx.recv_timeout(Duration::from_secs(60)).expect("a verdict while the commit waits");
        assert_eq!((n, verdict), (i, Outcome::Accepted));
    }
    let submit = |i: usize| {
        let tx = tx.clone();
        intake.submit(message(i), Box::new(move |o| tx.send((i, o)).expect("answer"))).expect("taken");
    };
    submit(2);
    drop(gate_tx);
    let seq2 = match rx.recv_timeout(Duration::from_secs(60)).expect("answered") {
        (2, Outcome::Notarized { seq }) => seq,
        other => panic!("message 2: {other:?}"),
    };
    submit(3);
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(60)).expect("answered"),
        (3, Outcome::Notarized { seq: seq2 + 1 })
    );
    assert!(matches!(pipeline.proofs.lookup(&digest(0)), Ok(ProofAnswer::Rejected(_))));
    assert_eq!(pipeline.shutdown(Duration::from_secs(30)), Shutdown::Clean);

    let store = notary_plugin::store::Store::open(dir.path()).expect("store");
    let leaves = store.leaves_from(0).expect("leaves");
    let seqs: Vec<u64> = leaves.iter().map(|l| l.seq).collect();
    let first = seqs.first().copied().expect("leaves");
    assert_eq!(seqs, (first..first + seqs.len() as u64).collect::<Vec<_>>(), "no hole in the log");
    let digests: Vec<[u8; 32]> = leaves.iter().map(|l| l.digest).collect();
    assert_eq!(digests, vec![digest(1), digest(2), digest(3)]);
    assert_eq!(seq2, first + 1);
}

/// Registry commands take sequence numbers between message groups: the
/// leaves of both are numbered on from each other, without a hole or a
/// number taken twice, whether a command is queued before the start or
/// while messages flow.
#[test]
fn registry_leaves_and_messages_share_one_numbering() {
    use notary_plugin::source::Outcome;
    use notary_proof::RegistryAction;
    let dir = tempfile::tempdir().expect("temp dir");
    let key = |b: u8| ed25519_dalek::SigningKey::from_bytes(&[b; 32]).verifying_key().to_bytes();
    let queue = |action, device: &str, k: Option<[u8; 32]>| {
        let store = notary_plugin::store::Store::open(dir.path()).expect("store");
        store.queue_command(action, device, k, "test", 1).expect("queued")
    };
    queue(RegistryAction::Enrol, "dev-a", Some(key(7)));
    let ledger = Arc::new(LocalLedger::open(&dir.path().join("ledger.sqlite")).expect("ledger"));
    let signer = NoteSigner::new("test/pipeline", [9; 32]).expect("signer");
    let (intake, inlets) = notary_plugin::inlets(64, Topics::CURRENT);
    let pipeline = Pipeline::start(
        &config(dir.path()),
        intake.clone(),
        inlets,
        Arc::new(NoOutbox),
        signer,
        vec![ledger],
    )
    .expect("pipeline starts");
    let notarize = |i: usize| {
        let (tx, rx) = std::sync::mpsc::channel();
        intake.submit(message(i), Box::new(move |o| tx.send(o).expect("answer"))).expect("taken");
        match rx.recv_timeout(Duration::from_secs(60)).expect("answered") {
            Outcome::Notarized { seq } => seq,
            other => panic!("message {i}: {other:?}"),
        }
    };
    let applied = |id: i64| {
        wait_for("the command applied", || {
            let store = notary_plugin::store::Store::open(dir.path()).expect("store");
            let commands = store.commands(true).expect("commands");
            commands.iter().find(|c| c.id == id).and_then(|c| c.applied_seq)
        })
    };
    let first = notarize(0);
    let enrol_b = queue(RegistryAction::Enrol, "dev-b", Some(key(8)));
    let second = notarize(1);
    let enrolled_b = applied(enrol_b);
    let third = notarize(2);
    assert!(first < third && second < third && enrolled_b < third, "{first} {second} {enrolled_b} {third}");
    assert_eq!(pipeline.shutdown(Duration::from_secs(30)), Shutdown::Clean);

    let store = notary_plugin::store::Store::open(dir.path()).expect("store");
    let seqs: Vec<u64> = store.leaves_from(0).expect("leaves").iter().map(|l| l.seq).collect();
    assert_eq!(seqs, (0..5).collect::<Vec<_>>(), "two registry leaves and three messages, no hole");
}
