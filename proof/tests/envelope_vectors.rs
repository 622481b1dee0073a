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
    self, is_envelope, DeviceKey, Envelope, EnvelopeFields, LABEL_COUNTER, LABEL_DEVICE_TIME, LABEL_TOPIC,
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

/// The shortest CBOR head of major type `major` with argument `n`.
fn head(major: u8, n: u64) -> Vec<u8> {
    let m = major << 5;
    match n {
        0..=23 => vec![m | n as u8],
        24..=0xff => vec![m | 24, n as u8],
        0x100..=0xffff => [&[m | 25][..], &(n as u16).to_be_bytes()].concat(),
        0x1_0000..=0xffff_ffff => [&[m | 26][..], &(n as u32).to_be_bytes()].concat(),
        _ => [&[m | 27][..], &n.to_be_bytes()].concat(),
    }
}

fn bstr(b: &[u8]) -> Vec<u8> {
    [head(2, b.len() as u64), b.to_vec()].concat()
}

/// COSE's Sig_structure for an envelope (RFC 9052 §4.4), written out.
fn to_be_signed(protected: &[u8], topic: &str, payload: &[u8]) -> Vec<u8> {
    [&[0x84, 0x6A][..], b"Signature1", &bstr(protected), &bstr(topic.as_bytes()), &bstr(payload)].concat()
}

/// An envelope assembled byte by byte: `protected` as given, the payload
/// item as given (`payload` is what it decodes to), signed by the device.
fn assemble(protected: &[u8], payload_item: &[u8], payload: &[u8]) -> Vec<u8> {
    let signature = key().sign(&to_be_signed(protected, TOPIC, payload)).to_bytes();
    [&[0xD2, 0x84][..], &bstr(protected), &[0xA0], payload_item, &bstr(&signature)].concat()
}

/// A signature on `msg` whose R carries the small-order point
/// `EIGHT_TORSION[t]`: s = r + k·a with k taken over that R, so
/// `sB - kA = R - T` and strict verification refuses it. Only the key's
/// holder can make one.
fn sign_with_torsion(msg: &[u8], nonce: u64, t: usize) -> [u8; 64] {
    use curve25519_dalek::{constants, EdwardsPoint, Scalar};
    use sha2::{Digest as _, Sha512};
    let mut a = [0u8; 32];
    a.copy_from_slice(&Sha512::digest(key().to_bytes())[..32]);
    a[0] &= 248;
    a[31] &= 127;
    a[31] |= 64;
    let a = Scalar::from_bytes_mod_order(a);
    let public = key().verifying_key();
    let r = Scalar::from_bytes_mod_order_wide(&Sha512::digest(nonce.to_le_bytes()).into());
    let big_r = (EdwardsPoint::mul_base(&r) + constants::EIGHT_TORSION[t]).compress();
    let hram = Sha512::new()
        .chain_update(big_r.as_bytes())
        .chain_update(public.as_bytes())
        .chain_update(msg)
        .finalize();
    let s = r + Scalar::from_bytes_mod_order_wide(&hram.into()) * a;
    let mut sig = [0u8; 64];
    sig[..32].copy_from_slice(big_r.as_bytes());
    sig[32..].copy_from_slice(s.as_bytes());
    sig
}

/// Whether plain ed25519 batch verification takes `bytes` beside a valid
/// envelope: what the R-with-torsion cases are there to catch.
fn plain_batch_accepts(valid: &[u8], bytes: &[u8]) -> bool {
    let parsed = [valid, bytes].map(|b| Envelope::parse(b, TOPIC).expect("parses"));
    let vk = key().verifying_key();
    ed25519_dalek::verify_batch(
        &[parsed[0].signed_bytes.as_slice(), parsed[1].signed_bytes.as_slice()],
        &[parsed[0].signature, parsed[1].signature],
        &[vk, vk],
    )
    .is_ok()
}

