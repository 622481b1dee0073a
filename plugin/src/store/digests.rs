//! The payload-digest index: which sequence numbers carry a payload digest,
//! kept off ingest's commit path.
//!
//! An index B-tree over every digest takes each new digest at a random
//! place: at each durable group commit SQLite writes a whole page per new
//! digest to the WAL, and the checkpointer copies it again, so the cost of
//! a commit grew with the index (bench/RESULTS.md). Here a commit appends
//! leaves in sequence order only, and the index is built in three places:
//!
//! - **Unsealed leaves** are indexed in memory ([`Unsealed`]): ingest adds
//!   a group's leaves after committing it and before acknowledging it; the
//!   sealer removes them once their batch is stored. At start it is
//!   rebuilt from the leaves past the last sealed batch.
//! - **Sealed leaves** go into a sorted *run* of `digest_index`, written in
//!   the seal transaction: rows `(run, prefix, seq)`, keyed in that order,
//!   so a new run is appended at the end of the B-tree, page after page.
//!   `prefix` is the digest's first 8 bytes as a big-endian `i64`; a match
//!   is confirmed against the leaf's full digest.
//! - **Runs are merged in the background** (the index thread,
//!   [`Store::index_step`]): once [`FANOUT`] runs share a level, the oldest
//!   of them are merged into one run of the next level, written in chunks
//!   of [`WRITE_CHUNK`] rows, one short transaction each, then switched in
//!   atomically; the replaced runs are deleted in chunks afterwards. A run
//!   of [`RUN_FINAL`] entries or more is final and never merged again.
//!
//! Every visible run covers its own range of sequence numbers, and each
//! carries a Bloom filter over its prefixes ([`Filter`], about 1 % false
//! positives), so a lookup reads only the runs that may hold the digest.
//! Retention deletes leaves; the runs that cover them stay and answer
//! "pruned, in batch N" until the pruner drops them whole.

use super::{Store, StoreError, U64};
use notary_proof::Hash;
use rusqlite::{params, Connection, OptionalExtension};
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

/// Runs of one level merged at a time.
pub const FANOUT: usize = 8;
/// A merged run with at least this many entries is final: never merged
/// again (a merge holds its runs in memory: at most `FANOUT` times this,
/// 16 bytes an entry).
pub const RUN_FINAL: usize = 1 << 18;
/// Rows written, or deleted, per transaction while merging.
pub const WRITE_CHUNK: usize = 1 << 13;
/// Bloom filter: bits per entry and probes per lookup (about 1 % false
/// positives).
const FILTER_BITS_PER_ENTRY: usize = 10;
const FILTER_PROBES: u64 = 7;
/// The `level` of a run being merged (invisible to lookups) and of a run
/// waiting to be deleted.
const BUILDING: i64 = -1;
const DEAD: i64 = -2;
/// The `level` of a final run.
pub const FINAL: i64 = 1000;

/// The index key of a digest: its first 8 bytes, as SQLite's `i64`.
pub fn prefix_of(digest: &Hash) -> i64 {
    let mut p = [0u8; 8];
    p.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(p)
}

/// Unsealed leaves by digest: (digest, seq).
#[derive(Default)]
pub struct Unsealed {
    set: Mutex<BTreeSet<(Hash, u64)>>,
}

impl Unsealed {
    pub fn add(&self, leaves: impl IntoIterator<Item = (Hash, u64)>) {
        let mut set = self.set.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        set.extend(leaves);
    }

    pub fn remove<'a>(&self, leaves: impl IntoIterator<Item = &'a (Hash, u64)>) {
        let mut set = self.set.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for l in leaves {
            set.remove(l);
        }
    }

    /// The unsealed leaves with this digest, in sequence order.
    pub fn seqs(&self, digest: &Hash) -> Vec<u64> {
        let set = self.set.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        set.range((*digest, 0)..=(*digest, u64::MAX)).map(|(_, s)| *s).collect()
    }

    pub fn len(&self) -> usize {
        self.set.lock().unwrap_or_else(std::sync::PoisonError::into_inner).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A Bloom filter over a run's prefixes. The prefix is already uniformly
/// distributed (a BLAKE3 output), so its two halves serve as the two
/// hashes of double hashing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    words: Vec<u64>,
}

impl Filter {
    fn new(entries: usize) -> Self {
        let words = (entries.saturating_mul(FILTER_BITS_PER_ENTRY) / 64).max(1);
        Filter { words: vec![0; words] }
    }

