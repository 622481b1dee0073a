//! Proof requests are published by any MQTT client: parsing must never
//! panic, and a digest that parses is 32 bytes from 64 hex digits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use notary_proof::request::ProofRequest;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = ProofRequest::parse(data) {
        assert!(data.len() <= notary_proof::request::MAX_REQUEST_BYTES);
        let _ = req.reply_to.map(|t| t.len());
    }
});
