//! What the benchmark asks a running notary: metrics, when a message's
//! proof becomes available, and how fast proof requests are answered over
//! HTTP and MQTT.

use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new().timeout(Duration::from_secs(10)).build()
}

/// The status of a GET, or `None` when nothing answered.
pub fn http_status(port: u16, path: &str) -> Option<u16> {
    get(&agent(), port, path).map(|(s, _)| s)
}

fn get(agent: &ureq::Agent, port: u16, path: &str) -> Option<(u16, String)> {
    match agent.get(&format!("http://127.0.0.1:{port}{path}")).call() {
        Ok(r) => {
            let s = r.status();
            Some((s, r.into_string().unwrap_or_default()))
        }
        Err(ureq::Error::Status(s, r)) => Some((s, r.into_string().unwrap_or_default())),
        Err(_) => None,
    }
}

/// The body of a 200 answer.
pub fn http_get(port: u16, path: &str) -> Option<String> {
    match get(&agent(), port, path)? {
        (200, body) => Some(body),
        _ => None,
    }
}

/// One counter or gauge from `/metrics`.
pub fn metric(port: u16, name: &str) -> Option<u64> {
    let (_, text) = get(&agent(), port, "/metrics")?;
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Percentiles of latencies, in milliseconds.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Latency {
    pub count: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Requests that got no (or a wrong) answer.
    pub failed: usize,
}

impl Latency {
    pub fn of(mut ms: Vec<f64>, failed: usize) -> Latency {
        ms.sort_by(f64::total_cmp);
        let at = |q: f64| {
            if ms.is_empty() {
                0.0
            } else {
                ms[((ms.len() as f64 * q).ceil() as usize).clamp(1, ms.len()) - 1]
            }
        };
        Latency { count: ms.len(), p50_ms: at(0.50), p99_ms: at(0.99), max_ms: at(1.0), failed }
    }
}

/// Watches sampled messages until their proofs are served: after every
/// checkpoint the notary publishes (and every 200 ms in case one was
/// missed) each pending sample is asked for once over HTTP. Returns the
/// latencies from publish to the first 200 answer, and the digests proven.
pub struct ProofWatch {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<(Vec<f64>, usize, Vec<String>)>,
    available: Arc<Mutex<Vec<String>>>,
    mqtt: Option<(AsyncClient, tokio::task::JoinHandle<()>)>,
}

impl ProofWatch {
    pub async fn start(
        mqtt_port: u16,
        http_port: u16,
        samples: std::sync::mpsc::Receiver<crate::load::Sample>,
    ) -> anyhow::Result<ProofWatch> {
        let (tick_tx, tick_rx) = std::sync::mpsc::channel::<()>();
        let mut opts = MqttOptions::new("bench-checkpoints", "127.0.0.1", mqtt_port);
        opts.set_keep_alive(Duration::from_secs(60));
        let (client, mut eventloop) = AsyncClient::new(opts, 16);
        client.subscribe("$notary/checkpoint", QoS::AtMostOnce).await?;
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::Publish(_))) => {
                        let _ = tick_tx.send(());
                    }
                    Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        });
        let stop = Arc::new(AtomicBool::new(false));
        let available = Arc::new(Mutex::new(Vec::new()));
        let (s, a) = (stop.clone(), available.clone());
        let handle = std::thread::spawn(move || watch(http_port, samples, tick_rx, s, a));
        Ok(ProofWatch { stop, handle, available, mqtt: Some((client, task)) })
    }

    /// Digests whose proofs were served so far.
    pub fn available(&self) -> Vec<String> {
        self.available.lock().map(|a| a.clone()).unwrap_or_default()
    }

    /// Waits (at most `patience`) for the samples still pending, then stops.
    pub async fn finish(mut self, patience: Duration) -> (Latency, Vec<String>) {
        let deadline = Instant::now() + patience;
        let stop = self.stop.clone();
        tokio::task::spawn_blocking(move || {
            while Instant::now() < deadline && !stop.load(Relaxed) {
                std::thread::sleep(Duration::from_millis(50));
            }
            stop.store(true, Relaxed);
        });
        let handle = self.handle;
        let (ms, failed, proven) =
            tokio::task::spawn_blocking(move || handle.join().unwrap_or_default()).await.unwrap_or_default();
        if let Some((client, task)) = self.mqtt.take() {
            let _ = client.disconnect().await;
            task.abort();
        }
        (Latency::of(ms, failed), proven)
    }
}

