//! Device-envelope test vectors: `tests/vectors/envelopes.json`.
//!
//! Generator and check in one, like the bundle vectors: the test fails if
//! the checked-in file differs from what the generator makes, then checks
//! every case. Regenerate after a deliberate change with
//! `NOTARY_WRITE_VECTORS=1 cargo test -p notary-proof --test envelope_vectors`.
//!
//! Each case gives the topic the envelope was published on, the envelope
//! bytes, the device's public key, and the expected outcome: `valid`, or
//! the rejection reason (docs/PROTOCOL.md §Rejections); `not-an-envelope`
//! for payloads that are ordinary messages.

use coset::cbor::value::Value;
use coset::{iana, CoseSign1, HeaderBuilder, Label, TaggedCborSerializable as _};
use ed25519_dalek::{Signer as _, SigningKey};
use notary_proof::envelope::{
    self, is_envelope, Envelope, EnvelopeFields, LABEL_COUNTER, LABEL_DEVICE_TIME, LABEL_TOPIC,
};
use serde_json::{json, Value as Json};
use std::path::PathBuf;

const TOPIC: &str = "plant/line1/temp";
const T0: u64 = 1_767_225_600_000; // 2026-01-01T00:00:00Z

fn path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/vectors/envelopes.json")
}

fn key() -> SigningKey {
    SigningKey::from_bytes(&[0x17; 32])
}

fn fields(counter: u64) -> EnvelopeFields<'static> {
    EnvelopeFields {
        device_id: "meter-17",
        counter,
        device_time_ms: T0.saturating_add(counter % 1000),
        content_type: "application/json",
        topic: TOPIC,
        payload: b"{\"celsius\":21.5}",
    }
}

/// Re-signs an edited COSE_Sign1 for `topic`, so only the edit is wrong.
fn resign(mut msg: CoseSign1, topic: &str) -> Vec<u8> {
    msg.protected.original_data = None;
    msg.signature = key().sign(&msg.tbs_data(topic.as_bytes())).to_bytes().to_vec();
    msg.to_tagged_vec().expect("encodes")
}

fn edit(f: impl FnOnce(&mut CoseSign1)) -> Vec<u8> {
    let mut msg =
        CoseSign1::from_tagged_slice(&envelope::sign(&key(), &fields(1)).expect("signs")).expect("parses");
    f(&mut msg);
    resign(msg, TOPIC)
}

