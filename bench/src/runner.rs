//! The benchmark's phases, in one run: throughput of each system at QoS 0
//! and 1, signed traffic with and without bad signatures, latencies at half
//! capacity, scaling curves, and memory as the store grows.

use crate::load::{self, LoadSpec, STALL};
use crate::probe::{self, Latency};
use crate::systems::{Kind, System};
use anyhow::Context as _;
use rumqttc::QoS;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Plan {
    pub quick: bool,
    /// Messages per throughput run, over `publishers` connections.
    pub messages: u64,
    pub publishers: usize,
    pub payload: usize,
    pub signed_messages: u64,
    /// Length of the latency runs at half capacity.
    pub latency_seconds: f64,
    /// Proof requests per second, over HTTP and over MQTT each.
    pub request_rate: f64,
    pub scaling: bool,
    pub scale_publishers: Vec<usize>,
    pub scale_payloads: Vec<usize>,
    /// Messages per scaling point (fewer for large payloads: at most
    /// `scale_bytes` of payload per point).
    pub scale_messages: u64,
    pub scale_bytes: u64,
    /// Store sizes at which memory and proof latency are sampled, and the
    /// proof requests made at each.
    pub store_steps: Vec<u64>,
    pub store_requests: usize,
    pub ceiling_seconds: f64,
    /// The retention phase: messages sent in all, and the horizon, in
    /// messages (turned into `retention.max_bytes`: the store's bytes in
    /// use once it holds that many).
    #[serde(default)]
    pub retention_messages: u64,
    #[serde(default)]
    pub retention_horizon: u64,
    /// Only these systems (all when empty).
    #[serde(default)]
    pub only: Vec<Kind>,
}

impl Plan {
    fn includes(&self, kind: Kind) -> bool {
        self.only.is_empty() || self.only.contains(&kind)
    }

    pub fn full() -> Plan {
        Plan {
            quick: false,
            messages: 500_000,
            publishers: 10,
            payload: load::DEFAULT_PAYLOAD,
            signed_messages: 200_000,
            latency_seconds: 20.0,
            request_rate: 200.0,
            scaling: true,
            scale_publishers: vec![1, 10, 100, 1000],
            scale_payloads: vec![100, 1024, 16384],
            scale_messages: 300_000,
            scale_bytes: 300_000_000,
            store_steps: (1..=10).map(|m| m * 1_000_000).collect(),
            store_requests: 1000,
            ceiling_seconds: 3.0,
            retention_messages: 10_000_000,
            retention_horizon: 2_000_000,
            only: Vec::new(),
        }
    }

    pub fn quick() -> Plan {
        Plan {
            quick: true,
            messages: 20_000,
            publishers: 10,
            payload: load::DEFAULT_PAYLOAD,
            signed_messages: 10_000,
            latency_seconds: 3.0,
            request_rate: 100.0,
            scaling: true,
            scale_publishers: vec![1, 100],
            scale_payloads: vec![100, 16384],
            scale_messages: 10_000,
            scale_bytes: 20_000_000,
            store_steps: vec![50_000, 100_000],
            store_requests: 200,
            ceiling_seconds: 0.5,
            retention_messages: 100_000,
            retention_horizon: 20_000,
            only: Vec::new(),
        }
    }
}

