//! The `mqtt-notary` binary: see the library for the command line.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    mqtt_notary::cli_main(std::env::args_os())
}
