//! What the pipeline needs from a broker, and nothing more: a stream of
//! messages in ([`Sink`]) and a way to publish answers out ([`Outbox`]).
//!
//! The embedded broker's publish hook is one source (`embedded/`); a
//! subscription on an external broker is another. No broker type appears
//! outside its adapter.

/// One message as a source received it.
#[derive(Debug, Clone)]
pub struct Message {
    pub topic: String,
    pub payload: Vec<u8>,
    /// When the source received it (Unix milliseconds, source's clock).
    pub received_at_ms: u64,
    /// For a proof request, who asked, when the source knows (the
    /// embedded broker does; a sidecar does not).
    pub asker: Option<Box<Asker>>,
    /// Who published it, when the source knows (the embedded broker): the
    /// leaf names them (leaf version 2).
    pub publisher: Option<Box<notary_proof::Publisher>>,
}

impl Message {
    pub fn new(topic: impl Into<String>, payload: Vec<u8>, received_at_ms: u64) -> Self {
        Message { topic: topic.into(), payload, received_at_ms, asker: None, publisher: None }
    }
}

/// The session that sent a proof request: its answer goes to that session
/// alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Asker {
    pub client_id: String,
    /// The client's private inbox (`$notary/inbox/<client id>/`).
    pub inbox: String,
    /// MQTT 5 Response Topic, if the request carried one.
    pub response_topic: Option<String>,
    /// MQTT 5 Correlation Data, returned with the answer.
    pub correlation: Option<Vec<u8>>,
}

/// What became of one message handed over with [`Sink::submit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Committed as the leaf with this sequence number: durable.
    Notarized { seq: u64 },
    /// Judged fit for the log; its commit follows (the answer of
    /// [`Sink::submit_judged`] for a message that will become a leaf).
    Accepted,
    /// Recorded as rejected (stored, counted, announced), never a leaf.
    Rejected { reason: crate::reason::Reason, detail: String },
    /// Not for the log: a proof request, or a topic the notary owns.
    NotLogged,
}

/// Called once with a message's [`Outcome`].
pub type Responder = Box<dyn FnOnce(Outcome) + Send>;

/// The pipeline has stopped taking messages.
#[derive(Debug, Clone, Copy)]
pub struct Closed;

/// Where a source delivers messages.
pub trait Sink: Send + Sync {
    /// Hands over one message. Blocks while the pipeline's queue is full
    /// (back-pressure); returns `Closed` once the pipeline shuts down.
    fn deliver(&self, msg: Message) -> Result<(), Closed>;

    /// Hands over one message like `deliver`, and calls `done` (on a
    /// pipeline thread) with its outcome once it is committed as a leaf or
    /// recorded as rejected. `done` is dropped uncalled if the pipeline
    /// stops first (shutdown's deadline): the message was not committed.
    /// An embedded broker acknowledges and routes a message only after
    /// this answer.
    fn submit(&self, msg: Message, done: Responder) -> Result<(), Closed>;

    /// Hands over one message like `submit`, but calls `done` as soon as
    /// the message is judged: [`Outcome::Accepted`] (its commit follows)
    /// or [`Outcome::Rejected`]. For deliveries that need the verdict but
    /// promise the publisher nothing (MQTT QoS 0).
    fn submit_judged(&self, msg: Message, done: Responder) -> Result<(), Closed>;

    /// Reports that the source lost `missed` messages before they reached
    /// the pipeline (e.g. the broker's buffer overflowed).
    fn gap(&self, missed: u64);

    /// Reports that the source skipped a message it had already delivered.
    fn redelivered(&self, behind: u64);

    /// Reports a window in which the source could not receive messages (a
    /// lost connection, or the process not running): messages published
    /// then without a queue for us (MQTT QoS 0) were not notarized.
    fn outage(&self, from_ms: u64, to_ms: u64);

    /// Calls `done` (on a pipeline thread) once every message delivered
    /// before this call is persisted: committed as a leaf, or recorded as
    /// rejected. A source that acknowledges upstream only after persistence
    /// (the sidecar's QoS 1 subscription) uses it.
    fn after_commit(&self, done: Box<dyn FnOnce() + Send>) -> Result<(), Closed>;

    /// Reports that the source stopped for good (its link to the broker
    /// closed): no message reaches the pipeline any more, and `/healthz`
    /// says so. Ignored while the broker shuts down.
    fn stopped(&self, why: &str);
}

/// Publishes the pipeline's own messages (proof answers, checkpoints).
pub trait Outbox: Send + Sync {
    /// Queues a publish. Never blocks; returns false if it was dropped
    /// because the outbox is full or gone.
    fn publish(&self, topic: &str, payload: Vec<u8>, retain: bool) -> bool;

    /// Queues a proof answer on `topic`: to the asking session alone, with
    /// its correlation data, where the source can address one session;
    /// otherwise a plain publish.
    fn answer(&self, topic: &str, payload: Vec<u8>, _asker: Option<&Asker>) -> bool {
        self.publish(topic, payload, false)
    }
}

/// Milliseconds since the Unix epoch on this host's clock.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
