//! The results: targets checked, a Markdown report with every figure as a
//! ratio to plain Mosquitto and plain rumqttd, the raw JSON, and the plot.

use crate::runner::{Results, Run};
use crate::systems::Kind;
use std::fmt::Write as _;
use std::path::Path;

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Target {
    pub name: String,
    pub measured: String,
    pub met: bool,
}

fn target(name: impl Into<String>, measured: impl Into<String>, met: bool) -> Target {
    Target { name: name.into(), measured: measured.into(), met }
}

/// Delivered msg/s; for a repeated baseline, with the spread of its runs.
fn delivered(x: &Run) -> String {
    let (lo, hi) = x.repeats.iter().fold((f64::MAX, 0.0f64), |(l, h), v| (l.min(*v), h.max(*v)));
    if x.repeats.len() < 2 {
        return format!("{:.0}", x.delivered_per_s);
    }
    let spread = (hi - lo) / hi.max(1e-9);
    format!(
        "{:.0} ({:.0}–{:.0}, {} runs, spread {:.0} %{})",
        x.delivered_per_s,
        lo,
        hi,
        x.repeats.len(),
        spread * 100.0,
        if spread > SPREAD_WARN { ": **over 15 %, ratios against it are unreliable**" } else { "" }
    )
}

/// A baseline whose runs differ by more than this (of the fastest) is
/// flagged: the machine's speed changed during the run.
pub const SPREAD_WARN: f64 = 0.15;

fn find(runs: &[Run], kind: Kind, qos: u8) -> Option<&Run> {
    runs.iter().find(|r| r.system == kind && r.qos == qos)
}

/// `kind`'s run under the same load as `x` (QoS, publishers, payload).
fn find_like<'a>(runs: &'a [Run], kind: Kind, x: &Run) -> Option<&'a Run> {
    runs.iter().find(|r| {
        r.system == kind && r.qos == x.qos && r.publishers == x.publishers && r.payload == x.payload
    })
}

