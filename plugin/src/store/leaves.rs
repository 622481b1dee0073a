//! Leaves (the sequence-ordered log of notarized messages; their
//! payload-digest index is `digests.rs`) and what ingest records beside
//! them: rejections, gaps and source outages. `commit` is ingest's group
//! commit.

use super::{hash32, int, RegistryChange, Store, StoreError, U64};
use notary_proof::RegistryAction;
use rusqlite::params;

/// A leaf as persisted: sequence number, BLAKE3 payload digest, record bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredLeaf {
    pub seq: u64,
    pub digest: [u8; 32],
    pub record: Vec<u8>,
}

/// A message that was received and not notarized, and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Rejection {
    pub received_at_ms: u64,
    pub topic: String,
    #[serde(serialize_with = "hex_digest")]
    pub digest: [u8; 32],
    pub payload_len: u64,
    /// Why (docs/PROTOCOL.md §Rejections).
    pub reason: crate::reason::Reason,
    pub detail: String,
    pub device: Option<String>,
}

fn hex_digest<S: serde::Serializer>(d: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&hex::encode(d))
}

/// Everything one ingest group changes, committed in one transaction.
#[derive(Default)]
pub struct Commit {
    pub leaves: Vec<StoredLeaf>,
    pub registry: Vec<RegistryChange>,
    /// New highest counters: (device, counter).
    pub counters: Vec<(String, u64)>,
    pub rejections: Vec<Rejection>,
    /// Commands the broker refused: (command id, reason).
    pub refused: Vec<(i64, String)>,
}

impl Commit {
    pub fn is_empty(&self) -> bool {
        self.leaves.is_empty()
            && self.registry.is_empty()
            && self.counters.is_empty()
            && self.rejections.is_empty()
            && self.refused.is_empty()
    }
}

impl Store {
    /// The next unused sequence number: past every stored leaf and every
    /// sealed batch (retention may have pruned the newest sealed leaves).
    pub fn next_seq(&self) -> Result<u64, StoreError> {
        let max: Option<U64> = self.conn.query_row("SELECT MAX(seq) FROM leaves", [], |r| r.get(0))?;
        let sealed = self.last_batch()?.map_or(0, |b| b.first_seq + b.size);
        Ok(max.map_or(0, |m| m.0 + 1).max(sealed))
    }

    /// Persists leaves in one transaction (group commit).
    pub fn append_leaves(&mut self, leaves: &[StoredLeaf]) -> Result<(), StoreError> {
        self.write(|tx| insert_leaves(tx, leaves))
    }