    fn probes(&self, prefix: i64) -> impl Iterator<Item = (usize, u64)> {
        let bits = self.words.len() as u64 * 64;
        let p = prefix as u64;
        let (h1, h2) = (p & 0xffff_ffff, (p >> 32) | 1);
        (0..FILTER_PROBES).map(move |i| {
            let bit = h1.wrapping_add(i.wrapping_mul(h2)) % bits;
            ((bit / 64) as usize, 1u64 << (bit % 64))
        })
    }

    fn insert(&mut self, prefix: i64) {
        for (w, mask) in self.probes(prefix).collect::<Vec<_>>() {
            self.words[w] |= mask;
        }
    }

    pub fn may_contain(&self, prefix: i64) -> bool {
        self.probes(prefix).all(|(w, mask)| self.words.get(w).is_some_and(|v| v & mask != 0))
    }

    fn to_bytes(&self) -> Vec<u8> {
        self.words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    fn from_bytes(b: &[u8]) -> Result<Self, StoreError> {
        if b.is_empty() || !b.len().is_multiple_of(8) {
            return Err(StoreError::Corrupt(format!("index filter of {} bytes", b.len())));
        }
        let words = b
            .chunks_exact(8)
            .map(|c| {
                let mut w = [0u8; 8];
                w.copy_from_slice(c);
                u64::from_le_bytes(w)
            })
            .collect();
        Ok(Filter { words })
    }
}

/// A visible run: its id, the sequence numbers it covers and its filter.
#[derive(Debug, Clone)]
pub struct Run {
    pub id: i64,
    pub from_seq: u64,
    pub to_seq: u64,
    pub filter: Arc<Filter>,
}

/// The visible runs with their filters, cached for the proof service's
/// read connections. The visible set changes only when a seal adds a run
/// (a new, higher id: ids are never reused, `AUTOINCREMENT`), a merge is switched in (fewer visible runs) or
/// retention drops runs (fewer again); between two looks with the same
/// highest id no run was added, so the same count means the same set.
/// (highest run id, visible runs).
type CacheKey = (i64, i64);

#[derive(Default)]
pub struct RunCache {
    cached: Mutex<(CacheKey, Arc<Vec<Run>>)>,
}

impl RunCache {
    pub fn runs(&self, store: &Store) -> Result<Arc<Vec<Run>>, StoreError> {
        let key: CacheKey = store
            .conn
            .prepare_cached("SELECT COALESCE(MAX(id), 0), COALESCE(SUM(level >= 0), 0) FROM digest_runs")?
            .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        let mut cached = self.cached.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if cached.0 == key {
            return Ok(cached.1.clone());
        }
        let mut runs = Vec::new();
        let mut stmt = store.conn.prepare_cached(
            "SELECT id, from_seq, to_seq FROM digest_runs WHERE level >= 0 ORDER BY from_seq",
        )?;
        let rows =
            stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, U64>(1)?.0, r.get::<_, U64>(2)?.0)))?;
        for row in rows {
            let (id, from_seq, to_seq) = row?;
            let filter = match cached.1.iter().find(|r| r.id == id) {
                Some(r) => r.filter.clone(),
                None => Arc::new(store.run_filter(id)?),
            };
            runs.push(Run { id, from_seq, to_seq, filter });
        }
        *cached = (key, Arc::new(runs));
        Ok(cached.1.clone())
    }
}

/// A merged run, written and not yet switched in.
pub(super) struct MergeWritten {
    id: i64,
    level: i64,
    next: i64,
    sources: Vec<i64>,
}

/// What one step of the index's upkeep did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexWork {
    Idle,
    Deleted,
    Merged,
}

/// What the index knows of a digest.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct DigestHits {
    /// Stored leaves with the digest, in sequence order.
    pub leaves: Vec<super::StoredLeaf>,
    /// The newest pruned leaf with the digest's prefix, if its run is kept.
    pub pruned_seq: Option<u64>,
}

impl Store {
    fn run_filter(&self, id: i64) -> Result<Filter, StoreError> {
        let b: Vec<u8> = self
            .conn
            .prepare_cached("SELECT filter FROM digest_filters WHERE run = ?1")?
            .query_row([id], |r| r.get(0))?;
        Filter::from_bytes(&b)
    }

