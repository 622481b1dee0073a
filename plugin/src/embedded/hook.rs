//! The notary's rmqtt hook: every publish is judged (and, for QoS 1/2 by
//! default, committed) before rmqtt forwards or acknowledges it.

use super::{AckMode, EmbeddedSettings, RejectV311};
use crate::acl::Access;
use crate::auth::Logins;
use crate::metrics::Metrics;
use crate::reason::Reason;
use crate::registry::DevicePolicy;
use crate::source::{now_ms, Asker, Message, Outcome, Sink};
use crate::topics::Topics;
use async_trait::async_trait;
use notary_proof::Publisher;
use rmqtt::codec::v5::{PublishAckReason, SubscribeAckReason};
use rmqtt::hook::{Handler, HookResult, Parameter, ReturnType};
use rmqtt::session::Session;
use rmqtt::types::{
    AuthResult, ConnectInfo, FromType, Id, LastWill, Publish, PublishAclResult, PublishResult, QoS,
    Subscribe, SubscribeAclResult,
};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// MQTT protocol level 5 in CONNECT.
const MQTT_LEVEL_5: u8 = 5;

/// One message on its way from the hook to the pipeline.
pub(super) enum Work {
    /// Already judged (a plain message): hand it over, nobody waits.
    Deliver(Message),
    /// Hand it over and answer once it is judged (`committed == false`)
    /// or committed.
    Submit { msg: Message, committed: bool, answer: oneshot::Sender<Outcome> },
}

/// Runs on its own thread: the pipeline's [`Sink`] may block while its
/// queue is full, which must never stall the broker's async workers. The
/// hook waits on the bounded channel instead (back-pressure to the
/// publisher's connection).
pub(super) fn hand_off(mut rx: mpsc::Receiver<Work>, sink: Arc<dyn Sink>) {
    while let Some(work) = rx.blocking_recv() {
        let handed = match work {
            Work::Deliver(msg) => sink.deliver(msg),
            Work::Submit { msg, committed, answer } => {
                let done = Box::new(move |o: Outcome| {
                    let _ = answer.send(o);
                });
                if committed {
                    sink.submit(msg, done)
                } else {
                    sink.submit_judged(msg, done)
                }
            }
        };
        if handed.is_err() {
            // The pipeline is closed (shutdown). Dropping the receiver
            // refuses every later publish in its hook, unacknowledged;
            // the `answer` senders dropped with their work answer "not
            // committed" the same way.
            return;
        }
    }
}

#[derive(Clone)]
pub(super) struct NotaryHook {
    work: mpsc::Sender<Work>,
    policy: Arc<DevicePolicy>,
    logins: Arc<Logins>,
    ack: AckMode,
    reject_v311: RejectV311,
    topics: Topics,
    /// The listener probe's client id, refused quietly.
    probe_id: String,
    max_payload: usize,
    metrics: Arc<Metrics>,
}

impl NotaryHook {
    pub(super) fn new(
        s: &EmbeddedSettings,
        work: mpsc::Sender<Work>,
        probe_id: String,
        metrics: Arc<Metrics>,
    ) -> Self {
        NotaryHook {
            work,
            metrics,
            probe_id,
            max_payload: s.max_payload_bytes,
            policy: Arc::new(s.policy.clone()),
            logins: s.logins.clone(),
            ack: s.ack,
            reject_v311: s.reject_v311,
            topics: s.topics,
        }
    }

