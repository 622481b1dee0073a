//! Untrusted input gets a clear error and never crashes or wedges the broker.

use crate::support::*;
use serde_json::Value;
use std::io::Write as _;
use std::net::TcpStream;

/// The broker still notarizes and serves proofs.
fn still_serving(notary: &Notary, tag: &str) {
    let payload = format!("still serving after {tag}");
    let out = publish(notary.mqtt, "health/check", payload.as_bytes(), &[]);
    assert!(out.status.success(), "publish after {tag}: {}", String::from_utf8_lossy(&out.stderr));
    notary.wait_proof(payload.as_bytes());
}

#[test]
fn malformed_proof_requests_get_error_answers() {
    let tmp = tempfile::tempdir().expect("tmp");
    let notary = Notary::start(tmp.path());
    // Answers, errors included, go to the asker's own inbox alone.
    let asker = MqttClient::connect(notary.mqtt, "asker");
    assert!(asker.subscribe("$notary/inbox/asker/#"));
    let errors = "$notary/inbox/asker/proof";
    let reply = "$notary/inbox/asker/bad";
    let unknown = "ab".repeat(32);
    let huge = format!(
        "{{\"id\":\"huge\",\"digest\":\"{}\",\"reply_to\":\"{reply}\",\"pad\":\"{}\"}}",
        unknown,
        "x".repeat(100_000)
    );
    let requests: Vec<(String, &str, &str)> = vec![
        ("this is not JSON".into(), errors, "bad_request"),
        ("[1,2,3]".into(), errors, "bad_request"),
        (format!("{{\"id\":\"hex\",\"digest\":\"zz\",\"reply_to\":\"{reply}\"}}"), reply, "bad_request"),
        (format!("{{\"id\":\"short\",\"digest\":\"abcd\",\"reply_to\":\"{reply}\"}}"), reply, "bad_request"),
        (
            format!("{{\"id\":\"unknown\",\"digest\":\"{unknown}\",\"reply_to\":\"{reply}\"}}"),
            reply,
            "not_found",
        ),
        (
            format!("{{\"id\":\"victim\",\"digest\":\"{unknown}\",\"reply_to\":\"devices/victim\"}}"),
            errors,
            "bad_request",
        ),
        (
            format!("{{\"id\":\"wild\",\"digest\":\"{unknown}\",\"reply_to\":\"$notary/inbox/asker/#\"}}"),
            errors,
            "bad_request",
        ),
        (huge, errors, "bad_request"),
    ];
    let mut expected: Vec<(String, String)> = Vec::new();
    for (body, topic, code) in &requests {
        asker.publish("$notary/proof/request", body.as_bytes());
        expected.push((topic.to_string(), code.to_string()));
    }
    let mut got: Vec<(String, String)> = (0..requests.len())
        .map(|_| {
            let (topic, payload) = asker.next_message();
            let v: Value = serde_json::from_str(&payload).expect("answers are JSON");
            assert_eq!(v["status"], "error", "{payload}");
            (topic, v["error"]["code"].as_str().expect("code").to_owned())
        })
        .collect();
    got.sort();
    expected.sort();
    assert_eq!(got, expected);
    still_serving(&notary, "malformed proof requests");
    assert!(notary.metric("proof_request_errors_total") >= requests.len() as u64);
}

