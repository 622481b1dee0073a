//! Per-signature cost of three ways to check many device signatures, in
//! one run, each measured twice: plain ed25519 batches of 256 (the
//! pipeline before), batches after a prime-order check of every R (the
//! variant that agrees with strict verification), strict verification of
//! each (`verify_many`, the pipeline now). One thread.
//!
//! `cargo run --release -p notary-proof --example signature_paths`
use notary_proof::envelope::{self, DeviceKey, Envelope, EnvelopeFields};
use std::time::Instant;

fn prime_order(bytes: &[u8; 32]) -> bool {
    let c = curve25519_dalek::edwards::CompressedEdwardsY(*bytes);
    c.decompress().is_some_and(|p| p.compress() == c && !p.is_small_order() && p.is_torsion_free())
}

fn main() {
    let n = 4096;
    let keys: Vec<ed25519_dalek::SigningKey> =
        (0..n).map(|i| ed25519_dalek::SigningKey::from_bytes(&[(i % 250) as u8 + 1; 32])).collect();
    let envs: Vec<Envelope> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| {
            let f = EnvelopeFields {
                device_id: "d",
                counter: i as u64,
                device_time_ms: 0,
                content_type: "text/plain",
                topic: "t/1",
                payload: &[b'x'; 100],
            };
            Envelope::parse(&envelope::sign(k, &f).expect("valid"), "t/1").expect("valid")
        })
        .collect();
    let dks: Vec<DeviceKey> =
        keys.iter().map(|k| DeviceKey::from_bytes(k.verifying_key().as_bytes()).expect("valid")).collect();
    let vks: Vec<ed25519_dalek::VerifyingKey> = keys.iter().map(|k| k.verifying_key()).collect();
    let idx: Vec<usize> = (0..n).collect();
    let batch = |check_r: bool| {
        let t = Instant::now();
        let mut ok = 0;
        for c in idx.chunks(256) {
            if check_r && !c.iter().all(|&i| prime_order(envs[i].signature.r_bytes())) {
                continue;
            }
            let m: Vec<&[u8]> = c.iter().map(|&i| envs[i].signed_bytes.as_slice()).collect();
            let s: Vec<_> = c.iter().map(|&i| envs[i].signature).collect();
            let k: Vec<_> = c.iter().map(|&i| vks[i]).collect();
            ok += ed25519_dalek::verify_batch(&m, &s, &k).is_ok() as usize * c.len();
        }
        (t.elapsed().as_secs_f64() / n as f64 * 1e6, ok)
    };
    let items: Vec<(&Envelope, &DeviceKey)> = envs.iter().zip(&dks).collect();
    for round in 1..=2 {
        let (plain, a) = batch(false);
        let (checked, b) = batch(true);
        let t = Instant::now();
        let c = envelope::verify_many(&items).iter().filter(|v| **v).count();
        let strict = t.elapsed().as_secs_f64() / n as f64 * 1e6;
        println!(
            "run {round}: plain batch {plain:.1} us/sig ({a} ok), batch + R check {checked:.1} ({b} ok), strict each {strict:.1} ({c} ok)"
        );
    }
}
