//! The load generator: many concurrent rumqttc publishers (closed loop at
//! the broker's pace, or open loop at a fixed rate), one rumqttc subscriber
//! and a third-party one (`mosquitto_sub`) counting what is delivered.

use crate::ceiling::{device_id, device_key};
use anyhow::{bail, Context as _};
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use std::io::BufRead as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const DEFAULT_PAYLOAD: usize = 100;
/// Published by the runner until every subscriber has seen one; not counted.
pub const WARMUP_TOPIC: &str = "bench/warmup";
/// A run whose counters do not move for this long is over: what is
/// missing then is reported as lost.
pub const STALL: Duration = Duration::from_secs(10);
/// How long a publisher keeps trying to connect.
const CONNECT_PATIENCE: Duration = Duration::from_secs(60);

/// A message's bytes: unique per run, publisher and sequence number,
/// padded with dots to `size` (never shorter than its 28-byte header).
pub fn payload_bytes(run: u32, publisher: usize, seq: u64, size: usize) -> Vec<u8> {
    let mut p = format!("{run:08x} {publisher:05} {seq:012} ").into_bytes();
    p.resize(size.max(p.len()), b'.');
    p
}

pub fn topic(publisher: usize) -> String {
    format!("bench/{publisher}")
}

#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// Distinguishes the payloads of different runs.
    pub run: u32,
    pub publishers: usize,
    pub per_publisher: u64,
    pub payload: usize,
    pub qos: QoS,
    /// Messages per second in all, open loop; `None`: as fast as the broker takes them.
    pub rate: Option<f64>,
    /// Publish COSE_Sign1 envelopes of device `bench-<publisher>`.
    pub signed: bool,
    /// Every n-th message of a publisher carries a broken signature.
    pub invalid_every: Option<u64>,
    /// Report (digest, publish time) of every n-th message of publisher 0.
    pub sample_every: Option<u64>,
}

impl LoadSpec {
    pub fn total(&self) -> u64 {
        self.per_publisher * self.publishers as u64
    }

    /// Messages of one publisher that a subscriber should receive: every
    /// one but the broken envelopes, which the notary refuses before it
    /// delivers them.
    pub fn deliverable_per_publisher(&self) -> u64 {
        self.per_publisher - self.invalid_every.map_or(0, |n| self.per_publisher / n)
    }

    pub fn deliverable(&self) -> u64 {
        self.deliverable_per_publisher() * self.publishers as u64
    }
}

/// Envelopes signed before the clock starts, so that signing is not part
/// of what is measured: `[publisher][seq]`.
pub fn sign_all(spec: &LoadSpec) -> anyhow::Result<Vec<Vec<Vec<u8>>>> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let publishers: Vec<usize> = (0..spec.publishers).collect();
    let per = publishers.len().div_ceil(threads).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = publishers
            .chunks(per)
            .map(|chunk| {
                s.spawn(move || -> anyhow::Result<Vec<Vec<Vec<u8>>>> {
                    chunk.iter().map(|&p| sign_publisher(spec, p)).collect()
                })
            })
            .collect();
        let mut all = Vec::with_capacity(spec.publishers);
        for h in handles {
            match h.join() {
                Ok(part) => all.extend(part?),
                Err(_) => bail!("a signing thread panicked"),
            }
        }
        Ok(all)
    })
}

fn sign_publisher(spec: &LoadSpec, p: usize) -> anyhow::Result<Vec<Vec<u8>>> {
    let key = device_key(p);
    let id = device_id(p);
    let topic = topic(p);
    (0..spec.per_publisher)
        .map(|seq| {
            let payload = payload_bytes(spec.run, p, seq, spec.payload);
            let fields = notary_proof::envelope::EnvelopeFields {
                device_id: &id,
                counter: seq + 1,
                device_time_ms: 0,
                content_type: "text/plain",
                topic: &topic,
                payload: &payload,
            };
            let mut bytes =
                notary_proof::envelope::sign(&key, &fields).map_err(|e| anyhow::anyhow!("signing: {e}"))?;
            if spec.invalid_every.is_some_and(|n| seq % n == n - 1) {
                // The last byte belongs to the signature: the envelope stays
                // well-formed, its signature does not verify.
                if let Some(b) = bytes.last_mut() {
                    *b ^= 0x01;
                }
            }
            Ok(bytes)
        })
        .collect()
}

fn options(id: &str, port: u16) -> MqttOptions {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(60));
    o.set_clean_session(true);
    o.set_inflight(100);
    o.set_max_packet_size(1 << 20, 1 << 20);
    o
}

#[derive(Debug, Clone)]
pub struct Published {
    /// When the first publisher could start (all connected).
    pub start: Instant,
    /// Acknowledged by the broker (QoS 1) or written to the socket (QoS 0).
    pub done: u64,
    /// Publishers whose connection failed.
    pub failed_publishers: u64,
    /// From the first publish to the last acknowledgement.
    pub seconds: f64,
}

pub type Sample = (String, Instant);

