//! Devices in the log: registry events (key transparency) and the fields a
//! device-signed leaf carries (docs/PROTOCOL.md §Device registry).
//!
//! Every enrolment, key rotation and revocation is itself a leaf, so a proof
//! can show which key was valid at a message's position in the log.
//! Registry events of one device form a chain: each names the sequence
//! number of the device's previous event.
//!
//! ```text
//! registry event (the extension of a registry leaf), version 1:
//!   u8   version = 1
//!   u8   action         1 = enrol, 2 = rotate, 3 = revoke
//!   u8   device id length (1..=64), then the id (ASCII, see `valid_device_id`)
//!   [32] ed25519 public key (all zero for revoke)
//!   u64  previous event's sequence number, or 2^64-1 for none
//!
//! device fields (the extension of a device-signed leaf), version 1:
//!   u8   version = 1
//!   u64  key_seq        sequence number of the registry leaf that enrolled
//!                       or rotated in the key that signed the message
//!   u64  counter        the envelope's counter
//!   u64  device_time_ms the envelope's timestamp
//!   u8   device id length (1..=64), then the id
//! ```

use crate::codec::Reader;
use crate::FormatError;

/// The topic of every registry leaf. It lies under `notary/`, which is
/// never notarized from MQTT, so no publish can pose as a registry event.
pub const REGISTRY_TOPIC: &str = "notary/registry";
/// `prev_seq` of an event that has no predecessor.
pub const NO_PREV: u64 = u64::MAX;
pub const MAX_DEVICE_ID_LEN: usize = 64;
const EVENT_VERSION: u8 = 1;
const FIELDS_VERSION: u8 = 1;

/// A device id: 1 to 64 bytes of `A-Z a-z 0-9 . _ : -`. The same string is
/// the COSE `kid`, so it must be unambiguous in logs, files and topics.
pub fn valid_device_id(id: &str) -> bool {
    (1..=MAX_DEVICE_ID_LEN).contains(&id.len())
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RegistryAction {
    Enrol,
    Rotate,
    Revoke,
}

impl RegistryAction {
    pub fn code(self) -> u8 {
        match self {
            RegistryAction::Enrol => 1,
            RegistryAction::Rotate => 2,
            RegistryAction::Revoke => 3,
        }
    }

    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(RegistryAction::Enrol),
            2 => Some(RegistryAction::Rotate),
            3 => Some(RegistryAction::Revoke),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RegistryAction::Enrol => "enrol",
            RegistryAction::Rotate => "rotate",
            RegistryAction::Revoke => "revoke",
        }
    }
}

/// One change to the device registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryEvent {
    pub action: RegistryAction,
    pub device_id: String,
    /// The key from this event on; all zero for a revocation.
    pub public_key: [u8; 32],
    /// The device's previous registry event, or [`NO_PREV`].
    pub prev_seq: u64,
}

fn put_id(out: &mut Vec<u8>, id: &str) -> Result<(), FormatError> {
    if !valid_device_id(id) {
        return Err(FormatError("invalid device id"));
    }
    out.push(id.len() as u8);
    out.extend_from_slice(id.as_bytes());
    Ok(())
}

fn read_id(r: &mut Reader<'_>) -> Result<String, FormatError> {
    let len = r.u8()? as usize;
    let id = std::str::from_utf8(r.take(len)?).map_err(|_| FormatError("device id is not ASCII"))?;
    if !valid_device_id(id) {
        return Err(FormatError("invalid device id"));
    }
    Ok(id.to_owned())
}

