//! The device registry: devices, their registry events and the queued
//! commands the broker applies.

use super::{int, Store, StoreError, U64};
use notary_proof::{RegistryAction, RegistryEvent};
use rusqlite::{params, OptionalExtension};

/// A device as the registry holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRow {
    pub id: String,
    /// The current key; `None` once revoked.
    pub public_key: Option<[u8; 32]>,
    /// The registry leaf that put the current key in place.
    pub key_seq: Option<u64>,
    /// The device's latest registry leaf.
    pub head_seq: u64,
    /// The highest envelope counter accepted from the device.
    pub last_counter: Option<u64>,
}

/// A registry change requested by the CLI or the enrolment file, applied
/// by the running broker in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceCommand {
    pub id: i64,
    pub action: RegistryAction,
    pub device: String,
    pub public_key: Option<[u8; 32]>,
    pub source: String,
    pub requested_at_ms: u64,
    /// Set once applied: the sequence number of its registry leaf.
    pub applied_seq: Option<u64>,
    /// Set if the broker refused it.
    pub error: Option<String>,
}

/// A registry leaf and the command it applies (none for start-up changes).
pub struct RegistryChange {
    pub seq: u64,
    pub event: RegistryEvent,
    pub command: Option<i64>,
}

impl Store {
    /// Every device the registry knows, by id.
    pub fn devices(&self) -> Result<Vec<DeviceRow>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT id, public_key, key_seq, head_seq, last_counter FROM devices ORDER BY id")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get(1)?,
                r.get::<_, Option<U64>>(2)?,
                r.get::<_, U64>(3)?,
                r.get::<_, Option<U64>>(4)?,
            ))
        })?;
        rows.map(|row| {
            let (id, key, key_seq, head_seq, last_counter) = row?;
            Ok(DeviceRow {
                id,
                public_key: key32(key)?,
                key_seq: key_seq.map(|v| v.0),
                head_seq: head_seq.0,
                last_counter: last_counter.map(|v| v.0),
            })
        })
        .collect()
    }

    /// Queues a registry change for the broker to apply; returns its id.
    pub fn queue_command(
        &self,
        action: RegistryAction,
        device: &str,
        public_key: Option<[u8; 32]>,
        source: &str,
        now_ms: u64,
    ) -> Result<i64, StoreError> {
        self.write(|tx| {
            tx.execute(
                "INSERT INTO device_commands (action, device, public_key, source, requested_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![action.as_str(), device, public_key.as_ref().map(|k| &k[..]), source, U64(now_ms)],
            )?;
            Ok(tx.last_insert_rowid())
        })
    }

    /// Commands not applied or refused yet, oldest first; with `all`, every
    /// command ever queued.
    pub fn commands(&self, all: bool) -> Result<Vec<DeviceCommand>, StoreError> {
        let sql = if all {
            "SELECT id, action, device, public_key, source, requested_at_ms, applied_seq, error
             FROM device_commands ORDER BY id"
        } else {
            "SELECT id, action, device, public_key, source, requested_at_ms, applied_seq, error
             FROM device_commands WHERE applied_seq IS NULL AND error IS NULL ORDER BY id"
        };
        let mut stmt = self.conn.prepare_cached(sql)?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, Option<Vec<u8>>>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, U64>(5)?.0,
                r.get::<_, Option<U64>>(6)?.map(|v| v.0),
                r.get::<_, Option<String>>(7)?,
            ))
        })?;
        rows.map(|row| {
            let (id, action, device, key, source, requested_at_ms, applied_seq, error) = row?;
            Ok(DeviceCommand {
                id,
                action: action_from_str(&action)?,
                device,
                public_key: key32(key)?,
                source,
                requested_at_ms,
                applied_seq,
                error,
            })
        })
        .collect()
    }

    /// The registry event of `device` that follows the one at `seq`, if it
    /// lies before `before_seq`.
    pub fn registry_successor(
        &self,
        device: &str,
        seq: u64,
        before_seq: u64,
    ) -> Result<Option<u64>, StoreError> {
        Ok(self
            .conn
            .prepare_cached(
                "SELECT seq FROM registry_events WHERE device = ?1 AND prev_seq = ?2 AND seq < ?3",
            )?
            .query_row(params![device, U64(seq), int::bound(before_seq)], |r| r.get::<_, U64>(0))
            .optional()?
            .map(|v| v.0))
    }
}

fn action_from_str(s: &str) -> Result<RegistryAction, StoreError> {
    match s {
        "enrol" => Ok(RegistryAction::Enrol),
        "rotate" => Ok(RegistryAction::Rotate),
        "revoke" => Ok(RegistryAction::Revoke),
        other => Err(StoreError::Corrupt(format!("unknown registry action {other:?}"))),
    }
}

fn key32(v: Option<Vec<u8>>) -> Result<Option<[u8; 32]>, StoreError> {
    v.map(|k| k.try_into().map_err(|_| StoreError::Corrupt("key is not 32 bytes".into()))).transpose()
}