/// Runs the publishers; `started` is told the instant the first may publish
/// (every connection is up by then).
pub async fn publish(
    spec: Arc<LoadSpec>,
    port: u16,
    signed: Option<Arc<Vec<Vec<Vec<u8>>>>>,
    samples: Option<std::sync::mpsc::Sender<Sample>>,
) -> anyhow::Result<Published> {
    let barrier = Arc::new(tokio::sync::Barrier::new(spec.publishers + 1));
    let mut tasks = Vec::with_capacity(spec.publishers);
    for p in 0..spec.publishers {
        let spec = spec.clone();
        let barrier = barrier.clone();
        let signed = signed.clone();
        let samples = if p == 0 { samples.clone() } else { None };
        tasks.push(tokio::spawn(async move { publisher(spec, p, port, barrier, signed, samples).await }));
    }
    // Connections come up, in rumqttd's case one per millisecond.
    tokio::time::timeout(Duration::from_secs(120), barrier.wait())
        .await
        .context("publishers did not all connect within 120 s")?;
    let start = Instant::now();
    let mut out = Published { start, done: 0, failed_publishers: 0, seconds: 0.0 };
    let mut last = start;
    for t in tasks {
        match t.await {
            Ok(Ok((n, end))) => {
                out.done += n;
                last = last.max(end);
            }
            Ok(Err(e)) => {
                eprintln!("  publisher failed: {e:#}");
                out.failed_publishers += 1;
            }
            Err(e) => bail!("publisher task: {e}"),
        }
    }
    out.seconds = last.duration_since(start).as_secs_f64();
    Ok(out)
}

async fn publisher(
    spec: Arc<LoadSpec>,
    p: usize,
    port: u16,
    barrier: Arc<tokio::sync::Barrier>,
    signed: Option<Arc<Vec<Vec<Vec<u8>>>>>,
    samples: Option<std::sync::mpsc::Sender<Sample>>,
) -> anyhow::Result<(u64, Instant)> {
    let (client, mut eventloop) =
        AsyncClient::new(options(&format!("bench-pub-{}-{p}", spec.run), port), 512);
    let (done_tx, mut done_rx) = tokio::sync::watch::channel(0u64);
    let (conn_tx, conn_rx) = tokio::sync::oneshot::channel::<()>();
    let qos = spec.qos;
    let started = Instant::now();
    let driver = tokio::spawn(async move {
        let mut conn_tx = Some(conn_tx);
        let mut done = 0u64;
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    if let Some(tx) = conn_tx.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(Event::Incoming(Packet::PubAck(_))) if qos == QoS::AtLeastOnce => {
                    done += 1;
                    done_tx.send_replace(done);
                }
                Ok(Event::Incoming(Packet::PubComp(_))) if qos == QoS::ExactlyOnce => {
                    done += 1;
                    done_tx.send_replace(done);
                }
                Ok(Event::Outgoing(Outgoing::Publish(_))) if qos == QoS::AtMostOnce => {
                    done += 1;
                    done_tx.send_replace(done);
                }
                Ok(Event::Outgoing(Outgoing::Disconnect)) => return Ok(()),
                Ok(_) => {}
                // Like a device, retry connecting: a broker under a storm of
                // connections may turn some away for a while.
                Err(_) if conn_tx.is_some() && started.elapsed() < CONNECT_PATIENCE => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(anyhow::anyhow!("publisher {p}: {e}")),
            }
        }
    });
    let connected = tokio::time::timeout(CONNECT_PATIENCE + Duration::from_secs(1), conn_rx).await;
    // Every publisher reaches the barrier, connected or not, so that the
    // others are not held up; a failed one reports its error after.
    barrier.wait().await;
    if !matches!(connected, Ok(Ok(()))) {
        driver.abort();
        bail!("publisher {p} did not connect");
    }
    let topic = topic(p);
    let start = Instant::now();
    let interval = spec.rate.map(|r| Duration::from_secs_f64(spec.publishers as f64 / r));
    for seq in 0..spec.per_publisher {
        if let Some(iv) = interval {
            let due = start + iv.mul_f64(seq as f64);
            if due > Instant::now() + Duration::from_millis(1) {
                tokio::time::sleep_until(due.into()).await;
            }
        }
        let bytes = match &signed {
            Some(all) => all.get(p).and_then(|m| m.get(seq as usize)).cloned().unwrap_or_default(),
            None => payload_bytes(spec.run, p, seq, spec.payload),
        };
        if let (Some(tx), Some(every)) = (&samples, spec.sample_every) {
            if seq % every == 0 {
                let _ = tx.send((blake3::hash(&bytes).to_hex().to_string(), Instant::now()));
            }
        }
        if client.publish(topic.as_str(), qos, false, bytes).await.is_err() {
            break;
        }
    }
    let n = spec.per_publisher;
    let waited = tokio::time::timeout(STALL * 3, done_rx.wait_for(|d| *d >= n)).await.map(|r| r.is_ok());
    let end = Instant::now();
    let done = *done_rx.borrow();
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(5), driver).await;
    if waited != Ok(true) {
        eprintln!("  publisher {p}: {done} of {n} acknowledged");
    }
    Ok((done, end))
}

/// The topic the third-party subscriber cross-checks: publisher 0's.
pub const CROSSCHECK_TOPIC: &str = "bench/0";

