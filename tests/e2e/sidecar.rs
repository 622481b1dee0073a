//! `mqtt-notary sidecar` on a real Mosquitto 2.0 (Debian's package) started
//! on a free port: devices publish to Mosquitto with `mosquitto_pub`, the
//! sidecar notarizes as Mosquitto's client and serves proofs on it and over
//! HTTP, in the embedded broker's formats.

use crate::support::*;

fn lines(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{{\"{prefix}\":{i}}}")).collect()
}

#[test]
fn ten_thousand_messages_through_mosquitto_are_notarized_by_the_sidecar_and_verify() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mosquitto = Mosquitto::start();
    let sidecar = Notary::sidecar(tmp.path(), "sidecar", mosquitto.port, "");
    const N: usize = 10_000;
    let lines = lines("reading", N);
    publish_lines(mosquitto.port, "factory/line2/readings", 1, &lines);
    eventually("10,000 leaves persisted", || {
        (sidecar.metric("messages_notarized_total") >= N as u64).then_some(())
    });
    assert_eq!(verify_all(&sidecar, &lines, "factory/line2/readings"), N, "each message notarized once");
    assert_eq!(sidecar.metric("source_connected"), 1);

    // Proofs over MQTT on Mosquitto itself, and the retained checkpoint.
    // Mosquitto does not tell the sidecar who asked: the request names its
    // reply topic in its own inbox (kept private by Mosquitto's ACL file,
    // tested below), and a `#` subscriber sees none of it.
    let sub = Subscriber::start(mosquitto.port, &["$notary/inbox/t/proof", "$notary/checkpoint", "#"], &[]);
    let digest = blake3_hex(lines[7].as_bytes());
    let request = format!("{{\"id\":7,\"digest\":\"{digest}\",\"reply_to\":\"$notary/inbox/t/proof\"}}");
    assert!(publish(mosquitto.port, "$notary/proof/request", request.as_bytes(), &[]).status.success());
    let (mut got_checkpoint, mut got_answer) = (false, false);
    while !(got_checkpoint && got_answer) {
        let (topic, body) = sub.next_message();
        match topic.as_str() {
            "$notary/checkpoint" => got_checkpoint = body.starts_with(&sidecar_origin(&sidecar)),
            "$notary/inbox/t/proof" => {
                got_answer = body.contains("\"status\":\"ok\"") && body.contains("\"id\":7");
            }
            other => assert!(!other.starts_with('$'), "`#` matched {other}"),
        }
    }
}

/// The log name, which starts every checkpoint note.
fn sidecar_origin(n: &Notary) -> String {
    let key = std::fs::read_to_string(n.broker_key()).expect("broker.pub");
    key.split('+').next().expect("key name").to_owned()
}

#[test]
fn a_sidecar_killed_mid_stream_notarizes_every_qos1_message_after_its_restart() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mosquitto = Mosquitto::start();
    let mut sidecar = Notary::sidecar(tmp.path(), "sidecar", mosquitto.port, "");
    let lines = lines("crash", 3_000);
    let (port, to_send) = (mosquitto.port, lines.clone());
    let publisher = std::thread::spawn(move || publish_lines(port, "meters/crash", 1, &to_send));
    eventually("part of the stream notarized", || {
        (sidecar.metric("messages_notarized_total") >= 300).then_some(())
    });
    sidecar.crash(); // kill -9, mid-stream
    publisher.join().expect("publisher finished");
    // Mosquitto kept every QoS 1 message the sidecar had not acknowledged.
    sidecar.restart();
    let leaves = verify_all(&sidecar, &lines, "meters/crash");
    assert!(leaves >= lines.len(), "every message notarized at least once");
}

