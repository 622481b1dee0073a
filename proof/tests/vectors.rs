//! Proof-bundle test vectors: `tests/vectors/bundles.json`.
//!
//! This file is both the generator and the check. `cargo test -p notary-proof
//! --test vectors` fails if the checked-in file differs from what the
//! generator makes, then verifies every case. To regenerate after a
//! deliberate format change: `NOTARY_WRITE_VECTORS=1 cargo test -p notary-proof --test vectors`.
//!
//! Every case is deterministic: fixed keys, times and payloads. Negative
//! cases are named by the mutation they make.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use notary_proof::receipt::LedgerHead;
use notary_proof::tree::{consistency_proof, inclusion_proof, root, MemoryTree};
use notary_proof::{
    verify_bundle_json, BatchRecord, BatchTree, Checkpoint, LaterAnchor, LeafRecord, LocalEntry, NoteSigner,
    NoteVerifier, ProofBundle, Receipt, BUNDLE_FORMAT,
};
use serde_json::{json, Value};
use std::path::PathBuf;

const ORIGIN: &str = "example.com/notary-vectors";
const T0: u64 = 1_767_225_600_000; // 2026-01-01T00:00:00Z

fn vectors_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/vectors/bundles.json")
}

fn signer() -> NoteSigner {
    NoteSigner::new(ORIGIN, [0x42; 32]).expect("valid origin")
}

/// A local receipt as the broker writes it: with the ledger head it signed.
fn local_receipt(entry: &LocalEntry) -> Receipt {
    let head = LedgerHead { origin: ORIGIN.into(), size: entry.index + 1, head: entry.hash() };
    Receipt::local(entry, Some(signer().sign(&head.body())))
}

fn payload(seq: u64) -> Vec<u8> {
    format!("{{\"sensor\":\"t{}\",\"celsius\":{}.5}}", seq % 4, 18 + seq % 7).into_bytes()
}

/// A log of 5 batches with sizes 1, 7, 3, 16, 2; bundles for the first,
/// middle and last leaf of every batch.
/// A named case: (name, payload, bundle).
type Case = (String, Vec<u8>, ProofBundle);

fn build() -> Vec<Case> {
    build_log().0
}

/// The bundles of [`build`], the five signed checkpoint notes and the log.
fn build_log() -> (Vec<Case>, Vec<String>, MemoryTree) {
    let signer = signer();
    let mut notes = Vec::new();
    let sizes = [1u64, 7, 3, 16, 2];
    let mut log = MemoryTree::new();
    let mut seq = 0u64;
    let mut prev_entry = [0u8; 32];
    let mut out = Vec::new();
    for (number, &size) in sizes.iter().enumerate() {
        let number = number as u64;
        let leaves: Vec<LeafRecord> = (seq..seq + size)
            .map(|s| {
                LeafRecord::broker_received(s, T0 + s * 10, &format!("plant/line{}/temp", s % 3), &payload(s))
            })
            .collect();
        let hashes: Vec<_> = leaves.iter().map(|l| l.leaf_hash().expect("encodes")).collect();
        let tree = BatchTree::new(&hashes).expect("non-empty");
        let batch = BatchRecord {
            number,
            first_seq: seq,
            size,
            root: tree.root(),
            sealed_at_ms: T0 + 60_000 * (number + 1),
        };
        log.append(batch.leaf_hash());
        let cp_size = number + 1;
        let cp =
            Checkpoint { origin: ORIGIN.into(), size: cp_size, root: root(&mut log, cp_size).expect("root") };
        let note = signer.sign(&cp.body());
        let entry = LocalEntry {
            index: number,
            prev_hash: prev_entry,
            checkpoint_hash: notary_proof::hash::sha256(note.as_bytes()),
            anchored_at_ms: batch.sealed_at_ms + 5,
        };
        prev_entry = entry.hash();
        for (i, leaf) in leaves.iter().enumerate() {
            let i = i as u64;
            if !(i == 0 || i == size / 2 || i == size - 1) {
                continue;
            }
            let bundle = ProofBundle {
                format: BUNDLE_FORMAT.into(),
                leaf: leaf.encode().expect("encodes"),
                leaf_index: i,
                batch_path: tree.path(i).expect("in range"),
                batch: batch.encode(),
                log_path: inclusion_proof(&mut log, number, cp_size).expect("path"),
                checkpoint: note.clone(),
                receipts: vec![local_receipt(&entry)],
                later_anchors: Vec::new(),
                pending_ledgers: Vec::new(),
                device_key: None,
            };
            let name = format!("valid-batch{number}-leaf{i}");
            if !out.iter().any(|(n, _, _)| *n == name) {
                out.push((name, payload(leaf.seq), bundle));
            }
        }
        notes.push(note);
        seq += size;
    }
    (out, notes, log)
}

/// A synthetic EVM receipt for a checkpoint note (offline checks only bind
/// the note; the chain part needs `verify --rpc`).
fn evm_receipt(note: &str) -> Receipt {
    Receipt::Evm {
        status: notary_proof::EvmStatus::Final,
        chain_id: 31337,
        tx_hash: [0xab; 32],
        block_number: 42,
        block_hash: [0xcd; 32],
        from: [0x11; 20],
        to: [0x11; 20],
        checkpoint_hash: notary_proof::hash::sha256(note.as_bytes()),
    }
}