/// `valid` with its signature replaced by one whose R has a component of
/// order `order`, picked so that plain batch verification accepts it.
fn torsion_r(valid: &[u8], order: usize) -> Vec<u8> {
    let t = match order {
        2 => 4,
        4 => 2,
        _ => 1,
    };
    let env = Envelope::parse(valid, TOPIC).expect("parses");
    (0..)
        .map(|nonce| {
            let sig = sign_with_torsion(&env.signed_bytes, nonce, t);
            [&valid[..valid.len() - 64], &sig[..]].concat()
        })
        .find(|b| plain_batch_accepts(valid, b))
        .expect("one nonce in a few lets it through")
}

fn generate() -> Json {
    let valid = envelope::sign(&key(), &fields(1)).expect("signs");
    let protected = CoseSign1::from_tagged_slice(&valid)
        .expect("parses")
        .protected
        .original_data
        .expect("protected bytes");
    let inner: &[u8] = b"{\"celsius\":21.5}";
    // The counter (label -65537 = 3A 00 01 00 00) is 1, one byte.
    let counter_at =
        protected.windows(6).position(|w| w == [0x3A, 0x00, 0x01, 0x00, 0x00, 0x01]).expect("counter 1") + 5;
    let long_counter =
        [&protected[..counter_at], &[0x1B, 0, 0, 0, 0, 0, 0, 0, 1], &protected[counter_at + 1..]].concat();
    let mut repeated = [&protected[..], &[0x3A, 0x00, 0x01, 0x00, 0x00, 0x02]].concat();
    repeated[0] += 1; // one more pair in the map head
    let chunked = [&[0x5F][..], &bstr(&inner[..7]), &bstr(&inner[7..]), &[0xFF]].concat();
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
        ("assembled-by-hand", TOPIC, assemble(&protected, &bstr(inner), inner), "valid"),
        ("payload-chunked", TOPIC, assemble(&protected, &chunked, inner), "malformed-envelope"),
        (
            "counter-not-in-shortest-form",
            TOPIC,
            assemble(&long_counter, &bstr(inner), inner),
            "malformed-envelope",
        ),
        ("header-label-repeated", TOPIC, assemble(&repeated, &bstr(inner), inner), "malformed-envelope"),
        ("r-with-order-2-component", TOPIC, torsion_r(&valid, 2), "bad-signature"),
        ("r-with-order-4-component", TOPIC, torsion_r(&valid, 4), "bad-signature"),
        ("r-with-order-8-component", TOPIC, torsion_r(&valid, 8), "bad-signature"),
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
    let mut parsed = Vec::new();
    for c in &cases {
        let bytes = hex::decode(c["envelope_hex"].as_str().expect("hex")).expect("hex");
        let mut pk = [0u8; 32];
        hex::decode_to_slice(c["public_key_hex"].as_str().expect("hex"), &mut pk).expect("hex");
        let key = ed25519_dalek::VerifyingKey::from_bytes(&pk).expect("key");
        let topic = c["topic"].as_str().expect("topic");
        let got = judge(topic, &bytes, &key);
        assert_eq!(got, c["expect"].as_str().expect("expect"), "case {}", c["name"]);
        if let Ok(env) = Envelope::parse(&bytes, topic) {
            let key = DeviceKey::from_bytes(&pk).expect("key");
            parsed.push((c["name"].as_str().expect("name").to_owned(), env, key, got == "valid"));
        }
        if c["name"].as_str().is_some_and(|n| n.starts_with("r-with-")) {
            let valid = hex::decode(cases[0]["envelope_hex"].as_str().expect("hex")).expect("hex");
            assert!(plain_batch_accepts(&valid, &bytes), "case {} tests nothing", c["name"]);
            // The same pair, through the broker's check.
            let pair = [&valid, &bytes].map(|b| Envelope::parse(b, TOPIC).expect("parses"));
            let key = DeviceKey::from_bytes(&pk).expect("key");
            assert_eq!(
                envelope::verify_many(&[(&pair[0], &key), (&pair[1], &key)]),
                [true, false],
                "case {}",
                c["name"]
            );
        }
    }
    // The broker's check says of each what strict verification says.
    let items: Vec<(&Envelope, &DeviceKey)> = parsed.iter().map(|(_, e, k, _)| (e, k)).collect();
    for ((name, .., strict), batch) in parsed.iter().zip(envelope::verify_many(&items)) {
        assert_eq!(batch, *strict, "case {name}: the broker and strict verification differ");
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
