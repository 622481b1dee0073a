//! The TLS listener: terminates TLS (rustls) and forwards each connection's
//! bytes to the broker's plain MQTT listener on this host. Also the client
//! side, for a sidecar that reaches its broker over TLS.
//!
//! rumqttd 0.20 can terminate TLS itself, but it runs each handshake inside
//! its accept loop with no time limit: one client that opens a connection
//! and never speaks stalls every later TLS client. Here each handshake runs
//! in its own task under `connection_timeout_ms`. Keep the plain listener on
//! 127.0.0.1 (the default) to require TLS from the network.

use crate::metrics::Metrics;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {why}")]
    Pem { path: String, why: String },
    #[error("TLS configuration: {0}")]
    Config(String),
    #[error("cannot listen for MQTT over TLS on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
}

/// Loads the certificate chain and private key (PEM files).
pub fn acceptor(cert_file: &Path, key_file: &Path) -> Result<TlsAcceptor, TlsError> {
    let certs = read_certs(cert_file)?;
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|e| TlsError::Pem { path: key_file.display().to_string(), why: e.to_string() })?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::aws_lc_rs::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = |why: String| TlsError::Pem { path: path.display().to_string(), why };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem(e.to_string()))?;
    if certs.is_empty() {
        return Err(pem("no certificate in the file".into()));
    }
    Ok(certs)
}

/// A TLS client configuration that trusts the CA certificates in `ca_file`
/// (PEM) and, with `client`, presents that certificate chain and key.
pub fn client_config(ca_file: &Path, client: Option<(&Path, &Path)>) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(ca_file)? {
        roots
            .add(cert)
            .map_err(|e| TlsError::Pem { path: ca_file.display().to_string(), why: e.to_string() })?;
    }
    let provider = Arc::new(tokio_rustls::rustls::crypto::aws_lc_rs::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots);
    let config = match client {
        None => builder.with_no_client_auth(),
        Some((cert_file, key_file)) => {
            let key = PrivateKeyDer::from_pem_file(key_file)
                .map_err(|e| TlsError::Pem { path: key_file.display().to_string(), why: e.to_string() })?;
            builder
                .with_client_auth_cert(read_certs(cert_file)?, key)
                .map_err(|e| TlsError::Config(e.to_string()))?
        }
    };
    Ok(Arc::new(config))
}

/// Where to reach a listener bound to `addr` from this host.
pub fn local_target(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port()),
        IpAddr::V6(ip) if ip.is_unspecified() => SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port()),
        _ => addr,
    }
}

/// Binds the TLS listener; `serve` then accepts on it.
pub async fn bind(listen: SocketAddr) -> Result<TcpListener, TlsError> {
    TcpListener::bind(listen).await.map_err(|source| TlsError::Bind { addr: listen, source })
}

/// Accepts TLS clients until the task is dropped, forwarding each to
/// `upstream`. At most `max_connections` are open at once (the `[mqtt]`
/// limit): one more is closed at once and counted, so a flood of TLS
/// connections cannot exhaust the process's file descriptors.
pub async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    upstream: SocketAddr,
    handshake: Duration,
    max_connections: usize,
    metrics: Arc<Metrics>,
) {
    let slots =
        Arc::new(tokio::sync::Semaphore::new(max_connections.clamp(1, tokio::sync::Semaphore::MAX_PERMITS)));
    let mut backoff = Duration::ZERO;
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => {
                backoff = Duration::ZERO;
                s
            }
            Err(e) => {
                Metrics::inc(&metrics.accept_errors_total);
                if backoff.is_zero() {
                    tracing::warn!(error = %e, "TLS accept failed; backing off");
                }
                // Out of file descriptors and the like: do not spin.
                backoff = (backoff * 2).clamp(Duration::from_millis(5), Duration::from_secs(1));
                tokio::time::sleep(backoff).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            Metrics::inc(&metrics.tls_connections_refused_total);
            tracing::debug!(%peer, "TLS connection refused: max_connections are open");
            continue;
        };
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(why) = forward(stream, acceptor, upstream, handshake).await {
                tracing::debug!(%peer, %why, "TLS connection ended");
            }
        });
    }
}

async fn forward(
    stream: TcpStream,
    acceptor: TlsAcceptor,
    upstream: SocketAddr,
    handshake: Duration,
) -> Result<(), String> {
    let _ = stream.set_nodelay(true);
    let mut tls = tokio::time::timeout(handshake, acceptor.accept(stream))
        .await
        .map_err(|_| "handshake timed out".to_owned())?
        .map_err(|e| format!("handshake failed: {e}"))?;
    let mut plain = TcpStream::connect(upstream).await.map_err(|e| format!("broker unreachable: {e}"))?;
    let _ = plain.set_nodelay(true);
    tokio::io::copy_bidirectional(&mut tls, &mut plain).await.map_err(|e| e.to_string())?;
    Ok(())
}