    /// The verdict on one client publish, as rmqtt's ACL result.
    async fn check_publish(&self, session: &Session, v5: bool, publish: &Publish) -> PublishResult {
        let topic: &str = &publish.topic;
        if let Some(why) = topic_name_problem(topic) {
            tracing::debug!(topic, why, "publish refused: invalid topic name");
            return PublishResult::reason_code(PublishAckReason::TopicNameInvalid, Some(why.into()), true);
        }
        if let Some(why) = own_topic_problem(self.topics, topic) {
            Metrics::inc(&self.metrics.mqtt_own_topic_refused_total);
            tracing::debug!(topic, "publish refused: a topic of the notary's own");
            return self.refused(v5, PublishAckReason::NotAuthorized, why.into());
        }
        if !self.topics.is_own(topic) && !self.may(&session.id, topic, Access::Write) {
            Metrics::inc(&self.metrics.mqtt_acl_denied_total);
            tracing::debug!(client = %session.id.client_id, topic, "publish refused by the ACL file");
            let why = "the ACL file does not let this client publish here";
            return self.refused(v5, PublishAckReason::NotAuthorized, why.into());
        }
        if publish.payload.len() > self.max_payload {
            let why =
                format!("payload of {} bytes; the limit is {}", publish.payload.len(), self.max_payload);
            tracing::debug!(topic, %why, "publish refused: too large");
            return PublishResult::reason_code(
                PublishAckReason::ImplementationSpecificError,
                Some(why.into()),
                true,
            );
        }
        let mut msg = Message::new(topic, publish.payload.to_vec(), now_ms());
        msg.publisher = Some(self.publisher(&session.id));
        if topic == self.topics.proof_request() {
            // Consumed by the notary, which answers the asking session
            // alone; never routed, so no subscriber (not even `#`) reads
            // another client's requests. MQTT 5: PUBACK 0x10.
            let client_id: &str = &session.id.client_id;
            if let Some(inbox) = self.topics.inbox(client_id) {
                let props = publish.properties.as_ref();
                let response_topic = props.and_then(|p| p.response_topic.as_ref()).map(|t| t.to_string());
                if let Some(why) = response_topic.as_deref().and_then(topic_name_problem) {
                    let why = format!("Response Topic: {why}");
                    return PublishResult::reason_code(
                        PublishAckReason::TopicNameInvalid,
                        Some(why.into()),
                        false,
                    );
                }
                let correlation = props.and_then(|p| p.correlation_data.as_ref()).map(|c| c.to_vec());
                msg.asker = Some(Box::new(Asker {
                    client_id: client_id.to_owned(),
                    inbox,
                    response_topic,
                    correlation,
                }));
            }
            return match self.work.send(Work::Deliver(msg)).await {
                Ok(()) => PublishResult::reason_code(PublishAckReason::NoMatchingSubscribers, None, false),
                Err(_) => not_committed(),
            };
        }
        let early = publish.qos == QoS::AtMostOnce || self.ack == AckMode::OnReceipt;
        if early && self.policy.takes_plain(&msg.topic, &msg.payload) {
            return match self.work.send(Work::Deliver(msg)).await {
                Ok(()) => PublishResult::success(),
                Err(_) => not_committed(),
            };
        }
        let (answer, outcome) = oneshot::channel();
        if self.work.send(Work::Submit { msg, committed: !early, answer }).await.is_err() {
            return not_committed();
        }
        match outcome.await {
            Ok(Outcome::Notarized { .. } | Outcome::Accepted | Outcome::NotLogged) => {
                PublishResult::success()
            }
            Ok(Outcome::Rejected { reason, detail }) => self.rejected(v5, reason, &detail),
            Err(_) => not_committed(),
        }
    }

    /// A publish refused: MQTT 5 gets `code` and `why`; MQTT 3.1.1, which
    /// has no reason codes, gets what `reject_v311` says.
    fn refused(&self, v5: bool, code: PublishAckReason, why: String) -> PublishResult {
        if !v5 {
            let disconnect = self.reject_v311 == RejectV311::Disconnect;
            return PublishResult::reason_code(PublishAckReason::NotAuthorized, None, disconnect);
        }
        PublishResult::reason_code(code, Some(why.into()), false)
    }

    fn rejected(&self, v5: bool, reason: Reason, detail: &str) -> PublishResult {
        let code = match reason {
            Reason::MalformedEnvelope | Reason::UnsupportedAlg | Reason::Oversize => {
                PublishAckReason::PayloadFormatInvalid
            }
            Reason::Unstorable => PublishAckReason::ImplementationSpecificError,
            Reason::UnknownDevice
            | Reason::RevokedDevice
            | Reason::BadSignature
            | Reason::Replay
            | Reason::TopicMismatch
            | Reason::SignatureRequired => PublishAckReason::NotAuthorized,
        };
        self.refused(v5, code, format!("{reason}: {detail}"))
    }

