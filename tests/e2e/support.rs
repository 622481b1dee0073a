//! Test support: the real `mqtt-notary` binary on free loopback ports, the
//! real `mosquitto_pub` / `mosquitto_sub`, and waits that poll a condition
//! (never a fixed sleep standing in for one).

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_mqtt-notary");
/// Upper bound for any wait; a healthy run needs a fraction of it.
pub const PATIENCE: Duration = Duration::from_secs(120);

/// Polls `f` until it returns `Some`, or panics naming `what`.
pub fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < PATIENCE, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A loopback port for a server under test. Ports are taken from outside
/// the kernel's ephemeral range, so a client socket of a test running in
/// parallel can never hold one between this call and the server's bind (a
/// port from `bind(0)` could be), and each is handed out once per test
/// process, starting at an offset drawn from the process id so that two
/// test processes rarely walk the same ports.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let (low, high) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|n| n.parse::<u32>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32768, 60999));
    let candidates: Vec<u16> = (10_000..=65_535u32)
        .filter(|p| *p < low || *p > high)
        .filter_map(|p| u16::try_from(p).ok())
        .collect();
    assert!(!candidates.is_empty(), "no ports outside the ephemeral range {low}-{high}");
    let offset = std::process::id() as usize * 211;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed) as usize;
        assert!(n < candidates.len(), "ran out of test ports");
        let port = candidates[(offset + n) % candidates.len()];
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// The verifier key a running notary wrote to its data directory.
pub fn broker_verifier(n: &Notary) -> notary_proof::NoteVerifier {
    let text = std::fs::read_to_string(n.broker_key()).expect("broker.pub");
    notary_proof::NoteVerifier::from_key_string(&text).expect("broker.pub parses")
}

pub fn blake3_hex(payload: &[u8]) -> String {
    blake3::hash(payload).to_hex().to_string()
}

/// A running `mqtt-notary run`.
pub struct Notary {
    pub dir: PathBuf,
    /// Where to publish: the embedded broker, or the sidecar's upstream broker.
    pub mqtt: u16,
    pub http: u16,
    pub config: Option<PathBuf>,
    /// Set for `mqtt-notary sidecar`: the upstream broker's URL.
    pub upstream: Option<String>,
    /// Extra environment for the process.
    pub env: Vec<(String, String)>,
    /// Extra command-line arguments (e.g. `--new-log`).
    pub extra_args: Vec<String>,
    /// Run under this open-file limit (`prlimit --nofile`).
    pub fd_limit: Option<u32>,
    child: Option<Child>,
}

/// A config file with short batches, so tests see sealed batches quickly.
pub fn fast_config(dir: &Path, extra: &str) -> PathBuf {
    let path = dir.join("test-config.toml");
    std::fs::write(&path, format!("[log]\nmax_batch_age_ms = 100\n{extra}")).expect("write config");
    path
}

impl Notary {
    pub fn start(dir: &Path) -> Notary {
        let config = fast_config(dir, "");
        Self::start_with(dir, Some(config))
    }

    pub fn start_with(dir: &Path, config: Option<PathBuf>) -> Notary {
        let mut n = Notary {
            dir: dir.join("data"),
            mqtt: free_port(),
            http: free_port(),
            config,
            upstream: None,
            env: Vec::new(),
            extra_args: Vec::new(),
            fd_limit: None,
            child: None,
        };
        n.spawn();
        n
    }

    /// `mqtt-notary sidecar` on the broker at `broker_port`, with the data
    /// directory `dir/data` (or `dir/<name>` for several sidecars).
    pub fn sidecar(dir: &Path, name: &str, broker_port: u16, extra_config: &str) -> Notary {
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(&config, format!("[log]\nmax_batch_age_ms = 100\n{extra_config}")).expect("config");
        let url = format!("mqtt://127.0.0.1:{broker_port}");
        Self::sidecar_with(dir.join(name), config, &url, broker_port, Vec::new())
    }

