//! The configuration file: parsed once into a validated struct.
//! `config/mqtt-notary.toml` is the documented default and must parse to
//! exactly `Config::default()` (tested).

use anyhow::{bail, Context as _};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub const DEFAULT_CONFIG: &str = include_str!("../../config/mqtt-notary.toml");

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub data_dir: PathBuf,
    pub mqtt: MqttConfig,
    pub http: HttpConfig,
    pub log: LogConfig,
    pub ingest: IngestConfig,
    pub devices: DevicesConfig,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DevicesConfig {
    pub require_signature: Vec<String>,
    pub max_envelope_bytes: usize,
    pub enrolment_file: Option<PathBuf>,
}

impl Default for DevicesConfig {
    fn default() -> Self {
        let p = notary_plugin::DevicePolicy::default();
        DevicesConfig {
            require_signature: p.require_signature,
            max_envelope_bytes: p.max_envelope_bytes,
            enrolment_file: None,
        }
    }
}

impl DevicesConfig {
    pub fn policy(&self) -> notary_plugin::DevicePolicy {
        notary_plugin::DevicePolicy {
            require_signature: self.require_signature.clone(),
            max_envelope_bytes: self.max_envelope_bytes,
        }
    }
}

/// An enrolment file: `[[device]]` tables with `id` and `public_key`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrolmentFile {
    #[serde(default)]
    pub device: Vec<notary_plugin::registry::EnrolmentEntry>,
}

impl EnrolmentFile {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    pub listen: SocketAddr,
    pub max_connections: usize,
    pub max_payload_bytes: usize,
    pub connection_timeout_ms: u16,
    pub max_inflight: usize,
    pub backlog_segment_bytes: usize,
    pub backlog_segment_count: usize,
    pub password_file: Option<PathBuf>,
    pub tls: Option<TlsConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub listen: SocketAddr,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub origin: String,
    pub max_batch_size: u64,
    pub max_batch_age_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    pub queue_capacity: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("./notary-data"),
            mqtt: MqttConfig::default(),
            http: HttpConfig::default(),
            log: LogConfig::default(),
            ingest: IngestConfig::default(),
            devices: DevicesConfig::default(),
        }
    }
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 1883)),
            max_connections: 10_000,
            max_payload_bytes: 256 * 1024,
            connection_timeout_ms: 5000,
            max_inflight: 100,
            backlog_segment_bytes: 16 * 1024 * 1024,
            backlog_segment_count: 8,
            password_file: None,
            tls: None,
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig { listen: SocketAddr::from(([127, 0, 0, 1], 8080)) }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { origin: String::new(), max_batch_size: 10_000, max_batch_age_ms: 1000 }
    }
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig { queue_capacity: 65_536 }
    }
}

impl Config {
    /// Reads and validates a config file; `None` gives the defaults.
    pub fn load(path: Option<&Path>) -> anyhow::Result<Self> {
        let cfg: Config = match path {
            None => Config::default(),
            Some(p) => {
                let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
                toml::from_str(&text).with_context(|| format!("parsing {}", p.display()))?
            }
        };
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        if self.log.max_batch_size == 0 {
            bail!("log.max_batch_size must be at least 1");
        }
        if self.log.max_batch_age_ms == 0 {
            bail!("log.max_batch_age_ms must be at least 1");
        }
        if self.ingest.queue_capacity == 0 {
            bail!("ingest.queue_capacity must be at least 1");
        }
        if self.mqtt.max_payload_bytes == 0 || self.mqtt.max_connections == 0 || self.mqtt.max_inflight == 0 {
            bail!("mqtt.max_payload_bytes, max_connections and max_inflight must be at least 1");
        }
        if self.mqtt.backlog_segment_bytes < 1024 || self.mqtt.backlog_segment_count == 0 {
            bail!("mqtt.backlog_segment_bytes must be at least 1024 and backlog_segment_count at least 1");
        }
        for f in &self.devices.require_signature {
            if !notary_plugin::registry::valid_topic_filter(f) {
                bail!("devices.require_signature: {f:?} is not a valid MQTT topic filter");
            }
        }
        if self.devices.max_envelope_bytes == 0 {
            bail!("devices.max_envelope_bytes must be at least 1");
        }
        if self.log.origin.contains(['+', ' ', '\t', '\n']) {
            bail!("log.origin must not contain '+' or whitespace");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_default_file_is_the_default() {
        let parsed: Config = toml::from_str(DEFAULT_CONFIG).expect("default config parses");
        assert_eq!(parsed, Config::default());
        parsed.validate().expect("defaults are valid");
    }

    #[test]
    fn bad_signature_filters_are_refused() {
        let cfg: Config = toml::from_str("[devices]\nrequire_signature = [\"a/#/b\"]\n").expect("parses");
        assert!(cfg.validate().is_err());
        let cfg: Config =
            toml::from_str("[devices]\nrequire_signature = [\"a/+/b\", \"#\"]\n").expect("parses");
        assert!(cfg.validate().is_ok());
    }

    #[test]
    fn unknown_fields_are_refused() {
        assert!(toml::from_str::<Config>("[mqtt]\nlisten_port = 1\n").is_err());
        assert!(toml::from_str::<Config>("verbose = true\n").is_err());
    }
}