impl RegistryEvent {
    pub fn encode(&self) -> Result<Vec<u8>, FormatError> {
        self.check()?;
        let mut out = Vec::with_capacity(43 + self.device_id.len());
        out.push(EVENT_VERSION);
        out.push(self.action.code());
        put_id(&mut out, &self.device_id)?;
        out.extend_from_slice(&self.public_key);
        out.extend_from_slice(&self.prev_seq.to_be_bytes());
        Ok(out)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, FormatError> {
        let mut r = Reader::new(bytes);
        if r.u8()? != EVENT_VERSION {
            return Err(FormatError("unsupported registry event version"));
        }
        let action = RegistryAction::from_code(r.u8()?).ok_or(FormatError("unknown registry action"))?;
        let device_id = read_id(&mut r)?;
        let public_key = r.array32()?;
        let prev_seq = r.u64()?;
        r.finish()?;
        let event = RegistryEvent { action, device_id, public_key, prev_seq };
        event.check()?;
        Ok(event)
    }

    /// The rules every encoded event obeys.
    fn check(&self) -> Result<(), FormatError> {
        match self.action {
            RegistryAction::Enrol | RegistryAction::Rotate if self.public_key == [0; 32] => {
                Err(FormatError("enrol or rotate without a key"))
            }
            RegistryAction::Revoke if self.public_key != [0; 32] => Err(FormatError("revoke with a key")),
            RegistryAction::Rotate | RegistryAction::Revoke if self.prev_seq == NO_PREV => {
                Err(FormatError("rotate or revoke without a previous event"))
            }
            _ => Ok(()),
        }
    }
}

/// What a device-signed leaf records about its envelope and key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceFields {
    pub key_seq: u64,
    pub counter: u64,
    pub device_time_ms: u64,
    pub device_id: String,
}

impl DeviceFields {
    pub fn encode(&self) -> Result<Vec<u8>, FormatError> {
        let mut out = Vec::with_capacity(26 + self.device_id.len());
        out.push(FIELDS_VERSION);
        out.extend_from_slice(&self.key_seq.to_be_bytes());
        out.extend_from_slice(&self.counter.to_be_bytes());
        out.extend_from_slice(&self.device_time_ms.to_be_bytes());
        put_id(&mut out, &self.device_id)?;
        Ok(out)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, FormatError> {
        let mut r = Reader::new(bytes);
        if r.u8()? != FIELDS_VERSION {
            return Err(FormatError("unsupported device fields version"));
        }
        let key_seq = r.u64()?;
        let counter = r.u64()?;
        let device_time_ms = r.u64()?;
        let device_id = read_id(&mut r)?;
        r.finish()?;
        Ok(DeviceFields { key_seq, counter, device_time_ms, device_id })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_ids() {
        for ok in ["a", "meter-17", "plant_3.line:2", &"x".repeat(64)] {
            assert!(valid_device_id(ok), "{ok}");
        }
        for bad in ["", " a", "a/b", "a+b", "é", "a\0", &"x".repeat(65)] {
            assert!(!valid_device_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn registry_events_round_trip_and_obey_their_rules() {
        let enrol = RegistryEvent {
            action: RegistryAction::Enrol,
            device_id: "d1".into(),
            public_key: [7; 32],
            prev_seq: NO_PREV,
        };
        let bytes = enrol.encode().expect("encodes");
        assert_eq!(RegistryEvent::decode(&bytes).expect("decodes"), enrol);
        for n in 0..bytes.len() {
            assert!(RegistryEvent::decode(&bytes[..n]).is_err());
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(RegistryEvent::decode(&longer).is_err());
        let revoke_with_key = RegistryEvent { action: RegistryAction::Revoke, prev_seq: 3, ..enrol.clone() };
        assert!(revoke_with_key.encode().is_err());
        let rotate_without_prev = RegistryEvent { action: RegistryAction::Rotate, ..enrol.clone() };
        assert!(rotate_without_prev.encode().is_err());
        let enrol_without_key = RegistryEvent { public_key: [0; 32], ..enrol };
        assert!(enrol_without_key.encode().is_err());
    }

    #[test]
    fn device_fields_round_trip() {
        let f =
            DeviceFields { key_seq: 3, counter: 9, device_time_ms: 1_700_000_000_000, device_id: "d".into() };
        let bytes = f.encode().expect("encodes");
        assert_eq!(DeviceFields::decode(&bytes).expect("decodes"), f);
        for n in 0..bytes.len() {
            assert!(DeviceFields::decode(&bytes[..n]).is_err());
        }
    }
}