/// Bundles whose checkpoint a chain did not anchor itself: a later anchored
/// checkpoint and the consistency proof to it, and each way that fails.
fn later_anchor_cases() -> Vec<Value> {
    let (valid, notes, log) = build_log();
    let (_, payload, base) =
        valid.iter().find(|(n, _, _)| n == "valid-batch1-leaf3").expect("case exists").clone();
    let later = |size: u64| LaterAnchor {
        checkpoint: notes[size as usize - 1].clone(),
        consistency: consistency_proof(&mut log.clone(), 2, size).expect("proof"),
        receipts: vec![evm_receipt(&notes[size as usize - 1])],
    };
    let with = |f: &dyn Fn(&mut ProofBundle)| {
        let mut b = base.clone();
        b.later_anchors = vec![later(5)];
        f(&mut b);
        to_json(&b)
    };
    let mut out = Vec::new();
    let mut add = |name: &str, expect: &str, json: String| out.push(case(name, expect, &payload, json));
    add("later-anchor-valid", "valid", with(&|_| {}));
    add("later-anchor-to-size-3-valid", "valid", with(&|b| b.later_anchors = vec![later(3)]));
    add(
        "pending-ledger-valid",
        "valid",
        with(&|b| {
            b.later_anchors.clear();
            b.pending_ledgers = vec!["evm".into()];
        }),
    );
    add("pending-ledger-also-anchored-later", "malformed", with(&|b| b.pending_ledgers = vec!["evm".into()]));
    add(
        "pending-ledger-named-twice",
        "malformed",
        with(&|b| {
            b.later_anchors.clear();
            b.pending_ledgers = vec!["evm".into(), "evm".into()];
        }),
    );
    add(
        "pending-ledger-local-has-a-receipt",
        "malformed",
        with(&|b| {
            b.later_anchors.clear();
            b.pending_ledgers = vec!["local".into()];
        }),
    );
    add(
        "two-evm-receipts",
        "malformed",
        with(&|b| {
            let r = b.later_anchors[0].receipts[0].clone();
            b.later_anchors[0].receipts.push(r);
        }),
    );
    add(
        "evm-address-mixed-case",
        "malformed",
        with(&|_| {}).replace(
            "0x1111111111111111111111111111111111111111",
            "0x111111111111111111111111111111111111111A",
        ),
    );
    add(
        "evm-tx-hash-upper-case",
        "malformed",
        with(&|_| {}).replace(&hex::encode([0xab; 32]), &hex::encode_upper([0xab; 32])),
    );
    add(
        "own-evm-receipt-valid",
        "valid",
        with(&|b| {
            b.later_anchors.clear();
            let r = evm_receipt(&b.checkpoint);
            b.receipts.push(r);
        }),
    );
    add(
        "own-evm-receipt-other-checkpoint",
        "receipt-mismatch",
        with(&|b| {
            b.later_anchors.clear();
            b.receipts.push(evm_receipt(&notes[4]));
        }),
    );
    add(
        "later-anchor-consistency[0]-bit-@0.0",
        "bad-consistency",
        with(&|b| flip_bit(&mut b.later_anchors[0].consistency[0], 0, 0)),
    );
    add(
        "later-anchor-consistency-missing-hash",
        "bad-consistency",
        with(&|b| {
            b.later_anchors[0].consistency.pop();
        }),
    );
    add(
        "later-anchor-consistency-for-size-4",
        "bad-consistency",
        with(&|b| b.later_anchors[0].consistency = consistency_proof(&mut log.clone(), 2, 4).expect("proof")),
    );
    add(
        "later-anchor-same-checkpoint",
        "bad-consistency",
        with(&|b| {
            b.later_anchors[0] = LaterAnchor {
                checkpoint: notes[1].clone(),
                consistency: Vec::new(),
                receipts: vec![evm_receipt(&notes[1])],
            }
        }),
    );
    add(
        "later-anchor-earlier-checkpoint",
        "bad-consistency",
        with(&|b| {
            b.later_anchors[0] = LaterAnchor {
                checkpoint: notes[0].clone(),
                consistency: Vec::new(),
                receipts: vec![evm_receipt(&notes[0])],
            }
        }),
    );
    add(
        "later-anchor-signed-by-other-key",
        "unknown-key",
        with(&|b| {
            let other = NoteSigner::new(ORIGIN, [0x43; 32]).expect("valid");
            b.later_anchors[0].checkpoint = other.sign(body_of(&notes[4]));
        }),
    );
    add(
        "later-anchor-signature-byte-changed",
        "bad-checkpoint-signature",
        with(&|b| {
            let mut note = b.later_anchors[0].checkpoint.clone().into_bytes();
            let at = note.len() - 10;
            note[at] = if note[at] == b'A' { b'B' } else { b'A' };
            b.later_anchors[0].checkpoint = String::from_utf8(note).expect("ascii edit");
        }),
    );
    add(
        "later-anchor-receipt-names-own-checkpoint",
        "receipt-mismatch",
        with(&|b| b.later_anchors[0].receipts = vec![evm_receipt(&notes[1])]),
    );
    add("later-anchor-no-receipt", "receipt-mismatch", with(&|b| b.later_anchors[0].receipts.clear()));
    add(
        "later-anchor-evm-checkpoint-hash-bit-@7.1",
        "receipt-mismatch",
        with(&|b| {
            if let Receipt::Evm { checkpoint_hash, .. } = &mut b.later_anchors[0].receipts[0] {
                flip_bit(checkpoint_hash, 7, 1);
            }
        }),
    );
    out
}

