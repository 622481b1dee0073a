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
    pub anchor: AnchorConfig,
    pub sidecar: SidecarConfig,
    pub topics: TopicsConfig,
    pub retention: RetentionConfig,
}

/// `[retention]`: when old messages are deleted. Unset: never.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Delete a batch's messages this many days after it was sealed.
    pub max_age_days: Option<u32>,
    /// Delete the oldest batches' messages while the store uses more bytes.
    pub max_bytes: Option<u64>,
}

impl RetentionConfig {
    pub fn policy(&self) -> notary_plugin::retention::RetentionPolicy {
        notary_plugin::retention::RetentionPolicy {
            max_age_ms: self.max_age_days.map(|d| u64::from(d) * 86_400_000),
            max_bytes: self.max_bytes,
        }
    }
}

/// `[topics]`: the notary's own MQTT topic names.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TopicsConfig {
    /// The previous release's names under `notary/` (for one release).
    pub legacy: bool,
}

impl TopicsConfig {
    pub fn topics(&self) -> notary_plugin::Topics {
        if self.legacy {
            notary_plugin::Topics::LEGACY
        } else {
            notary_plugin::Topics::CURRENT
        }
    }
}

/// `[sidecar]`: how `mqtt-notary sidecar` subscribes to an existing broker.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SidecarConfig {
    /// Empty: the log name with `/` as `-` (stable per data directory).
    pub client_id: String,
    pub topics: Vec<String>,
    /// Several sidecars share the load through `$share/<group>/...`.
    pub group: String,
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    pub keep_alive_s: u64,
    pub max_retry_ms: u64,
    /// For `mqtts://` brokers.
    pub tls: Option<SidecarTlsConfig>,
}

/// `[sidecar.tls]`: how to trust the upstream broker, and an optional client
/// certificate.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SidecarTlsConfig {
    pub ca_file: PathBuf,
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}

impl Default for SidecarConfig {
    fn default() -> Self {
        SidecarConfig {
            client_id: String::new(),
            topics: vec!["#".into()],
            group: String::new(),
            username: None,
            password_file: None,
            keep_alive_s: 30,
            max_retry_ms: 10_000,
            tls: None,
        }
    }
}

/// Ledgers beyond the local one, which is always on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AnchorConfig {
    pub evm: Option<EvmConfig>,
}

/// `[anchor.evm]`: anchoring on an EVM chain over JSON-RPC.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvmConfig {
    pub rpc_url: String,
    pub chain_id: u64,
    #[serde(default)]
    pub private_key_file: Option<PathBuf>,
    #[serde(default)]
    pub private_key_env: Option<String>,
    #[serde(default)]
    pub to: Option<String>,
    #[serde(default = "EvmConfig::default_confirmations")]
    pub confirmations: u64,
    #[serde(default = "EvmConfig::default_interval")]
    pub anchor_interval_ms: u64,
    #[serde(default = "EvmConfig::default_poll")]
    pub poll_interval_ms: u64,
    #[serde(default = "EvmConfig::default_timeout")]
    pub rpc_timeout_ms: u64,
    #[serde(default = "EvmConfig::default_max_retry")]
    pub max_retry_ms: u64,
}

impl EvmConfig {
    fn default_confirmations() -> u64 {
        12
    }
    fn default_interval() -> u64 {
        3_600_000
    }
    fn default_poll() -> u64 {
        5_000
    }
    fn default_timeout() -> u64 {
        10_000
    }
    fn default_max_retry() -> u64 {
        60_000
    }

    fn validate(&self) -> anyhow::Result<()> {
        if !(self.rpc_url.starts_with("http://") || self.rpc_url.starts_with("https://")) {
            bail!("anchor.evm.rpc_url must be an http:// or https:// URL");
        }
        if self.chain_id == 0 {
            bail!("anchor.evm.chain_id must be the chain's id (e.g. 1 for Ethereum, 8822 for IOTA EVM)");
        }
        match (&self.private_key_file, &self.private_key_env) {
            (Some(_), None) | (None, Some(_)) => {}
            _ => bail!("anchor.evm needs exactly one of private_key_file and private_key_env"),
        }
        if let Some(to) = &self.to {
            parse_address(to).with_context(|| format!("anchor.evm.to = {to:?}"))?;
        }
        if self.confirmations == 0 {
            bail!("anchor.evm.confirmations must be at least 1");
        }
        if self.anchor_interval_ms == 0 || self.poll_interval_ms == 0 || self.rpc_timeout_ms == 0 {
            bail!("anchor.evm.anchor_interval_ms, poll_interval_ms and rpc_timeout_ms must be at least 1");
        }
        if self.max_retry_ms < self.poll_interval_ms {
            bail!("anchor.evm.max_retry_ms must be at least poll_interval_ms");
        }
        Ok(())
    }

