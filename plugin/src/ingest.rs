//! Ingest: takes messages from a source, judges each one (plain payload,
//! device envelope, or rejected), persists leaves and rejections with group
//! commit, and hands leaf hashes to the sealer.
//!
//! Signatures are checked here, on the pipeline's own threads, in ed25519
//! batches spread over the cores; rumqttd's router never waits for them.
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
use crate::topics::{OWN_PREFIX, PROOF_REQUEST_TOPIC, REJECTIONS_TOPIC};
use ed25519_dalek::VerifyingKey;
use notary_proof::envelope::{self, is_envelope, BATCH_SIZE};
use notary_proof::{DeviceFields, Envelope, EnvelopeError, LeafRecord};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Most leaves committed in one transaction.
const MAX_GROUP: usize = 8192;

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
}

impl Intake {
    pub(crate) fn new(
        ingest: SyncSender<IngestItem>,
        proofs: SyncSender<Message>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Intake { ingest: Mutex::new(Some(ingest)), proofs: Mutex::new(Some(proofs)), metrics }
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
        if msg.topic == PROOF_REQUEST_TOPIC {
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
        if msg.topic.starts_with(OWN_PREFIX) {
            return Ok(());
        }
        Metrics::inc(&self.metrics.messages_received_total);
        self.send(IngestItem::Message(msg, None))
    }

    fn submit(&self, msg: Message, done: Responder) -> Result<(), Closed> {
        if msg.topic == PROOF_REQUEST_TOPIC || msg.topic.starts_with(OWN_PREFIX) {
            self.deliver(msg)?;
            done(Outcome::NotLogged);
            return Ok(());
        }
        Metrics::inc(&self.metrics.messages_received_total);
        self.send(IngestItem::Message(msg, Some((done, Answer::Committed))))
    }

    fn submit_judged(&self, msg: Message, done: Responder) -> Result<(), Closed> {
        if msg.topic == PROOF_REQUEST_TOPIC || msg.topic.starts_with(OWN_PREFIX) {
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

/// Ingest: the log's only writer. Judges each message (plain, signed,
/// rejected), assigns sequence numbers, applies registry commands between
/// groups, and commits each group in one transaction.
pub(crate) struct Ingest {
    pub store: Store,
    pub next_seq: u64,
    pub registry: Registry,
    pub policy: DevicePolicy,
    pub sealer: SyncSender<SealerMsg>,
    pub outbox: Arc<dyn Outbox>,
    pub metrics: Arc<Metrics>,
    /// Set when shutdown's deadline has passed: stop retrying commits.
    pub give_up: Arc<AtomicBool>,
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
    Signed { msg: Message, env: Box<Envelope>, key: VerifyingKey, key_seq: u64 },
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
            if self.give_up.load(Relaxed) {
                break;
            }
            match rx.recv_timeout(REGISTRY_POLL) {
                Ok(first) => group.push(first),
                Err(RecvTimeoutError::Timeout) => {
                    self.metrics.health.ingest_progress();
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => break,
            }
            while group.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(item) => group.push(item),
                    Err(_) => break,
                }
            }
            let taken = group.len() as i64;
            // Barriers fire after the group's one commit, which holds every
            // item queued before them.
            let (barriers, items): (Vec<_>, Vec<_>) =
                group.drain(..).partition(|i| matches!(i, IngestItem::Barrier(_)));
            self.process(items.into_iter());
            self.metrics.queue_depth.fetch_sub(taken, Relaxed);
            if self.give_up.load(Relaxed) {
                // Not committed: the barriers stay unfired (their messages
                // are not acknowledged upstream).
                break;
            }
            for b in barriers {
                if let IngestItem::Barrier(done) = b {
                    done();
                }
            }
        }
        let left = rx.try_iter().filter(|i| matches!(i, IngestItem::Message(..))).count();
        if left > 0 || self.give_up.load(Relaxed) {
            Metrics::add(&self.metrics.messages_uncommitted_total, left as u64);
            tracing::error!(
                queued = left,
                "ingest stopped at the shutdown deadline; queued messages were not committed"
            );
        } else {
            tracing::debug!("ingest drained");
        }
    }

    /// Applies queued registry commands, each as a registry leaf.
    fn apply_commands(&mut self) {
        let commands = match self.store.commands(false) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "cannot read queued device commands");
                return;
            }
        };
        if commands.is_empty() {
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
        match self.persist(&commit) {
            Persisted::Done => self.hand_to_sealer(&commit.leaves),
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
                match Registry::load(&self.store) {
                    Ok(r) => self.registry = r,
                    Err(e) => {
                        self.metrics.health.failing(Part::Ingest, format!("cannot reload the registry: {e}"))
                    }
                }
                if !matches!(self.persist(&refused), Persisted::Done) {
                    tracing::error!("could not record the refused commands");
                }
            }
        }
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

    fn process(&mut self, items: impl Iterator<Item = IngestItem>) {
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
        let signed: Vec<(&Envelope, &VerifyingKey)> = judged
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
        // Per leaf: the device counter it raises, for committing leaves one
        // by one if the store refuses the group.
        let mut leaf_counters: Vec<Option<(String, u64)>> = Vec::new();
        let first_seq = self.next_seq;
        // Who waits for each message's outcome, and where it went.
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
        if commit.is_empty() {
            return;
        }
        // What the group's own rejections answer, whatever path commits them.
        let rejected: Vec<Outcome> = commit
            .rejections
            .iter()
            .map(|r| Outcome::Rejected { reason: r.reason, detail: r.detail.clone() })
            .collect();
        let (commit, outcomes) = match self.persist(&commit) {
            Persisted::Done => {
                let outcomes = commit.leaves.iter().map(|l| Outcome::Notarized { seq: l.seq }).collect();
                (commit, outcomes)
            }
            // The responders are dropped unanswered: not committed.
            Persisted::GaveUp => return,
            Persisted::Permanent(e) => {
                tracing::warn!(error = %e, leaves = commit.leaves.len(), "the store refused a group; committing its messages one by one");
                let Some(apart) = self.persist_apart(commit, leaf_counters, first_seq) else { return };
                apart
            }
        };
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
        Metrics::add(&self.metrics.messages_notarized_total, commit.leaves.len() as u64);
        self.hand_to_sealer(&commit.leaves);
        self.announce(&commit.rejections);
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
        let (msg, leaf) = match j {
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
                if let Err(e) = self.store.record_gap(at_ms, missed, self.next_seq) {
                    tracing::error!(error = %e, missed, "could not record gap");
                }
                return;
            }
            Judged::Outage { from_ms, to_ms } => {
                if let Err(e) = self.store.record_outage(from_ms, to_ms, self.next_seq) {
                    tracing::error!(error = %e, from_ms, to_ms, "could not record source outage");
                }
                return;
            }
        };
        let Ok(record) = leaf.encode() else {
            // MQTT topics are at most 65,535 bytes, so this cannot happen.
            tracing::error!(topic_len = msg.topic.len(), "topic too long to encode; message dropped");
            return;
        };
        commit.leaves.push(StoredLeaf { seq: self.next_seq, digest: leaf.payload_digest, record });
        leaf_counters.push(leaf_counter);
        self.next_seq += 1;
    }

    /// Commits a group the store refused as a whole, one message per
    /// transaction: a message the store refuses becomes a rejection
    /// (`unstorable`), and the leaves after it are renumbered so the log
    /// keeps no holes. Returns what was committed and, for each leaf of the
    /// group in order, what became of it; `None` if shutdown gave up
    /// meanwhile.
    fn persist_apart(
        &mut self,
        group: Commit,
        leaf_counters: Vec<Option<(String, u64)>>,
        first_seq: u64,
    ) -> Option<(Commit, Vec<Outcome>)> {
        let mut done = Commit::default();
        let mut outcomes = Vec::with_capacity(group.leaves.len());
        let mut next = first_seq;
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
            match self.persist(&one) {
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
                    match self.persist(&Commit { rejections: vec![r.clone()], ..Commit::default() }) {
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
            match self.persist(&Commit { rejections: vec![r.clone()], ..Commit::default() }) {
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
            self.metrics.count_rejection(r.reason);
            if i < REJECTIONS_LOGGED {
                tracing::warn!(topic = %r.topic, reason = r.reason.as_str(), detail = %r.detail, device = ?r.device, "message rejected");
            }
            let event = serde_json::to_vec(r).unwrap_or_default();
            if !self.outbox.publish(REJECTIONS_TOPIC, event, false) {
                Metrics::inc(&self.metrics.outbox_dropped_total);
            }
        }
        if rejections.len() > REJECTIONS_LOGGED {
            tracing::warn!(
                more = rejections.len() - REJECTIONS_LOGGED,
                "further messages rejected in this group"
            );
        }
    }

    fn hand_to_sealer(&self, leaves: &[StoredLeaf]) {
        let hashes =
            leaves.iter().map(|l| (l.seq, notary_proof::hash::leaf_hash(&l.record))).collect::<Vec<_>>();
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

/// Verifies envelopes on every core: in ed25519 batches, split across
/// scoped threads when there are enough of them.
fn verify_parallel(items: &[(&Envelope, &VerifyingKey)]) -> Vec<bool> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(8);
    if threads == 1 || items.len() < 2 * BATCH_SIZE {
        return envelope::verify_batch(items);
    }
    let per = items.len().div_ceil(threads).next_multiple_of(BATCH_SIZE);
    std::thread::scope(|s| {
        let handles: Vec<_> =
            items.chunks(per).map(|c| (c.len(), s.spawn(move || envelope::verify_batch(c)))).collect();
        handles.into_iter().flat_map(|(n, h)| h.join().unwrap_or_else(|_| vec![false; n])).collect()
    })
}
