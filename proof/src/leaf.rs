//! The leaf record: what the log commits to for one notarized message.
//!
//! Fixed binary layout, big-endian (docs/PROTOCOL.md §Leaf record):
//!
//! ```text
//! u8   version            1, or 2 when the leaf names its publisher
//! u8   assurance          1 = broker-received, 2 = device-signed, 3 = registry,
//!                         4 = client-authenticated (version 2 only)
//! u64  sequence number    broker-global, starts at 0, no gaps
//! u64  received_at_ms     broker clock, Unix milliseconds
//! u64  payload length     bytes
//! [32] payload digest     BLAKE3-256 of the payload
//! u16  topic length, then the topic (UTF-8, no NUL)
//! version 2 only, the publisher as the broker knew it:
//!   u16  client id length, then the client id (UTF-8, no NUL)
//!   u8   0 = no login checked, 1 = then u16 length + the username the
//!        broker authenticated (UTF-8, no NUL)
//! u16  extension length, then assurance-specific fields:
//!        broker-received, client-authenticated: empty
//!        device-signed:   device fields (`device::DeviceFields`)
//!        registry:        the registry event (`device::RegistryEvent`); the
//!                         payload is the event itself, the topic `notary/registry`
//! ```

use crate::device::{DeviceFields, RegistryEvent, REGISTRY_TOPIC};
use crate::FormatError;

/// A leaf without a publisher (the first format; sidecar and registry
/// leaves keep it).
pub const LEAF_VERSION: u8 = 1;
/// A leaf that names its publisher.
pub const LEAF_VERSION_PUBLISHER: u8 = 2;
/// The longest topic MQTT allows (a u16 length prefix).
pub const MAX_TOPIC_LEN: usize = u16::MAX as usize;

/// How strongly the leaf's origin is established.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Assurance {
    /// The broker received these bytes on this topic; the sender is not proven.
    BrokerReceived,
    /// The broker received these bytes from a client whose login (user
    /// name and password) it checked before it accepted the message: the
    /// leaf's username is the broker's word for who published.
    ClientAuthenticated,
    /// The payload is a device envelope whose signature verified against
    /// the key the registry held for its device at this position.
    DeviceSigned,
    /// Not a message: a change to the device registry.
    Registry,
}

impl Assurance {
    pub fn code(self) -> u8 {
        match self {
            Assurance::BrokerReceived => 1,
            Assurance::DeviceSigned => 2,
            Assurance::Registry => 3,
            Assurance::ClientAuthenticated => 4,
        }
    }

    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(Assurance::BrokerReceived),
            2 => Some(Assurance::DeviceSigned),
            3 => Some(Assurance::Registry),
            4 => Some(Assurance::ClientAuthenticated),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Assurance::BrokerReceived => "broker-received",
            Assurance::DeviceSigned => "device-signed",
            Assurance::Registry => "registry",
            Assurance::ClientAuthenticated => "client-authenticated",
        }
    }
}

/// Who published a message, as the broker knew it (leaf version 2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publisher {
    /// The MQTT client id, as the client named itself (MQTT does not
    /// authenticate client ids).
    pub client_id: String,
    /// The user name the broker authenticated before it accepted the
    /// message; `None` when it checked no login.
    pub username: Option<String>,
}

/// One notarized message, as committed to by the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeafRecord {
    pub assurance: Assurance,
    pub seq: u64,
    pub received_at_ms: u64,
    pub payload_len: u64,
    pub payload_digest: [u8; 32],
    pub topic: String,
    /// `Some` exactly in version 2 leaves.
    pub publisher: Option<Publisher>,
    pub extension: Vec<u8>,
}

impl LeafRecord {
    /// A broker-received leaf for `payload` published on `topic`.
    pub fn broker_received(seq: u64, received_at_ms: u64, topic: &str, payload: &[u8]) -> Self {
        LeafRecord {
            assurance: Assurance::BrokerReceived,
            seq,
            received_at_ms,
            payload_len: payload.len() as u64,
            payload_digest: *blake3::hash(payload).as_bytes(),
            topic: topic.to_owned(),
            publisher: None,
            extension: Vec::new(),
        }
    }

    /// Names the publisher (a version 2 leaf). A broker-received leaf whose
    /// publisher logged in becomes client-authenticated.
    pub fn published_by(mut self, publisher: Publisher) -> Self {
        if self.assurance == Assurance::BrokerReceived && publisher.username.is_some() {
            self.assurance = Assurance::ClientAuthenticated;
        }
        self.publisher = Some(publisher);
        self
    }

    /// A device-signed leaf for the envelope `payload` published on `topic`.
    pub fn device_signed(
        seq: u64,
        received_at_ms: u64,
        topic: &str,
        payload: &[u8],
        fields: &DeviceFields,
    ) -> Result<Self, FormatError> {
        Ok(LeafRecord {
            assurance: Assurance::DeviceSigned,
            extension: fields.encode()?,
            ..Self::broker_received(seq, received_at_ms, topic, payload)
        })
    }

