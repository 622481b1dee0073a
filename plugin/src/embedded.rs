//! The embedded rumqttd broker as a message source. This is the only module
//! that names rumqttd types; the rest of the pipeline sees [`Sink`] and
//! [`Outbox`].
//!
//! rumqttd hands an embedding program every publish through a local link
//! subscribed to `#`. It does not tell us the sender, cannot hold a publish
//! back, and stalls a link that does not answer `Unschedule` with a wake-up
//! (after `max_outgoing_packet_count` messages), which we do. Each forward
//! carries the absolute offset of the message in rumqttd's commit log; a
//! jump means rumqttd dropped messages before we read them (a gap).
//!
//! Only an MQTT 3.1.1 listener is configured: rumqttd 0.20 panics when a
//! publish with MQTT 5 properties is routed to a 3.1.1 subscriber, so a
//! single protocol keeps the broker uncrashable, and our own publishes
//! never carry properties.

use crate::auth::PasswordFile;
use crate::source::{now_ms, Message, Outbox, Sink};
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::{Packet, Publish};
use rumqttd::{Broker, Config, ConnectionSettings, Notification, RouterConfig, ServerSettings};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;

/// Publishes queued by the pipeline and not yet handed to rumqttd.
const OUTBOX_CAPACITY: usize = 4096;

#[derive(Debug, Clone)]
pub struct EmbeddedSettings {
    /// The MQTT 3.1.1 listener.
    pub listen: SocketAddr,
    pub max_connections: usize,
    pub max_payload_bytes: usize,
    /// How long a new connection may take to send CONNECT.
    pub connection_timeout_ms: u16,
    /// QoS 1/2 messages in flight per connection.
    pub max_inflight: usize,
    /// rumqttd keeps up to `segment_bytes * segment_count` of backlog in
    /// memory per subscription filter before dropping the oldest.
    pub segment_bytes: usize,
    pub segment_count: usize,
    /// When set, every client must log in with a user and password from it.
    pub passwords: Option<Arc<PasswordFile>>,
}

#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    #[error("cannot listen for MQTT on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("embedded broker: {0}")]
    Broker(String),
}

