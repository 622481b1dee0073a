//! The embedded broker: rmqtt, used as a library, with the notary's hook in
//! every publish's path. This module and its children are the only code
//! that names rmqtt types; the rest of the pipeline sees [`Sink`] and
//! [`Outbox`].
//!
//! rmqtt awaits its `MessagePublishCheckAcl` hook before it forwards a
//! message to subscribers or the retained store and before it sends
//! PUBACK/PUBREC. Our hook ([`hook`]) hands each message to the pipeline
//! and answers from its verdict:
//!
//! - QoS 1 and 2 (with `ack = "after-commit"`): after the leaf or the
//!   rejection is committed. A crash can lose nothing that was acknowledged.
//! - QoS 0 (and QoS 1/2 with `ack = "on-receipt"`): as soon as the message
//!   is judged; its commit follows without holding delivery. A plain
//!   message on a topic that does not require a signature is judged here
//!   at once ([`DevicePolicy::takes_plain`]).
//!
//! A rejected message is never forwarded: MQTT 5 publishers get reason
//! 0x87 or 0x99 with the rejection as reason string; MQTT 3.1.1 ones have
//! it dropped or are disconnected (`reject_v311`).

mod hook;
mod probe;

use crate::auth::Logins;
use crate::metrics::Metrics;
use crate::registry::DevicePolicy;
use crate::source::{Asker, Outbox, Sink};
use crate::topics::Topics;
use bytes::Bytes;
use hook::{NotaryHook, Work};
use rmqtt::context::ServerContext;
use rmqtt::hook::Type;
use rmqtt::net::Builder;
use rmqtt::server::MqttServer;
use rmqtt::session::SessionState;
use rmqtt::types::{ClientId, CodecPublish, From, Id, Publish, QoS, UserName};
use std::net::SocketAddr;
use std::num::NonZeroU16;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Publishes queued by the pipeline and not yet handed to the broker.
const OUTBOX_CAPACITY: usize = 4096;
/// Messages between the hook and the thread that hands them to the
/// pipeline (whose `Sink` calls may block on back-pressure).
const HANDOFF_CAPACITY: usize = 1024;
/// Room for a PUBLISH's fixed and variable header (the longest topic MQTT
/// allows, packet id, properties) on top of `max_payload_bytes`.
const HEADER_ROOM: usize = 65_536 + 1024;

/// Topic aliases an MQTT 5 client may set (Mosquitto's default too).
const TOPIC_ALIASES: u16 = 10;

/// When a QoS 1 or 2 publisher gets its PUBACK / PUBREC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckMode {
    /// After the leaf (or the rejection) is committed: nothing acknowledged
    /// can be lost. A publisher's rate is one message per commit per
    /// connection (rmqtt handles a connection's packets one at a time).
    AfterCommit,
    /// As soon as the message is judged; the commit follows. Reopens the
    /// window of a crash between acknowledgement and commit.
    OnReceipt,
}

/// What an MQTT 3.1.1 publisher gets for a rejected message (3.1.1 has
/// no reason codes in PUBACK).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectV311 {
    /// Acknowledged as the protocol requires, never forwarded.
    Drop,
    /// The connection is closed without an acknowledgement.
    Disconnect,
}

#[derive(Debug, Clone)]
pub struct EmbeddedSettings {
    /// The MQTT listener (3.1, 3.1.1 and 5 on one port).
    pub listen: SocketAddr,
    /// Sessions (connected or kept for a later reconnect) at most; a new
    /// client past it is refused with CONNACK "server unavailable".
    pub max_connections: usize,
    pub max_payload_bytes: usize,
    /// How long a client may take to complete its CONNECT once its first
    /// bytes arrived (rmqtt waits for those without a limit).
    pub connection_timeout_ms: u16,
    /// QoS 1/2 messages in flight per connection, each way.
    pub max_inflight: u16,
    /// Messages queued per session for a slow or offline subscriber; the
    /// oldest is dropped past it.
    pub max_queued_messages: usize,
    /// The password file (every client must then log in) and the ACL file
    /// in force, reloaded together on SIGHUP.
    pub logins: Arc<Logins>,
    pub ack: AckMode,
    pub reject_v311: RejectV311,
    /// The devices policy, for judging plain messages in the hook.
    pub policy: DevicePolicy,
    /// The notary's topic names.
    pub topics: Topics,
}

#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    #[error("cannot listen for MQTT on {addr}: {why}")]
    Bind { addr: SocketAddr, why: String },
    #[error("embedded broker: {0}")]
    Broker(String),
}

