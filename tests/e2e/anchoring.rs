//! Anchoring on an EVM chain, run by the broker against a real anvil node:
//! the newest checkpoint once per interval, pending → final bundles, later
//! anchors with consistency proofs, and every fault the issue names (RPC
//! outages, a send that fails after the node took it, dropped and replaced
//! transactions, a reorganization deeper than the confirmations, a wrong
//! chain or an unfunded account, a restart with an anchor in flight).
//! The only fake is the fault proxy, and only for the lost-answer case.

use crate::support::*;
use notary_proof::{EvmStatus, ProofBundle, Receipt};
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

const DEV_KEY_HEX: &str = "ac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80";

/// A test config with `[anchor.evm]`: the key in a file, fast polling.
fn evm_config(dir: &Path, rpc_url: &str, chain_id: u64, key_hex: &str, extra: &str) -> PathBuf {
    let key = dir.join("evm.key");
    std::fs::write(&key, format!("{key_hex}\n")).expect("write key");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }
    fast_config(
        dir,
        &format!(
            "[anchor.evm]\nrpc_url = \"{rpc_url}\"\nchain_id = {chain_id}\nprivate_key_file = {:?}\n\
             poll_interval_ms = 100\nmax_retry_ms = 500\n{extra}",
            key.display().to_string()
        ),
    )
}

fn start(dir: &Path, rpc_url: &str, extra: &str) -> Notary {
    let cfg = evm_config(dir, rpc_url, 31337, DEV_KEY_HEX, extra);
    Notary::start_with(dir, Some(cfg))
}

/// Publishes and waits until the message is sealed, so that each message
/// gets its own batch and checkpoint.
fn notarize(n: &Notary, payload: &str) -> ProofBundle {
    assert!(publish(n.mqtt, "t/anchor", payload.as_bytes(), &[]).status.success());
    bundle(n, payload)
}

fn bundle(n: &Notary, payload: &str) -> ProofBundle {
    serde_json::from_str::<Vec<ProofBundle>>(&n.wait_proof(payload.as_bytes())).expect("bundles").remove(0)
}

/// The bundle's EVM receipt: its own, or that of a later checkpoint.
fn evm(b: &ProofBundle) -> Option<&Receipt> {
    b.receipts
        .iter()
        .chain(b.later_anchors.iter().flat_map(|a| &a.receipts))
        .find(|r| matches!(r, Receipt::Evm { .. }))
}

fn status(b: &ProofBundle) -> Option<EvmStatus> {
    match evm(b) {
        Some(Receipt::Evm { status, .. }) => Some(*status),
        _ => None,
    }
}

fn tx_of(b: &ProofBundle) -> String {
    match evm(b) {
        Some(Receipt::Evm { tx_hash, .. }) => format!("0x{}", hex::encode(tx_hash)),
        _ => panic!("no EVM receipt in {}", b.to_json()),
    }
}

fn block_of(b: &ProofBundle) -> [u8; 32] {
    match evm(b) {
        Some(Receipt::Evm { block_hash, .. }) => *block_hash,
        _ => panic!("no EVM receipt"),
    }
}

/// Waits until the message's bundle carries a final EVM receipt.
fn wait_final(n: &Notary, payload: &str) -> ProofBundle {
    eventually("a final EVM anchor", || {
        let b = bundle(n, payload);
        (status(&b) == Some(EvmStatus::Final)).then_some(b)
    })
}

/// Like [`wait_final`], mining a block whenever the anchor is pending.
pub(crate) fn wait_final_mining(n: &Notary, anvil: &Anvil, payload: &str) -> ProofBundle {
    eventually("a final EVM anchor", || {
        let b = bundle(n, payload);
        match status(&b) {
            Some(EvmStatus::Final) => Some(b),
            Some(EvmStatus::Pending) => {
                anvil.mine(1);
                None
            }
            None => None,
        }
    })
}

