//! Ingest: takes messages from a source, judges each one (plain payload,
//! device envelope, or rejected), persists leaves and rejections with group
//! commit, and hands leaf hashes to the sealer.
//!
//! Two threads, one pipeline: the *judge* ([`Ingest`]) takes a group from
//! the queue, checks its signatures (ed25519 batches spread over the cores),
//! numbers its leaves and answers whoever waits only for the verdict; the
//! *committer* ([`Committer`]) commits the judged groups in order and
//! answers whoever waits for the commit. So group N + 1 is judged while
//! group N commits, and a verdict never waits for an unrelated `fsync`. The
//! committer commits every group judged while the previous commit ran in
//! one transaction, so small groups judged one by one do not cost an
//! `fsync` each. At most [`JUDGED_AHEAD`] judged groups
//! wait for the committer; then the judge waits too, the queue fills and
//! the source is held back.
//!
//! Queue policy: the queue between source and ingest is bounded. When it is
//! full, `deliver` blocks, so the source stops reading: the embedded broker
//! then keeps the backlog in its own commit log, and if that overflows too,
//! the source reports a gap, which is logged, counted and stored. Nothing is
//! dropped silently. Proof requests travel on their own queue and never wait
//! behind ingest; when that queue is full they are dropped and counted.

use crate::health::Part;
use crate::metrics::Metrics;
use crate::reason::Reason;
use crate::registry::{DevicePolicy, Lookup, Registry};
use crate::sealer::SealerMsg;
use crate::source::{now_ms, Closed, Message, Outbox, Outcome, Responder, Sink};
use crate::store::{Commit, Fault, RegistryChange, Rejection, Store, StoreError, StoredLeaf};
use crate::topics::Topics;
use notary_proof::envelope::{self, is_envelope};
use notary_proof::{DeviceFields, DeviceKey, Envelope, EnvelopeError, LeafRecord};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Most leaves committed in one transaction.
const MAX_GROUP: usize = 8192;
/// Judged groups that may wait for the committer (which commits all that
/// wait in one transaction).
pub(crate) const JUDGED_AHEAD: usize = 16;

/// When a waiting responder is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Answer {
    /// Once the message is judged, before its commit.
    Judged,
    /// Once it is committed (as a leaf or as a rejection).
    Committed,
}

pub(crate) enum IngestItem {
    /// A message, and who waits for its outcome.
    Message(Message, Option<(Responder, Answer)>),
    Gap {
        missed: u64,
        at_ms: u64,
    },
    /// Called once everything queued before it is persisted.
    Barrier(Box<dyn FnOnce() + Send>),
    Outage {
        from_ms: u64,
        to_ms: u64,
    },
}

/// The pipeline's [`Sink`]: routes a source's messages to ingest or to the
/// proof service.
pub struct Intake {
    ingest: Mutex<Option<SyncSender<IngestItem>>>,
    proofs: Mutex<Option<SyncSender<Message>>>,
    metrics: Arc<Metrics>,
    topics: Topics,
}

impl Intake {
    pub(crate) fn new(
        ingest: SyncSender<IngestItem>,
        proofs: SyncSender<Message>,
        metrics: Arc<Metrics>,
        topics: Topics,
    ) -> Self {
        Intake { ingest: Mutex::new(Some(ingest)), proofs: Mutex::new(Some(proofs)), metrics, topics }
    }

    /// Stops taking messages; ingest drains what it has and finishes.
    pub fn close(&self) {
        if let Ok(mut g) = self.ingest.lock() {
            g.take();
        }
        if let Ok(mut g) = self.proofs.lock() {
            g.take();
        }
    }

    fn send(&self, item: IngestItem) -> Result<(), Closed> {
        let guard = self.ingest.lock().map_err(|_| Closed)?;
        let tx = guard.as_ref().ok_or(Closed)?;
        self.metrics.queue_depth.fetch_add(1, Relaxed);
        tx.send(item).map_err(|_| {
            self.metrics.queue_depth.fetch_sub(1, Relaxed);
            Closed
        })
    }
}

impl Sink for Intake {
    fn deliver(&self, msg: Message) -> Result<(), Closed> {
        if msg.topic == self.topics.proof_request() {
            Metrics::inc(&self.metrics.proof_requests_mqtt_total);
            let guard = self.proofs.lock().map_err(|_| Closed)?;
            return match guard.as_ref().ok_or(Closed)?.try_send(msg) {
                Ok(()) => Ok(()),
                Err(TrySendError::Full(_)) => {
                    Metrics::inc(&self.metrics.proof_requests_dropped_total);
                    Ok(())
                }
                Err(TrySendError::Disconnected(_)) => Err(Closed),
            };
        }
        if self.topics.is_own(&msg.topic) {
            return Ok(());
        }
        Metrics::inc(&self.metrics.messages_received_total);
        self.send(IngestItem::Message(msg, None))
    }

