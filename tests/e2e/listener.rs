//! Nothing a client sends can take the MQTT listener down: each case that
//! once stopped rumqttd (or could stop a broker), then a new client that
//! connects, publishes and gets a proof.

use crate::support::*;
use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::time::Duration;

/// An MQTT 3.1.1 CONNECT (clean session, keep-alive 60).
fn connect_packet(client_id: &str) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60];
    body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    body.extend_from_slice(client_id.as_bytes());
    let mut p = vec![0x10, body.len() as u8];
    p.extend_from_slice(&body);
    p
}

/// A QoS 1 PUBLISH with packet id 1.
fn publish_packet(topic: &str, payload: &[u8]) -> Vec<u8> {
    let mut body = (topic.len() as u16).to_be_bytes().to_vec();
    body.extend_from_slice(topic.as_bytes());
    body.extend_from_slice(&[0, 1]);
    body.extend_from_slice(payload);
    let mut p = vec![0x32, body.len() as u8];
    p.extend_from_slice(&body);
    p
}

fn open(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(PATIENCE)).expect("timeout");
    s
}

/// Sends CONNECT and returns the CONNACK's return code.
fn connack(s: &mut TcpStream, client_id: &str) -> u8 {
    s.write_all(&connect_packet(client_id)).expect("send CONNECT");
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack).expect("CONNACK");
    assert_eq!(ack[0], 0x20, "not a CONNACK: {ack:?}");
    ack[3]
}

/// Whether the server closed the connection (reading up to `PATIENCE`).
fn closed_by_server(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 64];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

fn healthy_and_serving(n: &Notary, tag: &str) {
    let payload = format!("a new client after {tag}");
    n.notarize("listener/after", payload.as_bytes());
    assert_eq!(n.health().0, 200, "{tag}: {}", n.health().1);
}

#[test]
fn connects_reset_before_connack_with_a_reused_client_id_never_stop_new_clients() {
    let tmp = tempfile::tempdir().expect("tmp");
    let n = Notary::start(tmp.path());
    for _ in 0..11 {
        let s = open(n.mqtt);
        (&s).write_all(&connect_packet("device-7")).expect("send CONNECT");
        // SO_LINGER 0: close() sends RST, before the CONNACK is read.
        drop(socket2_reset(s));
        // 3 ("server unavailable") while the reset connection's session
        // still holds the id is a refusal a device retries; anything else,
        // or a refusal that never ends, is a wedge.
        eventually("a reconnect with the same id to be accepted", || {
            let mut again = open(n.mqtt);
            let code = connack(&mut again, "device-7");
            assert!(code == 0 || code == 3, "CONNACK {code}");
            (code == 0).then_some(())
        });
    }
    healthy_and_serving(&n, "eleven reset CONNECTs");
}

/// Makes dropping the stream send RST instead of FIN (SO_LINGER 0).
fn socket2_reset(s: TcpStream) -> TcpStream {
    socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO)).expect("SO_LINGER");
    s
}

#[test]
fn a_non_ascii_topic_is_delivered_and_notarized() {
    let tmp = tempfile::tempdir().expect("tmp");
    let n = Notary::start(tmp.path());
    let sub = Subscriber::start(n.mqtt, &["é/#"], &[]);
    n.notarize("é/x", b"accented topic");
    let (topic, payload) = sub.next_message();
    assert_eq!((topic.as_str(), payload.as_str()), ("é/x", "accented topic"));
    healthy_and_serving(&n, "a non-ASCII topic");
}

