//! Device envelopes are untrusted bytes from any MQTT client: parsing and
//! verifying them must never panic, whatever they hold, and the broker's
//! signature check must say what strict verification says. The first byte
//! picks the topic, the rest is the payload.
#![no_main]

use libfuzzer_sys::fuzz_target;
use notary_proof::envelope::{is_envelope, verify_many, DeviceKey, Envelope};

fuzz_target!(|data: &[u8]| {
    let Some((&t, payload)) = data.split_first() else { return };
    let topic = ["plant/line1/temp", "", "a/b/c", "\u{0}"][usize::from(t) % 4];
    let _ = is_envelope(payload);
    if let Ok(env) = Envelope::parse(payload, topic) {
        let key = ed25519_dalek::SigningKey::from_bytes(&[0x17; 32]).verifying_key();
        let device_key = DeviceKey::from_bytes(key.as_bytes()).expect("a real key");
        let strict = env.verify(&key).is_ok();
        assert_eq!(verify_many(&[(&env, &device_key)]), vec![strict], "the broker and strict verification differ");
    }
});
