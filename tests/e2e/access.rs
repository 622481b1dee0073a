//! Access control of the embedded broker: logins from a password file made
//! by the real `mosquitto_passwd`, and the TLS listener with real
//! `mosquitto_pub` clients and an openssl-made certificate.

use crate::support::*;
use std::io::Read as _;
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

#[test]
fn logins_come_from_a_mosquitto_password_file() {
    let tmp = tempfile::tempdir().expect("tmp");
    let passwd = mosquitto_password_file(tmp.path(), "sensor", "s3cret pass");
    let config =
        fast_config(tmp.path(), &format!("[mqtt]\npassword_file = {:?}\n", passwd.display().to_string()));
    let n = Notary::start_with(tmp.path(), Some(config));

    let login = ["-u", "sensor", "-P", "s3cret pass", "-i", "meter-7"];
    let ok = publish(n.mqtt, "t/login", b"with the right password", &login);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    // The leaf names who published: the login the broker checked, so the
    // message is client-authenticated, and the client id it used.
    let bundle = first_bundle(&n.wait_proof(b"with the right password"));
    let (code, out, err) = cli_verify(&bundle, b"with the right password", &n.broker_key());
    assert_eq!(code, 0, "{err}");
    for line in [
        "assurance:   client-authenticated",
        "client id:   meter-7 (as the client named itself)",
        "username:    sensor (login checked by the broker)",
    ] {
        assert!(out.contains(line), "{line:?} in {out}");
    }
    for (what, extra) in [
        ("a wrong password", &["-u", "sensor", "-P", "s3cret"][..]),
        ("an unknown user", &["-u", "nobody", "-P", "s3cret pass"][..]),
        ("no login", &[][..]),
    ] {
        let payload = format!("refused: {what}");
        let out = publish(n.mqtt, "t/login", payload.as_bytes(), extra);
        assert!(!out.status.success(), "{what} was let in");
        assert_eq!(n.get(&format!("/v1/proofs/{}", blake3_hex(payload.as_bytes()))).0, 404, "{what}");
    }

    // Signed publishing from the CLI logs in too.
    let (key, public) = keygen(tmp.path(), "d");
    n.registry(&["add", "d", "--public-key", &public]);
    let pw = tmp.path().join("pw");
    std::fs::write(&pw, "s3cret pass\n").expect("write");
    let (code, out, err) = device(&[
        "publish",
        "--id",
        "d",
        "--key",
        key.to_str().expect("utf-8"),
        "--topic",
        "t/signed",
        "--message",
        "hi",
        "--mqtt",
        &format!("127.0.0.1:{}", n.mqtt),
        "--username",
        "sensor",
        "--password-file",
        pw.to_str().expect("utf-8"),
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
    let bundle = first_bundle(&n.wait_proof_of(v["digest"].as_str().expect("digest")));
    let leaf = leaf_of(&bundle);
    assert_eq!(leaf.assurance, notary_proof::Assurance::DeviceSigned, "a signature outranks a login");
    assert_eq!(leaf.publisher.and_then(|p| p.username).as_deref(), Some("sensor"));
}

/// Without logins, the leaf names the client id and no user: a user name
/// the client sent was checked by no one, so it is not recorded, and the
/// message is broker-received.
#[test]
fn without_logins_a_leaf_names_the_client_id_and_no_user() {
    let tmp = tempfile::tempdir().expect("tmp");
    let n = Notary::start_with(tmp.path(), Some(fast_config(tmp.path(), "")));
    let out = publish(n.mqtt, "t/anon", b"anonymous", &["-i", "gw/7", "-u", "claimed"]);
    assert!(out.status.success());
    let bundle = first_bundle(&n.wait_proof(b"anonymous"));
    let leaf = leaf_of(&bundle);
    assert_eq!(leaf.assurance, notary_proof::Assurance::BrokerReceived);
    let who = leaf.publisher.expect("the embedded broker names the publisher");
    assert_eq!((who.client_id.as_str(), who.username), ("gw/7", None));
    let (code, out, err) = cli_verify(&bundle, b"anonymous", &n.broker_key());
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("assurance:   broker-received"), "{out}");
    assert!(out.contains("username:    none (the broker checked no login)"), "{out}");
}

/// The first bundle of a `/v1/proofs` answer, as JSON.
fn first_bundle(body: &str) -> String {
    let bundles: serde_json::Value = serde_json::from_str(body).expect("bundles");
    bundles[0].to_string()
}

fn leaf_of(bundle: &str) -> notary_proof::LeafRecord {
    let b: notary_proof::ProofBundle = serde_json::from_str(bundle).expect("bundle");
    notary_proof::LeafRecord::decode(&b.leaf).expect("leaf")
}

/// A notary with a TLS listener (test certificates) and `mqtt` lines in
/// its `[mqtt]` table, once the TLS port accepts: (notary, CA file, port).
fn start_with_tls(dir: &std::path::Path, mqtt: &str) -> (Notary, std::path::PathBuf, u16) {
    let (ca, cert, key) = test_certs(dir);
    let tls_port = free_port();
    let config = fast_config(
        dir,
        &format!(
            "[mqtt]\n{mqtt}[mqtt.tls]\nlisten = \"127.0.0.1:{tls_port}\"\ncert_file = {:?}\nkey_file = {:?}\n",
            cert.display().to_string(),
            key.display().to_string()
        ),
    );
    let n = Notary::start_with(dir, Some(config));
    eventually("the TLS listener", || TcpStream::connect(("127.0.0.1", tls_port)).ok());
    (n, ca, tls_port)
}

#[test]
fn the_tls_listener_serves_mosquitto_clients_and_a_silent_client_blocks_no_one() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (n, ca, tls_port) = start_with_tls(tmp.path(), "");

    // A client that connects and never says a word.
    let mut silent = TcpStream::connect(("127.0.0.1", tls_port)).expect("connect");
    let cafile = ca.to_str().expect("utf-8");
    let tls = |payload: &[u8]| {
        let file = tmp.path().join("payload");
        std::fs::write(&file, payload).expect("write");
        Command::new("mosquitto_pub")
            .args([
                "-h",
                "localhost",
                "-p",
                &tls_port.to_string(),
                "--cafile",
                cafile,
                "-t",
                "t/tls",
                "-q",
                "1",
            ])
            .arg("-f")
            .arg(&file)
            .output()
            .expect("mosquitto_pub")
    };
    let out = tls(b"over TLS");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json = n.wait_proof(b"over TLS");
    notary_proof::verify_bundle_json(
        serde_json::to_string(&serde_json::from_str::<serde_json::Value>(&json).expect("json")[0])
            .expect("json")
            .as_bytes(),
        b"over TLS",
        &broker_verifier(&n),
    )
    .expect("valid");

    // Plain MQTT on the TLS port is refused; the listener keeps serving.
    let plain = publish(tls_port, "t/tls", b"plain text on the TLS port", &[]);
    assert!(!plain.status.success());
    assert!(tls(b"after the plain attempt").status.success());
    n.wait_proof(b"after the plain attempt");
    // The silent client is cut off once its handshake time is up.
    silent.set_read_timeout(Some(PATIENCE)).expect("timeout");
    let mut buf = [0u8; 1];
    assert_eq!(silent.read(&mut buf).ok(), Some(0), "closed by the listener");
}

