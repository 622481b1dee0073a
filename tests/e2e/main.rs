//! End-to-end tests: the real `mqtt-notary` binary, Debian's mosquitto
//! clients, real SQLite files. One test binary; modules by theme.

mod access;
mod acl;
mod anchoring;
mod bad_input;
mod cli;
mod compose;
mod conformance;
mod devices;
mod durability;
mod evm;
mod listener;
mod notarize;
mod resilience;
mod restart;
mod retention;
mod sidecar;
mod support;
mod tamper;