    fn submit(&self, msg: Message, done: Responder) -> Result<(), Closed> {
        if self.topics.is_own(&msg.topic) {
            self.deliver(msg)?;
            done(Outcome::NotLogged);
            return Ok(());
        }
        Metrics::inc(&self.metrics.messages_received_total);
        self.send(IngestItem::Message(msg, Some((done, Answer::Committed))))
    }

    fn submit_judged(&self, msg: Message, done: Responder) -> Result<(), Closed> {
        if self.topics.is_own(&msg.topic) {
            return self.submit(msg, done);
        }
        Metrics::inc(&self.metrics.messages_received_total);
        self.send(IngestItem::Message(msg, Some((done, Answer::Judged))))
    }

    fn redelivered(&self, _behind: u64) {
        Metrics::inc(&self.metrics.redelivered_skipped_total);
    }

    fn outage(&self, from_ms: u64, to_ms: u64) {
        Metrics::inc(&self.metrics.source_outages_total);
        Metrics::add(&self.metrics.source_disconnected_ms_total, to_ms.saturating_sub(from_ms));
        tracing::warn!(
            from_ms,
            to_ms,
            "source outage: messages published meanwhile without a queue (QoS 0) were not notarized"
        );
        let _ = self.send(IngestItem::Outage { from_ms, to_ms });
    }

    fn after_commit(&self, done: Box<dyn FnOnce() + Send>) -> Result<(), Closed> {
        self.send(IngestItem::Barrier(done))
    }

    fn stopped(&self, why: &str) {
        self.metrics.health.stopped(Part::Source, why);
    }

    fn gap(&self, missed: u64) {
        Metrics::inc(&self.metrics.gap_events_total);
        Metrics::add(&self.metrics.gap_messages_total, missed);
        tracing::warn!(missed, "source lost messages before notarization (gap)");
        let _ = self.send(IngestItem::Gap { missed, at_ms: now_ms() });
    }
}

/// How often queued registry commands are picked up.
const REGISTRY_POLL: Duration = Duration::from_millis(200);
/// Rejections logged one by one per group; the rest are summed up.
const REJECTIONS_LOGGED: usize = 10;

/// The judge: judges each message (plain, signed, rejected), assigns
/// sequence numbers, applies registry commands between groups, and hands
/// each judged group to the [`Committer`].
pub(crate) struct Ingest {
    /// Its own connection: registry commands, gaps and outages.
    pub writer: Writer,
    pub next_seq: u64,
    pub registry: Registry,
    pub policy: DevicePolicy,
    pub committer: SyncSender<ToCommitter>,
    /// Leaves the committer numbered lower than the judge did (after the
    /// store refused one of them); the judge takes them off its numbering.
    pub shift: Arc<AtomicU64>,
}

/// A store connection that commits, with the retry policy of ingest.
pub(crate) struct Writer {
    pub store: Store,
    pub sealer: SyncSender<SealerMsg>,
    pub metrics: Arc<Metrics>,
    /// The digest index of unsealed leaves.
    pub unsealed: Arc<crate::store::Unsealed>,
    /// Set when shutdown's deadline has passed: stop retrying commits.
    pub give_up: Arc<AtomicBool>,
}

/// What the judge sends the committer.
pub(crate) enum ToCommitter {
    Group(Judgement),
    /// Answered with the next sequence number once everything sent before
    /// is committed.
    Sync(SyncSender<u64>),
    /// The judge committed registry leaves after a `Sync`: numbering goes
    /// on from here.
    Resume(u64),
}

/// A judged group, ready to commit.
pub(crate) struct Judgement {
    commit: Commit,
    /// Per leaf: the device counter it raises, for committing leaves one by
    /// one if the store refuses the group.
    leaf_counters: Vec<Option<(String, u64)>>,
    /// Who waits for the commit, and where their message went.
    waiting: Vec<(Responder, Slot)>,
    /// Fired once this group (and every one before) is committed.
    barriers: Vec<Box<dyn FnOnce() + Send>>,
    /// Queue items this group took (off `queue_depth` once committed).
    taken: i64,
}

impl Judgement {
    /// Whether `next` can be committed in the same transaction: its leaves
    /// follow this group's without a gap in their numbering.
    fn continues(&self, next: &Judgement) -> bool {
        match (self.commit.leaves.last(), next.commit.leaves.first()) {
            (Some(last), Some(first)) => last.seq.checked_add(1) == Some(first.seq),
            _ => true,
        }
    }

