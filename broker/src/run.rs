//! `mqtt-notary run` and `mqtt-notary sidecar`: wire a message source (the
//! embedded broker, or a subscription on an existing one), the pipeline,
//! the ledgers and the HTTP API, and shut them down in order on
//! SIGINT/SIGTERM.

use crate::config::{Config, EnrolmentFile};
use anyhow::Context as _;
use notary_anchor::{Anchor, LocalLedger};
use notary_plugin::auth::Logins;
use notary_plugin::embedded::{self, EmbeddedSettings};
use notary_plugin::{http, keys, tls, BatchPolicy, Pipeline, PipelineConfig, Shutdown};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

pub const LEDGER_FILE: &str = "ledger.sqlite";

/// Where messages come from.
pub enum Source {
    /// The embedded broker, listening on `mqtt.listen`.
    Embedded,
    /// An existing broker at `mqtt://HOST:PORT`, as its client.
    Upstream(String),
}

pub fn main(
    config: Option<PathBuf>,
    data_dir: Option<PathBuf>,
    mqtt: Option<SocketAddr>,
    http: Option<SocketAddr>,
    new_log: bool,
    source: Source,
) -> ExitCode {
    init_tracing();
    let result = Config::load(config.as_deref()).and_then(|mut cfg| {
        if let Some(d) = data_dir {
            cfg.data_dir = d;
        }
        if let Some(a) = mqtt {
            cfg.mqtt.listen = a;
        }
        if let Some(a) = http {
            cfg.http.listen = a;
        }
        serve(cfg, source, new_log)
    });
    match result {
        Ok(Shutdown::Clean) => ExitCode::SUCCESS,
        Ok(Shutdown::Incomplete { uncommitted }) => {
            tracing::error!(
                uncommitted,
                "stopped at the shutdown deadline; not everything taken was committed"
            );
            ExitCode::from(3)
        }
        Err(e) => {
            tracing::error!("{e:#}");
            if e.downcast_ref::<crate::datadir::Refused>().is_some() {
                ExitCode::from(4)
            } else {
                ExitCode::from(2)
            }
        }
    }
}

/// Logs go to stderr; `RUST_LOG` overrides the default filter. The embedded
/// broker (rmqtt, which logs through the `log` crate, bridged here) logs
/// every connection's end and every refused CONNECT at INFO: by default it
/// is held to WARN. Whether its listener accepts is watched by the
/// listener probe (`/healthz`), not by its log.
fn init_tracing() {
    use std::io::IsTerminal as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(
            "info,rmqtt=warn,rmqtt_net=warn,rmqtt_codec=warn,rmqtt_retainer=warn,rmqtt_sys_topic=warn",
        )
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .finish()
        .init();
}

/// `mqtt://HOST[:PORT]` or `mqtts://HOST[:PORT]` → (host, port, tls).
pub fn parse_broker_url(url: &str) -> anyhow::Result<(String, u16, bool)> {
    let (rest, tls, default_port) = match (url.strip_prefix("mqtt://"), url.strip_prefix("mqtts://")) {
        (Some(r), _) => (r, false, 1883),
        (_, Some(r)) => (r, true, 8883),
        _ => anyhow::bail!("--broker {url:?}: expected mqtt://HOST:PORT or mqtts://HOST:PORT"),
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => {
            (h, p.parse().map_err(|_| anyhow::anyhow!("--broker {url:?}: bad port"))?)
        }
        _ => (rest, default_port),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        anyhow::bail!("--broker {url:?}: no host");
    }
    Ok((host.to_owned(), port, tls))
}

/// The embedded broker's settings from the `[mqtt]` and `[devices]` tables.
fn embedded_settings(cfg: &Config) -> anyhow::Result<EmbeddedSettings> {
    Ok(EmbeddedSettings {
        listen: cfg.mqtt.listen,
        max_connections: cfg.mqtt.max_connections,
        max_payload_bytes: cfg.mqtt.max_payload_bytes,
        connection_timeout_ms: cfg.mqtt.connection_timeout_ms,
        max_inflight: cfg.mqtt.max_inflight,
        max_queued_messages: cfg.mqtt.max_queued_messages,
        ack: match cfg.mqtt.ack {
            crate::config::Ack::AfterCommit => embedded::AckMode::AfterCommit,
            crate::config::Ack::OnReceipt => embedded::AckMode::OnReceipt,
        },
        reject_v311: match cfg.mqtt.reject_v311 {
            crate::config::RejectV311::Drop => embedded::RejectV311::Drop,
            crate::config::RejectV311::Disconnect => embedded::RejectV311::Disconnect,
        },
        policy: cfg.devices.policy(),
        topics: cfg.topics.topics(),
        logins: Arc::new(
            Logins::load(cfg.mqtt.password_file.clone(), cfg.mqtt.acl_file.clone())
                .map_err(anyhow::Error::msg)?,
        ),
    })
}