#[test]
fn http_rejects_bad_requests_with_status_codes() {
    let tmp = tempfile::tempdir().expect("tmp");
    let notary = Notary::start(tmp.path());
    assert_eq!(notary.get("/v1/checkpoint").0, 404, "no checkpoint before the first batch");
    assert_eq!(notary.get("/v1/proofs/zz").0, 400);
    assert_eq!(notary.get(&format!("/v1/proofs/{}", "g".repeat(64))).0, 400);
    assert_eq!(notary.get(&format!("/v1/proofs/{}", "0".repeat(64))).0, 404);
    assert_eq!(notary.get("/v1/consistency?from=a&to=2").0, 400);
    assert_eq!(notary.get("/v1/consistency").0, 400);
    assert_eq!(notary.get("/v1/consistency?from=1&to=1").0, 400, "beyond the log size");
    assert_eq!(notary.get("/nothing/here").0, 404);
    still_serving(&notary, "bad HTTP requests");
    assert_eq!(notary.get("/v1/consistency?from=2&to=1").0, 400);
    // Equal sizes (PROTOCOL.md §HTTP API): an empty proof between one
    // checkpoint and itself, which RFC 9162 accepts exactly when the roots
    // are equal.
    let (status, body) = notary.get("/v1/consistency?from=1&to=1");
    assert_eq!(status, 200, "{body}");
    let c: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(c["proof"], serde_json::json!([]), "{body}");
    assert_eq!(c["from_checkpoint"], c["to_checkpoint"], "{body}");
    let key = notary_proof::NoteVerifier::from_key_string(
        &std::fs::read_to_string(notary.broker_key()).expect("key"),
    )
    .expect("key");
    let cp = key.verify_checkpoint(c["to_checkpoint"].as_str().expect("note")).expect("signed");
    notary_proof::tree::verify_consistency(1, 1, &cp.root, &cp.root, &[]).expect("equal roots");
    assert!(notary_proof::tree::verify_consistency(1, 1, &cp.root, &cp.root, &[cp.root]).is_err());
}

#[test]
fn mqtt5_clients_and_garbage_bytes_cannot_crash_or_wedge_the_listener() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut notary = Notary::start(tmp.path());
    // A 3.1.1 subscriber that must keep receiving throughout.
    let sub = Subscriber::start(notary.mqtt, &["shared/#"], &[]);

    // MQTT 5 with properties toward a 3.1.1 subscriber (rumqttd's router
    // once panicked on this): delivered, without the properties 3.1.1
    // cannot carry, and the listener stays whole.
    for i in 0..3 {
        let payload = format!("from v5 {i}");
        let out = publish(
            notary.mqtt,
            "shared/v5",
            payload.as_bytes(),
            &["-V", "mqttv5", "-D", "publish", "user-property", "k", "v"],
        );
        assert!(out.status.success(), "an MQTT 5 publish: {}", String::from_utf8_lossy(&out.stderr));
        let (topic, got) = sub.next_message();
        assert_eq!((topic.as_str(), got.as_str()), ("shared/v5", payload.as_str()));
    }
    assert!(notary.is_running());

    // Garbage: random bytes, a CONNECT with an absurd length, a truncated
    // CONNECT, and a silent connection.
    let garbage: Vec<Vec<u8>> = vec![
        (0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect(),
        vec![0x10, 0xff, 0xff, 0xff, 0x7f],
        vec![0x10, 0x0c, 0x00, 0x04, b'M', b'Q'],
        vec![0x30, 0x05, 0x00],
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
    ];
    let mut held = Vec::new();
    for bytes in &garbage {
        let mut s = TcpStream::connect(("127.0.0.1", notary.mqtt)).expect("connect");
        let _ = s.write_all(bytes);
        held.push(s);
    }
    held.push(TcpStream::connect(("127.0.0.1", notary.mqtt)).expect("silent connect"));

    assert!(publish(notary.mqtt, "shared/v4", b"from v4 after the garbage", &[]).status.success());
    let (topic, payload) = sub.next_message();
    assert_eq!((topic.as_str(), payload.as_str()), ("shared/v4", "from v4 after the garbage"));
    still_serving(&notary, "MQTT 5 clients and garbage");
    drop(held);
    assert!(notary.is_running());
}

#[test]
fn oversized_publishes_are_refused_and_the_broker_keeps_serving() {
    let tmp = tempfile::tempdir().expect("tmp");
    let config = fast_config(tmp.path(), "[mqtt]\nmax_payload_bytes = 1024\n");
    let mut notary = Notary::start_with(tmp.path(), Some(config));
    let big = vec![b'x'; 4096];
    let _ = publish(notary.mqtt, "big/one", &big, &[]);
    assert!(notary.is_running());
    still_serving(&notary, "an oversized publish");
    assert_eq!(notary.get(&format!("/v1/proofs/{}", blake3_hex(&big))).0, 404, "refused, not notarized");
}
