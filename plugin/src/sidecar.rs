//! An external MQTT broker (Mosquitto, EMQX, HiveMQ, ...) as a message
//! source: the sidecar subscribes to it as a client (rumqttc) and serves
//! proofs on it. This module and `embedded.rs` are the two sources; the rest
//! of the pipeline sees only [`Sink`] and [`Outbox`].
//!
//! Delivery: a persistent session (clean session off, a fixed client id)
//! and QoS 1 subscriptions, so the broker keeps messages for the sidecar
//! while it is away. QoS 1 publishes are acknowledged only after ingest has
//! persisted them ([`Sink::after_commit`]), so a crash of the sidecar loses
//! nothing the broker handed over: unacknowledged messages are redelivered
//! at the next connection. QoS 1 is at-least-once, so a message redelivered
//! after a reconnect may be notarized twice (two leaves, both provable).
//! QoS 0 messages published while the sidecar is disconnected never reach
//! it: every disconnected window is logged, counted and exposed.
//!
//! Nudge and probe: Mosquitto 2.0.11 (Debian's) moves messages it queued
//! for a client into flight when a new message for that client arrives,
//! but not reliably when the client acknowledges one, and after a session
//! resumed under load it was seen to stop delivering altogether. A sidecar
//! that acknowledges in batches after each commit (as it must) then got a
//! backlog at one in-flight window per new message (measured: 120
//! messages/s with 20 in flight), or not at all. Two messages to topics
//! under `$notary/sidecar/<client id>/`, which only the sidecar subscribes
//! to (`$` topics, so `#` subscribers never see them), keep it flowing:
//! - after each batch of acknowledgements, an empty QoS 0 `nudge`, whose
//!   arrival makes the broker refill the sidecar's in-flight window;
//! - at most one QoS 1 `probe` outstanding, sent at least every second: it
//!   comes back only through the same window as the messages owed. If it
//!   has not come back and nothing else has arrived for
//!   [`PROBE_TIMEOUT_MS`], while the sidecar itself holds nothing
//!   unacknowledged, the broker is owing and not delivering: the stall is
//!   logged, counted (`notary_source_stalls_total`), shown in `/healthz`
//!   (`source`), and the sidecar reconnects, which makes the broker resend.

use crate::health::Part;
use crate::metrics::Metrics;
use crate::source::{now_ms, Message, Outbox, Sink};
use rumqttc::{Client, Event, MqttOptions, Packet, Publish, QoS, SubscribeFilter, SubscribeReasonCode};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Publishes queued for the upstream broker (answers, checkpoints).
const OUTBOX_CAPACITY: usize = 4096;
/// Acknowledge after a commit at least this often while messages wait.
const ACK_EVERY: Duration = Duration::from_millis(20);
/// ...and at once when this many wait (brokers cap unacknowledged QoS 1
/// messages per client: Mosquitto's `max_inflight_messages` is 20).
const ACK_BATCH: usize = 16;

#[derive(Clone)]
pub struct SidecarSettings {
    pub host: String,
    pub port: u16,
    /// Fixed, so the broker keeps the session across restarts.
    pub client_id: String,
    /// Topic filters to notarize (QoS 1), e.g. `#`.
    pub topics: Vec<String>,
    /// Share the load with other sidecars: the topics are subscribed as
    /// `$share/<group>/<filter>`, every member subscribes to proof requests
    /// itself, and the retained checkpoint goes to
    /// `$notary/checkpoint/<log name>` (one per member's log).
    pub group: Option<String>,
    /// The log's name (for the group's checkpoint topic).
    pub log_name: String,
    pub username: Option<String>,
    pub password: Option<String>,
    pub keep_alive_s: u64,
    pub max_payload_bytes: usize,
    /// Longest wait between reconnection attempts.
    pub max_retry_ms: u64,
    /// Reach the broker over TLS with this client configuration.
    pub tls: Option<Arc<tokio_rustls::rustls::ClientConfig>>,
    /// Where the sidecar notes, every second while connected, that it was
    /// receiving; at the next start the time since is recorded as an outage.
    pub alive_file: std::path::PathBuf,
    /// The notary's topic names on that broker.
    pub notary_topics: crate::Topics,
}