/// The device log: registry leaves and device-signed leaves.
///
/// batch 0: 0 enrol dev-1 (key 1), 1 plain leaf
/// batch 1: 2 m1 (key 1), 3 m2 (signature bad, notarized anyway: a lying
///          broker), 4 rotate dev-1 to key 2, 5 m3 (key 2), 6 m4 (key 1,
///          after the rotation: a lying broker), 7 m5 (key 2, the leaf's
///          counter differs from its envelope's)
/// batch 2: 8 revoke dev-1
struct DeviceLog {
    log: MemoryTree,
    leaves: Vec<(LeafRecord, Vec<u8>)>,
    batches: Vec<(BatchRecord, BatchTree)>,
    notes: Vec<(String, LocalEntry)>,
}

const DEVICE_TOPIC: &str = "meters/dev-1";

fn device_key(n: u8) -> ed25519_dalek::SigningKey {
    ed25519_dalek::SigningKey::from_bytes(&[n; 32])
}

fn device_envelope(key: u8, counter: u64, payload: &[u8]) -> Vec<u8> {
    notary_proof::envelope::sign(
        &device_key(key),
        &notary_proof::envelope::EnvelopeFields {
            device_id: "dev-1",
            counter,
            device_time_ms: T0 + counter,
            content_type: "application/json",
            topic: DEVICE_TOPIC,
            payload,
        },
    )
    .expect("signs")
}

fn build_device_log() -> DeviceLog {
    use notary_proof::device::{DeviceFields, RegistryAction, RegistryEvent, NO_PREV};
    let signer = signer();
    let event = |action, key: Option<u8>, prev_seq| RegistryEvent {
        action,
        device_id: "dev-1".into(),
        public_key: key.map_or([0; 32], |k| device_key(k).verifying_key().to_bytes()),
        prev_seq,
    };
    let registry = |seq, e: RegistryEvent| {
        let leaf = LeafRecord::registry(seq, T0 + seq, &e).expect("leaf");
        (leaf, e.encode().expect("event"))
    };
    let plain = |seq, topic: &str, payload: &[u8]| LeafRecord::broker_received(seq, T0 + seq, topic, payload);
    let who = |client_id: &str, username: Option<&str>| notary_proof::Publisher {
        client_id: client_id.into(),
        username: username.map(Into::into),
    };
    let signed = |seq, key_seq, counter, env: Vec<u8>| {
        let f = DeviceFields { key_seq, counter, device_time_ms: T0 + counter, device_id: "dev-1".into() };
        (LeafRecord::device_signed(seq, T0 + seq, DEVICE_TOPIC, &env, &f).expect("leaf"), env)
    };
    let mut bad_sig = device_envelope(1, 2, b"{\"kwh\":2}");
    let end = bad_sig.len() - 1;
    bad_sig[end] ^= 1;
    let m5 = device_envelope(2, 5, b"{\"kwh\":5}");
    let mut m5_leaf = signed(7, 4, 5, m5);
    if let Some(mut f) = m5_leaf.0.device_fields() {
        f.counter = 9;
        m5_leaf.0.extension = f.encode().expect("fields");
    }
    let leaves = vec![
        registry(0, event(RegistryAction::Enrol, Some(1), NO_PREV)),
        (LeafRecord::broker_received(1, T0 + 1, "plain/1", b"21.5"), b"21.5".to_vec()),
        signed(2, 0, 1, device_envelope(1, 1, b"{\"kwh\":1}")),
        signed(3, 0, 2, bad_sig),
        registry(4, event(RegistryAction::Rotate, Some(2), 0)),
        signed(5, 4, 3, device_envelope(2, 3, b"{\"kwh\":3}")),
        signed(6, 0, 4, device_envelope(1, 4, b"{\"kwh\":4}")),
        m5_leaf,
        registry(8, event(RegistryAction::Revoke, None, 4)),
        // Leaf version 2, naming the publisher (a fourth batch, so the
        // version 1 vectors above stay as they were).
        (plain(9, "plain/2", b"22.0").published_by(who("meter-7", Some("plant-a"))), b"22.0".to_vec()),
        (plain(10, "plain/3", b"23.5").published_by(who("gw/7\u{e9}", None)), b"23.5".to_vec()),
        {
            let (leaf, env) = signed(11, 4, 6, device_envelope(2, 6, b"{\"kwh\":6}"));
            (leaf.published_by(who("dev-1", Some("plant-a"))), env)
        },
        // A fifth batch from a lying broker: registry leaves that break
        // the registry rule (topic, payload = event).
        {
            let (mut leaf, event) = registry(12, event(RegistryAction::Enrol, Some(3), 8));
            leaf.topic = "meters/dev-1".into();
            (leaf, event)
        },
        {
            let (mut leaf, _) = registry(13, event(RegistryAction::Enrol, Some(3), 8));
            leaf.payload_len = 5;
            leaf.payload_digest = *blake3::hash(b"other").as_bytes();
            (leaf, b"other".to_vec())
        },
    ];
    let mut log = MemoryTree::new();
    let mut batches = Vec::new();
    let mut notes = Vec::new();
    let mut prev_entry = [0u8; 32];
    for (number, range) in [0..2usize, 2..8, 8..9, 9..12, 12..14].into_iter().enumerate() {
        let number = number as u64;
        let hashes: Vec<_> =
            leaves[range.clone()].iter().map(|(l, _)| l.leaf_hash().expect("encodes")).collect();
        let tree = BatchTree::new(&hashes).expect("non-empty");
        let batch = BatchRecord {
            number,
            first_seq: range.start as u64,
            size: hashes.len() as u64,
            root: tree.root(),
            sealed_at_ms: T0 + 60_000 * (number + 1),
        };
        log.append(batch.leaf_hash());
        let cp = Checkpoint {
            origin: ORIGIN.into(),
            size: number + 1,
            root: root(&mut log, number + 1).expect("root"),
        };
        let note = signer.sign(&cp.body());
        let entry = LocalEntry {
            index: number,
            prev_hash: prev_entry,
            checkpoint_hash: notary_proof::hash::sha256(note.as_bytes()),
            anchored_at_ms: batch.sealed_at_ms + 5,
        };
        prev_entry = entry.hash();
        batches.push((batch, tree));
        notes.push((note, entry));
    }
    DeviceLog { log, leaves, batches, notes }
}

