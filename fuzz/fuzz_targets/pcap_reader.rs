//! The offline replay's capture reader (pipelines/src/tcpcopy/offline.rs): pcap (both byte
//! orders, µs/ns) and pcapng (sections, interfaces, `if_tsresol`, every packet block), link
//! normalisation (Ethernet, SLL, SLL2, raw IP, loopback) and the user-space filter, driven
//! through the public `OfflineRx` on a virtual clock, as `tcpcopy --pcap` does. The input is the
//! whole file (written to a temporary file: the reader reads a file).
//!
//! No panic; the file is refused at open or replays to the end in bounded steps.
#![no_main]

use engine::port::RxPort;
use libfuzzer_sys::fuzz_target;
use pipelines::tcpcopy::offline::{OfflineConfig, OfflineRx, MAX_ACCELERATION};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

fn path() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        dir.join(format!("tcpcopy-fuzz-pcap-{}.bin", std::process::id()))
    })
}

fuzz_target!(|data: &[u8]| {
    let path = path();
    std::fs::write(path, data).expect("the temporary capture file");
    // The last byte picks the filter, so the filter's verdict is exercised too.
    let filter = if data.last().is_some_and(|b| b & 1 != 0) {
        "tcp and ((dst port 80))"
    } else {
        ""
    };
    let config = OfflineConfig {
        acceleration: MAX_ACCELERATION,
        idle_gap: Some(Duration::from_secs(1)),
        rounds: 2,
        tail: Duration::from_millis(10),
        progress: false,
        ..OfflineConfig::new(path, filter)
    };
    let base = Instant::now();
    let offset = Arc::new(AtomicU64::new(0));
    let clock = {
        let offset = offset.clone();
        Box::new(move || base + Duration::from_nanos(offset.load(Ordering::Relaxed)))
    };
    let Ok(mut port) = OfflineRx::open_with_clock(&config, clock) else {
        return;
    };
    let mut frames = 0u64;
    for _ in 0..100_000 {
        if port.finished() {
            let stats = port.offline_stats();
            assert!(stats.packets <= frames);
            let _ = port.summary();
            return;
        }
        port.rx_burst(64, &mut |f| {
            assert_eq!(f.wire_len, f.data.len());
            frames += 1;
        })
        .expect("a file replay does not fail");
        port.consumer_idle(true);
        let now = base + Duration::from_nanos(offset.load(Ordering::Relaxed));
        let step = match port.next_due() {
            Some(due) => due
                .saturating_duration_since(now)
                .max(Duration::from_micros(1)),
            None => Duration::from_millis(1),
        };
        offset.fetch_add(
            step.as_nanos().min(u128::from(u64::MAX / 4)) as u64,
            Ordering::Relaxed,
        );
    }
    panic!("the replay of a {}-byte file did not finish", data.len());
});
