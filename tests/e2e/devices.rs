//! Signed device messages end to end: keys and the registry from the CLI,
//! envelopes signed by the CLI (rumqttc), by the library and by the Python
//! example, published through mosquitto_pub; every rejection reason; replay,
//! another topic, revocation and rotation.

use crate::support::*;
use notary_proof::envelope::{self, EnvelopeFields, LABEL_COUNTER, LABEL_DEVICE_TIME};
use notary_proof::{Assurance, ProofBundle, RegistryAction};
use std::path::Path;
use std::process::Command;

/// A library-signed envelope for `topic`.
fn envelope(key: &Path, id: &str, topic: &str, counter: u64, payload: &[u8]) -> Vec<u8> {
    envelope::sign(
        &signing_key(key),
        &EnvelopeFields {
            device_id: id,
            counter,
            device_time_ms: 1_767_225_600_000 + counter,
            content_type: "application/json",
            topic,
            payload,
        },
    )
    .expect("signs")
}

fn bundles(json: &str) -> Vec<ProofBundle> {
    serde_json::from_str(json).expect("bundles parse")
}

/// Verifies with the library and the CLI; returns the CLI's report.
pub(crate) fn verify_device_signed(n: &Notary, json: &str, payload: &[u8], device: &str) -> String {
    let key = broker_verifier(n);
    for b in bundles(json) {
        let v = notary_proof::verify_bundle(&b, payload, &key).expect("bundle verifies");
        assert_eq!(v.leaf.assurance, Assurance::DeviceSigned);
        assert_eq!(v.device.as_ref().map(|d| d.device_id.as_str()), Some(device));
    }
    let (code, out, err) = cli_verify(json, payload, &n.broker_key());
    assert_eq!(code, 0, "CLI verify: {err}");
    assert!(out.contains("assurance:   device-signed"), "{out}");
    assert!(out.contains(&format!("device:      {device}")), "{out}");
    out
}

#[test]
fn devices_signing_with_the_cli_the_library_and_python_get_device_signed_proofs() {
    let tmp = tempfile::tempdir().expect("tmp");
    let n = Notary::start(tmp.path());
    let (key, public) = keygen(tmp.path(), "meter-1");
    // Enrolled while the broker runs: no restart.
    n.registry(&["add", "meter-1", "--public-key", &public]);
    let list = n.devices();
    assert_eq!(list["devices"][0]["id"], "meter-1");
    assert_eq!(list["devices"][0]["status"], "active");

    // The CLI signs (next counter from its state file) and publishes with rumqttc.
    let mut digests = Vec::new();
    for i in 0..3 {
        digests.push(n.device_publish("meter-1", &key, "meters/1", &format!("{{\"kwh\":{i}}}")));
    }
    for d in &digests {
        let json = n.wait_proof_of(d);
        let b = bundles(&json);
        let leaf = notary_proof::LeafRecord::decode(&b[0].leaf).expect("leaf");
        assert_eq!(leaf.assurance, Assurance::DeviceSigned);
        assert!(b[0].device_key.is_some(), "device-signed bundles carry key evidence");
    }

    // The library signs; mosquitto_pub publishes the bytes with -f.
    let env = envelope(&key, "meter-1", "meters/1", 100, b"{\"kwh\":7}");
    assert!(publish(n.mqtt, "meters/1", &env, &[]).status.success());
    let out = verify_device_signed(&n, &n.wait_proof(&env), &env, "meter-1");
    assert!(out.contains("counter:     100"), "{out}");
    assert!(out.contains(&format!("device key:  {public}")), "{out}");

    // The Python example from the docs signs; mosquitto_pub publishes.
    let file = tmp.path().join("py.cbor");
    let status = Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/examples/sign_envelope.py"))
        .args(["--id", "meter-1", "--key"])
        .arg(&key)
        .args(["--topic", "meters/1", "--counter", "101", "--message", "{\"kwh\":8}", "--out"])
        .arg(&file)
        .status()
        .expect("python3 runs");
    assert!(status.success(), "the Python example failed");
    let py = std::fs::read(&file).expect("envelope written");
    assert!(publish(n.mqtt, "meters/1", &py, &[]).status.success());
    let out = verify_device_signed(&n, &n.wait_proof(&py), &py, "meter-1");
    assert!(out.contains("content:     text/plain"), "{out}");
    assert_eq!(n.metric("messages_rejected_total{reason=\"replay\"}"), 0);

    // Unsigned messages on other topics keep working.
    assert!(publish(n.mqtt, "plain/1", b"21.5", &[]).status.success());
    let json = n.wait_proof(b"21.5");
    let v = notary_proof::verify_bundle(&bundles(&json)[0], b"21.5", &broker_verifier(&n)).expect("valid");
    assert_eq!(v.leaf.assurance, Assurance::BrokerReceived);
    assert!(v.device.is_none());
}