impl DeviceLog {
    fn batch_of(&self, seq: u64) -> usize {
        self.batches
            .iter()
            .position(|(b, _)| seq >= b.first_seq && seq < b.first_seq + b.size)
            .expect("sealed")
    }

    /// Proof of leaf `seq` into the checkpoint of size `size`.
    fn leaf_proof(&mut self, seq: u64, size: u64) -> notary_proof::LeafProof {
        let b = self.batch_of(seq);
        let (batch, tree) = &self.batches[b];
        let index = seq - batch.first_seq;
        notary_proof::LeafProof {
            leaf: self.leaves[seq as usize].0.encode().expect("encodes"),
            leaf_index: index,
            batch_path: tree.path(index).expect("in range"),
            batch: batch.encode(),
            log_path: inclusion_proof(&mut self.log, batch.number, size).expect("path"),
        }
    }

    /// The bundle a broker serves for leaf `seq`, with key evidence as given.
    fn bundle(&mut self, seq: u64, evidence: Option<(u64, Option<u64>)>) -> (Vec<u8>, ProofBundle) {
        let size = self.batch_of(seq) as u64 + 1;
        let p = self.leaf_proof(seq, size);
        let device_key = evidence.map(|(enrolment, next)| notary_proof::KeyEvidence {
            enrolment: self.leaf_proof(enrolment, size),
            superseded_by: next.map(|n| self.leaf_proof(n, size)),
        });
        let (note, entry) = &self.notes[size as usize - 1];
        let bundle = ProofBundle {
            format: BUNDLE_FORMAT.into(),
            leaf: p.leaf,
            leaf_index: p.leaf_index,
            batch_path: p.batch_path,
            batch: p.batch,
            log_path: p.log_path,
            checkpoint: note.clone(),
            receipts: vec![local_receipt(entry)],
            later_anchors: Vec::new(),
            pending_ledgers: Vec::new(),
            device_key,
        };
        (self.leaves[seq as usize].1.clone(), bundle)
    }
}

/// Device-signed bundles: valid ones, and each way key evidence, envelope
/// or device signature can fail.
fn device_cases() -> Vec<Value> {
    let mut log = build_device_log();
    let mut out = Vec::new();
    let mut add = |name: &str, expect: &str, (payload, b): (Vec<u8>, ProofBundle)| {
        out.push(case(name, expect, &payload, to_json(&b)));
    };
    add("device-valid-key-later-rotated", "valid", log.bundle(2, Some((0, Some(4)))));
    add("device-valid-rotated-key", "valid", log.bundle(5, Some((4, None))));
    add("device-registry-leaf-valid", "valid", log.bundle(4, None));
    add("device-key-evidence-missing", "bad-key-evidence", log.bundle(2, None));
    add("device-key-evidence-on-plain-leaf", "malformed", log.bundle(1, Some((0, None))));
    add("device-enrolment-is-another-event", "bad-key-evidence", log.bundle(2, Some((4, None))));
    add("device-enrolment-is-a-message", "bad-key-evidence", log.bundle(2, Some((1, None))));
    add("device-key-replaced-before-message", "bad-key-evidence", log.bundle(6, Some((0, Some(4)))));
    add("device-next-event-does-not-follow", "bad-key-evidence", log.bundle(5, Some((4, Some(4)))));
    add("device-bad-signature-notarized", "bad-device-signature", log.bundle(3, Some((0, Some(4)))));
    add("device-leaf-counter-differs", "bad-envelope", log.bundle(7, Some((4, None))));
    let (payload, mut b) = log.bundle(2, Some((0, Some(4))));
    if let Some(ev) = b.device_key.as_mut() {
        flip_bit(&mut ev.enrolment.leaf, 17, 0);
    }
    add("device-enrolment-leaf-bit-@17.0", "root-mismatch", (payload, b));
    let (payload, mut b) = log.bundle(2, Some((0, Some(4))));
    if let Some(ev) = b.device_key.as_mut() {
        ev.enrolment.batch_path.pop();
    }
    add("device-enrolment-path-short", "bad-path", (payload, b));
    let (mut payload, b) = log.bundle(2, Some((0, Some(4))));
    let at = payload.len() - 1;
    flip_bit(&mut payload, at, 0);
    add("device-envelope-signature-bit", "digest-mismatch", (payload, b));

    // Leaf version 2: who published.
    add("publisher-client-authenticated", "valid", log.bundle(9, None));
    add("publisher-client-id-only", "valid", log.bundle(10, None));
    add("publisher-device-signed-with-login", "valid", log.bundle(11, Some((4, None))));
    let username_at = |leaf: &[u8]| leaf.len() - 2 - "plant-a".len();
    let (payload, mut b) = log.bundle(9, None);
    let at = username_at(&b.leaf);
    flip_bit(&mut b.leaf, at, 0);
    add("publisher-username-bit", "root-mismatch", (payload, b));
    let (payload, mut b) = log.bundle(9, None);
    b.leaf[1] = 1; // broker-received, yet naming a checked login
    add("publisher-broker-received-with-username", "malformed", (payload, b));
    let (payload, mut b) = log.bundle(10, None);
    b.leaf[1] = 4; // client-authenticated without a login
    add("publisher-client-authenticated-without-username", "malformed", (payload, b));
    let (payload, mut b) = log.bundle(1, None);
    b.leaf[1] = 4; // client-authenticated in a version 1 leaf
    add("publisher-client-authenticated-in-version-1", "malformed", (payload, b));
    let (payload, mut b) = log.bundle(9, None);
    b.leaf[0] = 1; // version 1 bytes cannot hold the publisher
    add("publisher-leaf-version-1", "malformed", (payload, b));

    add("registry-leaf-on-another-topic", "bad-registry-leaf", log.bundle(12, None));
    add("registry-leaf-payload-not-its-event", "bad-registry-leaf", log.bundle(13, None));
    out
}