/// The anchoring transactions on the canonical chain: every one commits a
/// different checkpoint (none is anchored twice). Returns their hashes.
fn anchoring_transactions(anvil: &Anvil) -> Vec<String> {
    let txs: Vec<_> = anvil
        .transactions_from_dev_account()
        .into_iter()
        .filter(|(_, _, input)| input.starts_with("4d4e4131"))
        .collect();
    let mut inputs: Vec<_> = txs.iter().map(|(_, _, i)| i.clone()).collect();
    inputs.sort();
    inputs.dedup();
    assert_eq!(inputs.len(), txs.len(), "a checkpoint was anchored twice: {txs:?}");
    txs.into_iter().map(|(h, _, _)| h).collect()
}

#[test]
fn the_newest_checkpoint_is_anchored_once_per_interval_and_bundles_go_from_pending_to_final() {
    let tmp = tempfile::tempdir().expect("tmp");
    let anvil = Anvil::start();
    // The default interval (one hour) and two confirmations.
    let mut n = start(tmp.path(), &anvil.url, "confirmations = 2\n");
    let key = n.broker_key();

    // The first checkpoint is anchored at once. anvil mines the transaction
    // into one block: one confirmation of two, so the receipt is pending.
    assert!(publish(n.mqtt, "t/anchor", b"A", &[]).status.success());
    let a = eventually("A's own EVM receipt", || {
        let b = bundle(&n, "A");
        (status(&b) == Some(EvmStatus::Pending)).then_some(b)
    });
    assert!(a.later_anchors.is_empty() && a.pending_ledgers.is_empty());
    let stored = tmp.path().join("a.json");
    std::fs::write(&stored, a.to_json()).expect("store bundle");
    let (code, out, err) = cli_verify_file(&stored, b"A", &key, &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("(pending when served)") && out.contains("on chain:    unchecked"), "{out}");

    // Later checkpoints within the hour are not anchored: their bundles say
    // the EVM ledger is pending, whatever the message rate.
    let later: Vec<String> = (0..10).map(|i| format!("B{i}")).collect();
    for p in &later {
        let b = notarize(&n, p);
        assert_eq!(b.pending_ledgers, vec!["evm".to_string()], "{}", b.to_json());
        assert!(evm(&b).is_none());
    }

    // One more block: A's anchor is final, and `verify --upgrade` turns the
    // stored pending bundle into the final one.
    anvil.mine(1);
    wait_final(&n, "A");
    let url = format!("http://127.0.0.1:{}", n.http);
    let (code, out, err) = cli_verify_file(
        &stored,
        b"A",
        &key,
        &["--upgrade", &url, "--rpc", &anvil.url, "--evm-from", ANVIL_ADDRESS, "--confirmations", "2"],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("upgraded:") && out.contains("(final when served)"), "{out}");
    assert!(out.contains("on chain:    confirmed, 2 confirmations"), "{out}");
    let upgraded: ProofBundle =
        serde_json::from_str(&std::fs::read_to_string(&stored).expect("read")).expect("bundle");
    assert_eq!(status(&upgraded), Some(EvmStatus::Final));
    assert_eq!(upgraded.leaf, a.leaf);

    // Eleven checkpoints, one transaction.
    assert_eq!(n.metric("evm_anchors_signed_total"), 1);
    assert_eq!(anchoring_transactions(&anvil).len(), 1);

    // With a short interval after a restart, the newest checkpoint is
    // anchored; B0's bundle then carries the consistency proof to it.
    n.stop();
    let cfg =
        evm_config(tmp.path(), &anvil.url, 31337, DEV_KEY_HEX, "confirmations = 2\nanchor_interval_ms = 1\n");
    n.config = Some(cfg);
    n.restart();
    let b0 = wait_final_mining(&n, &anvil, "B0");
    assert!(b0.pending_ledgers.is_empty());
    let anchor = &b0.later_anchors[0];
    assert!(!anchor.consistency.is_empty());
    let path = tmp.path().join("b0.json");
    std::fs::write(&path, b0.to_json()).expect("write");
    let (code, out, err) = cli_verify_file(
        &path,
        b"B0",
        &key,
        &["--rpc", &anvil.url, "--evm-from", ANVIL_ADDRESS, "--confirmations", "2"],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("proven consistent with size") && out.contains("confirmed,"), "{out}");

    // A flipped bit in the consistency proof fails closed.
    let mut forged = b0.clone();
    forged.later_anchors[0].consistency[0][0] ^= 1;
    std::fs::write(&path, forged.to_json()).expect("write");
    let (code, _, err) = cli_verify_file(&path, b"B0", &key, &[]);
    assert_eq!(code, 1);
    assert!(err.contains("[bad-consistency]"), "{err}");

    assert_eq!(anchoring_transactions(&anvil).len(), 2);
}