    /// A registry leaf: the event is both the payload and the extension.
    pub fn registry(seq: u64, received_at_ms: u64, event: &RegistryEvent) -> Result<Self, FormatError> {
        let bytes = event.encode()?;
        Ok(LeafRecord {
            assurance: Assurance::Registry,
            extension: bytes.clone(),
            ..Self::broker_received(seq, received_at_ms, REGISTRY_TOPIC, &bytes)
        })
    }

    /// The device fields of a device-signed leaf.
    pub fn device_fields(&self) -> Option<DeviceFields> {
        (self.assurance == Assurance::DeviceSigned).then(|| DeviceFields::decode(&self.extension).ok())?
    }

    /// The event of a registry leaf.
    pub fn registry_event(&self) -> Option<RegistryEvent> {
        (self.assurance == Assurance::Registry).then(|| RegistryEvent::decode(&self.extension).ok())?
    }

    /// The canonical encoding. Fails only for a topic or extension longer
    /// than 65,535 bytes, which MQTT cannot carry.
    pub fn encode(&self) -> Result<Vec<u8>, FormatError> {
        self.check_publisher()?;
        let topic_len = u16::try_from(self.topic.len()).map_err(|_| FormatError("topic too long"))?;
        let ext_len = u16::try_from(self.extension.len()).map_err(|_| FormatError("extension too long"))?;
        let mut out = Vec::with_capacity(62 + self.topic.len() + self.extension.len());
        out.push(if self.publisher.is_some() { LEAF_VERSION_PUBLISHER } else { LEAF_VERSION });
        out.push(self.assurance.code());
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.received_at_ms.to_be_bytes());
        out.extend_from_slice(&self.payload_len.to_be_bytes());
        out.extend_from_slice(&self.payload_digest);
        out.extend_from_slice(&topic_len.to_be_bytes());
        out.extend_from_slice(self.topic.as_bytes());
        if let Some(p) = &self.publisher {
            put_str(&mut out, &p.client_id, "client id too long")?;
            match &p.username {
                None => out.push(0),
                Some(u) => {
                    out.push(1);
                    put_str(&mut out, u, "username too long")?;
                }
            }
        }
        out.extend_from_slice(&ext_len.to_be_bytes());
        out.extend_from_slice(&self.extension);
        Ok(out)
    }

    /// Parses the canonical encoding; rejects any other byte string,
    /// trailing bytes included.
    pub fn decode(bytes: &[u8]) -> Result<Self, FormatError> {
        let mut r = crate::codec::Reader::new(bytes);
        let version = r.u8()?;
        if version != LEAF_VERSION && version != LEAF_VERSION_PUBLISHER {
            return Err(FormatError("unsupported leaf version"));
        }
        let assurance = Assurance::from_code(r.u8()?).ok_or(FormatError("unknown assurance level"))?;
        let seq = r.u64()?;
        let received_at_ms = r.u64()?;
        let payload_len = r.u64()?;
        let payload_digest = r.array32()?;
        let topic = get_str(&mut r, "topic is not UTF-8 without NUL")?;
        let publisher = if version == LEAF_VERSION_PUBLISHER {
            let client_id = get_str(&mut r, "client id is not UTF-8 without NUL")?;
            let username = match r.u8()? {
                0 => None,
                1 => Some(get_str(&mut r, "username is not UTF-8 without NUL")?),
                _ => return Err(FormatError("bad username flag")),
            };
            Some(Publisher { client_id, username })
        } else {
            None
        };
        let ext_len = r.u16()? as usize;
        let extension = r.take(ext_len)?.to_vec();
        r.finish()?;
        let leaf = LeafRecord {
            assurance,
            seq,
            received_at_ms,
            payload_len,
            payload_digest,
            topic,
            publisher,
            extension,
        };
        leaf.check_publisher()?;
        match assurance {
            Assurance::BrokerReceived | Assurance::ClientAuthenticated if !leaf.extension.is_empty() => {
                return Err(FormatError("broker-received leaf with extension fields"))
            }
            Assurance::BrokerReceived | Assurance::ClientAuthenticated => {}
            Assurance::DeviceSigned => {
                DeviceFields::decode(&leaf.extension)?;
            }
            Assurance::Registry => {
                RegistryEvent::decode(&leaf.extension)?;
            }
        }
        Ok(leaf)
    }

    /// The registry rule a verifier checks in its own step
    /// (docs/PROTOCOL.md §Verification, `bad-registry-leaf`): a registry
    /// leaf's topic is `notary/registry` and its payload is its event.
    pub fn check_registry(&self) -> Result<(), FormatError> {
        if self.assurance != Assurance::Registry {
            return Ok(());
        }
        if self.topic != REGISTRY_TOPIC {
            return Err(FormatError("a registry leaf's topic is notary/registry"));
        }
        if self.payload_len != self.extension.len() as u64
            || !crate::hash::hash_eq(blake3::hash(&self.extension).as_bytes(), &self.payload_digest)
        {
            return Err(FormatError("a registry leaf's payload is its event"));
        }
        Ok(())
    }

    /// The publisher rules of the format: a client-authenticated leaf names
    /// a publisher with a username; a broker-received one never has a
    /// username (a checked login makes it client-authenticated); a registry
    /// leaf names no publisher.
    fn check_publisher(&self) -> Result<(), FormatError> {
        let username = self.publisher.as_ref().map(|p| p.username.is_some());
        match (self.assurance, username) {
            (Assurance::ClientAuthenticated, Some(true)) => Ok(()),
            (Assurance::ClientAuthenticated, _) => {
                Err(FormatError("client-authenticated leaf without a username"))
            }
            (Assurance::BrokerReceived, Some(true)) => {
                Err(FormatError("broker-received leaf with a username"))
            }
            (Assurance::Registry, Some(_)) => Err(FormatError("registry leaf with a publisher")),
            _ => Ok(()),
        }
    }

    /// The RFC 9162 leaf hash of this record's encoding.
    pub fn leaf_hash(&self) -> Result<crate::Hash, FormatError> {
        Ok(crate::hash::leaf_hash(&self.encode()?))
    }
}