fn flip_bit(bytes: &mut [u8], byte: usize, bit: u8) {
    bytes[byte] ^= 1 << bit;
}

fn case(name: &str, expect: &str, payload: &[u8], bundle_json: String) -> Value {
    json!({"name": name, "expect": expect, "payload_hex": hex::encode(payload), "bundle_json": bundle_json})
}

fn to_json(b: &ProofBundle) -> String {
    serde_json::to_string(b).expect("serializes")
}

/// Edits the JSON form of a bundle, for mutations the struct cannot express.
fn edit(b: &ProofBundle, f: impl FnOnce(&mut serde_json::Map<String, Value>)) -> String {
    let mut v = serde_json::to_value(b).expect("serializes");
    if let Value::Object(m) = &mut v {
        f(m);
    }
    v.to_string()
}

fn body_of(note: &str) -> &str {
    &note[..note.find("\n\n").expect("signed note has a body") + 1]
}

fn generate() -> Value {
    let valid = build();
    let mut cases: Vec<Value> = valid.iter().map(|(n, p, b)| case(n, "valid", p, to_json(b))).collect();
    // Mutations of a leaf in the middle of a 16-leaf batch, at log size 4.
    let (_, payload, base) =
        valid.iter().find(|(n, _, _)| n == "valid-batch3-leaf8").expect("case exists").clone();
    let m = |f: &dyn Fn(&mut ProofBundle)| {
        let mut b = base.clone();
        f(&mut b);
        to_json(&b)
    };
    let mut add = |name: &str, expect: &str, payload: &[u8], json: String| {
        cases.push(case(name, expect, payload, json))
    };

    let mut p = payload.clone();
    flip_bit(&mut p, 3, 0);
    add("payload-bit-@3.0", "digest-mismatch", &p, to_json(&base));
    add("payload-truncated", "digest-mismatch", &payload[..payload.len() - 1], to_json(&base));
    let mut longer = payload.clone();
    longer.push(b' ');
    add("payload-extended", "digest-mismatch", &longer, to_json(&base));

    // Leaf record: bytes 2..10 seq, 10..18 received_at, 18..26 length, 26..58 digest.
    add("leaf-digest-bit-@30.2", "root-mismatch", &payload, m(&|b| flip_bit(&mut b.leaf, 30, 2)));
    add("leaf-received-at-bit-@17.0", "root-mismatch", &payload, m(&|b| flip_bit(&mut b.leaf, 17, 0)));
    add("leaf-topic-bit-@62.0", "root-mismatch", &payload, m(&|b| flip_bit(&mut b.leaf, 62, 0)));
    add("leaf-assurance-device-signed", "malformed", &payload, m(&|b| b.leaf[1] = 2));
    add("leaf-seq-bit-@9.1", "bad-path", &payload, m(&|b| flip_bit(&mut b.leaf, 9, 1)));
    add("leaf-version-2", "malformed", &payload, m(&|b| b.leaf[0] = 2));
    add(
        "leaf-truncated",
        "malformed",
        &payload,
        m(&|b| {
            b.leaf.pop();
        }),
    );
    add("leaf-trailing-byte", "malformed", &payload, m(&|b| b.leaf.push(0)));
    add("leaf-index-plus-1", "bad-path", &payload, m(&|b| b.leaf_index += 1));

    add("batch-path[0]-bit-@3.3", "root-mismatch", &payload, m(&|b| flip_bit(&mut b.batch_path[0], 3, 3)));
    add("batch-path[3]-bit-@31.7", "root-mismatch", &payload, m(&|b| flip_bit(&mut b.batch_path[3], 31, 7)));
    add(
        "batch-path-extra-hash",
        "bad-path",
        &payload,
        m(&|b| {
            let h = b.batch_path[0];
            b.batch_path.push(h);
        }),
    );
    add(
        "batch-path-missing-hash",
        "bad-path",
        &payload,
        m(&|b| {
            b.batch_path.pop();
        }),
    );
    add("batch-path-swapped", "root-mismatch", &payload, m(&|b| b.batch_path.swap(0, 1)));

    // Batch record: bytes 1..9 number, 9..17 first seq, 17..25 size, 25..57 root.
    add("batch-root-bit-@40.1", "root-mismatch", &payload, m(&|b| flip_bit(&mut b.batch, 40, 1)));
    add("batch-size-bit-@24.0", "root-mismatch", &payload, m(&|b| flip_bit(&mut b.batch, 24, 0)));
    add("batch-number-bit-@8.0", "root-mismatch", &payload, m(&|b| flip_bit(&mut b.batch, 8, 0)));
    add("batch-sealed-at-bit-@64.0", "root-mismatch", &payload, m(&|b| flip_bit(&mut b.batch, 64, 0)));
    add(
        "batch-truncated",
        "malformed",
        &payload,
        m(&|b| {
            b.batch.pop();
        }),
    );

    add("log-path[0]-bit-@0.0", "root-mismatch", &payload, m(&|b| flip_bit(&mut b.log_path[0], 0, 0)));
    add(
        "log-path-extra-hash",
        "bad-path",
        &payload,
        m(&|b| {
            let h = b.log_path[0];
            b.log_path.push(h);
        }),
    );
    add("log-path-empty", "bad-path", &payload, m(&|b| b.log_path.clear()));

    add(
        "checkpoint-signature-byte-changed",
        "bad-checkpoint-signature",
        &payload,
        m(&|b| {
            let mut note = b.checkpoint.clone().into_bytes();
            let at = note.len() - 10; // inside the base64 signature
            note[at] = if note[at] == b'A' { b'B' } else { b'A' };
            b.checkpoint = String::from_utf8(note).expect("ascii edit");
        }),
    );
    add(
        "checkpoint-root-bit-@0.0",
        "bad-checkpoint-signature",
        &payload,
        m(&|b| {
            let root_line = b.checkpoint.split('\n').nth(2).expect("root line").to_owned();
            let mut root = B64.decode(&root_line).expect("root");
            root[0] ^= 1;
            b.checkpoint = b.checkpoint.replacen(&root_line, &B64.encode(root), 1);
        }),
    );
    add(
        "checkpoint-size-plus-1",
        "bad-checkpoint-signature",
        &payload,
        m(&|b| {
            b.checkpoint = b.checkpoint.replacen(&format!("{ORIGIN}\n4\n"), &format!("{ORIGIN}\n5\n"), 1);
        }),
    );
    add(
        "checkpoint-signed-by-other-key",
        "unknown-key",
        &payload,
        m(&|b| {
            let other = NoteSigner::new(ORIGIN, [0x43; 32]).expect("valid");
            b.checkpoint = other.sign(body_of(&b.checkpoint));
        }),
    );
    add(
        "checkpoint-signature-stripped",
        "malformed",
        &payload,
        m(&|b| {
            b.checkpoint = body_of(&b.checkpoint).to_owned();
        }),
    );

    add(
        "receipt-checkpoint-hash-bit-@5.4",
        "receipt-mismatch",
        &payload,
        m(&|b| {
            let Receipt::Local { checkpoint_hash, .. } = &mut b.receipts[0] else {
                panic!("a local receipt")
            };
            flip_bit(checkpoint_hash, 5, 4);
        }),
    );
    add(
        "receipt-entry-hash-bit-@0.0",
        "receipt-mismatch",
        &payload,
        m(&|b| {
            let Receipt::Local { entry_hash, .. } = &mut b.receipts[0] else { panic!("a local receipt") };
            flip_bit(entry_hash, 0, 0);
        }),
    );
    add(
        "receipt-prev-hash-bit-@31.0",
        "receipt-mismatch",
        &payload,
        m(&|b| {
            let Receipt::Local { prev_hash, .. } = &mut b.receipts[0] else { panic!("a local receipt") };
            flip_bit(prev_hash, 31, 0);
        }),
    );
    add(
        "receipt-index-plus-1",
        "receipt-mismatch",
        &payload,
        m(&|b| {
            let Receipt::Local { index, .. } = &mut b.receipts[0] else { panic!("a local receipt") };
            *index += 1;
        }),
    );
    add(
        "receipt-anchored-at-plus-1",
        "receipt-mismatch",
        &payload,
        m(&|b| {
            let Receipt::Local { anchored_at_ms, .. } = &mut b.receipts[0] else { panic!("a local receipt") };
            *anchored_at_ms += 1;
        }),
    );
    add("receipts-empty", "receipt-mismatch", &payload, m(&|b| b.receipts.clear()));

    // The signed ledger head fixes every field of a local receipt.
    let entry_of = |b: &ProofBundle| match &b.receipts[0] {
        Receipt::Local { index, prev_hash, checkpoint_hash, anchored_at_ms, .. } => LocalEntry {
            index: *index,
            prev_hash: *prev_hash,
            checkpoint_hash: *checkpoint_hash,
            anchored_at_ms: *anchored_at_ms,
        },
        Receipt::Evm { .. } => panic!("a local receipt"),
    };
    let head_of = |b: &ProofBundle| match &b.receipts[0] {
        Receipt::Local { head, .. } => head.clone(),
        Receipt::Evm { .. } => None,
    };
    add(
        "receipt-redated-reindexed-and-rehashed",
        "receipt-mismatch",
        &payload,
        m(&|b| {
            let entry = LocalEntry { index: 999_999, anchored_at_ms: 4_102_444_800_000, ..entry_of(b) };
            b.receipts[0] = Receipt::local(&entry, head_of(b));
        }),
    );
    add(
        "receipt-head-signed-by-other-key",
        "receipt-mismatch",
        &payload,
        m(&|b| {
            let entry = entry_of(b);
            let head = LedgerHead { origin: ORIGIN.into(), size: entry.index + 1, head: entry.hash() };
            let other = NoteSigner::new(ORIGIN, [0x43; 32]).expect("valid");
            b.receipts[0] = Receipt::local(&entry, Some(other.sign(&head.body())));
        }),
    );
    add(
        "receipt-head-one-entry-later",
        "receipt-mismatch",
        &payload,
        m(&|b| {
            let entry = entry_of(b);
            let head = LedgerHead { origin: ORIGIN.into(), size: entry.index + 2, head: entry.hash() };
            b.receipts[0] = Receipt::local(&entry, Some(signer().sign(&head.body())));
        }),
    );
    add(
        "receipt-head-is-a-checkpoint",
        "receipt-mismatch",
        &payload,
        m(&|b| {
            let note = b.checkpoint.clone();
            b.receipts[0] = Receipt::local(&entry_of(b), Some(note));
        }),
    );
    add(
        "receipt-without-signed-head-valid",
        "valid",
        &payload,
        m(&|b| b.receipts[0] = Receipt::local(&entry_of(b), None)),
    );
    add(
        "receipt-later-entry-with-zero-previous-hash",
        "receipt-mismatch",
        &payload,
        m(&|b| b.receipts[0] = local_receipt(&LocalEntry { prev_hash: [0; 32], ..entry_of(b) })),
    );
    add(
        "receipt-entry-0-with-a-previous-hash",
        "receipt-mismatch",
        &payload,
        m(&|b| b.receipts[0] = local_receipt(&LocalEntry { index: 0, ..entry_of(b) })),
    );
    add(
        "receipts-two-local",
        "malformed",
        &payload,
        m(&|b| {
            let r = b.receipts[0].clone();
            b.receipts.push(r);
        }),
    );
    let Receipt::Local { entry_hash, .. } = &base.receipts[0] else { panic!("a local receipt") };
    add(
        "receipt-hash-upper-case",
        "malformed",
        &payload,
        to_json(&base).replace(&hex::encode(entry_hash), &hex::encode_upper(entry_hash)),
    );
    // JSON: one value per key.
    let json = to_json(&base);
    add(
        "duplicate-key-leaf-index",
        "malformed",
        &payload,
        json.replacen(
            "\"leaf_index\":",
            &format!("\"leaf_index\":{},\"leaf_index\":", base.leaf_index + 1),
            1,
        ),
    );
    add(
        "duplicate-key-in-receipt",
        "malformed",
        &payload,
        json.replacen("\"anchored_at_ms\":", "\"anchored_at_ms\":1,\"anchored_at_ms\":", 1),
    );
    add(
        "duplicate-key-receipt-type",
        "malformed",
        &payload,
        json.replacen("\"type\":", "\"type\":\"evm\",\"type\":", 1),
    );
    // The checkpoint note, read as Go's note package reads it.
    add(
        "checkpoint-extension-line",
        "malformed",
        &payload,
        m(&|b| b.checkpoint = signer().sign(&format!("{}extension\n", body_of(&b.checkpoint)))),
    );
    add(
        "checkpoint-signature-line-repeated",
        "malformed",
        &payload,
        m(&|b| {
            let line = b.checkpoint.rsplit_once("\n\n").expect("signed").1.to_owned();
            b.checkpoint.push_str(&line);
        }),
    );
    add(
        "checkpoint-control-character",
        "malformed",
        &payload,
        m(&|b| {
            let other = NoteSigner::new("other\u{1}log", [0x44; 32]).expect("a name without + or spaces");
            let line = other.sign(body_of(&b.checkpoint)).rsplit_once("\n\n").expect("signed").1.to_owned();
            b.checkpoint.push_str(&line);
        }),
    );
    add("format-v2", "malformed", &payload, m(&|b| b.format = "mqtt-notary/bundle/v2".into()));
    add("trailing-garbage", "malformed", &payload, to_json(&base) + "x");
    add(
        "unknown-field",
        "malformed",
        &payload,
        edit(&base, |o| {
            o.insert("extra".into(), json!(1));
        }),
    );
    add(
        "missing-field-log-path",
        "malformed",
        &payload,
        edit(&base, |o| {
            o.remove("log_path");
        }),
    );
    add(
        "unknown-receipt-type",
        "malformed",
        &payload,
        edit(&base, |o| {
            o.insert("receipts".into(), json!([{"type": "carrier-pigeon"}]));
        }),
    );
    add(
        "hash-not-base64",
        "malformed",
        &payload,
        edit(&base, |o| {
            o.insert("batch_path".into(), json!(["%%%"]));
        }),
    );
    add(
        "hash-31-bytes",
        "malformed",
        &payload,
        edit(&base, |o| {
            o.insert("batch_path".into(), json!([B64.encode([0u8; 31])]));
        }),
    );
    add("not-json", "malformed", &payload, "proof please".into());
    cases.extend(device_cases());
    cases.extend(later_anchor_cases());

    json!({
        "description": "mqtt-notary proof bundle vectors. Verify bundle_json against the bytes of payload_hex with broker_key; expect is 'valid' or the code of the first failing check (docs/PROTOCOL.md, Verification).",
        "broker_key": signer().verifier().to_key_string(),
        "cases": cases,
    })
}

