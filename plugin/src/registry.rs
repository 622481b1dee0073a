//! The device registry as ingest sees it: which key each device holds, the
//! highest counter accepted from it, and how queued registry commands
//! become registry leaves.
//!
//! The registry lives in the store. Ingest, the log's only writer, keeps
//! this in-memory copy and changes it only when it appends the matching
//! registry leaf, so every message is judged by the registry exactly as
//! the log stands at the message's position.

use crate::store::{DeviceCommand, Store, StoreError};
use crate::topics::topic_matches;
use notary_proof::device::{valid_device_id, NO_PREV};
use notary_proof::DeviceKey;
use notary_proof::{RegistryAction, RegistryEvent};
use std::collections::HashMap;

/// Which messages must be signed, and how large an envelope may be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevicePolicy {
    /// MQTT topic filters on which only valid envelopes are notarized.
    pub require_signature: Vec<String>,
    pub max_envelope_bytes: usize,
}

impl Default for DevicePolicy {
    fn default() -> Self {
        DevicePolicy { require_signature: Vec::new(), max_envelope_bytes: 64 * 1024 }
    }
}

impl DevicePolicy {
    pub fn requires_signature(&self, topic: &str) -> bool {
        self.require_signature.iter().any(|f| topic_matches(f, topic))
    }

    /// Whether ingest takes this message as a plain leaf, whatever the
    /// registry holds: not an envelope, on a topic that does not require
    /// one. A source may deliver such a message before ingest sees it.
    pub fn takes_plain(&self, topic: &str, payload: &[u8]) -> bool {
        !notary_proof::envelope::is_envelope(payload) && !self.requires_signature(topic)
    }
}

/// A key fit to enrol: the canonical encoding of an ed25519 point of
/// prime order, as every honestly made key is.
pub fn parse_public_key(bytes: &[u8; 32]) -> Result<DeviceKey, String> {
    let key = DeviceKey::from_bytes(bytes).map_err(|_| "not a valid ed25519 public key".to_owned())?;
    if !key.is_prime_order() {
        return Err("not an ed25519 key of prime order (small order, a small-order component, \
                    or a non-canonical encoding)"
            .into());
    }
    Ok(key)
}

#[derive(Debug, Clone)]
pub(crate) struct DeviceState {
    /// The current key and the registry leaf that put it in place.
    pub key: Option<(DeviceKey, u64)>,
    pub head_seq: u64,
    pub last_counter: Option<u64>,
}

pub(crate) enum Lookup<'a> {
    Unknown,
    Revoked,
    Active { key: &'a DeviceKey, key_seq: u64, last_counter: Option<u64> },
}

#[derive(Debug, Default)]
pub(crate) struct Registry {
    devices: HashMap<String, DeviceState>,
}

impl Registry {
    pub fn load(store: &Store) -> Result<Self, StoreError> {
        let mut devices = HashMap::new();
        for row in store.devices()? {
            let key = match (row.public_key, row.key_seq) {
                (Some(k), Some(seq)) => Some((
                    DeviceKey::from_bytes(&k)
                        .map_err(|_| StoreError::Corrupt(format!("device {}: invalid key", row.id)))?,
                    seq,
                )),
                _ => None,
            };
            devices
                .insert(row.id, DeviceState { key, head_seq: row.head_seq, last_counter: row.last_counter });
        }
        Ok(Registry { devices })
    }

    pub fn lookup(&self, id: &str) -> Lookup<'_> {
        match self.devices.get(id) {
            None => Lookup::Unknown,
            Some(DeviceState { key: None, .. }) => Lookup::Revoked,
            Some(DeviceState { key: Some((key, key_seq)), last_counter, .. }) => {
                Lookup::Active { key, key_seq: *key_seq, last_counter: *last_counter }
            }
        }
    }

    /// Records a newly accepted counter.
    pub fn set_counter(&mut self, id: &str, counter: u64) {
        if let Some(d) = self.devices.get_mut(id) {
            d.last_counter = Some(counter);
        }
    }

    /// The registry event a command asks for, or why it cannot apply.
    pub fn plan(&self, cmd: &DeviceCommand) -> Result<RegistryEvent, String> {
        self.plan_change(cmd.action, &cmd.device, cmd.public_key)
    }

    fn plan_change(
        &self,
        action: RegistryAction,
        device: &str,
        public_key: Option<[u8; 32]>,
    ) -> Result<RegistryEvent, String> {
        if !valid_device_id(device) {
            return Err("invalid device id".into());
        }
        let current = self.devices.get(device);
        let key = |k: Option<[u8; 32]>| -> Result<[u8; 32], String> {
            let k = k.ok_or("no public key given")?;
            parse_public_key(&k)?;
            Ok(k)
        };
        let event = |action, public_key, prev_seq| RegistryEvent {
            action,
            device_id: device.to_owned(),
            public_key,
            prev_seq,
        };
        match (action, current) {
            (RegistryAction::Enrol, None) => Ok(event(RegistryAction::Enrol, key(public_key)?, NO_PREV)),
            (RegistryAction::Enrol, Some(d)) if d.key.is_none() => {
                Ok(event(RegistryAction::Enrol, key(public_key)?, d.head_seq))
            }
            (RegistryAction::Enrol, Some(_)) => Err("already enrolled; rotate to change its key".into()),
            (RegistryAction::Rotate, Some(d @ DeviceState { key: Some((old, _)), .. })) => {
                let new = key(public_key)?;
                if new == old.to_bytes() {
                    return Err("the device already holds this key".into());
                }
                Ok(event(RegistryAction::Rotate, new, d.head_seq))
            }
            (RegistryAction::Revoke, Some(d @ DeviceState { key: Some(_), .. })) => {
                Ok(event(RegistryAction::Revoke, [0; 32], d.head_seq))
            }
            (_, None) => Err("unknown device".into()),
            (_, Some(_)) => Err("the device is revoked; enrol it again".into()),
        }
    }

    /// Applies an event appended at `seq`.
    pub fn apply(&mut self, seq: u64, event: &RegistryEvent) {
        let key = match event.action {
            RegistryAction::Revoke => None,
            _ => DeviceKey::from_bytes(&event.public_key).ok().map(|k| (k, seq)),
        };
        let d = self.devices.entry(event.device_id.clone()).or_insert(DeviceState {
            key: None,
            head_seq: seq,
            last_counter: None,
        });
        d.key = key;
        d.head_seq = seq;
    }
}