/// The payload digests of every leaf in a notary's store.
fn stored_digests(n: &Notary) -> std::collections::HashSet<Vec<u8>> {
    let db = rusqlite::Connection::open_with_flags(
        n.dir.join("notary.sqlite"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .expect("store");
    let mut stmt = db.prepare("SELECT DISTINCT digest FROM leaves").expect("query");
    let rows = stmt.query_map([], |r| r.get::<_, Vec<u8>>(0)).expect("rows");
    rows.map(|r| r.expect("digest")).collect()
}

/// Under load, a killed sidecar leaves Mosquitto a backlog of QoS 1
/// messages it acknowledged to their publishers, and so does a restarted
/// one that falls behind. Once no new message comes, the whole backlog
/// still arrives, not one in-flight window per message the sidecar itself
/// publishes (the stall the nudge topic fixes, see plugin/src/sidecar.rs).
#[test]
fn a_sidecar_killed_under_load_gets_the_whole_backlog_after_its_restart() {
    let tmp = tempfile::tempdir().expect("tmp");
    // Room for the whole backlog (Mosquitto 2.0.11 misbehaves with
    // `max_queued_messages 0`, "unlimited"), and the default in-flight 20.
    let mosquitto = Mosquitto::from_config(|port, _| {
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
             max_queued_messages 1000000\nmax_inflight_messages 20\n"
        )
    });
    let mut sidecar = Notary::sidecar(tmp.path(), "sidecar", mosquitto.port, "");
    let streams: Vec<Vec<String>> = (0..4).map(|p| lines(&format!("load{p}"), 25_000)).collect();
    let publishers: Vec<_> = streams
        .iter()
        .cloned()
        .enumerate()
        .map(|(p, l)| {
            let port = mosquitto.port;
            std::thread::spawn(move || publish_lines(port, &format!("meters/load{p}"), 1, &l))
        })
        .collect();
    eventually("part of the load received", || {
        (sidecar.metric("messages_received_total") >= 30_000).then_some(())
    });
    sidecar.crash(); // kill -9 under load
    sidecar.restart();
    // Hold the restarted sidecar's commits (and so its acknowledgements)
    // until every publisher is done: Mosquitto keeps the rest as a backlog
    // for the connected sidecar, and then no new message comes.
    for p in publishers {
        p.join().expect("every message acknowledged by Mosquitto to its publisher");
    }
    let expected: Vec<Vec<u8>> =
        streams.iter().flatten().map(|l| blake3::hash(l.as_bytes()).as_bytes().to_vec()).collect();
    let start = std::time::Instant::now();
    loop {
        let stored = stored_digests(&sidecar);
        let missing = expected.iter().filter(|d| !stored.contains(*d)).count();
        if missing == 0 {
            break;
        }
        assert!(
            start.elapsed() < PATIENCE,
            "{missing} acknowledged messages never notarized; received {}\n{}",
            sidecar.metric("messages_received_total"),
            sidecar.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    for (p, stream) in streams.iter().enumerate() {
        for line in stream.iter().step_by(5_000) {
            let body = sidecar.wait_proof(line.as_bytes());
            let (code, out, err) = cli_verify(&body, line.as_bytes(), &sidecar.broker_key());
            assert_eq!(code, 0, "{err}");
            assert!(out.contains(&format!("meters/load{p}")), "{out}");
        }
    }
}

/// A broker that keeps the connection but stops delivering (here: Mosquitto
/// stopped with SIGSTOP) is noticed by the sidecar's probe: counted, shown
/// in /healthz, and the sidecar reconnects once it can.
#[test]
fn a_broker_that_stops_delivering_is_reported_and_the_sidecar_recovers() {
    let tmp = tempfile::tempdir().expect("tmp");
    let config = "[ingest]\nstall_ms = 300\n";
    let mosquitto = Mosquitto::start();
    let sidecar = Notary::sidecar(tmp.path(), "sidecar", mosquitto.port, config);
    assert!(publish(mosquitto.port, "stall/t", b"before the stall", &[]).status.success());
    sidecar.wait_proof(b"before the stall");
    mosquitto.child.signal("STOP");
    eventually("the stall to be noticed", || (sidecar.metric("source_stalls_total") >= 1).then_some(()));
    let health = eventually("/healthz to report the source", || {
        let (status, health) = sidecar.health();
        (status == 503).then_some(health)
    });
    assert!(health["problems"]["source"].as_str().unwrap_or("").contains("stopped delivering"), "{health}");
    mosquitto.child.signal("CONT");
    assert!(publish(mosquitto.port, "stall/t", b"after the stall", &[]).status.success());
    sidecar.wait_proof(b"after the stall");
    eventually("/healthz to be ok again", || (sidecar.health().0 == 200).then_some(()));
}

#[test]
fn the_sidecar_reconnects_when_mosquitto_restarts_and_resumes() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut mosquitto = Mosquitto::start();
    let sidecar = Notary::sidecar(tmp.path(), "sidecar", mosquitto.port, "[sidecar]\nmax_retry_ms = 200\n");
    let before = lines("before", 50);
    publish_lines(mosquitto.port, "plant/restart", 1, &before);
    verify_all(&sidecar, &before, "plant/restart");

    mosquitto.stop();
    eventually("the sidecar to notice", || (sidecar.metric("source_connected") == 0).then_some(()));
    assert_eq!(sidecar.metric("source_disconnects_total"), 1);
    mosquitto.restart();
    eventually("the sidecar to reconnect", || (sidecar.metric("source_connected") == 1).then_some(()));
    // Mosquitto lost its sessions (no persistence): the sidecar subscribed again.
    let after = lines("after", 50);
    publish_lines(mosquitto.port, "plant/restart", 1, &after);
    verify_all(&sidecar, &after, "plant/restart");
    assert!(sidecar.metric("source_disconnected_ms_total") > 0, "the window is counted");
}

#[test]
fn signed_envelopes_verify_the_same_way_through_the_sidecar() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mosquitto = Mosquitto::start();
    let sidecar = Notary::sidecar(tmp.path(), "sidecar", mosquitto.port, "");
    let (key, public) = keygen(tmp.path(), "meter-9");
    sidecar.registry(&["add", "meter-9", "--public-key", &public]);
    // `device publish` signs and publishes to Mosquitto (sidecar.mqtt) with rumqttc.
    let digest = sidecar.device_publish("meter-9", &key, "meters/meter-9", "{\"kwh\":7}");
    let json = sidecar.wait_proof_of(&digest);
    let bundles: Vec<notary_proof::ProofBundle> = serde_json::from_str(&json).expect("bundles");
    let leaf = notary_proof::LeafRecord::decode(&bundles[0].leaf).expect("leaf");
    assert_eq!(leaf.assurance, notary_proof::Assurance::DeviceSigned);
    // The library signs; mosquitto_pub publishes the bytes; library and CLI verify.
    let env = notary_proof::envelope::sign(
        &signing_key(&key),
        &notary_proof::envelope::EnvelopeFields {
            device_id: "meter-9",
            counter: 1_000,
            device_time_ms: 1_767_225_600_000,
            content_type: "application/json",
            topic: "meters/meter-9",
            payload: b"{\"kwh\":8}",
        },
    )
    .expect("signs");
    assert!(publish(mosquitto.port, "meters/meter-9", &env, &[]).status.success());
    crate::devices::verify_device_signed(&sidecar, &sidecar.wait_proof(&env), &env, "meter-9");

    // An envelope from a device the registry does not know is rejected, with
    // its reason, exactly as on the embedded broker.
    let (stranger, _) = keygen(tmp.path(), "stranger");
    let digest = sidecar.device_publish("stranger", &stranger, "meters/stranger", "{\"kwh\":1}");
    let (status, body) = eventually("the rejection", || {
        let r = sidecar.get(&format!("/v1/proofs/{digest}"));
        (r.0 == 422).then_some(r)
    });
    assert_eq!(status, 422);
    assert!(body.contains("unknown-device"), "{body}");
}

#[test]
fn qos0_messages_missed_while_the_sidecar_is_down_are_reported_as_an_outage() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mosquitto = Mosquitto::start();
    let mut sidecar = Notary::sidecar(tmp.path(), "sidecar", mosquitto.port, "");
    assert!(publish(mosquitto.port, "plant/q0", b"q0 before", &["-q", "0"]).status.success());
    sidecar.wait_proof(b"q0 before");
    // The sidecar notes it is alive once a second while connected.
    eventually("the alive note", || sidecar.dir.join("sidecar.alive").exists().then_some(()));
    sidecar.crash();

    let missed_at = notary_plugin::source::now_ms();
    assert!(publish(mosquitto.port, "plant/q0", b"q0 missed", &["-q", "0"]).status.success());
    sidecar.restart();
    assert!(publish(mosquitto.port, "plant/q0", b"q0 after", &["-q", "0"]).status.success());
    sidecar.wait_proof(b"q0 after");

    // Mosquitto keeps no QoS 0 messages for an absent client: that one is
    // gone, and the window it fell into is on record, not hidden.
    let (status, _) = sidecar.get(&format!("/v1/proofs/{}", blake3_hex(b"q0 missed")));
    assert_eq!(status, 404);
    assert_eq!(sidecar.metric("source_outages_total"), 1);
    let (_, health) = sidecar.get("/healthz");
    let health: serde_json::Value = serde_json::from_str(&health).expect("json");
    assert_eq!(health["source_outages"], 1, "{health}");
    let outages = notary_plugin::store::Store::open(&sidecar.dir).expect("store").outages().expect("outages");
    assert_eq!(outages.len(), 1);
    let (from, to, _) = outages[0];
    assert!(from <= missed_at && missed_at <= to, "the window {from}..{to} covers {missed_at}");
}

