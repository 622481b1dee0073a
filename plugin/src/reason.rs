//! Why a message was not notarized: one closed set of reasons, each with
//! the stable wire name that rejection events, the store, proof answers and
//! metrics use (docs/PROTOCOL.md §Rejections).

use notary_proof::EnvelopeError;

/// A rejection reason. The wire names never change; new reasons are added
/// at the end, so metric indices stay stable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The payload looks like an envelope but does not parse as one.
    MalformedEnvelope,
    /// The envelope names a signature algorithm other than EdDSA.
    UnsupportedAlg,
    /// No device with the envelope's kid is enrolled.
    UnknownDevice,
    /// The device's key is revoked.
    RevokedDevice,
    /// The signature does not verify under the device's key.
    BadSignature,
    /// The counter is not above the last one accepted from the device.
    Replay,
    /// The envelope was signed for another topic.
    TopicMismatch,
    /// The envelope is larger than `devices.max_envelope_bytes`.
    Oversize,
    /// A plain payload on a topic that only takes signed envelopes.
    SignatureRequired,
    /// The store refused to hold this message (a permanent storage error
    /// for this message alone; every other message is committed).
    Unstorable,
}

impl Reason {
    /// Every reason, in metric order.
    pub const ALL: [Reason; 10] = [
        Reason::MalformedEnvelope,
        Reason::UnsupportedAlg,
        Reason::UnknownDevice,
        Reason::RevokedDevice,
        Reason::BadSignature,
        Reason::Replay,
        Reason::TopicMismatch,
        Reason::Oversize,
        Reason::SignatureRequired,
        Reason::Unstorable,
    ];

    /// The stable wire name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::MalformedEnvelope => "malformed-envelope",
            Reason::UnsupportedAlg => "unsupported-alg",
            Reason::UnknownDevice => "unknown-device",
            Reason::RevokedDevice => "revoked-device",
            Reason::BadSignature => "bad-signature",
            Reason::Replay => "replay",
            Reason::TopicMismatch => "topic-mismatch",
            Reason::Oversize => "oversize",
            Reason::SignatureRequired => "signature-required",
            Reason::Unstorable => "unstorable",
        }
    }

    /// The reason with this wire name.
    pub fn from_wire(s: &str) -> Option<Reason> {
        Reason::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// Position in [`Reason::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

impl From<&EnvelopeError> for Reason {
    fn from(e: &EnvelopeError) -> Reason {
        match e {
            EnvelopeError::Malformed(_) => Reason::MalformedEnvelope,
            EnvelopeError::UnsupportedAlg(_) => Reason::UnsupportedAlg,
            EnvelopeError::TopicMismatch { .. } => Reason::TopicMismatch,
            EnvelopeError::BadSignature => Reason::BadSignature,
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl serde::Serialize for Reason {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_names_round_trip_and_indices_follow_all() {
        for (i, r) in Reason::ALL.into_iter().enumerate() {
            assert_eq!(r.index(), i);
            assert_eq!(Reason::from_wire(r.as_str()), Some(r));
        }
        assert_eq!(Reason::from_wire("no-such-reason"), None);
    }

    #[test]
    fn envelope_errors_map_to_their_codes() {
        let cases = [
            EnvelopeError::Malformed("x".into()),
            EnvelopeError::UnsupportedAlg("ES256".into()),
            EnvelopeError::TopicMismatch { signed: "a".into() },
            EnvelopeError::BadSignature,
        ];
        for e in &cases {
            assert_eq!(Reason::from(e).as_str(), e.code());
        }
    }
}
