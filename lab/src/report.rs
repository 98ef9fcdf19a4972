//! The result of one `httpload` run, as printed by `httpload --json` and read back by the harness.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Latency percentiles of the completed requests, in microseconds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Latency {
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// Slowest.
    pub max: u64,
}

/// Summary of one `httpload` run (`--json` prints exactly this as one line).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LoadReport {
    /// `IP:PORT` that was loaded.
    pub target: String,
    /// `close` or `keepalive`.
    pub mode: String,
    /// Requests asked for (`--requests`).
    pub requests: u64,
    /// Requests answered with a 2xx status and a complete body.
    pub ok: u64,
    /// `requests - ok`: errors, non-2xx answers and requests never started (deadline).
    pub failed: u64,
    /// Requests not started because the whole-run deadline (`--timeout-s`) passed.
    pub not_started: u64,
    /// Wall time of the run in milliseconds.
    pub elapsed_ms: u64,
    /// `ok` per second of wall time.
    pub rps: f64,
    /// TCP connections opened (attempts included).
    pub connections_opened: u64,
    /// Requests retried once on a fresh connection because a reused one was closed by the server.
    pub retries: u64,
    /// Request bytes written (heads and bodies).
    pub bytes_sent: u64,
    /// Response body bytes read.
    pub body_bytes_received: u64,
    /// Count per response status code (as text, e.g. `"200"`).
    pub status: BTreeMap<String, u64>,
    /// Count per error kind (`connect_timeout`, `connect_refused`, `read_timeout`, `eof`, `reset`,
    /// `invalid`, `io`, `not_started`, ...).
    pub errors: BTreeMap<String, u64>,
    /// The first few error messages, for humans.
    pub error_samples: Vec<String>,
    /// Latency of the successful requests.
    pub latency_us: Latency,
    /// Path of request 0 (the others follow [`crate::http::load_path`]).
    pub first_path: String,
    /// Path of the last request.
    pub last_path: String,
    /// POST body length (`--post-bytes`), 0 for GET runs.
    pub body_len: u64,
    /// Lower-case hex SHA-256 of the POST body, empty for GET runs.
    pub body_sha256: String,
}

impl LoadReport {
    /// The one-line human summary: `requests=N ok=K failed=F elapsed_ms=... rps=...`.
    pub fn summary_line(&self) -> String {
        format!(
            "requests={} ok={} failed={} elapsed_ms={} rps={:.1}",
            self.requests, self.ok, self.failed, self.elapsed_ms, self.rps
        )
    }

    /// Whether every request succeeded (the exit status of `httpload` is 0 exactly then).
    pub fn all_ok(&self) -> bool {
        self.ok == self.requests && self.failed == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trip_and_summary() {
        let mut r = LoadReport {
            target: "10.77.0.20:80".into(),
            requests: 3,
            ok: 2,
            failed: 1,
            elapsed_ms: 10,
            rps: 200.0,
            ..Default::default()
        };
        r.errors.insert("read_timeout".into(), 1);
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<LoadReport>(&text).unwrap(), r);
        assert_eq!(
            r.summary_line(),
            "requests=3 ok=2 failed=1 elapsed_ms=10 rps=200.0"
        );
        assert!(!r.all_ok());
    }
}
