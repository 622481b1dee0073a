//! The machine and the versions a result was measured with.

use std::process::Command;

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub memory_gib: f64,
    pub kernel: String,
    pub mosquitto: String,
    pub rumqttd: String,
    #[serde(default)]
    pub rmqtt: String,
    pub rumqttc: String,
    pub mqtt_notary: String,
    /// The source revision, when run from a git checkout.
    pub commit: String,
    /// Whether the bench and the notary were built with optimizations.
    pub release_build: bool,
    pub date: String,
    /// Share of all cores busy (other processes) over the second sampled
    /// just before the run began: a run on a machine that is not quiet
    /// measures the other load too.
    #[serde(default)]
    pub busy_before: f64,
}

/// (busy, total) jiffies over all cores, from /proc/stat.
fn cpu_jiffies() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let v: Vec<u64> =
        stat.lines().next()?.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    let total: u64 = v.iter().sum();
    let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// The share of the machine busy over `over`, 0.0 to 1.0.
pub fn busy(over: std::time::Duration) -> f64 {
    let Some((b0, t0)) = cpu_jiffies() else { return 0.0 };
    std::thread::sleep(over);
    let Some((b1, t1)) = cpu_jiffies() else { return 0.0 };
    (b1 - b0) as f64 / (t1 - t0).max(1) as f64
}

fn first_line(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).output().ok()?;
    let text = if out.stdout.is_empty() { out.stderr } else { out.stdout };
    String::from_utf8(text).ok()?.lines().next().map(|l| l.trim().to_owned())
}

/// The version of a package in the workspace's Cargo.lock.
fn locked(name: &str) -> String {
    let lock = include_str!("../../Cargo.lock");
    let mut lines = lock.lines();
    while let Some(l) = lines.next() {
        if l == format!("name = \"{name}\"") {
            if let Some(v) = lines.next().and_then(|v| v.strip_prefix("version = \"")) {
                return v.trim_end_matches('"').to_owned();
            }
        }
    }
    "unknown".into()
}

impl Machine {
    pub fn read() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .map_or_else(|| std::env::consts::ARCH.to_owned(), |s| s.trim().to_owned());
        let memory_gib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| m.lines().next()?.split_whitespace().nth(1)?.parse::<f64>().ok())
            .map_or(0.0, |kib| kib / (1024.0 * 1024.0));
        let kernel =
            std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned();
        let mosquitto = crate::systems::mosquitto()
            .ok()
            .and_then(|m| first_line(&m.to_string_lossy(), &["-h"]))
            .unwrap_or_else(|| "not found".into());
        Machine {
            cpu,
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_gib: (memory_gib * 10.0).round() / 10.0,
            kernel,
            mosquitto,
            rumqttd: locked("rumqttd"),
            rmqtt: locked("rmqtt"),
            rumqttc: locked("rumqttc"),
            mqtt_notary: env!("CARGO_PKG_VERSION").to_owned(),
            commit: first_line("git", &["describe", "--always", "--dirty"])
                .unwrap_or_else(|| "unknown".into()),
            release_build: !cfg!(debug_assertions),
            date: first_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_default(),
            busy_before: 0.0,
        }
    }
}
