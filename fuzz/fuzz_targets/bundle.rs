//! Proof bundles come from brokers and files the verifier does not trust:
//! verification must fail cleanly, never panic. The input is the bundle's
//! JSON, a NUL byte, then the payload; the broker key is the one of
//! tests/vectors/bundles.json, so the seed corpus reaches every step.
#![no_main]

use libfuzzer_sys::fuzz_target;
use notary_proof::{verify_bundle_json, NoteSigner};

fuzz_target!(|data: &[u8]| {
    let (json, payload) = match data.iter().position(|&b| b == 0) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    let signer = NoteSigner::new("example.com/notary-vectors", [0x42; 32]).expect("valid name");
    let _ = verify_bundle_json(json, payload, &signer.verifier());
});