#[test]
fn checked_in_vectors_match_the_generator() {
    let generated = serde_json::to_string_pretty(&generate()).expect("serializes") + "\n";
    let path = vectors_path();
    if std::env::var_os("NOTARY_WRITE_VECTORS").is_some() {
        std::fs::write(&path, &generated).expect("writes vectors");
    }
    let on_disk = std::fs::read_to_string(&path).expect("tests/vectors/bundles.json exists");
    assert!(on_disk == generated, "vectors are stale: rerun with NOTARY_WRITE_VECTORS=1");
}

#[test]
fn every_vector_verifies_as_expected() {
    let text = std::fs::read_to_string(vectors_path()).expect("vectors exist");
    let file: Value = serde_json::from_str(&text).expect("vectors parse");
    let key = NoteVerifier::from_key_string(file["broker_key"].as_str().expect("key")).expect("key parses");
    let cases = file["cases"].as_array().expect("cases");
    assert!(cases.len() > 40, "{} cases", cases.len());
    for c in cases {
        let name = c["name"].as_str().expect("name");
        let payload = hex::decode(c["payload_hex"].as_str().expect("payload")).expect("hex");
        let got =
            match verify_bundle_json(c["bundle_json"].as_str().expect("bundle").as_bytes(), &payload, &key) {
                Ok(_) => "valid",
                Err(e) => e.code(),
            };
        let detail =
            verify_bundle_json(c["bundle_json"].as_str().expect("bundle").as_bytes(), &payload, &key).err();
        assert_eq!(got, c["expect"].as_str().expect("expect"), "case {name}: {detail:?}");
    }
}

