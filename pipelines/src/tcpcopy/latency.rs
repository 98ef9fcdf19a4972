//! Per-worker latency histograms (hdrhistogram, microseconds): capture to transmit of every
//! accepted packet, and per request the reply latency (request sent to first reply byte).

use hdrhistogram::Histogram;
use std::fmt::Write as _;
use std::time::Duration;

/// Largest latency recorded (larger values are clamped): one minute.
const MAX_US: u64 = 60_000_000;

/// The histograms of one worker, or of several merged.
#[derive(Debug, Clone)]
pub struct Latency {
    /// Capture (kernel timestamp) to transmit, per accepted packet.
    pub capture_to_tx: Histogram<u64>,
    /// Request sent to the first reply byte, per request.
    pub reply: Histogram<u64>,
}

impl Default for Latency {
    fn default() -> Self {
        Latency::new()
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_US, 3).expect("valid histogram bounds")
}

impl Latency {
    /// Empty histograms.
    pub fn new() -> Latency {
        Latency {
            capture_to_tx: histogram(),
            reply: histogram(),
        }
    }

    /// Records a capture-to-transmit latency.
    #[inline]
    pub fn record_capture_to_tx(&mut self, latency: Duration) {
        let us = (latency.as_micros() as u64).clamp(1, MAX_US);
        let _ = self.capture_to_tx.record(us);
    }

    /// Records a reply latency.
    #[inline]
    pub fn record_reply(&mut self, latency: Duration) {
        let us = (latency.as_micros() as u64).clamp(1, MAX_US);
        let _ = self.reply.record(us);
    }

    /// Adds `other`'s counts to these.
    pub fn merge(&mut self, other: &Latency) {
        let _ = self.capture_to_tx.add(&other.capture_to_tx);
        let _ = self.reply.add(&other.reply);
    }

    /// `capture->tx p50 .. p90 .. p99 .. p99.9 .. max ..us (n) | reply ...`.
    pub fn summary(&self) -> String {
        let mut line = String::new();
        for (name, h) in [("capture->tx", &self.capture_to_tx), ("reply", &self.reply)] {
            if !line.is_empty() {
                line.push_str(" | ");
            }
            let _ = write!(
                line,
                "{name} p50 {} p90 {} p99 {} p99.9 {} max {} us (n {})",
                h.value_at_quantile(0.5),
                h.value_at_quantile(0.9),
                h.value_at_quantile(0.99),
                h.value_at_quantile(0.999),
                h.max(),
                h.len()
            );
        }
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_merges_and_summarises() {
        let mut a = Latency::new();
        let mut b = Latency::new();
        for us in 1..=100u64 {
            a.record_capture_to_tx(Duration::from_micros(us));
        }
        b.record_capture_to_tx(Duration::from_secs(3600));
        b.record_reply(Duration::from_millis(2));
        a.merge(&b);
        assert_eq!(a.capture_to_tx.len(), 101);
        assert_eq!(
            a.capture_to_tx.max(),
            a.capture_to_tx.highest_equivalent(MAX_US)
        );
        assert_eq!(a.reply.len(), 1);
        let s = a.summary();
        assert!(s.starts_with("capture->tx p50 51 p90 91 p99 100 "), "{s}");
        assert!(s.contains("reply p50 2000"), "{s}");
    }
}
