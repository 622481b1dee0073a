//! The benchmark tool end to end: `bench --quick` against a real Mosquitto,
//! plain rumqttd and mqtt-notary (embedded, signed, sidecar), with real
//! `mosquitto_sub` cross-checking. Speeds are not asserted (this is a debug
//! build on a shared machine); that every figure was measured, and that no
//! QoS 1 message was lost, is.

use serde_json::Value;
use std::process::Command;

fn runs<'a>(v: &'a Value, key: &str) -> &'a Vec<Value> {
    v[key].as_array().unwrap_or_else(|| panic!("results.{key} is a list"))
}

fn u(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("{key} in {v}"))
}

fn f(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or_else(|| panic!("{key} in {v}"))
}

#[test]
fn quick_run_measures_every_system_and_writes_results() {
    let out = tempfile::tempdir().expect("temp dir");
    let status = Command::new(env!("CARGO_BIN_EXE_bench"))
        .arg("--quick")
        .arg("--out")
        .arg(out.path())
        .status()
        .expect("run bench");
    assert!(status.success(), "bench --quick failed: {status}");

    let json = std::fs::read_to_string(out.path().join("results.json")).expect("results.json");
    let r: Value = serde_json::from_str(&json).expect("results.json parses");
    assert!(r["machine"]["cores"].as_u64().is_some_and(|c| c > 0));
    assert!(r["machine"]["mosquitto"].as_str().is_some_and(|m| m.contains("mosquitto version 2")));
    assert!(f(&r["ceiling"], "all_threads") > 0.0);

    // Every system at QoS 0 and 1.
    let throughput = runs(&r, "runs");
    for system in ["mosquitto", "rumqttd", "notary", "notary-signed", "sidecar"] {
        for qos in [0, 1] {
            let run = throughput
                .iter()
                .find(|x| x["system"] == system && x["qos"] == qos)
                .unwrap_or_else(|| panic!("no {system} QoS {qos} run"));
            assert!(f(run, "delivered_per_s") > 0.0, "{run}");
            assert!(f(run, "cpu_s_per_1k") > 0.0, "{run}");
            assert!(f(run, "peak_rss_mib") > 0.0, "{run}");
            let notarizes = system != "mosquitto" && system != "rumqttd";
            assert_eq!(run["notarized_per_s"].is_number(), notarizes, "{run}");
            if qos == 1 {
                // Nothing lost: delivered to our subscriber, publisher 0's
                // stream to mosquitto_sub too, and notarized.
                let messages = u(run, "messages");
                assert_eq!(u(run, "delivered"), messages, "{run}");
                let check = &run["crosscheck"];
                assert_eq!(u(check, "published"), messages / 10, "{run}");
                assert_eq!(u(check, "mosquitto_sub"), u(check, "published"), "{run}");
                assert_eq!(u(check, "ours"), u(check, "published"), "{run}");
                assert_eq!(u(run, "lost"), 0, "{run}");
                if notarizes {
                    assert_eq!(u(run, "notarized"), messages, "{run}");
                    assert_eq!(u(run, "unnotarized"), 0, "{run}");
                    assert!(f(run, "disk_bytes_per_msg") > 0.0, "{run}");
                }
            }
        }
    }

    // Signed traffic with 1 in 1,000 signatures broken: exactly those are
    // rejected, every other envelope notarized.
    let signed = runs(&r, "signed");
    let spoiled = signed.iter().find(|s| s["invalid_per_mille"] == 1).expect("a run with bad signatures");
    let messages = u(spoiled, "messages");
    assert_eq!(u(spoiled, "rejected"), messages / 1000, "{spoiled}");
    assert_eq!(u(spoiled, "notarized"), messages - messages / 1000, "{spoiled}");
    // Judged before delivered: the subscriber got every envelope but the
    // broken ones, and the harness does not count those as lost.
    assert_eq!(u(spoiled, "delivered"), messages - messages / 1000, "{spoiled}");
    assert_eq!(u(spoiled, "lost"), 0, "{spoiled}");
    assert!(signed.iter().any(|s| s["invalid_per_mille"] == 0 && u(s, "rejected") == 0));

    // Latencies were measured for each notarizing system, over both APIs.
    let latency = runs(&r, "latency");
    assert_eq!(latency.len(), 3);
    for l in latency {
        for part in ["publish_to_proof", "http", "mqtt"] {
            assert!(u(&l[part], "count") > 0, "{part} of {l}");
            assert_eq!(u(&l[part], "failed"), 0, "{part} of {l}");
            assert!(f(&l[part], "p99_ms") >= f(&l[part], "p50_ms"), "{part} of {l}");
        }
    }

    // Scaling points and the store-growth curve.
    let scaling = runs(&r, "scaling");
    assert!(scaling.iter().any(|s| s["system"] == "notary" && s["publishers"] == 100));
    assert!(scaling.iter().any(|s| s["system"] == "mosquitto" && s["payload"] == 16384));
    let store = runs(&r, "store");
    assert_eq!(store.iter().map(|p| u(p, "stored")).collect::<Vec<_>>(), [50_000, 100_000]);
    assert!(store.iter().all(|p| u(&p["proof_http"], "failed") == 0 && u(&p["proof_http"], "count") == 200));
    assert!(store.iter().all(|p| f(p, "rss_mib") > 0.0 && f(p, "disk_bytes_per_msg") > 0.0));

    // The retention phase: 100,000 messages against a horizon of 20,000;
    // pruning must have started and kept up.
    let retention = runs(&r, "retention");
    assert_eq!(retention.last().map(|p| u(p, "sent")), Some(100_000), "{retention:?}");
    assert!(u(&r, "retention_max_bytes") > 0);
    assert!(retention.last().is_some_and(|p| u(p, "pruned") > 0), "nothing was pruned: {retention:?}");

    // Each target is reported, met or not.
    assert!(runs(&r, "targets").len() >= 9);
    let md = std::fs::read_to_string(out.path().join("results.md")).expect("results.md");
    assert!(md.contains("## Targets") && md.contains("| notary | 0 |"), "{md}");
    let svg = std::fs::read_to_string(out.path().join("results.svg")).expect("results.svg");
    assert!(svg.starts_with("<svg") && svg.contains("msg/s"), "not an SVG plot");
}