#[test]
fn tampered_device_evidence_fails_verification() {
    let tmp = tempfile::tempdir().expect("tmp");
    let n = Notary::start(tmp.path());
    let (key, public) = keygen(tmp.path(), "d");
    n.registry(&["add", "d", "--public-key", &public]);
    let env = envelope(&key, "d", "t/1", 1, b"x");
    assert!(publish(n.mqtt, "t/1", &env, &[]).status.success());
    let json = n.wait_proof(&env);
    let base = bundles(&json).remove(0);
    let broker = broker_verifier(&n);
    notary_proof::verify_bundle(&base, &env, &broker).expect("valid");
    let check = |b: &ProofBundle, payload: &[u8], code: &str| {
        let e = notary_proof::verify_bundle(b, payload, &broker).expect_err("must fail");
        assert_eq!(e.code(), code, "{e}");
        let (exit, _, err) = cli_verify(&serde_json::to_string(b).expect("json"), payload, &n.broker_key());
        assert_eq!(exit, 1, "{err}");
        assert!(err.contains(&format!("[{code}]")), "{err}");
    };

    let mut b = base.clone();
    b.device_key = None;
    check(&b, &env, "bad-key-evidence");
    let mut b = base.clone();
    let ev = b.device_key.as_mut().expect("evidence");
    ev.enrolment.leaf[17] ^= 1; // the registry leaf's received-at time
    check(&b, &env, "root-mismatch");
    let mut b = base.clone();
    let ev = b.device_key.as_mut().expect("evidence");
    let last = ev.enrolment.leaf.len() - 1;
    ev.enrolment.leaf[last - 40] ^= 1; // a byte of the enrolled public key
    check(&b, &env, "root-mismatch"); // the leaf is no longer the one the log holds
    let mut b = base.clone();
    b.device_key.as_mut().expect("evidence").enrolment.batch_path.push([0; 32]);
    check(&b, &env, "bad-path");
    // The signature (last bytes of the envelope) flipped: the digest no
    // longer matches the leaf.
    let mut bad = env.clone();
    let end = bad.len() - 1;
    bad[end] ^= 1;
    check(&base, &bad, "digest-mismatch");
}

