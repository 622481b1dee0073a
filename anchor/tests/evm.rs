//! The EVM anchor against a real dev chain: the anvil binary (npm package
//! `@foundry-rs/anvil`, installed by `scripts/test`), started on a free port.
//! Set `ANVIL` to its path, or have `anvil` on PATH.

use notary_anchor::evm::{check_on_chain, EvmClient, EvmError, EvmSettings, OnChainError, TxState};
use notary_proof::Receipt;
use std::io::{BufRead as _, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// anvil's first dev account, funded with 10,000 ETH on every fresh chain.
const DEV_KEY: &str = "ac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80";
const TIMEOUT: Duration = Duration::from_secs(10);

struct Anvil {
    child: Child,
    url: String,
}

impl Anvil {
    /// anvil on a port the kernel picks (`--port 0`): it prints the address
    /// it listens on, so no other test can take the port in between.
    fn start() -> Anvil {
        let bin = std::env::var("ANVIL").unwrap_or_else(|_| "anvil".into());
        let mut child = Command::new(&bin)
            .args(["--port", "0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin} ({e}); run scripts/test, which installs it"));
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(stdout).lines();
        let addr = loop {
            match lines.next() {
                Some(Ok(line)) => {
                    if let Some(addr) = line.trim().strip_prefix("Listening on ") {
                        break addr.to_owned();
                    }
                }
                _ => panic!("anvil exited before listening: {:?}", child.wait()),
            }
        };
        // Keep reading, so anvil never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        Anvil { child, url: format!("http://{addr}") }
    }

    /// A client once the node answers.
    fn client(&self, key: &str, chain_id: Option<u64>) -> EvmClient {
        let start = Instant::now();
        loop {
            match EvmClient::connect(&settings(&self.url, key, chain_id)) {
                Ok(c) => return c,
                Err(EvmError::Rpc(_)) if start.elapsed() < Duration::from_secs(60) => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => panic!("anvil did not come up: {e}"),
            }
        }
    }
}

impl Drop for Anvil {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn settings(url: &str, key: &str, chain_id: Option<u64>) -> EvmSettings {
    let mut private_key = [0u8; 32];
    hex::decode_to_slice(key, &mut private_key).expect("hex key");
    EvmSettings { rpc_url: url.into(), private_key, to: None, chain_id, confirmations: 1, timeout: TIMEOUT }
}

/// Sends and waits until mined (anvil mines each transaction at once).
fn anchor(client: &EvmClient, note: &str) -> (u64, Receipt) {
    let (confirmations, _, receipt) = anchor_with_gas(client, note);
    (confirmations, receipt)
}

fn anchor_with_gas(client: &EvmClient, note: &str) -> (u64, u64, Receipt) {
    let tx = client.submit(note).expect("submitted");
    let start = Instant::now();
    loop {
        match client.state(&tx, note).expect("state") {
            TxState::Mined { confirmations, gas_used, receipt } => return (confirmations, gas_used, receipt),
            TxState::Unmined | TxState::Unknown if start.elapsed() < Duration::from_secs(60) => {
                std::thread::sleep(Duration::from_millis(20))
            }
            other => panic!("not mined: {other:?}"),
        }
    }
}

#[test]
fn an_anchoring_transaction_is_checked_on_chain_with_nothing_but_rpc() {
    let anvil = Anvil::start();
    let client = anvil.client(DEV_KEY, Some(31337));
    let note = "example.com/log\n1\nAAAA\n\n— example.com/log sig\n";
    let (confirmations, gas, receipt) = anchor_with_gas(&client, note);
    assert_eq!(confirmations, 1);
    // A plain transaction with 36 bytes of calldata: the 21,000 base plus
    // calldata, nothing else (printed for the cost estimate in the docs).
    assert!((21_000..23_000).contains(&gas), "gas {gas}");
    println!("gas per anchor: {gas}");
    let broker_key = notary_proof::NoteSigner::new("example.com/log", [1; 32]).expect("key").verifier();
    receipt.check(note, &broker_key).expect("binds the note");
    let check =
        |r: &Receipt, from: Option<[u8; 20]>, min: u64| check_on_chain(&anvil.url, r, from, min, TIMEOUT);
    assert_eq!(check(&receipt, Some(client.from()), 1), Ok(1));
    assert_eq!(check(&receipt, None, 3), Err(OnChainError::TooFewConfirmations { actual: 1, required: 3 }));
    // Two more blocks deepen it.
    anchor(&client, "another checkpoint");
    anchor(&client, "and another");
    assert_eq!(check(&receipt, Some(client.from()), 3), Ok(3));

    let edit = |f: &dyn Fn(&mut Receipt)| {
        let mut r = receipt.clone();
        f(&mut r);
        r
    };
    let Receipt::Evm { .. } = receipt else { panic!("an EVM receipt") };
    let other_checkpoint = edit(&|r| {
        if let Receipt::Evm { checkpoint_hash, .. } = r {
            checkpoint_hash[0] ^= 1;
        }
    });
    assert_eq!(check(&other_checkpoint, None, 1), Err(OnChainError::WrongCommitment));
    let other_to = edit(&|r| {
        if let Receipt::Evm { to, .. } = r {
            to[19] ^= 1;
        }
    });
    assert_eq!(check(&other_to, None, 1), Err(OnChainError::WrongCommitment));
    let claimed_from = edit(&|r| {
        if let Receipt::Evm { from, .. } = r {
            from[0] ^= 1;
        }
    });
    assert!(matches!(check(&claimed_from, None, 1), Err(OnChainError::WrongSender { .. })));
    assert!(matches!(check(&receipt, Some([7; 20]), 1), Err(OnChainError::WrongSender { .. })));
    let unknown_tx = edit(&|r| {
        if let Receipt::Evm { tx_hash, .. } = r {
            tx_hash[0] ^= 1;
        }
    });
    assert_eq!(check(&unknown_tx, None, 1), Err(OnChainError::NotFound));
    let other_block = edit(&|r| {
        if let Receipt::Evm { block_hash, .. } = r {
            block_hash[0] ^= 1;
        }
    });
    assert_eq!(check(&other_block, None, 1), Err(OnChainError::NotCanonical));
    let other_chain = edit(&|r| {
        if let Receipt::Evm { chain_id, .. } = r {
            *chain_id = 1;
        }
    });
    assert_eq!(check(&other_chain, None, 1), Err(OnChainError::WrongChain { expected: 1, actual: 31337 }));
    let local = Receipt::local(
        &notary_proof::LocalEntry {
            index: 0,
            prev_hash: [0; 32],
            checkpoint_hash: [0; 32],
            anchored_at_ms: 0,
        },
        None,
    );
    assert_eq!(check(&local, None, 1), Err(OnChainError::NotEvm));
}

#[test]
fn misconfiguration_is_a_clear_error_not_a_retry() {
    let anvil = Anvil::start();
    anvil.client(DEV_KEY, None);
    match EvmClient::connect(&settings(&anvil.url, DEV_KEY, Some(1))) {
        Err(EvmError::Config(m)) => assert!(m.contains("31337"), "{m}"),
        other => panic!("wrong chain accepted: {:?}", other.err()),
    }
    let unfunded = anvil.client(&"11".repeat(32), Some(31337));
    match unfunded.submit("a checkpoint") {
        Err(EvmError::Config(m)) => assert!(m.to_lowercase().contains("insufficient funds"), "{m}"),
        other => panic!("an unfunded account must be a configuration error: {other:?}"),
    }
}

#[test]
fn an_unreachable_endpoint_is_transient() {
    let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
    match EvmClient::connect(&settings(&format!("http://127.0.0.1:{port}"), DEV_KEY, None)) {
        Err(EvmError::Rpc(_)) => {}
        other => panic!("expected a transient error, got {:?}", other.err()),
    }
    let receipt = Receipt::Evm {
        status: notary_proof::EvmStatus::Final,
        chain_id: 31337,
        tx_hash: [1; 32],
        block_number: 1,
        block_hash: [2; 32],
        from: [3; 20],
        to: [3; 20],
        checkpoint_hash: [4; 32],
    };
    let url = format!("http://127.0.0.1:{port}");
    assert!(matches!(check_on_chain(&url, &receipt, None, 1, TIMEOUT), Err(OnChainError::Unreachable(_))));
}