/// Mosquitto with `extra` configuration lines and a password file holding
/// the sidecar's login (`notary`), and a sidecar that logs in with the
/// password from a file of its own.
fn sidecar_with_login(dir: &std::path::Path, extra: &str) -> (Mosquitto, Notary) {
    let passwd = mosquitto_password_file(dir, "notary", "side car");
    let mosquitto = Mosquitto::start_with(&format!("{extra}password_file {}\n", passwd.display()));
    let secret = dir.join("upstream.password");
    std::fs::write(&secret, "side car\n").expect("write");
    let sidecar = Notary::sidecar(
        dir,
        "sidecar",
        mosquitto.port,
        &format!("[sidecar]\nusername = \"notary\"\npassword_file = {:?}\n", secret.display().to_string()),
    );
    (mosquitto, sidecar)
}

#[test]
fn the_sidecar_logs_in_with_a_password_from_a_file() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (mosquitto, sidecar) = sidecar_with_login(tmp.path(), "allow_anonymous false\n");
    let out = publish(mosquitto.port, "t/login", b"behind a login", &["-u", "notary", "-P", "side car"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    sidecar.wait_proof(b"behind a login");
    assert!(!sidecar.log().contains("side car"), "the password never reaches the log");
}

#[test]
fn two_sidecars_in_a_group_notarize_each_message_once_and_the_holder_answers() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mosquitto = Mosquitto::start();
    let group = "[sidecar]\ngroup = \"notary\"\ntopics = [\"factory/#\"]\n";
    let a = Notary::sidecar(tmp.path(), "a", mosquitto.port, group);
    let b = Notary::sidecar(tmp.path(), "b", mosquitto.port, group);
    const N: usize = 2_000;
    let lines = lines("shared", N);
    publish_lines(mosquitto.port, "factory/shared", 1, &lines);
    eventually("every message notarized by one of them", || {
        let total = a.metric("messages_notarized_total") + b.metric("messages_notarized_total");
        (total >= N as u64).then_some(())
    });
    assert_eq!(a.metric("messages_notarized_total") + b.metric("messages_notarized_total"), N as u64);
    assert!(a.metric("messages_notarized_total") > 0 && b.metric("messages_notarized_total") > 0, "shared");

    // Each message has a proof at exactly one member; asked over MQTT, the
    // holder answers and the other stays silent.
    let sub = Subscriber::start(mosquitto.port, &["$notary/inbox/g/#"], &[]);
    for (i, line) in lines.iter().enumerate().step_by(97) {
        let digest = blake3_hex(line.as_bytes());
        let path = format!("/v1/proofs/{digest}");
        let holder = eventually("the holder's proof", || {
            let (sa, sb) = (a.get(&path).0, b.get(&path).0);
            match (sa, sb) {
                (200, 404) => Some(&a),
                (404, 200) => Some(&b),
                (200, 200) => panic!("message {i} notarized twice"),
                _ => None,
            }
        });
        let reply = format!("$notary/inbox/g/{i}");
        let request = format!("{{\"id\":{i},\"digest\":\"{digest}\",\"reply_to\":\"{reply}\"}}");
        assert!(publish(mosquitto.port, "$notary/proof/request", request.as_bytes(), &[]).status.success());
        let (topic, body) = sub.next_message();
        assert_eq!(topic, reply, "one answer per request, in order");
        let answer: serde_json::Value = serde_json::from_str(&body).expect("answer JSON");
        assert_eq!(answer["status"], "ok", "{body}");
        let bundle = answer["bundles"][0].to_string();
        notary_proof::verify_bundle_json(bundle.as_bytes(), line.as_bytes(), &broker_verifier(holder))
            .expect("the holder's bundle verifies with the holder's key");
    }
    // Each member's checkpoint is retained under its own log's name.
    for n in [&a, &b] {
        let origin = sidecar_origin(n);
        let cp = Subscriber::start(mosquitto.port, &[&format!("$notary/checkpoint/{origin}")], &["-C", "1"]);
        let (_, first_line) = cp.next_message();
        assert_eq!(first_line.trim(), origin);
    }
}

