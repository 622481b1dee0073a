//! Device envelopes: a COSE_Sign1 message (RFC 9052, alg EdDSA per
//! RFC 9053) that a device publishes as its MQTT payload
//! (docs/PROTOCOL.md §Device envelope).
//!
//! ```text
//! 18([                                  ; tagged COSE_Sign1
//!   << {                                ; protected header (bstr-wrapped map)
//!        1: -8,                         ; alg: EdDSA
//!        3: content type,               ; tstr or CoAP content format uint
//!        4: h'device id',               ; kid
//!   -65537: counter,                    ; uint, strictly increasing per device
//!   -65538: device time,                ; uint, Unix milliseconds
//!   -65539: "topic"                     ; optional tstr; must equal the topic
//!   } >>,
//!   {},                                 ; unprotected header: empty
//!   payload,                            ; bstr, embedded
//!   signature                           ; bstr, 64 bytes
//! ])
//! ```
//!
//! The MQTT topic the message is published on is the COSE external AAD, so
//! a signature made for one topic does not verify on another.

use coset::cbor::value::Value;
use coset::{iana, CoseSign1, CoseSign1Builder, HeaderBuilder, Label};
use coset::{RegisteredLabel, RegisteredLabelWithPrivate, TaggedCborSerializable as _};
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};

pub const LABEL_COUNTER: i64 = -65537;
pub const LABEL_DEVICE_TIME: i64 = -65538;
pub const LABEL_TOPIC: i64 = -65539;
/// Why an envelope is refused. `code()` is the rejection reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("malformed envelope: {0}")]
    Malformed(String),
    #[error("unsupported algorithm {0}; only EdDSA (-8) is accepted")]
    UnsupportedAlg(String),
    #[error("signed for topic {signed:?}, published on another")]
    TopicMismatch { signed: String },
    #[error("the signature does not verify")]
    BadSignature,
}

impl EnvelopeError {
    pub fn code(&self) -> &'static str {
        match self {
            EnvelopeError::Malformed(_) => "malformed-envelope",
            EnvelopeError::UnsupportedAlg(_) => "unsupported-alg",
            EnvelopeError::TopicMismatch { .. } => "topic-mismatch",
            EnvelopeError::BadSignature => "bad-signature",
        }
    }
}

fn malformed(what: impl Into<String>) -> EnvelopeError {
    EnvelopeError::Malformed(what.into())
}

/// True when a payload is meant as an envelope: the CBOR tag 18, an array
/// of four, a definite-length byte string, and a map inside it. Anything
/// else is an ordinary payload (broker-received). Text never starts this
/// way, and a random binary payload does with odds of about 1 in 7 million.
pub fn is_envelope(payload: &[u8]) -> bool {
    let map_at = match payload {
        [0xD2, 0x84, 0x41..=0x57, ..] => 3,
        [0xD2, 0x84, 0x58, ..] => 4,
        [0xD2, 0x84, 0x59, ..] => 5,
        _ => return false,
    };
    matches!(payload.get(map_at), Some(0xA1..=0xB7))
}

/// A parsed envelope, ready to verify against a device's key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub device_id: String,
    pub counter: u64,
    pub device_time_ms: u64,
    /// The content type of the inner payload: a media type, or `coap:N`
    /// for a CoAP content format number.
    pub content_type: String,
    /// The topic named in the protected header, if any.
    pub signed_topic: Option<String>,
    /// The inner payload: the sensor data the device signed.
    pub payload: Vec<u8>,
    pub signature: Signature,
    /// The COSE Sig_structure the signature covers (topic as external AAD).
    pub signed_bytes: Vec<u8>,
}