fn watch(
    http_port: u16,
    samples: std::sync::mpsc::Receiver<crate::load::Sample>,
    ticks: std::sync::mpsc::Receiver<()>,
    stop: Arc<AtomicBool>,
    available: Arc<Mutex<Vec<String>>>,
) -> (Vec<f64>, usize, Vec<String>) {
    let agent = agent();
    let mut pending: Vec<crate::load::Sample> = Vec::new();
    let mut latencies = Vec::new();
    let mut publishing_done = false;
    loop {
        let tick = ticks.recv_timeout(Duration::from_millis(200));
        loop {
            match samples.try_recv() {
                Ok(s) => pending.push(s),
                Err(std::sync::mpsc::TryRecvError::Empty) => break,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    publishing_done = true;
                    break;
                }
            }
        }
        if matches!(tick, Err(std::sync::mpsc::RecvTimeoutError::Disconnected)) {
            std::thread::sleep(Duration::from_millis(200));
        }
        pending.retain(|(digest, at)| match get(&agent, http_port, &format!("/v1/proofs/{digest}")) {
            Some((200, _)) => {
                latencies.push(at.elapsed().as_secs_f64() * 1000.0);
                if let Ok(mut a) = available.lock() {
                    a.push(digest.clone());
                }
                false
            }
            _ => true,
        });
        // Stop when told to (the patience ran out) or when every sample
        // published has been proven.
        if stop.load(Relaxed) || (publishing_done && pending.is_empty()) {
            stop.store(true, Relaxed);
            let proven = available.lock().map(|a| a.clone()).unwrap_or_default();
            return (latencies, pending.len(), proven);
        }
    }
}

/// Asks for the proofs of `digests`, round robin, at `rate` per second for
/// `duration` (or `max` requests) over HTTP (one keep-alive connection, as
/// a client library would). Latency is measured from the moment each request was due, so a
/// slow answer also counts against the requests queued behind it.
pub fn http_requests(port: u16, digests: &[String], rate: f64, duration: Duration, max: usize) -> Latency {
    let agent = agent();
    let interval = Duration::from_secs_f64(1.0 / rate);
    let start = Instant::now();
    let (mut ms, mut failed) = (Vec::new(), 0);
    let mut i = 0usize;
    while !digests.is_empty() && start.elapsed() < duration && i < max {
        let due = start + interval.mul_f64(i as f64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let digest = &digests[i % digests.len()];
        match get(&agent, port, &format!("/v1/proofs/{digest}")) {
            Some((200, _)) => ms.push(due.elapsed().as_secs_f64() * 1000.0),
            _ => failed += 1,
        }
        i += 1;
    }
    Latency::of(ms, failed)
}

/// The same over MQTT: requests to `$notary/proof/request`, answers in our
/// client's inbox `$notary/inbox/<client id>/...`, matched by id.
pub async fn mqtt_requests(
    port: u16,
    digests: &[String],
    rate: f64,
    duration: Duration,
) -> anyhow::Result<Latency> {
    const CLIENT_ID: &str = "bench-proof-client";
    let inbox = format!("$notary/inbox/{CLIENT_ID}/proof");
    let mut opts = MqttOptions::new(CLIENT_ID, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(60));
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(opts, 64);
    client.subscribe(inbox.as_str(), QoS::AtMostOnce).await?;
    let sent: Arc<Mutex<HashMap<u64, Instant>>> = Arc::new(Mutex::new(HashMap::new()));
    let answers: Arc<Mutex<Vec<f64>>> = Arc::new(Mutex::new(Vec::new()));
    let (subscribed_tx, subscribed_rx) = tokio::sync::oneshot::channel::<()>();
    let (s, a) = (sent.clone(), answers.clone());
    let task = tokio::spawn(async move {
        let mut subscribed_tx = Some(subscribed_tx);
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(tx) = subscribed_tx.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&p.payload) else { continue };
                    let ok = v.get("status").and_then(|s| s.as_str()) == Some("ok");
                    let Some(id) = v.get("id").and_then(|i| i.as_u64()) else { continue };
                    let due = s.lock().ok().and_then(|mut m| m.remove(&id));
                    if let (true, Some(due)) = (ok, due) {
                        if let Ok(mut a) = a.lock() {
                            a.push(due.elapsed().as_secs_f64() * 1000.0);
                        }
                    }
                }
                Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => return,
                Ok(_) => {}
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(30), subscribed_rx).await??;
    let interval = Duration::from_secs_f64(1.0 / rate);
    let start = Instant::now();
    let mut i = 0u64;
    while !digests.is_empty() && start.elapsed() < duration {
        let due = start + interval.mul_f64(i as f64);
        tokio::time::sleep_until(due.into()).await;
        let digest = &digests[i as usize % digests.len()];
        if let Ok(mut m) = sent.lock() {
            m.insert(i, due);
        }
        let req = serde_json::json!({"id": i, "digest": digest, "reply_to": inbox});
        client.publish("$notary/proof/request", QoS::AtMostOnce, false, req.to_string().into_bytes()).await?;
        i += 1;
    }
    // Answers still on their way get a second to arrive.
    let deadline = Instant::now() + Duration::from_secs(5);
    while sent.lock().map(|m| !m.is_empty()).unwrap_or(false) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = client.disconnect().await;
    task.abort();
    let failed = sent.lock().map(|m| m.len()).unwrap_or(0);
    let ms = answers.lock().map(|a| a.clone()).unwrap_or_default();
    Ok(Latency::of(ms, failed))
}
