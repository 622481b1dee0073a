//! Checkpoints: C2SP tlog-checkpoint bodies in C2SP signed notes, signed
//! with Ed25519. Key strings use the formats of Go's `golang.org/x/mod/sumdb/note`
//! package, so standard transparency-log tooling reads them:
//!
//! - verifier key: `<name>+<key id hex>+<base64(0x01 || public key)>`
//! - signer key:   `PRIVATE+KEY+<name>+<key id hex>+<base64(0x01 || seed)>`
//! - key id:       first 4 bytes of SHA-256(name || "\n" || 0x01 || public key)
//!
//! A signed note is the body, an empty line, then one line per signature:
//! `— <name> <base64(key id || signature)>` (U+2014, then a space).

use crate::hash::{sha256, Hash};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};

const ALG_ED25519: u8 = 0x01;
const SIG_PREFIX: &str = "\u{2014} ";

/// Why a checkpoint note was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoteError {
    #[error("malformed note: {0}")]
    Malformed(&'static str),
    #[error("the note carries no signature by the expected key")]
    UnknownKey,
    #[error("the checkpoint signature does not verify")]
    BadSignature,
}

/// A tree head: origin (the log's name), size and root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub origin: String,
    pub size: u64,
    pub root: Hash,
}

impl Checkpoint {
    /// The C2SP tlog-checkpoint body, newline-terminated.
    pub fn body(&self) -> String {
        format!("{}\n{}\n{}\n", self.origin, self.size, B64.encode(self.root))
    }

    /// Parses a checkpoint body: exactly origin, size and root. C2SP lets
    /// a log add extension lines; this log defines none, so a body with
    /// any is malformed.
    pub fn parse_body(body: &str) -> Result<Self, NoteError> {
        let mut lines =
            body.strip_suffix('\n').ok_or(NoteError::Malformed("body must end with a newline"))?.split('\n');
        let origin = lines.next().unwrap_or_default();
        if origin.is_empty() {
            return Err(NoteError::Malformed("empty origin"));
        }
        let size = canonical_u64(lines.next().ok_or(NoteError::Malformed("missing tree size"))?)?;
        let root = base64_hash(lines.next().ok_or(NoteError::Malformed("missing root hash"))?)?;
        if lines.next().is_some() {
            return Err(NoteError::Malformed("extension lines after the root"));
        }
        Ok(Checkpoint { origin: origin.to_owned(), size, root })
    }
}

/// A size line: canonical decimal (no sign, no leading zero), within u64.
pub(crate) fn canonical_u64(line: &str) -> Result<u64, NoteError> {
    if line.is_empty()
        || !line.bytes().all(|b| b.is_ascii_digit())
        || (line.len() > 1 && line.starts_with('0'))
    {
        return Err(NoteError::Malformed("size is not a canonical decimal"));
    }
    line.parse().map_err(|_| NoteError::Malformed("size out of range"))
}

/// A hash line: standard, padded base64 of 32 bytes.
pub(crate) fn base64_hash(line: &str) -> Result<Hash, NoteError> {
    B64.decode(line)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or(NoteError::Malformed("hash is not 32 bytes of base64"))
}

fn valid_name(name: &str) -> bool {
    !name.is_empty() && !name.contains('+') && !name.chars().any(char::is_whitespace)
}

fn key_id(name: &str, public: &VerifyingKey) -> [u8; 4] {
    let mut input = Vec::with_capacity(name.len() + 34);
    input.extend_from_slice(name.as_bytes());
    input.push(b'\n');
    input.push(ALG_ED25519);
    input.extend_from_slice(public.as_bytes());
    let h = sha256(&input);
    [h[0], h[1], h[2], h[3]]
}

/// Signs checkpoint notes.
#[derive(Clone)]
pub struct NoteSigner {
    name: String,
    key: SigningKey,
    id: [u8; 4],
}

impl NoteSigner {
    /// A signer from a 32-byte Ed25519 seed. The name must be non-empty and
    /// free of '+' and whitespace.
    pub fn new(name: &str, seed: [u8; 32]) -> Result<Self, NoteError> {
        if !valid_name(name) {
            return Err(NoteError::Malformed("key name must be non-empty, without '+' or spaces"));
        }
        let key = SigningKey::from_bytes(&seed);
        let id = key_id(name, &key.verifying_key());
        Ok(NoteSigner { name: name.to_owned(), key, id })
    }

    /// Parses `PRIVATE+KEY+<name>+<id>+<base64>`.
    pub fn from_key_string(s: &str) -> Result<Self, NoteError> {
        let rest = s
            .trim_end()
            .strip_prefix("PRIVATE+KEY+")
            .ok_or(NoteError::Malformed("signer key must start with PRIVATE+KEY+"))?;
        let (name, id, key) = split_key(rest)?;
        let seed: [u8; 32] =
            key.try_into().map_err(|_| NoteError::Malformed("signer key is not an Ed25519 seed"))?;
        let signer = NoteSigner::new(name, seed)?;
        if signer.id != id {
            return Err(NoteError::Malformed("signer key id does not match its key"));
        }
        Ok(signer)
    }

