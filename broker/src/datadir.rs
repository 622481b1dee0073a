//! What `run` and `sidecar` check in the data directory before they open
//! anything in it, so that a damaged or missing file never silently starts
//! a new log under an old log's key and name (a fork of the operator's own
//! log), nor continues an old log under a new key.
//!
//! Every SQLite file present (`notary.sqlite`, `ledger.sqlite`) must have
//! SQLite's header and be as long as its header says (a truncated file is
//! refused), and `ledger.sqlite` must pass SQLite's `quick_check` (it holds
//! one row per checkpoint, so the check is quick). When anything shows
//! that a log existed here — `broker.pub`, a ledger, or a store — then the
//! store, the key and, once the store holds a local receipt, a ledger at
//! least as long as that receipt says must all be present. Otherwise the
//! broker refuses to start and names what is wrong; `--new-log` says the
//! operator means to start a new log anyway.

use notary_plugin::keys::{KEY_FILE, PUB_FILE};
use notary_plugin::store::STORE_FILE;
use rusqlite::{Connection, OpenFlags, OptionalExtension};
use std::path::Path;

/// Why the data directory was refused.
#[derive(Debug, thiserror::Error)]
#[error("data directory {dir}: {why}")]
pub struct Refused {
    pub dir: String,
    pub why: String,
}

/// Checks `dir` (see the module docs). `ledger_file` is the local ledger's
/// file name.
pub fn check(dir: &Path, ledger_file: &str, new_log: bool) -> Result<(), Refused> {
    let refuse = |why: String| Refused { dir: dir.display().to_string(), why };
    let store = dir.join(STORE_FILE);
    let ledger = dir.join(ledger_file);
    for path in [&store, &ledger] {
        if let Some(why) = sqlite_file_damage(path) {
            return Err(refuse(format!(
                "{} is damaged ({why}); restore it from a backup, or move it aside and start with --new-log",
                path.display()
            )));
        }
    }
    if nonempty(&ledger) {
        if let Err(why) = quick_check(&ledger) {
            return Err(refuse(format!(
                "{} is damaged ({why}); restore it from a backup, or move it aside and start with --new-log",
                ledger.display()
            )));
        }
    }
    let evidence: Vec<&str> = [
        (dir.join(PUB_FILE).exists(), PUB_FILE),
        (nonempty(&ledger), ledger_file),
        (nonempty(&store), STORE_FILE),
    ]
    .into_iter()
    .filter_map(|(present, name)| present.then_some(name))
    .collect();
    if evidence.is_empty() || new_log {
        if new_log && !evidence.is_empty() {
            tracing::warn!(found = ?evidence, "--new-log: starting even though a log existed here");
        }
        return Ok(());
    }
    let existed = format!("a log existed here ({} present)", evidence.join(", "));
    if !nonempty(&store) {
        return Err(refuse(format!(
            "{existed} but {STORE_FILE} is missing or empty: starting would begin a new log that \
             contradicts the old one's checkpoints. Restore it, or start with --new-log"
        )));
    }
    if !dir.join(KEY_FILE).exists() {
        return Err(refuse(format!(
            "{existed} but {KEY_FILE} is missing: a new key would continue the log under another \
             name, and old bundles would fail against it. Restore the key, or start with --new-log"
        )));
    }
    let receipt =
        newest_local_receipt(&store).map_err(|e| refuse(format!("cannot read {STORE_FILE}: {e}")))?;
    if let Some(index) = receipt {
        let head = if nonempty(&ledger) {
            ledger_head(&ledger).map_err(|e| refuse(format!("cannot read {ledger_file}: {e}")))?
        } else {
            None
        };
        if head.is_none_or(|h| h < index) {
            let found = head.map_or("no entries".to_owned(), |h| format!("entries up to {h}"));
            return Err(refuse(format!(
                "{STORE_FILE} holds a local ledger receipt at index {index} but {ledger_file} has {found}: \
                 the ledger was replaced or truncated. Restore it, or start with --new-log"
            )));
        }
    }
    Ok(())
}