pub fn targets(r: &Results, max_batch_age_ms: u64) -> Vec<Target> {
    let mut t = Vec::new();
    const UNSIGNED: &str = "unsigned notarized msg/s >= 1.5 x Mosquitto delivered QoS 0 msg/s";
    let mosquitto0 = find(&r.runs, Kind::Mosquitto, 0).map(|m| m.delivered_per_s).filter(|v| *v > 0.0);
    let notary0 = find(&r.runs, Kind::Notary, 0).and_then(|n| n.notarized_per_s);
    match (notary0, mosquitto0) {
        (Some(notary0), Some(mosquitto0)) => {
            let ratio = notary0 / mosquitto0;
            t.push(target(UNSIGNED, format!("{notary0:.0} / {mosquitto0:.0} = {ratio:.2} x"), ratio >= 1.5));
        }
        // A ratio needs both runs (`--only` may leave one out): not met.
        _ => t.push(target(UNSIGNED, "not measured in this run (needs notary and mosquitto)", false)),
    }
    let signed =
        r.signed.iter().find(|s| s.invalid_per_mille == 0).and_then(|s| s.notarized_per_s).unwrap_or(0.0);
    let ratio = signed / r.ceiling.all_threads.max(1e-9);
    t.push(target(
        "signed notarized msg/s >= 0.8 x ed25519 batch-verification ceiling",
        format!("{signed:.0} / {:.0} = {ratio:.2} x", r.ceiling.all_threads),
        ratio >= 0.8,
    ));
    for l in &r.latency {
        // MQTT adds the broker's routing of request and answer: 2 ms.
        for (api, lat, bound) in [("HTTP", &l.http, 1.0), ("MQTT", &l.mqtt, 2.0)] {
            t.push(target(
                format!("{}: proof request p99 over {api} <= {bound} ms", l.system.label()),
                format!("{:.2} ms ({} requests, {} failed)", lat.p99_ms, lat.count, lat.failed),
                lat.p99_ms <= bound && lat.failed == 0 && lat.count > 0,
            ));
        }
        let bound = max_batch_age_ms as f64 + 50.0;
        let p = &l.publish_to_proof;
        t.push(target(
            format!("{}: publish -> proof available p99 <= {bound:.0} ms", l.system.label()),
            format!("{:.1} ms ({} samples, {} never proven)", p.p99_ms, p.count, p.failed),
            p.p99_ms <= bound && p.failed == 0 && p.count > 0,
        ));
    }
    if let (Some(first), Some(last)) = (r.store.first(), r.store.last()) {
        let growth = last.rss_mib / first.rss_mib.max(1e-9) - 1.0;
        t.push(target(
            format!("RSS growth <= 10 % from {} to {} stored messages", first.stored, last.stored),
            format!("{:.0} -> {:.0} MiB = {:+.1} %", first.rss_mib, last.rss_mib, growth * 100.0),
            growth <= 0.10,
        ));
    }
    t.extend(retention_targets(r));
    let clean = r.signed.iter().find(|s| s.invalid_per_mille == 0).and_then(|s| s.notarized_per_s);
    let spoiled = r.signed.iter().find(|s| s.invalid_per_mille > 0).and_then(|s| s.notarized_per_s);
    if let (Some(clean), Some(spoiled)) = (clean, spoiled) {
        let ratio = spoiled / clean.max(1e-9);
        t.push(target(
            "signed msg/s with 0.1 % bad signatures >= 0.8 x with none",
            format!("{spoiled:.0} / {clean:.0} = {ratio:.2} x"),
            ratio >= 0.8,
        ));
    }
    let hundred = |k: Kind| r.runs.iter().find(|x| x.system == k && x.qos == 1 && x.publishers == 100);
    if let (Some(m), Some(n)) = (hundred(Kind::Mosquitto), hundred(Kind::Notary)) {
        let notarized = n.notarized_per_s.unwrap_or(0.0);
        let ratio = notarized / m.delivered_per_s.max(1e-9);
        t.push(target(
            "100 publishers, QoS 1: notarized msg/s >= Mosquitto delivered QoS 1 msg/s",
            format!("{notarized:.0} / {:.0} = {ratio:.2} x", m.delivered_per_s),
            ratio >= 1.0,
        ));
    }
    if let Some(one) = r.runs.iter().find(|x| x.system == Kind::Notary && x.qos == 1 && x.publishers == 1) {
        let rate = one.notarized_per_s.unwrap_or(0.0);
        t.push(target(
            "one publisher, QoS 1, 100 in flight, acknowledged after commit: notarized msg/s >= 5000",
            format!("{rate:.0} msg/s"),
            rate >= 5000.0,
        ));
    }
    let qos1: Vec<&Run> = r.runs.iter().chain(&r.signed).filter(|x| x.qos >= 1).collect();
    let lost: u64 = qos1.iter().map(|x| x.lost + x.unnotarized.unwrap_or(0)).sum();
    t.push(target(
        "zero QoS 1/2 loss (delivered, and notarized or rejected with a reason)",
        format!("{lost} lost in {} QoS 1 and 2 runs", qos1.len()),
        lost == 0 && !qos1.is_empty(),
    ));
    t
}

