//! The leaf record: what the log commits to for one notarized message.
//!
//! Fixed binary layout, big-endian, version 1 (docs/PROTOCOL.md §Leaf record):
//!
//! ```text
//! u8   version            = 1
//! u8   assurance          1 = broker-received, 2 = device-signed, 3 = registry
//! u64  sequence number    broker-global, starts at 0, no gaps
//! u64  received_at_ms     broker clock, Unix milliseconds
//! u64  payload length     bytes
//! [32] payload digest     BLAKE3-256 of the payload
//! u16  topic length, then the topic (UTF-8, no NUL)
//! u16  extension length, then assurance-specific fields:
//!        broker-received: empty
//!        device-signed:   device fields (`device::DeviceFields`)
//!        registry:        the registry event (`device::RegistryEvent`); the
//!                         payload is the event itself, the topic `notary/registry`
//! ```

use crate::device::{DeviceFields, RegistryEvent, REGISTRY_TOPIC};
use crate::FormatError;

pub const LEAF_VERSION: u8 = 1;
/// The longest topic MQTT allows (a u16 length prefix).
pub const MAX_TOPIC_LEN: usize = u16::MAX as usize;

/// How strongly the leaf's origin is established.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Assurance {
    /// The broker received these bytes on this topic; the sender is not proven.
    BrokerReceived,
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
        }
    }

    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(Assurance::BrokerReceived),
            2 => Some(Assurance::DeviceSigned),
            3 => Some(Assurance::Registry),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Assurance::BrokerReceived => "broker-received",
            Assurance::DeviceSigned => "device-signed",
            Assurance::Registry => "registry",
        }
    }
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
            extension: Vec::new(),
        }
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
        let topic_len = u16::try_from(self.topic.len()).map_err(|_| FormatError("topic too long"))?;
        let ext_len = u16::try_from(self.extension.len()).map_err(|_| FormatError("extension too long"))?;
        let mut out = Vec::with_capacity(62 + self.topic.len() + self.extension.len());
        out.push(LEAF_VERSION);
        out.push(self.assurance.code());
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.received_at_ms.to_be_bytes());
        out.extend_from_slice(&self.payload_len.to_be_bytes());
        out.extend_from_slice(&self.payload_digest);
        out.extend_from_slice(&topic_len.to_be_bytes());
        out.extend_from_slice(self.topic.as_bytes());
        out.extend_from_slice(&ext_len.to_be_bytes());
        out.extend_from_slice(&self.extension);
        Ok(out)
    }

    /// Parses the canonical encoding; rejects any other byte string,
    /// trailing bytes included.
    pub fn decode(bytes: &[u8]) -> Result<Self, FormatError> {
        let mut r = crate::codec::Reader::new(bytes);
        if r.u8()? != LEAF_VERSION {
            return Err(FormatError("unsupported leaf version"));
        }
        let assurance = Assurance::from_code(r.u8()?).ok_or(FormatError("unknown assurance level"))?;
        let seq = r.u64()?;
        let received_at_ms = r.u64()?;
        let payload_len = r.u64()?;
        let payload_digest = r.array32()?;
        let topic_len = r.u16()? as usize;
        let topic = std::str::from_utf8(r.take(topic_len)?)
            .map_err(|_| FormatError("topic is not UTF-8"))?
            .to_owned();
        if topic.contains('\0') {
            return Err(FormatError("topic contains NUL"));
        }
        let ext_len = r.u16()? as usize;
        let extension = r.take(ext_len)?.to_vec();
        r.finish()?;
        let leaf =
            LeafRecord { assurance, seq, received_at_ms, payload_len, payload_digest, topic, extension };
        match assurance {
            Assurance::BrokerReceived if !leaf.extension.is_empty() => {
                return Err(FormatError("broker-received leaf with extension fields"))
            }
            Assurance::BrokerReceived => {}
            Assurance::DeviceSigned => {
                DeviceFields::decode(&leaf.extension)?;
            }
            Assurance::Registry => {
                RegistryEvent::decode(&leaf.extension)?;
                if leaf.topic != REGISTRY_TOPIC
                    || leaf.payload_len != leaf.extension.len() as u64
                    || !crate::hash::hash_eq(blake3::hash(&leaf.extension).as_bytes(), &leaf.payload_digest)
                {
                    return Err(FormatError("registry leaf whose payload is not its event"));
                }
            }
        }
        Ok(leaf)
    }

    /// The RFC 9162 leaf hash of this record's encoding.
    pub fn leaf_hash(&self) -> Result<crate::Hash, FormatError> {
        Ok(crate::hash::leaf_hash(&self.encode()?))
    }
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
        bad_version[0] = 2;
        assert!(LeafRecord::decode(&bad_version).is_err());
    }

    #[test]
    fn every_truncation_is_rejected_without_panic() {
        let bytes = LeafRecord::broker_received(1, 2, "a/b", b"x").encode().expect("encodes");
        for n in 0..bytes.len() {
            assert!(LeafRecord::decode(&bytes[..n]).is_err(), "prefix {n}");
        }
    }
}
