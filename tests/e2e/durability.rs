//! Committed before acknowledged: publishers that record every PUBACK /
//! PUBCOMP they get, a broker killed (or stopped) under their load, a
//! restart, and a proof lookup for every acknowledged message.

use crate::support::*;

/// Every payload has a committed leaf: its proof answers 200 (sealed) or
/// 202 (committed, not yet sealed), never 404.
fn assert_all_provable(n: &Notary, acked: &[String]) {
    let mut missing = Vec::new();
    for p in acked {
        let (status, _) = n.get(&format!("/v1/proofs/{}", blake3_hex(p.as_bytes())));
        if status != 200 && status != 202 {
            missing.push(p.clone());
        }
    }
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged messages lost, e.g. {:?}",
        missing.len(),
        acked.len(),
        &missing[..missing.len().min(5)]
    );
}

/// Four publishers, acknowledged messages counted, then `stop` the broker.
fn under_load(qos: u8, v5: bool, stop: impl FnOnce(&mut Notary)) {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut n = Notary::start(tmp.path());
    let pubs: Vec<_> =
        (0..4).map(|i| AckedPublisher::start(n.mqtt, &format!("q{qos}p{i}"), qos, v5, &[])).collect();
    eventually("2,000 acknowledged messages", || {
        (pubs.iter().map(|p| p.count()).sum::<usize>() >= 2_000).then_some(())
    });
    stop(&mut n);
    let acked: Vec<String> = pubs.into_iter().flat_map(|p| p.finish()).collect();
    assert!(acked.len() >= 2_000);
    n.restart();
    assert_all_provable(&n, &acked);
    eprintln!("QoS {qos}: {} acknowledged, 0 lost", acked.len());
}

#[test]
fn kill_9_under_qos1_load_loses_no_acknowledged_message() {
    under_load(1, false, |n| n.crash());
}

#[test]
fn kill_9_under_qos2_load_loses_no_acknowledged_message() {
    under_load(2, true, |n| n.crash());
}

#[test]
fn sigterm_under_qos1_load_loses_no_acknowledged_message() {
    under_load(1, true, |n| {
        let code = n.terminate();
        assert!(code == 0 || code == 3, "exit code {code}");
    });
}

#[test]
fn ack_on_receipt_acknowledges_before_the_commit() {
    // The opt-in mode for gateways: acknowledged once judged. Shown by a
    // store locked from outside: the PUBACK comes while nothing can be
    // committed, and the proof once the lock is released.
    let tmp = tempfile::tempdir().expect("tmp");
    let config = fast_config(tmp.path(), "[mqtt]\nack = \"on-receipt\"\n");
    let n = Notary::start_with(tmp.path(), Some(config));
    let conn = rusqlite::Connection::open(n.dir.join("notary.sqlite")).expect("store");
    conn.execute_batch("BEGIN IMMEDIATE").expect("take the write lock");
    let out = publish(n.mqtt, "receipt/t", b"acknowledged early", &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        n.get(&format!("/v1/proofs/{}", blake3_hex(b"acknowledged early"))).0,
        404,
        "not committed yet"
    );
    conn.execute_batch("COMMIT").expect("release");
    n.wait_proof(b"acknowledged early");
}
