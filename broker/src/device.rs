//! `mqtt-notary device ...`: keys, the registry, and signed publishing.
//!
//! Registry changes are queued in the store; the broker applies them in
//! order, each as a registry leaf in the log — within a fraction of a
//! second when it is running, else when it next starts.

use anyhow::{anyhow, bail, Context as _};
use ed25519_dalek::SigningKey;
use notary_plugin::registry::parse_key_hex;
use notary_plugin::source::now_ms;
use notary_plugin::store::Store;
use notary_proof::envelope::{self, EnvelopeFields};
use notary_proof::RegistryAction;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

/// Runs a device subcommand; errors print to stderr and exit 2.
pub fn exit(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Writes a new device key (hex seed, mode 0600) and prints its public key.
pub fn keygen(id: &str, out: &Path) -> anyhow::Result<()> {
    if !notary_proof::device::valid_device_id(id) {
        bail!("invalid device id {id:?}: 1-64 of A-Z a-z 0-9 . _ : -");
    }
    let mut seed = [0u8; 32];
    getrandom::getrandom(&mut seed).map_err(|e| anyhow!("no randomness available: {e}"))?;
    notary_plugin::keys::write_private(out, &hex::encode(seed))
        .with_context(|| format!("writing {}", out.display()))?;
    println!("{}", hex::encode(SigningKey::from_bytes(&seed).verifying_key().as_bytes()));
    Ok(())
}

/// Opens the store; only enrolment may create it (before the broker's first
/// start), so a mistyped `--data-dir` is an error, not an empty registry.
fn open_store(data_dir: &Path, create: bool) -> anyhow::Result<Store> {
    if create {
        std::fs::create_dir_all(data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
    } else if !data_dir.join(notary_plugin::store::STORE_FILE).exists() {
        bail!("{}: no mqtt-notary store here", data_dir.display());
    }
    Store::open(data_dir).with_context(|| format!("opening the store in {}", data_dir.display()))
}

/// Queues a registry change after checking it against the registry as it
/// stands (the broker checks again when it applies it).
pub fn change(
    data_dir: &Path,
    action: RegistryAction,
    id: &str,
    public_key: Option<&str>,
) -> anyhow::Result<()> {
    let key = public_key.map(parse_key_hex).transpose().map_err(|e| anyhow!(e))?;
    let store = open_store(data_dir, action == RegistryAction::Enrol)?;
    notary_plugin::registry::precheck(&store, action, id, key).map_err(|e| anyhow!("{id}: {e}"))?;
    let n = store.queue_command(action, id, key, "cli", now_ms())?;
    println!("queued {} of {id} (command {n}); the broker applies it as a registry leaf", action.as_str());
    Ok(())
}

/// Prints the registry (and queued or refused commands) as a table or JSON.
pub fn list(data_dir: &Path, json: bool) -> anyhow::Result<()> {
    let store = open_store(data_dir, false)?;
    let devices = store.devices()?;
    let commands = store.commands(true)?;
    let waiting: Vec<_> = commands.iter().filter(|c| c.applied_seq.is_none() && c.error.is_none()).collect();
    let refused: Vec<_> = commands.iter().filter(|c| c.error.is_some()).collect();
    if json {
        let devices: Vec<_> = devices
            .iter()
            .map(|d| {
                serde_json::json!({
                    "id": d.id,
                    "status": if d.public_key.is_some() { "active" } else { "revoked" },
                    "public_key": d.public_key.map(hex::encode),
                    "key_seq": d.key_seq,
                    "head_seq": d.head_seq,
                    "last_counter": d.last_counter,
                })
            })
            .collect();
        let cmd = |c: &&notary_plugin::store::DeviceCommand| serde_json::json!({"id": c.id, "action": c.action.as_str(), "device": c.device, "error": c.error});
        let out = serde_json::json!({
            "devices": devices,
            "queued": waiting.iter().map(cmd).collect::<Vec<_>>(),
            "refused": refused.iter().map(cmd).collect::<Vec<_>>(),
        });
        println!("{out:#}");
        return Ok(());
    }
    println!(
        "{:<24} {:<8} {:<64} {:>10} {:>12}",
        "DEVICE", "STATUS", "PUBLIC KEY", "KEY SEQ", "LAST COUNTER"
    );
    for d in &devices {
        let opt = |v: Option<u64>| v.map_or("-".to_owned(), |v| v.to_string());
        println!(
            "{:<24} {:<8} {:<64} {:>10} {:>12}",
            d.id,
            if d.public_key.is_some() { "active" } else { "revoked" },
            d.public_key.map_or("-".to_owned(), hex::encode),
            opt(d.key_seq),
            opt(d.last_counter)
        );
    }
    for c in waiting {
        println!("queued: {} {} (command {})", c.action.as_str(), c.device, c.id);
    }
    for c in refused {
        println!(
            "refused: {} {} (command {}): {}",
            c.action.as_str(),
            c.device,
            c.id,
            c.error.as_deref().unwrap_or("")
        );
    }
    Ok(())
}

pub struct Publish {
    pub id: String,
    pub key: PathBuf,
    pub topic: String,
    pub payload: Vec<u8>,
    pub content_type: String,
    pub mqtt: String,
    pub state: Option<PathBuf>,
    /// MQTT user name and password.
    pub login: Option<(String, String)>,
}

/// Reads a device key file: 64 hex digits (the ed25519 seed).
pub fn read_key(path: &Path) -> anyhow::Result<SigningKey> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut seed = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut seed)
        .map_err(|_| anyhow!("{}: a device key file holds 64 hex digits", path.display()))?;
    Ok(SigningKey::from_bytes(&seed))
}

