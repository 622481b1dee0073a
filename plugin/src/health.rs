//! What `/healthz` reports: every way the pipeline can be stuck, made
//! visible. A stage that fails records the failure here; one that recovers
//! clears it. `/healthz` answers 503 with the reasons while any problem
//! lasts, and `/metrics` carries one gauge per part.
//!
//! Problems:
//! - a pipeline thread (ingest, sealer, EVM anchorer, proof worker) or the
//!   message source stopped while the broker is not shutting down;
//! - ingest has messages queued and has committed nothing for `stall_ms`;
//! - a stage's store writes keep failing for `stall_ms` (a full disk, a
//!   lock held from outside, a damaged file): reported with the error;
//! - the MQTT or HTTP listener cannot accept connections.

use crate::source::now_ms;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

/// The parts whose health is tracked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Part {
    Ingest,
    Sealer,
    Anchor,
    Evm,
    Proofs,
    Retention,
    Index,
    Source,
    MqttListener,
    HttpListener,
}

impl Part {
    pub const ALL: [Part; 10] = [
        Part::Ingest,
        Part::Sealer,
        Part::Anchor,
        Part::Evm,
        Part::Proofs,
        Part::Retention,
        Part::Index,
        Part::Source,
        Part::MqttListener,
        Part::HttpListener,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Part::Ingest => "ingest",
            Part::Sealer => "sealer",
            Part::Anchor => "anchor",
            Part::Evm => "evm",
            Part::Proofs => "proofs",
            Part::Retention => "retention",
            Part::Index => "index",
            Part::Source => "source",
            Part::MqttListener => "mqtt_listener",
            Part::HttpListener => "http_listener",
        }
    }
}

#[derive(Debug, Clone)]
struct Failure {
    since_ms: u64,
    error: String,
    /// The part stopped for good (a thread ended); not a passing failure.
    stopped: bool,
}

/// Shared by the pipeline's stages and the HTTP API.
#[derive(Debug)]
pub struct Health {
    stall_ms: AtomicU64,
    stopping: AtomicBool,
    failures: Mutex<BTreeMap<Part, Failure>>,
    /// When ingest last committed, or last found its queue empty.
    ingest_progress_ms: AtomicU64,
}

impl Default for Health {
    fn default() -> Self {
        Health::new(10_000)
    }
}

impl Health {
    /// `stall_ms`: how long a failure or a stalled queue lasts before it
    /// turns `/healthz` to 503.
    pub fn new(stall_ms: u64) -> Self {
        Health {
            stall_ms: AtomicU64::new(stall_ms),
            stopping: AtomicBool::new(false),
            failures: Mutex::new(BTreeMap::new()),
            ingest_progress_ms: AtomicU64::new(now_ms()),
        }
    }

    pub fn stall_ms(&self) -> u64 {
        self.stall_ms.load(Relaxed)
    }

    pub fn set_stall_ms(&self, ms: u64) {
        self.stall_ms.store(ms, Relaxed);
    }