/// Plain rmqtt on `listen` and no notary hook: the benchmark's baseline,
/// the same broker our pipeline embeds. Tuned like the benchmark's
/// Mosquitto so that it does not drop QoS 1 messages a fast subscriber
/// cannot take at once (1,000 in flight, queues without a practical limit).
/// Runs until the process ends.
pub fn plain_rmqtt(listen: std::net::SocketAddr) -> anyhow::Result<()> {
    let mut cfg = Config::default();
    cfg.mqtt.listen = listen;
    cfg.mqtt.max_inflight = 1000;
    cfg.mqtt.max_queued_messages = 100_000_000;
    let settings = embedded_settings(&cfg)?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(embedded::run_plain(&settings))?;
    Ok(())
}

fn serve(cfg: Config, source: Source, new_log: bool) -> anyhow::Result<Shutdown> {
    let dir = &cfg.data_dir;
    std::fs::create_dir_all(dir).with_context(|| format!("creating data directory {}", dir.display()))?;
    crate::datadir::check(dir, LEDGER_FILE, new_log)?;
    let origin = (!cfg.log.origin.is_empty()).then_some(cfg.log.origin.as_str());
    let signer = keys::load_or_create(dir, origin)?;
    tracing::info!(log = signer.name(), key = %dir.join(keys::PUB_FILE).display(), "checkpoint key");
    let ledger: Arc<dyn Anchor> =
        Arc::new(LocalLedger::open(&dir.join(LEDGER_FILE))?.signing(signer.clone()));
    if let Some(file) = &cfg.devices.enrolment_file {
        let entries = EnrolmentFile::load(file)?.device;
        let store = notary_plugin::store::Store::open(dir)?;
        let queued =
            notary_plugin::registry::queue_enrolments(&store, &entries, notary_plugin::source::now_ms())
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
        tracing::info!(file = %file.display(), devices = entries.len(), queued, "enrolment file read");
    }

    let (intake, inlets) = notary_plugin::inlets(cfg.ingest.queue_capacity, cfg.topics.topics());
    let settings = embedded_settings(&cfg)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    // Bind HTTP before accepting MQTT, so a taken port fails start-up cleanly.
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(cfg.http.listen))
        .with_context(|| format!("cannot listen for HTTP on {}", cfg.http.listen))?;
    let tls = match &cfg.mqtt.tls {
        Some(t) => {
            let acceptor = tls::acceptor(&t.cert_file, &t.key_file)?;
            Some((rt.block_on(tls::bind(t.listen))?, acceptor))
        }
        None => None,
    };
    let outbox = match &source {
        Source::Embedded => {
            let outbox = rt.block_on(embedded::start(&settings, intake.clone(), inlets.metrics()))?;
            if let Some((listener, acceptor)) = tls {
                let upstream = tls::local_target(cfg.mqtt.listen);
                let handshake = std::time::Duration::from_millis(cfg.mqtt.connection_timeout_ms.into());
                tracing::info!(listen = ?listener.local_addr().ok(), "MQTT over TLS");
                let (max, metrics) = (cfg.mqtt.max_connections, inlets.metrics());
                rt.spawn(tls::serve(listener, acceptor, upstream, handshake, max, metrics));
            }
            outbox
        }
        Source::Upstream(url) => {
            let (host, port, use_tls) = parse_broker_url(url)?;
            let s = &cfg.sidecar;
            let tls = match (use_tls, &s.tls) {
                (false, _) => None,
                (true, Some(t)) => {
                    let client = t.cert_file.as_deref().zip(t.key_file.as_deref());
                    Some(tls::client_config(&t.ca_file, client)?)
                }
                (true, None) => anyhow::bail!("--broker {url}: mqtts:// needs [sidecar.tls] ca_file"),
            };
            let password = match &s.password_file {
                Some(p) => Some(
                    std::fs::read_to_string(p)
                        .with_context(|| format!("reading sidecar.password_file {}", p.display()))?
                        .trim_end_matches(['\r', '\n'])
                        .to_owned(),
                ),
                None => None,
            };
            let client_id = if s.client_id.is_empty() {
                signer.name().replace(['/', '+', '#'], "-")
            } else {
                s.client_id.clone()
            };
            let settings = notary_plugin::sidecar::SidecarSettings {
                host,
                port,
                client_id,
                topics: s.topics.clone(),
                group: (!s.group.is_empty()).then(|| s.group.clone()),
                log_name: signer.name().to_owned(),
                username: s.username.clone(),
                password,
                keep_alive_s: s.keep_alive_s,
                max_payload_bytes: cfg.mqtt.max_payload_bytes,
                max_retry_ms: s.max_retry_ms,
                alive_file: dir.join("sidecar.alive"),
                notary_topics: cfg.topics.topics(),
                tls,
            };
            tracing::info!(broker = %url, client_id = %settings.client_id, topics = ?settings.topics, "sidecar: notarizing an existing broker");
            notary_plugin::sidecar::start(&settings, intake.clone(), inlets.metrics())?
        }
    };
    let pipeline_cfg = PipelineConfig {
        data_dir: dir.clone(),
        policy: BatchPolicy {
            max_batch_size: cfg.log.max_batch_size,
            max_batch_age_ms: cfg.log.max_batch_age_ms,
        },
        devices: cfg.devices.policy(),
        answer_only_holders: matches!(source, Source::Upstream(_)) && !cfg.sidecar.group.is_empty(),
        stall_ms: cfg.ingest.stall_ms,
        retention: cfg.retention.policy(),
        evm: match &cfg.anchor.evm {
            Some(evm) => {
                let c = evm.anchor_config()?;
                tracing::info!(
                    chain_id = evm.chain_id,
                    interval_ms = evm.anchor_interval_ms,
                    confirmations = evm.confirmations,
                    "anchoring on an EVM chain too"
                );
                Some(c)
            }
            None => None,
        },
    };
    let pipeline = Pipeline::start(&pipeline_cfg, intake, inlets, outbox, signer, vec![ledger])?;
    let api = http::Api { proofs: pipeline.proofs.clone(), metrics: pipeline.metrics.clone() };
    match &source {
        Source::Embedded => {
            tracing::info!(mqtt = %cfg.mqtt.listen, http = %cfg.http.listen, data_dir = %dir.display(), "mqtt-notary ready")
        }
        Source::Upstream(url) => {
            tracing::info!(broker = %url, http = %cfg.http.listen, data_dir = %dir.display(), "mqtt-notary sidecar ready")
        }
    }

    let limits = http::HttpLimits {
        max_connections: cfg.http.max_connections,
        header_read_timeout: std::time::Duration::from_millis(cfg.http.header_read_timeout_ms),
    };
    let deadline = std::time::Duration::from_millis(cfg.ingest.shutdown_timeout_ms);
    let logins = settings.logins.clone();
    let outcome = rt.block_on(async move {
        // Signal handlers first: once HTTP answers, a SIGTERM must find
        // them in place (a supervisor or test may stop us right away).
        let signalled = shutdown_signal()?;
        reload_on_sighup(logins)?;
        let stop = CancellationToken::new();
        let metrics = pipeline.metrics.clone();
        let server = tokio::spawn(http::serve(listener, http::router(api), limits, metrics, stop.clone()));
        signalled.await;
        tracing::info!(
            deadline_ms = deadline.as_millis() as u64,
            "shutting down: draining, sealing and anchoring"
        );
        let outcome = tokio::task::spawn_blocking(move || pipeline.shutdown(deadline))
            .await
            .context("pipeline shutdown")?;
        stop.cancel();
        server.await.context("HTTP server")?;
        if outcome == Shutdown::Clean {
            tracing::info!("stopped");
        }
        anyhow::Ok(outcome)
    })?;
    // The broker's tasks end with the runtime; a publish still waiting for
    // its commit is answered "not committed" (no acknowledgement), and a
    // stage still blocked after the deadline ends with the process.
    rt.shutdown_background();
    Ok(outcome)
}

