//! The command line: verify against the checked-in vectors, exit codes,
//! generate-config.

use crate::support::*;
use serde_json::Value;
use std::process::Command;

#[test]
fn verify_agrees_with_every_test_vector() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/vectors/bundles.json"))
        .expect("vectors");
    let file: Value = serde_json::from_str(&text).expect("JSON");
    let dir = tempfile::tempdir().expect("tmp");
    let key = dir.path().join("broker.pub");
    std::fs::write(&key, file["broker_key"].as_str().expect("key")).expect("write");
    for c in file["cases"].as_array().expect("cases") {
        let name = c["name"].as_str().expect("name");
        let expect = c["expect"].as_str().expect("expect");
        let payload = hex::decode(c["payload_hex"].as_str().expect("hex")).expect("hex");
        let (code, out, err) = cli_verify(c["bundle_json"].as_str().expect("bundle"), &payload, &key);
        if expect == "valid" {
            assert_eq!(code, 0, "{name}: {err}");
            assert!(out.starts_with("valid:"), "{name}: {out}");
        } else {
            assert_eq!(code, 1, "{name}: expected invalid, got {code}: {out}{err}");
            assert!(err.contains(&format!("[{expect}]")), "{name}: expected {expect}: {err}");
        }
    }
}

#[test]
fn usage_and_io_errors_exit_2() {
    let out = Command::new(BIN).arg("verify").output().expect("run");
    assert_eq!(code(out.status), 2, "missing arguments");
    let out = Command::new(BIN)
        .args([
            "verify",
            "--bundle",
            "/nonexistent/b.json",
            "--payload",
            "/nonexistent/p",
            "--broker-key",
            "/nonexistent/k",
        ])
        .output()
        .expect("run");
    assert_eq!(code(out.status), 2, "unreadable files");
    let out = Command::new(BIN).arg("frobnicate").output().expect("run");
    assert_eq!(code(out.status), 2, "unknown command");
    let dir = tempfile::tempdir().expect("tmp");
    let (code, _) = ledger_verify(dir.path());
    assert_eq!(code, 2, "no ledger, no key");
}

#[test]
fn generate_config_prints_the_documented_file() {
    let out = Command::new(BIN).arg("generate-config").output().expect("run");
    assert!(out.status.success());
    let shipped = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../config/mqtt-notary.toml"))
        .expect("config file");
    assert_eq!(String::from_utf8(out.stdout).expect("UTF-8"), shipped);
}

#[test]
fn a_bad_config_is_refused_with_exit_2() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[log]\nmax_batch_age = 5\n").expect("write");
    let out = Command::new(BIN).args(["run", "--config"]).arg(&path).output().expect("run");
    assert_eq!(code(out.status), 2);
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_batch_age"), "names the bad field");
}

#[test]
fn a_tampered_ledger_fails_ledger_verify() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut notary = Notary::start(tmp.path());
    for i in 0..3 {
        let p = format!("ledger entry {i}");
        assert!(publish(notary.mqtt, "l", p.as_bytes(), &[]).status.success());
        notary.wait_proof(p.as_bytes());
    }
    notary.stop();
    let (code, out) = ledger_verify(&notary.dir);
    assert_eq!(code, 0, "{out}");
    let db = rusqlite::Connection::open(notary.dir.join("ledger.sqlite")).expect("ledger");
    db.execute("UPDATE ledger_entries SET anchored_at_ms = anchored_at_ms + 1 WHERE idx = 1", [])
        .expect("tamper");
    drop(db);
    let (code, out) = ledger_verify(&notary.dir);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("entry 1"), "{out}");

    // Every entry carries the head the broker signed when it appended it;
    // a head moved to another entry is caught.
    let db = rusqlite::Connection::open(notary.dir.join("ledger.sqlite")).expect("ledger");
    db.execute("UPDATE ledger_entries SET anchored_at_ms = anchored_at_ms - 1 WHERE idx = 1", [])
        .expect("restore");
    let (code, out) = ledger_verify(&notary.dir);
    assert_eq!(code, 0, "{out}");
    let entries: u64 = db.query_row("SELECT COUNT(*) FROM ledger_entries", [], |r| r.get(0)).expect("count");
    assert!(out.contains(&format!("{entries} ledger entries ({entries} with a signed head)")), "{out}");
    db.execute(
        "UPDATE ledger_entries SET head = (SELECT head FROM ledger_entries WHERE idx = 0) WHERE idx = 1",
        [],
    )
    .expect("tamper");
    drop(db);
    let (code, out) = ledger_verify(&notary.dir);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("entry 1: signed head names another entry"), "{out}");
}
