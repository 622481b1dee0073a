//! Restarts and crashes lose nothing that was persisted, and the log
//! continues consistently across them.

use crate::support::*;
use notary_proof::tree::verify_consistency;
use notary_proof::verify_bundle_json;
use serde_json::Value;
use std::collections::HashMap;

fn b64_hash(v: &Value) -> [u8; 32] {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(v.as_str().expect("string"))
        .expect("base64")
        .try_into()
        .expect("32 bytes")
}

#[test]
fn restart_keeps_bundles_and_the_log_stays_consistent() {
    let tmp = tempfile::tempdir().expect("tmp");
    // Run on the generated default config, with short batches.
    let out = std::process::Command::new(BIN).arg("generate-config").output().expect("generate-config");
    let config = String::from_utf8(out.stdout)
        .expect("UTF-8")
        .replace("max_batch_age_ms = 1000", "max_batch_age_ms = 100");
    let config_path = tmp.path().join("generated.toml");
    std::fs::write(&config_path, config).expect("write");
    let mut notary = Notary::start_with(tmp.path(), Some(config_path));
    let key = broker_verifier(&notary);

    let before = b"before restart".to_vec();
    assert!(publish(notary.mqtt, "r/1", &before, &[]).status.success());
    let bundle_before = notary.wait_proof(&before);
    let (_, cp1) = notary.get("/v1/checkpoint");
    let cp1 = key.verify_checkpoint(&cp1).expect("signed");
    notary.stop();

    notary.restart();
    assert_eq!(notary.wait_proof(&before), bundle_before, "old bundles are still served, unchanged");
    let (code, _, err) = cli_verify(&bundle_before, &before, &notary.broker_key());
    assert_eq!(code, 0, "{err}");

    let after = b"after restart".to_vec();
    assert!(publish(notary.mqtt, "r/2", &after, &[]).status.success());
    let bundle_after = notary.wait_proof(&after);
    let v = verify_bundle_json(
        serde_json::from_str::<Vec<Value>>(&bundle_after).expect("array")[0].to_string().as_bytes(),
        &after,
        &key,
    )
    .expect("verifies");
    assert_eq!(v.leaf.seq, 1, "sequence numbers continue across restarts");
    let (_, cp2) = notary.get("/v1/checkpoint");
    let cp2 = key.verify_checkpoint(&cp2).expect("signed");
    assert!(cp2.size > cp1.size);

    let (status, body) = notary.get(&format!("/v1/consistency?from={}&to={}", cp1.size, cp2.size));
    assert_eq!(status, 200, "{body}");
    let c: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(key.verify_checkpoint(c["from_checkpoint"].as_str().expect("note")).expect("signed"), cp1);
    assert_eq!(key.verify_checkpoint(c["to_checkpoint"].as_str().expect("note")).expect("signed"), cp2);
    let proof: Vec<[u8; 32]> = c["proof"].as_array().expect("proof").iter().map(b64_hash).collect();
    verify_consistency(cp1.size, cp2.size, &cp1.root, &cp2.root, &proof).expect("the log only grew");
    let mut bad = proof.clone();
    if let Some(h) = bad.first_mut() {
        h[0] ^= 1;
        assert!(verify_consistency(cp1.size, cp2.size, &cp1.root, &cp2.root, &bad).is_err());
    }
    let (code, out) = ledger_verify(&notary.dir);
    assert_eq!(code, 0, "{out}");
}