#[test]
fn tls_connections_beyond_max_connections_are_closed_at_once() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (n, ca, tls_port) =
        start_with_tls(tmp.path(), "max_connections = 3\nconnection_timeout_ms = 60000\n");
    // Silent clients take the slots (they would hold them for the 60 s
    // handshake time); one past the cap is closed by the listener at once.
    // Each client that got a slot is kept, so the slots fill up even while
    // the readiness probe's slot is still being freed.
    let mut held: Vec<TcpStream> = Vec::new();
    let mut extra = loop {
        assert!(held.len() <= 8, "no connection refused with {} held and a cap of 3", held.len());
        let mut s = TcpStream::connect(("127.0.0.1", tls_port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(1))).expect("timeout");
        let mut buf = [0u8; 1];
        // Refused: end of stream. Holding a slot: nothing to read.
        match s.read(&mut buf) {
            Ok(0) => break s,
            _ => held.push(s),
        }
    };
    assert!(n.metric("tls_connections_refused_total") >= 1);
    let mut buf = [0u8; 1];
    assert_eq!(extra.read(&mut buf).ok(), Some(0));
    drop(held);
    // With the slots free again, TLS clients are served.
    let cafile = ca.to_str().expect("utf-8");
    let out = eventually("a TLS publish once slots are free", || {
        let out = Command::new("mosquitto_pub")
            .args(["-h", "localhost", "-p", &tls_port.to_string(), "--cafile", cafile])
            .args(["-t", "t/tls-cap", "-q", "1", "-m", "after the cap"])
            .output()
            .expect("mosquitto_pub");
        out.status.success().then_some(out)
    });
    assert!(out.status.success());
    n.wait_proof(b"after the cap");
}