fn nonempty(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.len() > 0)
}

/// What is wrong with an SQLite file's header or length, if anything. A
/// missing or empty file is not damage (SQLite treats it as a new database).
/// The length is checked only without a write-ahead log beside the file: a
/// crash during a WAL checkpoint can leave the file shorter than its new
/// header says, and SQLite repairs that from the WAL when it opens.
pub fn sqlite_file_damage(path: &Path) -> Option<String> {
    use std::io::Read as _;
    // The header and the length only: the store can be gigabytes.
    let (len, mut file) = match std::fs::File::open(path).and_then(|f| Ok((f.metadata()?.len(), f))) {
        Ok(v) => v,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => return Some(format!("unreadable: {e}")),
    };
    if len == 0 {
        return None;
    }
    let mut header_bytes = [0u8; 100];
    if len < 100 || file.read_exact(&mut header_bytes).is_err() {
        return Some(format!("{len} bytes, shorter than an SQLite header"));
    }
    let header = &header_bytes;
    if !header.starts_with(b"SQLite format 3\0") {
        return Some("not an SQLite database".into());
    }
    let page_size = match u16::from_be_bytes([header[16], header[17]]) {
        1 => 65536u64,
        n if n >= 512 && n.is_power_of_two() => u64::from(n),
        n => return Some(format!("page size {n} in the header")),
    };
    // The header's page count is valid when its change counter matches
    // the "version-valid-for" number (SQLite file format §1.3.7).
    let pages = u64::from(u32::from_be_bytes([header[28], header[29], header[30], header[31]]));
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    let no_wal = !nonempty(Path::new(&wal));
    if no_wal && header[24..28] == header[92..96] && len < pages * page_size {
        return Some(format!("truncated: {len} bytes where its header says {}", pages * page_size));
    }
    None
}

/// Opens an existing file without creating one. Read-write: after a crash
/// SQLite must be able to recover the write-ahead log; nothing is written.
fn existing(path: &Path) -> rusqlite::Result<Connection> {
    Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX)
}

fn quick_check(path: &Path) -> Result<(), String> {
    let conn = existing(path).map_err(|e| e.to_string())?;
    let answer: String = conn.query_row("PRAGMA quick_check", [], |r| r.get(0)).map_err(|e| e.to_string())?;
    if answer == "ok" {
        Ok(())
    } else {
        Err(answer)
    }
}

/// The ledger index of the newest local receipt the store holds.
fn newest_local_receipt(store: &Path) -> Result<Option<u64>, String> {
    let conn = existing(store).map_err(|e| e.to_string())?;
    let has_table: bool = conn
        .query_row("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'receipts'", [], |_| Ok(true))
        .optional()
        .map_err(|e| e.to_string())?
        .unwrap_or(false);
    if !has_table {
        return Ok(None);
    }
    let json: Option<String> = conn
        .query_row(
            "SELECT receipt FROM receipts WHERE ledger = 'local' ORDER BY size DESC LIMIT 1",
            [],
            |r| r.get(0),
        )
        .optional()
        .map_err(|e| e.to_string())?;
    let Some(json) = json else { return Ok(None) };
    let receipt: notary_proof::Receipt =
        serde_json::from_str(&json).map_err(|e| format!("a stored receipt does not parse: {e}"))?;
    Ok(match receipt {
        notary_proof::Receipt::Local { index, .. } => Some(index),
        _ => None,
    })
}

/// The index of the ledger's newest entry.
fn ledger_head(ledger: &Path) -> Result<Option<u64>, String> {
    let conn = existing(ledger).map_err(|e| e.to_string())?;
    conn.query_row("SELECT MAX(idx) FROM ledger_entries", [], |r| r.get::<_, Option<i64>>(0))
        .map(|v| v.and_then(|i| u64::try_from(i).ok()))
        .map_err(|e| e.to_string())
}
