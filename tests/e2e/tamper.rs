//! Flipping real bytes of a real bundle makes `mqtt-notary verify` fail
//! with the matching error.

use crate::support::*;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::Value;

fn b64_flip(v: &mut Value, byte: usize) {
    let mut bytes = B64.decode(v.as_str().expect("base64 string")).expect("base64");
    bytes[byte] ^= 0x01;
    *v = Value::String(B64.encode(bytes));
}

fn hex_flip(v: &mut Value, byte: usize) {
    let mut bytes = hex::decode(v.as_str().expect("hex string")).expect("hex");
    bytes[byte] ^= 0x80;
    *v = Value::String(hex::encode(bytes));
}

#[test]
fn tampering_with_any_part_fails_with_the_matching_error() {
    let tmp = tempfile::tempdir().expect("tmp");
    let notary = Notary::start(tmp.path());
    // Two batches, so the second one's log path is not empty.
    let first = b"first batch".to_vec();
    assert!(publish(notary.mqtt, "t/1", &first, &[]).status.success());
    notary.wait_proof(&first);
    let lines: Vec<String> = (0..9).map(|i| format!("reading {i}")).collect();
    publish_lines(notary.mqtt, "t/2", 1, &lines);
    let payload = lines[4].as_bytes().to_vec();
    let body = notary.wait_proof(&payload);
    let bundle: Value = serde_json::from_str::<Vec<Value>>(&body).expect("array").remove(0);
    let key = notary.broker_key();
    let check = |b: &Value, payload: &[u8], expect: &str, what: &str| {
        let (code, _, err) = cli_verify(&b.to_string(), payload, &key);
        assert_eq!(code, 1, "{what}: expected failure, got {code}: {err}");
        assert!(err.contains(&format!("[{expect}]")), "{what}: expected {expect}, got: {err}");
    };
    let (code, out, err) = cli_verify(&bundle.to_string(), &payload, &key);
    assert_eq!(code, 0, "untampered bundle verifies: {err}");
    assert!(out.contains("entry signed by the broker's key"), "the local anchor is proven: {out}");

    for i in 0..payload.len() {
        let mut p = payload.clone();
        p[i] ^= 0x20;
        check(&bundle, &p, "digest-mismatch", &format!("payload byte {i}"));
    }
    let batch_path_len = bundle["batch_path"].as_array().expect("path").len();
    assert!(batch_path_len >= 3);
    for i in 0..batch_path_len {
        let mut b = bundle.clone();
        b64_flip(&mut b["batch_path"][i], i * 7 % 32);
        check(&b, &payload, "root-mismatch", &format!("batch path hash {i}"));
    }
    let mut b = bundle.clone();
    b64_flip(&mut b["log_path"][0], 0);
    check(&b, &payload, "root-mismatch", "log path hash");

    let mut b = bundle.clone();
    b64_flip(&mut b["batch"], 30); // inside the batch root
    check(&b, &payload, "root-mismatch", "batch root");

    for byte in [2usize, 12, 20, 40, 60] {
        let mut b = bundle.clone();
        b64_flip(&mut b["leaf"], byte);
        let expect = if byte < 10 { "bad-path" } else { "root-mismatch" };
        check(&b, &payload, expect, &format!("leaf record byte {byte}"));
    }

    let note = bundle["checkpoint"].as_str().expect("note").to_owned();
    let (body_part, sig_part) = note.split_at(note.find("\n\n").expect("signed note"));
    let root_line = body_part.lines().nth(2).expect("root line");
    let mut root = B64.decode(root_line).expect("root");
    root[31] ^= 1;
    let mut b = bundle.clone();
    b["checkpoint"] = Value::String(note.replacen(root_line, &B64.encode(&root), 1));
    check(&b, &payload, "bad-checkpoint-signature", "checkpoint root");
    let sig_b64 = sig_part.trim().rsplit(' ').next().expect("signature");
    let mut sig = B64.decode(sig_b64).expect("signature");
    sig[10] ^= 1;
    let mut b = bundle.clone();
    b["checkpoint"] = Value::String(note.replacen(sig_b64, &B64.encode(&sig), 1));
    check(&b, &payload, "bad-checkpoint-signature", "checkpoint signature");

    for field in ["checkpoint_hash", "entry_hash", "prev_hash"] {
        let mut b = bundle.clone();
        hex_flip(&mut b["receipts"][0][field], 3);
        check(&b, &payload, "receipt-mismatch", &format!("receipt {field}"));
    }

    // Re-dated to the year 2100 and re-indexed by whoever holds the bundle,
    // the entry hash recomputed to match: the broker's signed ledger head
    // still names the real entry.
    let hash = |v: &Value| {
        let mut h = [0u8; 32];
        hex::decode_to_slice(v.as_str().expect("hex"), &mut h).expect("hex");
        h
    };
    let r = &bundle["receipts"][0];
    assert!(r["head"].is_string(), "a local receipt carries its signed head: {r}");
    let forged = notary_proof::LocalEntry {
        index: 999_999,
        prev_hash: hash(&r["prev_hash"]),
        checkpoint_hash: hash(&r["checkpoint_hash"]),
        anchored_at_ms: 4_102_444_800_000,
    };
    let mut b = bundle.clone();
    b["receipts"][0]["index"] = forged.index.into();
    b["receipts"][0]["anchored_at_ms"] = forged.anchored_at_ms.into();
    b["receipts"][0]["entry_hash"] = hex::encode(forged.hash()).into();
    check(&b, &payload, "receipt-mismatch", "receipt re-dated and re-indexed");

    // A key that is not the broker's is refused, not trusted.
    let other = tmp.path().join("other.pub");
    let stranger = notary_proof::NoteSigner::new("someone/else", [9; 32]).expect("signer");
    std::fs::write(&other, stranger.verifier().to_key_string()).expect("write");
    let (code, _, err) = cli_verify(&bundle.to_string(), &payload, &other);
    assert_eq!(code, 1);
    assert!(err.contains("[unknown-key]"), "{err}");
    std::fs::write(&other, "other/log+00000000+AQ==\n").expect("write");
    let (code, _, _) = cli_verify(&bundle.to_string(), &payload, &other);
    assert_eq!(code, 2, "an unreadable key is a usage error");
}