/// Random byte mutations of real vectors never panic the parsers or the
/// verifier; they only ever return an error (or, rarely, still verify when
/// the mutation hits insignificant JSON whitespace).
#[test]
fn random_mutations_never_panic() {
    let text = std::fs::read_to_string(vectors_path()).expect("vectors exist");
    let file: Value = serde_json::from_str(&text).expect("vectors parse");
    let key = NoteVerifier::from_key_string(file["broker_key"].as_str().expect("key")).expect("key parses");
    let valid: Vec<(Vec<u8>, Vec<u8>)> = file["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .filter(|c| c["expect"] == "valid")
        .map(|c| {
            (
                c["bundle_json"].as_str().expect("bundle").as_bytes().to_vec(),
                hex::decode(c["payload_hex"].as_str().expect("hex")).expect("hex"),
            )
        })
        .collect();
    let mut state = 0x9e37_79b9_7f4a_7c15u64; // xorshift64*, fixed seed
    let mut next = move || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    for i in 0..20_000 {
        let (bundle, payload) = &valid[i % valid.len()];
        let mut b = bundle.clone();
        for _ in 0..1 + next() % 4 {
            let at = (next() % b.len() as u64) as usize;
            match next() % 3 {
                0 => b[at] ^= 1 << (next() % 8),
                1 => b[at] = (next() % 128) as u8,
                _ => b.truncate(at),
            }
            if b.is_empty() {
                break;
            }
        }
        let _ = verify_bundle_json(&b, payload, &key);
        // Also mutate inside the decoded fields, past the JSON parser.
        let mut s: ProofBundle = serde_json::from_slice(bundle).expect("valid bundle parses");
        let pick = next() % 5;
        let field: &mut Vec<u8> = match pick {
            0 => &mut s.leaf,
            1 => &mut s.batch,
            _ => &mut b,
        };
        if pick < 2 && !field.is_empty() {
            let at = (next() % field.len() as u64) as usize;
            if next() % 2 == 0 {
                field[at] ^= 1 << (next() % 8);
            } else {
                field.truncate(at);
            }
        } else if pick == 2 && !s.batch_path.is_empty() {
            let at = (next() % s.batch_path.len() as u64) as usize;
            s.batch_path[at][(next() % 32) as usize] ^= 1;
        } else if pick == 3 {
            s.leaf_index = next() % 64;
            s.log_path.truncate((next() % 4) as usize);
        } else {
            let mut note = s.checkpoint.clone().into_bytes();
            let at = (next() % note.len() as u64) as usize;
            note[at] = (next() % 128) as u8;
            s.checkpoint = String::from_utf8(note).unwrap_or_default();
        }
        let _ = notary_proof::verify_bundle(&s, payload, &key);
        let _ = LeafRecord::decode(&b);
        let _ = BatchRecord::decode(&b);
        if let Ok(s) = std::str::from_utf8(&b) {
            let _ = key.verify_checkpoint(s);
            let _ = Checkpoint::parse_body(s);
            let _ = NoteVerifier::from_key_string(s);
        }
    }
}
