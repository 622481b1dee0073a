//! `mqtt-notary verify` and `mqtt-notary ledger verify`.
//! Exit codes: 0 valid, 1 invalid, 2 usage or I/O error.

use notary_anchor::LocalLedger;
use notary_plugin::keys::PUB_FILE;
use notary_plugin::store::{Store, STORE_FILE};
use notary_proof::{verify_bundle, NoteVerifier, ProofBundle, Verified};
use std::path::Path;
use std::process::ExitCode;

const INVALID: u8 = 1;
const ERROR: u8 = 2;

fn fail(code: u8, msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("{}: {msg}", if code == INVALID { "invalid" } else { "error" });
    ExitCode::from(code)
}

fn read(path: &Path) -> Result<Vec<u8>, ExitCode> {
    std::fs::read(path).map_err(|e| fail(ERROR, format!("{}: {e}", path.display())))
}

fn read_key(path: &Path) -> Result<NoteVerifier, ExitCode> {
    let text =
        String::from_utf8(read(path)?).map_err(|_| fail(ERROR, format!("{}: not UTF-8", path.display())))?;
    NoteVerifier::from_key_string(&text).map_err(|e| fail(ERROR, format!("{}: {e}", path.display())))
}

/// How to check EVM receipts on chain (`verify --rpc`).
pub struct ChainCheck {
    pub url: String,
    /// The expected anchoring address, `0x` and 40 hex digits.
    pub from: Option<String>,
    pub confirmations: u64,
}