    /// The settings for the anchorer, with the private key read from its
    /// file or environment variable. The key itself never appears in an
    /// error message.
    pub fn anchor_config(&self) -> anyhow::Result<notary_plugin::evm_anchor::EvmAnchorConfig> {
        let (text, source) = match (&self.private_key_file, &self.private_key_env) {
            (Some(path), _) => {
                warn_if_readable_by_others(path);
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading the EVM private key {}", path.display()))?;
                (text, path.display().to_string())
            }
            (None, Some(var)) => {
                let text = std::env::var(var).with_context(|| {
                    format!("the environment variable {var} (EVM private key) is not set")
                })?;
                (text, format!("${var}"))
            }
            (None, None) => bail!("anchor.evm needs private_key_file or private_key_env"),
        };
        let digits = text.trim();
        let digits = digits.strip_prefix("0x").unwrap_or(digits);
        let mut private_key = [0u8; 32];
        if hex::decode_to_slice(digits, &mut private_key).is_err() {
            bail!("{source}: an EVM private key must be 64 hex digits");
        }
        let to = self.to.as_deref().map(parse_address).transpose()?;
        Ok(notary_plugin::evm_anchor::EvmAnchorConfig {
            settings: notary_anchor::evm::EvmSettings {
                rpc_url: self.rpc_url.clone(),
                private_key,
                to,
                chain_id: Some(self.chain_id),
                confirmations: self.confirmations,
                timeout: std::time::Duration::from_millis(self.rpc_timeout_ms),
            },
            interval_ms: self.anchor_interval_ms,
            poll_ms: self.poll_interval_ms,
            max_retry_ms: self.max_retry_ms,
        })
    }
}

/// `0x` and 40 hex digits.
pub fn parse_address(s: &str) -> anyhow::Result<[u8; 20]> {
    let mut out = [0u8; 20];
    let digits = s.strip_prefix("0x").context("an EVM address starts with 0x")?;
    hex::decode_to_slice(digits, &mut out).context("an EVM address is 0x and 40 hex digits")?;
    Ok(out)
}

#[cfg(unix)]
fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(file = %path.display(), "the EVM private key file is readable by other users; chmod 600 it");
        }
    }
}

#[cfg(not(unix))]
fn warn_if_readable_by_others(_: &Path) {}

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
    pub max_inflight: u16,
    pub max_queued_messages: usize,
    pub ack: Ack,
    pub reject_v311: RejectV311,
    pub password_file: Option<PathBuf>,
    pub acl_file: Option<PathBuf>,
    pub tls: Option<TlsConfig>,
}

/// When the embedded broker acknowledges a QoS 1/2 publish (`mqtt.ack`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Ack {
    /// After the message's leaf (or rejection) is committed.
    AfterCommit,
    /// As soon as it is judged; the commit follows.
    OnReceipt,
}

