//! Plain rumqttd, a baseline of the benchmark (mqtt-notary embedded it
//! before it moved to rmqtt): one MQTT 3.1.1 listener with the listener
//! settings mqtt-notary uses, no plugin.

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};
use std::collections::HashMap;
use std::net::SocketAddr;

pub fn run(listen: SocketAddr) -> anyhow::Result<()> {
    // rumqttd only logs a failed bind from its own thread; check it here.
    std::net::TcpListener::bind(listen)?;
    let listener = ServerSettings {
        name: "mqtt-v4".into(),
        listen,
        tls: None,
        next_connection_delay_ms: 1,
        connections: ConnectionSettings {
            connection_timeout_ms: 5000,
            max_payload_size: 256 * 1024,
            max_inflight_count: 100,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let config = Config {
        router: RouterConfig {
            max_connections: 10_000,
            max_outgoing_packet_count: 200,
            max_segment_size: 16 * 1024 * 1024,
            max_segment_count: 8,
            ..Default::default()
        },
        v4: Some(HashMap::from([("mqtt".to_owned(), listener)])),
        ..Default::default()
    };
    Broker::new(config).start()?;
    Ok(())
}