fn rumqttd_config(s: &EmbeddedSettings) -> Config {
    let mut listener = ServerSettings {
        name: "mqtt-v4".into(),
        listen: s.listen,
        tls: None,
        next_connection_delay_ms: 1,
        connections: ConnectionSettings {
            connection_timeout_ms: s.connection_timeout_ms,
            max_payload_size: s.max_payload_bytes,
            max_inflight_count: s.max_inflight,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    if let Some(passwords) = &s.passwords {
        let passwords = passwords.clone();
        // Password hashing (PBKDF2, as many iterations as the file says)
        // runs on the blocking pool, never on the threads that serve
        // connections.
        listener.set_auth_handler(move |_client_id: String, user: String, password: String| {
            let passwords = passwords.clone();
            async move {
                let name = user.clone();
                let check = move || passwords.check(&name, password.as_bytes());
                let ok = tokio::task::spawn_blocking(check).await.unwrap_or(false);
                if !ok {
                    tracing::warn!(%user, "MQTT login refused");
                }
                ok
            }
        });
    }
    Config {
        router: RouterConfig {
            max_connections: s.max_connections,
            max_outgoing_packet_count: 200,
            max_segment_size: s.segment_bytes,
            max_segment_count: s.segment_count,
            ..Default::default()
        },
        v4: Some(HashMap::from([("mqtt".to_owned(), listener)])),
        ..Default::default()
    }
}

/// Starts rumqttd with a link into `sink`; returns the outbox for publishing.
pub fn start(settings: &EmbeddedSettings, sink: Arc<dyn Sink>) -> Result<Arc<dyn Outbox>, EmbeddedError> {
    // rumqttd only logs a failed bind from its own thread; check it here so
    // the operator gets an error and a non-zero exit instead.
    std::net::TcpListener::bind(settings.listen)
        .map_err(|source| EmbeddedError::Bind { addr: settings.listen, source })?;

    let mut broker = Broker::new(rumqttd_config(settings));
    // A random client id: a device that connects with our link's id would
    // otherwise take over the link.
    let mut id = [0u8; 8];
    getrandom::getrandom(&mut id).map_err(|e| EmbeddedError::Broker(e.to_string()))?;
    let (mut tx, rx) = broker
        .link(&format!("notary-link-{}", hex::encode(id)))
        .map_err(|e| EmbeddedError::Broker(e.to_string()))?;
    tx.subscribe("#").map_err(|e| EmbeddedError::Broker(e.to_string()))?;

    let router_sink = sink.clone();
    spawn("rumqttd", move || {
        let why = match broker.start() {
            Err(e) => format!("the embedded broker stopped: {e}"),
            Ok(()) => "the embedded broker stopped".to_owned(),
        };
        router_sink.stopped(&why);
    })?;
    spawn("notary-link", move || read_link(rx, sink))?;
    let (out_tx, out_rx) = sync_channel(OUTBOX_CAPACITY);
    spawn("notary-outbox", move || write_link(tx, out_rx))?;
    Ok(Arc::new(LinkOutbox { tx: out_tx }))
}

/// Runs rumqttd with the same listener and router settings as [`start`]
/// but without the notary link: plain rumqttd, the benchmark's baseline.
/// Returns only when the broker stops.
pub fn run_plain(settings: &EmbeddedSettings) -> Result<(), EmbeddedError> {
    std::net::TcpListener::bind(settings.listen)
        .map_err(|source| EmbeddedError::Bind { addr: settings.listen, source })?;
    Broker::new(rumqttd_config(settings)).start().map_err(|e| EmbeddedError::Broker(e.to_string()))
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<(), EmbeddedError> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map(drop)
        .map_err(|e| EmbeddedError::Broker(e.to_string()))
}

fn read_link(mut rx: LinkRx, sink: Arc<dyn Sink>) {
    let mut next_offset: Option<u64> = None;
    loop {
        let notification = match rx.recv() {
            Ok(Some(n)) => n,
            Ok(None) => continue,
            Err(e) => {
                sink.stopped(&format!("the embedded broker's link closed: {e}"));
                return;
            }
        };
        match notification {
            Notification::Forward(forward) => {
                if let Some((_, offset)) = forward.cursor {
                    match next_offset {
                        Some(expected) if offset > expected => sink.gap(offset - expected),
                        // Offsets only grow; an old one is a re-delivery of
                        // a message we already took. Never notarize it twice.
                        Some(expected) if offset < expected => {
                            sink.redelivered(expected - offset);
                            tracing::warn!(offset, expected, "broker re-delivered a message; skipped");
                            continue;
                        }
                        _ => {}
                    }
                    next_offset = Some(offset + 1);
                }
                let publish = forward.publish;
                let Ok(topic) = String::from_utf8(publish.topic.to_vec()) else {
                    tracing::warn!("publish with a non-UTF-8 topic ignored");
                    continue;
                };
                let msg = Message { topic, payload: publish.payload.to_vec(), received_at_ms: now_ms() };
                if sink.deliver(msg).is_err() {
                    tracing::debug!("pipeline closed; broker link stops reading");
                    return;
                }
            }
            Notification::Unschedule => {
                if let Err(e) = rx.ready() {
                    sink.stopped(&format!("cannot wake the embedded broker's link: {e}"));
                    return;
                }
            }
            _ => {}
        }
    }
}

struct Out {
    topic: String,
    payload: Vec<u8>,
    retain: bool,
}

fn write_link(mut tx: LinkTx, rx: Receiver<Out>) {
    // LinkTx::send is async only in name; a tiny runtime drives it.
    let rt = match tokio::runtime::Builder::new_current_thread().build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "outbox cannot start");
            return;
        }
    };
    while let Ok(out) = rx.recv() {
        let publish = Publish::new(out.topic.into_bytes(), out.payload, out.retain);
        // No v5 properties, ever: they crash rumqttd's v4 encoder.
        if let Err(e) = rt.block_on(tx.send(Packet::Publish(publish, None))) {
            tracing::error!(error = %e, "broker link closed; outbox stops");
            return;
        }
    }
}

struct LinkOutbox {
    tx: SyncSender<Out>,
}

impl Outbox for LinkOutbox {
    fn publish(&self, topic: &str, payload: Vec<u8>, retain: bool) -> bool {
        self.tx.try_send(Out { topic: topic.to_owned(), payload, retain }).is_ok()
    }
}
