//! One message, one client or one file never stops the notary, and every
//! stuck state is visible: values past i64::MAX, a message the store
//! refuses, a store held locked by another process, a sealer that cannot
//! write, SIGTERM while ingest is blocked, and damaged or missing files.
//! Faults are real: SQLite triggers, locks and schema changes made from
//! another connection to the real file, and files deleted or cut short.

use crate::support::*;
use notary_proof::envelope::{self, EnvelopeFields};
use rusqlite::Connection;
use serde_json::Value;
use std::path::Path;

/// A library-signed envelope with a chosen counter and device time.
fn envelope_at(key: &Path, id: &str, topic: &str, counter: u64, payload: &[u8]) -> Vec<u8> {
    envelope::sign(
        &signing_key(key),
        &EnvelopeFields {
            device_id: id,
            counter,
            device_time_ms: counter,
            content_type: "text/plain",
            topic,
            payload,
        },
    )
    .expect("signs")
}

/// A connection of the test's own to the notary's store.
fn store_conn(n: &Notary) -> Connection {
    let conn = Connection::open(n.dir.join("notary.sqlite")).expect("open the store");
    conn.busy_timeout(std::time::Duration::from_secs(30)).expect("busy timeout");
    conn
}

fn problems(n: &Notary) -> Option<Value> {
    let (status, body) = n.health();
    (status == 503).then(|| body["problems"].clone())
}

#[test]
fn device_counters_past_2_63_are_stored_and_nothing_wedges() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut n = Notary::start(tmp.path());
    let (key, public) = keygen(tmp.path(), "big-counter");
    n.registry(&["add", "big-counter", "--public-key", &public]);
    for counter in [1u64 << 63, u64::MAX] {
        let bytes =
            envelope_at(&key, "big-counter", "meters/big", counter, format!("at {counter}").as_bytes());
        assert!(publish(n.mqtt, "meters/big", &bytes, &[]).status.success());
        let json = n.wait_proof(&bytes);
        crate::devices::verify_device_signed(&n, &json, &bytes, "big-counter");
    }
    assert_eq!(n.devices()["devices"][0]["last_counter"], u64::MAX, "stored faithfully");
    n.notarize("plain/t", b"a plain message after them");
    assert_eq!(n.health().0, 200);
    assert_eq!(n.terminate(), 0, "SIGTERM ends the process cleanly:\n{}", n.log());

    // Read back after a restart: the counter still guards against replay.
    n.restart();
    let replay = envelope_at(&key, "big-counter", "meters/big", u64::MAX, b"replayed");
    assert!(publish(n.mqtt, "meters/big", &replay, &[]).status.success());
    let digest = blake3_hex(&replay);
    let body = eventually("the replay to be rejected", || {
        let (status, body) = n.get(&format!("/v1/proofs/{digest}"));
        (status == 422).then_some(body)
    });
    assert!(body.contains("\"replay\""), "{body}");
}

#[test]
fn a_message_the_store_refuses_is_rejected_and_the_rest_of_its_group_is_notarized() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut n = Notary::start(tmp.path());
    n.stop();
    // A real SQLite trigger refuses one payload's leaf, as a constraint
    // the store cannot meet would: a permanent error for that message.
    let poison = b"poison".to_vec();
    store_conn(&n)
        .execute_batch(&format!(
            "CREATE TRIGGER poison BEFORE INSERT ON leaves WHEN NEW.digest = X'{}'
             BEGIN SELECT RAISE(ABORT, 'refused by the test'); END;",
            blake3_hex(&poison)
        ))
        .expect("create trigger");
    n.restart();
    let lines: Vec<String> =
        ["before", "poison", "after-1", "after-2"].iter().map(|s| s.to_string()).collect();
    publish_lines(n.mqtt, "group/t", 1, &lines);
    for l in ["before", "after-1", "after-2"] {
        let json = n.wait_proof(l.as_bytes());
        let (code, _, err) = cli_verify(&json, l.as_bytes(), &n.broker_key());
        assert_eq!(code, 0, "{l}: {err}");
    }
    let body = eventually("the refused message to be answered as rejected", || {
        let (status, body) = n.get(&format!("/v1/proofs/{}", blake3_hex(&poison)));
        (status == 422).then_some(body)
    });
    assert!(body.contains("\"unstorable\""), "{body}");
    assert!(n.metric("persist_refused_total") >= 1);
    assert!(n.get("/metrics").1.contains("notary_messages_rejected_total{reason=\"unstorable\"} 1"));
    n.notarize("group/t", b"and later messages too");
    assert_eq!(n.health().0, 200, "a refused message is not a stuck state");
    assert_eq!(n.terminate(), 0, "{}", n.log());
}