    /// Appends `next` (judged later) to this group.
    fn absorb(&mut self, next: Judgement) {
        let (leaves, rejections) = (self.commit.leaves.len(), self.commit.rejections.len());
        self.waiting.extend(next.waiting.into_iter().map(|(r, slot)| {
            let slot = match slot {
                Slot::Leaf(i) => Slot::Leaf(i + leaves),
                Slot::Rejection(i) => Slot::Rejection(i + rejections),
                Slot::Dropped => Slot::Dropped,
            };
            (r, slot)
        }));
        let c = next.commit;
        self.commit.leaves.extend(c.leaves);
        self.commit.rejections.extend(c.rejections);
        // Applied in order: a later counter of the same device wins.
        self.commit.counters.extend(c.counters);
        self.commit.registry.extend(c.registry);
        self.commit.refused.extend(c.refused);
        self.leaf_counters.extend(next.leaf_counters);
        self.barriers.extend(next.barriers);
        self.taken += next.taken;
    }
}

/// The committer: the log's only writer of messages. Commits judged groups
/// in order, answers their waiting responders, hands the leaves to the
/// sealer and announces rejections.
pub(crate) struct Committer {
    pub writer: Writer,
    pub next_seq: u64,
    pub outbox: Arc<dyn Outbox>,
    /// Where rejection events are announced.
    pub rejections_topic: &'static str,
    pub shift: Arc<AtomicU64>,
}

/// Where a message went in its group's commit.
enum Slot {
    Leaf(usize),
    Rejection(usize),
    /// Neither (it could not even be encoded; logged).
    Dropped,
}

/// How a commit ended.
enum Persisted {
    Done,
    /// The store can never hold this commit.
    Permanent(StoreError),
    /// Shutdown's deadline passed while the store kept failing.
    GaveUp,
}

/// Longest pause between attempts while the store fails.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(2);

/// A message after its first look, before signatures are checked.
enum Judged {
    Plain(Message),
    Signed { msg: Message, env: Box<Envelope>, key: DeviceKey, key_seq: u64 },
    Rejected(Rejection),
    Gap { missed: u64, at_ms: u64 },
    Outage { from_ms: u64, to_ms: u64 },
}

fn rejection(msg: &Message, reason: Reason, detail: String, device: Option<String>) -> Rejection {
    Rejection {
        received_at_ms: msg.received_at_ms,
        topic: msg.topic.clone(),
        digest: *blake3::hash(&msg.payload).as_bytes(),
        payload_len: msg.payload.len() as u64,
        reason,
        detail,
        device,
    }
}