    /// The first `limit` leaves with `digest`, in sequence order: the
    /// sealed ones found through `runs` and then `unsealed` (sequence
    /// numbers the caller took from [`Unsealed`] before this snapshot).
    pub fn find_digest(
        &self,
        digest: &Hash,
        runs: &[Run],
        unsealed: &[u64],
        limit: usize,
    ) -> Result<DigestHits, StoreError> {
        let prefix = prefix_of(digest);
        let pruned_below = self.pruned()?.seq;
        let mut hits = DigestHits::default();
        let mut seqs: Vec<u64> = Vec::new();
        let want = i64::try_from(limit).unwrap_or(i64::MAX);
        for run in runs.iter().filter(|r| r.filter.may_contain(prefix)) {
            if run.from_seq < pruned_below {
                let newest: Option<U64> = self
                    .conn
                    .prepare_cached(
                        "SELECT MAX(seq) FROM digest_index WHERE run = ?1 AND prefix = ?2 AND seq < ?3",
                    )?
                    .query_row(params![run.id, prefix, U64(pruned_below)], |r| r.get(0))?;
                hits.pruned_seq = hits.pruned_seq.max(newest.map(|s| s.0));
            }
            if run.to_seq <= pruned_below || seqs.len() >= limit {
                continue;
            }
            let mut stmt = self.conn.prepare_cached(
                "SELECT seq FROM digest_index WHERE run = ?1 AND prefix = ?2 AND seq >= ?3
                 ORDER BY seq LIMIT ?4",
            )?;
            let rows =
                stmt.query_map(params![run.id, prefix, U64(pruned_below), want], |r| r.get::<_, U64>(0))?;
            for s in rows {
                seqs.push(s?.0);
            }
        }
        seqs.extend_from_slice(unsealed);
        seqs.sort_unstable();
        seqs.dedup();
        for seq in seqs {
            if hits.leaves.len() >= limit {
                break;
            }
            match self.leaf(seq)? {
                Some(leaf) if leaf.digest == *digest => hits.leaves.push(leaf),
                // Another digest with the same prefix.
                Some(_) => {}
                None if seq < pruned_below => hits.pruned_seq = hits.pruned_seq.max(Some(seq)),
                None => return Err(StoreError::Corrupt(format!("leaf {seq} is indexed and missing"))),
            }
        }
        Ok(hits)
    }