#[test]
fn a_store_locked_from_outside_turns_healthz_503_until_it_is_released() {
    let tmp = tempfile::tempdir().expect("tmp");
    let config = fast_config(tmp.path(), "[ingest]\nstall_ms = 300\n");
    let n = Notary::start_with(tmp.path(), Some(config));
    let conn = store_conn(&n);
    conn.execute_batch("BEGIN IMMEDIATE").expect("take the write lock");
    // QoS 1: acknowledged only once committed, so the publisher waits.
    let port = n.mqtt;
    let publisher = std::thread::spawn(move || publish(port, "locked/t", b"while locked", &[]));
    let p = eventually("/healthz to report ingest stuck", || problems(&n));
    assert!(p["ingest"].is_string(), "{p}");
    assert!(n.get("/metrics").1.contains("notary_health_problem{part=\"ingest\"} 1"));
    assert!(!publisher.is_finished(), "acknowledged while the store could not commit");
    conn.execute_batch("COMMIT").expect("release the lock");
    let out = publisher.join().expect("publisher");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    n.wait_proof(b"while locked");
    eventually("/healthz to be ok again", || (n.health().0 == 200).then_some(()));
}

#[test]
fn sigterm_while_ingest_is_blocked_ends_within_the_deadline_and_says_so() {
    let tmp = tempfile::tempdir().expect("tmp");
    let config = fast_config(tmp.path(), "[ingest]\nstall_ms = 300\nshutdown_timeout_ms = 500\n");
    let mut n = Notary::start_with(tmp.path(), Some(config));
    let conn = store_conn(&n);
    conn.execute_batch("BEGIN IMMEDIATE").expect("take the write lock");
    // QoS 0: taken (judged) at once, its commit left to ingest.
    assert!(publish(n.mqtt, "blocked/t", b"cannot be committed", &["-q", "0"]).status.success());
    eventually("ingest to be stuck", || problems(&n));
    // Without a deadline this waits for the lock forever.
    assert_eq!(n.terminate(), 3, "exit code 3: stopped at the deadline\n{}", n.log());
    assert!(n.log().contains("stopped at the shutdown deadline"), "{}", n.log());
    conn.execute_batch("COMMIT").expect("release");
}

#[test]
fn a_sealer_that_cannot_write_turns_healthz_503_and_recovers() {
    let tmp = tempfile::tempdir().expect("tmp");
    let config = fast_config(tmp.path(), "[ingest]\nstall_ms = 300\n");
    let n = Notary::start_with(tmp.path(), Some(config));
    let conn = store_conn(&n);
    // The sealer writes every batch's log nodes here; without the table
    // each sealing attempt fails, while ingest keeps committing.
    conn.execute_batch("ALTER TABLE log_nodes RENAME TO log_nodes_away").expect("rename");
    assert!(publish(n.mqtt, "seal/t", b"unsealed", &[]).status.success());
    let p = eventually("/healthz to report the sealer", || problems(&n).filter(|p| p["sealer"].is_string()));
    assert!(p["sealer"].as_str().unwrap_or("").contains("log_nodes"), "{p}");
    assert!(n.metric("seal_failures_total") >= 1);
    assert_eq!(n.get(&format!("/v1/proofs/{}", blake3_hex(b"unsealed"))).0, 202, "committed, not sealed");
    conn.execute_batch("ALTER TABLE log_nodes_away RENAME TO log_nodes").expect("rename back");
    n.wait_proof(b"unsealed");
    eventually("/healthz to be ok again", || (n.health().0 == 200).then_some(()));
}

/// Copies a data directory (files only).
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read dir") {
        let e = e.expect("entry");
        if e.file_type().expect("type").is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).expect("copy");
        }
    }
}