/// What an MQTT 3.1.1 publisher of a rejected message gets (`mqtt.reject_v311`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RejectV311 {
    /// The acknowledgement 3.1.1 requires; the message is not forwarded.
    Drop,
    /// The connection is closed, without an acknowledgement.
    Disconnect,
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
    pub max_connections: usize,
    pub header_read_timeout_ms: u64,
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
    pub stall_ms: u64,
    pub shutdown_timeout_ms: u64,
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
            anchor: AnchorConfig::default(),
            sidecar: SidecarConfig::default(),
            topics: TopicsConfig::default(),
            retention: RetentionConfig::default(),
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
            max_queued_messages: 1000,
            ack: Ack::AfterCommit,
            reject_v311: RejectV311::Drop,
            password_file: None,
            acl_file: None,
            tls: None,
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_connections: 512,
            header_read_timeout_ms: 10_000,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { origin: String::new(), max_batch_size: 10_000, max_batch_age_ms: 1000 }
    }
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig { queue_capacity: 65_536, stall_ms: 10_000, shutdown_timeout_ms: 15_000 }
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
        if self.ingest.stall_ms == 0 || self.ingest.shutdown_timeout_ms == 0 {
            bail!("ingest.stall_ms and ingest.shutdown_timeout_ms must be at least 1");
        }
        if self.http.max_connections == 0 || self.http.header_read_timeout_ms == 0 {
            bail!("http.max_connections and http.header_read_timeout_ms must be at least 1");
        }
        if self.mqtt.max_payload_bytes == 0 || self.mqtt.max_connections == 0 || self.mqtt.max_inflight == 0 {
            bail!("mqtt.max_payload_bytes, max_connections and max_inflight must be at least 1");
        }
        if self.mqtt.max_queued_messages == 0 {
            bail!("mqtt.max_queued_messages must be at least 1");
        }
        for f in &self.devices.require_signature {
            if !notary_plugin::topics::valid_topic_filter(f) {
                bail!("devices.require_signature: {f:?} is not a valid MQTT topic filter");
            }
        }
        if self.devices.max_envelope_bytes == 0 {
            bail!("devices.max_envelope_bytes must be at least 1");
        }
        if self.log.origin.contains(['+', ' ', '\t', '\n']) {
            bail!("log.origin must not contain '+' or whitespace");
        }
        if let Some(evm) = &self.anchor.evm {
            evm.validate()?;
        }
        if self.sidecar.topics.is_empty() {
            bail!("sidecar.topics needs at least one topic filter");
        }
        for f in &self.sidecar.topics {
            let plain =
                f.strip_prefix("$share/").and_then(|r| r.split_once('/')).map_or(f.as_str(), |(_, t)| t);
            if !notary_plugin::topics::valid_topic_filter(plain) {
                bail!("sidecar.topics: {f:?} is not a valid MQTT topic filter");
            }
        }
        if self.sidecar.username.is_some() != self.sidecar.password_file.is_some() {
            bail!("sidecar.username and sidecar.password_file go together");
        }
        if self.retention.max_age_days == Some(0) {
            bail!("retention.max_age_days must be at least 1 (leave it out to keep messages for ever)");
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
    fn the_evm_anchor_needs_one_key_source_and_a_chain() {
        let base = "[anchor.evm]\nrpc_url = \"http://127.0.0.1:8545\"\nchain_id = 31337\n";
        let parse = |extra: &str| toml::from_str::<Config>(&format!("{base}{extra}")).expect("parses");
        assert!(parse("").validate().is_err(), "no key source");
        assert!(parse("private_key_file = \"k\"\nprivate_key_env = \"K\"\n").validate().is_err());
        let ok = parse("private_key_env = \"K\"\n");
        ok.validate().expect("valid");
        let evm = ok.anchor.evm.as_ref().expect("evm");
        assert_eq!((evm.confirmations, evm.anchor_interval_ms), (12, 3_600_000));
        assert!(parse("private_key_env = \"K\"\nto = \"0x12\"\n").validate().is_err());
        assert!(parse("private_key_env = \"K\"\nconfirmations = 0\n").validate().is_err());
        let no_chain = "[anchor.evm]\nrpc_url = \"http://x\"\nprivate_key_env = \"K\"\n";
        assert!(toml::from_str::<Config>(no_chain).is_err(), "chain_id is required");
    }

    #[test]
    fn the_evm_key_is_read_from_a_file_and_never_echoed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("evm.key");
        let key = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80\n";
        std::fs::write(&path, key).expect("write");
        let cfg: Config = toml::from_str(&format!(
            "[anchor.evm]\nrpc_url = \"http://127.0.0.1:8545\"\nchain_id = 31337\nprivate_key_file = {:?}\n",
            path.display().to_string()
        ))
        .expect("parses");
        let evm = cfg.anchor.evm.as_ref().expect("evm");
        let settings = evm.anchor_config().expect("key read").settings;
        assert_eq!(hex::encode(settings.private_key), &key[2..66]);
        assert!(!format!("{settings:?}").contains(&key[2..66]), "Debug hides the key");
        std::fs::write(&path, "not a key but secret-ish text").expect("write");
        let err = format!("{:#}", evm.anchor_config().expect_err("bad key"));
        assert!(err.contains("64 hex digits") && !err.contains("secret-ish"), "{err}");
    }

    #[test]
    fn unknown_fields_are_refused() {
        assert!(toml::from_str::<Config>("[mqtt]\nlisten_port = 1\n").is_err());
        assert!(toml::from_str::<Config>("verbose = true\n").is_err());
    }
}
