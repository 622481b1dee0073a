//! Per-topic ACLs from a Mosquitto `acl_file`: the same file and the same
//! client code against Debian's Mosquitto and our broker give the same
//! answers, and SIGHUP reloads the ACL and password files together.

use crate::support::*;
use std::path::Path;
use std::process::Command;

/// Case name, delivered, expected.
fn run_cases(port: u16) -> Vec<(String, bool, bool)> {
    conformance_script("acl_cases.py", port)
        .into_iter()
        .map(|v| {
            (v["case"].as_str().expect("case").to_owned(), v["delivered"] == true, v["expected"] == true)
        })
        .collect()
}

#[test]
fn the_same_acl_file_gives_the_same_answers_on_mosquitto_and_on_ours() {
    let acl = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/conformance/acl_file");
    let mosquitto = Mosquitto::start_with(&format!("allow_anonymous true\nacl_file {}\n", acl.display()));
    let theirs = run_cases(mosquitto.port);
    let tmp = tempfile::tempdir().expect("tmp");
    let config = fast_config(tmp.path(), &format!("[mqtt]\nacl_file = {:?}\n", acl.display().to_string()));
    let n = Notary::start_with(tmp.path(), Some(config));
    let ours = run_cases(n.mqtt);
    assert_eq!(theirs.len(), 18);
    for (name, delivered, expected) in &theirs {
        assert_eq!(delivered, expected, "Mosquitto, case {name}");
    }
    assert_eq!(ours, theirs, "our broker answers as Mosquitto does");
    // Refused publishes were never notarized; allowed ones were.
    assert_eq!(n.get(&format!("/v1/proofs/{}", blake3_hex(b"case reader-cannot-write"))).0, 404);
    n.wait_proof(b"case writer-writes");
    assert!(n.metric("mqtt_acl_denied_total") >= 7);
    assert!(n.metric("mqtt_acl_filtered_total") >= 2);
    assert_eq!(n.metric("mqtt_deliveries_dropped_total"), 0, "ACL filtering is no dropped delivery");
}

/// SIGHUP reads the password and ACL files again: a user added with
/// `mosquitto_passwd` may log in, a rule taken out of the ACL stops
/// applying; a file that does not parse leaves both as they were.
#[test]
fn sighup_reloads_the_password_and_acl_files_together() {
    let tmp = tempfile::tempdir().expect("tmp");
    let passwd = mosquitto_password_file(tmp.path(), "sensor", "pw1");
    let acl = tmp.path().join("acl");
    std::fs::write(&acl, "user sensor\ntopic write t/#\nuser other\ntopic write t/#\n").expect("write acl");
    let config = fast_config(
        tmp.path(),
        &format!(
            "[mqtt]\npassword_file = {:?}\nacl_file = {:?}\n",
            passwd.display().to_string(),
            acl.display().to_string()
        ),
    );
    let mut n = Notary::start_with(tmp.path(), Some(config));
    let as_user = |user: &str, pw: &str, topic: &str, payload: &[u8]| {
        let out = publish(n.mqtt, topic, payload, &["-u", user, "-P", pw, "-V", "mqttv5", "-d"]);
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    assert!(as_user("sensor", "pw1", "t/a", b"before").0);
    n.wait_proof(b"before");
    assert!(!as_user("other", "pw2", "t/a", b"other before").0, "not in the password file yet");

    let added = Command::new("mosquitto_passwd").arg("-b").arg(&passwd).args(["other", "pw2"]).output();
    assert!(added.expect("mosquitto_passwd").status.success());
    std::fs::write(&acl, "user sensor\ntopic write u/#\nuser other\ntopic write t/#\n").expect("write acl");
    n.signal("HUP");
    eventually("the new password file", || as_user("other", "pw2", "t/a", b"other after").0.then_some(()));
    n.wait_proof(b"other after");
    let (_, said) = as_user("sensor", "pw1", "t/a", b"refused after");
    assert!(said.contains("RC:135"), "the ACL taken out of force: {said}");
    assert_eq!(n.get(&format!("/v1/proofs/{}", blake3_hex(b"refused after"))).0, 404, "never notarized");

    // A broken file: both stay as they were, and the log says why.
    std::fs::write(&acl, "user sensor\nthis is not a rule\n").expect("write acl");
    n.signal("HUP");
    eventually("the failed reload in the log", || n.log().contains("reload failed").then_some(()));
    assert!(as_user("sensor", "pw1", "u/a", b"still the old rules").0);
    n.wait_proof(b"still the old rules");
    assert!(as_user("other", "pw2", "t/b", b"other still in").0);
    assert!(n.is_running());
}
