//! `mqtt-notary`: an MQTT broker that makes every message provable.
//!
//! The command line lives here, as a library, so that the benchmark
//! (`bench/`) runs exactly this code in its child processes; the
//! `mqtt-notary` binary is [`cli_main`] and nothing else.
//!
//! Exit codes: `run` and `sidecar` 0 after a clean shutdown, 2 on a
//! start-up error, 3 when shutdown's deadline passed before everything
//! taken was committed, 4 when the data directory is refused (a damaged or
//! missing file where a log existed; see `datadir.rs`);
//! `verify` and `ledger verify` 0 valid, 1 invalid, 2 usage or I/O error;
//! `device ...` 0 done, 2 refused or failed.
#![forbid(unsafe_code)]

mod config;
mod datadir;
mod device;
mod run;
mod verify;

use clap::{Parser, Subcommand};
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "mqtt-notary", version, about = "MQTT broker that makes every message provable")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker with the notary pipeline.
    Run {
        /// Configuration file (TOML); without it, the documented defaults.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Overrides `data_dir`.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Overrides `mqtt.listen` (HOST:PORT).
        #[arg(long)]
        mqtt: Option<SocketAddr>,
        /// Overrides `http.listen` (HOST:PORT).
        #[arg(long)]
        http: Option<SocketAddr>,
        /// Start even though the data directory shows an earlier log whose
        /// store, key or ledger is missing: begins a new log.
        #[arg(long)]
        new_log: bool,
    },
    /// Notarize an existing broker (Mosquitto, ...) as its client, and
    /// serve proofs on it and over HTTP.
    Sidecar {
        /// The broker: mqtt://HOST:PORT.
        #[arg(long)]
        broker: String,
        /// Configuration file (TOML); without it, the documented defaults.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Overrides `data_dir`.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Overrides `http.listen` (HOST:PORT).
        #[arg(long)]
        http: Option<SocketAddr>,
        /// Start even though the data directory shows an earlier log whose
        /// store, key or ledger is missing: begins a new log.
        #[arg(long)]
        new_log: bool,
    },
    /// Print the commented default configuration.
    GenerateConfig,
    /// Verify a proof bundle offline: 0 valid, 1 invalid, 2 usage or I/O error.
    Verify {
        /// The bundle (JSON), as served over MQTT or HTTP.
        #[arg(long)]
        bundle: PathBuf,
        /// The message payload, byte for byte.
        #[arg(long)]
        payload: PathBuf,
        /// The broker's verifier key (broker.pub).
        #[arg(long)]
        broker_key: PathBuf,
        /// Check EVM receipts on chain through this JSON-RPC endpoint;
        /// without it they are reported as unchecked.
        #[arg(long)]
        rpc: Option<String>,
        /// The broker's EVM anchoring address (0x...); EVM receipts must
        /// come from it. Without it, the receipt's own `from` is checked.
        #[arg(long, requires = "rpc")]
        evm_from: Option<String>,
        /// Confirmations an EVM anchor needs.
        #[arg(long, default_value_t = 1, requires = "rpc")]
        confirmations: u64,
        /// First fetch the current bundle for the same message from this
        /// broker HTTP API (e.g. http://broker:8080): if it verifies, it
        /// replaces the file (a pending anchor becomes final this way).
        #[arg(long, value_name = "URL")]
        upgrade: Option<String>,
    },
    /// Ledger maintenance.
    Ledger {
        #[command(subcommand)]
        command: LedgerCommand,
    },
    /// Device keys, the device registry, and signed publishing.
    Device {
        #[command(subcommand)]
        command: DeviceCommand,
    },
}