/// Under retention, once pruning is steady (from twice the horizon on):
/// disk and memory flat (largest ÷ smallest <= 1.1), and the ingest rate
/// at least 0.9 x the rate before the horizon, when nothing was pruned.
fn retention_targets(r: &Results) -> Vec<Target> {
    let horizon = r.plan.retention_horizon;
    let before: Vec<_> = r.retention.iter().filter(|p| p.sent <= horizon).collect();
    let steady: Vec<_> = r.retention.iter().filter(|p| p.sent > 2 * horizon).collect();
    if before.is_empty() || steady.len() < 2 {
        return Vec::new();
    }
    let span = |f: fn(&crate::runner::RetentionPoint) -> f64| {
        let (lo, hi) = steady.iter().fold((f64::MAX, 0.0f64), |(l, h), p| (l.min(f(p)), h.max(f(p))));
        (lo, hi, hi / lo.max(1e-9))
    };
    let mean = |v: &[&crate::runner::RetentionPoint]| {
        v.iter().map(|p| p.notarized_per_s).sum::<f64>() / v.len() as f64
    };
    let (dl, dh, disk) = span(|p| p.disk_mib);
    let (rl, rh, rss) = span(|p| p.rss_mib);
    let (fresh, pruning) = (mean(&before), mean(&steady));
    vec![
        target(
            format!("retention: disk flat past the horizon ({horizon} messages): max / min <= 1.1"),
            format!("{dl:.1} .. {dh:.1} MiB = {disk:.2} x"),
            disk <= 1.1,
        ),
        target(
            "retention: RSS flat past the horizon: max / min <= 1.1",
            format!("{rl:.0} .. {rh:.0} MiB = {rss:.2} x"),
            rss <= 1.1,
        ),
        target(
            "retention: ingest msg/s while pruning >= 0.9 x before the horizon",
            format!("{pruning:.0} / {fresh:.0} = {:.2} x", pruning / fresh.max(1e-9)),
            pruning >= 0.9 * fresh,
        ),
    ]
}

/// "delivery / notary" losses, or the delivery loss alone.
fn lost(r: &Run) -> String {
    match r.unnotarized {
        Some(u) => format!("{} / {u}", r.lost),
        None => r.lost.to_string(),
    }
}

fn ratio(v: f64, base: f64) -> String {
    if base > 0.0 && v > 0.0 {
        format!("{:.2}", v / base)
    } else {
        "-".into()
    }
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.digits$}"))
}

