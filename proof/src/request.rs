//! Proof requests over MQTT (docs/PROTOCOL.md §Proof requests over MQTT):
//! the request's format, parsed here so that a client, the broker and the
//! fuzz target read it the same way. Where the answer goes is the broker's
//! business.

use serde_json::Value;

/// Larger requests are refused unparsed.
pub const MAX_REQUEST_BYTES: usize = 4096;

/// A parsed request. `id` is any JSON value, echoed in the answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProofRequest {
    pub id: Value,
    /// The `reply_to` topic, if the request named one (not yet judged).
    pub reply_to: Option<String>,
    /// The BLAKE3-256 digest asked about, or why it is not one.
    pub digest: Result<[u8; 32], RequestError>,
}

/// Why a request cannot be answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("request larger than 4096 bytes")]
    TooLarge,
    #[error("request is not a JSON object")]
    NotAnObject,
    #[error("digest must be 64 hex digits (BLAKE3-256)")]
    BadDigest,
}

impl ProofRequest {
    /// Parses a request payload. Fails only when there is nothing to answer
    /// to (too large, not a JSON object); a bad digest is kept, so that the
    /// answer can still carry the request's `id` to its `reply_to`.
    pub fn parse(payload: &[u8]) -> Result<Self, RequestError> {
        if payload.len() > MAX_REQUEST_BYTES {
            return Err(RequestError::TooLarge);
        }
        let Ok(Value::Object(mut req)) = serde_json::from_slice::<Value>(payload) else {
            return Err(RequestError::NotAnObject);
        };
        let id = req.remove("id").unwrap_or(Value::Null);
        let reply_to = req.get("reply_to").and_then(Value::as_str).map(str::to_owned);
        let digest =
            req.get("digest").and_then(Value::as_str).and_then(parse_digest).ok_or(RequestError::BadDigest);
        Ok(ProofRequest { id, reply_to, digest })
    }
}

/// Parses a BLAKE3-256 digest in hex, either case: a request is a lookup,
/// not evidence.
pub fn parse_digest(s: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    (s.len() == 64).then_some(())?;
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_keep_their_id_when_the_digest_is_bad() {
        let d = "ab".repeat(32);
        let r = ProofRequest::parse(format!(r#"{{"id":7,"digest":"{d}","reply_to":"x/y"}}"#).as_bytes())
            .expect("parses");
        assert_eq!((r.id, r.reply_to.as_deref(), r.digest), (Value::from(7), Some("x/y"), Ok([0xab; 32])));
        let upper = ProofRequest::parse(format!(r#"{{"digest":"{}"}}"#, d.to_uppercase()).as_bytes());
        assert_eq!(upper.expect("parses").digest, Ok([0xab; 32]));
        let bad = ProofRequest::parse(br#"{"id":"a","digest":"xyz"}"#).expect("parses");
        assert_eq!((bad.id, bad.digest), (Value::from("a"), Err(RequestError::BadDigest)));
        assert_eq!(ProofRequest::parse(b"[1]"), Err(RequestError::NotAnObject));
        assert_eq!(ProofRequest::parse(&vec![b' '; 4097]), Err(RequestError::TooLarge));
    }
}