fn generate() -> Json {
    let valid = envelope::sign(&key(), &fields(1)).expect("signs");
    let mut cases: Vec<(&str, &str, Vec<u8>, &str)> = vec![
        ("valid", TOPIC, valid.clone(), "valid"),
        ("valid-counter-2^64-1", TOPIC, envelope::sign(&key(), &fields(u64::MAX)).expect("signs"), "valid"),
        (
            "valid-without-topic-header",
            TOPIC,
            edit(|m| m.protected.header.rest.retain(|(l, _)| *l != Label::Int(LABEL_TOPIC))),
            "valid",
        ),
        ("published-on-another-topic", "plant/line2/temp", valid.clone(), "topic-mismatch"),
        (
            "no-topic-header-published-on-another-topic",
            "plant/line2/temp",
            edit(|m| m.protected.header.rest.retain(|(l, _)| *l != Label::Int(LABEL_TOPIC))),
            "bad-signature",
        ),
    ];
    let mut flip = |name, at: usize| {
        let mut b = valid.clone();
        b[at] ^= 1;
        cases.push((name, TOPIC, b, "bad-signature"));
    };
    flip("signature-last-byte-flipped", valid.len() - 1);
    flip("payload-byte-flipped", valid.len() - 70);
    cases.extend([
        (
            "alg-es256",
            TOPIC,
            edit(|m| m.protected.header.alg = Some(iana::Algorithm::ES256.into())),
            "unsupported-alg",
        ),
        ("no-alg", TOPIC, edit(|m| m.protected.header.alg = None), "malformed-envelope"),
        (
            "no-counter",
            TOPIC,
            edit(|m| m.protected.header.rest.retain(|(l, _)| *l != Label::Int(LABEL_COUNTER))),
            "malformed-envelope",
        ),
        (
            "negative-device-time",
            TOPIC,
            edit(|m| {
                m.protected.header.rest.retain(|(l, _)| *l != Label::Int(LABEL_DEVICE_TIME));
                m.protected.header.rest.push((Label::Int(LABEL_DEVICE_TIME), Value::from(-1)));
            }),
            "malformed-envelope",
        ),
        ("no-content-type", TOPIC, edit(|m| m.protected.header.content_type = None), "malformed-envelope"),
        (
            "kid-with-slash",
            TOPIC,
            edit(|m| m.protected.header.key_id = b"a/b".to_vec()),
            "malformed-envelope",
        ),
        (
            "unknown-header-label",
            TOPIC,
            edit(|m| m.protected.header.rest.push((Label::Int(-65600), Value::from(1)))),
            "malformed-envelope",
        ),
        (
            "unprotected-kid",
            TOPIC,
            edit(|m| m.unprotected = HeaderBuilder::new().key_id(b"meter-17".to_vec()).build()),
            "malformed-envelope",
        ),
        ("detached-payload", TOPIC, edit(|m| m.payload = None), "malformed-envelope"),
        (
            "short-signature",
            TOPIC,
            {
                let mut m = CoseSign1::from_tagged_slice(&valid).expect("parses");
                m.signature.pop();
                m.to_tagged_vec().expect("encodes")
            },
            "malformed-envelope",
        ),
        ("truncated", TOPIC, valid[..valid.len() - 1].to_vec(), "malformed-envelope"),
        ("trailing-byte", TOPIC, [valid.as_slice(), &[0]].concat(), "malformed-envelope"),
        ("untagged", TOPIC, valid[1..].to_vec(), "not-an-envelope"),
        ("plain-json", TOPIC, b"{\"celsius\":21.5}".to_vec(), "not-an-envelope"),
    ]);
    let public = hex::encode(key().verifying_key().as_bytes());
    Json::Array(
        cases
            .into_iter()
            .map(|(name, topic, bytes, expect)| {
                json!({"name": name, "topic": topic, "public_key_hex": public, "envelope_hex": hex::encode(bytes), "expect": expect})
            })
            .collect(),
    )
}

/// What a receiver concludes about `bytes` published on `topic`.
fn judge(topic: &str, bytes: &[u8], public_key: &ed25519_dalek::VerifyingKey) -> &'static str {
    if !is_envelope(bytes) {
        return "not-an-envelope";
    }
    match Envelope::parse(bytes, topic).and_then(|e| e.verify(public_key)) {
        Ok(()) => "valid",
        Err(e) => e.code(),
    }
}

#[test]
fn checked_in_envelope_vectors_match_the_generator_and_hold() {
    let generated = serde_json::to_string_pretty(&generate()).expect("serializes") + "\n";
    if std::env::var_os("NOTARY_WRITE_VECTORS").is_some() {
        std::fs::write(path(), &generated).expect("write vectors");
    }
    let stored = std::fs::read_to_string(path()).expect("tests/vectors/envelopes.json exists");
    assert!(stored == generated, "envelopes.json differs from the generator; regenerate deliberately");
    let cases: Vec<Json> = serde_json::from_str(&stored).expect("parses");
    for c in &cases {
        let bytes = hex::decode(c["envelope_hex"].as_str().expect("hex")).expect("hex");
        let mut pk = [0u8; 32];
        hex::decode_to_slice(c["public_key_hex"].as_str().expect("hex"), &mut pk).expect("hex");
        let key = ed25519_dalek::VerifyingKey::from_bytes(&pk).expect("key");
        let got = judge(c["topic"].as_str().expect("topic"), &bytes, &key);
        assert_eq!(got, c["expect"].as_str().expect("expect"), "case {}", c["name"]);
    }
}

#[test]
fn random_mutations_never_panic_the_parser() {
    let valid = envelope::sign(&key(), &fields(1)).expect("signs");
    let vk = key().verifying_key();
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..20_000 {
        let mut b = valid.clone();
        for _ in 0..1 + next() % 4 {
            let at = (next() as usize) % b.len();
            match next() % 3 {
                0 => b[at] = next() as u8,
                1 => b.truncate(at.max(1)),
                _ => b.insert(at, next() as u8),
            }
        }
        let _ = judge(TOPIC, &b, &vk);
    }
}