/// The bridge recipe in the README, verbatim apart from the port: an
/// existing Mosquitto forwards device topics to an embedded mqtt-notary.
pub fn bridge_block(notary_port: u16) -> String {
    format!(
        "connection notary\naddress 127.0.0.1:{notary_port}\nbridge_protocol_version mqttv311\n\
         try_private false\nnotifications false\ncleansession false\nkeepalive_interval 30\n\
         topic factory/# out 1\n"
    )
}

#[test]
fn a_mosquitto_bridge_forwards_to_an_embedded_notary() {
    let tmp = tempfile::tempdir().expect("tmp");
    let notary = Notary::start(tmp.path());
    let mosquitto = Mosquitto::start_with(&format!("allow_anonymous true\n{}", bridge_block(notary.mqtt)));
    let lines = lines("bridged", 1_000);
    publish_lines(mosquitto.port, "factory/bridged", 1, &lines);
    assert_eq!(verify_all(&notary, &lines, "factory/bridged"), lines.len(), "each message notarized once");
}

#[test]
fn the_sidecar_reaches_its_broker_over_tls() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (ca, cert, key) = test_certs(tmp.path());
    // Mosquitto started as root drops to its own user before reading the key.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let mosquitto = Mosquitto::start_with(&format!(
        "allow_anonymous true\ncertfile {}\nkeyfile {}\n",
        cert.display(),
        key.display()
    ));
    let config = tmp.path().join("tls.toml");
    std::fs::write(
        &config,
        format!("[log]\nmax_batch_age_ms = 100\n[sidecar.tls]\nca_file = {:?}\n", ca.display().to_string()),
    )
    .expect("config");
    let url = format!("mqtts://127.0.0.1:{}", mosquitto.port);
    let sidecar = Notary::sidecar_with(tmp.path().join("data"), config, &url, mosquitto.port, Vec::new());
    let cafile = ca.display().to_string();
    let out = publish(mosquitto.port, "t/tls", b"over TLS both ways", &["--cafile", &cafile]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    sidecar.wait_proof(b"over TLS both ways");
}