/// Installs the SIGHUP handler now: each SIGHUP reads the password and ACL
/// files again (both or neither take effect).
fn reload_on_sighup(logins: Arc<Logins>) -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                let l = logins.clone();
                match tokio::task::spawn_blocking(move || l.reload()).await {
                    Ok(Ok(())) => tracing::info!("SIGHUP: password and ACL files reloaded"),
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "SIGHUP: reload failed; the files in force stay")
                    }
                    Err(e) => tracing::error!(error = %e, "SIGHUP: reload failed; the files in force stay"),
                }
            }
        });
    }
    #[cfg(not(unix))]
    drop(logins);
    Ok(())
}

/// Installs the SIGINT and SIGTERM handlers now; the future ends at the
/// first of the two.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
        Ok(async move {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            let _ = tokio::signal::ctrl_c().await;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::parse_broker_url;

    #[test]
    fn broker_urls() {
        assert_eq!(parse_broker_url("mqtt://h:1884").expect("ok"), ("h".into(), 1884, false));
        assert_eq!(parse_broker_url("mqtt://10.0.0.1").expect("ok"), ("10.0.0.1".into(), 1883, false));
        assert_eq!(parse_broker_url("mqtt://[::1]:1885/").expect("ok"), ("::1".into(), 1885, false));
        assert_eq!(parse_broker_url("mqtts://b.example").expect("ok"), ("b.example".into(), 8883, true));
        assert!(parse_broker_url("tcp://h:1").is_err());
        assert!(parse_broker_url("mqtt://h:port").is_err());
        assert!(parse_broker_url("mqtt://").is_err());
    }
}
