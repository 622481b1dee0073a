//! Messages in, provable bundles out.

use crate::support::*;
use notary_proof::{verify_bundle_json, ProofBundle};
use serde_json::Value;

#[test]
fn ten_thousand_messages_from_mosquitto_pub_all_verify() {
    let tmp = tempfile::tempdir().expect("tmp");
    let notary = Notary::start(tmp.path());
    const N: usize = 10_000;
    let lines: Vec<String> =
        (0..N).map(|i| format!("{{\"device\":\"d{}\",\"reading\":{i}}}", i % 17)).collect();
    publish_lines(notary.mqtt, "factory/line1/readings", 1, &lines);

    // Every message persisted, then every one sealed and anchored.
    eventually("10,000 leaves persisted", || {
        (notary.metric("messages_notarized_total") >= N as u64).then_some(())
    });
    notary.wait_proof(lines[N - 1].as_bytes());
    assert_eq!(notary.metric("messages_received_total"), N as u64);
    assert_eq!(notary.metric("gap_messages_total"), 0);

    assert_eq!(verify_all(&notary, &lines, "factory/line1/readings"), N, "each message notarized once");
    let (code, out) = ledger_verify(&notary.dir);
    assert_eq!(code, 0, "{out}");
}

#[test]
fn proofs_over_mqtt_and_the_retained_checkpoint() {
    let tmp = tempfile::tempdir().expect("tmp");
    let notary = Notary::start(tmp.path());
    let payload = b"{\"t\": 21.5}";
    assert!(publish(notary.mqtt, "sensors/a", payload, &[]).status.success());
    let http = notary.wait_proof(payload);

    let asker = MqttClient::connect(notary.mqtt, "e2e");
    assert!(asker.subscribe("$notary/inbox/e2e/#"));
    let request = format!(
        "{{\"id\":\"req-1\",\"digest\":\"{}\",\"reply_to\":\"$notary/inbox/e2e/req-1\"}}",
        blake3_hex(payload)
    );
    asker.publish("$notary/proof/request", request.as_bytes());
    let (topic, answer) = asker.next_message();
    assert_eq!(topic, "$notary/inbox/e2e/req-1");
    let answer: Value = serde_json::from_str(&answer).expect("JSON answer");
    assert_eq!(answer["id"], "req-1");
    assert_eq!(answer["digest"], blake3_hex(payload), "the answer names what it answers");
    assert_eq!(answer["status"], "ok");
    let bundles = answer["bundles"].as_array().expect("bundles");
    let from_http: Vec<ProofBundle> = serde_json::from_str(&http).expect("bundles");
    let from_mqtt: Vec<ProofBundle> = serde_json::from_value(Value::Array(bundles.clone())).expect("bundles");
    assert_eq!(from_mqtt, from_http, "MQTT and HTTP serve the same bundle");
    verify_bundle_json(bundles[0].to_string().as_bytes(), payload, &broker_verifier(&notary))
        .expect("verifies");

    // The latest checkpoint is retained on $notary/checkpoint and matches HTTP.
    let cp_sub = Subscriber::start(notary.mqtt, &["$notary/checkpoint"], &["-C", "1"]);
    let (_, note_first_line) = cp_sub.next_message();
    let (status, note) = notary.get("/v1/checkpoint");
    assert_eq!(status, 200);
    broker_verifier(&notary).verify_checkpoint(&note).expect("signed checkpoint");
    assert!(note.starts_with(note_first_line.trim()), "retained checkpoint names the same log");
}

#[test]
fn plugin_topics_are_not_notarized() {
    let tmp = tempfile::tempdir().expect("tmp");
    let notary = Notary::start(tmp.path());
    assert!(publish(notary.mqtt, "$notary/anything", b"internal", &[]).status.success());
    assert!(publish(notary.mqtt, "notary/anything", b"a device topic now", &[]).status.success());
    assert!(publish(notary.mqtt, "devices/x", b"external", &[]).status.success());
    notary.wait_proof(b"external");
    notary.wait_proof(b"a device topic now");
    let (status, _) = notary.get(&format!("/v1/proofs/{}", blake3_hex(b"internal")));
    assert_eq!(status, 404);
    assert_eq!(notary.metric("messages_received_total"), 2);
}