impl Ingest {
    /// Runs until every sender is gone and the queue is empty.
    pub fn run(mut self, rx: Receiver<IngestItem>) {
        let mut group: Vec<IngestItem> = Vec::with_capacity(MAX_GROUP);
        let mut last_poll: Option<Instant> = None;
        loop {
            if last_poll.is_none_or(|t| t.elapsed() >= REGISTRY_POLL) {
                self.apply_commands();
                last_poll = Some(Instant::now());
            }
            if self.writer.give_up.load(Relaxed) {
                break;
            }
            match rx.recv_timeout(REGISTRY_POLL) {
                Ok(first) => group.push(first),
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => break,
            }
            while group.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(item) => group.push(item),
                    Err(_) => break,
                }
            }
            let taken = group.len() as i64;
            // Barriers fire after the commit of this group, which holds
            // every item queued before them.
            let (barriers, items): (Vec<_>, Vec<_>) =
                group.drain(..).partition(|i| matches!(i, IngestItem::Barrier(_)));
            let barriers = barriers
                .into_iter()
                .filter_map(|b| match b {
                    IngestItem::Barrier(done) => Some(done),
                    _ => None,
                })
                .collect();
            let judgement = self.judge_group(items.into_iter(), barriers, taken);
            if self.committer.send(ToCommitter::Group(judgement)).is_err() {
                // The committer is gone (it gave up at the shutdown
                // deadline): what it had not committed is counted there.
                break;
            }
        }
        let left = rx.try_iter().filter(|i| matches!(i, IngestItem::Message(..))).count();
        if left > 0 || self.writer.give_up.load(Relaxed) {
            Metrics::add(&self.writer.metrics.messages_uncommitted_total, left as u64);
            tracing::error!(
                queued = left,
                "ingest stopped at the shutdown deadline; queued messages were not committed"
            );
        } else {
            tracing::debug!("ingest drained");
        }
    }

    /// Waits until the committer has committed everything judged so far,
    /// and numbers on from where it ended. False if it is gone.
    fn sync(&mut self) -> bool {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        if self.committer.send(ToCommitter::Sync(tx)).is_err() {
            return false;
        }
        match rx.recv() {
            Ok(next) => {
                self.shift.swap(0, Relaxed);
                self.next_seq = next;
                true
            }
            Err(_) => false,
        }
    }

    /// Applies queued registry commands, each as a registry leaf.
    fn apply_commands(&mut self) {
        let commands = match self.writer.store.commands(false) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "cannot read queued device commands");
                return;
            }
        };
        if commands.is_empty() {
            return;
        }
        // Registry leaves take the next sequence numbers: everything judged
        // before must be committed first, and numbered as committed.
        if !self.sync() {
            return;
        }
        let mut commit = Commit::default();
        for cmd in commands {
            let planned = self.registry.plan(&cmd).and_then(|event| {
                let leaf =
                    LeafRecord::registry(self.next_seq, now_ms(), &event).map_err(|e| e.to_string())?;
                let record = leaf.encode().map_err(|e| e.to_string())?;
                Ok((event, leaf.payload_digest, record))
            });
            match planned {
                Ok((event, digest, record)) => {
                    let seq = self.next_seq;
                    tracing::info!(device = %event.device_id, action = event.action.as_str(), seq, "device registry changed");
                    self.registry.apply(seq, &event);
                    commit.leaves.push(StoredLeaf { seq, digest, record });
                    commit.registry.push(RegistryChange { seq, event, command: Some(cmd.id) });
                    self.next_seq += 1;
                }
                Err(reason) => {
                    tracing::warn!(device = %cmd.device, action = cmd.action.as_str(), %reason, "device command refused");
                    commit.refused.push((cmd.id, reason));
                }
            }
        }
        let first_seq = commit.leaves.first().map(|l| l.seq);
        match self.writer.persist(&commit) {
            Persisted::Done => {
                self.writer.index(&commit.leaves);
                self.writer.hand_to_sealer(&commit.leaves);
            }
            Persisted::GaveUp => {}
            Persisted::Permanent(e) => {
                // Refuse every command of this round, and undo their
                // effect on the in-memory registry and on the numbering.
                tracing::error!(error = %e, "the store refused a registry change; its commands are refused");
                let why = format!("the store refused it: {e}");
                let refused = Commit {
                    refused: commit
                        .registry
                        .iter()
                        .filter_map(|r| r.command)
                        .chain(commit.refused.iter().map(|(id, _)| *id))
                        .map(|id| (id, why.clone()))
                        .collect(),
                    ..Commit::default()
                };
                if let Some(seq) = first_seq {
                    self.next_seq = seq;
                }
                match Registry::load(&self.writer.store) {
                    Ok(r) => self.registry = r,
                    Err(e) => self
                        .writer
                        .metrics
                        .health
                        .failing(Part::Ingest, format!("cannot reload the registry: {e}")),
                }
                if !matches!(self.writer.persist(&refused), Persisted::Done) {
                    tracing::error!("could not record the refused commands");
                }
            }
        }
        // The committer numbers on after the registry leaves.
        let _ = self.committer.send(ToCommitter::Resume(self.next_seq));
    }

    fn judge(&self, msg: Message) -> Judged {
        if self.policy.takes_plain(&msg.topic, &msg.payload) {
            return Judged::Plain(msg);
        }
        if !is_envelope(&msg.payload) {
            let r = rejection(
                &msg,
                Reason::SignatureRequired,
                "this topic accepts only signed envelopes".into(),
                None,
            );
            return Judged::Rejected(r);
        }
        if msg.payload.len() > self.policy.max_envelope_bytes {
            let detail = format!(
                "envelope of {} bytes; the limit is {}",
                msg.payload.len(),
                self.policy.max_envelope_bytes
            );
            return Judged::Rejected(rejection(&msg, Reason::Oversize, detail, None));
        }
        let env = match Envelope::parse(&msg.payload, &msg.topic) {
            Ok(env) => env,
            Err(e) => return Judged::Rejected(rejection(&msg, Reason::from(&e), e.to_string(), None)),
        };
        match self.registry.lookup(&env.device_id) {
            Lookup::Unknown => {
                let device = Some(env.device_id);
                Judged::Rejected(rejection(
                    &msg,
                    Reason::UnknownDevice,
                    "no such device is enrolled".into(),
                    device,
                ))
            }
            Lookup::Revoked => {
                let device = Some(env.device_id);
                Judged::Rejected(rejection(
                    &msg,
                    Reason::RevokedDevice,
                    "the device's key is revoked".into(),
                    device,
                ))
            }
            Lookup::Active { key, key_seq, .. } => {
                Judged::Signed { key: *key, key_seq, msg, env: Box::new(env) }
            }
        }
    }

    /// Judges a group: checks its signatures, numbers its leaves, answers
    /// those who wait only for the verdict, and returns what is to commit.
    fn judge_group(
        &mut self,
        items: impl Iterator<Item = IngestItem>,
        barriers: Vec<Box<dyn FnOnce() + Send>>,
        taken: i64,
    ) -> Judgement {
        // Leaves of earlier groups the committer could not store: number
        // on from where it really is.
        let shift = self.shift.swap(0, Relaxed);
        self.next_seq = self.next_seq.saturating_sub(shift);
        let judged: Vec<(Judged, Option<(Responder, Answer)>)> = items
            .filter_map(|item| match item {
                IngestItem::Message(m, r) => Some((self.judge(m), r)),
                IngestItem::Gap { missed, at_ms } => Some((Judged::Gap { missed, at_ms }, None)),
                IngestItem::Outage { from_ms, to_ms } => Some((Judged::Outage { from_ms, to_ms }, None)),
                // `run` takes barriers out before; one dropped unfired only
                // leaves messages unacknowledged (redelivered), never lost.
                IngestItem::Barrier(_) => None,
            })
            .collect();
        let signed: Vec<(&Envelope, &DeviceKey)> = judged
            .iter()
            .filter_map(|(j, _)| match j {
                Judged::Signed { env, key, .. } => Some((&**env, key)),
                _ => None,
            })
            .collect();
        let mut valid = verify_parallel(&signed).into_iter();
        drop(signed);

        let mut commit = Commit::default();
        let mut counters: HashMap<String, u64> = HashMap::new();
        let mut leaf_counters: Vec<Option<(String, u64)>> = Vec::new();
        let mut waiting: Vec<(Responder, Slot)> = Vec::new();
        for (j, responder) in judged {
            let (leaves, rejections) = (commit.leaves.len(), commit.rejections.len());
            self.take(j, &mut valid, &mut commit, &mut counters, &mut leaf_counters);
            if let Some((r, answer)) = responder {
                let slot = if commit.leaves.len() > leaves {
                    Slot::Leaf(leaves)
                } else if commit.rejections.len() > rejections {
                    Slot::Rejection(rejections)
                } else {
                    Slot::Dropped
                };
                if answer == Answer::Judged {
                    // The verdict is known; the commit need not be awaited.
                    match slot {
                        Slot::Leaf(_) => r(Outcome::Accepted),
                        Slot::Rejection(i) => {
                            if let Some(rej) = commit.rejections.get(i) {
                                r(Outcome::Rejected { reason: rej.reason, detail: rej.detail.clone() })
                            }
                        }
                        Slot::Dropped => {}
                    }
                    continue;
                }
                waiting.push((r, slot));
            }
        }
        commit.counters = counters.into_iter().collect();
        Judgement { commit, leaf_counters, waiting, barriers, taken }
    }

    /// Turns one judged message into a leaf or a rejection of `commit`
    /// (or records a gap or outage at once).
    fn take(
        &mut self,
        j: Judged,
        valid: &mut impl Iterator<Item = bool>,
        commit: &mut Commit,
        counters: &mut HashMap<String, u64>,
        leaf_counters: &mut Vec<Option<(String, u64)>>,
    ) {
        let mut leaf_counter = None;
        let (mut msg, mut leaf) = match j {
            Judged::Plain(msg) => {
                let leaf =
                    LeafRecord::broker_received(self.next_seq, msg.received_at_ms, &msg.topic, &msg.payload);
                (msg, leaf)
            }
            Judged::Signed { msg, env, key_seq, .. } => {
                let device = Some(env.device_id.clone());
                if valid.next() != Some(true) {
                    commit.rejections.push(rejection(
                        &msg,
                        Reason::BadSignature,
                        EnvelopeError::BadSignature.to_string(),
                        device,
                    ));
                    return;
                }
                let last = match self.registry.lookup(&env.device_id) {
                    Lookup::Active { last_counter, .. } => last_counter,
                    _ => None,
                };
                if last.is_some_and(|last| env.counter <= last) {
                    let detail = format!(
                        "counter {} is not above {}, the last accepted",
                        env.counter,
                        last.unwrap_or(0)
                    );
                    commit.rejections.push(rejection(&msg, Reason::Replay, detail, device));
                    return;
                }
                let fields = DeviceFields {
                    key_seq,
                    counter: env.counter,
                    device_time_ms: env.device_time_ms,
                    device_id: env.device_id.clone(),
                };
                match LeafRecord::device_signed(
                    self.next_seq,
                    msg.received_at_ms,
                    &msg.topic,
                    &msg.payload,
                    &fields,
                ) {
                    Ok(leaf) => {
                        self.registry.set_counter(&env.device_id, env.counter);
                        leaf_counter = Some((env.device_id.clone(), env.counter));
                        counters.insert(env.device_id, env.counter);
                        (msg, leaf)
                    }
                    Err(e) => {
                        commit.rejections.push(rejection(
                            &msg,
                            Reason::MalformedEnvelope,
                            e.to_string(),
                            device,
                        ));
                        return;
                    }
                }
            }
            Judged::Rejected(r) => {
                commit.rejections.push(r);
                return;
            }
            Judged::Gap { missed, at_ms } => {
                if let Err(e) = self.writer.store.record_gap(at_ms, missed, self.next_seq) {
                    tracing::error!(error = %e, missed, "could not record gap");
                }
                return;
            }
            Judged::Outage { from_ms, to_ms } => {
                if let Err(e) = self.writer.store.record_outage(from_ms, to_ms, self.next_seq) {
                    tracing::error!(error = %e, from_ms, to_ms, "could not record source outage");
                }
                return;
            }
        };
        if let Some(p) = msg.publisher.take() {
            leaf = leaf.published_by(*p);
        }
        let record = match leaf.encode() {
            Ok(record) => record,
            Err(e) => {
                // MQTT strings are at most 65,535 bytes without NUL, so a
                // source that checks them never gets here; one that does
                // not gets a rejection with the reason, never a silent drop.
                commit.rejections.push(rejection(&msg, Reason::Unstorable, e.to_string(), None));
                return;
            }
        };
        commit.leaves.push(StoredLeaf { seq: self.next_seq, digest: leaf.payload_digest, record });
        leaf_counters.push(leaf_counter);
        self.next_seq += 1;
    }
}