    /// The `PRIVATE+KEY+...` string. It is a secret: write it to a file with
    /// restricted permissions, never to a log.
    pub fn to_key_string(&self) -> String {
        format!("PRIVATE+KEY+{}", key_string(&self.name, self.id, self.key.as_bytes()))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn verifier(&self) -> NoteVerifier {
        NoteVerifier { name: self.name.clone(), key: self.key.verifying_key(), id: self.id }
    }

    /// Signs a note body (which must end with a newline) and returns the
    /// whole signed note.
    pub fn sign(&self, body: &str) -> String {
        let sig = self.key.sign(body.as_bytes());
        let mut blob = self.id.to_vec();
        blob.extend_from_slice(&sig.to_bytes());
        format!("{body}\n{SIG_PREFIX}{} {}\n", self.name, B64.encode(blob))
    }
}

/// Verifies checkpoint notes against one known key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NoteVerifier {
    name: String,
    key: VerifyingKey,
    id: [u8; 4],
}

/// `<name>+<id hex>+<base64(0x01 || key)>`, the note package's key layout.
fn key_string(name: &str, id: [u8; 4], key: &[u8; 32]) -> String {
    let mut k = vec![ALG_ED25519];
    k.extend_from_slice(key);
    format!("{name}+{}+{}", hex::encode(id), B64.encode(k))
}

fn split_key(s: &str) -> Result<(&str, [u8; 4], Vec<u8>), NoteError> {
    // The key is standard base64, which may itself contain '+': like Go's
    // note package, split off only the name and the id.
    let mut parts = s.splitn(3, '+');
    let (Some(name), Some(id_hex), Some(key_b64)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(NoteError::Malformed("key string must be name+id+key"));
    };
    if !valid_name(name) {
        return Err(NoteError::Malformed("bad key name"));
    }
    let id: [u8; 4] = hex::decode(id_hex)
        .ok()
        .filter(|_| id_hex.len() == 8)
        .and_then(|b| b.try_into().ok())
        .ok_or(NoteError::Malformed("key id must be 8 hex digits"))?;
    let key = B64.decode(key_b64).map_err(|_| NoteError::Malformed("key is not base64"))?;
    match key.split_first() {
        Some((&ALG_ED25519, rest)) => Ok((name, id, rest.to_vec())),
        _ => Err(NoteError::Malformed("key algorithm is not Ed25519")),
    }
}

impl NoteVerifier {
    /// Parses `<name>+<id>+<base64(0x01 || public key)>`.
    pub fn from_key_string(s: &str) -> Result<Self, NoteError> {
        let (name, id, key) = split_key(s.trim())?;
        let key: [u8; 32] =
            key.try_into().map_err(|_| NoteError::Malformed("verifier key is not 32 bytes"))?;
        let key = VerifyingKey::from_bytes(&key)
            .map_err(|_| NoteError::Malformed("verifier key is not a valid Ed25519 point"))?;
        if key_id(name, &key) != id {
            return Err(NoteError::Malformed("verifier key id does not match its key"));
        }
        Ok(NoteVerifier { name: name.to_owned(), key, id })
    }