#[test]
fn a_publish_to_a_wildcard_topic_name_closes_the_connection_and_is_not_notarized() {
    let tmp = tempfile::tempdir().expect("tmp");
    let n = Notary::start(tmp.path());
    for (i, topic) in ["wc/+/x", "wc/#", "nul/\u{0}/x"].into_iter().enumerate() {
        let mut s = open(n.mqtt);
        assert_eq!(connack(&mut s, &format!("wild-{i}")), 0);
        let payload = format!("to {topic:?}");
        s.write_all(&publish_packet(topic, payload.as_bytes())).expect("send PUBLISH");
        assert!(closed_by_server(&mut s), "{topic:?}: connection kept");
        assert_eq!(
            n.get(&format!("/v1/proofs/{}", blake3_hex(payload.as_bytes()))).0,
            404,
            "{topic:?} notarized"
        );
    }
    healthy_and_serving(&n, "wildcard topic names");
}

#[test]
fn subscribing_to_sys_beside_a_normal_filter_keeps_the_connection() {
    let tmp = tempfile::tempdir().expect("tmp");
    let n = Notary::start(tmp.path());
    let sub = Subscriber::start(n.mqtt, &["$SYS/#", "normal/x"], &["-F", "%t"]);
    n.notarize("normal/x", b"after a $SYS subscription");
    let line = (0..1000)
        .map(|_| sub.next_message().0)
        .find(|t| t == "normal/x")
        .expect("the normal filter's message arrives on the same connection");
    assert_eq!(line, "normal/x");
}

#[test]
fn a_flood_of_half_open_connections_leaves_new_clients_served() {
    let tmp = tempfile::tempdir().expect("tmp");
    let n = Notary::start(tmp.path());
    // Silent, and half a CONNECT: neither holds up anyone else.
    let mut held: Vec<TcpStream> = (0..300).map(|_| open(n.mqtt)).collect();
    for s in held.iter_mut().take(100) {
        s.write_all(&connect_packet("half")[..5]).expect("half a CONNECT");
    }
    healthy_and_serving(&n, "300 half-open connections");
    // (They stay open until their clients leave: rmqtt's protocol
    // detection has no time limit. README, limitations.)
    drop(held);
    healthy_and_serving(&n, "the half-open connections left");
}

#[test]
fn a_fleet_larger_than_max_connections_retrying_with_their_ids_does_not_wedge() {
    let tmp = tempfile::tempdir().expect("tmp");
    let config = fast_config(tmp.path(), "[mqtt]\nmax_connections = 5\n");
    let n = Notary::start_with(tmp.path(), Some(config));
    let mut kept = Vec::new();
    let mut refused = 0;
    for round in 0..3 {
        for id in 0..10 {
            let mut s = open(n.mqtt);
            match connack(&mut s, &format!("fleet-{id}")) {
                0 => kept.push(s),
                3 => refused += 1,
                code => panic!("round {round}, fleet-{id}: CONNACK {code}"),
            }
        }
    }
    assert!(refused >= 10, "past max_connections devices are refused ({refused})");
    drop(kept);
    // The sessions end with their connections; a new client gets in.
    eventually("a new client to be accepted", || {
        let mut s = open(n.mqtt);
        (connack(&mut s, "newcomer") == 0).then_some(())
    });
    healthy_and_serving(&n, "a fleet past max_connections");
}

/// One HTTP/1.1 request on a kept-alive connection: (status, body).
fn http_on(s: &mut TcpStream, path: &str) -> (u16, String) {
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: notary\r\n\r\n").as_bytes()).expect("request");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).expect("response head");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_string();
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let len = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned()))
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).expect("response body");
    (status, String::from_utf8_lossy(&body).to_string())
}

#[test]
fn healthz_names_the_mqtt_listener_while_it_cannot_take_clients() {
    let tmp = tempfile::tempdir().expect("tmp");
    let config = fast_config(tmp.path(), "[ingest]\nstall_ms = 300\n");
    let n = Notary::start_limited(tmp.path(), config, 128, &[]);
    // Asked on a connection opened before the descriptors run out.
    let mut http = TcpStream::connect(("127.0.0.1", n.http)).expect("HTTP");
    http.set_read_timeout(Some(PATIENCE)).expect("timeout");
    assert_eq!(http_on(&mut http, "/healthz").0, 200);
    let hold: Vec<TcpStream> =
        (0..200).filter_map(|_| TcpStream::connect(("127.0.0.1", n.mqtt)).ok()).collect();
    let body = eventually("/healthz to name the MQTT listener", || {
        let (status, body) = http_on(&mut http, "/healthz");
        (status == 503 && body.contains("mqtt_listener")).then_some(body)
    });
    assert!(body.contains("CONNACK") || body.contains("CONNECT"), "{body}");
    drop(hold);
    eventually("/healthz to be ok again", || (n.health().0 == 200).then_some(()));
    healthy_and_serving(&n, "the listener recovered");
}

