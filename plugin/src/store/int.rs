//! How the store keeps unsigned 64-bit integers.
//!
//! SQLite integers are signed 64-bit, and rusqlite refuses a `u64` above
//! `i64::MAX` (that refusal once wedged ingest on a device counter of
//! 2^63). Every `u64` column therefore holds the `i64` with the same 64
//! bits (two's complement): 0 ..= 2^63 − 1 are stored as themselves,
//! 2^63 ..= 2^64 − 1 as negative numbers, and reading casts back, so every
//! value round-trips exactly.
//!
//! The columns SQL orders or compares — sequence numbers, batch numbers,
//! first sequence numbers, sizes — are assigned by the broker, one per
//! message or batch, and stay below 2^63, where the two orders agree.
//! Counters and times that devices choose are only ever compared in Rust.
//! A range bound for those ordered columns goes through [`bound`], which
//! clamps instead of wrapping, so "up to u64::MAX" still means "all".

use rusqlite::types::{FromSql, FromSqlResult, ToSql, ToSqlOutput, ValueRef};

/// A `u64` as the store writes and reads it (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct U64(pub u64);

impl ToSql for U64 {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::from(self.0 as i64))
    }
}

impl FromSql for U64 {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        i64::column_result(value).map(|v| U64(v as u64))
    }
}

/// A bound on an ordered column (see the module docs): clamped to
/// `i64::MAX`.
pub fn bound(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}
