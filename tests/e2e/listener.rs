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