impl Envelope {
    /// Parses `bytes` published on `topic`. Checks structure, algorithm and
    /// topic; the signature is checked by [`Envelope::verify`] or
    /// [`verify_many`], once the device's key is known.
    pub fn parse(bytes: &[u8], topic: &str) -> Result<Self, EnvelopeError> {
        let encoding = |e| malformed(format!("not in the envelope's CBOR encoding: {e}"));
        match bytes.split_first() {
            Some((0xD2, item)) => crate::cbor::check_item(item).map_err(encoding)?,
            _ => return Err(malformed("not a tagged COSE_Sign1 (tag 18)")),
        }
        let msg =
            CoseSign1::from_tagged_slice(bytes).map_err(|e| malformed(format!("not a COSE_Sign1: {e}")))?;
        crate::cbor::check_item(msg.protected.original_data.as_deref().unwrap_or_default())
            .map_err(|e| malformed(format!("protected header: not in the envelope's CBOR encoding: {e}")))?;
        if !msg.unprotected.is_empty() {
            return Err(malformed("the unprotected header must be empty"));
        }
        let h = &msg.protected.header;
        match &h.alg {
            None => return Err(malformed("no alg in the protected header")),
            Some(RegisteredLabelWithPrivate::Assigned(iana::Algorithm::EdDSA)) => {}
            Some(other) => return Err(EnvelopeError::UnsupportedAlg(format!("{other:?}"))),
        }
        if !h.crit.is_empty()
            || !h.iv.is_empty()
            || !h.partial_iv.is_empty()
            || !h.counter_signatures.is_empty()
        {
            return Err(malformed("unexpected crit, iv or countersignature header"));
        }
        let device_id = std::str::from_utf8(&h.key_id)
            .ok()
            .filter(|id| crate::device::valid_device_id(id))
            .ok_or_else(|| malformed("kid must be a device id (1-64 of A-Z a-z 0-9 . _ : -)"))?
            .to_owned();
        let content_type = match &h.content_type {
            None => return Err(malformed("no content type in the protected header")),
            Some(RegisteredLabel::Text(t)) => t.clone(),
            Some(RegisteredLabel::Assigned(f)) => format!("coap:{}", *f as i64),
        };
        let (mut counter, mut device_time_ms, mut signed_topic) = (None, None, None);
        for (label, value) in &h.rest {
            let uint = || match value {
                Value::Integer(i) => u64::try_from(*i).ok(),
                _ => None,
            };
            match label {
                Label::Int(LABEL_COUNTER) => {
                    counter = Some(uint().ok_or_else(|| malformed("counter is not a uint"))?)
                }
                Label::Int(LABEL_DEVICE_TIME) => {
                    device_time_ms = Some(uint().ok_or_else(|| malformed("device time is not a uint"))?)
                }
                Label::Int(LABEL_TOPIC) => match value {
                    Value::Text(t) => signed_topic = Some(t.clone()),
                    _ => return Err(malformed("topic is not a text string")),
                },
                other => return Err(malformed(format!("unknown header label {other:?}"))),
            }
        }
        let counter = counter.ok_or_else(|| malformed("no counter (-65537) in the protected header"))?;
        let device_time_ms =
            device_time_ms.ok_or_else(|| malformed("no device time (-65538) in the protected header"))?;
        if let Some(signed) = &signed_topic {
            if signed != topic {
                return Err(EnvelopeError::TopicMismatch { signed: signed.clone() });
            }
        }
        let Some(payload) = msg.payload.clone() else {
            return Err(malformed("detached payloads are not accepted"));
        };
        let signature = <[u8; 64]>::try_from(msg.signature.as_slice())
            .map(|b| Signature::from_bytes(&b))
            .map_err(|_| malformed("the signature is not 64 bytes"))?;
        let signed_bytes = msg.tbs_data(topic.as_bytes());
        Ok(Envelope {
            device_id,
            counter,
            device_time_ms,
            content_type,
            signed_topic,
            payload,
            signature,
            signed_bytes,
        })
    }

    /// Checks the signature with ed25519 `verify_strict`: the one rule
    /// that decides, for the broker and for any verifier.
    pub fn verify(&self, key: &VerifyingKey) -> Result<(), EnvelopeError> {
        key.verify_strict(&self.signed_bytes, &self.signature).map_err(|_| EnvelopeError::BadSignature)
    }
}

/// A device's Ed25519 public key, and whether it lies in the prime-order
/// subgroup in its canonical encoding: what an honest key always is, and
/// what enrolment requires. Worked out on demand ([`DeviceKey::is_prime_order`]
/// costs a scalar multiplication, about 60 µs): only enrolment asks, not every
/// registry load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceKey {
    key: VerifyingKey,
}