    /// Visible runs of the digest index.
    pub fn index_runs(&self) -> Result<u64, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT COUNT(*) FROM digest_runs WHERE level >= 0")?
            .query_row([], |r| r.get::<_, U64>(0))?
            .0)
    }

    /// One step of the index's upkeep: deletes a chunk of a replaced run,
    /// or merges the oldest [`FANOUT`] runs of the lowest level that has as
    /// many.
    pub fn index_step(&self) -> Result<IndexWork, StoreError> {
        if self.delete_dead_chunk()? {
            return Ok(IndexWork::Deleted);
        }
        let level: Option<i64> = self
            .conn
            .prepare_cached(
                "SELECT level FROM digest_runs WHERE level >= 0 AND level < ?1
                 GROUP BY level HAVING COUNT(*) >= ?2 ORDER BY level LIMIT 1",
            )?
            .query_row(params![FINAL, FANOUT as i64], |r| r.get(0))
            .optional()?;
        let Some(level) = level else { return Ok(IndexWork::Idle) };
        self.merge(level)?;
        Ok(IndexWork::Merged)
    }

    /// Runs left half-built by a crash are dropped (their sources are
    /// still visible); called when the index thread starts.
    pub fn abandon_merges(&self) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.execute("UPDATE digest_runs SET level = ?1 WHERE level = ?2", params![DEAD, BUILDING])?;
            Ok(())
        })
    }

    fn merge(&self, level: i64) -> Result<(), StoreError> {
        let written = self.write_merge(level)?;
        self.switch_merge(written)
    }

    /// Writes the merge of the oldest [`FANOUT`] runs of `level`, not yet
    /// visible to lookups.
    pub(super) fn write_merge(&self, level: i64) -> Result<MergeWritten, StoreError> {
        let sources: Vec<(i64, u64, u64)> = self
            .conn
            .prepare_cached(
                "SELECT id, from_seq, to_seq FROM digest_runs WHERE level = ?1 ORDER BY from_seq LIMIT ?2",
            )?
            .query_map(params![level, FANOUT as i64], |r| {
                Ok((r.get(0)?, r.get::<_, U64>(1)?.0, r.get::<_, U64>(2)?.0))
            })?
            .collect::<Result<_, _>>()?;
        let mut entries: Vec<(i64, i64)> = Vec::new();
        for (id, _, _) in &sources {
            let mut stmt = self.conn.prepare_cached("SELECT prefix, seq FROM digest_index WHERE run = ?1")?;
            for e in stmt.query_map([id], |r| Ok((r.get(0)?, r.get(1)?)))? {
                entries.push(e?);
            }
        }
        entries.sort_unstable();
        let from = sources.iter().map(|s| s.1).min().unwrap_or(0);
        let to = sources.iter().map(|s| s.2).max().unwrap_or(0);
        let next = if entries.len() >= RUN_FINAL { FINAL } else { level + 1 };
        let filter = filter_of(&entries);
        let id = self.write(|tx| new_run(tx, BUILDING, from, to, entries.len(), &filter))?;
        for chunk in entries.chunks(WRITE_CHUNK) {
            self.write(|tx| insert_entries(tx, id, chunk))?;
        }
        Ok(MergeWritten { id, level, next, sources: sources.iter().map(|s| s.0).collect() })
    }

    /// Makes a written merge visible and its sources replaced, in one
    /// transaction.
    pub(super) fn switch_merge(&self, m: MergeWritten) -> Result<(), StoreError> {
        let MergeWritten { id, level, next, sources: ids } = m;
        self.write(|tx| {
            // Retention may have dropped a source meanwhile: then the merge
            // is dropped too (its runs are the oldest; the next merge of
            // this level starts after them).
            let mut still = 0;
            for id in &ids {
                still += tx
                    .prepare_cached("SELECT COUNT(*) FROM digest_runs WHERE id = ?1 AND level = ?2")?
                    .query_row(params![id, level], |r| r.get::<_, i64>(0))?;
            }
            let (merged, replaced) = if still == ids.len() as i64 { (next, DEAD) } else { (DEAD, level) };
            tx.prepare_cached("UPDATE digest_runs SET level = ?2 WHERE id = ?1")?
                .execute(params![id, merged])?;
            if replaced == DEAD {
                for source in &ids {
                    tx.prepare_cached("UPDATE digest_runs SET level = ?2 WHERE id = ?1")?
                        .execute(params![source, DEAD])?;
                }
            }
            Ok(())
        })
    }

    /// Deletes up to [`WRITE_CHUNK`] rows of the oldest replaced run, and
    /// the run once it is empty. False if there is none.
    fn delete_dead_chunk(&self) -> Result<bool, StoreError> {
        let dead: Option<i64> = self
            .conn
            .prepare_cached("SELECT id FROM digest_runs WHERE level = ?1 ORDER BY id LIMIT 1")?
            .query_row([DEAD], |r| r.get(0))
            .optional()?;
        let Some(id) = dead else { return Ok(false) };
        self.write(|tx| {
            let n = tx
                .prepare_cached(
                    "DELETE FROM digest_index WHERE run = ?1 AND (prefix, seq) <=
                     (SELECT prefix, seq FROM digest_index WHERE run = ?1 ORDER BY prefix, seq LIMIT 1 OFFSET ?2)",
                )?
                .execute(params![id, WRITE_CHUNK as i64])?;
            if n == 0 {
                // Fewer rows than a chunk are left.
                tx.prepare_cached("DELETE FROM digest_index WHERE run = ?1")?.execute([id])?;
                tx.prepare_cached("DELETE FROM digest_runs WHERE id = ?1")?.execute([id])?;
                tx.prepare_cached("DELETE FROM digest_filters WHERE run = ?1")?.execute([id])?;
            }
            Ok(())
        })?;
        Ok(true)
    }
}

/// Writes the run of leaves just sealed, (prefix, seq) each, covering
/// `from..to`; part of the seal transaction.
pub(super) fn seal_run(
    tx: &Connection,
    from: u64,
    to: u64,
    digests: &[(Hash, u64)],
) -> Result<(), StoreError> {
    if digests.is_empty() {
        return Ok(());
    }
    let mut entries: Vec<(i64, i64)> = digests.iter().map(|(d, s)| (prefix_of(d), *s as i64)).collect();
    entries.sort_unstable();
    write_run(tx, 0, from, to, &entries)
}

/// Writes a whole run at `level`: its record with its filter, and its
/// entries, sorted.
pub(super) fn write_run(
    tx: &Connection,
    level: i64,
    from: u64,
    to: u64,
    entries: &[(i64, i64)],
) -> Result<(), StoreError> {
    let id = new_run(tx, level, from, to, entries.len(), &filter_of(entries))?;
    insert_entries(tx, id, entries)
}