/// A u16-length-prefixed UTF-8 string without NUL.
fn put_str(out: &mut Vec<u8>, s: &str, too_long: &'static str) -> Result<(), FormatError> {
    let len = u16::try_from(s.len()).map_err(|_| FormatError(too_long))?;
    if s.contains('\0') {
        return Err(FormatError("string contains NUL"));
    }
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

/// Reads what [`put_str`] wrote; `what` names it in errors.
fn get_str(r: &mut crate::codec::Reader, what: &'static str) -> Result<String, FormatError> {
    let len = r.u16()? as usize;
    let s = std::str::from_utf8(r.take(len)?).map_err(|_| FormatError(what))?;
    if s.contains('\0') {
        return Err(FormatError(what));
    }
    Ok(s.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_trailing_bytes() {
        let leaf = LeafRecord::broker_received(42, 1_700_000_000_000, "sensors/t1", b"21.5");
        let bytes = leaf.encode().expect("encodes");
        assert_eq!(LeafRecord::decode(&bytes).expect("decodes"), leaf);
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(LeafRecord::decode(&longer).is_err());
        assert!(LeafRecord::decode(&bytes[..bytes.len() - 1]).is_err());
        let mut bad_version = bytes.clone();
        bad_version[0] = 3;
        assert!(LeafRecord::decode(&bad_version).is_err());
    }

    #[test]
    fn publishers_round_trip_in_version_2_and_obey_the_assurance_rules() {
        let who =
            |user: Option<&str>| Publisher { client_id: "gw/7é".into(), username: user.map(Into::into) };
        let plain = LeafRecord::broker_received(5, 6, "t/x", b"21.5");
        assert_eq!(plain.encode().expect("v1")[0], 1, "no publisher: version 1, as before");
        let anonymous = plain.clone().published_by(who(None));
        assert_eq!(anonymous.assurance, Assurance::BrokerReceived);
        let logged_in = plain.clone().published_by(who(Some("plant-a")));
        assert_eq!(logged_in.assurance, Assurance::ClientAuthenticated);
        for leaf in [&anonymous, &logged_in] {
            let bytes = leaf.encode().expect("encodes");
            assert_eq!(bytes[0], 2);
            assert_eq!(&LeafRecord::decode(&bytes).expect("decodes"), leaf);
            for n in 0..bytes.len() {
                assert!(LeafRecord::decode(&bytes[..n]).is_err(), "prefix {n}");
            }
        }
        // Client-authenticated: version 2 with a username, nothing else.
        let mut bytes = logged_in.encode().expect("encodes");
        bytes[1] = Assurance::BrokerReceived.code();
        assert!(LeafRecord::decode(&bytes).is_err(), "broker-received with a checked login");
        let mut bytes = anonymous.encode().expect("encodes");
        bytes[1] = Assurance::ClientAuthenticated.code();
        assert!(LeafRecord::decode(&bytes).is_err(), "client-authenticated without a login");
        let mut bytes = plain.encode().expect("encodes");
        bytes[1] = Assurance::ClientAuthenticated.code();
        assert!(LeafRecord::decode(&bytes).is_err(), "client-authenticated in version 1");
        let mut bytes = logged_in.encode().expect("encodes");
        let flag = bytes.len() - 2 - 2 - "plant-a".len() - 1;
        bytes[flag] = 2;
        assert!(LeafRecord::decode(&bytes).is_err(), "username flag other than 0 or 1");
    }

    #[test]
    fn every_truncation_is_rejected_without_panic() {
        let bytes = LeafRecord::broker_received(1, 2, "a/b", b"x").encode().expect("encodes");
        for n in 0..bytes.len() {
            assert!(LeafRecord::decode(&bytes[..n]).is_err(), "prefix {n}");
        }
    }
}