#[test]
fn a_will_is_notarized_before_it_is_sent_and_a_signed_will_is_refused_at_connect() {
    let tmp = tempfile::tempdir().expect("tmp");
    let config = fast_config(tmp.path(), "[devices]\nrequire_signature = [\"secure/#\"]\n");
    let n = Notary::start_with(tmp.path(), Some(config));
    let sub = Subscriber::start(n.mqtt, &["wills/#"], &[]);
    let will = |topic: &str, payload: &[u8]| {
        let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02 | 0x04 | 0x08, 0, 60];
        for field in [b"willing".as_slice(), topic.as_bytes(), payload] {
            body.extend_from_slice(&(field.len() as u16).to_be_bytes());
            body.extend_from_slice(field);
        }
        let mut p = vec![0x10, body.len() as u8];
        p.extend_from_slice(&body);
        p
    };
    let mut s = open(n.mqtt);
    s.write_all(&will("wills/device-1", b"device-1 went away")).expect("CONNECT with a will");
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack).expect("CONNACK");
    assert_eq!(ack[3], 0, "a plain will is accepted");
    drop(socket2_reset(s));
    let (topic, payload) = sub.next_message();
    assert_eq!((topic.as_str(), payload.as_str()), ("wills/device-1", "device-1 went away"));
    // Notarized before it was sent: the proof is there (committed) already.
    let status = n.get(&format!("/v1/proofs/{}", blake3_hex(b"device-1 went away"))).0;
    assert!(status == 200 || status == 202, "the will was sent before its commit ({status})");
    let body = n.wait_proof(b"device-1 went away");
    // The will's leaf names the client whose will it was.
    let bundles: Vec<notary_proof::ProofBundle> = serde_json::from_str(&body).expect("bundles");
    let leaf = notary_proof::LeafRecord::decode(&bundles[0].leaf).expect("leaf");
    assert_eq!(leaf.publisher.map(|p| p.client_id).as_deref(), Some("willing"));

    // A will the notary could only judge when it fires is refused now.
    let mut s = open(n.mqtt);
    s.write_all(&will("secure/x", b"unsigned on a signed topic")).expect("CONNECT");
    s.read_exact(&mut ack).expect("CONNACK");
    assert_eq!(ack[3], 5, "CONNACK 5 (not authorized)");
    healthy_and_serving(&n, "wills");
}

#[test]
fn reject_v311_disconnect_closes_a_rejected_publishers_connection_without_a_puback() {
    let tmp = tempfile::tempdir().expect("tmp");
    let config = fast_config(
        tmp.path(),
        "[mqtt]\nreject_v311 = \"disconnect\"\n[devices]\nrequire_signature = [\"secure/#\"]\n",
    );
    let n = Notary::start_with(tmp.path(), Some(config));
    let mut s = open(n.mqtt);
    assert_eq!(connack(&mut s, "unsigned-device"), 0);
    s.write_all(&publish_packet("secure/x", b"unsigned")).expect("PUBLISH");
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(!rest.contains(&0x40), "a PUBACK came: {rest:?}");
    assert_eq!(n.get(&format!("/v1/proofs/{}", blake3_hex(b"unsigned"))).0, 422, "recorded as rejected");
    healthy_and_serving(&n, "a disconnected rejected publisher");
}