    pub fn to_key_string(&self) -> String {
        key_string(&self.name, self.id, self.key.as_bytes())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Checks the note's signature by this key and returns the body.
    /// Signatures by other keys are ignored; if none is by this key, the
    /// note fails with `UnknownKey`. Like Go's note package, it refuses
    /// control characters other than newline and two signatures by the
    /// same key (name and key id).
    pub fn verify<'a>(&self, note: &'a str) -> Result<&'a str, NoteError> {
        if note.chars().any(|c| c.is_control() && c != '\n') {
            return Err(NoteError::Malformed("control character in the note"));
        }
        let split = note.rfind("\n\n").ok_or(NoteError::Malformed("no blank line before the signatures"))?;
        let body = &note[..split + 1];
        let sigs = &note[split + 2..];
        let sigs =
            sigs.strip_suffix('\n').ok_or(NoteError::Malformed("signature block must end with a newline"))?;
        let mut seen: Vec<(&str, [u8; 4])> = Vec::new();
        let mut found = false;
        for line in sigs.split('\n') {
            let rest = line
                .strip_prefix(SIG_PREFIX)
                .ok_or(NoteError::Malformed("signature line must start with an em dash"))?;
            let (name, b64) = rest
                .split_once(' ')
                .ok_or(NoteError::Malformed("signature line must be name and signature"))?;
            let blob = B64.decode(b64).map_err(|_| NoteError::Malformed("signature is not base64"))?;
            let id: [u8; 4] = blob
                .get(..4)
                .and_then(|id| id.try_into().ok())
                .ok_or(NoteError::Malformed("signature shorter than its key id"))?;
            if seen.contains(&(name, id)) {
                return Err(NoteError::Malformed("two signatures by the same key"));
            }
            seen.push((name, id));
            if name != self.name || id != self.id {
                continue;
            }
            found = true;
            let sig = Signature::from_slice(&blob[4..]).map_err(|_| NoteError::BadSignature)?;
            self.key.verify_strict(body.as_bytes(), &sig).map_err(|_| NoteError::BadSignature)?;
        }
        if found {
            Ok(body)
        } else {
            Err(NoteError::UnknownKey)
        }
    }

    /// Verifies a signed checkpoint and parses it. The checkpoint's origin
    /// must be the key's name.
    pub fn verify_checkpoint(&self, note: &str) -> Result<Checkpoint, NoteError> {
        let cp = Checkpoint::parse_body(self.verify(note)?)?;
        if cp.origin != self.name {
            return Err(NoteError::UnknownKey);
        }
        Ok(cp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer() -> NoteSigner {
        NoteSigner::new("example.com/log", [7; 32]).expect("valid name")
    }

    #[test]
    fn signs_and_verifies_and_round_trips_keys() {
        let s = signer();
        let cp = Checkpoint { origin: "example.com/log".into(), size: 12, root: [3; 32] };
        let note = s.sign(&cp.body());
        let v = NoteVerifier::from_key_string(&s.verifier().to_key_string()).expect("parses");
        assert_eq!(v.verify_checkpoint(&note).expect("valid"), cp);
        let s2 = NoteSigner::from_key_string(&s.to_key_string()).expect("parses");
        assert_eq!(s2.verifier(), v);
    }

    #[test]
    fn any_flipped_byte_fails() {
        let s = signer();
        let cp = Checkpoint { origin: "example.com/log".into(), size: 12, root: [3; 32] };
        let note = s.sign(&cp.body());
        let v = s.verifier();
        for i in 0..note.len() {
            let mut b = note.clone().into_bytes();
            b[i] ^= 0x01;
            if let Ok(t) = String::from_utf8(b) {
                assert!(v.verify_checkpoint(&t).is_err(), "byte {i} flipped still verifies");
            }
        }
    }

    #[test]
    fn keys_whose_base64_contains_plus_round_trip() {
        for seed in 0u8..=255 {
            let s = NoteSigner::new("a/b", [seed; 32]).expect("valid");
            let v = s.verifier().to_key_string();
            assert_eq!(NoteVerifier::from_key_string(&v).expect("parses"), s.verifier(), "{v}");
            assert!(NoteSigner::from_key_string(&s.to_key_string()).is_ok());
        }
    }

    #[test]
    fn other_keys_are_unknown() {
        let cp = Checkpoint { origin: "example.com/log".into(), size: 1, root: [0; 32] };
        let note = signer().sign(&cp.body());
        let other = NoteSigner::new("example.com/log", [8; 32]).expect("valid").verifier();
        assert_eq!(other.verify_checkpoint(&note), Err(NoteError::UnknownKey));
    }

    #[test]
    fn refuses_what_gos_note_package_refuses() {
        let s = signer();
        let cp = Checkpoint { origin: "example.com/log".into(), size: 12, root: [3; 32] };
        let note = s.sign(&cp.body());
        let v = s.verifier();
        let (body, sig_line) = note.split_once("\n\n").expect("signed note");
        // The same signature line twice.
        let twice = format!("{body}\n\n{sig_line}{sig_line}");
        assert_eq!(v.verify_checkpoint(&twice), Err(NoteError::Malformed("two signatures by the same key")));
        // An extension line, signed: the signature holds, the body does not.
        let extended = s.sign(&format!("{}extra\n", cp.body()));
        assert_eq!(
            v.verify_checkpoint(&extended),
            Err(NoteError::Malformed("extension lines after the root"))
        );
        // A control character anywhere, even where a signature covers it.
        let tab = s.sign("example.com/log\n12\n\tAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwM=\n");
        assert_eq!(v.verify_checkpoint(&tab), Err(NoteError::Malformed("control character in the note")));
        let cr = note.replace("\n\n", "\r\n\n");
        assert_eq!(v.verify_checkpoint(&cr), Err(NoteError::Malformed("control character in the note")));
    }

    #[test]
    fn rejects_non_canonical_sizes() {
        for body in ["o\n01\nAAAA\n", "o\n\nAAAA\n", "o\n-1\nAAAA\n", "o\n1\n", "\n1\nAAAA\n"] {
            assert!(Checkpoint::parse_body(body).is_err(), "{body:?}");
        }
    }
}