    /// Persists one ingest group atomically: leaves, registry changes,
    /// counters, rejections and refused commands. A crash leaves either all
    /// of it or none, so counters never run ahead of the leaves they guard.
    pub fn commit(&mut self, c: &Commit) -> Result<(), StoreError> {
        self.write(|tx| {
            insert_leaves(tx, &c.leaves)?;
            for r in &c.registry {
                let e = &r.event;
                let prev = (e.prev_seq != notary_proof::device::NO_PREV).then_some(U64(e.prev_seq));
                tx.prepare_cached(
                    "INSERT INTO registry_events (seq, device, action, prev_seq) VALUES (?1, ?2, ?3, ?4)",
                )?
                .execute(params![U64(r.seq), e.device_id, e.action.as_str(), prev])?;
                let (key, key_seq) = match e.action {
                    RegistryAction::Revoke => (None, None),
                    _ => (Some(&e.public_key[..]), Some(U64(r.seq))),
                };
                tx.prepare_cached(
                    "INSERT INTO devices (id, public_key, key_seq, head_seq) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(id) DO UPDATE SET public_key = ?2, key_seq = ?3, head_seq = ?4",
                )?
                .execute(params![e.device_id, key, key_seq, U64(r.seq)])?;
                if let Some(id) = r.command {
                    tx.prepare_cached("UPDATE device_commands SET applied_seq = ?2 WHERE id = ?1")?
                        .execute(params![id, U64(r.seq)])?;
                }
            }
            for (device, counter) in &c.counters {
                tx.prepare_cached("UPDATE devices SET last_counter = ?2 WHERE id = ?1")?
                    .execute(params![device, U64(*counter)])?;
            }
            for r in &c.rejections {
                tx.prepare_cached(
                    "INSERT INTO rejections (at_ms, topic, digest, payload_len, reason, detail, device)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )?
                .execute(params![
                    U64(r.received_at_ms),
                    r.topic,
                    &r.digest[..],
                    U64(r.payload_len),
                    r.reason.as_str(),
                    r.detail,
                    r.device
                ])?;
            }
            for (id, error) in &c.refused {
                tx.prepare_cached("UPDATE device_commands SET error = ?2 WHERE id = ?1")?
                    .execute(params![id, error])?;
            }
            Ok(())
        })
    }

    /// The leaf with this sequence number.
    pub fn leaf(&self, seq: u64) -> Result<Option<StoredLeaf>, StoreError> {
        Ok(self.leaves_in(seq, seq.saturating_add(1))?.pop())
    }

    /// The first `limit` rejections of payloads with this digest.
    pub fn rejections_by_digest(
        &self,
        digest: &[u8; 32],
        limit: usize,
    ) -> Result<Vec<Rejection>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT at_ms, topic, payload_len, reason, detail, device FROM rejections
             WHERE digest = ?1 ORDER BY id LIMIT ?2",
        )?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = stmt.query_map(params![&digest[..], limit], |r| {
            Ok((
                r.get::<_, U64>(0)?.0,
                r.get(1)?,
                r.get::<_, U64>(2)?.0,
                r.get::<_, String>(3)?,
                r.get(4)?,
                r.get(5)?,
            ))
        })?;
        rows.map(|row| {
            let (received_at_ms, topic, payload_len, reason, detail, device) = row?;
            Ok(Rejection {
                received_at_ms,
                topic,
                digest: *digest,
                payload_len,
                reason: crate::reason::Reason::from_wire(&reason)
                    .ok_or_else(|| StoreError::Corrupt(format!("unknown rejection reason {reason:?}")))?,
                detail,
                device,
            })
        })
        .collect()
    }

    pub fn record_gap(&self, at_ms: u64, missed: u64, after_seq: u64) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.execute(
                "INSERT INTO gaps (at_ms, missed, after_seq) VALUES (?1, ?2, ?3)",
                params![U64(at_ms), U64(missed), U64(after_seq)],
            )?;
            Ok(())
        })
    }

    /// Records a window in which the source could not receive messages
    /// (the sidecar was disconnected or not running).
    pub fn record_outage(&self, from_ms: u64, to_ms: u64, after_seq: u64) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.execute(
                "INSERT INTO source_outages (from_ms, to_ms, after_seq) VALUES (?1, ?2, ?3)",
                params![U64(from_ms), U64(to_ms), U64(after_seq)],
            )?;
            Ok(())
        })
    }

    /// Every recorded outage: (from_ms, to_ms, after_seq), oldest first.
    pub fn outages(&self) -> Result<Vec<(u64, u64, u64)>, StoreError> {
        let mut stmt =
            self.conn.prepare("SELECT from_ms, to_ms, after_seq FROM source_outages ORDER BY id")?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, U64>(0)?.0, r.get::<_, U64>(1)?.0, r.get::<_, U64>(2)?.0)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Leaves from `from_seq` on, in order.
    pub fn leaves_from(&self, from_seq: u64) -> Result<Vec<StoredLeaf>, StoreError> {
        self.leaves_in(from_seq, u64::MAX)
    }

    /// Leaves with `from <= seq < to`, in order.
    pub fn leaves_in(&self, from: u64, to: u64) -> Result<Vec<StoredLeaf>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT seq, digest, record FROM leaves WHERE seq >= ?1 AND seq < ?2 ORDER BY seq",
        )?;
        let rows = stmt.query_map(params![int::bound(from), int::bound(to)], |r| {
            Ok((r.get::<_, U64>(0)?.0, r.get::<_, Vec<u8>>(1)?, r.get::<_, Vec<u8>>(2)?))
        })?;
        rows.map(|row| {
            let (seq, digest, record) = row?;
            Ok(StoredLeaf { seq, digest: hash32(digest)?, record })
        })
        .collect()
    }
}

fn insert_leaves(tx: &rusqlite::Transaction<'_>, leaves: &[StoredLeaf]) -> Result<(), StoreError> {
    let mut stmt = tx.prepare_cached("INSERT INTO leaves (seq, digest, record) VALUES (?1, ?2, ?3)")?;
    for l in leaves {
        stmt.execute(params![U64(l.seq), &l.digest[..], &l.record])?;
    }
    Ok(())
}
