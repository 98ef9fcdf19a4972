//! The tcpcopy-rs packet engine.
//!
//! Everything a replication pipeline is built from, with no CLI and no configuration format:
//! zero-copy header views ([`wire`]), packet sources and sinks ([`port`]), flow keys and
//! sharding ([`flow`]), the sans-IO TCP replay state machine and its table ([`session`]), and the
//! tcpcopy/intercept control channel ([`control`]).
#![deny(unsafe_code)]

pub mod control;
pub mod flow;
pub mod port;
pub mod session;
pub mod wire;