/// The broker and the offline verifier agree on every envelope vector: a
/// valid one is notarized (or, once its counter is spent, refused as a
/// replay, which is judged after the signature), any other is refused with
/// the vector's reason. Among them: signatures whose R has a small-order
/// component, which plain batch verification lets through, and a chunked
/// payload, which a generic CBOR decoder accepts.
#[test]
fn the_broker_judges_every_envelope_vector_as_the_verifier_does() {
    let tmp = tempfile::tempdir().expect("tmp");
    let n = Notary::start(tmp.path());
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/vectors/envelopes.json"),
    )
    .expect("vectors");
    let cases: Vec<serde_json::Value> = serde_json::from_str(&text).expect("vectors parse");
    n.registry(&["add", "meter-17", "--public-key", cases[0]["public_key_hex"].as_str().expect("key")]);
    let sub = Subscriber::start(n.mqtt, &["$notary/rejections"], &[]);
    let mut spent = std::collections::HashSet::new();
    let mut notarized = 0;
    for c in &cases {
        let name = c["name"].as_str().expect("name");
        let topic = c["topic"].as_str().expect("topic");
        let bytes = hex::decode(c["envelope_hex"].as_str().expect("hex")).expect("hex");
        let expect = c["expect"].as_str().expect("expect");
        assert!(publish(n.mqtt, topic, &bytes, &[]).status.success(), "{name}");
        let counter = notary_proof::Envelope::parse(&bytes, topic).map(|e| e.counter);
        let expect = match (expect, counter) {
            ("valid", Ok(c)) if !spent.insert(c) => "replay",
            (e, _) => e,
        };
        match expect {
            "valid" | "not-an-envelope" => {
                let json = n.wait_proof(&bytes);
                let v = notary_proof::verify_bundle(&bundles(&json)[0], &bytes, &broker_verifier(&n))
                    .unwrap_or_else(|e| panic!("{name}: {e}"));
                let level =
                    if expect == "valid" { Assurance::DeviceSigned } else { Assurance::BrokerReceived };
                assert_eq!(v.leaf.assurance, level, "{name}");
                notarized += 1;
            }
            reason => {
                let (_, event) = sub.next_message();
                let event: serde_json::Value = serde_json::from_str(&event).expect("rejection event is JSON");
                assert_eq!(event["reason"], reason, "{name}: {event}");
                assert_eq!(event["digest"], blake3_hex(&bytes), "{name}");
            }
        }
    }
    assert_eq!(notarized, 4, "two valid envelopes, two plain payloads");
}

