//! Leaf and batch records are the bytes the log commits to: decoding
//! must never panic, and a record that decodes is in its canonical
//! encoding (encoding it again gives the same bytes). The first byte picks
//! the decoder.
#![no_main]

use libfuzzer_sys::fuzz_target;
use notary_proof::device::{DeviceFields, RegistryEvent};
use notary_proof::{BatchRecord, LeafRecord};

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else { return };
    match which % 4 {
        0 => {
            if let Ok(leaf) = LeafRecord::decode(bytes) {
                assert_eq!(leaf.encode().expect("a decoded leaf encodes"), bytes);
                let _ = leaf.check_registry();
            }
        }
        1 => {
            if let Ok(batch) = BatchRecord::decode(bytes) {
                assert_eq!(batch.encode(), bytes);
            }
        }
        2 => {
            if let Ok(event) = RegistryEvent::decode(bytes) {
                assert_eq!(event.encode().expect("a decoded event encodes"), bytes);
            }
        }
        _ => {
            if let Ok(fields) = DeviceFields::decode(bytes) {
                assert_eq!(fields.encode().expect("decoded fields encode"), bytes);
            }
        }
    }
});