/// Verifies a bundle file (one bundle, or the JSON array `/v1/proofs` serves,
/// in which case every bundle must verify). EVM receipts are checked on
/// chain with `chain`, and reported as unchecked without it. With `upgrade`
/// (a broker's HTTP base URL), each bundle is first replaced by the one the
/// broker serves now for the same leaf, if that one verifies, and the file
/// is rewritten.
pub fn bundle(
    bundle: &Path,
    payload: &Path,
    key: &Path,
    chain: Option<&ChainCheck>,
    upgrade: Option<&str>,
) -> ExitCode {
    let run = || -> Result<ExitCode, ExitCode> {
        let json = read(bundle)?;
        let payload = read(payload)?;
        let key = read_key(key)?;
        let evm_from = match chain.and_then(|c| c.from.as_deref()) {
            Some(a) => Some(
                parse_address(a)
                    .ok_or_else(|| fail(ERROR, format!("--evm-from {a:?}: expected 0x and 40 hex digits")))?,
            ),
            None => None,
        };
        // Parsed straight into the bundle types, never through a generic
        // JSON value, which would let the last of two equal keys win.
        let malformed = |e: serde_json::Error| fail(INVALID, format!("malformed bundle: {e} [malformed]"));
        let is_array = json.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[');
        let mut bundles: Vec<ProofBundle> = if is_array {
            serde_json::from_slice(&json).map_err(malformed)?
        } else {
            vec![serde_json::from_slice(&json).map_err(malformed)?]
        };
        if bundles.is_empty() {
            return Err(fail(INVALID, "the file holds no bundle [malformed]"));
        }
        if let Some(base) = upgrade {
            upgrade_bundles(base, &mut bundles, &payload, &key)?;
            let json = if is_array {
                serde_json::to_string_pretty(&bundles)
            } else {
                serde_json::to_string_pretty(&bundles[0])
            }
            .map_err(|e| fail(ERROR, e))?;
            write_atomically(bundle, json.as_bytes())?;
            println!("upgraded: {} written from {base}", bundle.display());
        }
        for b in &bundles {
            match verify_bundle(b, &payload, &key) {
                Ok(v) => {
                    print_verified(&v);
                    check_chain(&v, chain, evm_from)?;
                }
                Err(e) => return Err(fail(INVALID, format!("{e} [{}]", e.code()))),
            }
        }
        Ok(ExitCode::SUCCESS)
    };
    run().unwrap_or_else(|code| code)
}

fn print_verified(v: &Verified) {
    println!("valid: the payload was notarized");
    println!("  topic:       {}", v.leaf.topic);
    println!("  received:    {} ({} ms)", rfc3339(v.leaf.received_at_ms), v.leaf.received_at_ms);
    println!("  assurance:   {}", v.leaf.assurance.as_str());
    if let Some(p) = &v.leaf.publisher {
        // The broker's record, signed with the log; the client id is what
        // the client called itself (MQTT does not authenticate it).
        println!("  client id:   {} (as the client named itself)", p.client_id.escape_debug());
        match &p.username {
            Some(u) => println!("  username:    {} (login checked by the broker)", u.escape_debug()),
            None => println!("  username:    none (the broker checked no login)"),
        }
    }
    if let Some(d) = &v.device {
        println!("  device:      {}", d.device_id);
        println!("  counter:     {}", d.counter);
        println!("  device time: {} ({} ms)", rfc3339(d.device_time_ms), d.device_time_ms);
        println!("  content:     {}", d.content_type);
        println!("  device key:  {} (enrolled at sequence {})", hex::encode(d.public_key), d.key_seq);
        if let Some((action, seq)) = d.superseded {
            println!("  key status:  {} at sequence {seq}, after this message", action.as_str());
        } else {
            println!("  key status:  no later key event in the bundle (the broker's claim: a bundle cannot prove an absence)");
        }
    }
    println!("  sequence:    {}", v.leaf.seq);
    println!("  payload:     {} bytes, BLAKE3 {}", v.leaf.payload_len, hex::encode(v.leaf.payload_digest));
    println!(
        "  batch:       {} ({} leaves, sealed {})",
        v.batch.number,
        v.batch.size,
        rfc3339(v.batch.sealed_at_ms)
    );
    println!("  checkpoint:  {} size {}", v.checkpoint.origin, v.checkpoint.size);
    for r in &v.receipts {
        print_anchor(r);
    }
    for (cp, receipts) in &v.later {
        for r in receipts {
            print_anchor(r);
            println!(
                "               of checkpoint size {}, proven consistent with size {}",
                cp.size, v.checkpoint.size
            );
        }
    }
    for ledger in &v.pending_ledgers {
        println!("  pending:     {ledger}: not anchored there yet, the broker says (ask again later: --upgrade URL)");
    }
}

/// One receipt, and what proves its fields: the broker's signed ledger
/// head for a local receipt, the chain itself (`--rpc`) for an EVM one.
fn print_anchor(r: &notary_proof::Receipt) {
    println!("  anchor:      {}", r.describe());
    match r {
        notary_proof::Receipt::Local { .. } if r.is_signed() => {
            println!("               entry signed by the broker's key (ledger head)")
        }
        notary_proof::Receipt::Local { .. } => println!(
            "               unproven claim: no signed ledger head (a receipt from an earlier release); \
             index and time are the broker's unsigned word"
        ),
        notary_proof::Receipt::Evm { .. } => {
            println!(
                "               unproven claim until checked on chain: chain, transaction, block and status"
            )
        }
    }
}

/// Replaces each bundle by the one the broker serves now for the same leaf.
/// The new one must verify against the same payload and key; the broker is
/// trusted for nothing.
fn upgrade_bundles(
    base: &str,
    bundles: &mut [ProofBundle],
    payload: &[u8],
    key: &NoteVerifier,
) -> Result<(), ExitCode> {
    let rt =
        tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| fail(ERROR, e))?;
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .map_err(|e| fail(ERROR, e))?;
    for b in bundles.iter_mut() {
        let leaf = notary_proof::LeafRecord::decode(&b.leaf)
            .map_err(|e| fail(INVALID, format!("malformed bundle: leaf record: {e} [malformed]")))?;
        let url = format!("{}/v1/proofs/{}", base.trim_end_matches('/'), hex::encode(leaf.payload_digest));
        let (status, body) = rt
            .block_on(async {
                let resp = client.get(&url).send().await?;
                let status = resp.status();
                Ok::<_, reqwest::Error>((status, resp.bytes().await?))
            })
            .map_err(|e| fail(ERROR, format!("{url}: {e}")))?;
        if status.as_u16() != 200 {
            return Err(fail(ERROR, format!("{url}: HTTP {status}: {}", String::from_utf8_lossy(&body))));
        }
        let served: Vec<ProofBundle> = serde_json::from_slice(&body)
            .map_err(|e| fail(ERROR, format!("{url}: not a list of bundles: {e}")))?;
        let fresh = served
            .into_iter()
            .find(|n| n.leaf == b.leaf)
            .ok_or_else(|| fail(ERROR, format!("{url}: the broker no longer serves this leaf")))?;
        verify_bundle(&fresh, payload, key).map_err(|e| {
            fail(INVALID, format!("the broker served a bundle that does not verify: {e} [{}]", e.code()))
        })?;
        *b = fresh;
    }
    Ok(())
}