/// Reads one MQTT packet: (first byte, body).
fn read_packet(s: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut head = [0u8; 1];
    s.read_exact(&mut head).expect("a packet");
    let (mut len, mut shift) = (0usize, 0);
    loop {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).expect("remaining length");
        len |= usize::from(b[0] & 0x7f) << shift;
        shift += 7;
        if b[0] & 0x80 == 0 {
            break;
        }
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).expect("packet body");
    (head[0], body)
}

/// The next QoS 1 PUBLISH's payload, acknowledged.
fn next_qos1_payload(s: &mut TcpStream, topic: &str) -> String {
    let (head, body) = read_packet(s);
    assert_eq!(head & 0xf6, 0x32, "expected a QoS 1 PUBLISH, got {head:#x}");
    let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
    assert_eq!(&body[2..2 + topic_len], topic.as_bytes());
    let id = &body[2 + topic_len..4 + topic_len];
    s.write_all(&[0x40, 2, id[0], id[1]]).expect("PUBACK");
    String::from_utf8_lossy(&body[4 + topic_len..]).into_owned()
}

/// A persistent (clean session 0) MQTT 3.1.1 connection with this
/// keep-alive; returns the CONNACK's session-present flag.
fn resume(s: &mut TcpStream, client_id: &str, keep_alive: u8) -> bool {
    let mut packet = connect_packet(client_id);
    packet[9] = 0; // connect flags: clean session off
    packet[11] = keep_alive;
    s.write_all(&packet).expect("send CONNECT");
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack).expect("CONNACK");
    assert_eq!((ack[0], ack[3]), (0x20, 0), "CONNACK {ack:?}");
    ack[2] == 1
}

#[test]
fn a_full_offline_queue_drops_its_oldest_message_counted_and_still_notarized() {
    const LIMIT: usize = 5;
    let tmp = tempfile::tempdir().expect("tmp");
    let config = fast_config(tmp.path(), &format!("[mqtt]\nmax_queued_messages = {LIMIT}\n"));
    let n = Notary::start_with(tmp.path(), Some(config));
    let topic = "queue/t";

    let mut s = open(n.mqtt);
    assert!(!resume(&mut s, "queued-sub", 1), "a new session");
    let mut sub = vec![0x82, (5 + topic.len()) as u8, 0, 1, 0, topic.len() as u8];
    sub.extend_from_slice(topic.as_bytes());
    sub.push(1);
    s.write_all(&sub).expect("SUBSCRIBE");
    assert_eq!(read_packet(&mut s), (0x90, vec![0, 1, 1]), "SUBACK granting QoS 1");
    // rmqtt leaves closing to the client after a DISCONNECT (the spec's
    // "should"); the keep-alive of 1 s closes it from the server's side,
    // which marks the end of the connection on the broker.
    s.write_all(&[0xe0, 0]).expect("DISCONNECT");
    assert!(closed_by_server(&mut s));

    let lines: Vec<String> = (0..4 * LIMIT).map(|i| format!("queued-{i}")).collect();
    publish_lines(n.mqtt, topic, 1, &lines);

    let mut s = open(n.mqtt);
    assert!(resume(&mut s, "queued-sub", 60), "the session was kept");
    let got: Vec<String> = (0..LIMIT).map(|_| next_qos1_payload(&mut s, topic)).collect();
    assert_eq!(got, lines[lines.len() - LIMIT..], "the newest messages, in order");
    // Nothing else was queued: the next message is one sent now.
    assert!(publish(n.mqtt, topic, b"after the queue", &[]).status.success());
    assert_eq!(next_qos1_payload(&mut s, topic), "after the queue");

    let dropped = (3 * LIMIT) as u64;
    eventually("the dropped deliveries to be counted", || {
        (n.metric("mqtt_deliveries_dropped_total") == dropped).then_some(())
    });
    for l in &lines {
        n.wait_proof(l.as_bytes());
    }
    healthy_and_serving(&n, "a full session queue");
}
