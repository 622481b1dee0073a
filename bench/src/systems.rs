//! The systems under test, each started fresh for each measurement as child
//! processes on free loopback ports, and what /proc says about them.

use anyhow::{bail, Context as _};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// Plain Mosquitto 2.0 with the tuned config below.
    Mosquitto,
    /// Plain rumqttd 0.20 (mqtt-notary's engine before rmqtt), no plugin.
    Rumqttd,
    /// Plain rmqtt, the engine mqtt-notary embeds, with its listener
    /// settings and without the notary's hook.
    Rmqtt,
    /// mqtt-notary with its embedded broker; the load is unsigned.
    Notary,
    /// mqtt-notary with its embedded broker; the load is COSE-signed.
    NotarySigned,
    /// Mosquitto (tuned) with `mqtt-notary sidecar` as its client.
    Sidecar,
}

impl Kind {
    pub fn label(self) -> &'static str {
        match self {
            Kind::Mosquitto => "mosquitto",
            Kind::Rumqttd => "rumqttd",
            Kind::Rmqtt => "rmqtt",
            Kind::Notary => "notary",
            Kind::NotarySigned => "notary signed",
            Kind::Sidecar => "sidecar on mosquitto",
        }
    }
    pub fn notarizes(self) -> bool {
        matches!(self, Kind::Notary | Kind::NotarySigned | Kind::Sidecar)
    }
    pub fn signed(self) -> bool {
        self == Kind::NotarySigned
    }
}

/// Mosquitto tuned so that it does not drop QoS 1 messages under load: its
/// defaults (20 in flight, 1,000 queued per client) discard most QoS 1
/// messages a fast subscriber cannot take at once. No persistence, as the
/// broker runs with no disk state; logging of errors only.
pub const MOSQUITTO_CONF: &str = "\
allow_anonymous true
persistence false
max_inflight_messages 1000
max_queued_messages 0
max_queued_bytes 0
log_dest stderr
log_type error
log_type warning
";

/// The notary's configuration in the benchmark: its defaults (batches of
/// 10,000 or 1 s), a fleet of devices for signed loads, and the delivery
/// limits every baseline gets (1,000 in flight per connection, queues
/// without a practical limit), so no system drops what its subscriber
/// cannot take at once while another keeps it.
const NOTARY_MQTT_CONF: &str = "\
[mqtt]
max_inflight = 1000
max_queued_messages = 100000000
";

fn notary_conf(dir: &Path, devices: usize, extra: &str) -> anyhow::Result<PathBuf> {
    let mut conf = String::from("# mqtt-notary defaults, but for the enrolled bench devices and the\n");
    conf.push_str("# baselines' delivery limits.\n");
    conf.push_str(NOTARY_MQTT_CONF);
    conf.push_str(extra);
    if devices > 0 {
        let file = dir.join("devices.toml");
        let mut list = String::new();
        for i in 0..devices {
            let key = crate::ceiling::device_key(i).verifying_key();
            list.push_str(&format!(
                "[[device]]\nid = \"{}\"\npublic_key = \"{}\"\n",
                crate::ceiling::device_id(i),
                hex::encode(key.as_bytes())
            ));
        }
        std::fs::write(&file, list)?;
        conf.push_str(&format!("[devices]\nenrolment_file = \"{}\"\n", file.display()));
    }
    let path = dir.join("notary.toml");
    std::fs::write(&path, conf)?;
    Ok(path)
}

pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub struct System {
    pub kind: Kind,
    pub mqtt_port: u16,
    pub http_port: Option<u16>,
    pub data_dir: Option<PathBuf>,
    children: Vec<(String, Child)>,
    _dir: tempfile::TempDir,
}

impl System {
    /// Starts `kind`; `devices` device keys are enrolled for signed loads.
    pub fn start(kind: Kind, devices: usize) -> anyhow::Result<System> {
        Self::start_with(kind, devices, "")
    }