#[test]
fn leaves_persisted_but_not_sealed_are_sealed_after_a_crash() {
    let tmp = tempfile::tempdir().expect("tmp");
    // Batches that would not seal for an hour: the leaf is only persisted.
    let slow = tmp.path().join("slow.toml");
    std::fs::write(&slow, "[log]\nmax_batch_age_ms = 3600000\n").expect("write");
    let mut notary = Notary::start_with(tmp.path(), Some(slow));
    assert!(publish(notary.mqtt, "c/1", b"persisted only", &[]).status.success());
    eventually("the leaf to be persisted", || (notary.metric("messages_notarized_total") == 1).then_some(()));
    let (status, _) = notary.get(&format!("/v1/proofs/{}", blake3_hex(b"persisted only")));
    assert_eq!(status, 202, "pending until sealed");
    let asker = MqttClient::connect(notary.mqtt, "p");
    assert!(asker.subscribe("$notary/inbox/p/#"));
    let request = format!("{{\"id\":7,\"digest\":\"{}\"}}", blake3_hex(b"persisted only"));
    asker.publish("$notary/proof/request", request.as_bytes());
    let (_, answer) = asker.next_message();
    let expected = format!(r#"{{"digest":"{}","id":7,"status":"pending"}}"#, blake3_hex(b"persisted only"));
    assert_eq!(answer, expected, "MQTT says pending too");
    notary.crash();

    notary.config = Some(fast_config(tmp.path(), ""));
    notary.restart();
    let body = notary.wait_proof(b"persisted only");
    let (code, _, err) = cli_verify(&body, b"persisted only", &notary.broker_key());
    assert_eq!(code, 0, "{err}");
}

#[test]
fn kill_9_mid_stream_loses_nothing_that_was_persisted() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut notary = Notary::start(tmp.path());
    let lines: Vec<String> = (0..30_000).map(|i| format!("crash-test message {i:05}")).collect();
    let by_digest: HashMap<String, String> =
        lines.iter().map(|l| (blake3_hex(l.as_bytes()), l.clone())).collect();
    let publisher = BackgroundPublisher::start(notary.mqtt, "crash/stream", lines);
    eventually("part of the stream to be persisted", || {
        (notary.metric("messages_notarized_total") >= 2_000).then_some(())
    });
    notary.crash();
    drop(publisher);

    // What the store holds after the crash is what must be provable.
    let persisted: Vec<(u64, String)> = {
        let db = rusqlite::Connection::open(notary.dir.join("notary.sqlite")).expect("store opens");
        let mut stmt = db.prepare("SELECT seq, digest FROM leaves ORDER BY seq").expect("query");
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, u64>(0)?, hex::encode(r.get::<_, Vec<u8>>(1)?))))
            .expect("rows");
        rows.map(|r| r.expect("row")).collect()
    };
    assert!(persisted.len() >= 2_000);
    for (i, (seq, _)) in persisted.iter().enumerate() {
        assert_eq!(*seq, i as u64, "persisted sequence numbers have no holes");
    }

    notary.restart();
    let key = broker_verifier(&notary);
    for (seq, digest) in &persisted {
        let line = by_digest.get(digest).expect("every leaf is one of our messages");
        let body = notary.wait_proof(line.as_bytes());
        let bundles: Vec<Value> = serde_json::from_str(&body).expect("array");
        let v = verify_bundle_json(bundles[0].to_string().as_bytes(), line.as_bytes(), &key)
            .unwrap_or_else(|e| panic!("seq {seq}: {e}"));
        assert_eq!(v.leaf.seq, *seq);
    }
    let (code, out) = ledger_verify(&notary.dir);
    assert_eq!(code, 0, "{out}");
    // The log continues after the crash.
    assert!(publish(notary.mqtt, "crash/after", b"after the crash", &[]).status.success());
    notary.wait_proof(b"after the crash");
}

#[test]
fn sigterm_seals_and_anchors_the_open_batch_before_exiting() {
    let tmp = tempfile::tempdir().expect("tmp");
    let config = tmp.path().join("hour.toml");
    std::fs::write(&config, "[log]\nmax_batch_age_ms = 3600000\n").expect("write");
    let mut notary = Notary::start_with(tmp.path(), Some(config));
    publish_lines(notary.mqtt, "s/1", 1, &(0..50).map(|i| format!("open batch {i}")).collect::<Vec<_>>());
    eventually("50 leaves persisted", || (notary.metric("messages_notarized_total") == 50).then_some(()));
    assert!(notary.get("/healthz").1.contains("\"log_size\":0"), "nothing sealed yet");
    notary.stop(); // asserts exit code 0

    let db = rusqlite::Connection::open(notary.dir.join("notary.sqlite")).expect("store");
    let sealed: u64 =
        db.query_row("SELECT COALESCE(SUM(size), 0) FROM batches", [], |r| r.get(0)).expect("sum");
    assert_eq!(sealed, 50, "the open batch was sealed at shutdown");
    let receipts: u64 = db.query_row("SELECT COUNT(*) FROM receipts", [], |r| r.get(0)).expect("count");
    assert_eq!(receipts, 1, "and anchored");
    let (code, out) = ledger_verify(&notary.dir);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("1 ledger entries (1 with a signed head), log size 1"), "{out}");
}