#[test]
fn damaged_or_missing_files_are_refused_never_a_silent_new_log() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut n = Notary::start(tmp.path());
    for i in 0..3 {
        n.notarize("history/t", format!("history {i}").as_bytes());
    }
    n.stop();
    let original = n.dir.clone();
    let pub_key = std::fs::read_to_string(original.join("broker.pub")).expect("broker.pub");

    let case = |name: &str, damage: &dyn Fn(&Path), expect: &str| {
        let dir = tmp.path().join(name);
        copy_dir(&original, &dir);
        damage(&dir);
        let (code, log) = run_refused(&dir, &[]);
        assert_eq!(code, 4, "{name}: exit code 4 for a refused data directory\n{log}");
        assert!(log.contains(expect), "{name}: the error names {expect:?}:\n{log}");
        assert_eq!(
            std::fs::read_to_string(dir.join("broker.pub")).ok().as_deref(),
            Some(pub_key.as_str()),
            "{name}: broker.pub is left alone"
        );
        dir
    };
    let remove = |f: &'static str| move |d: &Path| std::fs::remove_file(d.join(f)).expect("remove");
    let cut = |f: &'static str| {
        move |d: &Path| {
            let p = d.join(f);
            let len = std::fs::metadata(&p).expect("size").len();
            std::fs::OpenOptions::new()
                .write(true)
                .open(&p)
                .expect("open")
                .set_len(len / 2)
                .expect("truncate");
        }
    };
    // Checkpoint the WALs away so the main files hold everything.
    for f in ["notary.sqlite", "ledger.sqlite"] {
        let c = Connection::open(original.join(f)).expect("open");
        c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())).expect("checkpoint");
    }

    let missing_store = case("no-store", &remove("notary.sqlite"), "notary.sqlite is missing");
    case("no-key", &remove("broker.key"), "broker.key is missing");
    case("no-ledger", &remove("ledger.sqlite"), "ledger.sqlite has no entries");
    case("short-store", &cut("notary.sqlite"), "truncated");
    case("short-ledger", &cut("ledger.sqlite"), "truncated");
    case(
        "garbage-store",
        &|d: &Path| std::fs::write(d.join("notary.sqlite"), vec![b'x'; 8192]).expect("write"),
        "not an SQLite database",
    );
    // A damaged page inside the ledger: SQLite's own check finds it.
    case(
        "flipped-ledger",
        &|d: &Path| {
            let p = d.join("ledger.sqlite");
            let mut bytes = std::fs::read(&p).expect("read");
            let page = usize::from(u16::from_be_bytes([bytes[16], bytes[17]]));
            // The second page's b-tree header: page type and cell count.
            for b in &mut bytes[page..page + 8] {
                *b ^= 0xA5;
            }
            std::fs::write(&p, bytes).expect("write");
        },
        "ledger.sqlite is damaged",
    );

    // The operator can say a new log is meant.
    let fresh = Notary::start_in(missing_store, &["--new-log"]);
    fresh.notarize("fresh/t", b"a new log, on purpose");
}

#[test]
fn half_open_http_connections_leave_mqtt_and_http_serving() {
    use std::io::Read as _;
    let tmp = tempfile::tempdir().expect("tmp");
    let config = fast_config(tmp.path(), "[http]\nmax_connections = 16\nheader_read_timeout_ms = 2000\n");
    let n = Notary::start_with(tmp.path(), Some(config));
    let silent: Vec<std::net::TcpStream> =
        (0..60).map(|_| std::net::TcpStream::connect(("127.0.0.1", n.http)).expect("connect")).collect();
    // MQTT is untouched, and HTTP answers again once the silent ones are
    // closed by the header-read timeout.
    n.notarize("http/t", b"served beside 60 silent HTTP clients");
    // Those past the cap were closed at once. (How many depends on how
    // fast the listener drained its backlog before the first timeouts
    // freed slots, so only that some were is asserted.)
    eventually("refused connections to be counted", || {
        (n.metric("http_connections_refused_total") >= 1).then_some(())
    });
    for mut s in silent {
        s.set_read_timeout(Some(PATIENCE)).expect("timeout");
        let mut rest = Vec::new();
        // Closed by the server: end of stream, not the read timeout.
        assert!(s.read_to_end(&mut rest).is_ok(), "every silent connection is closed by the server");
        assert!(rest.is_empty() || rest.starts_with(b"HTTP/1.1 408"), "{}", String::from_utf8_lossy(&rest));
    }
    assert_eq!(n.health().0, 200);
}

/// A small tmpfs mounted for one test, unmounted when dropped.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(at: &Path, size: &str) -> SmallDisk {
        std::fs::create_dir_all(at).expect("mount point");
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "this test mounts a small tmpfs and needs root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        SmallDisk(at.to_owned())
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the file system holding `dir` with one file, until it is full.
fn fill(dir: &Path) -> std::path::PathBuf {
    use std::io::Write as _;
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).expect("filler");
    let chunk = vec![0u8; 64 * 1024];
    while f.write_all(&chunk).is_ok() {}
    let _ = f.sync_all();
    path
}

