//! Signed notes (checkpoints and ledger heads) arrive over MQTT, HTTP and in
//! bundles: parsing must never panic, and a note that verifies must be in
//! its one canonical form.
#![no_main]

use libfuzzer_sys::fuzz_target;
use notary_proof::receipt::LedgerHead;
use notary_proof::{Checkpoint, NoteSigner};

fuzz_target!(|data: &[u8]| {
    let Ok(note) = std::str::from_utf8(data) else { return };
    let signer = NoteSigner::new("example.com/notary-vectors", [0x42; 32]).expect("valid name");
    let verifier = signer.verifier();
    if let Ok(cp) = verifier.verify_checkpoint(note) {
        assert!(note.starts_with(&cp.body()), "a checkpoint that verifies is its body, signed");
        assert!(verifier.verify_ledger_head(note).is_err(), "a checkpoint is never a ledger head");
    }
    if let Ok(head) = verifier.verify_ledger_head(note) {
        assert!(note.starts_with(&head.body()), "a ledger head that verifies is its body, signed");
    }
    if let Ok(cp) = Checkpoint::parse_body(note) {
        assert_eq!(cp.body(), note, "one spelling per checkpoint body");
    }
    if let Ok(head) = LedgerHead::parse_body(note) {
        assert_eq!(head.body(), note, "one spelling per ledger head body");
    }
});