/// Takes the next counter from the state file, which holds the last one
/// used. The new value is written (and synced) before the message is sent,
/// so a crash never reuses a counter.
fn next_counter(state: &Path) -> anyhow::Result<u64> {
    let last = match std::fs::read_to_string(state) {
        Ok(s) => s.trim().parse::<u64>().with_context(|| format!("{}: not a counter", state.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(e).with_context(|| format!("reading {}", state.display())),
    };
    let next = last.checked_add(1).ok_or_else(|| anyhow!("counter exhausted"))?;
    let tmp = state.with_extension("tmp");
    std::fs::write(&tmp, format!("{next}\n")).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing {}", tmp.display()))?;
    std::fs::rename(&tmp, state).with_context(|| format!("writing {}", state.display()))?;
    Ok(next)
}

/// Signs one envelope and publishes it at QoS 1; prints the counter and
/// the BLAKE3 digest by which its proof can be requested.
pub fn publish(p: Publish) -> anyhow::Result<()> {
    let key = read_key(&p.key)?;
    let state = p.state.unwrap_or_else(|| {
        let mut s = p.key.clone().into_os_string();
        s.push(".counter");
        PathBuf::from(s)
    });
    let (host, port) = p
        .mqtt
        .rsplit_once(':')
        .and_then(|(h, port)| Some((h.to_owned(), port.parse::<u16>().ok()?)))
        .ok_or_else(|| anyhow!("--mqtt takes HOST:PORT"))?;
    let counter = next_counter(&state)?;
    let bytes = envelope::sign(
        &key,
        &EnvelopeFields {
            device_id: &p.id,
            counter,
            device_time_ms: now_ms(),
            content_type: &p.content_type,
            topic: &p.topic,
            payload: &p.payload,
        },
    )?;
    let digest = blake3::hash(&bytes);

    let mut opts = rumqttc::MqttOptions::new(format!("notary-device-{}-{counter}", p.id), host, port);
    opts.set_keep_alive(Duration::from_secs(30)).set_max_packet_size(bytes.len() + 1024, 64 * 1024);
    if let Some((user, password)) = p.login {
        opts.set_credentials(user, password);
    }
    let (client, mut connection) = rumqttc::Client::new(opts, 10);
    client.publish(&p.topic, rumqttc::QoS::AtLeastOnce, false, bytes).context("queueing the publish")?;
    for event in connection.iter() {
        match event.context("MQTT connection")? {
            rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) => break,
            rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(ack))
                if ack.code != rumqttc::ConnectReturnCode::Success =>
            {
                bail!("the broker refused the connection: {:?}", ack.code)
            }
            _ => {}
        }
    }
    let _ = client.disconnect();
    println!("{}", serde_json::json!({"counter": counter, "digest": digest.to_hex().as_str()}));
    Ok(())
}