fn broker_err(e: impl std::fmt::Display) -> EmbeddedError {
    EmbeddedError::Broker(e.to_string())
}

/// The rmqtt server context with the plugins we use: retained messages in
/// memory and `$SYS` statistics.
async fn context(s: &EmbeddedSettings) -> Result<ServerContext, EmbeddedError> {
    let scx = ServerContext::new()
        // rmqtt's busy check refuses CONNECTs while the host's load is
        // high; a notary refuses only at its configured limits.
        .busy_check_enable(false)
        .mqtt_max_sessions(s.max_connections.try_into().unwrap_or(isize::MAX))
        .plugins_config_map_add("rmqtt-retainer", "storage.type = \"ram\"\n")
        .plugins_config_map_add("rmqtt-sys-topic", "publish_interval = \"10s\"\n")
        .build()
        .await;
    *scx.extends.shared_subscription_mut().await = Box::new(RoundRobin::default());
    rmqtt_retainer::register(&scx, true, false).await.map_err(broker_err)?;
    rmqtt_sys_topic::register(&scx, true, false).await.map_err(broker_err)?;
    Ok(scx)
}

fn listener(s: &EmbeddedSettings, anonymous: bool) -> Result<rmqtt::net::Listener, EmbeddedError> {
    let packet = s.max_payload_bytes.saturating_add(HEADER_ROOM).try_into().unwrap_or(u32::MAX);
    Builder::new()
        .name("mqtt")
        .laddr(s.listen)
        // A restart must not wait for the last run's connections to leave
        // TIME_WAIT (what Mosquitto and Rust's std listeners do too).
        .reuseaddr(Some(true))
        // Acknowledgements are small packets sent after a commit: without
        // TCP_NODELAY, Nagle and delayed ACKs hold each for ~40 ms.
        .nodelay(true)
        .max_packet_size(packet)
        .max_inflight(NonZeroU16::new(s.max_inflight).unwrap_or(NonZeroU16::MIN))
        .max_mqueue_len(s.max_queued_messages)
        .handshake_timeout(Duration::from_millis(s.connection_timeout_ms.into()))
        .allow_zero_keepalive(true)
        // MQTT 5 topic aliases from clients, as many as Mosquitto allows.
        .max_topic_aliases(TOPIC_ALIASES)
        .allow_anonymous(anonymous)
        .bind()
        .and_then(|b| b.tcp())
        .map_err(|e| EmbeddedError::Bind { addr: s.listen, why: format!("{e:#}") })
}

/// Starts the broker on the current tokio runtime, with its hook handing
/// every publish to `sink`; returns the outbox for the pipeline's own
/// publishes.
pub async fn start(
    settings: &EmbeddedSettings,
    sink: Arc<dyn Sink>,
    metrics: Arc<Metrics>,
) -> Result<Arc<dyn Outbox>, EmbeddedError> {
    let scx = context(settings).await?;
    // Every CONNECT goes through our hook (wills are judged there).
    let listener = listener(settings, false)?;

    let (work_tx, work_rx) = mpsc::channel::<Work>(HANDOFF_CAPACITY);
    let handoff_sink = sink.clone();
    std::thread::Builder::new()
        .name("notary-handoff".into())
        .spawn(move || hook::hand_off(work_rx, handoff_sink))
        .map_err(broker_err)?;
    let mut nonce = [0u8; 8];
    getrandom::getrandom(&mut nonce).map_err(broker_err)?;
    let probe_id = format!("$notary-probe-{}", hex::encode(nonce));
    let hook = NotaryHook::new(settings, work_tx, probe_id.clone(), metrics.clone());
    let register = scx.extends.hook_mgr().register();
    register.add(Type::ClientAuthenticate, Box::new(hook.clone())).await;
    register.add(Type::MessagePublishCheckAcl, Box::new(hook.clone())).await;
    register.add(Type::ClientSubscribeCheckAcl, Box::new(hook.clone())).await;
    register.add(Type::MessagePublish, Box::new(hook.clone())).await;
    if settings.logins.has_acl() {
        register.add(Type::MessageExpiryCheck, Box::new(hook.clone())).await;
    }
    register.add(Type::MessageDropped, Box::new(hook)).await;
    register.start().await;

    let server = MqttServer::new(scx.clone()).listener(listener).build();
    let stopped = sink.clone();
    tokio::spawn(async move {
        let why = match server.run().await {
            Ok(()) => "the embedded broker stopped".to_owned(),
            Err(e) => format!("the embedded broker stopped: {e}"),
        };
        stopped.stopped(&why);
    });
    tokio::spawn(probe::watch(settings.listen, probe_id, metrics));

    let (out_tx, out_rx) = mpsc::channel(OUTBOX_CAPACITY);
    tokio::spawn(forward_own(scx, out_rx));
    Ok(Arc::new(BrokerOutbox { tx: out_tx }))
}

