//! Retention: old messages are deleted online; what was handed out keeps
//! verifying, and a request for a deleted message names its batch.

use crate::support::*;
use std::process::Command;

/// The broker's answer over MQTT (`mosquitto_rr`) to a proof request.
fn ask_over_mqtt(port: u16, digest: &str) -> serde_json::Value {
    let out = Command::new("mosquitto_rr")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-i", "asker", "-W", "60"])
        .args(["-t", "$notary/proof/request", "-e", "replies/asker"])
        .args(["-m", &format!(r#"{{"id":1,"digest":"{digest}"}}"#)])
        .output()
        .expect("mosquitto_rr");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{said} {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(said.trim()).expect("a JSON answer")
}

#[test]
fn pruned_messages_answer_gone_and_their_bundles_still_verify() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let devices = "[devices]\nrequire_signature = [\"secure/#\"]\n";
    let config = fast_config(tmp.path(), devices);
    let mut n = Notary::start_with(tmp.path(), Some(config.clone()));
    let rejected = b"unsigned, on a signed topic";
    publish(n.mqtt, "secure/x", rejected, &["-q", "1"]);
    let rejected_path = format!("/v1/proofs/{}", blake3_hex(rejected));
    eventually("the rejection to be recorded", || (n.get(&rejected_path).0 == 422).then_some(()));
    let old: Vec<String> = (0..300).map(|i| format!("old message {i}")).collect();
    publish_lines(n.mqtt, "t/old", 1, &old);
    let bundle = n.wait_proof(old[7].as_bytes());
    n.wait_proof(old[299].as_bytes());
    let bundles: Vec<notary_proof::ProofBundle> = serde_json::from_str(&bundle).expect("bundles");
    let batch = notary_proof::BatchRecord::decode(&bundles[0].batch).expect("batch record");
    let (_, latest) = n.get("/v1/checkpoint");
    let size_before: u64 = latest.lines().nth(1).and_then(|l| l.parse().ok()).expect("checkpoint size");
    n.stop();

    // Every store uses more than one byte: every anchored batch is due.
    std::fs::write(&config, format!("[log]\nmax_batch_age_ms = 100\n{devices}[retention]\nmax_bytes = 1\n"))
        .expect("config");
    n.restart();
    let digest = blake3_hex(old[7].as_bytes());
    let gone = eventually("the old message to be pruned", || {
        let (status, body) = n.get(&format!("/v1/proofs/{digest}"));
        (status == 410).then_some(body)
    });
    let gone: serde_json::Value = serde_json::from_str(&gone).expect("JSON");
    assert_eq!(gone["status"], "pruned");
    assert_eq!(gone["batch"], batch.number, "names the batch that held it");
    eventually("every sealed batch to be pruned", || {
        (n.metric("pruned_batches") == size_before).then_some(())
    });
    assert_eq!(n.metric("pruned_leaves_total"), 300);
    let answer = ask_over_mqtt(n.mqtt, &digest);
    assert_eq!(answer["status"], "pruned", "{answer}");
    assert_eq!(answer["batch"], batch.number, "{answer}");
    // Rejections received before a pruned batch was sealed go with it.
    assert_eq!(n.get(&rejected_path).0, 404);
    // The bundle handed out before still verifies, and the log still
    // proves its growth from that checkpoint on.
    let (code, out, err) = cli_verify_with(&bundle, old[7].as_bytes(), &n.broker_key(), &[]);
    assert_eq!(code, 0, "{out}{err}");
    let (status, body) = n.get(&format!("/v1/consistency?from=1&to={size_before}"));
    assert_eq!(status, 200, "{body}");
    assert_eq!(n.health().0, 200);
    n.stop();

    // Without retention again: new messages continue the sequence (no
    // number is reused though every old leaf is gone) and are proven.
    std::fs::write(&config, format!("[log]\nmax_batch_age_ms = 100\n{devices}")).expect("config");
    n.restart();
    publish(n.mqtt, "t/new", b"a new message", &["-q", "1"]);
    let fresh = n.wait_proof(b"a new message");
    let (code, out, err) = cli_verify_with(&fresh, b"a new message", &n.broker_key(), &[]);
    assert_eq!(code, 0, "{out}{err}");
    let fresh: Vec<notary_proof::ProofBundle> = serde_json::from_str(&fresh).expect("bundles");
    let leaf = notary_proof::LeafRecord::decode(&fresh[0].leaf).expect("leaf");
    assert_eq!(leaf.seq, 300, "the 300 old leaves keep their numbers");
    assert_eq!(n.get(&format!("/v1/proofs/{digest}")).0, 410, "the tombstone outlives a restart");
}
