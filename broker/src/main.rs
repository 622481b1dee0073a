//! `mqtt-notary`: an MQTT broker that makes every message provable.
//!
//! Exit codes: `run` 0 after a clean shutdown, 2 on a start-up error;
//! `verify` and `ledger verify` 0 valid, 1 invalid, 2 usage or I/O error.
#![forbid(unsafe_code)]

mod config;
mod run;
mod verify;

use clap::{Parser, Subcommand};
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
    },
    /// Ledger maintenance.
    Ledger {
        #[command(subcommand)]
        command: LedgerCommand,
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

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    match cli.command {
        Command::Run { config, data_dir, mqtt, http } => run::main(config, data_dir, mqtt, http),
        Command::GenerateConfig => {
            print!("{}", config::DEFAULT_CONFIG);
            ExitCode::SUCCESS
        }
        Command::Verify { bundle, payload, broker_key } => verify::bundle(&bundle, &payload, &broker_key),
        Command::Ledger { command: LedgerCommand::Verify { data_dir, broker_key } } => {
            verify::ledger(&data_dir, broker_key.as_deref())
        }
    }
}
