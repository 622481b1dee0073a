//! The broker's checkpoint-signing key: created on first start in the data
//! directory (`broker.key`, mode 0600), with the public verifier key written
//! beside it (`broker.pub`) for anyone who verifies proofs.

use notary_proof::NoteSigner;
use std::io::Write as _;
use std::path::Path;

pub const KEY_FILE: &str = "broker.key";
pub const PUB_FILE: &str = "broker.pub";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{path}: not a signer key: {why}")]
    Invalid { path: String, why: String },
    #[error("the configured origin {configured:?} differs from the key's log name {existing:?}; a log keeps its name for life")]
    OriginMismatch { configured: String, existing: String },
    #[error("no randomness available: {0}")]
    Random(String),
}

/// Loads the signer from `data_dir`, or creates one. `origin`, when set,
/// names a new log and must match an existing one.
pub fn load_or_create(data_dir: &Path, origin: Option<&str>) -> Result<NoteSigner, KeyError> {
    let key_path = data_dir.join(KEY_FILE);
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| KeyError::Io { path, source }
    };
    let signer = if key_path.exists() {
        let text = std::fs::read_to_string(&key_path).map_err(io(&key_path))?;
        let signer = NoteSigner::from_key_string(&text)
            .map_err(|e| KeyError::Invalid { path: key_path.display().to_string(), why: e.to_string() })?;
        if let Some(o) = origin.filter(|o| *o != signer.name()) {
            return Err(KeyError::OriginMismatch { configured: o.into(), existing: signer.name().into() });
        }
        signer
    } else {
        let mut seed = [0u8; 32];
        getrandom::getrandom(&mut seed).map_err(|e| KeyError::Random(e.to_string()))?;
        let name = match origin {
            Some(o) => o.to_owned(),
            None => {
                let public = ed25519_dalek::SigningKey::from_bytes(&seed).verifying_key();
                format!("mqtt-notary/{}", hex::encode(&public.as_bytes()[..8]))
            }
        };
        let signer = NoteSigner::new(&name, seed)
            .map_err(|e| KeyError::Invalid { path: key_path.display().to_string(), why: e.to_string() })?;
        write_private(&key_path, &signer.to_key_string()).map_err(io(&key_path))?;
        signer
    };
    let pub_path = data_dir.join(PUB_FILE);
    let vkey = signer.verifier().to_key_string() + "\n";
    if std::fs::read_to_string(&pub_path).ok().as_deref() != Some(vkey.as_str()) {
        std::fs::write(&pub_path, vkey).map_err(io(&pub_path))?;
    }
    Ok(signer)
}

/// Writes a new secret file (mode 0600 on Unix); refuses to overwrite one.
pub fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(text.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()
}
