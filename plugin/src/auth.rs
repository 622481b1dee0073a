//! Username/password authentication from a Mosquitto `password_file`, so
//! operators can reuse the files `mosquitto_passwd` writes.
//!
//! Each line is `username:hash`; blank lines and lines starting with `#`
//! are skipped. Two hash forms are read, the ones Mosquitto 2.0 writes:
//!
//! ```text
//! $7$<iterations>$<salt, base64>$<hash, base64>   PBKDF2-HMAC-SHA512 (mosquitto_passwd's default)
//! $6$<salt, base64>$<hash, base64>                SHA-512(password || salt) (older files)
//! ```
//!
//! Any other form is refused at start-up, naming the line, rather than
//! silently locking a user out.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use sha2::{Digest as _, Sha512};
use std::collections::HashMap;
use std::path::Path;

/// A parsed password file.
#[derive(Debug, Clone)]
pub struct PasswordFile {
    users: HashMap<String, Hash>,
    /// Checked for an unknown user, so that a login with a name that does
    /// not exist costs the same work as one with a wrong password: the
    /// strongest hash form in the file, at its highest iteration count.
    /// Otherwise the answer's speed tells an attacker which users exist.
    decoy: Hash,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Hash {
    Sha512 { salt: Vec<u8>, hash: Vec<u8> },
    Pbkdf2Sha512 { iterations: u32, salt: Vec<u8>, hash: Vec<u8> },
}

/// A password or ACL file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{path} line {line}: {why}")]
    Invalid { path: String, line: usize, why: &'static str },
}

/// Reads `path` and parses it with `parse`, which names the bad line.
pub(crate) fn load_file<T>(
    path: &Path,
    parse: impl FnOnce(&str) -> Result<T, (usize, &'static str)>,
) -> Result<T, FileError> {
    let name = || path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| FileError::Io { path: name(), source })?;
    parse(&text).map_err(|(line, why)| FileError::Invalid { path: name(), line, why })
}

/// The most PBKDF2 iterations accepted: a file with more would let one
/// CONNECT cost seconds of CPU.
const MAX_ITERATIONS: u32 = 1_000_000;

impl PasswordFile {
    pub fn load(path: &Path) -> Result<Self, FileError> {
        load_file(path, Self::parse)
    }

    /// Parses the file's text; an error names the 1-based line.
    pub fn parse(text: &str) -> Result<Self, (usize, &'static str)> {
        let mut users = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            let (user, hash) = line.split_once(':').ok_or((i + 1, "expected username:hash"))?;
            if user.is_empty() {
                return Err((i + 1, "empty username"));
            }
            users.insert(user.to_owned(), parse_hash(hash).ok_or((i + 1, "unsupported or malformed hash"))?);
        }
        let decoy = decoy(users.values());
        Ok(PasswordFile { users, decoy })
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Whether `password` is `user`'s password. An unknown user's check
    /// does the same work as a known user's (see `decoy`) and fails.
    pub fn check(&self, user: &str, password: &[u8]) -> bool {
        let (hash, known) = self.hash_for(user);
        hash.matches(password) && known
    }

    /// The hash a login as `user` is checked against, and whether the user
    /// exists.
    fn hash_for(&self, user: &str) -> (&Hash, bool) {
        match self.users.get(user) {
            Some(h) => (h, true),
            None => (&self.decoy, false),
        }
    }
}

/// The costliest hash among `hashes` (PBKDF2 over SHA-512, most iterations),
/// with a salt and hash that match no password anyone types.
fn decoy<'a>(hashes: impl Iterator<Item = &'a Hash>) -> Hash {
    let iterations = hashes
        .filter_map(|h| match h {
            Hash::Pbkdf2Sha512 { iterations, .. } => Some(*iterations),
            Hash::Sha512 { .. } => None,
        })
        .max();
    match iterations {
        Some(iterations) => Hash::Pbkdf2Sha512 { iterations, salt: vec![0; 12], hash: vec![0; 64] },
        None => Hash::Sha512 { salt: vec![0; 12], hash: vec![0; 64] },
    }
}

impl Hash {
    fn matches(&self, password: &[u8]) -> bool {
        match self {
            Hash::Sha512 { salt, hash } => {
                let mut d = Sha512::new();
                d.update(password);
                d.update(salt);
                ct_eq(&d.finalize(), hash)
            }
            Hash::Pbkdf2Sha512 { iterations, salt, hash } => {
                let mut out = vec![0u8; hash.len()];
                pbkdf2::pbkdf2_hmac::<Sha512>(password, salt, *iterations, &mut out);
                ct_eq(&out, hash)
            }
        }
    }
}