impl DeviceKey {
    /// Any key that decodes to a curve point; see [`DeviceKey::is_prime_order`].
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<Self, ed25519_dalek::SignatureError> {
        let key = VerifyingKey::from_bytes(bytes)?;
        Ok(DeviceKey { key })
    }

    pub fn key(&self) -> &VerifyingKey {
        &self.key
    }

    pub fn to_bytes(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    /// Canonically encoded, not of small order, and with no small-order
    /// component (torsion-free). Enrolment refuses any other key.
    pub fn is_prime_order(&self) -> bool {
        prime_order_point(self.key.as_bytes())
    }
}

/// True for the canonical encoding of a point of order exactly l.
fn prime_order_point(bytes: &[u8; 32]) -> bool {
    let compressed = curve25519_dalek::edwards::CompressedEdwardsY(*bytes);
    compressed
        .decompress()
        .is_some_and(|p| p.compress() == compressed && !p.is_small_order() && p.is_torsion_free())
}

/// Verifies many envelopes, each with its key, and says which are valid:
/// each signature alone, with `verify_strict`, so the broker's verdict is
/// by construction the one any verifier reaches.
///
/// Batch verification is not used. It is cofactorless with coefficients
/// fixed by the batch's contents, so it accepts, one time in 2, 4 or 8, a
/// signature whose R has a small-order component that strict verification
/// refuses (vectors `r-with-order-{2,4,8}-component`). Excluding those
/// needs a prime-order check of every R, a scalar multiplication that
/// costs more than the batch saves: measured on one core, batches 20-25
/// µs a signature, batches plus that check 76-85 µs, strict verification
/// alone 50-65 µs (`examples/signature_paths.rs`, bench/RESULTS.md).
pub fn verify_many(items: &[(&Envelope, &DeviceKey)]) -> Vec<bool> {
    items.iter().map(|(e, k)| e.verify(k.key()).is_ok()).collect()
}

/// What a device signs into one envelope.
#[derive(Debug, Clone)]
pub struct EnvelopeFields<'a> {
    pub device_id: &'a str,
    pub counter: u64,
    pub device_time_ms: u64,
    pub content_type: &'a str,
    /// The topic the envelope will be published on (external AAD; also
    /// written into the protected header).
    pub topic: &'a str,
    pub payload: &'a [u8],
}