#[derive(Subcommand)]
enum DeviceCommand {
    /// Create a device key: writes the private key to FILE (mode 0600),
    /// prints the public key in hex.
    Keygen {
        id: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Enrol a device with its public key.
    Add {
        id: String,
        /// The ed25519 public key, 64 hex digits.
        #[arg(long)]
        public_key: String,
        #[arg(long, default_value = "./notary-data")]
        data_dir: PathBuf,
    },
    /// List enrolled devices, and queued or refused changes.
    List {
        #[arg(long, default_value = "./notary-data")]
        data_dir: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a device's key: its envelopes are rejected from then on.
    Revoke {
        id: String,
        #[arg(long, default_value = "./notary-data")]
        data_dir: PathBuf,
    },
    /// Replace a device's key; messages signed before stay valid.
    Rotate {
        id: String,
        #[arg(long)]
        public_key: String,
        #[arg(long, default_value = "./notary-data")]
        data_dir: PathBuf,
    },
    /// Sign a message as a device (next counter) and publish it at QoS 1.
    Publish {
        #[arg(long)]
        id: String,
        /// The device key file (from `device keygen`).
        #[arg(long)]
        key: PathBuf,
        #[arg(long)]
        topic: String,
        #[arg(long, conflicts_with = "file", required_unless_present = "file")]
        message: Option<String>,
        #[arg(long)]
        file: Option<PathBuf>,
        /// The broker, HOST:PORT.
        #[arg(long, default_value = "127.0.0.1:1883")]
        mqtt: String,
        /// Content type of the message, signed into the envelope.
        #[arg(long, default_value = "application/octet-stream")]
        content_type: String,
        /// Counter state file; defaults to KEY.counter.
        #[arg(long)]
        state: Option<PathBuf>,
        /// MQTT login: the user name...
        #[arg(long, requires = "password_file")]
        username: Option<String>,
        /// ...and a file holding the password (first line).
        #[arg(long, requires = "username")]
        password_file: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum LedgerCommand {
    /// Walk the local ledger: every entry, link and checkpoint signature, and
    /// every checkpoint against the store's log. 0 valid, 1 invalid, 2 error.
    Verify {
        #[arg(long)]
        data_dir: PathBuf,
        /// The broker's verifier key; defaults to DATA_DIR/broker.pub.
        #[arg(long)]
        broker_key: Option<PathBuf>,
    },
}

pub use run::plain_rmqtt;

/// Runs the `mqtt-notary` command line; `args` starts with the program name.
pub fn cli_main(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    match cli.command {
        Command::Run { config, data_dir, mqtt, http, new_log } => {
            run::main(config, data_dir, mqtt, http, new_log, run::Source::Embedded)
        }
        Command::Sidecar { broker, config, data_dir, http, new_log } => {
            run::main(config, data_dir, None, http, new_log, run::Source::Upstream(broker))
        }
        Command::GenerateConfig => {
            print!("{}", config::DEFAULT_CONFIG);
            ExitCode::SUCCESS
        }
        Command::Verify { bundle, payload, broker_key, rpc, evm_from, confirmations, upgrade } => {
            let chain = rpc.map(|url| verify::ChainCheck { url, from: evm_from, confirmations });
            verify::bundle(&bundle, &payload, &broker_key, chain.as_ref(), upgrade.as_deref())
        }
        Command::Ledger { command: LedgerCommand::Verify { data_dir, broker_key } } => {
            verify::ledger(&data_dir, broker_key.as_deref())
        }
        Command::Device { command } => device::exit(run_device(command)),
    }
}

fn run_device(command: DeviceCommand) -> anyhow::Result<()> {
    use notary_proof::RegistryAction;
    match command {
        DeviceCommand::Keygen { id, out } => device::keygen(&id, &out),
        DeviceCommand::Add { id, public_key, data_dir } => {
            device::change(&data_dir, RegistryAction::Enrol, &id, Some(&public_key))
        }
        DeviceCommand::List { data_dir, json } => device::list(&data_dir, json),
        DeviceCommand::Revoke { id, data_dir } => {
            device::change(&data_dir, RegistryAction::Revoke, &id, None)
        }
        DeviceCommand::Rotate { id, public_key, data_dir } => {
            device::change(&data_dir, RegistryAction::Rotate, &id, Some(&public_key))
        }
        DeviceCommand::Publish {
            id,
            key,
            topic,
            message,
            file,
            mqtt,
            content_type,
            state,
            username,
            password_file,
        } => {
            let payload = match (message, file) {
                (Some(m), _) => m.into_bytes(),
                (None, Some(f)) => std::fs::read(&f).map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?,
                (None, None) => anyhow::bail!("give --message or --file"),
            };
            let login = match (username, password_file) {
                (Some(u), Some(f)) => {
                    let text =
                        std::fs::read_to_string(&f).map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?;
                    Some((u, text.lines().next().unwrap_or_default().to_owned()))
                }
                _ => None,
            };
            device::publish(device::Publish { id, key, topic, payload, content_type, mqtt, state, login })
        }
    }
}