#[test]
fn every_rejection_reason_is_published_counted_and_recorded() {
    let tmp = tempfile::tempdir().expect("tmp");
    let config =
        fast_config(tmp.path(), "[devices]\nrequire_signature = [\"secure/#\"]\nmax_envelope_bytes = 2048\n");
    let n = Notary::start_with(tmp.path(), Some(config));
    let (key, public) = keygen(tmp.path(), "good");
    let (old_key, old_public) = keygen(tmp.path(), "gone");
    n.registry(&["add", "good", "--public-key", &public]);
    n.registry(&["add", "gone", "--public-key", &old_public]);
    n.registry(&["revoke", "gone"]);
    let sub = Subscriber::start(n.mqtt, &["$notary/rejections"], &[]);
    // Judged before delivered: a device subscriber sees no rejected message.
    let devices_sub = Subscriber::start(n.mqtt, &["secure/#"], &["-F", "%t %x"]);

    let valid = envelope(&key, "good", "secure/a", 5, b"{\"v\":1}");
    let mut truncated = valid.clone();
    truncated.truncate(valid.len() - 10);
    let mut bad_sig = envelope(&key, "good", "secure/a", 6, b"{\"v\":2}");
    let end = bad_sig.len() - 1;
    bad_sig[end] ^= 0x01;
    let (ghost_key, _) = keygen(tmp.path(), "ghost");
    let es256 = {
        use coset::{iana, CoseSign1Builder, HeaderBuilder, TaggedCborSerializable as _};
        let h = HeaderBuilder::new()
            .algorithm(iana::Algorithm::ES256)
            .content_type("text/plain".into())
            .key_id(b"good".to_vec())
            .value(LABEL_COUNTER, 9.into())
            .value(LABEL_DEVICE_TIME, 9.into())
            .build();
        CoseSign1Builder::new()
            .protected(h)
            .payload(b"x".to_vec())
            .signature(vec![0; 64])
            .build()
            .to_tagged_vec()
            .expect("encodes")
    };
    let cases: Vec<(&str, &str, Vec<u8>)> = vec![
        ("malformed-envelope", "secure/a", truncated),
        ("unsupported-alg", "secure/a", es256),
        ("unknown-device", "secure/a", envelope(&ghost_key, "ghost", "secure/a", 1, b"boo")),
        ("revoked-device", "secure/a", envelope(&old_key, "gone", "secure/a", 1, b"late")),
        ("bad-signature", "secure/a", bad_sig),
        // The valid envelope, moved to another topic: the signed topic differs.
        ("topic-mismatch", "secure/b", valid.clone()),
        ("oversize", "secure/a", envelope(&key, "good", "secure/a", 7, &[b'x'; 3000])),
        ("signature-required", "secure/a", b"{\"v\":\"unsigned\"}".to_vec()),
    ];
    for (reason, topic, payload) in &cases {
        assert!(publish(n.mqtt, topic, payload, &[]).status.success());
        let (t, event) = sub.next_message();
        assert_eq!(t, "$notary/rejections");
        let event: serde_json::Value = serde_json::from_str(&event).expect("rejection event is JSON");
        assert_eq!(event["reason"], *reason, "{event}");
        assert_eq!(event["topic"], *topic);
        assert_eq!(event["digest"], blake3_hex(payload));
        assert_eq!(n.metric(&format!("messages_rejected_total{{reason=\"{reason}\"}}")), 1, "{reason}");
        let (status, body) = n.get(&format!("/v1/proofs/{}", blake3_hex(payload)));
        assert_eq!(status, 422, "{reason}: {body}");
        assert!(body.contains(&format!("\"reason\":\"{reason}\"")), "{body}");
    }

    // Over MQTT, a proof request for a rejected payload answers "rejected".
    let asker = MqttClient::connect(n.mqtt, "asker");
    assert!(asker.subscribe("$notary/inbox/asker/#"));
    let request = format!("{{\"id\":7,\"digest\":\"{}\"}}", blake3_hex(&cases[4].2));
    asker.publish("$notary/proof/request", request.as_bytes());
    let (_, answer) = asker.next_message();
    let answer: serde_json::Value = serde_json::from_str(&answer).expect("answer is JSON");
    assert_eq!(answer["status"], "rejected", "{answer}");
    assert_eq!(answer["rejections"][0]["reason"], "bad-signature", "{answer}");

    // MQTT 5 publishers learn why: PUBACK reason 0x87 (not authorized) or
    // 0x99 (payload format invalid), with the rejection as reason string.
    for (payload, code) in [(&cases[4].2, "RC:135"), (&cases[0].2, "RC:153")] {
        let out = publish(n.mqtt, "secure/a", payload, &["-V", "mqttv5", "-d"]);
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(said.contains(code), "{said}");
        sub.next_message();
    }

    // The valid envelope is accepted once; the captured copy is a replay.
    assert!(publish(n.mqtt, "secure/a", &valid, &[]).status.success());
    verify_device_signed(&n, &n.wait_proof(&valid), &valid, "good");
    // It is the first message the device subscriber got: every rejected
    // one before it was withheld.
    let (topic, first) = devices_sub.next_message();
    assert_eq!(topic, "secure/a");
    assert_eq!(first, hex::encode(&valid), "a rejected message reached a subscriber");
    assert!(publish(n.mqtt, "secure/a", &valid, &[]).status.success());
    let (_, event) = sub.next_message();
    assert!(event.contains("\"reason\":\"replay\""), "{event}");
    assert_eq!(n.metric("messages_rejected_total{reason=\"replay\"}"), 1);
    // An older counter is a replay too, even freshly signed.
    let older = envelope(&key, "good", "secure/a", 4, b"{\"v\":0}");
    assert!(publish(n.mqtt, "secure/a", &older, &[]).status.success());
    let (_, event) = sub.next_message();
    assert!(event.contains("\"reason\":\"replay\""), "{event}");
    // The replay did not add a second leaf: still one bundle.
    assert_eq!(bundles(&n.wait_proof(&valid)).len(), 1);
    // No rejected message has a proof, and the broker keeps serving.
    assert!(publish(n.mqtt, "plain/x", b"still here", &[]).status.success());
    n.wait_proof(b"still here");
}

