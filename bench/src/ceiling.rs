//! The ed25519 verification ceiling: how many device signatures this
//! machine can check per second when it does nothing else. The envelopes
//! are real COSE_Sign1 envelopes of the load generator's size, checked by
//! the very function the ingest pipeline uses
//! (`notary_proof::envelope::verify_many`: strict verification, one
//! signature at a time).

use notary_proof::envelope::{self, Envelope, EnvelopeFields};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct Ceiling {
    /// Signatures per second on one thread.
    pub one_thread: f64,
    /// Signatures per second on `threads` threads (every core).
    pub all_threads: f64,
    pub threads: usize,
}

/// A device's signing key, the same for the same index in every run.
pub fn device_key(index: usize) -> ed25519_dalek::SigningKey {
    let seed = blake3::hash(format!("mqtt-notary bench device {index}").as_bytes());
    ed25519_dalek::SigningKey::from_bytes(seed.as_bytes())
}

pub fn device_id(index: usize) -> String {
    format!("bench-{index}")
}

pub fn measure(seconds: f64) -> Ceiling {
    const DEVICES: usize = 64;
    const PER_DEVICE: usize = 64;
    let keys: Vec<_> = (0..DEVICES).map(device_key).collect();
    let mut envelopes = Vec::with_capacity(DEVICES * PER_DEVICE);
    for n in 0..PER_DEVICE {
        for (d, key) in keys.iter().enumerate() {
            let topic = format!("bench/{d}");
            let payload = crate::load::payload_bytes(0, d, n as u64, crate::load::DEFAULT_PAYLOAD);
            let id = device_id(d);
            let fields = EnvelopeFields {
                device_id: &id,
                counter: n as u64 + 1,
                device_time_ms: 0,
                content_type: "text/plain",
                topic: &topic,
                payload: &payload,
            };
            let Ok(bytes) = envelope::sign(key, &fields) else { continue };
            let device_key = envelope::DeviceKey::from_bytes(key.verifying_key().as_bytes());
            if let (Ok(e), Ok(k)) = (Envelope::parse(&bytes, &topic), device_key) {
                envelopes.push((e, k));
            }
        }
    }
    let items: Vec<_> = envelopes.iter().map(|(e, k)| (e, k)).collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let run = |threads: usize| {
        let limit = Duration::from_secs_f64(seconds);
        let start = Instant::now();
        let total: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|_| {
                    s.spawn(|| {
                        let mut n = 0;
                        while start.elapsed() < limit {
                            let ok = envelope::verify_many(&items);
                            n += ok.iter().filter(|v| **v).count();
                        }
                        n
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or(0)).sum()
        });
        total as f64 / start.elapsed().as_secs_f64()
    };
    let one_thread = run(1);
    let all_threads = run(threads);
    Ceiling { one_thread, all_threads, threads }
}