    /// [`System::start`], with `extra` appended to a notary's config file.
    pub fn start_with(kind: Kind, devices: usize, extra: &str) -> anyhow::Result<System> {
        let dir = tempfile::Builder::new().prefix("notary-bench-").tempdir()?;
        let mqtt_port = free_port()?;
        let me = std::env::current_exe()?;
        let mut sys =
            System { kind, mqtt_port, http_port: None, data_dir: None, children: Vec::new(), _dir: dir };
        let dir = sys._dir.path().to_owned();
        match kind {
            Kind::Mosquitto | Kind::Sidecar => {
                let conf = dir.join("mosquitto.conf");
                std::fs::write(&conf, format!("listener {mqtt_port} 127.0.0.1\n{MOSQUITTO_CONF}"))?;
                sys.spawn("mosquitto", Command::new(mosquitto()?).arg("-c").arg(&conf), &dir)?;
            }
            Kind::Rmqtt => {
                sys.spawn(
                    "rmqtt",
                    Command::new(&me).args(["rmqtt", &format!("127.0.0.1:{mqtt_port}")]),
                    &dir,
                )?;
            }
            Kind::Rumqttd => {
                sys.spawn(
                    "rumqttd",
                    Command::new(&me).args(["rumqttd", &format!("127.0.0.1:{mqtt_port}")]),
                    &dir,
                )?;
            }
            Kind::Notary | Kind::NotarySigned => {}
        }
        if !matches!(kind, Kind::Notary | Kind::NotarySigned) {
            wait_listening(mqtt_port, &mut sys)?;
        }
        if kind.notarizes() {
            let http = free_port()?;
            let data = dir.join("data");
            let conf = notary_conf(&dir, if kind.signed() { devices } else { 0 }, extra)?;
            let mut cmd = Command::new(&me);
            cmd.arg("notary");
            if kind == Kind::Sidecar {
                cmd.args(["sidecar", "--broker", &format!("mqtt://127.0.0.1:{mqtt_port}")]);
            } else {
                cmd.args(["run", "--mqtt", &format!("127.0.0.1:{mqtt_port}")]);
            }
            cmd.arg("--config").arg(&conf).arg("--data-dir").arg(&data);
            cmd.args(["--http", &format!("127.0.0.1:{http}")]);
            sys.spawn("mqtt-notary", &mut cmd, &dir)?;
            sys.http_port = Some(http);
            sys.data_dir = Some(data);
            let start = Instant::now();
            while crate::probe::http_status(http, "/healthz") != Some(200) {
                sys.check_alive()?;
                if start.elapsed() > Duration::from_secs(60) {
                    bail!("mqtt-notary did not answer /healthz within 60 s");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if kind != Kind::Sidecar {
                wait_listening(mqtt_port, &mut sys)?;
            }
        }
        Ok(sys)
    }

    fn spawn(&mut self, name: &str, cmd: &mut Command, dir: &Path) -> anyhow::Result<()> {
        let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        self.children.push((name.to_owned(), child));
        Ok(())
    }

    /// Fails, with the end of its log, if a process of the system exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        for (name, child) in &mut self.children {
            if let Ok(Some(status)) = child.try_wait() {
                let log =
                    std::fs::read_to_string(self._dir.path().join(format!("{name}.log"))).unwrap_or_default();
                let tail: String = log.lines().rev().take(20).collect::<Vec<_>>().join("\n");
                bail!("{name} exited with {status}; last log lines (newest first):\n{tail}");
            }
        }
        Ok(())
    }

    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(|(_, c)| c.id()).collect()
    }

    /// CPU seconds (user + system) used so far by the system's processes.
    pub fn cpu_seconds(&self) -> f64 {
        self.pids().into_iter().map(cpu_seconds).sum()
    }

    /// Peak resident memory of the system's processes, summed (bytes).
    pub fn peak_rss(&self) -> u64 {
        self.pids().into_iter().map(|p| status_kib(p, "VmHWM:") * 1024).sum()
    }

    /// Resident memory now (bytes).
    pub fn rss(&self) -> u64 {
        self.pids().into_iter().map(|p| status_kib(p, "VmRSS:") * 1024).sum()
    }

    /// Bytes the notary's data directory holds (0 for plain brokers).
    pub fn disk_bytes(&self) -> u64 {
        self.data_dir.as_deref().map_or(0, dir_bytes)
    }

    pub fn stop(mut self) {
        self.kill();
    }

    /// Ends the system's processes and keeps its directory (until dropped).
    pub fn kill(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.children.clear();
    }
}

impl Drop for System {
    fn drop(&mut self) {
        self.kill();
    }
}

fn wait_listening(port: u16, sys: &mut System) -> anyhow::Result<()> {
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        sys.check_alive()?;
        if start.elapsed() > Duration::from_secs(30) {
            bail!("nothing listens on port {port} after 30 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

pub fn mosquitto() -> anyhow::Result<PathBuf> {
    for p in ["/usr/sbin/mosquitto", "/usr/bin/mosquitto", "/usr/local/sbin/mosquitto"] {
        if Path::new(p).exists() {
            return Ok(PathBuf::from(p));
        }
    }
    bail!("mosquitto not found: install Debian's mosquitto and mosquitto-clients (scripts/bench does)")
}

/// Clock ticks per second for /proc/<pid>/stat (`getconf CLK_TCK`).
fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

pub fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    // The command name may hold spaces; the fields after it do not.
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else { return 0.0 };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line.
    let ticks: f64 = [11, 12].iter().filter_map(|&i| fields.get(i)?.parse::<f64>().ok()).sum();
    ticks / clock_ticks()
}

fn status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with(key)).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}