/// `[topics] legacy = true` keeps the previous release's contract: the
/// names under `notary/`, requests answered on any `reply_to` under
/// `notary/proof/response/` (by `mosquitto_pub` and `mosquitto_sub`, two
/// connections, as before), the checkpoint retained on `notary/checkpoint`,
/// and clients refused there.
#[test]
fn legacy_topic_names_keep_the_previous_contract() {
    let tmp = tempfile::tempdir().expect("tmp");
    let notary = Notary::start_with(tmp.path(), Some(fast_config(tmp.path(), "[topics]\nlegacy = true\n")));
    notary.notarize("sensors/a", b"old client");
    let sub = Subscriber::start(notary.mqtt, &["notary/proof/response/old", "notary/proof/errors"], &[]);
    let request = format!(
        r#"{{"id":1,"digest":"{}","reply_to":"notary/proof/response/old"}}"#,
        blake3_hex(b"old client")
    );
    assert!(publish(notary.mqtt, "notary/proof/request", request.as_bytes(), &[]).status.success());
    let (topic, answer) = sub.next_message();
    assert_eq!(topic, "notary/proof/response/old");
    assert!(answer.contains("\"status\":\"ok\""), "{answer}");
    assert!(publish(notary.mqtt, "notary/proof/request", b"{}", &[]).status.success());
    assert_eq!(sub.next_message().0, "notary/proof/errors");

    let forged = publish(notary.mqtt, "notary/checkpoint", b"FAKE", &["-r", "-V", "mqttv5", "-d"]);
    assert!(String::from_utf8_lossy(&forged.stdout).contains("RC:135"));
    let cp = Subscriber::start(notary.mqtt, &["notary/checkpoint"], &["-C", "1"]);
    let (_, first_line) = cp.next_message();
    let (_, note) = notary.get("/v1/checkpoint");
    assert!(note.starts_with(first_line.trim()), "retained: {first_line:?}");
    assert_eq!(notary.metric("messages_received_total"), 1, "nothing under notary/ was notarized");
}

#[test]
fn the_same_payload_twice_gets_two_bundles() {
    let tmp = tempfile::tempdir().expect("tmp");
    let notary = Notary::start(tmp.path());
    publish_lines(notary.mqtt, "a", 1, &["same".into()]);
    publish_lines(notary.mqtt, "b", 1, &["same".into()]);
    let body = eventually("both notarizations proven", || {
        let b = notary.wait_proof(b"same");
        let n = serde_json::from_str::<Vec<Value>>(&b).map(|v| v.len()).unwrap_or(0);
        (n == 2).then_some(b)
    });
    let (code, out, err) = cli_verify(&body, b"same", &notary.broker_key());
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("topic:       a") && out.contains("topic:       b"), "{out}");
}

#[test]
fn a_burst_past_a_one_message_queue_holds_publishers_back_and_loses_nothing() {
    // A one-message queue between broker and ingest: the publish hook
    // waits (back-pressure to each publisher's connection) instead of
    // buffering or dropping. Every message must become a leaf; no gap.
    let tmp = tempfile::tempdir().expect("tmp");
    let config = fast_config(tmp.path(), "[ingest]\nqueue_capacity = 1\n");
    let notary = Notary::start_with(tmp.path(), Some(config));
    const PER: usize = 2_000;
    let publishers: Vec<_> = (0..4)
        .map(|p| {
            let lines: Vec<String> = (0..PER).map(|i| format!("burst {p}/{i}")).collect();
            let port = notary.mqtt;
            std::thread::spawn(move || publish_lines(port, &format!("burst/{p}"), 1, &lines))
        })
        .collect();
    for p in publishers {
        p.join().expect("publisher");
    }
    // Acknowledged after commit: once every publisher has its PUBACKs, the
    // leaves are there, with no waiting.
    let total = 4 * PER as u64;
    assert!(notary.metric("messages_notarized_total") >= total, "{}", notary.log());
    assert_eq!(notary.metric("gap_messages_total"), 0);
    let db = rusqlite::Connection::open(notary.dir.join("notary.sqlite")).expect("store");
    for p in 0..4 {
        for i in [0, PER / 2, PER - 1] {
            let digest = blake3::hash(format!("burst {p}/{i}").as_bytes());
            let n: u64 = db
                .query_row(
                    "SELECT COUNT(*) FROM leaves WHERE digest = ?1",
                    [digest.as_bytes().as_slice()],
                    |r| r.get(0),
                )
                .expect("query");
            assert!(n >= 1, "burst {p}/{i} has no leaf");
        }
    }
}

#[test]
fn a_payload_notarized_very_often_is_answered_with_the_first_100() {
    let tmp = tempfile::tempdir().expect("tmp");
    let notary = Notary::start(tmp.path());
    let lines: Vec<String> = (0..105).map(|_| "ON".to_owned()).collect();
    publish_lines(notary.mqtt, "switch/1", 1, &lines);
    eventually("all 105 persisted", || (notary.metric("messages_notarized_total") == 105).then_some(()));
    let body = eventually("100 bundles", || {
        let b = notary.wait_proof(b"ON");
        let n = serde_json::from_str::<Vec<Value>>(&b).map(|v| v.len()).unwrap_or(0);
        (n == 100).then_some(b)
    });
    let bundles: Vec<Value> = serde_json::from_str(&body).expect("array");
    let key = broker_verifier(&notary);
    let seqs: Vec<u64> = bundles
        .iter()
        .map(|b| verify_bundle_json(b.to_string().as_bytes(), b"ON", &key).expect("verifies").leaf.seq)
        .collect();
    assert_eq!(seqs, (0..100).collect::<Vec<u64>>(), "the first 100, in order");
}