/// How often the alive file is rewritten while connected.
const ALIVE_EVERY_MS: u64 = 1000;

fn read_alive(path: &std::path::Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

struct Outgoing {
    client: Client,
    /// In a group: where this member's retained checkpoint goes instead of
    /// the checkpoint topic.
    checkpoint_topic: Option<(&'static str, String)>,
}

impl Outbox for Outgoing {
    fn publish(&self, topic: &str, payload: Vec<u8>, retain: bool) -> bool {
        let topic = match &self.checkpoint_topic {
            Some((shared, own)) if topic == *shared => own.as_str(),
            _ => topic,
        };
        self.client.try_publish(topic, QoS::AtLeastOnce, retain, payload).is_ok()
    }
}

/// The root of the sidecar's own nudge and probe topics (module docs).
pub fn own_topics(client_id: &str) -> String {
    format!("$notary/sidecar/{}", client_id.replace(['+', '#', '/'], "-"))
}

/// The filters to subscribe: the topics, shared in a group, and then the
/// proof requests for every member. (`#` covers the legacy request topic,
/// outside a group, and subscribing it twice would bring each request
/// twice; no filter starting with a wildcard covers `$notary/...`.)
pub fn subscriptions(topics: &[String], group: Option<&str>, notary: crate::Topics) -> Vec<String> {
    let request = (group.is_some() || !notary.is_legacy()).then(|| notary.proof_request().to_owned());
    match group {
        None => topics.iter().cloned().chain(request).collect(),
        Some(g) => topics.iter().map(|t| format!("$share/{g}/{t}")).chain(request).collect(),
    }
}

/// How long a probe may stay away, with nothing else arriving and nothing
/// unacknowledged, before the broker is taken to have stalled.
pub const PROBE_TIMEOUT_MS: u64 = 5_000;
/// A probe is sent at least this often.
const PROBE_EVERY_MS: u64 = 1_000;

/// The nudge and the probe (see the module docs).
struct Probe {
    nudge_topic: String,
    probe_topic: String,
    /// When the outstanding probe was sent; 0: none outstanding.
    sent_ms: AtomicU64,
    /// When the last probe was sent.
    last_sent_ms: AtomicU64,
    /// When the last QoS 1 message (of any topic) arrived.
    last_rx_ms: AtomicU64,
    /// QoS 1 messages received and not yet acknowledged upstream.
    unacked: AtomicU64,
    /// A stall is reported in `/healthz` until the next message arrives.
    reported: std::sync::atomic::AtomicBool,
}

impl Probe {
    fn new(client_id: &str) -> Self {
        let base = own_topics(client_id);
        Probe {
            nudge_topic: format!("{base}/nudge"),
            probe_topic: format!("{base}/probe"),
            sent_ms: AtomicU64::new(0),
            last_sent_ms: AtomicU64::new(0),
            last_rx_ms: AtomicU64::new(now_ms()),
            unacked: AtomicU64::new(0),
            reported: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Sends a probe unless one is outstanding or one was sent recently.
    fn maybe_send(&self, client: &Client, now: u64) {
        if self.sent_ms.load(Relaxed) != 0 || now < self.last_sent_ms.load(Relaxed) + PROBE_EVERY_MS {
            return;
        }
        if client.try_publish(self.probe_topic.clone(), QoS::AtLeastOnce, false, Vec::new()).is_ok() {
            self.sent_ms.store(now, Relaxed);
            self.last_sent_ms.store(now, Relaxed);
        }
    }

    /// A QoS 1 message arrived; `echo` if it is our probe.
    fn received(&self, echo: bool, metrics: &Metrics) {
        self.last_rx_ms.store(now_ms(), Relaxed);
        if echo {
            self.sent_ms.store(0, Relaxed);
        }
        if self.reported.swap(false, Relaxed) {
            metrics.health.recovered(Part::Source);
        }
    }

    /// Whether the broker has stalled: a probe outstanding and nothing
    /// received for PROBE_TIMEOUT_MS, with nothing of ours unacknowledged.
    fn stalled(&self, now: u64) -> bool {
        let sent = self.sent_ms.load(Relaxed);
        sent != 0
            && now >= sent + PROBE_TIMEOUT_MS
            && now >= self.last_rx_ms.load(Relaxed) + PROBE_TIMEOUT_MS
            && self.unacked.load(Relaxed) == 0
    }

    /// Forgets the outstanding probe (a new connection).
    fn reset(&self) {
        self.sent_ms.store(0, Relaxed);
        self.last_rx_ms.store(now_ms(), Relaxed);
    }
}

/// QoS 1 publishes delivered to the pipeline and not yet acknowledged.
struct Acks {
    client: Client,
    waiting: Mutex<Vec<Publish>>,
    probe: Arc<Probe>,
}

impl Acks {
    /// Hands the waiting publishes to the pipeline's next commit, which
    /// acknowledges them upstream.
    fn flush(self: &Arc<Self>, sink: &dyn Sink) {
        let batch = match self.waiting.lock() {
            Ok(mut w) if !w.is_empty() => std::mem::take(&mut *w),
            _ => return,
        };
        let client = self.client.clone();
        let probe = self.probe.clone();
        let done = Box::new(move || {
            for p in &batch {
                // A full request queue only delays the acknowledgement: the
                // broker redelivers at the next connection.
                let _ = client.try_ack(p);
            }
            probe.unacked.fetch_sub(batch.len() as u64, Relaxed);
            let _ = client.try_publish(probe.nudge_topic.clone(), QoS::AtMostOnce, false, Vec::new());
        });
        let _ = sink.after_commit(done);
    }

    fn push(&self, p: Publish) -> usize {
        self.probe.unacked.fetch_add(1, Relaxed);
        match self.waiting.lock() {
            Ok(mut w) => {
                w.push(p);
                w.len()
            }
            Err(_) => 0,
        }
    }
}

/// Connects (and keeps reconnecting) to the upstream broker on threads of
/// its own; returns the outbox that publishes there.
pub fn start(
    s: &SidecarSettings,
    sink: Arc<dyn Sink>,
    metrics: Arc<Metrics>,
) -> std::io::Result<Arc<dyn Outbox>> {
    let mut opts = MqttOptions::new(&s.client_id, &s.host, s.port);
    opts.set_clean_session(false)
        .set_manual_acks(true)
        .set_keep_alive(Duration::from_secs(s.keep_alive_s.max(5)))
        .set_max_packet_size(s.max_payload_bytes + 64 * 1024, s.max_payload_bytes + 64 * 1024);
    if let (Some(u), Some(p)) = (&s.username, &s.password) {
        opts.set_credentials(u, p);
    }
    if let Some(tls) = &s.tls {
        opts.set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(
            tls.clone(),
        )));
    }
    let (client, mut connection) = Client::new(opts, OUTBOX_CAPACITY);
    let probe = Arc::new(Probe::new(&s.client_id));
    let acks =
        Arc::new(Acks { client: client.clone(), waiting: Mutex::new(Vec::new()), probe: probe.clone() });

    // The ticker: acknowledges what waits, so a slow trickle is not held,
    // and notes that the sidecar is alive and connected.
    let (ticker_acks, ticker_sink, ticker_metrics) = (acks.clone(), sink.clone(), metrics.clone());
    let (ticker_probe, ticker_client) = (probe.clone(), client.clone());
    let alive_file = s.alive_file.clone();
    std::thread::Builder::new().name("notary-sidecar-acks".into()).spawn(move || {
        let mut last_alive = 0;
        loop {
            std::thread::sleep(ACK_EVERY);
            ticker_acks.flush(&*ticker_sink);
            let now = now_ms();
            if ticker_metrics.source_connected.load(Relaxed) == 1 {
                if ticker_probe.stalled(now) {
                    Metrics::inc(&ticker_metrics.source_stalls_total);
                    ticker_metrics.health.failing(
                        Part::Source,
                        "the upstream broker stopped delivering while it owed messages; reconnecting",
                    );
                    tracing::warn!(
                        timeout_ms = PROBE_TIMEOUT_MS,
                        "the upstream broker stopped delivering (the probe did not come back); reconnecting"
                    );
                    ticker_probe.reset();
                    ticker_probe.reported.store(true, Relaxed);
                    let _ = ticker_client.try_disconnect();
                } else {
                    ticker_probe.maybe_send(&ticker_client, now);
                }
            }
            if ticker_metrics.source_connected.load(Relaxed) == 1 && now >= last_alive + ALIVE_EVERY_MS {
                if let Err(e) = std::fs::write(&alive_file, now.to_string()) {
                    tracing::warn!(file = %alive_file.display(), error = %e, "cannot note that the sidecar is alive");
                }
                last_alive = now;
            }
            if Arc::strong_count(&ticker_acks) == 1 {
                return; // the connection thread is gone
            }
        }
    })?;

    let mut settings = s.clone();
    settings.topics = subscriptions(&s.topics, s.group.as_deref(), s.notary_topics);
    settings.topics.push(format!("{}/+", own_topics(&s.client_id)));
    let sub_client = client.clone();
    std::thread::Builder::new().name("notary-sidecar".into()).spawn(move || {
        let mut retry_ms = 0u64;
        // The last run's last sign of life: the time since is an outage.
        let mut down_since: Option<u64> = read_alive(&settings.alive_file);
        for event in connection.iter() {
            match event {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    retry_ms = 0;
                    probe.reset();
                    tracing::info!(
                        broker = %format!("{}:{}", settings.host, settings.port),
                        session_present = ack.session_present,
                        "connected to the upstream broker"
                    );
                    // Always subscribe: a broker that lost the session (a
                    // restart without persistence) lost the subscription too.
                    let filters =
                        settings.topics.iter().map(|t| SubscribeFilter::new(t.clone(), QoS::AtLeastOnce));
                    if let Err(e) = sub_client.try_subscribe_many(filters) {
                        tracing::error!(error = %e, "cannot subscribe");
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    let refused = ack.return_codes.iter().filter(|c| matches!(c, SubscribeReasonCode::Failure)).count();
                    if refused > 0 {
                        tracing::error!(refused, topics = ?settings.topics, "the upstream broker refused subscriptions (check its ACLs)");
                    }
                    metrics.source_connected.store(1, Relaxed);
                    if let Some(since) = down_since.take() {
                        sink.outage(since, now_ms());
                    }
                    tracing::info!(topics = ?settings.topics, "subscribed; notarizing");
                }
                Ok(Event::Incoming(Packet::Publish(p))) if p.topic == probe.nudge_topic => {}
                Ok(Event::Incoming(Packet::Publish(p))) if p.topic == probe.probe_topic => {
                    probe.received(true, &metrics);
                    if p.qos != QoS::AtMostOnce {
                        // Acknowledged like any message, never notarized.
                        acks.push(p);
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if p.qos != QoS::AtMostOnce {
                        probe.received(false, &metrics);
                    }
                    let topic = p.topic.clone();
                    let msg = Message::new(topic, p.payload.to_vec(), now_ms());
                    if sink.deliver(msg).is_err() {
                        tracing::info!("pipeline closed; sidecar stops reading");
                        return;
                    }
                    if p.qos != QoS::AtMostOnce && acks.push(p) >= ACK_BATCH {
                        acks.flush(&*sink);
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    if metrics.source_connected.swap(0, Relaxed) == 1 {
                        down_since = Some(now_ms());
                        Metrics::inc(&metrics.source_disconnects_total);
                        tracing::warn!(error = %e, "lost the upstream broker; QoS 0 messages published meanwhile are not notarized");
                    } else if retry_ms == 0 {
                        tracing::warn!(error = %e, "cannot reach the upstream broker; retrying");
                    } else {
                        tracing::debug!(error = %e, "upstream broker still unreachable");
                    }
                    // Unacknowledged QoS 1 messages will be redelivered.
                    if let Ok(mut w) = acks.waiting.lock() {
                        probe.unacked.fetch_sub(w.len() as u64, Relaxed);
                        w.clear();
                    }
                    retry_ms = (retry_ms * 2).clamp(100, settings.max_retry_ms.max(100));
                    std::thread::sleep(Duration::from_millis(retry_ms));
                }
            }
        }
    })?;
    let shared = s.notary_topics.checkpoint();
    let checkpoint_topic = s.group.as_ref().map(|_| (shared, format!("{shared}/{}", s.log_name)));
    Ok(Arc::new(Outgoing { client, checkpoint_topic }))
}