/// Checks a registry change against the registry as it will stand once
/// the commands already queued are applied, so the CLI can refuse a change
/// the broker would refuse. The broker checks again when it applies it.
pub fn precheck(
    store: &Store,
    action: RegistryAction,
    device: &str,
    public_key: Option<[u8; 32]>,
) -> Result<(), String> {
    let mut registry = Registry::load(store).map_err(|e| e.to_string())?;
    let mut seq = store.next_seq().map_err(|e| e.to_string())?;
    for cmd in store.commands(false).map_err(|e| e.to_string())? {
        if let Ok(event) = registry.plan(&cmd) {
            registry.apply(seq, &event);
            seq += 1;
        }
    }
    registry.plan_change(action, device, public_key).map(|_| ())
}

/// One device of an enrolment file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrolmentEntry {
    pub id: String,
    /// 64 hex digits.
    pub public_key: String,
}

/// Queues what an enrolment file asks for and the registry lacks: devices
/// it does not know are enrolled, devices whose key differs are rotated.
/// Revoked devices stay revoked (logged); devices not in the file are left
/// alone. Returns how many commands were queued.
pub fn queue_enrolments(store: &Store, entries: &[EnrolmentEntry], now_ms: u64) -> Result<usize, String> {
    let devices = store.devices().map_err(|e| e.to_string())?;
    let pending = store.commands(false).map_err(|e| e.to_string())?;
    let mut queued = 0;
    for e in entries {
        if !valid_device_id(&e.id) {
            return Err(format!("device {:?}: invalid id", e.id));
        }
        let key = parse_key_hex(&e.public_key).map_err(|m| format!("device {}: {m}", e.id))?;
        if pending.iter().any(|c| c.device == e.id) {
            continue;
        }
        let action = match devices.iter().find(|d| d.id == e.id) {
            None => RegistryAction::Enrol,
            Some(d) if d.public_key.is_none() => {
                tracing::warn!(device = %e.id, "device is revoked; the enrolment file does not re-enrol it");
                continue;
            }
            Some(d) if d.public_key == Some(key) => continue,
            Some(_) => RegistryAction::Rotate,
        };
        store.queue_command(action, &e.id, Some(key), "file", now_ms).map_err(|e| e.to_string())?;
        queued += 1;
    }
    Ok(queued)
}

/// Parses 64 hex digits into an enrollable ed25519 public key.
pub fn parse_key_hex(s: &str) -> Result<[u8; 32], String> {
    let mut key = [0u8; 32];
    hex::decode_to_slice(s.trim(), &mut key).map_err(|_| "public key must be 64 hex digits".to_owned())?;
    parse_public_key(&key)?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weak_keys_are_refused() {
        // The identity point: small order.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        assert!(parse_public_key(&identity).is_err());
        let good = ed25519_dalek::SigningKey::from_bytes(&[9; 32]).verifying_key().to_bytes();
        assert!(parse_public_key(&good).is_ok());
    }

    fn cmd(action: RegistryAction, key: Option<u8>) -> DeviceCommand {
        DeviceCommand {
            id: 1,
            action,
            device: "d".into(),
            public_key: key
                .map(|n| ed25519_dalek::SigningKey::from_bytes(&[n; 32]).verifying_key().to_bytes()),
            source: "cli".into(),
            requested_at_ms: 0,
            applied_seq: None,
            error: None,
        }
    }

    #[test]
    fn commands_follow_the_device_lifecycle() {
        let mut r = Registry::default();
        assert!(r.plan(&cmd(RegistryAction::Revoke, None)).is_err());
        assert!(r.plan(&cmd(RegistryAction::Rotate, Some(2))).is_err());
        let e = r.plan(&cmd(RegistryAction::Enrol, Some(1))).expect("enrol");
        assert_eq!(e.prev_seq, NO_PREV);
        r.apply(10, &e);
        assert!(r.plan(&cmd(RegistryAction::Enrol, Some(1))).is_err(), "enrolled twice");
        assert!(r.plan(&cmd(RegistryAction::Rotate, Some(1))).is_err(), "same key");
        let e = r.plan(&cmd(RegistryAction::Rotate, Some(2))).expect("rotate");
        assert_eq!(e.prev_seq, 10);
        r.apply(20, &e);
        assert!(matches!(r.lookup("d"), Lookup::Active { key_seq: 20, .. }));
        let e = r.plan(&cmd(RegistryAction::Revoke, None)).expect("revoke");
        assert_eq!(e.prev_seq, 20);
        r.apply(30, &e);
        assert!(matches!(r.lookup("d"), Lookup::Revoked));
        assert!(r.plan(&cmd(RegistryAction::Rotate, Some(3))).is_err());
        let e = r.plan(&cmd(RegistryAction::Enrol, Some(3))).expect("re-enrol");
        assert_eq!(e.prev_seq, 30);
    }
}
