//! MQTT conformance, measured against Mosquitto: the same client code
//! (`tests/conformance/mqtt_conformance.py`, Eclipse Paho for Python, and
//! raw packets where a client library would refuse to send them) runs the
//! same scenarios against Debian's Mosquitto and against our embedded
//! broker. Ours must pass every scenario Mosquitto passes.

use crate::support::*;
use std::collections::BTreeMap;

/// Scenario name → (passed, why not).
fn run_scenarios(port: u16) -> BTreeMap<String, (bool, String)> {
    conformance_script("mqtt_conformance.py", port)
        .into_iter()
        .map(|v| {
            let name = v["scenario"].as_str().expect("scenario").to_owned();
            let why = v["why"].as_str().unwrap_or("").to_owned();
            (name, (v["pass"] == true, why))
        })
        .collect()
}

#[test]
fn conformance_our_broker_passes_every_scenario_mosquitto_passes() {
    let mosquitto = Mosquitto::start();
    let theirs = run_scenarios(mosquitto.port);
    let tmp = tempfile::tempdir().expect("tmp");
    let notary = Notary::start(tmp.path());
    let ours = run_scenarios(notary.mqtt);
    assert_eq!(theirs.keys().collect::<Vec<_>>(), ours.keys().collect::<Vec<_>>());
    let count = |r: &BTreeMap<String, (bool, String)>| r.values().filter(|(p, _)| *p).count();
    eprintln!(
        "conformance: Mosquitto {} of {}, mqtt-notary {} of {}",
        count(&theirs),
        theirs.len(),
        count(&ours),
        ours.len()
    );
    let mut behind = Vec::new();
    for (name, (passed, why)) in &ours {
        let (mosquitto_passed, mosquitto_why) = &theirs[name];
        eprintln!(
            "  {name}: mosquitto {} / ours {}",
            if *mosquitto_passed { "pass" } else { "FAIL" },
            if *passed { "pass" } else { "FAIL" }
        );
        if !mosquitto_why.is_empty() {
            eprintln!("    mosquitto: {mosquitto_why}");
        }
        if *mosquitto_passed && !passed {
            behind.push(format!("{name}: {why}"));
        }
    }
    assert!(
        behind.is_empty(),
        "scenarios Mosquitto passes and we fail:\n{}\n{}",
        behind.join("\n"),
        notary.log()
    );
    // The broker is still whole afterwards: a new client's message gets a proof.
    let digest = notary.notarize("after/conformance", b"still serving");
    assert!(!digest.is_empty());
}