#[test]
fn a_full_disk_turns_healthz_503_and_nothing_taken_is_lost_when_space_returns() {
    let tmp = tempfile::tempdir().expect("tmp");
    let disk = SmallDisk::mount(&tmp.path().join("small"), "32m");
    // The data directory on the small disk, the log beside it on the big one.
    std::fs::create_dir_all(disk.0.join("data")).expect("data dir");
    std::os::unix::fs::symlink(disk.0.join("data"), tmp.path().join("data")).expect("symlink");
    let config = fast_config(tmp.path(), "[ingest]\nstall_ms = 300\n");
    let n = Notary::start_with(tmp.path(), Some(config));
    n.notarize("disk/t", b"before the disk filled up");

    let filler = fill(&disk.0);
    // 6 MB in 1,500 QoS 1 messages: more than any slack left in the
    // store's files. Which write fails first (ingest's commit, sealing, the
    // ledger) depends on how the messages fall into groups, so any reported
    // problem will do.
    let publisher = AckedPublisher::start(n.mqtt, "disk", 1, false, &["--count", "1500", "--pad", "4000"]);
    let p = eventually("/healthz to report the full disk", || problems(&n));
    assert!(p.to_string().contains("full"), "{p}\n{}", n.log());
    if p["ingest"].is_string() {
        // Ingest cannot commit: acknowledgements stop with it.
        let held = publisher.count();
        assert!(held < 1500, "every message acknowledged while ingest could not commit");
    }

    std::fs::remove_file(filler).expect("free the space");
    // Acknowledgements resume, and each acknowledged message is provable.
    let acked = publisher.finish();
    assert_eq!(acked.len(), 1500, "acknowledgements resumed for every message");
    for l in &acked {
        n.wait_proof(l.as_bytes());
    }
    eventually("/healthz to be ok again", || (n.health().0 == 200).then_some(()));
    drop(n);
    drop(disk);
}

/// Bare TCP probes of the MQTT port (load balancers, port scanners, our own
/// readiness check), garbage and normal disconnects are not errors: nothing
/// is logged at ERROR, so ERROR-based alerting stays quiet.
#[test]
fn port_probes_and_normal_disconnects_log_nothing_at_error() {
    use std::io::Write as _;
    let tmp = tempfile::tempdir().expect("tmp");
    let n = Notary::start(tmp.path());
    for _ in 0..5 {
        drop(std::net::TcpStream::connect(("127.0.0.1", n.mqtt)).expect("connect"));
    }
    let mut garbage = std::net::TcpStream::connect(("127.0.0.1", n.mqtt)).expect("connect");
    garbage.write_all(b"GET / HTTP/1.1\r\n\r\n").expect("write");
    drop(garbage);
    n.notarize("probe/t", b"after the probes");
    n.notarize("probe/t", b"and a second client");
    let log = n.log();
    assert!(!log.contains(" ERROR "), "{log}");
}

/// Out of file descriptors, the listener's accept fails. rmqtt logs it and
/// waits a second before it tries again (rumqttd once retried at once and
/// wrote gigabytes of log in seconds); once descriptors are free again,
/// MQTT and HTTP serve.
#[test]
fn running_out_of_file_descriptors_floods_no_log_and_service_resumes() {
    let tmp = tempfile::tempdir().expect("tmp");
    let config = fast_config(tmp.path(), "[mqtt]\nconnection_timeout_ms = 1000\n");
    // The accept error is logged at INFO, which the default filter hides.
    let n = Notary::start_limited(tmp.path(), config, 128, &[("RUST_LOG", "warn,rmqtt::server=info")]);
    let hold: Vec<std::net::TcpStream> =
        (0..200).map(|_| std::net::TcpStream::connect(("127.0.0.1", n.mqtt)).expect("connect")).collect();
    eventually("accepts to fail for lack of descriptors", || {
        n.log().contains("TCP listener error").then_some(())
    });
    drop(hold);
    n.notarize("fds/t", b"served again");
    // One line per failed accept, one accept a second: a handful at most.
    let failures = n.log().matches("TCP listener error").count();
    assert!(
        failures <= 10,
        "{failures} accept-error lines:\n{}",
        n.log().chars().take(2000).collect::<String>()
    );
}