#[test]
fn an_rpc_outage_at_start_and_mid_run_delays_the_anchor_and_loses_nothing() {
    let tmp = tempfile::tempdir().expect("tmp");
    let port = free_port();
    let n =
        start(tmp.path(), &format!("http://127.0.0.1:{port}"), "confirmations = 1\nanchor_interval_ms = 1\n");

    // No chain yet: ingest and the local ledger carry on.
    let first: Vec<String> = (0..3).map(|i| format!("before the chain {i}")).collect();
    for p in &first {
        let b = notarize(&n, p);
        assert!(matches!(b.receipts[0], Receipt::Local { .. }));
        assert_eq!(b.pending_ledgers, vec!["evm".to_string()]);
    }
    eventually("RPC errors to be counted", || (n.metric("evm_rpc_errors_total") > 0).then_some(()));

    // The chain comes up: the newest checkpoint is anchored and covers all.
    let mut anvil = Anvil::start_with(port, &[]);
    for p in &first {
        wait_final(&n, p);
    }

    // Down mid-run, then back with the same chain.
    anvil.stop();
    let errors = n.metric("evm_rpc_errors_total");
    let second: Vec<String> = (0..3).map(|i| format!("during the outage {i}")).collect();
    for p in &second {
        let b = notarize(&n, p);
        assert_eq!(b.pending_ledgers, vec!["evm".to_string()], "no anchor can cover it yet");
    }
    eventually("more RPC errors", || (n.metric("evm_rpc_errors_total") > errors).then_some(()));
    anvil.restart();
    for p in first.iter().chain(&second) {
        wait_final(&n, p);
    }

    let txs = anchoring_transactions(&anvil);
    assert_eq!(txs.len() as u64, n.metric("evm_anchors_signed_total"), "every signed anchor landed once");
    assert_eq!(n.metric("evm_abandoned_total"), 0);
    let b = bundle(&n, &second[0]);
    let path = tmp.path().join("b.json");
    std::fs::write(&path, b.to_json()).expect("write");
    let (code, _, err) =
        cli_verify_file(&path, second[0].as_bytes(), &n.broker_key(), &["--rpc", &anvil.url]);
    assert_eq!(code, 0, "{err}");
}

/// A JSON-RPC proxy in front of anvil that passes every call through but
/// drops the connection, unanswered, after anvil has taken the first
/// `eth_sendRawTransaction`: a send that failed but persisted.
struct LostAnswerProxy {
    url: String,
    sends: Arc<AtomicUsize>,
}

impl LostAnswerProxy {
    fn start(upstream: &str) -> LostAnswerProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let sends = Arc::new(AtomicUsize::new(0));
        let (upstream, counter) = (upstream.to_owned(), sends.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (upstream, counter) = (upstream.clone(), counter.clone());
                std::thread::spawn(move || Self::serve(stream, &upstream, &counter));
            }
        });
        LostAnswerProxy { url, sends }
    }

    fn serve(stream: TcpStream, upstream: &str, sends: &AtomicUsize) -> Option<()> {
        let mut reader = BufReader::new(stream.try_clone().ok()?);
        let mut out = stream;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).ok()? == 0 {
                return None;
            }
            let mut length = 0usize;
            loop {
                let mut header = String::new();
                reader.read_line(&mut header).ok()?;
                let header = header.trim_end();
                if header.is_empty() {
                    break;
                }
                if let Some((name, value)) = header.split_once(':') {
                    if name.eq_ignore_ascii_case("content-length") {
                        length = value.trim().parse().ok()?;
                    }
                }
            }
            let mut body = vec![0u8; length];
            reader.read_exact(&mut body).ok()?;
            let body = String::from_utf8(body).ok()?;
            let answer = ureq::post(upstream)
                .set("content-type", "application/json")
                .send_string(&body)
                .ok()?
                .into_string()
                .ok()?;
            if body.contains("eth_sendRawTransaction") && sends.fetch_add(1, Ordering::SeqCst) == 0 {
                return None; // anvil has it; the broker never hears back
            }
            write!(
                out,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{answer}",
                answer.len()
            )
            .ok()?;
        }
    }
}