    /// A sidecar of the broker at `url` (port `broker_port`) with a given
    /// config file and environment.
    pub fn sidecar_with(
        data_dir: PathBuf,
        config: PathBuf,
        url: &str,
        broker_port: u16,
        env: Vec<(String, String)>,
    ) -> Notary {
        let mut n = Notary {
            dir: data_dir,
            mqtt: broker_port,
            http: free_port(),
            config: Some(config),
            upstream: Some(url.to_owned()),
            env,
            extra_args: Vec::new(),
            fd_limit: None,
            child: None,
        };
        n.spawn();
        n
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.with_extension("log"))
            .expect("log file");
        let mut cmd = match self.fd_limit {
            Some(n) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={n}:{n}")).arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        match &self.upstream {
            None => cmd.arg("run").args(["--mqtt", &format!("127.0.0.1:{}", self.mqtt)]),
            Some(url) => cmd.args(["sidecar", "--broker", url]),
        };
        cmd.arg("--data-dir").arg(&self.dir).args(["--http", &format!("127.0.0.1:{}", self.http)]);
        if let Some(c) = &self.config {
            cmd.arg("--config").arg(c);
        }
        cmd.args(&self.extra_args);
        cmd.envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let child = cmd.stdout(Stdio::null()).stderr(log).spawn().expect("start mqtt-notary");
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        eventually("mqtt-notary to listen", || {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("mqtt-notary exited early with {status}:\n{}", self.log());
            }
            let http = self.get("/healthz").0 == 200;
            let mqtt = TcpStream::connect(("127.0.0.1", self.mqtt)).is_ok();
            // A sidecar is ready once subscribed upstream: before that, a
            // broker routes nothing to it.
            let subscribed = self.upstream.is_none() || self.metric("source_connected") == 1;
            (http && mqtt && subscribed).then_some(())
        });
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.with_extension("log")).unwrap_or_default()
    }

    /// GET on the HTTP API: (status, body). Status 0 if it cannot connect.
    pub fn get(&self, path: &str) -> (u16, String) {
        let url = format!("http://127.0.0.1:{}{path}", self.http);
        match ureq::get(&url).timeout(Duration::from_secs(30)).call() {
            Ok(r) => (r.status(), r.into_string().unwrap_or_default()),
            Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap_or_default()),
            Err(_) => (0, String::new()),
        }
    }

    pub fn metric(&self, name: &str) -> u64 {
        let (_, body) = self.get("/metrics");
        body.lines()
            .find_map(|l| l.strip_prefix(&format!("notary_{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Waits until the payload's proof is served; returns the bundle array JSON.
    pub fn wait_proof(&self, payload: &[u8]) -> String {
        let path = format!("/v1/proofs/{}", blake3_hex(payload));
        eventually("a proof to be available", || {
            let (status, body) = self.get(&path);
            (status == 200).then_some(body)
        })
    }

    /// SIGTERM, and waits for a clean exit.
    pub fn stop(&mut self) {
        let child = self.child.as_mut().expect("running");
        let ok = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill");
        assert!(ok.success());
        let status = child.wait().expect("wait");
        self.child = None;
        assert!(status.success(), "unclean shutdown: {status}\n{}", self.log());
    }

    /// SIGTERM; waits for the process to end (never longer than
    /// `PATIENCE`) and returns its exit code.
    pub fn terminate(&mut self) -> i32 {
        let child = self.child.as_mut().expect("running");
        let ok = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill");
        assert!(ok.success());
        let status = eventually("mqtt-notary to exit after SIGTERM", || child.try_wait().ok().flatten());
        self.child = None;
        code(status)
    }

    /// Sends the running notary a signal (`kill -SIG`).
    pub fn signal(&self, sig: &str) {
        let child = self.child.as_ref().expect("running");
        let ok =
            Command::new("kill").arg(format!("-{sig}")).arg(child.id().to_string()).status().expect("kill");
        assert!(ok.success());
    }

    /// `/healthz`: (status, parsed body).
    pub fn health(&self) -> (u16, serde_json::Value) {
        let (status, body) = self.get("/healthz");
        (status, serde_json::from_str(&body).unwrap_or(serde_json::Value::Null))
    }

    /// SIGKILL: a crash.
    pub fn crash(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().expect("kill -9");
        child.wait().expect("wait");
    }

    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop or crash first");
        self.spawn();
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    pub fn broker_key(&self) -> PathBuf {
        self.dir.join("broker.pub")
    }
}

impl Drop for Notary {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Publishes each line of `lines` as one message with `mosquitto_pub -l`
/// and waits for it to finish. At most 5,000 lines per connection: a single
/// `mosquitto_pub -l` run at QoS 1 loses lines beyond roughly 30,000 (seen
/// against Mosquitto 2.0 with unlimited queues, too).
pub fn publish_lines(port: u16, topic: &str, qos: u8, lines: &[String]) {
    for chunk in lines.chunks(5_000) {
        publish_chunk(port, topic, qos, chunk);
    }
}

/// `mosquitto_pub -l`: one message per line of its standard input.
fn line_publisher(port: u16, topic: &str, qos: u8, stderr: Stdio) -> Child {
    Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-t", topic, "-q", &qos.to_string(), "-l"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("mosquitto_pub is installed")
}

fn publish_chunk(port: u16, topic: &str, qos: u8, lines: &[String]) {
    let mut child = line_publisher(port, topic, qos, Stdio::piped());
    {
        let mut stdin = child.stdin.take().expect("stdin");
        for l in lines {
            writeln!(stdin, "{l}").expect("write line");
        }
    }
    let out = child.wait_with_output().expect("mosquitto_pub runs");
    assert!(out.status.success(), "mosquitto_pub failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// A `mosquitto_pub -l` fed from a background thread, for a stream the
/// broker may die under. Dropping it kills the publisher (which would
/// otherwise reconnect forever).
pub struct BackgroundPublisher {
    child: Child,
}

impl BackgroundPublisher {
    pub fn start(port: u16, topic: &str, lines: Vec<String>) -> BackgroundPublisher {
        let mut child = line_publisher(port, topic, 1, Stdio::null());
        let mut stdin = child.stdin.take().expect("stdin");
        std::thread::spawn(move || {
            for l in &lines {
                if writeln!(stdin, "{l}").is_err() {
                    return;
                }
            }
        });
        BackgroundPublisher { child }
    }
}

impl Drop for BackgroundPublisher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Notary {
    /// `mqtt-notary run` with a config file and environment, under an
    /// open-file limit.
    pub fn start_limited(dir: &Path, config: PathBuf, fd_limit: u32, env: &[(&str, &str)]) -> Notary {
        let mut n = Notary {
            dir: dir.join("data"),
            mqtt: free_port(),
            http: free_port(),
            config: Some(config),
            upstream: None,
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            extra_args: Vec::new(),
            fd_limit: Some(fd_limit),
            child: None,
        };
        n.spawn();
        n
    }

    /// `mqtt-notary run` on an existing data directory, with extra arguments.
    pub fn start_in(dir: PathBuf, extra_args: &[&str]) -> Notary {
        let mut n = Notary {
            dir,
            mqtt: free_port(),
            http: free_port(),
            config: None,
            upstream: None,
            env: Vec::new(),
            extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
            fd_limit: None,
            child: None,
        };
        n.spawn();
        n
    }

    /// Publishes `payload` (QoS 1) and waits for its proof; returns the bundles.
    pub fn notarize(&self, topic: &str, payload: &[u8]) -> String {
        let out = publish(self.mqtt, topic, payload, &[]);
        assert!(out.status.success(), "publish: {}", String::from_utf8_lossy(&out.stderr));
        self.wait_proof(payload)
    }
}

/// `mqtt-notary run` on the data directory `dir` with `extra` arguments,
/// expected to refuse to start: (exit code, what it logged).
pub fn run_refused(dir: &Path, extra: &[&str]) -> (i32, String) {
    let mut child = Command::new(BIN)
        .arg("run")
        .arg("--data-dir")
        .arg(dir)
        .args([
            "--mqtt",
            &format!("127.0.0.1:{}", free_port()),
            "--http",
            &format!("127.0.0.1:{}", free_port()),
        ])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start mqtt-notary");
    let status = eventually("mqtt-notary to refuse and exit", || child.try_wait().ok().flatten());
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        use std::io::Read as _;
        let _ = e.read_to_string(&mut err);
    }
    (code(status), err)
}

/// One `mosquitto_pub` of one message; returns its output.
pub fn publish(port: u16, topic: &str, payload: &[u8], extra: &[&str]) -> Output {
    let file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(file.path(), payload).expect("write payload");
    Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-t", topic, "-q", "1", "-f"])
        .arg(file.path())
        .args(extra)
        .output()
        .expect("mosquitto_pub is installed")
}

/// A running `mosquitto_sub`, ready (SUBACK received) when returned.
pub struct Subscriber {
    child: Child,
    lines: Receiver<String>,
}

impl Subscriber {
    pub fn start(port: u16, topics: &[&str], extra: &[&str]) -> Subscriber {
        // Line-buffered, so each line reaches us when printed, not when a
        // pipe buffer fills.
        let mut cmd = Command::new("stdbuf");
        cmd.args(["-oL", "mosquitto_sub", "-h", "127.0.0.1", "-p", &port.to_string(), "-v", "-d"]);
        for t in topics {
            cmd.args(["-t", t]);
        }
        let mut child =
            cmd.args(extra).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().expect("mosquitto_sub");
        let out = child.stdout.take().expect("stdout");
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let sub = Subscriber { child, lines };
        sub.wait_line("SUBACK", |l| l.contains("received SUBACK"));
        sub
    }

    fn wait_line(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if pred(&l) => return l,
                Ok(_) => {}
                Err(_) => panic!("mosquitto_sub: no {what}"),
            }
        }
    }

    /// The next message as (topic, payload), skipping debug lines.
    pub fn next_message(&self) -> (String, String) {
        let line =
            self.wait_line("message", |l| !l.starts_with("Client ") && !l.starts_with("Subscribed (mid"));
        let (topic, payload) = line.split_once(' ').unwrap_or((line.as_str(), ""));
        (topic.to_owned(), payload.to_owned())
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `mqtt-notary verify`; returns (exit code, stdout, stderr).
pub fn cli_verify(bundle_json: &str, payload: &[u8], key: &Path) -> (i32, String, String) {
    cli_verify_with(bundle_json, payload, key, &[])
}

/// `mqtt-notary verify` with extra arguments (`--rpc ...`).
pub fn cli_verify_with(
    bundle_json: &str,
    payload: &[u8],
    key: &Path,
    extra: &[&str],
) -> (i32, String, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let b = dir.path().join("bundle.json");
    std::fs::write(&b, bundle_json).expect("write bundle");
    cli_verify_file(&b, payload, key, extra)
}

/// `mqtt-notary verify` of a bundle file (which `--upgrade` may rewrite);
/// the payload goes beside it.
pub fn cli_verify_file(bundle: &Path, payload: &[u8], key: &Path, extra: &[&str]) -> (i32, String, String) {
    let p = bundle.with_extension("payload");
    std::fs::write(&p, payload).expect("write payload");
    let out = Command::new(BIN)
        .arg("verify")
        .arg("--bundle")
        .arg(bundle)
        .arg("--payload")
        .arg(&p)
        .arg("--broker-key")
        .arg(key)
        .args(extra)
        .output()
        .expect("run verify");
    (
        code(out.status),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

pub fn code(s: ExitStatus) -> i32 {
    s.code().unwrap_or(-1)
}

/// Runs `mqtt-notary ledger verify --data-dir DIR`.
pub fn ledger_verify(dir: &Path) -> (i32, String) {
    let out = Command::new(BIN).args(["ledger", "verify", "--data-dir"]).arg(dir).output().expect("run");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (code(out.status), text)
}

/// Runs `mqtt-notary device ARGS...`; returns (exit code, stdout, stderr).
pub fn device(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN).arg("device").args(args).output().expect("run mqtt-notary device");
    (
        code(out.status),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// A device key made by `device keygen`: (key file, public key hex).
pub fn keygen(dir: &Path, id: &str) -> (PathBuf, String) {
    let file = dir.join(format!("{id}.key"));
    let (code, out, err) = device(&["keygen", id, "--out", file.to_str().expect("utf-8 path")]);
    assert_eq!(code, 0, "keygen: {err}");
    (file, out.trim().to_owned())
}

/// The signing key in a device key file.
pub fn signing_key(file: &Path) -> ed25519_dalek::SigningKey {
    let text = std::fs::read_to_string(file).expect("key file");
    let mut seed = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut seed).expect("hex seed");
    ed25519_dalek::SigningKey::from_bytes(&seed)
}

impl Notary {
    /// `device list --json` of this notary's data directory.
    pub fn devices(&self) -> serde_json::Value {
        let (code, out, err) = device(&["list", "--json", "--data-dir", self.dir.to_str().expect("utf-8")]);
        assert_eq!(code, 0, "device list: {err}");
        serde_json::from_str(&out).expect("device list prints JSON")
    }

    /// Runs a registry CLI command against the running broker and waits
    /// until the broker has applied it (no queued commands left).
    pub fn registry(&self, args: &[&str]) {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--data-dir", self.dir.to_str().expect("utf-8")]);
        let (code, _, err) = device(&all);
        assert_eq!(code, 0, "device {args:?}: {err}");
        eventually("the broker to apply the registry change", || {
            let list = self.devices();
            list["queued"].as_array().is_some_and(|q| q.is_empty()).then_some(())
        });
    }

    /// Signs and publishes with `device publish`; returns the envelope's digest.
    pub fn device_publish(&self, id: &str, key: &Path, topic: &str, message: &str) -> String {
        let mqtt = format!("127.0.0.1:{}", self.mqtt);
        let key = key.to_str().expect("utf-8");
        let (code, out, err) = device(&[
            "publish",
            "--id",
            id,
            "--key",
            key,
            "--topic",
            topic,
            "--message",
            message,
            "--mqtt",
            &mqtt,
        ]);
        assert_eq!(code, 0, "device publish: {err}");
        let v: serde_json::Value = serde_json::from_str(out.trim()).expect("publish prints JSON");
        v["digest"].as_str().expect("digest").to_owned()
    }

    /// Waits for the proof of the payload with this digest; returns the bundles' JSON.
    pub fn wait_proof_of(&self, digest: &str) -> String {
        eventually("a proof to be available", || {
            let (status, body) = self.get(&format!("/v1/proofs/{digest}"));
            (status == 200).then_some(body)
        })
    }
}

/// A real anvil dev chain on a free port (`ANVIL`, else `anvil` on PATH;
/// `scripts/test` installs it). Its state lives in a file, so it can be
/// stopped and started again on the same port with the same chain.
pub struct Anvil {
    child: Process,
    pub url: String,
    pub port: u16,
    args: Vec<String>,
    state: tempfile::TempDir,
}

/// anvil's first dev account, funded on every fresh chain.
pub const ANVIL_KEY: [u8; 32] = [
    0xac, 0x09, 0x74, 0xbe, 0xc3, 0x9a, 0x17, 0xe3, 0x6b, 0xa4, 0xa6, 0xb4, 0xd2, 0x38, 0xff, 0x94, 0x4b,
    0xac, 0xb4, 0x78, 0xcb, 0xed, 0x5e, 0xfc, 0xae, 0x78, 0x4d, 0x7b, 0xf4, 0xf2, 0xff, 0x80,
];
/// The address of [`ANVIL_KEY`].
pub const ANVIL_ADDRESS: &str = "0xf39fd6e51aad88f6f4ce6ab8827279cfffb92266";

impl Anvil {
    pub fn start() -> Anvil {
        Self::start_with(free_port(), &[])
    }

    /// On a chosen port, with extra arguments (`--no-mining`, ...).
    pub fn start_with(port: u16, args: &[&str]) -> Anvil {
        let mut a = Anvil {
            child: Process(None),
            url: format!("http://127.0.0.1:{port}"),
            port,
            args: args.iter().map(|s| s.to_string()).collect(),
            state: tempfile::tempdir().expect("temp dir"),
        };
        a.spawn();
        a
    }

    fn spawn(&mut self) {
        let bin = std::env::var("ANVIL").unwrap_or_else(|_| "anvil".into());
        let state = self.state.path().join("state.json");
        let child = Command::new(&bin)
            .args(["--port", &self.port.to_string(), "--silent", "--state"])
            .arg(&state)
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin} ({e}); scripts/test installs it"));
        self.child = Process(Some(child));
        eventually("anvil to answer", || self.try_rpc("eth_chainId", serde_json::json!([])));
    }

    /// SIGTERM: anvil writes its state and exits; the endpoint is down.
    pub fn stop(&mut self) {
        self.child.terminate();
    }

    /// Starts it again on the same port, with the chain it had.
    pub fn restart(&mut self) {
        assert!(self.child.0.is_none(), "stop first");
        self.spawn();
    }

    fn try_rpc(&self, method: &str, params: serde_json::Value) -> Option<serde_json::Value> {
        let body = serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
        let resp = ureq::post(&self.url)
            .timeout(Duration::from_secs(10))
            .set("content-type", "application/json")
            .send_string(&body.to_string())
            .ok()?;
        let v: serde_json::Value = serde_json::from_str(&resp.into_string().ok()?).ok()?;
        v.get("result").cloned()
    }

    /// A JSON-RPC call that must succeed; returns its result.
    pub fn rpc(&self, method: &str, params: serde_json::Value) -> serde_json::Value {
        self.try_rpc(method, params.clone()).unwrap_or_else(|| panic!("anvil {method} {params} failed"))
    }

    /// Mines `n` blocks.
    pub fn mine(&self, n: u64) {
        self.rpc("anvil_mine", serde_json::json!([format!("0x{n:x}")]));
    }

    pub fn head(&self) -> u64 {
        hex_u64(&self.rpc("eth_blockNumber", serde_json::json!([])))
    }

    /// Every transaction in the canonical chain from the dev account:
    /// (tx hash, block number, calldata hex without 0x).
    pub fn transactions_from_dev_account(&self) -> Vec<(String, u64, String)> {
        let mut out = Vec::new();
        for n in 0..=self.head() {
            let block = self.rpc("eth_getBlockByNumber", serde_json::json!([format!("0x{n:x}"), true]));
            for tx in block["transactions"].as_array().into_iter().flatten() {
                if tx["from"].as_str().map(str::to_lowercase).as_deref() == Some(ANVIL_ADDRESS) {
                    let input = tx["input"].as_str().unwrap_or("0x").trim_start_matches("0x").to_owned();
                    out.push((tx["hash"].as_str().unwrap_or_default().to_owned(), n, input));
                }
            }
        }
        out
    }

    /// Hashes of the transactions waiting in anvil's pool.
    pub fn pool(&self) -> Vec<String> {
        let content = self.rpc("txpool_content", serde_json::json!([]));
        let mut out = Vec::new();
        for by_nonce in content["pending"].as_object().into_iter().flat_map(|m| m.values()) {
            for tx in by_nonce.as_object().into_iter().flat_map(|m| m.values()) {
                out.push(tx["hash"].as_str().unwrap_or_default().to_owned());
            }
        }
        out
    }

    /// An EVM client with the funded dev key, once the chain answers.
    pub fn client(&self) -> notary_anchor::evm::EvmClient {
        let settings = notary_anchor::evm::EvmSettings {
            rpc_url: self.url.clone(),
            private_key: ANVIL_KEY,
            to: None,
            chain_id: Some(31337),
            confirmations: 1,
            timeout: Duration::from_secs(10),
        };
        eventually("anvil to answer", || notary_anchor::evm::EvmClient::connect(&settings).ok())
    }
}

pub fn hex_u64(v: &serde_json::Value) -> u64 {
    v.as_str().and_then(|s| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok()).expect("hex quantity")
}

/// A server process the tests start, stop with SIGTERM, and kill when dropped.
pub struct Process(Option<Child>);

impl Process {
    /// Sends a signal (e.g. `STOP`, `CONT`) to the running process.
    pub fn signal(&self, name: &str) {
        let child = self.0.as_ref().expect("running");
        let ok =
            Command::new("kill").args([&format!("-{name}"), &child.id().to_string()]).status().expect("kill");
        assert!(ok.success(), "kill -{name}");
    }

    /// SIGTERM, and waits for it to exit.
    pub fn terminate(&mut self) {
        let mut child = self.0.take().expect("running");
        let ok = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill");
        assert!(ok.success());
        child.wait().expect("wait");
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A real Mosquitto broker (Debian's package) on a free port. It keeps
/// unlimited queues for offline persistent sessions, as the README tells
/// operators to configure it for a sidecar.
pub struct Mosquitto {
    pub child: Process,
    pub port: u16,
    conf: PathBuf,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    pub fn start() -> Mosquitto {
        Self::start_with("allow_anonymous true\n")
    }

    /// With extra lines for its listener (e.g. a password file).
    pub fn start_with(extra: &str) -> Mosquitto {
        Self::from_config(|port, _| {
            format!(
                "listener {port} 127.0.0.1\n{extra}persistence false\n\
                 max_queued_messages 0\nmax_inflight_messages 20\n"
            )
        })
    }

    /// With a config file made by `conf(port, a private directory)`.
    pub fn from_config(conf: impl FnOnce(u16, &Path) -> String) -> Mosquitto {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let path = dir.path().join("mosquitto.conf");
        std::fs::write(&path, conf(port, dir.path())).expect("write mosquitto.conf");
        let mut m = Mosquitto { child: Process(None), port, conf: path, _dir: dir };
        m.spawn();
        m
    }

    fn spawn(&mut self) {
        let bin = ["/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .unwrap_or("mosquitto");
        let child = Command::new(bin)
            .arg("-c")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start mosquitto ({e}); scripts/test installs it"));
        self.child = Process(Some(child));
        eventually("mosquitto to listen", || TcpStream::connect(("127.0.0.1", self.port)).ok());
    }

    /// SIGTERM and wait: the broker is gone (with its in-memory sessions).
    pub fn stop(&mut self) {
        self.child.terminate();
    }

    pub fn restart(&mut self) {
        assert!(self.child.0.is_none(), "stop first");
        self.spawn();
    }
}

/// Fetches every line's bundles from the notary's HTTP API and verifies
/// them with the library (and a sample with the CLI); each line must be
/// notarized at least once, on `topic`. Returns how many leaves that took.
pub fn verify_all(notary: &Notary, lines: &[String], topic: &str) -> usize {
    let key = broker_verifier(notary);
    let mut seqs = std::collections::HashSet::new();
    for (i, line) in lines.iter().enumerate() {
        let body = notary.wait_proof(line.as_bytes());
        let bundles: Vec<serde_json::Value> = serde_json::from_str(&body).expect("JSON array");
        for b in &bundles {
            let v = notary_proof::verify_bundle_json(b.to_string().as_bytes(), line.as_bytes(), &key)
                .unwrap_or_else(|e| panic!("message {i}: {e}"));
            assert_eq!(v.leaf.topic, topic);
            assert!(seqs.insert(v.leaf.seq), "sequence numbers are unique");
        }
        // The command-line verifier agrees, on a sample spread over all batches.
        if i % 500 == 0 || i == lines.len() - 1 {
            let (code, out, err) = cli_verify(&body, line.as_bytes(), &notary.broker_key());
            assert_eq!(code, 0, "verify rejected message {i}: {err}");
            assert!(out.contains(&format!("topic:       {topic}")), "{out}");
        }
    }
    seqs.len()
}

/// A Mosquitto password file with one user, made by the real `mosquitto_passwd`.
pub fn mosquitto_password_file(dir: &Path, user: &str, password: &str) -> PathBuf {
    let path = dir.join("passwd");
    let made = Command::new("mosquitto_passwd")
        .args(["-c", "-b"])
        .arg(&path)
        .args([user, password])
        .output()
        .expect("mosquitto_passwd is installed");
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    path
}

/// A test CA and a server certificate it signed for localhost and
/// 127.0.0.1, made by openssl: (CA certificate, server certificate, server
/// key), PEM files. (rustls refuses a self-signed CA certificate used as a
/// server's own.)
pub fn test_certs(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let p = |name: &str| dir.join(name);
    let run = |args: &[&str]| {
        let made =
            Command::new("openssl").current_dir(dir).args(args).output().expect("openssl is installed");
        assert!(made.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&made.stderr));
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
    run(&[
        &["req", "-x509"][..],
        &ec,
        &["-days", "2", "-subj", "/CN=test-ca", "-keyout", "ca.key", "-out", "ca.pem"],
    ]
    .concat());
    run(&[&["req"][..], &ec, &["-subj", "/CN=localhost", "-keyout", "key.pem", "-out", "server.csr"]]
        .concat());
    std::fs::write(
        p("server.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
         keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .expect("write extensions");
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "server.ext",
        "-out",
        "cert.pem",
    ]);
    (p("ca.pem"), p("cert.pem"), p("key.pem"))
}

/// An `acked_publisher.py` process (tests/conformance) and the payloads
/// acknowledged to it, in the order their acknowledgements came.
pub struct AckedPublisher {
    child: Child,
    acked: Arc<Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl AckedPublisher {
    pub fn start(port: u16, prefix: &str, qos: u8, v5: bool, extra: &[&str]) -> AckedPublisher {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/conformance/acked_publisher.py");
        let mut cmd = Command::new("python3");
        cmd.arg(&script).args([
            "--port",
            &port.to_string(),
            "--topic",
            &format!("durable/{prefix}"),
            "--prefix",
            prefix,
            "--qos",
            &qos.to_string(),
        ]);
        if v5 {
            cmd.arg("--v5");
        }
        cmd.args(extra);
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().expect("python3 runs");
        let stdout = child.stdout.take().expect("stdout");
        let acked = Arc::new(Mutex::new(Vec::new()));
        let sink = acked.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                sink.lock().expect("lock").push(line);
            }
        });
        AckedPublisher { child, acked, reader: Some(reader) }
    }

    pub fn count(&self) -> usize {
        self.acked.lock().expect("lock").len()
    }

    /// Waits for the publisher to end (all sent and acknowledged, or the
    /// broker went away) and returns every payload acknowledged to it.
    pub fn finish(mut self) -> Vec<String> {
        eventually("the publisher to notice the broker is gone", || self.child.try_wait().ok().flatten());
        if let Some(r) = self.reader.take() {
            r.join().expect("reader");
        }
        let acked = self.acked.lock().expect("lock");
        acked.clone()
    }
}

impl Drop for AckedPublisher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An MQTT 3.1.1 client (rumqttc) with a client id of its own that
/// subscribes and publishes on one connection: what a proof requester on
/// the notary's private inboxes needs, which `mosquitto_pub` and
/// `mosquitto_sub` (two connections) cannot be.
pub struct MqttClient {
    client: rumqttc::Client,
    events: Receiver<rumqttc::Packet>,
    /// Packets received while waiting for another kind, in order.
    held: Mutex<std::collections::VecDeque<rumqttc::Packet>>,
}

impl MqttClient {
    /// Connects as `client_id`; returns once the CONNACK arrived.
    pub fn connect(port: u16, client_id: &str) -> MqttClient {
        let mut opts = rumqttc::MqttOptions::new(client_id, "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(60));
        opts.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut connection) = rumqttc::Client::new(opts, 16);
        let (tx, events) = channel();
        std::thread::spawn(move || {
            for event in connection.iter() {
                match event {
                    Ok(rumqttc::Event::Incoming(p)) => {
                        if tx.send(p).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        eprintln!("MQTT client: the connection ended: {e}");
                        return;
                    }
                }
            }
        });
        let c = MqttClient { client, events, held: Mutex::default() };
        c.wait("CONNACK", |p| matches!(p, rumqttc::Packet::ConnAck(_)));
        c
    }

    fn wait(&self, what: &str, pred: impl Fn(&rumqttc::Packet) -> bool) -> rumqttc::Packet {
        let mut held = self.held.lock().expect("held packets");
        if let Some(i) = held.iter().position(&pred) {
            return held.remove(i).expect("found");
        }
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(p) if pred(&p) => return p,
                Ok(p) => held.push_back(p),
                Err(_) => panic!("MQTT client: no {what}"),
            }
        }
    }

    /// Subscribes one filter at QoS 1; returns whether the broker granted it.
    pub fn subscribe(&self, filter: &str) -> bool {
        self.client.subscribe(filter, rumqttc::QoS::AtLeastOnce).expect("queue SUBSCRIBE");
        match self.wait("SUBACK", |p| matches!(p, rumqttc::Packet::SubAck(_))) {
            rumqttc::Packet::SubAck(ack) => {
                matches!(ack.return_codes.as_slice(), [rumqttc::SubscribeReasonCode::Success(_)])
            }
            _ => unreachable!("waited for a SUBACK"),
        }
    }

    /// Publishes at QoS 1 and waits for the PUBACK.
    pub fn publish(&self, topic: &str, payload: &[u8]) {
        self.client
            .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload.to_vec())
            .expect("queue PUBLISH");
        self.wait("PUBACK", |p| matches!(p, rumqttc::Packet::PubAck(_)));
    }

    /// The next message received, as (topic, payload).
    pub fn next_message(&self) -> (String, String) {
        match self.wait("message", |p| matches!(p, rumqttc::Packet::Publish(_))) {
            rumqttc::Packet::Publish(p) => (p.topic, String::from_utf8_lossy(&p.payload).into_owned()),
            _ => unreachable!("waited for a PUBLISH"),
        }
    }
}

/// Runs `tests/conformance/<script> --port <port>` and returns its output,
/// one JSON value per line.
pub fn conformance_script(script: &str, port: u16) -> Vec<serde_json::Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/conformance").join(script);
    let out = Command::new("python3")
        .arg(&path)
        .args(["--port", &port.to_string()])
        .output()
        .expect("python3 runs");
    assert!(out.status.success(), "{script} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON value per line"))
        .collect()
}