    /// A CONNECT: its will is judged now (it is published later, when no
    /// publisher is left to tell), then its login.
    async fn authenticate(&self, info: &ConnectInfo) -> AuthResult {
        if *info.id().client_id == *self.probe_id {
            return AuthResult::NotAuthorized;
        }
        if let Some(will) = info.last_will() {
            let (topic, payload) = match will {
                LastWill::V3(w) => (&w.topic, &w.message),
                LastWill::V5(w) => (&w.topic, &w.message),
            };
            if let Some(why) = topic_name_problem(topic) {
                tracing::debug!(client = %info.id().client_id, why, "CONNECT refused: invalid will topic");
                return AuthResult::NotAuthorized;
            }
            if self.topics.is_own(topic) {
                Metrics::inc(&self.metrics.mqtt_own_topic_refused_total);
                tracing::warn!(client = %info.id().client_id, %topic, "CONNECT refused: a will on a topic of the notary's own");
                return AuthResult::NotAuthorized;
            }
            let (id, user) = (&info.id().client_id, info.username());
            let writable =
                self.logins.acl().is_none_or(|acl| acl.allows(id, user.map(|u| &**u), topic, Access::Write));
            if !writable {
                Metrics::inc(&self.metrics.mqtt_acl_denied_total);
                tracing::warn!(client = %id, %topic, "CONNECT refused: the ACL file does not let this client publish its will");
                return AuthResult::NotAuthorized;
            }
            if !self.policy.takes_plain(topic, payload) {
                // A signed will's counter and signature could only be
                // judged when it fires, too late to refuse it.
                tracing::warn!(client = %info.id().client_id, %topic, "CONNECT refused: a will must be a plain message on a topic that does not require signatures");
                return AuthResult::NotAuthorized;
            }
        }
        let Some(passwords) = self.logins.passwords() else {
            return AuthResult::Allow(false, None);
        };
        let user = info.username().map(|u| u.to_string()).unwrap_or_default();
        let password = info.password().map(|p| p.to_vec()).unwrap_or_default();
        // PBKDF2 (as many iterations as the file says) runs on the blocking
        // pool, never on the threads that serve connections.
        let name = user.clone();
        let ok =
            tokio::task::spawn_blocking(move || passwords.check(&name, &password)).await.unwrap_or(false);
        if ok {
            AuthResult::Allow(false, None)
        } else {
            tracing::warn!(%user, "MQTT login refused");
            AuthResult::BadUsernameOrPassword
        }
    }

    /// Whether the ACL file in force (if any) lets this client `access`
    /// `topic`.
    fn may(&self, id: &Id, topic: &str, access: Access) -> bool {
        !self.logins.has_acl()
            || self
                .logins
                .acl()
                .is_none_or(|acl| acl.allows(&id.client_id, id.username.as_deref(), topic, access))
    }

    /// A SUBSCRIBE's filter (shared or not): refused when it could match
    /// another client's inbox; `None` lets rmqtt subscribe it.
    fn check_subscribe(&self, session: &Session, subscribe: &Subscribe) -> Option<SubscribeAclResult> {
        let filter: &str = &subscribe.topic_filter;
        let why = self.topics.subscribe_problem(filter, &session.id.client_id)?;
        Metrics::inc(&self.metrics.mqtt_own_topic_refused_total);
        tracing::debug!(client = %session.id.client_id, filter, why, "subscription refused");
        Some(SubscribeAclResult::new_failure(SubscribeAckReason::NotAuthorized))
    }

    /// Who published, for the leaf: the client id, and the user name when
    /// the broker checked this login against the password file.
    fn publisher(&self, id: &Id) -> Box<Publisher> {
        Box::new(Publisher {
            client_id: id.client_id.to_string(),
            username: id.username.as_ref().filter(|_| self.logins.has_passwords()).map(|u| u.to_string()),
        })
    }

    /// A will about to be sent: notarized first. It was judged a plain
    /// message at CONNECT, so the pipeline takes it as a leaf, naming the
    /// client whose will it is.
    async fn notarize_will(&self, from: &rmqtt::types::From, publish: &Publish) {
        let mut msg = Message::new(publish.topic.to_string(), publish.payload.to_vec(), now_ms());
        msg.publisher = Some(self.publisher(&from.id));
        let (answer, outcome) = oneshot::channel();
        let sent = self.work.send(Work::Submit { msg, committed: true, answer }).await;
        if sent.is_err() || outcome.await.is_err() {
            tracing::warn!(topic = %publish.topic, "a will was sent before it could be notarized (shutting down)");
        }
    }
}