    fn with<T>(&self, f: impl FnOnce(&mut BTreeMap<Part, Failure>) -> T) -> T {
        let mut g = self.failures.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut g)
    }

    /// Records a failure of `part`; the first one's time is kept, so a
    /// failure that keeps recurring shows how long it has lasted.
    pub fn failing(&self, part: Part, error: impl std::fmt::Display) {
        let error = error.to_string();
        self.with(|m| {
            let since_ms = m.get(&part).map_or_else(now_ms, |f| f.since_ms);
            let stopped = m.get(&part).is_some_and(|f| f.stopped);
            m.insert(part, Failure { since_ms, error, stopped });
        });
    }

    /// `part` works again.
    pub fn recovered(&self, part: Part) {
        self.with(|m| {
            if m.get(&part).is_some_and(|f| !f.stopped) {
                m.remove(&part);
            }
        });
    }

    /// `part` stopped for good: reported at once, until the process ends.
    pub fn stopped(&self, part: Part, why: impl std::fmt::Display) {
        if self.is_stopping() {
            return;
        }
        let error = why.to_string();
        tracing::error!(part = part.as_str(), %error, "pipeline part stopped");
        self.with(|m| m.insert(part, Failure { since_ms: now_ms(), error, stopped: true }));
    }

    /// Ingest committed, or found nothing to do.
    pub fn ingest_progress(&self) {
        self.ingest_progress_ms.store(now_ms(), Relaxed);
    }

    /// The broker is shutting down: parts that end now are not failures.
    pub fn set_stopping(&self) {
        self.stopping.store(true, Relaxed);
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Relaxed)
    }

    /// Every current problem, as (part, description); empty when healthy.
    /// `queue_depth` is the ingest queue's length now.
    pub fn problems(&self, queue_depth: i64) -> Vec<(Part, String)> {
        let now = now_ms();
        let stall_ms = self.stall_ms();
        let mut out: Vec<(Part, String)> = self.with(|m| {
            m.iter()
                .filter(|(_, f)| f.stopped || now.saturating_sub(f.since_ms) >= stall_ms)
                .map(|(p, f)| {
                    let what = if f.stopped {
                        format!("stopped: {}", f.error)
                    } else {
                        format!("failing for {} ms: {}", now.saturating_sub(f.since_ms), f.error)
                    };
                    (*p, what)
                })
                .collect()
        });
        let idle = now.saturating_sub(self.ingest_progress_ms.load(Relaxed));
        if queue_depth > 0 && idle >= stall_ms && !out.iter().any(|(p, _)| *p == Part::Ingest) {
            // A commit failure too recent to count alone still says why.
            let cause =
                self.with(|m| m.get(&Part::Ingest).map(|f| format!("; commits failing: {}", f.error)));
            out.push((
                Part::Ingest,
                format!(
                    "{queue_depth} messages queued and nothing committed for {idle} ms{}",
                    cause.unwrap_or_default()
                ),
            ));
        }
        out.sort_by_key(|(p, _)| *p);
        out
    }
}

/// Reports `part` stopped when dropped, unless the broker is shutting down:
/// held by a thread for its whole life, so a return or a panic is seen.
pub struct StopGuard {
    pub metrics: std::sync::Arc<crate::metrics::Metrics>,
    pub part: Part,
}

impl Drop for StopGuard {
    fn drop(&mut self) {
        let why = if std::thread::panicking() { "the thread panicked" } else { "the thread ended" };
        self.metrics.health.stopped(self.part, why);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_count_once_they_last_and_stops_at_once() {
        let h = Health::new(0);
        assert!(h.problems(0).is_empty());
        h.failing(Part::Sealer, "disk I/O error");
        assert_eq!(h.problems(0).len(), 1);
        h.recovered(Part::Sealer);
        assert!(h.problems(0).is_empty());
        h.stopped(Part::Evm, "the thread ended");
        h.recovered(Part::Evm);
        assert_eq!(h.problems(0)[0].0, Part::Evm, "a stopped part stays reported");

        let slow = Health::new(60_000);
        slow.failing(Part::Ingest, "database is locked");
        assert!(slow.problems(5).is_empty(), "a failure shorter than stall_ms is not a problem yet");
    }

    #[test]
    fn parts_ending_during_shutdown_are_not_problems() {
        let h = Health::new(0);
        h.set_stopping();
        h.stopped(Part::Sealer, "the thread ended");
        assert!(h.problems(0).is_empty());
    }

    #[test]
    fn a_stall_names_the_commit_failure_behind_it() {
        let h = Health::new(60_000);
        h.ingest_progress_ms.store(now_ms() - 120_000, Relaxed);
        h.failing(Part::Ingest, "database or disk is full");
        let p = h.problems(1);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].1.contains("nothing committed") && p[0].1.contains("disk is full"), "{p:?}");
    }

    #[test]
    fn a_queue_without_commits_is_a_stall() {
        let h = Health::new(0);
        assert_eq!(h.problems(3)[0].0, Part::Ingest);
        assert!(h.problems(0).is_empty(), "an empty queue is idle, not stalled");
    }
}
