//! Proof bundles come from brokers and files the verifier does not trust:
//! verification must fail cleanly, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use notary_proof::{verify_bundle_json, NoteSigner};

fuzz_target!(|data: &[u8]| {
    let Ok(signer) = NoteSigner::new("example.com/fuzz", [0x42; 32]) else { return };
    let split = data.len() / 2;
    let _ = verify_bundle_json(&data[..split], &data[split..], &signer.verifier());
});