/// Builds and signs an envelope: the bytes to publish on `fields.topic`.
pub fn sign(key: &SigningKey, fields: &EnvelopeFields<'_>) -> Result<Vec<u8>, EnvelopeError> {
    if !crate::device::valid_device_id(fields.device_id) {
        return Err(malformed("invalid device id"));
    }
    let protected = HeaderBuilder::new()
        .algorithm(iana::Algorithm::EdDSA)
        .content_type(fields.content_type.to_owned())
        .key_id(fields.device_id.as_bytes().to_vec())
        .value(LABEL_COUNTER, Value::from(fields.counter))
        .value(LABEL_DEVICE_TIME, Value::from(fields.device_time_ms))
        .value(LABEL_TOPIC, Value::Text(fields.topic.to_owned()))
        .build();
    CoseSign1Builder::new()
        .protected(protected)
        .payload(fields.payload.to_vec())
        .create_signature(fields.topic.as_bytes(), |tbs| key.sign(tbs).to_bytes().to_vec())
        .build()
        .to_tagged_vec()
        .map_err(|e| malformed(format!("cannot encode: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> SigningKey {
        SigningKey::from_bytes(&[n; 32])
    }

    fn fields<'a>(topic: &'a str, counter: u64) -> EnvelopeFields<'a> {
        EnvelopeFields {
            device_id: "meter-1",
            counter,
            device_time_ms: 1_700_000_000_000,
            content_type: "application/json",
            topic,
            payload: b"{\"kwh\":1.5}",
        }
    }

    #[test]
    fn signed_envelopes_parse_and_verify() {
        let bytes = sign(&key(1), &fields("meters/1", 7)).expect("signs");
        assert!(is_envelope(&bytes));
        let env = Envelope::parse(&bytes, "meters/1").expect("parses");
        assert_eq!((env.device_id.as_str(), env.counter), ("meter-1", 7));
        assert_eq!(env.payload, b"{\"kwh\":1.5}");
        assert_eq!(env.content_type, "application/json");
        env.verify(&key(1).verifying_key()).expect("valid");
        assert_eq!(env.verify(&key(2).verifying_key()), Err(EnvelopeError::BadSignature));
    }

    #[test]
    fn another_topic_fails_even_without_the_topic_header() {
        let bytes = sign(&key(1), &fields("meters/1", 7)).expect("signs");
        let err = Envelope::parse(&bytes, "meters/2").expect_err("topic header differs");
        assert_eq!(err.code(), "topic-mismatch");
        // Without the header, the AAD alone must catch it.
        let mut msg = CoseSign1::from_tagged_slice(&bytes).expect("parses");
        msg.protected.header.rest.retain(|(l, _)| *l != Label::Int(LABEL_TOPIC));
        msg.protected.original_data = None;
        let k = key(1);
        msg.signature = k.sign(&msg.tbs_data(b"meters/1")).to_bytes().to_vec();
        let bytes = msg.to_tagged_vec().expect("encodes");
        Envelope::parse(&bytes, "meters/1").expect("parses").verify(&k.verifying_key()).expect("valid");
        let moved = Envelope::parse(&bytes, "meters/2").expect("parses");
        assert_eq!(moved.verify(&k.verifying_key()), Err(EnvelopeError::BadSignature));
    }

    #[test]
    fn plain_payloads_are_not_envelopes() {
        for p in [&b""[..], b"21.5", b"{\"t\":1}", "Ҁ text".as_bytes(), &[0xD2, 0x84, 0x40, 0xA0]] {
            assert!(!is_envelope(p), "{p:?}");
        }
    }

    #[test]
    fn keys_off_the_prime_order_subgroup_are_told_apart() {
        use curve25519_dalek::{constants, edwards::CompressedEdwardsY};
        let good = key(9).verifying_key();
        assert!(DeviceKey::from_bytes(good.as_bytes()).expect("key").is_prime_order());
        let point = CompressedEdwardsY(good.to_bytes()).decompress().expect("point");
        let mixed = (point + constants::EIGHT_TORSION[1]).compress();
        assert!(!DeviceKey::from_bytes(mixed.as_bytes()).expect("a point").is_prime_order());
        let small = constants::EIGHT_TORSION[2].compress();
        assert!(!DeviceKey::from_bytes(small.as_bytes()).expect("a point").is_prime_order());
        // y = 1 written as 1 + p: the identity, not canonically encoded.
        let mut non_canonical = [0xffu8; 32];
        non_canonical[0] = 0xee;
        non_canonical[31] = 0x7f;
        assert!(DeviceKey::from_bytes(&non_canonical).map_or(true, |k| !k.is_prime_order()));
    }

    #[test]
    fn verify_many_finds_the_bad_signatures() {
        let n = 600;
        let keys: Vec<SigningKey> = (0..n).map(|i| key((i % 200) as u8 + 1)).collect();
        let mut envs: Vec<Envelope> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| {
                let f = EnvelopeFields { counter: i as u64, ..fields("t", 0) };
                Envelope::parse(&sign(k, &f).expect("signs"), "t").expect("parses")
            })
            .collect();
        let bad = [3, 70, 71, 300, 599];
        for &i in &bad {
            envs[i].signed_bytes[20] ^= 1;
        }
        let vks: Vec<DeviceKey> =
            keys.iter().map(|k| DeviceKey::from_bytes(k.verifying_key().as_bytes()).expect("key")).collect();
        assert!(vks.iter().all(DeviceKey::is_prime_order));
        let items: Vec<(&Envelope, &DeviceKey)> = envs.iter().zip(&vks).collect();
        let valid = verify_many(&items);
        assert_eq!(valid.len(), n);
        assert!(valid.iter().enumerate().all(|(i, v)| *v != bad.contains(&i)));
    }
}
