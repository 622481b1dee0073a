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
    pub rumqttc: String,
    pub mqtt_notary: String,
    /// The source revision, when run from a git checkout.
    pub commit: String,
    /// Whether the bench and the notary were built with optimizations.
    pub release_build: bool,
    pub date: String,
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
            rumqttc: locked("rumqttc"),
            mqtt_notary: env!("CARGO_PKG_VERSION").to_owned(),
            commit: first_line("git", &["describe", "--always", "--dirty"])
                .unwrap_or_else(|| "unknown".into()),
            release_build: !cfg!(debug_assertions),
            date: first_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_default(),
        }
    }
}