/// On a broker it does not control, the sidecar cannot refuse a client's
/// publish on its topics; the broker's ACL can. With `deploy/mosquitto.acl`
/// verbatim (the README's example) and Debian's Mosquitto: a client cannot
/// forge the retained checkpoint or an answer in another client's inbox,
/// cannot read another client's inbox, and the asker gets the real answer.
#[test]
fn the_documented_mosquitto_acl_keeps_the_notarys_topics_to_the_sidecar() {
    let tmp = tempfile::tempdir().expect("tmp");
    let acl = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/mosquitto.acl");
    let (mosquitto, sidecar) =
        sidecar_with_login(tmp.path(), &format!("allow_anonymous true\nacl_file {}\n", acl.display()));
    let alice = MqttClient::connect(mosquitto.port, "alice");
    alice.subscribe("$notary/inbox/alice/#");
    let mallory = MqttClient::connect(mosquitto.port, "mallory");
    for filter in ["$notary/inbox/alice/#", "$notary/#", "$notary/inbox/+/proof", "sensors/marker"] {
        mallory.subscribe(filter);
    }
    // (With `mosquitto_pub`: Mosquitto 2.0.11 answers a denied QoS 1
    // publish from an MQTT 3.1.1 client with a PUBACK that carries an MQTT 5
    // reason code, which rumqttc does not accept.)
    let forged = br#"{"id":1,"status":"error","error":{"code":"not_found","message":"forged"}}"#;
    for (topic, payload) in [("$notary/inbox/alice/proof", &forged[..]), ("$notary/checkpoint", b"FAKE")] {
        let out = publish(mosquitto.port, topic, payload, &["-r", "-i", "mallory-2", "-V", "mqttv5", "-d"]);
        assert!(String::from_utf8_lossy(&out.stdout).contains("RC:135"), "Mosquitto's ACL refuses {topic}");
    }

    alice.publish("sensors/a", b"behind an ACL");
    sidecar.wait_proof(b"behind an ACL");
    let digest = blake3_hex(b"behind an ACL");
    let request = format!(r#"{{"id":1,"digest":"{digest}","reply_to":"$notary/inbox/alice/proof"}}"#);
    alice.publish("$notary/proof/request", request.as_bytes());
    let (topic, answer) = alice.next_message();
    assert_eq!(topic, "$notary/inbox/alice/proof");
    assert!(
        answer.contains("\"status\":\"ok\"") && answer.contains(&digest),
        "the real answer first: {answer}"
    );

    alice.publish("sensors/marker", b"after the answer");
    loop {
        // Everyone may read the checkpoint; no one another's inbox.
        let (topic, _) = mallory.next_message();
        assert!(!topic.starts_with("$notary/inbox/"), "another client read {topic}");
        if topic == "sensors/marker" {
            break;
        }
    }
    let cp = Subscriber::start(mosquitto.port, &["$notary/checkpoint"], &["-C", "1"]);
    let (_, first_line) = cp.next_message();
    assert_eq!(first_line.trim(), sidecar_origin(&sidecar), "the sidecar's signed checkpoint is retained");
}