/// Runs rmqtt with the same listener and plugins as [`start`] but without
/// the notary's hook: plain rmqtt, the benchmark's baseline. Returns only
/// when the broker stops.
pub async fn run_plain(settings: &EmbeddedSettings) -> Result<(), EmbeddedError> {
    let scx = context(settings).await?;
    let listener = listener(settings, true)?;
    MqttServer::new(scx).listener(listener).build().run().await.map_err(broker_err)
}

/// MQTT 5 shared subscriptions (`$share/GROUP/FILTER`): each message goes
/// to one member of the group, taking turns among the connected members
/// (an offline member's session queues it only when none is connected).
#[derive(Default)]
struct RoundRobin {
    next: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl rmqtt::subscribe::SharedSubscription for RoundRobin {
    fn is_supported(&self) -> bool {
        true
    }

    async fn choice(
        &self,
        _scx: &ServerContext,
        _group: &rmqtt::types::SharedGroup,
        _publisher: &Id,
        _topic: &rmqtt::types::TopicName,
        members: &[(
            rmqtt::types::NodeId,
            ClientId,
            rmqtt::types::SubscriptionOptions,
            Option<Vec<rmqtt::types::SubscriptionIdentifier>>,
            Option<rmqtt::types::IsOnline>,
        )],
    ) -> Option<(usize, rmqtt::types::IsOnline)> {
        if members.is_empty() {
            return None;
        }
        let turn = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let online = |i: &usize| members[*i].4.unwrap_or(true);
        let n = members.len();
        (0..n).map(|k| (turn + k) % n).find(online).map(|i| (i, true)).or(Some((turn % n, false)))
    }
}

struct Out {
    topic: String,
    payload: Vec<u8>,
    retain: bool,
    qos: QoS,
    /// Delivered to this client's session alone, whatever it subscribed.
    to: Option<ClientId>,
    correlation: Option<Bytes>,
}

/// Forwards the pipeline's own publishes, in order (a newer checkpoint
/// must replace an older retained one, never the other way round).
async fn forward_own(scx: ServerContext, mut rx: mpsc::Receiver<Out>) {
    let id = Id::new(scx.node.id(), 0, None, None, ClientId::from_static("mqtt-notary"), None::<UserName>);
    while let Some(out) = rx.recv().await {
        let codec = CodecPublish {
            dup: false,
            retain: out.retain,
            qos: out.qos,
            topic: out.topic.into(),
            packet_id: None,
            payload: Bytes::from(out.payload),
            properties: Some(rmqtt::codec::v5::PublishProperties {
                correlation_data: out.correlation,
                ..Default::default()
            }),
        };
        let mut publish = Publish::from(codec).create_time(rmqtt::utils::timestamp_millis());
        if let Some(to) = out.to {
            publish = publish.target_clientid(to);
        }
        if let Err(e) =
            SessionState::forwards(&scx, From::from_system(id.clone()), publish, false, None).await
        {
            tracing::warn!(error = %e, "could not publish the notary's own message");
        }
    }
}

struct BrokerOutbox {
    tx: mpsc::Sender<Out>,
}

impl Outbox for BrokerOutbox {
    fn publish(&self, topic: &str, payload: Vec<u8>, retain: bool) -> bool {
        let out = Out {
            topic: topic.to_owned(),
            payload,
            retain,
            qos: QoS::AtLeastOnce,
            to: None,
            correlation: None,
        };
        self.tx.try_send(out).is_ok()
    }

    fn answer(&self, topic: &str, payload: Vec<u8>, asker: Option<&Asker>) -> bool {
        let out = Out {
            topic: topic.to_owned(),
            payload,
            retain: false,
            // At most once: an asker who misses an answer asks again. (At
            // QoS 1, rmqtt's targeted delivery took 24 ms at p50 under the
            // benchmark's load, against 1.6 ms at QoS 0.)
            qos: if asker.is_some() { QoS::AtMostOnce } else { QoS::AtLeastOnce },
            to: asker.map(|a| ClientId::from(a.client_id.clone())),
            correlation: asker.and_then(|a| a.correlation.clone()).map(Bytes::from),
        };
        self.tx.try_send(out).is_ok()
    }
}