fn filter_of(entries: &[(i64, i64)]) -> Filter {
    let mut filter = Filter::new(entries.len());
    entries.iter().for_each(|(p, _)| filter.insert(*p));
    filter
}

fn new_run(
    tx: &Connection,
    level: i64,
    from: u64,
    to: u64,
    entries: usize,
    filter: &Filter,
) -> Result<i64, StoreError> {
    tx.prepare_cached("INSERT INTO digest_runs (level, from_seq, to_seq, entries) VALUES (?1, ?2, ?3, ?4)")?
        .execute(params![level, U64(from), U64(to), entries as i64])?;
    let id = tx.last_insert_rowid();
    tx.prepare_cached("INSERT INTO digest_filters (run, filter) VALUES (?1, ?2)")?
        .execute(params![id, filter.to_bytes()])?;
    Ok(id)
}

fn insert_entries(tx: &Connection, run: i64, entries: &[(i64, i64)]) -> Result<(), StoreError> {
    let mut stmt = tx.prepare_cached("INSERT INTO digest_index (run, prefix, seq) VALUES (?1, ?2, ?3)")?;
    for (prefix, seq) in entries {
        stmt.execute(params![run, prefix, seq])?;
    }
    Ok(())
}

/// A run being merged, empty, for tests of an interrupted merge.
#[cfg(test)]
pub(super) fn new_run_for_test(tx: &Connection) -> Result<i64, StoreError> {
    new_run(tx, BUILDING, 0, 0, 0, &Filter::new(0))
}

/// Marks the runs wholly below `seq` for deletion (retention); returns how
/// many.
pub(super) fn drop_runs_below(tx: &Connection, seq: u64) -> Result<u64, StoreError> {
    Ok(tx
        .prepare_cached("UPDATE digest_runs SET level = ?1 WHERE level >= 0 AND to_seq <= ?2")?
        .execute(params![DEAD, U64(seq)])? as u64)
}

/// Schema version 3: the digest index moves from a B-tree index on
/// `leaves` to runs. The sealed leaves are indexed in final runs of
/// [`RUN_FINAL`] each; unsealed ones are indexed in memory at start.
pub(super) fn upgrade_to_runs(conn: &Connection) -> Result<(), StoreError> {
    conn.execute_batch("DROP INDEX IF EXISTS leaves_by_digest")?;
    let sealed_end: Option<(U64, U64)> = conn
        .query_row("SELECT first_seq, size FROM batches ORDER BY number DESC LIMIT 1", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()?;
    let end = sealed_end.map_or(0, |(f, s)| f.0 + s.0);
    let mut from = 0u64;
    while from < end {
        let mut entries: Vec<(i64, i64)> = Vec::new();
        let mut last = from;
        {
            let mut stmt = conn.prepare(
                "SELECT seq, digest FROM leaves WHERE seq >= ?1 AND seq < ?2 ORDER BY seq LIMIT ?3",
            )?;
            let rows = stmt.query_map(params![U64(from), U64(end), RUN_FINAL as i64], |r| {
                Ok((r.get::<_, U64>(0)?.0, r.get::<_, Vec<u8>>(1)?))
            })?;
            for row in rows {
                let (seq, digest) = row?;
                let digest = super::hash32(digest)?;
                entries.push((prefix_of(&digest), seq as i64));
                last = seq;
            }
        }
        if entries.is_empty() {
            break;
        }
        let to = if entries.len() < RUN_FINAL { end } else { last + 1 };
        entries.sort_unstable();
        write_run(conn, FINAL, from, to, &entries)?;
        from = to;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_filter_holds_what_was_inserted_and_little_else() {
        let prefixes: Vec<i64> =
            (0..10_000u64).map(|i| prefix_of(blake3::hash(&i.to_be_bytes()).as_bytes())).collect();
        let mut f = Filter::new(prefixes.len());
        prefixes.iter().for_each(|p| f.insert(*p));
        assert!(prefixes.iter().all(|p| f.may_contain(*p)), "no false negatives");
        let back = Filter::from_bytes(&f.to_bytes()).expect("round trip");
        assert_eq!(back, f);
        let false_positives = (10_000..110_000u64)
            .filter(|i| f.may_contain(prefix_of(blake3::hash(&i.to_be_bytes()).as_bytes())))
            .count();
        assert!(false_positives < 2_000, "{false_positives} of 100,000 (about 1 % expected)");
        assert!(Filter::from_bytes(&[1, 2, 3]).is_err());
    }
}
