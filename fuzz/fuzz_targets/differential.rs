//! The broker and the offline verifier must agree on every envelope: the
//! broker accepts it (parse, then its signature check) exactly when
//! the bundle of the leaf it would write verifies. The input is the
//! payload published on `plant/line1/temp` by device `meter-17`, whose key
//! is the one of tests/vectors/envelopes.json.
#![no_main]

use libfuzzer_sys::fuzz_target;
use notary_proof::device::{DeviceFields, RegistryAction, RegistryEvent, NO_PREV};
use notary_proof::envelope::{is_envelope, verify_many, DeviceKey, Envelope};
use notary_proof::receipt::LedgerHead;
use notary_proof::tree::{inclusion_proof, root, MemoryTree};
use notary_proof::{
    verify_bundle, BatchRecord, BatchTree, Checkpoint, KeyEvidence, LeafProof, LeafRecord, LocalEntry,
    NoteSigner, ProofBundle, Receipt, BUNDLE_FORMAT,
};

const TOPIC: &str = "plant/line1/temp";
const ORIGIN: &str = "example.com/fuzz";

fuzz_target!(|data: &[u8]| {
    if !is_envelope(data) {
        return; // a plain payload: no signature to judge
    }
    // Only what parses is judged further by both sides; what does not is
    // `malformed-envelope` at the broker and `bad-envelope` offline, by the
    // same parser.
    let Ok(env) = Envelope::parse(data, TOPIC) else { return };
    let public = ed25519_dalek::SigningKey::from_bytes(&[0x17; 32]).verifying_key();
    let key = DeviceKey::from_bytes(public.as_bytes()).expect("a real key");
    let accepted = env.device_id == "meter-17" && verify_many(&[(&env, &key)]) == [true];

    // The log a broker would write: enrolment, then the message.
    let event = RegistryEvent {
        action: RegistryAction::Enrol,
        device_id: "meter-17".into(),
        public_key: public.to_bytes(),
        prev_seq: NO_PREV,
    };
    let fields = DeviceFields {
        key_seq: 0,
        counter: env.counter,
        device_time_ms: env.device_time_ms,
        device_id: env.device_id.clone(),
    };
    let leaves = [
        LeafRecord::registry(0, 1, &event).expect("event"),
        LeafRecord::device_signed(1, 2, TOPIC, data, &fields).expect("fields"),
    ];
    let encoded: Vec<Vec<u8>> = leaves.iter().map(|l| l.encode().expect("encodes")).collect();
    let hashes: Vec<_> = leaves.iter().map(|l| l.leaf_hash().expect("encodes")).collect();
    let tree = BatchTree::new(&hashes).expect("two leaves");
    let batch = BatchRecord { number: 0, first_seq: 0, size: 2, root: tree.root(), sealed_at_ms: 3 };
    let mut log = MemoryTree::new();
    log.append(batch.leaf_hash());
    let signer = NoteSigner::new(ORIGIN, [0x42; 32]).expect("valid name");
    let checkpoint =
        signer.sign(&Checkpoint { origin: ORIGIN.into(), size: 1, root: root(&mut log, 1).expect("root") }.body());
    let entry = LocalEntry {
        index: 0,
        prev_hash: [0; 32],
        checkpoint_hash: notary_proof::hash::sha256(checkpoint.as_bytes()),
        anchored_at_ms: 4,
    };
    let head = signer.sign(&LedgerHead { origin: ORIGIN.into(), size: 1, head: entry.hash() }.body());
    let proof = |i: usize| LeafProof {
        leaf: encoded[i].clone(),
        leaf_index: i as u64,
        batch_path: tree.path(i as u64).expect("in range"),
        batch: batch.encode(),
        log_path: inclusion_proof(&mut log.clone(), 0, 1).expect("path"),
    };
    let own = proof(1);
    let bundle = ProofBundle {
        format: BUNDLE_FORMAT.into(),
        leaf: own.leaf,
        leaf_index: own.leaf_index,
        batch_path: own.batch_path,
        batch: own.batch,
        log_path: own.log_path,
        checkpoint,
        receipts: vec![Receipt::local(&entry, Some(head))],
        later_anchors: Vec::new(),
        pending_ledgers: Vec::new(),
        device_key: Some(KeyEvidence { enrolment: proof(0), superseded_by: None }),
    };
    let verdict = verify_bundle(&bundle, data, &signer.verifier());
    assert_eq!(accepted, verdict.is_ok(), "broker {accepted}, verifier {verdict:?}");
});