/// One system under one load, measured to the end.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Run {
    pub system: Kind,
    pub qos: u8,
    pub publishers: usize,
    pub payload: usize,
    /// Envelopes with a broken signature, per thousand.
    pub invalid_per_mille: u64,
    pub messages: u64,
    /// Acknowledged by the broker (QoS 1) or written to the socket (QoS 0).
    pub published: u64,
    pub failed_publishers: u64,
    /// Received by our subscriber.
    pub delivered: u64,
    /// Published and not delivered to our subscriber.
    pub lost: u64,
    /// Published and neither persisted nor rejected (notarizing systems).
    pub unnotarized: Option<u64>,
    /// Publisher 0's stream as counted by `mosquitto_sub` (third party) and
    /// by our subscriber, against what that publisher sent.
    pub crosscheck: Crosscheck,
    pub delivered_per_s: f64,
    /// Leaves persisted, envelopes rejected, messages the broker dropped
    /// before the notary read them (notarizing systems only).
    pub notarized: Option<u64>,
    pub rejected: Option<u64>,
    pub gap: Option<u64>,
    /// Messages persisted or rejected with a reason, per second.
    pub notarized_per_s: Option<f64>,
    pub cpu_s_per_1k: f64,
    pub peak_rss_mib: f64,
    pub disk_bytes_per_msg: Option<f64>,
    /// A baseline is measured several times per run: every repeat's
    /// delivered msg/s (this run is the fastest of them). Empty otherwise.
    #[serde(default)]
    pub repeats: Vec<f64>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Crosscheck {
    pub topic: String,
    pub published: u64,
    pub ours: u64,
    pub mosquitto_sub: u64,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LatencyRun {
    pub system: Kind,
    /// Publishing rate (half of the system's notarized QoS 1 capacity).
    pub ingest_per_s: f64,
    pub max_batch_age_ms: u64,
    pub publish_to_proof: Latency,
    pub http: Latency,
    pub mqtt: Latency,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct StorePoint {
    pub stored: u64,
    pub rss_mib: f64,
    pub disk_bytes_per_msg: f64,
    pub proof_http: Latency,
}

/// One chunk of the retention phase.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RetentionPoint {
    /// Messages sent so far.
    pub sent: u64,
    /// Leaves pruned so far.
    pub pruned: u64,
    /// This chunk's messages persisted per second.
    pub notarized_per_s: f64,
    pub rss_mib: f64,
    /// The data directory's bytes (store, WAL, ledger, keys).
    pub disk_mib: f64,
    /// The store's bytes in use (`notary_store_used_bytes`).
    pub used_mib: f64,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Results {
    pub machine: crate::machine::Machine,
    pub plan: Plan,
    pub seconds: f64,
    pub ceiling: crate::ceiling::Ceiling,
    pub runs: Vec<Run>,
    pub signed: Vec<Run>,
    pub latency: Vec<LatencyRun>,
    pub scaling: Vec<Run>,
    pub store: Vec<StorePoint>,
    /// The retention phase, with its `max_bytes`.
    #[serde(default)]
    pub retention: Vec<RetentionPoint>,
    #[serde(default)]
    pub retention_max_bytes: u64,
    pub targets: Vec<crate::report::Target>,
}

/// Busier than this (share of all cores) before a run is not quiet.
const QUIET: f64 = 0.05;

/// Default `log.max_batch_age_ms`: the notary's benchmark config keeps it.
pub(crate) const MAX_BATCH_AGE_MS: u64 = 1000;

pub fn run(plan: &Plan, out: &Path) -> anyhow::Result<()> {
    let began = Instant::now();
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    crate::systems::mosquitto()?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let mut machine = crate::machine::Machine::read();
    // A quiet machine first: wait (up to a minute) for other load to end,
    // and record what was left of it.
    let quiet_by = Instant::now() + Duration::from_secs(60);
    loop {
        machine.busy_before = crate::machine::busy(Duration::from_secs(1));
        if machine.busy_before <= QUIET || Instant::now() >= quiet_by {
            break;
        }
        eprintln!("waiting for a quiet machine: {:.0} % busy", machine.busy_before * 100.0);
    }
    if machine.busy_before > QUIET {
        eprintln!(
            "warning: the machine is {:.0} % busy with other work; figures are skewed",
            machine.busy_before * 100.0
        );
    }
    eprintln!(
        "bench: {} ({} cores), {}",
        machine.cpu,
        machine.cores,
        if plan.quick { "quick" } else { "full" }
    );
    let mut run_id = 0u32;
    let mut next_run = || {
        run_id += 1;
        run_id
    };

    eprintln!("ed25519 ceiling ...");
    let ceiling = crate::ceiling::measure(plan.ceiling_seconds);
    eprintln!("  {:.0} signatures/s on {} threads", ceiling.all_threads, ceiling.threads);

    let base = |qos, signed: bool| LoadSpec {
        run: 0,
        publishers: plan.publishers,
        per_publisher: (if signed { plan.signed_messages } else { plan.messages }) / plan.publishers as u64,
        payload: plan.payload,
        qos,
        rate: None,
        signed,
        invalid_every: None,
        sample_every: None,
    };

    let mut runs = Vec::new();
    let included = |kinds: &[Kind]| kinds.iter().copied().filter(|k| plan.includes(*k)).collect::<Vec<_>>();
    for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
        let kinds = included(&[
            Kind::Mosquitto,
            Kind::Rumqttd,
            Kind::Rmqtt,
            Kind::Notary,
            Kind::NotarySigned,
            Kind::Sidecar,
        ]);
        let spec = |kind: Kind| base(qos, kind.signed());
        runs.extend(interleaved(&rt, &kinds, spec, &mut next_run)?);
    }
    // 100 publishers at QoS 1: with acknowledgements after commits, many
    // connections share each commit.
    let spec = |_| LoadSpec {
        publishers: 100,
        per_publisher: (plan.messages / 100).max(1),
        ..base(QoS::AtLeastOnce, false)
    };
    runs.extend(interleaved(&rt, &included(&[Kind::Mosquitto, Kind::Notary]), spec, &mut next_run)?);
    // One publisher, QoS 1, 100 in flight: a connection's rate when each
    // acknowledgement waits for a commit.
    let spec =
        |_| LoadSpec { publishers: 1, per_publisher: plan.messages / 10, ..base(QoS::AtLeastOnce, false) };
    let kinds = included(&[Kind::Mosquitto, Kind::Rmqtt, Kind::Notary]);
    runs.extend(interleaved(&rt, &kinds, spec, &mut next_run)?);
    let mut signed = Vec::new();
    for invalid_every in [None, Some(1000)].into_iter().filter(|_| plan.includes(Kind::NotarySigned)) {
        let spec = LoadSpec { run: next_run(), invalid_every, ..base(QoS::AtMostOnce, true) };
        signed.push(throughput(&rt, Kind::NotarySigned, spec)?);
    }

    let mut latency = Vec::new();
    for kind in [Kind::Notary, Kind::NotarySigned, Kind::Sidecar].into_iter().filter(|k| plan.includes(*k)) {
        let capacity = runs
            .iter()
            .find(|r| r.system == kind && r.qos == 1)
            .and_then(|r| r.notarized_per_s)
            .unwrap_or(1000.0);
        latency.push(latency_run(&rt, kind, capacity / 2.0, plan, next_run())?);
    }

    let mut scaling = Vec::new();
    let mut store = Vec::new();
    if plan.scaling {
        for kind in [Kind::Mosquitto, Kind::Rumqttd, Kind::Rmqtt, Kind::Notary]
            .into_iter()
            .filter(|k| plan.includes(*k))
        {
            for &publishers in &plan.scale_publishers {
                let per = (plan.scale_messages / publishers as u64).max(1);
                let spec = LoadSpec {
                    run: next_run(),
                    publishers,
                    per_publisher: per,
                    ..base(QoS::AtMostOnce, false)
                };
                scaling.push(throughput(&rt, kind, spec)?);
            }
            for &payload in &plan.scale_payloads {
                let messages = plan.scale_messages.min(plan.scale_bytes / payload as u64);
                let spec = LoadSpec {
                    run: next_run(),
                    payload,
                    per_publisher: (messages / plan.publishers as u64).max(1),
                    ..base(QoS::AtMostOnce, false)
                };
                scaling.push(throughput(&rt, kind, spec)?);
            }
        }
        if plan.includes(Kind::Notary) {
            store = store_growth(&rt, plan, next_run())?;
        }
    }
    let (retention, retention_max_bytes) = if plan.includes(Kind::Notary) && plan.retention_messages > 0 {
        retention_phase(&rt, plan, next_run())?
    } else {
        (Vec::new(), 0)
    };

    let mut results = Results {
        machine,
        plan: plan.clone(),
        seconds: 0.0,
        ceiling,
        runs,
        signed,
        latency,
        scaling,
        store,
        retention,
        retention_max_bytes,
        targets: Vec::new(),
    };
    results.targets = crate::report::targets(&results, MAX_BATCH_AGE_MS);
    results.seconds = began.elapsed().as_secs_f64();
    crate::report::write(&results, out)?;
    Ok(())
}

/// A plain broker is measured this many times per load, so that the ratios
/// rest on the best of them and the spread shows how much it varies.
const BASELINE_REPEATS: usize = 2;

/// [`throughput`] of each of `kinds` under the same load, the plain
/// brokers (baselines) [`BASELINE_REPEATS`] times, interleaved with the
/// notarizing systems: every system once, then the baselines again, so a
/// baseline's runs bracket the notary's and a change in the machine's
/// speed during the run shows as a baseline's spread. Each baseline keeps
/// its fastest run, with every repeat's rate recorded.
fn interleaved(
    rt: &tokio::runtime::Runtime,
    kinds: &[Kind],
    spec: impl Fn(Kind) -> LoadSpec,
    next_run: &mut impl FnMut() -> u32,
) -> anyhow::Result<Vec<Run>> {
    let mut all: Vec<Vec<Run>> = Vec::new();
    for &kind in kinds {
        all.push(vec![throughput(rt, kind, LoadSpec { run: next_run(), ..spec(kind) })?]);
    }
    for _ in 1..BASELINE_REPEATS {
        for (i, &kind) in kinds.iter().enumerate().filter(|(_, k)| !k.notarizes()) {
            all[i].push(throughput(rt, kind, LoadSpec { run: next_run(), ..spec(kind) })?);
        }
    }
    all.into_iter()
        .map(|runs| {
            let repeats =
                if runs.len() > 1 { runs.iter().map(|r| r.delivered_per_s).collect() } else { Vec::new() };
            let best = runs
                .into_iter()
                .max_by(|a, b| a.delivered_per_s.total_cmp(&b.delivered_per_s))
                .context("at least one run")?;
            Ok(Run { repeats, ..best })
        })
        .collect()
}

fn qos_number(q: QoS) -> u8 {
    match q {
        QoS::AtMostOnce => 0,
        QoS::AtLeastOnce => 1,
        QoS::ExactlyOnce => 2,
    }
}

fn metric(sys: &System, name: &str) -> u64 {
    sys.http_port.and_then(|p| probe::metric(p, name)).unwrap_or(0)
}

/// A notarizing system's counts: (persisted, rejected, dropped by the broker).
fn notary_counts(sys: &System) -> (u64, u64, u64) {
    if !sys.kind.notarizes() {
        return (0, 0, 0);
    }
    let Some(port) = sys.http_port else { return (0, 0, 0) };
    let Some(text) = probe::http_get(port, "/metrics") else { return (0, 0, 0) };
    let value = |prefix: &str| -> u64 {
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    (
        value("notary_messages_notarized_total "),
        value("notary_messages_rejected_total{"),
        value("notary_gap_messages_total "),
    )
}

/// A started, warmed-up system with its subscribers.
struct Prepared {
    sys: System,
    sub: load::Counter,
    cross: Option<load::Counter>,
    /// The notary's counts after the warm-up, to subtract.
    base: (u64, u64, u64),
}

/// Starts a system, warms it up with every subscriber connected, and
/// returns the counts to subtract (the warm-up's).
fn prepare(
    rt: &tokio::runtime::Runtime,
    kind: Kind,
    spec: &LoadSpec,
    crosscheck: bool,
) -> anyhow::Result<Prepared> {
    let mut sys = System::start(kind, if kind.signed() { spec.publishers } else { 0 })?;
    let port = sys.mqtt_port;
    let sub = rt.block_on(load::subscriber(port, spec.qos, spec.run))?;
    let cross = if crosscheck { Some(load::mosquitto_sub(port, spec.qos, spec.run)?) } else { None };
    let warmed = rt.block_on(load::warm_up(port, spec.run, || {
        sub.warm.load(std::sync::atomic::Ordering::Relaxed)
            && cross.as_ref().is_none_or(|c| c.warm.load(std::sync::atomic::Ordering::Relaxed))
            && (!kind.notarizes() || metric(&sys, "notary_messages_notarized_total") > 0)
    }))?;
    // Wait for the warm-up to be notarized, so the counts start from it.
    let start = Instant::now();
    let mut counts = notary_counts(&sys);
    while kind.notarizes() && counts.0 < warmed && start.elapsed() < STALL {
        std::thread::sleep(Duration::from_millis(20));
        counts = notary_counts(&sys);
    }
    sys.check_alive()?;
    Ok(Prepared { sys, sub, cross, base: counts })
}

/// Closed-loop (or fixed-rate) publishing, measured until every message is
/// delivered and notarized, or until nothing moves for [`STALL`].
fn throughput(rt: &tokio::runtime::Runtime, kind: Kind, spec: LoadSpec) -> anyhow::Result<Run> {
    eprintln!(
        "{:<22} qos {} {:>5} publishers {:>6} B {:>8} messages{}",
        kind.label(),
        qos_number(spec.qos),
        spec.publishers,
        spec.payload,
        spec.total(),
        spec.invalid_every.map_or(String::new(), |n| format!(", 1 in {n} signatures broken"))
    );
    let signed = if spec.signed { Some(Arc::new(load::sign_all(&spec)?)) } else { None };
    let Prepared { mut sys, sub, cross, base } = prepare(rt, kind, &spec, true)?;
    let cpu0 = sys.cpu_seconds();
    let spec = Arc::new(spec);
    let published = rt.block_on(load::publish(spec.clone(), sys.mqtt_port, signed, None))?;
    let target = published.done;

    // Wait for delivery and notarization to complete or stall.
    let mut notarized_at = None;
    let mut last_change = Instant::now();
    let mut seen = (0, 0, (0, 0, 0));
    loop {
        let counts = notary_counts(&sys);
        let now = (sub.count(), cross.as_ref().map_or(0, |c| c.topic0()), counts);
        let (n, r) = (counts.0.saturating_sub(base.0), counts.1.saturating_sub(base.1));
        if kind.notarizes() && notarized_at.is_none() && n + r >= target {
            notarized_at = Some(Instant::now());
        }
        let refused = spec.total() - spec.deliverable();
        let delivered = now.0 >= target.saturating_sub(refused) && now.1 >= spec.deliverable_per_publisher();
        if delivered && (!kind.notarizes() || notarized_at.is_some()) {
            break;
        }
        if now != seen {
            seen = now;
            last_change = Instant::now();
        } else if last_change.elapsed() > STALL {
            eprintln!("  stalled: {now:?} of {target}");
            break;
        }
        sys.check_alive()?;
        std::thread::sleep(Duration::from_millis(10));
    }
    let cpu = sys.cpu_seconds() - cpu0;
    let counts = notary_counts(&sys);
    let (n, r, g) =
        (counts.0.saturating_sub(base.0), counts.1.saturating_sub(base.1), counts.2.saturating_sub(base.2));
    let delivered = sub.count();
    let secs =
        |t: Option<Instant>| t.map(|t| t.duration_since(published.start).as_secs_f64()).filter(|s| *s > 0.0);
    let delivered_per_s = secs(sub.last()).map_or(0.0, |s| delivered as f64 / s);
    let run = Run {
        system: kind,
        qos: qos_number(spec.qos),
        publishers: spec.publishers,
        payload: spec.payload,
        invalid_per_mille: spec.invalid_every.map_or(0, |n| 1000 / n),
        messages: spec.total(),
        published: published.done,
        failed_publishers: published.failed_publishers,
        delivered,
        crosscheck: Crosscheck {
            topic: load::CROSSCHECK_TOPIC.to_owned(),
            published: spec.per_publisher,
            ours: sub.topic0(),
            mosquitto_sub: cross.as_ref().map_or(0, |c| c.topic0()),
        },
        lost: spec.deliverable().saturating_sub(delivered),
        unnotarized: kind.notarizes().then(|| spec.total().saturating_sub(n + r)),
        delivered_per_s,
        notarized: kind.notarizes().then_some(n),
        rejected: kind.notarizes().then_some(r),
        gap: kind.notarizes().then_some(g),
        notarized_per_s: if kind.notarizes() { secs(notarized_at).map(|s| (n + r) as f64 / s) } else { None },
        cpu_s_per_1k: cpu / (spec.total().max(1) as f64 / 1000.0),
        peak_rss_mib: sys.peak_rss() as f64 / (1024.0 * 1024.0),
        disk_bytes_per_msg: kind.notarizes().then(|| sys.disk_bytes() as f64 / (n + r).max(1) as f64),
        repeats: Vec::new(),
    };
    sub.stop();
    if let Some(c) = cross {
        c.stop();
    }
    sys.stop();
    eprintln!(
        "  delivered {:>9.0}/s{}  lost {}{}  cpu {:.3} s/1k  rss {:.0} MiB",
        run.delivered_per_s,
        run.notarized_per_s.map_or(String::new(), |v| format!("  notarized {v:>9.0}/s")),
        run.lost,
        run.unnotarized.map_or(String::new(), |u| format!(" (not notarized {u})")),
        run.cpu_s_per_1k,
        run.peak_rss_mib
    );
    Ok(run)
}

/// Publishes at `rate` (QoS 1) and meanwhile measures publish → proof
/// available for sampled messages, and proof requests over HTTP and MQTT.
fn latency_run(
    rt: &tokio::runtime::Runtime,
    kind: Kind,
    rate: f64,
    plan: &Plan,
    run: u32,
) -> anyhow::Result<LatencyRun> {
    eprintln!(
        "{:<22} latency at {rate:.0} msg/s, {} proof requests/s per API",
        kind.label(),
        plan.request_rate
    );
    let publishers = plan.publishers;
    let per_publisher = ((rate * plan.latency_seconds) / publishers as f64).ceil().max(1.0) as u64;
    // About 50 samples per second from publisher 0.
    let sample_every = ((rate / publishers as f64) / 50.0).ceil().max(1.0) as u64;
    let spec = LoadSpec {
        run,
        publishers,
        per_publisher,
        payload: plan.payload,
        qos: QoS::AtLeastOnce,
        rate: Some(rate),
        signed: kind.signed(),
        invalid_every: None,
        sample_every: Some(sample_every),
    };
    let signed = if spec.signed { Some(Arc::new(load::sign_all(&spec)?)) } else { None };
    let Prepared { sys, sub, .. } = prepare(rt, kind, &spec, false)?;
    let http_port = sys.http_port.context("a notarizing system has an HTTP port")?;
    let mqtt_port = sys.mqtt_port;
    let (sample_tx, sample_rx) = std::sync::mpsc::channel();
    let watch = rt.block_on(probe::ProofWatch::start(mqtt_port, http_port, sample_rx))?;
    let spec = Arc::new(spec);
    let publishing = rt.spawn(load::publish(spec.clone(), mqtt_port, signed, Some(sample_tx)));

    // Proof requests start once some proofs exist, and ask for those.
    let begin = Instant::now();
    let mut digests = watch.available();
    while digests.len() < 5 && begin.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(20));
        digests = watch.available();
    }
    let remaining = Duration::from_secs_f64(plan.latency_seconds).saturating_sub(begin.elapsed());
    let window = remaining.max(Duration::from_secs(1));
    let http_digests = digests.clone();
    let rate_req = plan.request_rate;
    let http = std::thread::spawn(move || {
        probe::http_requests(http_port, &http_digests, rate_req, window, usize::MAX)
    });
    let mqtt = rt.block_on(probe::mqtt_requests(mqtt_port, &digests, rate_req, window))?;
    let http = http.join().map_err(|_| anyhow::anyhow!("HTTP request thread panicked"))?;
    let published = rt.block_on(publishing)??;
    let (publish_to_proof, _) = rt.block_on(watch.finish(Duration::from_millis(MAX_BATCH_AGE_MS) + STALL));
    eprintln!(
        "  ingest {:.0}/s  publish→proof p50 {:.1} p99 {:.1} ms  HTTP p50 {:.2} p99 {:.2} ms  MQTT p50 {:.2} p99 {:.2} ms",
        published.done as f64 / published.seconds.max(1e-9),
        publish_to_proof.p50_ms,
        publish_to_proof.p99_ms,
        http.p50_ms,
        http.p99_ms,
        mqtt.p50_ms,
        mqtt.p99_ms
    );
    sub.stop();
    sys.stop();
    Ok(LatencyRun {
        system: kind,
        ingest_per_s: rate,
        max_batch_age_ms: MAX_BATCH_AGE_MS,
        publish_to_proof,
        http,
        mqtt,
    })
}