fn parse_hash(s: &str) -> Option<Hash> {
    let parts: Vec<&str> = s.split('$').collect();
    match parts.as_slice() {
        ["", "6", salt, hash] => {
            Some(Hash::Sha512 { salt: B64.decode(salt).ok()?, hash: B64.decode(hash).ok()? })
        }
        ["", "7", iterations, salt, hash] => {
            let iterations: u32 = iterations.parse().ok().filter(|n| (1..=MAX_ITERATIONS).contains(n))?;
            let hash = B64.decode(hash).ok().filter(|h| !h.is_empty() && h.len() <= 64)?;
            Some(Hash::Pbkdf2Sha512 { iterations, salt: B64.decode(salt).ok()?, hash })
        }
        _ => None,
    }
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hashes made by Mosquitto 2.0's mosquitto_passwd (the e2e tests also
    /// run the real tool); computed here the same way for the unit test.
    fn pbkdf2_line(user: &str, password: &str, salt: &[u8], iterations: u32) -> String {
        let mut out = [0u8; 64];
        pbkdf2::pbkdf2_hmac::<Sha512>(password.as_bytes(), salt, iterations, &mut out);
        format!("{user}:$7${iterations}${}${}", B64.encode(salt), B64.encode(out))
    }

    #[test]
    fn checks_both_hash_forms_and_refuses_others() {
        let mut sha = Sha512::new();
        sha.update(b"old-pass");
        sha.update(b"saltsalt");
        let six = format!("old:$6${}${}", B64.encode(b"saltsalt"), B64.encode(sha.finalize()));
        let text = format!("# users\n\n{}\n{six}\n", pbkdf2_line("dev", "s3cret", b"0123456789ab", 101));
        let f = PasswordFile::parse(&text).expect("parses");
        assert_eq!(f.len(), 2);
        assert!(f.check("dev", b"s3cret"));
        assert!(!f.check("dev", b"s3cret "));
        assert!(!f.check("nobody", b"s3cret"));
        assert!(f.check("old", b"old-pass"));
        assert!(!f.check("old", b"old-pas"));
        assert_eq!(
            PasswordFile::parse("a:$argon2id$v=19$x").err(),
            Some((1, "unsupported or malformed hash"))
        );
        assert_eq!(PasswordFile::parse("ok\n").err(), Some((1, "expected username:hash")));
        assert!(PasswordFile::parse("a:$7$0$AAAA$AAAA").is_err(), "zero iterations");
        assert!(PasswordFile::parse("a:$7$99999999$AAAA$AAAA").is_err(), "too many iterations");
    }

    /// An unknown user is checked against a hash of the same form and
    /// iteration count as the file's costliest, so the answer takes as
    /// long as for a known user with a wrong password.
    #[test]
    fn unknown_users_cost_the_same_pbkdf2_work() {
        let text = format!(
            "{}\n{}\n",
            pbkdf2_line("a", "x", b"0123456789ab", 101),
            pbkdf2_line("b", "y", b"ba9876543210", 1000)
        );
        let f = PasswordFile::parse(&text).expect("parses");
        let (hash, known) = f.hash_for("nobody");
        assert!(!known);
        assert!(matches!(hash, Hash::Pbkdf2Sha512 { iterations: 1000, .. }), "{hash:?}");
        assert!(!f.check("nobody", b""), "the decoy matches no password");
        assert!(!f.check("nobody", b"y"));
    }
}

/// The password and ACL files in force, both replaced together when the
/// operator asks for a reload (SIGHUP), as Mosquitto does.
#[derive(Debug, Default)]
pub struct Logins {
    password_path: Option<std::path::PathBuf>,
    acl_path: Option<std::path::PathBuf>,
    passwords: std::sync::RwLock<Option<std::sync::Arc<PasswordFile>>>,
    acl: std::sync::RwLock<Option<std::sync::Arc<crate::acl::AclFile>>>,
}

impl Logins {
    /// Reads the files (either may be absent: no logins, no ACL).
    pub fn load(
        password_path: Option<std::path::PathBuf>,
        acl_path: Option<std::path::PathBuf>,
    ) -> Result<Self, String> {
        let logins = Logins { password_path, acl_path, ..Default::default() };
        logins.reload()?;
        Ok(logins)
    }

    /// Reads both files again and puts them in force together; on any
    /// error the ones in force stay, and the error says why.
    pub fn reload(&self) -> Result<(), String> {
        let passwords = match &self.password_path {
            Some(p) => Some(std::sync::Arc::new(PasswordFile::load(p).map_err(|e| e.to_string())?)),
            None => None,
        };
        let acl = match &self.acl_path {
            Some(p) => Some(std::sync::Arc::new(crate::acl::AclFile::load(p).map_err(|e| e.to_string())?)),
            None => None,
        };
        if let Some(p) = &passwords {
            tracing::info!(users = p.len(), "password file in force: every MQTT client must log in");
        }
        if acl.is_some() {
            tracing::info!("ACL file in force: per-topic access for MQTT clients");
        }
        *self.passwords.write().unwrap_or_else(|e| e.into_inner()) = passwords;
        *self.acl.write().unwrap_or_else(|e| e.into_inner()) = acl;
        Ok(())
    }

    /// The password file in force; `None`: logins are off.
    pub fn passwords(&self) -> Option<std::sync::Arc<PasswordFile>> {
        // Never fails open: a poisoned lock still holds the file in force.
        self.passwords.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The ACL file in force; `None`: every client may use every topic.
    pub fn acl(&self) -> Option<std::sync::Arc<crate::acl::AclFile>> {
        self.acl.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Whether an ACL file is configured (its checks are then installed).
    /// Fixed at start-up: a reload that fails keeps the files in force.
    pub fn has_acl(&self) -> bool {
        self.acl_path.is_some()
    }

    /// Whether a password file is configured: every client logs in.
    pub fn has_passwords(&self) -> bool {
        self.password_path.is_some()
    }
}