/// A subscriber counting deliveries (the warm-up excepted): all of them,
/// and those on [`CROSSCHECK_TOPIC`].
pub struct Counter {
    pub count: Arc<AtomicU64>,
    pub topic0: Arc<AtomicU64>,
    pub warm: Arc<AtomicBool>,
    /// When the latest counted message arrived.
    pub last: Arc<Mutex<Option<Instant>>>,
    stop: Box<dyn FnOnce() + Send>,
}

impl Counter {
    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }
    pub fn topic0(&self) -> u64 {
        self.topic0.load(Relaxed)
    }
    pub fn last(&self) -> Option<Instant> {
        self.last.lock().ok().and_then(|l| *l)
    }
    pub fn stop(self) {
        (self.stop)()
    }

    fn new(stop: Box<dyn FnOnce() + Send>) -> (Counter, Seen) {
        let seen = Seen {
            count: Arc::new(AtomicU64::new(0)),
            topic0: Arc::new(AtomicU64::new(0)),
            warm: Arc::new(AtomicBool::new(false)),
            last: Arc::new(Mutex::new(None)),
        };
        let counter = Counter {
            count: seen.count.clone(),
            topic0: seen.topic0.clone(),
            warm: seen.warm.clone(),
            last: seen.last.clone(),
            stop,
        };
        (counter, seen)
    }
}

/// The receiving side of a [`Counter`].
struct Seen {
    count: Arc<AtomicU64>,
    topic0: Arc<AtomicU64>,
    warm: Arc<AtomicBool>,
    last: Arc<Mutex<Option<Instant>>>,
}

impl Seen {
    fn topic(&self, topic: &[u8]) {
        if topic == WARMUP_TOPIC.as_bytes() {
            self.warm.store(true, Relaxed);
        } else if topic.starts_with(b"bench/") {
            self.count.fetch_add(1, Relaxed);
            if topic == CROSSCHECK_TOPIC.as_bytes() {
                self.topic0.fetch_add(1, Relaxed);
            }
            if let Ok(mut l) = self.last.lock() {
                *l = Some(Instant::now());
            }
        }
    }
}

/// Our rumqttc subscriber.
pub async fn subscriber(port: u16, qos: QoS, run: u32) -> anyhow::Result<Counter> {
    let (client, mut eventloop) = AsyncClient::new(options(&format!("bench-sub-{run}"), port), 64);
    client.subscribe("bench/#", qos).await?;
    let (counter, seen) = Counter::new(Box::new(|| {}));
    let task = tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => seen.topic(p.topic.as_bytes()),
                Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
                Ok(_) => {}
                Err(e) => {
                    eprintln!("  subscriber: {e}");
                    return;
                }
            }
        }
    });
    Ok(Counter {
        stop: Box::new(move || {
            task.abort();
            drop(client);
        }),
        ..counter
    })
}

/// The third-party cross-check: `mosquitto_sub` printing the topic of each
/// message on [`CROSSCHECK_TOPIC`] (one publisher's stream: a subscriber to
/// everything would cost as much as the broker under test on a small
/// machine, and skew every figure).
pub fn mosquitto_sub(port: u16, qos: QoS, run: u32) -> anyhow::Result<Counter> {
    let q = match qos {
        QoS::AtMostOnce => "0",
        QoS::AtLeastOnce => "1",
        QoS::ExactlyOnce => "2",
    };
    let mut child = std::process::Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", q, "-F", "%t"])
        .args(["-t", CROSSCHECK_TOPIC, "-t", WARMUP_TOPIC])
        .args(["-i", &format!("bench-check-{run}")])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("starting mosquitto_sub (Debian's mosquitto-clients)")?;
    let stdout = child.stdout.take().context("mosquitto_sub stdout")?;
    let child = Arc::new(Mutex::new(child));
    let killer = child.clone();
    let (counter, seen) = Counter::new(Box::new(move || {
        if let Ok(mut c) = killer.lock() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }));
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            seen.topic(line.as_bytes());
        }
    });
    Ok(counter)
}

/// Publishes warm-up messages (QoS 1) until `ready` says yes; returns how
/// many the broker acknowledged.
pub async fn warm_up(port: u16, run: u32, mut ready: impl FnMut() -> bool) -> anyhow::Result<u64> {
    let (client, mut eventloop) = AsyncClient::new(options(&format!("bench-warmup-{run}"), port), 16);
    let acked = Arc::new(AtomicU64::new(0));
    let a = acked.clone();
    let task = tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    a.fetch_add(1, Relaxed);
                }
                Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => return,
                Ok(_) => {}
            }
        }
    });
    let start = Instant::now();
    let mut sent = 0u64;
    while !ready() {
        if start.elapsed() > Duration::from_secs(60) {
            bail!("subscribers did not see the warm-up within 60 s");
        }
        client.publish(WARMUP_TOPIC, QoS::AtLeastOnce, false, b"warm-up".to_vec()).await?;
        sent += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let wait = start + Duration::from_secs(10);
    while acked.load(Relaxed) < sent && Instant::now() < wait {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    Ok(acked.load(Relaxed))
}