#[async_trait]
impl Handler for NotaryHook {
    async fn hook(&self, param: &Parameter, acc: Option<HookResult>) -> ReturnType {
        match param {
            Parameter::MessagePublishCheckAcl(session, publish) => {
                let v5 = session.protocol().await.is_ok_and(|v| v == MQTT_LEVEL_5);
                let verdict = self.check_publish(session, v5, publish).await;
                (false, Some(HookResult::PublishAclResult(PublishAclResult(verdict))))
            }
            Parameter::ClientSubscribeCheckAcl(session, subscribe) => {
                match self.check_subscribe(session, subscribe) {
                    Some(refused) => (false, Some(HookResult::SubscribeAclResult(refused))),
                    None => (true, acc),
                }
            }
            Parameter::ClientAuthenticate(info) => {
                (false, Some(HookResult::AuthResult(self.authenticate(info).await)))
            }
            Parameter::MessagePublish(_, from, publish) if matches!(from.typ(), FromType::LastWill) => {
                self.notarize_will(from, publish).await;
                (true, acc)
            }
            // A delivery to one subscriber dropped (its queue full, the
            // message expired, its session ended). Refusals of our own
            // arrive here too, without a receiver: those are rejections.
            // Just before each delivery (registered with an ACL file only):
            // a subscriber receives only what it may read, as in
            // Mosquitto; the notary's own topics follow their own rules.
            Parameter::MessageExpiryCheck(session, _, publish)
                if !self.topics.is_own(&publish.topic)
                    && !self.may(&session.id, &publish.topic, Access::Read) =>
            {
                Metrics::inc(&self.metrics.mqtt_acl_filtered_total);
                (false, Some(HookResult::MessageExpiry))
            }
            // Our own ACL filtering arrives here as an expiry: not a drop.
            Parameter::MessageDropped(Some(to), _, publish, rmqtt::types::Reason::MessageExpiration)
                if !self.topics.is_own(&publish.topic) && !self.may(to, &publish.topic, Access::Read) =>
            {
                (true, acc)
            }
            Parameter::MessageDropped(Some(to), _, publish, reason) => {
                let n = self.metrics.mqtt_deliveries_dropped_total.fetch_add(1, Relaxed) + 1;
                if n.is_power_of_two() {
                    tracing::warn!(to = %to.client_id, topic = %publish.topic, %reason, dropped = n,
                        "the embedded broker dropped a delivery; the message itself is notarized");
                }
                (true, acc)
            }
            _ => (true, acc),
        }
    }
}

/// Why a PUBLISH's topic name is not one (MQTT 3.1.1 §4.7, 5.0 §4.7):
/// empty, wildcards, or U+0000. The codec has checked its UTF-8.
pub(super) fn topic_name_problem(topic: &str) -> Option<&'static str> {
    if topic.is_empty() {
        Some("empty topic name (MQTT-4.7.3-1)")
    } else if topic.contains(['+', '#']) {
        Some("wildcard in a topic name (MQTT-3.3.2-2)")
    } else if topic.contains('\0') {
        Some("U+0000 in a topic name (MQTT-4.7.3-2)")
    } else {
        None
    }
}

/// Why a client may not publish on `topic`: only the notary publishes
/// under its own root (answers, checkpoints, rejection events), so no
/// client can forge them; clients publish there only proof requests.
pub(super) fn own_topic_problem(topics: Topics, topic: &str) -> Option<&'static str> {
    (topics.is_own(topic) && topic != topics.proof_request()).then_some(
        "only the notary publishes on its own topics; clients may publish only proof requests there",
    )
}

/// The pipeline stopped before the message was committed: no
/// acknowledgement, the connection closes, the client sends it again.
fn not_committed() -> PublishResult {
    PublishResult::reason_code(
        PublishAckReason::UnspecifiedError,
        Some("not committed: the notary is shutting down".into()),
        true,
    )
}
