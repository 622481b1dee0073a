//! Proof requests over MQTT.
//!
//! A client publishes `{"id": ..., "digest": "<BLAKE3 hex>", "reply_to":
//! "notary/proof/response/<inbox>"}` to `notary/proof/request` and gets one
//! answer on `reply_to`. A request whose `reply_to` cannot be used (bad JSON,
//! missing, outside `notary/proof/response/`) is answered on
//! `notary/proof/errors`, so the broker never publishes onto device topics
//! on a client's behalf. Sidecars that share a subscription each receive
//! every request and only the one holding the message answers; errors
//! (unknown digest, bad request) then go unanswered over MQTT.

use crate::metrics::Metrics;
use crate::proofs::{ProofAnswer, ProofService};
use crate::source::{Message, Outbox};
use crate::topics::{ERROR_TOPIC, RESPONSE_PREFIX};
use serde_json::{json, Value};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};

/// Larger requests are refused unparsed.
pub const MAX_REQUEST_BYTES: usize = 4096;
const MAX_REPLY_TOPIC: usize = 256;

/// Serves requests from `rx` until it closes. Several workers may share it.
pub(crate) fn serve(
    rx: Arc<Mutex<Receiver<Message>>>,
    proofs: Arc<ProofService>,
    outbox: Arc<dyn Outbox>,
    metrics: Arc<Metrics>,
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
        let (topic, answer) = answer(&msg.payload, &proofs);
        if answer.get("status").and_then(Value::as_str) == Some("error") {
            Metrics::inc(&metrics.proof_request_errors_total);
            if holders_only {
                continue; // another member of the group may hold it
            }
        }
        if !outbox.publish(&topic, answer.to_string().into_bytes(), false) {
            Metrics::inc(&metrics.outbox_dropped_total);
        }
    }
}

fn error(id: &Value, code: &str, message: impl Into<String>) -> Value {
    json!({"id": id, "status": "error", "error": {"code": code, "message": message.into()}})
}

/// Returns the reply topic and the answer for one request payload.
pub fn answer(payload: &[u8], proofs: &ProofService) -> (String, Value) {
    let to_errors = |v| (ERROR_TOPIC.to_owned(), v);
    if payload.len() > MAX_REQUEST_BYTES {
        return to_errors(error(
            &Value::Null,
            "bad_request",
            format!("request larger than {MAX_REQUEST_BYTES} bytes"),
        ));
    }
    let Ok(Value::Object(req)) = serde_json::from_slice::<Value>(payload) else {
        return to_errors(error(&Value::Null, "bad_request", "request is not a JSON object"));
    };
    let id = req.get("id").cloned().unwrap_or(Value::Null);
    let reply_to = match req.get("reply_to").and_then(Value::as_str) {
        Some(t) if valid_reply_topic(t) => t.to_owned(),
        _ => {
            return to_errors(error(
                &id,
                "bad_request",
                format!("reply_to must be a topic under {RESPONSE_PREFIX} without wildcards"),
            ))
        }
    };
    let digest = match req.get("digest").and_then(Value::as_str).and_then(parse_digest) {
        Some(d) => d,
        None => return (reply_to, error(&id, "bad_request", "digest must be 64 hex digits (BLAKE3-256)")),
    };
    let body = match proofs.lookup(&digest) {
        Ok(ProofAnswer::Ready(bundles)) => json!({"id": id, "status": "ok", "bundles": bundles}),
        Ok(ProofAnswer::Pending) => json!({"id": id, "status": "pending"}),
        Ok(ProofAnswer::Rejected(r)) => json!({"id": id, "status": "rejected", "rejections": r}),
        Ok(ProofAnswer::Unknown) => error(&id, "not_found", "no message with this digest was notarized"),
        Err(e) => {
            tracing::error!(error = %e, "proof lookup failed");
            error(&id, e.code(), "proof lookup failed")
        }
    };
    (reply_to, body)
}

fn valid_reply_topic(t: &str) -> bool {
    t.len() > RESPONSE_PREFIX.len()
        && t.len() <= MAX_REPLY_TOPIC
        && t.starts_with(RESPONSE_PREFIX)
        && !t.contains(['+', '#', '\0'])
}

/// Parses a BLAKE3-256 digest in hex (either case).
pub fn parse_digest(s: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    (s.len() == 64).then_some(())?;
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}
