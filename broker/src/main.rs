//! The `mqtt-notary` binary: see the library for the command line.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    // Errors made from what clients send (rmqtt's, through anyhow) must not
    // capture backtraces: with RUST_BACKTRACE set, each would cost a stack
    // walk and a symbol lookup (seconds in a debug build) whenever a client
    // sends, say, an invalid topic filter. Panics keep theirs.
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
    mqtt_notary::cli_main(std::env::args_os())
}
