//! Counters exposed at `/metrics` in the Prometheus text format.

use crate::health::{Health, Part};
use crate::reason::Reason;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

macro_rules! metrics {
    ($( $field:ident : $kind:literal, $help:literal; )*) => {
        #[derive(Debug, Default)]
        pub struct Metrics {
            $( pub $field: AtomicU64, )*
            /// Messages delivered by the source and not yet persisted.
            pub queue_depth: AtomicI64,
            /// Rejected messages, per reason (index: `Reason::index`).
            pub rejected: [AtomicU64; Reason::ALL.len()],
            /// What `/healthz` reports.
            pub health: Health,
        }

        impl Metrics {
            pub fn render(&self) -> String {
                let mut out = String::new();
                $(
                    let _ = writeln!(out, "# HELP notary_{} {}", stringify!($field), $help);
                    let _ = writeln!(out, "# TYPE notary_{} {}", stringify!($field), $kind);
                    let _ = writeln!(out, "notary_{} {}", stringify!($field), self.$field.load(Relaxed));
                )*
                let _ = writeln!(out, "# HELP notary_queue_depth Messages received and not yet persisted.");
                let _ = writeln!(out, "# TYPE notary_queue_depth gauge");
                let _ = writeln!(out, "notary_queue_depth {}", self.queue_depth.load(Relaxed).max(0));
                let _ = writeln!(out, "# HELP notary_messages_rejected_total Messages rejected, by reason.");
                let _ = writeln!(out, "# TYPE notary_messages_rejected_total counter");
                for (reason, n) in Reason::ALL.iter().zip(&self.rejected) {
                    let _ = writeln!(out, "notary_messages_rejected_total{{reason=\"{reason}\"}} {}", n.load(Relaxed));
                }
                let problems = self.health.problems(self.queue_depth.load(Relaxed));
                let _ = writeln!(out, "# HELP notary_health_problem 1 while the part is stuck, failing or stopped (see /healthz).");
                let _ = writeln!(out, "# TYPE notary_health_problem gauge");
                for part in Part::ALL {
                    let bad = problems.iter().any(|(p, _)| *p == part);
                    let _ = writeln!(out, "notary_health_problem{{part=\"{}\"}} {}", part.as_str(), u8::from(bad));
                }
                out
            }
        }
    };
}

metrics! {
    messages_received_total: "counter", "Messages the source delivered for notarization.";
    messages_notarized_total: "counter", "Leaves persisted to the store.";
    batches_sealed_total: "counter", "Batches sealed into the log.";
    checkpoints_signed_total: "counter", "Checkpoints signed.";
    anchors_total: "counter", "Checkpoints anchored in a ledger.";
    anchor_failures_total: "counter", "Failed anchoring attempts (retried).";
    gap_events_total: "counter", "Times the source reported lost messages.";
    gap_messages_total: "counter", "Messages the source lost before notarization.";
    redelivered_skipped_total: "counter", "Messages the broker delivered twice; the copy was skipped.";
    proof_requests_mqtt_total: "counter", "Proof requests received over MQTT.";
    proof_requests_http_total: "counter", "Proof requests received over HTTP.";
    proof_request_errors_total: "counter", "Proof requests answered with an error.";
    proof_requests_dropped_total: "counter", "Proof requests refused because the proof queue was full.";
    persist_failures_total: "counter", "Failed store commits of ingest that may heal (busy, disk full, I/O); retried.";
    persist_refused_total: "counter", "Store commits refused for good; their messages were committed one by one.";
    messages_uncommitted_total: "counter", "Messages not committed because shutdown's deadline passed first.";
    seal_failures_total: "counter", "Failed sealing attempts (retried).";
    http_connections_refused_total: "counter", "HTTP connections closed at once because max_connections were open.";
    accept_errors_total: "counter", "Failed accepts on the HTTP and TLS listeners (e.g. out of file descriptors).";
    tls_connections_refused_total: "counter", "TLS connections closed at once because max_connections were open.";
    mqtt_deliveries_dropped_total: "counter", "Embedded broker: deliveries to one subscriber dropped (its queue past mqtt.max_queued_messages, the message expired, or its session ended); the message itself is notarized.";
    mqtt_own_topic_refused_total: "counter", "Embedded broker: client publishes, wills and subscriptions refused because they name a topic of the notary's own (other than the proof request topic) or could match another client's inbox.";
    mqtt_acl_denied_total: "counter", "Embedded broker: client publishes and wills refused by the ACL file (never notarized).";
    mqtt_acl_filtered_total: "counter", "Embedded broker: deliveries withheld from a subscriber the ACL file does not let read the topic.";
    pruned_leaves_total: "counter", "Retention: leaves deleted (their batches, checkpoints and receipts stay).";
    pruned_rejections_total: "counter", "Retention: rejection records deleted.";
    pruned_batches: "gauge", "Retention: batches whose leaves are pruned (batches 0 .. this).";
    pruned_seq: "gauge", "Retention: every leaf below this sequence number is pruned (registry leaves are kept).";
    store_used_bytes: "gauge", "Bytes of the store file in use (free pages left by pruning are reused, not returned).";
    retention_blocked: "gauge", "Retention: 1 while the oldest batch is due for pruning but not yet anchored in every ledger (pruning waits).";
    index_runs: "gauge", "Digest index: sorted runs lookups may read (merged in the background; see ARCHITECTURE.md).";
    index_merges_total: "counter", "Digest index: runs merged into one of the next level.";
    index_unsealed: "gauge", "Digest index: leaves not sealed yet, indexed in memory.";
    outbox_dropped_total: "counter", "Outgoing publishes dropped because the outbox was full.";
    source_connected: "gauge", "Sidecar: 1 while connected to the upstream broker.";
    source_disconnects_total: "counter", "Sidecar: times the connection to the upstream broker was lost.";
    source_outages_total: "counter", "Sidecar: windows without a connection (lost, or not running), recorded in the store.";
    source_stalls_total: "counter", "Sidecar: times the upstream broker stopped delivering while it owed messages (the sidecar reconnected).";
    source_disconnected_ms_total: "counter", "Sidecar: milliseconds of those windows (QoS 0 messages then are not notarized).";
    evm_anchors_signed_total: "counter", "EVM anchoring transactions signed (one per new anchor).";
    evm_anchors_final_total: "counter", "EVM anchors that reached the configured confirmations.";
    evm_anchored_size: "gauge", "Largest checkpoint size with a final EVM anchor.";
    evm_rebroadcasts_total: "counter", "EVM anchoring transactions sent again after the chain lost them.";
    evm_reorgs_total: "counter", "Times a reorganization moved or removed a mined EVM anchor.";
    evm_abandoned_total: "counter", "EVM anchoring transactions that can never be mined; anchored anew.";
    evm_rpc_errors_total: "counter", "Failed EVM RPC steps (retried with backoff).";
    evm_config_errors_total: "counter", "EVM errors an operator must fix: wrong chain id, unfunded account.";
}

impl Metrics {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }
    pub fn count_rejection(&self, reason: Reason) {
        self.rejected[reason.index()].fetch_add(1, Relaxed);
    }
}