pub fn markdown(r: &Results) -> String {
    let mut s = String::new();
    let m = &r.machine;
    let _ = writeln!(s, "# mqtt-notary benchmark\n");
    let _ = writeln!(
        s,
        "{} run of {}, {:.0} s in all.\n\n- machine: {} ({} cores, {} GiB), Linux {}\n- {}; rmqtt {}, rumqttd {}, rumqttc {} (load generator)\n- mqtt-notary {} at {}, {} build\n- other load on the machine just before the run: {:.0} % of its cores\n",
        if r.plan.quick { "Quick" } else { "Full" },
        m.date,
        r.seconds,
        m.cpu,
        m.cores,
        m.memory_gib,
        m.kernel,
        m.mosquitto,
        m.rmqtt,
        m.rumqttd,
        m.rumqttc,
        m.mqtt_notary,
        m.commit,
        if m.release_build { "release" } else { "debug (figures not comparable)" },
        m.busy_before * 100.0
    );

    let _ = writeln!(s, "## Targets\n\n| target | measured | met |\n|---|---|---|");
    for t in &r.targets {
        let _ = writeln!(s, "| {} | {} | {} |", t.name, t.measured, if t.met { "yes" } else { "**no**" });
    }

    let _ = writeln!(
        s,
        "\n## Throughput\n\n{} publishers, {} B payloads, closed loop (as fast as each broker takes them), one rumqttc subscriber on `bench/#`, and `mosquitto_sub` on `bench/0` (one publisher's stream) as a third-party cross-check. Notarized: persisted into the log (or rejected with a reason), counted by the notary's metrics.\n",
        r.plan.publishers, r.plan.payload
    );
    let _ = writeln!(
        s,
        "| system | QoS | publishers | messages | delivered msg/s (a baseline: best of its runs, and their spread) | notarized msg/s | CPU s / 1k msg | peak RSS MiB | disk B / msg | lost: delivery / notary | bench/0: sent / ours / mosquitto_sub |\n|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for x in &r.runs {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {:.3} | {:.1} | {} | {} | {} / {} / {} |",
            x.system.label(),
            x.qos,
            x.publishers,
            x.messages,
            delivered(x),
            opt(x.notarized_per_s, 0),
            x.cpu_s_per_1k,
            x.peak_rss_mib,
            opt(x.disk_bytes_per_msg, 0),
            lost(x),
            x.crosscheck.published,
            x.crosscheck.ours,
            x.crosscheck.mosquitto_sub
        );
    }
    let _ = writeln!(
        s,
        "\nThe same figures as ratios: to plain Mosquitto / to plain rmqtt (the engine mqtt-notary embeds) at the same QoS (throughput: higher is better, notarized compared with their delivered; CPU and RSS: lower is better).\n\n| system | QoS | delivered | notarized | CPU / 1k msg | peak RSS |\n|---|---|---|---|---|---|"
    );
    for x in &r.runs {
        let (Some(mo), Some(ru)) =
            (find_like(&r.runs, Kind::Mosquitto, x), find_like(&r.runs, Kind::Rmqtt, x))
        else {
            continue;
        };
        let both = |v: f64, a: f64, b: f64| format!("{} / {}", ratio(v, a), ratio(v, b));
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} |",
            x.system.label(),
            x.qos,
            both(x.delivered_per_s, mo.delivered_per_s, ru.delivered_per_s),
            x.notarized_per_s.map_or("-".into(), |n| both(n, mo.delivered_per_s, ru.delivered_per_s)),
            both(x.cpu_s_per_1k, mo.cpu_s_per_1k, ru.cpu_s_per_1k),
            both(x.peak_rss_mib, mo.peak_rss_mib, ru.peak_rss_mib),
        );
    }

    let _ = writeln!(
        s,
        "\n## Signed envelopes\n\nCOSE_Sign1 envelopes ({} B inside, one device per publisher), QoS 0. The ceiling is ed25519 batch verification alone on this machine, measured by `bench ceiling` with the pipeline's own verification function: {:.0} signatures/s on {} threads ({:.0} on one).\n\n| bad signatures | messages | processed msg/s | x ceiling | notarized | rejected | lost: delivery / notary |\n|---|---|---|---|---|---|---|",
        r.plan.payload, r.ceiling.all_threads, r.ceiling.threads, r.ceiling.one_thread
    );
    for x in &r.signed {
        let _ = writeln!(
            s,
            "| {:.1} % | {} | {} | {} | {} | {} | {} |",
            x.invalid_per_mille as f64 / 10.0,
            x.messages,
            opt(x.notarized_per_s, 0),
            x.notarized_per_s.map_or("-".into(), |v| ratio(v, r.ceiling.all_threads)),
            x.notarized.unwrap_or(0),
            x.rejected.unwrap_or(0),
            lost(x)
        );
    }

    let _ = writeln!(
        s,
        "\n## Latency at half capacity\n\nQoS 1 publishing at half the system's notarized QoS 1 rate. Publish -> proof: from the publish call to the first HTTP 200 for that message's proof (asked after each checkpoint the notary publishes). Proof requests: {:.0}/s over HTTP (one keep-alive connection) and {:.0}/s over MQTT, timed from when each was due. Batches are sealed at 10,000 messages or {} ms.\n\n| system | ingest msg/s | publish -> proof p50 / p99 ms | HTTP p50 / p99 ms | MQTT p50 / p99 ms | failed |\n|---|---|---|---|---|---|",
        r.plan.request_rate,
        r.plan.request_rate,
        r.latency.first().map_or(0, |l| l.max_batch_age_ms)
    );
    for l in &r.latency {
        let _ = writeln!(
            s,
            "| {} | {:.0} | {:.1} / {:.1} | {:.2} / {:.2} | {:.2} / {:.2} | {} / {} / {} |",
            l.system.label(),
            l.ingest_per_s,
            l.publish_to_proof.p50_ms,
            l.publish_to_proof.p99_ms,
            l.http.p50_ms,
            l.http.p99_ms,
            l.mqtt.p50_ms,
            l.mqtt.p99_ms,
            l.publish_to_proof.failed,
            l.http.failed,
            l.mqtt.failed
        );
    }

    if !r.scaling.is_empty() {
        let _ = writeln!(
            s,
            "\n## Scaling\n\nQoS 0, closed loop. Throughput against the number of publishing connections ({} B), and against payload size ({} publishers). A notary row without a notarized rate did not notarize every message (the broker dropped some before the notary read them: a gap, recorded and counted); the plot leaves that point out.\n\n| system | publishers | payload B | messages | delivered msg/s | notarized msg/s | CPU s / 1k msg | peak RSS MiB | lost: delivery / notary |\n|---|---|---|---|---|---|---|---|---|",
            r.plan.payload, r.plan.publishers
        );
        for x in &r.scaling {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {:.0} | {} | {:.3} | {:.1} | {} |",
                x.system.label(),
                x.publishers,
                x.payload,
                x.messages,
                x.delivered_per_s,
                opt(x.notarized_per_s, 0),
                x.cpu_s_per_1k,
                x.peak_rss_mib,
                lost(x)
            );
        }
    }
    if !r.store.is_empty() {
        let _ = writeln!(
            s,
            "\n## As the store grows\n\nOne notary filled in chunks (QoS 1, {} publishers); at each size: resident memory, bytes on disk per message, and {} proof requests over HTTP (200/s, ingest idle) for messages spread over the whole store.\n\n| stored | RSS MiB | disk B / msg | proof p50 / p99 ms |\n|---|---|---|---|",
            r.plan.publishers, r.plan.store_requests
        );
        for p in &r.store {
            let _ = writeln!(
                s,
                "| {} | {:.0} | {:.0} | {:.2} / {:.2} |",
                p.stored, p.rss_mib, p.disk_bytes_per_msg, p.proof_http.p50_ms, p.proof_http.p99_ms
            );
        }
    }
    if !r.retention.is_empty() {
        let _ = writeln!(
            s,
            "\n## Under retention\n\nOne notary with `[retention] max_bytes = {}` (what its store uses at {} messages), sent {} messages in chunks (QoS 1, {} publishers); after each chunk: its ingest rate, resident memory, the data directory's size and the store's bytes in use.\n\n| sent | pruned | notarized msg/s | RSS MiB | disk MiB | in use MiB |\n|---|---|---|---|---|---|",
            r.retention_max_bytes, r.plan.retention_horizon, r.plan.retention_messages, r.plan.publishers
        );
        for p in &r.retention {
            let _ = writeln!(
                s,
                "| {} | {} | {:.0} | {:.0} | {:.1} | {:.1} |",
                p.sent, p.pruned, p.notarized_per_s, p.rss_mib, p.disk_mib, p.used_mib
            );
        }
    }
    s
}

/// Renders results.md and results.svg again from a run's results.json.
pub fn rewrite(dir: &Path) -> anyhow::Result<()> {
    let json = std::fs::read_to_string(dir.join("results.json"))?;
    let mut r: Results = serde_json::from_str(&json)?;
    // Targets are derived from the figures: judged again by this build.
    r.targets = targets(&r, crate::runner::MAX_BATCH_AGE_MS);
    std::fs::write(dir.join("results.md"), markdown(&r))?;
    crate::plot::draw(&r, &dir.join("results.svg"))?;
    eprintln!("bench: wrote results.md and results.svg in {}", dir.display());
    Ok(())
}

pub fn write(r: &Results, out: &Path) -> anyhow::Result<()> {
    let md = markdown(r);
    std::fs::write(out.join("results.json"), serde_json::to_string_pretty(r)?)?;
    std::fs::write(out.join("results.md"), &md)?;
    crate::plot::draw(r, &out.join("results.svg"))?;
    println!("{md}");
    eprintln!("bench: wrote results.json, results.md and results.svg to {}", out.display());
    Ok(())
}
