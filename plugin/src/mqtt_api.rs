//! Proof requests over MQTT (docs/PROTOCOL.md §Proofs over MQTT).
//!
//! A client publishes `{"id": ..., "digest": "<BLAKE3 hex>"}` (and, where
//! needed, `"reply_to"`) to `$notary/proof/request` and gets one answer:
//!
//! - When the source knows who asked (the embedded broker): to that
//!   session alone, on its MQTT 5 Response Topic with its Correlation Data
//!   if it gave one, else on `reply_to` if that lies in its own inbox
//!   `$notary/inbox/<client id>/`, else on `$notary/inbox/<client id>/proof`.
//!   Errors go to the same place, so they are private too.
//! - When it does not (a sidecar on another broker): on `reply_to`, which
//!   must lie under `$notary/inbox/`; a request without a usable one is
//!   answered on `$notary/proof/errors`, so the notary never publishes onto
//!   device topics on a client's behalf. Keeping each inbox to its client
//!   is then that broker's ACL's job (README §Sidecar). Sidecars that share
//!   a subscription each receive every request and only the one holding the
//!   message answers; errors (unknown digest, bad request) then go
//!   unanswered over MQTT.
//!
//! With the legacy names (`[topics] legacy = true`) the asker is never
//! known: `reply_to` under `notary/proof/response/`, errors on
//! `notary/proof/errors`, as in the previous release.

use crate::metrics::Metrics;
use crate::proofs::{ProofAnswer, ProofService};
use crate::source::{Asker, Message, Outbox};
use crate::topics::Topics;
use notary_proof::request::ProofRequest;
use serde_json::{json, Value};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};

pub use notary_proof::request::{parse_digest, MAX_REQUEST_BYTES};
const MAX_REPLY_TOPIC: usize = 256;
/// Under the asker's inbox: where answers go when it names no topic.
pub const DEFAULT_REPLY_LEVEL: &str = "proof";

/// Serves requests from `rx` until it closes. Several workers may share it.
pub(crate) fn serve(
    rx: Arc<Mutex<Receiver<Message>>>,
    proofs: Arc<ProofService>,
    outbox: Arc<dyn Outbox>,
    metrics: Arc<Metrics>,
    topics: Topics,
    holders_only: bool,
) {
    loop {
        let msg = match rx.lock() {
            Ok(rx) => match rx.recv() {
                Ok(m) => m,
                Err(_) => return,
            },
            Err(_) => return,
        };
        let (topic, answer) = answer(&msg.payload, msg.asker.as_deref(), topics, &proofs);
        if answer.get("status").and_then(Value::as_str) == Some("error") {
            Metrics::inc(&metrics.proof_request_errors_total);
            if holders_only {
                continue; // another member of the group may hold it
            }
        }
        if !outbox.answer(&topic, answer.to_string().into_bytes(), msg.asker.as_deref()) {
            Metrics::inc(&metrics.outbox_dropped_total);
        }
    }
}

fn error(id: &Value, code: &str, message: impl Into<String>) -> Value {
    json!({"id": id, "status": "error", "error": {"code": code, "message": message.into()}})
}

/// Returns the reply topic and the answer for one request payload from
/// `asker` (`None`: not known to the source).
pub fn answer(
    payload: &[u8],
    asker: Option<&Asker>,
    topics: Topics,
    proofs: &ProofService,
) -> (String, Value) {
    let fallback = match asker {
        Some(a) => format!("{}{DEFAULT_REPLY_LEVEL}", a.inbox),
        None => topics.errors().to_owned(),
    };
    let to_fallback = |v| (fallback.clone(), v);
    let req = match ProofRequest::parse(payload) {
        Ok(r) => r,
        Err(e) => return to_fallback(error(&Value::Null, "bad_request", e.to_string())),
    };
    let id = req.id;
    let reply_to = match (asker, req.reply_to.as_deref()) {
        (Some(Asker { response_topic: Some(t), .. }), _) => t.clone(),
        (Some(a), Some(t)) if valid_reply_topic(t, &a.inbox) => t.to_owned(),
        (Some(a), Some(_)) => {
            return to_fallback(error(
                &id,
                "bad_request",
                format!("reply_to must be a topic under your inbox {} without wildcards", a.inbox),
            ))
        }
        (Some(_), None) => fallback.clone(),
        (None, Some(t)) if valid_reply_topic(t, topics.reply_prefix()) => t.to_owned(),
        (None, _) => {
            return to_fallback(error(
                &id,
                "bad_request",
                format!("reply_to must be a topic under {} without wildcards", topics.reply_prefix()),
            ))
        }
    };
    let digest = match req.digest {
        Ok(d) => d,
        Err(e) => return (reply_to, error(&id, "bad_request", e.to_string())),
    };
    let mut body = match proofs.lookup(&digest) {
        Ok(ProofAnswer::Ready(bundles)) => json!({"id": id, "status": "ok", "bundles": bundles}),
        Ok(ProofAnswer::Pending) => json!({"id": id, "status": "pending"}),
        Ok(ProofAnswer::Rejected(r)) => json!({"id": id, "status": "rejected", "rejections": r}),
        Ok(ProofAnswer::Unknown) => error(&id, "not_found", "no message with this digest was notarized"),
        Ok(ProofAnswer::Pruned { batch }) => json!({"id": id, "status": "pruned", "batch": batch}),
        Err(e) => {
            tracing::error!(error = %e, "proof lookup failed");
            error(&id, e.code(), "proof lookup failed")
        }
    };
    // Echoed, so a client matches an answer on what it asked about, not
    // on an `id` another client could reuse.
    body["digest"] = Value::String(hex::encode(digest));
    (reply_to, body)
}

fn valid_reply_topic(t: &str, prefix: &str) -> bool {
    t.len() > prefix.len()
        && t.len() <= MAX_REPLY_TOPIC
        && t.starts_with(prefix)
        && !t.contains(['+', '#', '\0'])
}