#[test]
fn rotated_and_revoked_keys_keep_old_proofs_valid_and_refuse_new_messages() {
    let tmp = tempfile::tempdir().expect("tmp");
    let n = Notary::start(tmp.path());
    let (key_a, public_a) = keygen(tmp.path(), "a");
    let (key_b, public_b) = keygen(tmp.path(), "b");
    n.registry(&["add", "dev", "--public-key", &public_a]);
    let m1 = envelope(&key_a, "dev", "t", 1, b"signed with A");
    assert!(publish(n.mqtt, "t", &m1, &[]).status.success());
    n.wait_proof(&m1);

    n.registry(&["rotate", "dev", "--public-key", &public_b]);
    let sub = Subscriber::start(n.mqtt, &["$notary/rejections"], &[]);
    let m2 = envelope(&key_a, "dev", "t", 2, b"old key after rotation");
    assert!(publish(n.mqtt, "t", &m2, &[]).status.success());
    let (_, event) = sub.next_message();
    assert!(event.contains("\"reason\":\"bad-signature\""), "{event}");
    let m3 = envelope(&key_b, "dev", "t", 3, b"signed with B");
    assert!(publish(n.mqtt, "t", &m3, &[]).status.success());
    let out = verify_device_signed(&n, &n.wait_proof(&m3), &m3, "dev");
    assert!(out.contains(&format!("device key:  {public_b}")), "{out}");

    n.registry(&["revoke", "dev"]);
    let m4 = envelope(&key_b, "dev", "t", 4, b"after revocation");
    assert!(publish(n.mqtt, "t", &m4, &[]).status.success());
    let (_, event) = sub.next_message();
    assert!(event.contains("\"reason\":\"revoked-device\""), "{event}");

    // m1 still verifies against key A, the key valid at its position.
    let out = verify_device_signed(&n, &n.wait_proof(&m1), &m1, "dev");
    assert!(out.contains(&format!("device key:  {public_a}")), "{out}");
    let b = bundles(&n.wait_proof(&m1)).remove(0);
    let v = notary_proof::verify_bundle(&b, &m1, &broker_verifier(&n)).expect("valid");
    let d = v.device.expect("device");
    if let Some((action, seq)) = d.superseded {
        assert_eq!(action, RegistryAction::Rotate);
        assert!(seq > v.leaf.seq);
    }
    // The registry history: enrol, rotate, revoke, refused nothing.
    let list = n.devices();
    assert_eq!(list["devices"][0]["status"], "revoked");
    assert_eq!(list["refused"].as_array().map(Vec::len), Some(0));
    // A mistyped data directory is an error, not an empty registry.
    let missing = n.dir.with_extension("typo");
    let (code, _, err) = device(&["list", "--data-dir", missing.to_str().expect("utf-8")]);
    assert_eq!(code, 2);
    assert!(err.contains("no mqtt-notary store"), "{err}");
    assert!(!missing.exists());
    // The CLI refuses what the broker would refuse.
    let dir = n.dir.to_str().expect("utf-8");
    let (code, _, err) = device(&["rotate", "dev", "--public-key", &public_a, "--data-dir", dir]);
    assert_eq!(code, 2);
    assert!(err.contains("revoked"), "{err}");
    assert!(ledger_verify(&n.dir).0 == 0);
}

#[test]
fn an_enrolment_file_enrols_a_fleet_at_start_up() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (k1, p1) = keygen(tmp.path(), "f1");
    let (_, p2) = keygen(tmp.path(), "f2");
    let fleet = tmp.path().join("fleet.toml");
    std::fs::write(
        &fleet,
        format!("[[device]]\nid = \"f1\"\npublic_key = \"{p1}\"\n\n[[device]]\nid = \"f2\"\npublic_key = \"{p2}\"\n"),
    )
    .expect("write fleet");
    let config =
        fast_config(tmp.path(), &format!("[devices]\nenrolment_file = {:?}\n", fleet.display().to_string()));
    let mut n = Notary::start_with(tmp.path(), Some(config));
    eventually("both devices enrolled", || {
        let list = n.devices();
        let active = list["devices"].as_array()?.iter().filter(|d| d["status"] == "active").count();
        (active == 2).then_some(())
    });
    let env = envelope(&k1, "f1", "fleet/1", 1, b"hello");
    assert!(publish(n.mqtt, "fleet/1", &env, &[]).status.success());
    verify_device_signed(&n, &n.wait_proof(&env), &env, "f1");
    // A restart with the same file changes nothing: no new registry leaves.
    n.stop();
    n.restart();
    let list = n.devices();
    assert_eq!(list["queued"].as_array().map(Vec::len), Some(0));
    assert_eq!(list["devices"][0]["head_seq"], 0);
}