#[test]
fn a_send_that_fails_after_the_node_took_it_is_recovered_not_repeated() {
    let tmp = tempfile::tempdir().expect("tmp");
    let anvil = Anvil::start();
    let proxy = LostAnswerProxy::start(&anvil.url);
    let n = start(tmp.path(), &proxy.url, "confirmations = 1\n");
    assert!(publish(n.mqtt, "t/anchor", b"lost answer", &[]).status.success());
    let b = wait_final(&n, "lost answer");
    assert!(proxy.sends.load(Ordering::SeqCst) >= 1);
    assert!(n.metric("evm_rpc_errors_total") >= 1, "the lost answer was an error to the broker");
    let txs = anchoring_transactions(&anvil);
    assert_eq!(txs, vec![tx_of(&b)], "one transaction, and the receipt is its");
    assert_eq!(n.metric("evm_anchors_signed_total"), 1);
    assert_eq!(n.metric("evm_abandoned_total"), 0);
}

#[test]
fn dropped_and_replaced_transactions_are_sent_again_or_reanchored_and_recorded() {
    let tmp = tempfile::tempdir().expect("tmp");
    let anvil = Anvil::start_with(free_port(), &["--no-mining"]);
    let n = start(tmp.path(), &anvil.url, "confirmations = 1\nanchor_interval_ms = 1\n");

    // Dropped from the pool: the same transaction is sent again.
    assert!(publish(n.mqtt, "t/anchor", b"dropped", &[]).status.success());
    let h1 = eventually("the anchor in the pool", || anvil.pool().pop());
    anvil.rpc("anvil_dropTransaction", serde_json::json!([h1]));
    eventually("the same transaction sent again", || {
        (n.metric("evm_rebroadcasts_total") >= 1 && anvil.pool() == vec![h1.clone()]).then_some(())
    });
    anvil.mine(1);
    assert_eq!(tx_of(&wait_final(&n, "dropped")), h1);

    // Replaced: another transaction of the account takes its nonce.
    assert!(publish(n.mqtt, "t/anchor", b"replaced", &[]).status.success());
    let h2 = eventually("the second anchor in the pool", || anvil.pool().pop());
    let nonce = anvil.rpc("eth_getTransactionByHash", serde_json::json!([h2]))["nonce"].clone();
    anvil.rpc(
        "eth_sendTransaction",
        serde_json::json!([{
            "from": ANVIL_ADDRESS, "to": ANVIL_ADDRESS, "nonce": nonce,
            "maxFeePerGas": "0xe8d4a51000", "maxPriorityFeePerGas": "0x174876e800"
        }]),
    );
    anvil.mine(1);
    let b = eventually("a new anchor for the replaced one", || {
        let b = bundle(&n, "replaced");
        match status(&b) {
            Some(EvmStatus::Final) => Some(b),
            _ => {
                if !anvil.pool().is_empty() {
                    anvil.mine(1);
                }
                None
            }
        }
    });
    assert_ne!(tx_of(&b), h2);
    assert!(n.metric("evm_abandoned_total") >= 1);
    let store = notary_plugin::store::Store::open(&n.dir).expect("store");
    let rows = store.evm_all().expect("rows");
    let gone = rows.iter().find(|r| format!("0x{}", hex::encode(r.tx_hash)) == h2).expect("recorded");
    assert_eq!(gone.state, notary_plugin::store::EvmAnchorState::Abandoned);
    assert!(gone.outcome.is_some(), "the reason is recorded");
    anchoring_transactions(&anvil);
}