impl Committer {
    /// Commits judged groups in order until the judge is gone, or until
    /// shutdown's deadline makes it give up.
    pub fn run(mut self, rx: Receiver<ToCommitter>) {
        // A message taken while merging that cannot join the commit.
        let mut held: Option<ToCommitter> = None;
        loop {
            let next = match held.take() {
                Some(m) => Ok(m),
                None => rx.recv_timeout(REGISTRY_POLL),
            };
            match next {
                Ok(ToCommitter::Group(mut g)) => {
                    // Everything judged while the last commit ran joins this
                    // one: one transaction (one fsync) for all of it.
                    while g.commit.leaves.len() < MAX_GROUP {
                        match rx.try_recv() {
                            Ok(ToCommitter::Group(h)) if g.continues(&h) => g.absorb(h),
                            Ok(other) => {
                                held = Some(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    if !self.commit(g) {
                        break;
                    }
                }
                Ok(ToCommitter::Sync(reply)) => {
                    let _ = reply.send(self.next_seq);
                }
                Ok(ToCommitter::Resume(next)) => self.next_seq = next,
                // Nothing judged waits: ingest is not stalled.
                Err(RecvTimeoutError::Timeout) => self.writer.metrics.health.ingest_progress(),
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
        // Gave up at the shutdown deadline: what is judged is not committed
        // (its responders are dropped, so nothing of it is acknowledged).
        let left: usize = held
            .into_iter()
            .chain(rx.try_iter())
            .map(|m| match m {
                ToCommitter::Group(g) => g.commit.leaves.len(),
                ToCommitter::Sync(_) | ToCommitter::Resume(_) => 0,
            })
            .sum();
        if left > 0 {
            Metrics::add(&self.writer.metrics.messages_uncommitted_total, left as u64);
            tracing::error!(leaves = left, "judged messages were not committed before the shutdown deadline");
        }
    }

    /// Commits one judged group and answers for it. False once shutdown
    /// has given up.
    fn commit(&mut self, group: Judgement) -> bool {
        let Judgement { commit, leaf_counters, waiting, barriers, taken } = group;
        let judged_leaves = commit.leaves.len() as u64;
        // What the group's own rejections answer, whatever path commits them.
        let rejected: Vec<Outcome> = commit
            .rejections
            .iter()
            .map(|r| Outcome::Rejected { reason: r.reason, detail: r.detail.clone() })
            .collect();
        // Numbered by the judge before it learnt that the store refused an
        // earlier leaf: renumbered, one by one (rare).
        let in_order = commit.leaves.first().is_none_or(|l| l.seq == self.next_seq);
        let persisted = if commit.is_empty() {
            Some((commit, Vec::new()))
        } else if !in_order {
            self.persist_apart(commit, leaf_counters)
        } else {
            match self.writer.persist(&commit) {
                Persisted::Done => {
                    self.next_seq += judged_leaves;
                    let outcomes = commit.leaves.iter().map(|l| Outcome::Notarized { seq: l.seq }).collect();
                    Some((commit, outcomes))
                }
                Persisted::GaveUp => None,
                Persisted::Permanent(e) => {
                    tracing::warn!(error = %e, leaves = commit.leaves.len(), "the store refused a group; committing its messages one by one");
                    self.persist_apart(commit, leaf_counters)
                }
            }
        };
        self.writer.metrics.queue_depth.fetch_sub(taken, Relaxed);
        // Gave up: the responders are dropped unanswered and the barriers
        // unfired (their messages are not acknowledged upstream).
        let Some((commit, outcomes)) = persisted else { return false };
        let dropped = judged_leaves.saturating_sub(commit.leaves.len() as u64);
        if dropped > 0 {
            self.shift.fetch_add(dropped, Relaxed);
        }
        // Findable by digest before anyone is told they are notarized.
        self.writer.index(&commit.leaves);
        for (responder, slot) in waiting {
            let outcome = match slot {
                Slot::Leaf(i) => outcomes.get(i).cloned(),
                Slot::Rejection(i) => rejected.get(i).cloned(),
                Slot::Dropped => None,
            };
            if let Some(o) = outcome {
                responder(o);
            }
        }
        for done in barriers {
            done();
        }
        Metrics::add(&self.writer.metrics.messages_notarized_total, commit.leaves.len() as u64);
        self.writer.hand_to_sealer(&commit.leaves);
        self.announce(&commit.rejections);
        true
    }

    /// Commits a group the store refused as a whole, one message per
    /// transaction: a message the store refuses becomes a rejection
    /// (`unstorable`), and the leaves after it are renumbered so the log
    /// keeps no holes: they are numbered from `self.next_seq` on. Returns
    /// what was committed and, for each leaf of the group in order, what
    /// became of it; `None` if shutdown gave up meanwhile.
    fn persist_apart(
        &mut self,
        group: Commit,
        leaf_counters: Vec<Option<(String, u64)>>,
    ) -> Option<(Commit, Vec<Outcome>)> {
        let mut done = Commit::default();
        let mut outcomes = Vec::with_capacity(group.leaves.len());
        let mut next = self.next_seq;
        for (leaf, counter) in group.leaves.into_iter().zip(leaf_counters) {
            let leaf = match renumber(leaf, next) {
                Ok(l) => l,
                Err((leaf, why)) => {
                    let r = unstorable(&leaf, counter.map(|(d, _)| d), &why);
                    outcomes.push(Outcome::Rejected { reason: r.reason, detail: r.detail.clone() });
                    done.rejections.push(r);
                    continue;
                }
            };
            let one =
                Commit { leaves: vec![leaf], counters: counter.into_iter().collect(), ..Commit::default() };
            match self.writer.persist(&one) {
                Persisted::Done => {
                    outcomes.push(Outcome::Notarized { seq: next });
                    next += 1;
                    done.leaves.extend(one.leaves);
                    done.counters.extend(one.counters);
                }
                Persisted::GaveUp => return None,
                Persisted::Permanent(e) => {
                    let leaf = &one.leaves[0];
                    let device = one.counters.first().map(|(d, _)| d.clone());
                    let r = unstorable(leaf, device, &e);
                    match self.writer.persist(&Commit { rejections: vec![r.clone()], ..Commit::default() }) {
                        Persisted::Done => {}
                        Persisted::GaveUp => return None,
                        Persisted::Permanent(e) => {
                            tracing::error!(topic = %r.topic, digest = %hex::encode(r.digest), error = %e, "message could not be stored, nor its rejection")
                        }
                    }
                    outcomes.push(Outcome::Rejected { reason: r.reason, detail: r.detail.clone() });
                    done.rejections.push(r);
                }
            }
        }
        for r in group.rejections {
            match self.writer.persist(&Commit { rejections: vec![r.clone()], ..Commit::default() }) {
                Persisted::Done => done.rejections.push(r),
                Persisted::GaveUp => return None,
                Persisted::Permanent(e) => {
                    tracing::error!(topic = %r.topic, reason = r.reason.as_str(), error = %e, "a rejection could not be stored");
                    done.rejections.push(r);
                }
            }
        }
        self.next_seq = next;
        Some((done, outcomes))
    }

    /// Logs, counts and publishes rejections (after they are stored).
    fn announce(&self, rejections: &[Rejection]) {
        for (i, r) in rejections.iter().enumerate() {
            self.writer.metrics.count_rejection(r.reason);
            if i < REJECTIONS_LOGGED {
                tracing::warn!(topic = %r.topic, reason = r.reason.as_str(), detail = %r.detail, device = ?r.device, "message rejected");
            }
            let event = serde_json::to_vec(r).unwrap_or_default();
            if !self.outbox.publish(self.rejections_topic, event, false) {
                Metrics::inc(&self.writer.metrics.outbox_dropped_total);
            }
        }
        if rejections.len() > REJECTIONS_LOGGED {
            tracing::warn!(
                more = rejections.len() - REJECTIONS_LOGGED,
                "further messages rejected in this group"
            );
        }
    }
}

impl Writer {
    /// Adds committed leaves to the digest index of unsealed leaves.
    fn index(&self, leaves: &[StoredLeaf]) {
        self.unsealed.add(leaves.iter().map(|l| (l.digest, l.seq)));
    }

    fn hand_to_sealer(&self, leaves: &[StoredLeaf]) {
        let hashes = leaves.iter().map(crate::sealer::ToSeal::of).collect::<Vec<_>>();
        if !hashes.is_empty() && self.sealer.send(SealerMsg::Leaves(hashes)).is_err() {
            tracing::error!("sealer is gone; persisted leaves will be sealed at next start");
        }
    }

    /// Commits one transaction. A transient failure (busy, disk full, I/O)
    /// is retried with backoff for as long as it lasts, so nothing accepted
    /// is dropped because the disk was briefly full; meanwhile `/healthz`
    /// reports it and the queue fills, which blocks the source. A permanent
    /// failure is returned at once: retrying could only repeat it.
    fn persist(&mut self, commit: &Commit) -> Persisted {
        let mut delay = Duration::from_millis(10);
        let mut failures = 0u64;
        loop {
            let e = match self.store.commit(commit) {
                Ok(()) => {
                    if failures > 0 {
                        tracing::info!(failures, "store writes work again");
                        self.metrics.health.recovered(Part::Ingest);
                    }
                    self.metrics.health.ingest_progress();
                    return Persisted::Done;
                }
                Err(e) => e,
            };
            if e.fault() == Fault::Permanent {
                Metrics::inc(&self.metrics.persist_refused_total);
                return Persisted::Permanent(e);
            }
            Metrics::inc(&self.metrics.persist_failures_total);
            self.metrics.health.failing(Part::Ingest, format!("cannot commit: {e}"));
            if failures == 0 || failures.is_power_of_two() {
                tracing::error!(error = %e, leaves = commit.leaves.len(), failures, "cannot commit; retrying");
            }
            failures += 1;
            if self.give_up.load(Relaxed) {
                Metrics::add(&self.metrics.messages_uncommitted_total, commit.leaves.len() as u64);
                tracing::error!(
                    leaves = commit.leaves.len(),
                    rejections = commit.rejections.len(),
                    error = %e,
                    "shutdown deadline passed; this group was not committed"
                );
                return Persisted::GaveUp;
            }
            std::thread::sleep(delay);
            delay = (delay * 2).min(MAX_RETRY_DELAY);
        }
    }
}

/// The leaf with sequence number `seq` (re-encoded if it had another).
fn renumber(leaf: StoredLeaf, seq: u64) -> Result<StoredLeaf, (StoredLeaf, String)> {
    if leaf.seq == seq {
        return Ok(leaf);
    }
    let record = LeafRecord::decode(&leaf.record).and_then(|mut r| {
        r.seq = seq;
        r.encode()
    });
    match record {
        Ok(record) => Ok(StoredLeaf { seq, digest: leaf.digest, record }),
        Err(e) => Err((leaf, format!("the leaf record cannot be renumbered: {e}"))),
    }
}

/// The rejection of a message whose leaf the store refused.
fn unstorable(leaf: &StoredLeaf, device: Option<String>, why: &dyn std::fmt::Display) -> Rejection {
    let (received_at_ms, topic, payload_len) = match LeafRecord::decode(&leaf.record) {
        Ok(r) => (r.received_at_ms, r.topic, r.payload_len),
        Err(_) => (now_ms(), String::new(), 0),
    };
    Rejection {
        received_at_ms,
        topic,
        digest: leaf.digest,
        payload_len,
        reason: Reason::Unstorable,
        detail: format!("the store refused the message: {why}"),
        device,
    }
}

/// Fewer signatures than this are verified on the judge's thread alone:
/// a strict check costs tens of microseconds, so only larger groups repay
/// starting threads.
const PARALLEL_FROM: usize = 32;

/// Verifies envelopes on every core: split across scoped threads when
/// there are enough of them.
fn verify_parallel(items: &[(&Envelope, &DeviceKey)]) -> Vec<bool> {
    // Asked once: `available_parallelism` reads cgroup files on every call
    // (measured: a tenth of the judge's time with groups of ten).
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let threads = *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()).min(8));
    if threads == 1 || items.len() < PARALLEL_FROM {
        return envelope::verify_many(items);
    }
    let per = items.len().div_ceil(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> =
            items.chunks(per).map(|c| (c.len(), s.spawn(move || envelope::verify_many(c)))).collect();
        handles.into_iter().flat_map(|(n, h)| h.join().unwrap_or_else(|_| vec![false; n])).collect()
    })
}
