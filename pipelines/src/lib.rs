//! The tcpcopy and intercept pipelines, assembled from engine parts, and what their command
//! lines share. The binaries in `src/bin/` only parse flags into these configurations.

pub mod cli;
pub mod compat;
pub mod config;
pub mod doctor;
pub mod intercept;
pub mod metrics;
pub mod ports;
pub mod tcpcopy;
pub mod udpcopy;