#[test]
fn a_reorg_deeper_than_the_confirmations_is_detected_and_the_anchor_restored() {
    let tmp = tempfile::tempdir().expect("tmp");
    let anvil = Anvil::start();
    anvil.mine(5);
    let n = start(tmp.path(), &anvil.url, "confirmations = 2\n");
    assert!(publish(n.mqtt, "t/anchor", b"reorged", &[]).status.success());
    let before = wait_final_mining(&n, &anvil, "reorged");

    // Replace every block from the anchor's on with others: a reorganization
    // deeper than the two confirmations.
    let Some(Receipt::Evm { block_number, .. }) = evm(&before) else { panic!("EVM receipt") };
    anvil.mine(1);
    let depth = anvil.head() - block_number + 1;
    assert!(depth > 2);
    anvil.rpc("anvil_reorg", serde_json::json!([depth, []]));
    let after = eventually("the anchor restored in another block", || {
        let b = bundle(&n, "reorged");
        match status(&b) {
            Some(EvmStatus::Final) if block_of(&b) != block_of(&before) => Some(b),
            _ => {
                anvil.mine(1);
                None
            }
        }
    });
    assert!(n.metric("evm_reorgs_total") >= 1, "recorded");
    assert_eq!(tx_of(&after), tx_of(&before), "the same signed transaction, mined again");
    assert_eq!(anchoring_transactions(&anvil), vec![tx_of(&after)]);

    let key = n.broker_key();
    let path = tmp.path().join("old.json");
    std::fs::write(&path, before.to_json()).expect("write");
    let (code, _, err) = cli_verify_file(&path, b"reorged", &key, &["--rpc", &anvil.url]);
    assert_eq!(code, 1, "the old receipt names a block that is gone");
    assert!(err.contains("[evm-receipt]"), "{err}");
    std::fs::write(&path, after.to_json()).expect("write");
    let (code, _, err) =
        cli_verify_file(&path, b"reorged", &key, &["--rpc", &anvil.url, "--confirmations", "2"]);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn a_wrong_chain_or_an_unfunded_account_is_a_clear_error_and_ingest_goes_on() {
    let anvil = Anvil::start();
    for (chain_id, key, expect) in [
        (31338, DEV_KEY_HEX.to_owned(), "configured is 31338"),
        (31337, "11".repeat(32), "insufficient funds"),
    ] {
        let tmp = tempfile::tempdir().expect("tmp");
        let cfg = evm_config(tmp.path(), &anvil.url, chain_id, &key, "confirmations = 1\n");
        let n = Notary::start_with(tmp.path(), Some(cfg));
        let payload = format!("ingest goes on {chain_id} {}", &key[..2]);
        let b = notarize(&n, &payload);
        assert!(matches!(b.receipts[0], Receipt::Local { .. }));
        eventually("the error in logs and metrics", || {
            (n.metric("evm_config_errors_total") >= 1 && n.log().to_lowercase().contains(expect))
                .then_some(())
        });
        assert!(!n.log().contains(&key), "the private key never reaches the log");
        let b = notarize(&n, &format!("{payload} again"));
        assert_eq!(b.pending_ledgers, vec!["evm".to_string()]);
    }
    assert!(anchoring_transactions(&anvil).is_empty());
}

#[test]
fn an_anchor_in_flight_resumes_after_a_broker_restart() {
    let tmp = tempfile::tempdir().expect("tmp");
    let anvil = Anvil::start_with(free_port(), &["--no-mining"]);
    let mut n = start(tmp.path(), &anvil.url, "confirmations = 1\n");
    assert!(publish(n.mqtt, "t/anchor", b"in flight", &[]).status.success());
    let h = eventually("the anchor in the pool", || anvil.pool().pop());
    n.stop();
    n.restart();
    anvil.mine(1);
    let b = wait_final(&n, "in flight");
    assert_eq!(tx_of(&b), h, "the same transaction, followed after the restart");
    assert_eq!(n.metric("evm_anchors_signed_total"), 0, "nothing new was signed");
    assert_eq!(anchoring_transactions(&anvil), vec![h]);
}
