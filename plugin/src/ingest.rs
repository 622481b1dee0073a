//! Ingest: takes messages from a source, persists them as leaves with group
//! commit, and hands their hashes to the sealer.
//!
//! Queue policy: the queue between source and ingest is bounded. When it is
//! full, `deliver` blocks, so the source stops reading: the embedded broker
//! then keeps the backlog in its own commit log, and if that overflows too,
//! the source reports a gap, which is logged, counted and stored. Nothing is
//! dropped silently. Proof requests travel on their own queue and never wait
//! behind ingest; when that queue is full they are dropped and counted.

use crate::metrics::Metrics;
use crate::sealer::SealerMsg;
use crate::source::{now_ms, Closed, Message, Sink};
use crate::store::{Store, StoredLeaf};
use notary_proof::LeafRecord;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Topics under this prefix belong to mqtt-notary and are never notarized.
pub const OWN_PREFIX: &str = "notary/";
pub const PROOF_REQUEST_TOPIC: &str = "notary/proof/request";
/// Most leaves committed in one transaction.
const MAX_GROUP: usize = 4096;

pub(crate) enum IngestItem {
    Message(Message),
    Gap { missed: u64, at_ms: u64 },
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
        self.send(IngestItem::Message(msg))
    }

    fn redelivered(&self, _behind: u64) {
        Metrics::inc(&self.metrics.redelivered_skipped_total);
    }

    fn gap(&self, missed: u64) {
        Metrics::inc(&self.metrics.gap_events_total);
        Metrics::add(&self.metrics.gap_messages_total, missed);
        tracing::warn!(missed, "source lost messages before notarization (gap)");
        let _ = self.send(IngestItem::Gap { missed, at_ms: now_ms() });
    }
}

/// The ingest loop; returns when every sender is gone and the queue is empty.
pub(crate) fn run(
    rx: Receiver<IngestItem>,
    mut store: Store,
    mut next_seq: u64,
    sealer: SyncSender<SealerMsg>,
    metrics: Arc<Metrics>,
) {
    let mut group: Vec<IngestItem> = Vec::with_capacity(MAX_GROUP);
    while let Ok(first) = rx.recv() {
        group.push(first);
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(item) => group.push(item),
                Err(_) => break,
            }
        }
        let taken = group.len() as i64;
        let mut leaves = Vec::with_capacity(group.len());
        for item in group.drain(..) {
            match item {
                IngestItem::Message(m) => {
                    let leaf = LeafRecord::broker_received(next_seq, m.received_at_ms, &m.topic, &m.payload);
                    let Ok(record) = leaf.encode() else {
                        // MQTT topics are at most 65,535 bytes, so this cannot happen.
                        tracing::error!(
                            topic_len = m.topic.len(),
                            "topic too long to encode; message rejected"
                        );
                        continue;
                    };
                    leaves.push(StoredLeaf { seq: next_seq, digest: leaf.payload_digest, record });
                    next_seq += 1;
                }
                IngestItem::Gap { missed, at_ms } => {
                    if let Err(e) = store.record_gap(at_ms, missed, next_seq) {
                        tracing::error!(error = %e, missed, "could not record gap");
                    }
                }
            }
        }
        persist(&mut store, &leaves);
        metrics.queue_depth.fetch_sub(taken, Relaxed);
        Metrics::add(&metrics.messages_notarized_total, leaves.len() as u64);
        let hashes =
            leaves.iter().map(|l| (l.seq, notary_proof::hash::leaf_hash(&l.record))).collect::<Vec<_>>();
        if !hashes.is_empty() && sealer.send(SealerMsg::Leaves(hashes)).is_err() {
            tracing::error!("sealer is gone; persisted leaves will be sealed at next start");
        }
    }
    tracing::debug!("ingest drained");
}

/// Commits leaves, retrying until the store takes them: a leaf that was
/// accepted must not be dropped because the disk was briefly full.
fn persist(store: &mut Store, leaves: &[StoredLeaf]) {
    let mut delay = Duration::from_millis(10);
    while let Err(e) = store.append_leaves(leaves) {
        tracing::error!(error = %e, count = leaves.len(), "cannot persist leaves; retrying");
        std::thread::sleep(delay);
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}