/// Only the notary publishes on its own topics. A client's retained
/// checkpoint (or its deletion), a made-up rejection event, a forged answer
/// in another client's inbox and a will on a notary topic are refused
/// (MQTT 5: PUBACK 0x87 with the reason; 3.1.1: dropped; the will's CONNECT
/// refused) and counted; subscribers see only what the notary published,
/// no subscriber sees a proof request, a `#` subscriber sees no notary
/// topic at all, and a new subscriber still gets the signed checkpoint.
#[test]
fn clients_cannot_publish_on_the_notarys_topics() {
    let tmp = tempfile::tempdir().expect("tmp");
    let config = fast_config(tmp.path(), "[devices]\nrequire_signature = [\"secure/#\"]\n");
    let n = Notary::start_with(tmp.path(), Some(config));
    n.notarize("t/a", b"first");
    let victim = MqttClient::connect(n.mqtt, "victim");
    assert!(victim.subscribe("$notary/rejections"));
    assert!(victim.subscribe("$notary/inbox/victim/#"));
    let everything = Subscriber::start(n.mqtt, &["#"], &[]);
    let forged_answer = br#"{"id":"v-1","status":"error","error":{"code":"not_found","message":"forged"}}"#;
    let v5: [(&str, &[u8], &[&str]); 4] = [
        ("$notary/checkpoint", b"FAKE", &["-r"]),
        ("$notary/checkpoint", b"", &["-r"]),
        ("$notary/rejections", br#"{"reason":"bad-signature","topic":"t/a"}"#, &[]),
        ("$notary/inbox/victim/proof", forged_answer, &[]),
    ];
    for (topic, payload, extra) in v5 {
        let out = publish(n.mqtt, topic, payload, &[&["-V", "mqttv5", "-d"], extra].concat());
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(said.contains("RC:135"), "{topic}: {said}");
    }
    for (topic, payload) in [("$notary/checkpoint", &b"FAKE 3.1.1"[..]), ("$notary/rejections", b"{}")] {
        assert!(publish(n.mqtt, topic, payload, &["-r"]).status.success(), "3.1.1 is dropped, not closed");
    }
    let will = publish(
        n.mqtt,
        "t/will",
        b"x",
        &["--will-topic", "$notary/checkpoint", "--will-payload", "FAKE", "--will-retain"],
    );
    assert!(!will.status.success(), "a CONNECT with a will on a notary topic is refused");
    assert_eq!(n.metric("mqtt_own_topic_refused_total"), 7);

    // The first messages the victim gets are the notary's own: a real
    // rejection event, and the real answer in its inbox.
    assert!(publish(n.mqtt, "secure/a", b"unsigned", &[]).status.success());
    let (topic, event) = victim.next_message();
    assert_eq!(topic, "$notary/rejections");
    assert!(event.contains("\"signature-required\""), "{event}");
    // Proof requests are consumed by the notary, never routed: neither a
    // subscriber to the request topic nor a `#` subscriber reads them.
    let requests = Subscriber::start(n.mqtt, &["$notary/proof/request", "t/marker"], &[]);
    let request = format!(r#"{{"id":"v-1","digest":"{}"}}"#, blake3_hex(b"first"));
    victim.publish("$notary/proof/request", request.as_bytes());
    let (topic, answer) = victim.next_message();
    assert_eq!(topic, "$notary/inbox/victim/proof");
    assert!(answer.contains("\"status\":\"ok\""), "{answer}");
    assert!(publish(n.mqtt, "t/marker", b"after the request", &[]).status.success());
    assert_eq!(requests.next_message().0, "t/marker", "the request was routed to a subscriber");
    // `#` matches none of the notary's topics (MQTT-4.7.2-1): not the
    // retained checkpoint, the rejection event, the request or the answer.
    // (The rejected `secure/a` was never delivered.)
    assert_eq!(everything.next_message().0, "t/marker", "a `#` subscriber got a notary topic");

    let cp = Subscriber::start(n.mqtt, &["$notary/checkpoint"], &["-C", "1"]);
    let (_, first_line) = cp.next_message();
    let (_, note) = n.get("/v1/checkpoint");
    broker_verifier(&n).verify_checkpoint(&note).expect("signed checkpoint");
    assert!(note.starts_with(first_line.trim()), "retained: {first_line:?}");
}

/// A proof answer reaches only the session that asked. MQTT 3.1.1: in the
/// asker's inbox `$notary/inbox/<client id>/`, which no other client may
/// subscribe to, by name or by wildcard; a `reply_to` in another client's
/// inbox is refused. MQTT 5: on the request's Response Topic with its
/// Correlation Data, delivered to the asker's session alone even when
/// another client subscribes to that topic.
#[test]
fn proof_answers_reach_only_the_asking_session() {
    let tmp = tempfile::tempdir().expect("tmp");
    let n = Notary::start_with(tmp.path(), Some(fast_config(tmp.path(), "")));
    n.notarize("t/a", b"asked about");
    let digest = blake3_hex(b"asked about");

    let alice = MqttClient::connect(n.mqtt, "alice");
    assert!(alice.subscribe("$notary/inbox/alice/#"));
    let mallory = MqttClient::connect(n.mqtt, "mallory");
    for filter in
        ["$notary/inbox/alice/#", "$notary/inbox/+/proof", "$notary/inbox/#", "$notary/#", "$notary/+/+/#"]
    {
        assert!(!mallory.subscribe(filter), "{filter} was granted to another client");
    }
    assert!(mallory.subscribe("$notary/inbox/mallory/#"));
    assert!(mallory.subscribe("t/marker"));
    // MQTT 5 gets 0x87, and a shared subscription is no way round it.
    for filter in ["$notary/#", "$share/g/$notary/inbox/+/proof"] {
        let out = Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &n.mqtt.to_string(), "-V", "mqttv5", "-d", "-i", "eve"])
            .args(["-t", filter, "-C", "1", "-W", "60"])
            .output()
            .expect("mosquitto_sub");
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(said.contains("Subscribed (mid: 1): 135"), "{filter}: {said}");
    }
    assert_eq!(n.metric("mqtt_own_topic_refused_total"), 7);

    alice.publish("$notary/proof/request", format!(r#"{{"id":1,"digest":"{digest}"}}"#).as_bytes());
    let (topic, answer) = alice.next_message();
    assert_eq!(topic, "$notary/inbox/alice/proof");
    assert!(answer.contains("\"status\":\"ok\"") && answer.contains("\"id\":1"), "{answer}");
    let into_mallorys = format!(r#"{{"id":2,"digest":"{digest}","reply_to":"$notary/inbox/mallory/x"}}"#);
    alice.publish("$notary/proof/request", into_mallorys.as_bytes());
    let (topic, answer) = alice.next_message();
    assert_eq!(topic, "$notary/inbox/alice/proof");
    assert!(answer.contains("\"bad_request\"") && answer.contains("your inbox"), "{answer}");
    let own = format!(r#"{{"id":3,"digest":"{digest}","reply_to":"$notary/inbox/alice/q/3"}}"#);
    alice.publish("$notary/proof/request", own.as_bytes());
    assert_eq!(alice.next_message().0, "$notary/inbox/alice/q/3");

    // MQTT 5: mosquitto_rr sends the Response Topic and Correlation Data
    // and prints the answer; a second client on that topic gets nothing.
    let eavesdropper = Subscriber::start(n.mqtt, &["replies/rr"], &["-V", "mqttv5"]);
    let out = Command::new("mosquitto_rr")
        .args(["-h", "127.0.0.1", "-p", &n.mqtt.to_string(), "-i", "rr-client", "-W", "60"])
        .args(["-t", "$notary/proof/request", "-e", "replies/rr", "-F", "%t %D %p"])
        .args(["-D", "publish", "correlation-data", "corr-42"])
        .args(["-m", &format!(r#"{{"id":4,"digest":"{digest}"}}"#)])
        .output()
        .expect("mosquitto_rr");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{said} {}", String::from_utf8_lossy(&out.stderr));
    assert!(
        said.starts_with("replies/rr 636f72722d3432 ") || said.starts_with("replies/rr corr-42 "),
        "{said}"
    );
    assert!(said.contains("\"status\":\"ok\""), "{said}");
    assert!(publish(n.mqtt, "t/marker", b"after the answers", &[]).status.success());
    assert_eq!(mallory.next_message().0, "t/marker", "another client got an answer");
    assert!(publish(n.mqtt, "replies/rr", b"marker", &[]).status.success());
    assert_eq!(
        eavesdropper.next_message(),
        ("replies/rr".into(), "marker".into()),
        "another client got the answer"
    );
}
