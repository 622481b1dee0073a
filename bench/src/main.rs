//! `bench`: mqtt-notary side by side with plain Mosquitto and plain rumqttd,
//! in one run on one machine. See bench/README.md for what is measured and
//! how; the results land in `--out` as results.json, results.md and
//! results.svg.
//!
//! The systems under test run as child processes, so their CPU time, peak
//! memory and files are their own: Mosquitto from the system's package,
//! and rumqttd and mqtt-notary as this same binary (`bench rumqttd`,
//! `bench notary ...`), which links the very code of the `mqtt-notary`
//! binary. The load generator (rumqttc) runs in this process.
#![forbid(unsafe_code)]

mod ceiling;
mod load;
mod machine;
mod plot;
mod probe;
mod report;
mod rumqttd;
mod runner;
mod systems;

use clap::{Parser, Subcommand};
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "bench", about = "mqtt-notary benchmark against plain Mosquitto and plain rumqttd")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// A smoke run (under two minutes): every system and phase, small counts.
    #[arg(long)]
    quick: bool,
    /// Where results.json, results.md and results.svg go; default
    /// bench/results (full run) or bench/results-quick (not kept in git).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Skip the scaling curves (publishers, payload size, store size).
    #[arg(long)]
    no_scaling: bool,
    /// Messages of the retention phase (its horizon is a fifth of them);
    /// 0 skips it. Default: 10,000,000 (quick: 100,000).
    #[arg(long)]
    retention: Option<u64>,
    /// Measure only these systems (comma-separated), e.g. `--only notary`.
    #[arg(long, value_delimiter = ',')]
    only: Vec<systems::Kind>,
}

#[derive(Subcommand)]
enum Command {
    /// (Internal) plain rumqttd, with mqtt-notary's listener settings and no plugin.
    Rumqttd { listen: SocketAddr },
    /// (Internal) plain rmqtt, the engine mqtt-notary embeds, without its hook.
    Rmqtt { listen: SocketAddr },
    /// (Internal) the mqtt-notary command line, e.g. `bench notary run --config F`.
    Notary {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Write results.md and results.svg again from DIR/results.json.
    Report { dir: PathBuf },
    /// The ed25519 batch-verification ceiling of this machine alone.
    Ceiling {
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
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
        Some(Command::Rmqtt { listen }) => match mqtt_notary::plain_rmqtt(listen) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("rmqtt: {e:#}");
                ExitCode::from(2)
            }
        },
        Some(Command::Rumqttd { listen }) => match rumqttd::run(listen) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("rumqttd: {e:#}");
                ExitCode::from(2)
            }
        },
        Some(Command::Notary { args }) => {
            mqtt_notary::cli_main(std::iter::once(OsString::from("mqtt-notary")).chain(args))
        }
        Some(Command::Report { dir }) => match report::rewrite(&dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("bench report: {e:#}");
                ExitCode::FAILURE
            }
        },
        Some(Command::Ceiling { seconds }) => {
            let c = ceiling::measure(seconds);
            println!(
                "ed25519 batch verification: {:.0} signatures/s on {} threads, {:.0} on 1",
                c.all_threads, c.threads, c.one_thread
            );
            ExitCode::SUCCESS
        }
        None => {
            let plan = if cli.quick { runner::Plan::quick() } else { runner::Plan::full() };
            let (retention_messages, retention_horizon) = match cli.retention {
                Some(n) => (n, n / 5),
                None => (plan.retention_messages, plan.retention_horizon),
            };
            let plan = runner::Plan {
                scaling: plan.scaling && !cli.no_scaling,
                only: cli.only,
                retention_messages,
                retention_horizon,
                ..plan
            };
            let dir = if cli.quick { "results-quick" } else { "results" };
            let out = cli.out.unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(dir));
            match runner::run(&plan, &out) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("bench: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