/// Writes beside the file and renames over it, so a crash leaves the old
/// bundle or the new one, never half of one.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), ExitCode> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".upgrade");
    let tmp = std::path::PathBuf::from(tmp);
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| fail(ERROR, format!("{}: {e}", path.display())))
}

fn parse_address(s: &str) -> Option<[u8; 20]> {
    let mut out = [0u8; 20];
    hex::decode_to_slice(s.strip_prefix("0x")?, &mut out).ok()?;
    Some(out)
}

/// Checks each EVM receipt of a verified bundle on chain, or says it is
/// unchecked. An RPC endpoint that cannot answer is an error (exit 2), not
/// a verdict.
fn check_chain(v: &Verified, chain: Option<&ChainCheck>, from: Option<[u8; 20]>) -> Result<(), ExitCode> {
    use notary_anchor::evm::{check_on_chain, OnChainError};
    for r in v.all_receipts().filter(|r| matches!(r, notary_proof::Receipt::Evm { .. })) {
        let Some(c) = chain else {
            println!("  on chain:    unchecked (give --rpc URL to check the EVM receipt)");
            continue;
        };
        match check_on_chain(&c.url, r, from, c.confirmations, std::time::Duration::from_secs(30)) {
            Ok(n) => println!("  on chain:    confirmed, {n} confirmations"),
            Err(OnChainError::Unreachable(m)) => return Err(fail(ERROR, format!("EVM RPC {}: {m}", c.url))),
            Err(e) => return Err(fail(INVALID, format!("EVM receipt: {e} [evm-receipt]"))),
        }
    }
    Ok(())
}

/// Walks the local ledger and checks every anchored checkpoint against the
/// store's log (when the store is present).
pub fn ledger(data_dir: &Path, key: Option<&Path>) -> ExitCode {
    let run = || -> Result<ExitCode, ExitCode> {
        let key_path = key.map(Path::to_path_buf).unwrap_or_else(|| data_dir.join(PUB_FILE));
        let key = read_key(&key_path)?;
        let ledger_path = data_dir.join(crate::run::LEDGER_FILE);
        if !ledger_path.exists() {
            return Err(fail(ERROR, format!("{}: no ledger here", ledger_path.display())));
        }
        let ledger = LocalLedger::open(&ledger_path).map_err(|e| fail(ERROR, e))?;
        let store = if data_dir.join(STORE_FILE).exists() {
            Some(Store::open(data_dir).map_err(|e| fail(ERROR, e))?)
        } else {
            None
        };
        let check = ledger
            .verify(&key, |cp| match &store {
                Some(store) => {
                    let root =
                        store.log_root(cp.size).map_err(|e| format!("log at size {}: {e}", cp.size))?;
                    if root != cp.root {
                        return Err(format!("checkpoint at size {} does not match the store's log", cp.size));
                    }
                    Ok(())
                }
                None => Ok(()),
            })
            .map_err(|e| fail(INVALID, e))?;
        println!(
            "valid: {} ledger entries ({} with a signed head), log size {}",
            check.entries, check.signed_heads, check.last_size
        );
        if let Some(head) = check.head {
            println!("  head entry hash: {}", hex::encode(head));
        }
        if store.is_none() {
            println!("  (no store beside the ledger: checkpoints were not compared with a log)");
        }
        Ok(ExitCode::SUCCESS)
    };
    run().unwrap_or_else(|code| code)
}

/// Unix milliseconds as an RFC 3339 UTC timestamp.
fn rfc3339(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil-from-days algorithm.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z", rem / 3600, rem % 3600 / 60, rem % 60, ms % 1000)
}

#[cfg(test)]
mod tests {
    #[test]
    fn formats_times() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(super::rfc3339(1_764_151_200_123), "2025-11-26T10:00:00.123Z");
    }
}
