//! Watches the MQTT listener from outside, as a client would: every few
//! seconds a TCP connection and a CONNECT, which must be answered with a
//! CONNACK. The probe's CONNECT is refused by our own hook (no session, no
//! `$SYS` event, no log line); any CONNACK proves the listener accepts and
//! answers. No CONNACK in time: `/healthz` names `mqtt_listener`.

use crate::health::Part;
use crate::metrics::Metrics;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

const EVERY: Duration = Duration::from_secs(5);
const TIMEOUT: Duration = Duration::from_secs(5);

/// Where a client on this host reaches `listen`.
fn target(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

/// An MQTT 3.1.1 CONNECT: clean session, keep-alive 0, this client id.
fn connect_packet(client_id: &str) -> Vec<u8> {
    let id = client_id.as_bytes();
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 0];
    body.extend_from_slice(&(id.len() as u16).to_be_bytes());
    body.extend_from_slice(id);
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend_from_slice(&body);
    packet
}

/// One probe: Ok once a CONNACK arrives.
async fn once(addr: SocketAddr, client_id: &str) -> std::io::Result<()> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(&connect_packet(client_id)).await?;
    let mut connack = [0u8; 4];
    stream.read_exact(&mut connack).await?;
    if connack[0] != 0x20 {
        return Err(std::io::Error::other(format!(
            "answered with packet type {:#04x}, not CONNACK",
            connack[0]
        )));
    }
    Ok(())
}

pub(super) async fn watch(listen: SocketAddr, client_id: String, metrics: Arc<Metrics>) {
    let addr = target(listen);
    loop {
        match tokio::time::timeout(TIMEOUT, once(addr, &client_id)).await {
            Ok(Ok(())) => metrics.health.recovered(Part::MqttListener),
            Ok(Err(e)) => metrics.health.failing(
                Part::MqttListener,
                format!("the MQTT listener on {addr} did not answer a CONNECT: {e}"),
            ),
            Err(_) => metrics.health.failing(
                Part::MqttListener,
                format!("the MQTT listener on {addr} sent no CONNACK within {} s", TIMEOUT.as_secs()),
            ),
        }
        tokio::time::sleep(EVERY).await;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn connect_packet_is_well_formed() {
        let p = super::connect_packet("probe");
        assert_eq!(p[0], 0x10);
        assert_eq!(p[1] as usize, p.len() - 2);
        assert_eq!(&p[2..8], b"\x00\x04MQTT");
        assert_eq!(&p[p.len() - 5..], b"probe");
    }
}
