//! `mqtt-notary verify --rpc`: EVM receipts checked on a real anvil chain.
//! (The broker does not schedule EVM anchors yet; the test anchors the
//! bundle's checkpoint itself with the same client.)

use crate::support::*;
use notary_anchor::evm::TxState;
use notary_proof::{ProofBundle, Receipt};

fn verify(
    bundle: &ProofBundle,
    payload: &[u8],
    key: &std::path::Path,
    extra: &[&str],
) -> (i32, String, String) {
    cli_verify_with(&serde_json::to_string(bundle).expect("json"), payload, key, extra)
}

#[test]
fn verify_checks_evm_receipts_on_chain_only_when_given_an_rpc_endpoint() {
    let tmp = tempfile::tempdir().expect("tmp");
    let n = Notary::start(tmp.path());
    let anvil = Anvil::start();
    let client = anvil.client();
    assert!(publish(n.mqtt, "t/evm", b"anchored on chain", &[]).status.success());
    let mut bundle: ProofBundle =
        serde_json::from_str::<Vec<ProofBundle>>(&n.wait_proof(b"anchored on chain"))
            .expect("bundles")
            .remove(0);

    let tx = client.submit(&bundle.checkpoint).expect("submitted");
    let receipt = eventually("the anchor to be mined", || match client.state(&tx, &bundle.checkpoint) {
        Ok(TxState::Mined { receipt, .. }) => Some(receipt),
        _ => None,
    });
    bundle.receipts.push(receipt.clone());
    let from = format!("0x{}", hex::encode(client.from()));
    let payload = b"anchored on chain";
    let key = n.broker_key();

    let (code, out, err) = verify(&bundle, payload, &key, &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("on chain:    unchecked"), "{out}");

    let (code, out, err) = verify(&bundle, payload, &key, &["--rpc", &anvil.url, "--evm-from", &from]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("on chain:    confirmed, 1 confirmations"), "{out}");

    let other = format!("0x{}", "11".repeat(20));
    let (code, _, err) = verify(&bundle, payload, &key, &["--rpc", &anvil.url, "--evm-from", &other]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("[evm-receipt]"), "{err}");
    let (code, _, err) = verify(&bundle, payload, &key, &["--rpc", &anvil.url, "--confirmations", "5"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("5 required"), "{err}");

    // A receipt for another checkpoint fails offline already.
    let mut forged = bundle.clone();
    if let Some(Receipt::Evm { checkpoint_hash, .. }) = forged.receipts.last_mut() {
        checkpoint_hash[0] ^= 1;
    }
    let (code, _, err) = verify(&forged, payload, &key, &[]);
    assert_eq!(code, 1);
    assert!(err.contains("[receipt-mismatch]"), "{err}");

    // An endpoint that cannot answer is an error, not a verdict.
    drop(anvil);
    let (code, _, err) =
        verify(&bundle, payload, &key, &["--rpc", &format!("http://127.0.0.1:{}", free_port())]);
    assert_eq!(code, 2, "{err}");
}
