//! `docker-compose.yml`: validated by a real compose parser (Debian's
//! docker-compose), and its three services run outside containers with the
//! same command lines and files, container hosts, ports and paths mapped to
//! local ones. No Docker engine is needed.

use crate::support::*;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Asserts the compose file runs exactly this command line.
fn assert_command(compose: &str, line: &str) {
    assert!(compose.contains(line), "docker-compose.yml no longer has {line}");
}

#[test]
fn the_compose_stack_is_valid_and_its_command_lines_work_outside_containers() {
    let out = Command::new("docker-compose")
        .arg("-f")
        .arg(repo().join("docker-compose.yml"))
        .args(["config", "-q"])
        .output()
        .expect("docker-compose is installed (scripts/test installs it)");
    assert!(out.status.success(), "compose file invalid: {}", String::from_utf8_lossy(&out.stderr));
    let compose = read("docker-compose.yml");
    let tmp = tempfile::tempdir().expect("tmp");

    // mosquitto -c /mosquitto/config/mosquitto.conf, with deploy/mosquitto.conf.
    assert_command(&compose, r#"command: ["mosquitto", "-c", "/mosquitto/config/mosquitto.conf"]"#);
    assert_command(&compose, "./deploy/mosquitto.conf:/mosquitto/config/mosquitto.conf:ro");
    let conf = read("deploy/mosquitto.conf");
    let mosquitto = Mosquitto::from_config(|port, dir| {
        conf.replace("listener 1883", &format!("listener {port} 127.0.0.1"))
            .replace("/mosquitto/data/", &format!("{}/", dir.display()))
    });

    // anvil --host 0.0.0.0 --port 8545 --state /data/anvil-state.json
    assert_command(
        &compose,
        r#"command: ["--host", "0.0.0.0", "--port", "8545", "--state", "/data/anvil-state.json"]"#,
    );
    let anvil = Anvil::start_with(free_port(), &["--host", "127.0.0.1"]);

    // mqtt-notary sidecar --broker mqtt://mosquitto:1883 --config ... --data-dir /data
    assert_command(
        &compose,
        r#"command: ["sidecar", "--broker", "mqtt://mosquitto:1883", "--config", "/etc/mqtt-notary/notary.toml", "--data-dir", "/data", "--http", "0.0.0.0:8080"]"#,
    );
    assert_command(&compose, "./deploy/notary.toml:/etc/mqtt-notary/notary.toml:ro");
    let config = tmp.path().join("notary.toml");
    std::fs::write(&config, read("deploy/notary.toml").replace("http://anvil:8545", &anvil.url))
        .expect("write");
    let key = compose
        .lines()
        .find_map(|l| l.trim().strip_prefix("NOTARY_EVM_PRIVATE_KEY: "))
        .expect("the compose file sets the dev key")
        .trim_matches('"')
        .to_owned();
    let notary = Notary::sidecar_with(
        tmp.path().join("data"),
        config,
        &format!("mqtt://127.0.0.1:{}", mosquitto.port),
        mosquitto.port,
        vec![("NOTARY_EVM_PRIVATE_KEY".into(), key)],
    );

    // A device publishes to Mosquitto; the proof is anchored on the chain.
    assert!(publish(mosquitto.port, "plant/compose", b"through the stack", &[]).status.success());
    let bundle = crate::anchoring::wait_final_mining(&notary, &anvil, "through the stack");
    let (code, out, err) = cli_verify_with(
        &bundle.to_json(),
        b"through the stack",
        &notary.broker_key(),
        &["--rpc", &anvil.url, "--evm-from", ANVIL_ADDRESS, "--confirmations", "2"],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("on chain:    confirmed"), "{out}");
}