/// Unsigned QoS 1 messages from `plan.publishers` connections, closed loop:
/// the load that fills a store.
fn qos1_load(plan: &Plan, run: u32, per_publisher: u64) -> LoadSpec {
    LoadSpec {
        run,
        publishers: plan.publishers,
        per_publisher,
        payload: plan.payload,
        qos: QoS::AtLeastOnce,
        rate: None,
        signed: false,
        invalid_every: None,
        sample_every: None,
    }
}

/// Fills one notary's store to the last step, in chunks (QoS 1, closed
/// loop), and at each step samples memory, disk and proof latency (HTTP,
/// idle ingest, digests spread over everything stored).
fn store_growth(rt: &tokio::runtime::Runtime, plan: &Plan, run: u32) -> anyhow::Result<Vec<StorePoint>> {
    let Some(&last) = plan.store_steps.last() else { return Ok(Vec::new()) };
    eprintln!("notary store growth to {last} messages");
    let first = qos1_load(plan, run, 0);
    let Prepared { mut sys, sub, base, .. } = prepare(rt, Kind::Notary, &first, false)?;
    sub.stop();
    let http = sys.http_port.context("notary HTTP port")?;
    let chunk = (plan.store_steps[0] / 4).clamp(1_000, 250_000);
    let mut stored = 0u64;
    let mut chunks: Vec<(u32, u64)> = Vec::new(); // (run id, per publisher)
    let mut points = Vec::new();
    let mut step = plan.store_steps.iter().peekable();
    while let Some(&&target) = step.peek() {
        let n = chunk.min(target - stored);
        let spec = LoadSpec {
            run: run + 1000 + chunks.len() as u32,
            per_publisher: n / plan.publishers as u64,
            ..first.clone()
        };
        let sent = spec.total();
        fill(rt, &mut sys, &spec, base.0, stored + sent)?;
        chunks.push((spec.run, spec.per_publisher));
        stored += sent;
        let start = Instant::now();
        if stored >= target || sent == 0 {
            step.next();
            // Proofs exist once the batches are sealed: wait for the last
            // message of every publisher (batches are sealed in order).
            for p in 0..plan.publishers {
                let last =
                    load::payload_bytes(spec.run, p, spec.per_publisher.saturating_sub(1), plan.payload);
                let path = format!("/v1/proofs/{}", blake3::hash(&last).to_hex());
                while probe::http_status(http, &path) != Some(200) {
                    sys.check_alive()?;
                    if start.elapsed() > STALL * 6 {
                        anyhow::bail!("no proof for the last messages stored");
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            // Digests spread over everything stored so far.
            let mut digests = Vec::new();
            let mut x = stored.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            for _ in 0..plan.store_requests {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let (run_id, per) = chunks[(x % chunks.len() as u64) as usize];
                let p = (x >> 20) as usize % plan.publishers;
                let seq = (x >> 40) % per.max(1);
                digests.push(
                    blake3::hash(&load::payload_bytes(run_id, p, seq, plan.payload)).to_hex().to_string(),
                );
            }
            let proof_http =
                probe::http_requests(http, &digests, 200.0, Duration::from_secs(60), digests.len());
            let point = StorePoint {
                stored,
                rss_mib: sys.rss() as f64 / (1024.0 * 1024.0),
                disk_bytes_per_msg: sys.disk_bytes() as f64 / stored.max(1) as f64,
                proof_http,
            };
            eprintln!(
                "  {:>9} stored  rss {:.0} MiB  disk {:.0} B/msg  proof p50 {:.2} p99 {:.2} ms ({} failed)",
                point.stored,
                point.rss_mib,
                point.disk_bytes_per_msg,
                point.proof_http.p50_ms,
                point.proof_http.p99_ms,
                point.proof_http.failed
            );
            points.push(point);
        }
    }
    sys.stop();
    Ok(points)
}

/// Sends `spec`'s messages to a running notary and waits until `total`
/// (counted from `base`) are persisted; returns the seconds it took.
fn fill(
    rt: &tokio::runtime::Runtime,
    sys: &mut System,
    spec: &LoadSpec,
    base: u64,
    total: u64,
) -> anyhow::Result<f64> {
    let start = Instant::now();
    rt.block_on(load::publish(Arc::new(spec.clone()), sys.mqtt_port, None, None))?;
    while notary_counts(sys).0.saturating_sub(base) < total {
        sys.check_alive()?;
        if start.elapsed() > STALL * 6 {
            anyhow::bail!("notary did not persist {total} messages");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(start.elapsed().as_secs_f64())
}

/// Retention: a notary whose `max_bytes` is what its store uses at
/// `retention_horizon` messages, sent `retention_messages` in chunks; at
/// each chunk the ingest rate, memory and disk. Past the horizon, disk and
/// memory should stay flat and the rate unchanged while pruning runs.
fn retention_phase(
    rt: &tokio::runtime::Runtime,
    plan: &Plan,
    run: u32,
) -> anyhow::Result<(Vec<RetentionPoint>, u64)> {
    let horizon = plan.retention_horizon.max(plan.publishers as u64);
    eprintln!("notary retention: {} messages, horizon {horizon}", plan.retention_messages);
    let spec = |run: u32, n: u64| qos1_load(plan, run, (n / plan.publishers as u64).max(1));
    // The horizon in bytes: what the store of a notary that was sent
    // `horizon` messages uses.
    let (mut sys, base) = started_notary(rt, "", run)?;
    let sizing = spec(run + 1, horizon);
    fill(rt, &mut sys, &sizing, base, sizing.total())?;
    let data = sys.data_dir.clone().context("notary data directory")?;
    sys.kill();
    let max_bytes = mqtt_notary_store_size(&data)?;
    drop(sys);

    let (mut sys, base) = started_notary(rt, &format!("[retention]\nmax_bytes = {max_bytes}\n"), run + 2)?;
    let chunk = (horizon / 2).max(plan.publishers as u64);
    let mut points = Vec::new();
    let mut sent = 0u64;
    let mut id = run + 3;
    while sent < plan.retention_messages {
        let s = spec(id, chunk.min(plan.retention_messages - sent));
        id += 1;
        let seconds = fill(rt, &mut sys, &s, base, sent + s.total())?;
        sent += s.total();
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        let point = RetentionPoint {
            sent,
            pruned: metric(&sys, "notary_pruned_leaves_total"),
            notarized_per_s: s.total() as f64 / seconds.max(1e-9),
            rss_mib: mib(sys.rss()),
            disk_mib: mib(sys.disk_bytes()),
            used_mib: mib(metric(&sys, "notary_store_used_bytes")),
        };
        eprintln!(
            "  {:>9} sent  {:>9} pruned  {:.0} msg/s  rss {:.0} MiB  disk {:.1} MiB  in use {:.1} MiB",
            point.sent, point.pruned, point.notarized_per_s, point.rss_mib, point.disk_mib, point.used_mib
        );
        points.push(point);
    }
    sys.stop();
    Ok((points, max_bytes))
}

/// A notary with `extra` config, warmed up; returns it with the messages
/// persisted so far (the warm-up's).
fn started_notary(rt: &tokio::runtime::Runtime, extra: &str, run: u32) -> anyhow::Result<(System, u64)> {
    let mut sys = System::start_with(Kind::Notary, 0, extra)?;
    let warmed = rt.block_on(load::warm_up(sys.mqtt_port, run, || {
        metric(&sys, "notary_messages_notarized_total") > 0
    }))?;
    let start = Instant::now();
    while notary_counts(&sys).0 < warmed {
        sys.check_alive()?;
        if start.elapsed() > STALL {
            anyhow::bail!("the warm-up was not persisted");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let base = notary_counts(&sys).0;
    Ok((sys, base))
}

/// Bytes in use in a stopped notary's store.
fn mqtt_notary_store_size(data_dir: &Path) -> anyhow::Result<u64> {
    let store = notary_plugin::store::Store::open(data_dir)?;
    Ok(store.size()?.used_bytes)
}
