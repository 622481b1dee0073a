//! The CBOR subset an envelope may use (docs/PROTOCOL.md §Device envelope,
//! "Encoding"): RFC 8949 §4.2.1's core deterministic rules for heads and
//! lengths, without its key order.
//!
//! - every item well-formed (§5.3.1), text strings valid UTF-8;
//! - every head in preferred form: an argument takes the shortest
//!   encoding that holds it;
//! - definite lengths only: no indefinite-length (chunked) strings,
//!   arrays or maps;
//! - map keys unique (compared as encoded bytes); their order is free,
//!   because the signature covers the protected bytes as sent;
//! - no tags (the envelope's outer tag 18 is checked by the caller), no
//!   floating-point or simple values: no field of an envelope needs one.
//!
//! A generic decoder accepts more than this (coset does), so the broker and
//! any verifier run this check first and agree on what is malformed.

/// Deepest nesting accepted; an envelope needs 2.
const MAX_DEPTH: u32 = 16;

/// Checks that `bytes` is exactly one item of the subset, nothing after it.
pub(crate) fn check_item(bytes: &[u8]) -> Result<(), &'static str> {
    let mut at = 0;
    item(bytes, &mut at, 0)?;
    if at != bytes.len() {
        return Err("bytes after the CBOR item");
    }
    Ok(())
}

/// Reads one head at `at`: its major type and argument.
fn head(bytes: &[u8], at: &mut usize) -> Result<(u8, u64), &'static str> {
    let first = *bytes.get(*at).ok_or("truncated CBOR")?;
    *at += 1;
    let (major, info) = (first >> 5, first & 0x1f);
    let width = match info {
        0..=23 => return Ok((major, u64::from(info))),
        24 => 1,
        25 => 2,
        26 => 4,
        27 => 8,
        31 => return Err("an indefinite-length (chunked) item"),
        _ => return Err("a reserved CBOR head"),
    };
    let arg = bytes.get(*at..*at + width).ok_or("truncated CBOR")?;
    *at += width;
    let value = arg.iter().fold(0u64, |v, b| (v << 8) | u64::from(*b));
    // The shortest form: 24..=255 in one byte, then two, four, eight.
    let shortest = match width {
        1 => value >= 24,
        2 => value > 0xff,
        4 => value > 0xffff,
        _ => value > 0xffff_ffff,
    };
    if !shortest {
        return Err("a CBOR head longer than its value needs");
    }
    Ok((major, value))
}

fn item(bytes: &[u8], at: &mut usize, depth: u32) -> Result<(), &'static str> {
    if depth > MAX_DEPTH {
        return Err("CBOR nested too deep");
    }
    let (major, arg) = head(bytes, at)?;
    let remaining = (bytes.len() - *at) as u64;
    match major {
        0 | 1 => Ok(()),
        2 | 3 => {
            if arg > remaining {
                return Err("truncated CBOR");
            }
            let end = *at + arg as usize;
            if major == 3 && std::str::from_utf8(&bytes[*at..end]).is_err() {
                return Err("a text string that is not UTF-8");
            }
            *at = end;
            Ok(())
        }
        4 => {
            // Each element takes at least one byte.
            if arg > remaining {
                return Err("truncated CBOR");
            }
            for _ in 0..arg {
                item(bytes, at, depth + 1)?;
            }
            Ok(())
        }
        5 => {
            if arg > remaining / 2 {
                return Err("truncated CBOR");
            }
            let mut keys: Vec<&[u8]> = Vec::with_capacity(arg as usize);
            for _ in 0..arg {
                let start = *at;
                item(bytes, at, depth + 1)?;
                keys.push(&bytes[start..*at]);
                item(bytes, at, depth + 1)?;
            }
            keys.sort_unstable();
            if keys.windows(2).any(|w| w[0] == w[1]) {
                return Err("a map with a repeated key");
            }
            Ok(())
        }
        6 => Err("a CBOR tag inside the envelope"),
        _ => Err("a floating-point or simple value"),
    }
}

#[cfg(test)]
mod tests {
    use super::check_item;

    #[test]
    fn the_subset_is_what_rfc_8949_core_deterministic_heads_allow() {
        let ok: &[&[u8]] = &[
            &[0x17],                         // 23
            &[0x18, 0x18],                   // 24
            &[0x39, 0x01, 0x00],             // -257
            &[0x43, 1, 2, 3],                // h'010203'
            &[0x62, b'h', b'i'],             // "hi"
            &[0x82, 0x01, 0x20],             // [1, -1]
            &[0xA2, 0x03, 0x00, 0x01, 0x00], // {3: 0, 1: 0}: any key order
            &[0xA0],
        ];
        for b in ok {
            assert_eq!(check_item(b), Ok(()), "{b:02x?}");
        }
        let bad: &[(&[u8], &str)] = &[
            (&[0x18, 0x17], "longer"),                 // 23 in two bytes
            (&[0x19, 0x00, 0xff], "longer"),           // 255 in three
            (&[0x5F, 0x41, 0x00, 0xFF], "indefinite"), // chunked bstr
            (&[0x9F, 0xFF], "indefinite"),
            (&[0x62, 0xff, 0xfe], "UTF-8"),
            (&[0xA2, 0x01, 0x00, 0x01, 0x01], "repeated key"),
            (&[0xC1, 0x00], "tag"),
            (&[0xF5], "simple"),
            (&[0xF9, 0x3C, 0x00], "floating"),
            (&[0x1C], "reserved"),
            (&[0x43, 1, 2], "truncated"),
            (&[0x9B, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff], "truncated"),
            (&[0x01, 0x01], "after"),
        ];
        for (b, why) in bad {
            let err = check_item(b).expect_err("refused");
            assert!(err.contains(why), "{b:02x?}: {err}");
        }
    }

    #[test]
    fn deep_nesting_is_refused_without_recursing_far() {
        let deep = vec![0x81u8; 100_000];
        assert_eq!(check_item(&deep), Err("CBOR nested too deep"));
    }
}
