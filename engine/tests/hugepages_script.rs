//! `scripts/hugepages.sh`: reserve, status and release round-trip and leave the machine as it
//! was (the 2 MiB page count, the hugetlbfs mounts, no state or mount folder left); refusals
//! are clear and change nothing.
//!
//! Each test uses its own state folder and mount point (`HUGEPAGES_STATE_DIR`,
//! `HUGEPAGES_MOUNT`), so a reservation made for the whole test run (scripts/test.sh) is never
//! touched; reservations ask for the current count plus a few pages, so the page count really
//! changes. Needs root; without it the tests print a note and pass, unless `CI=true`, where
//! they fail.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::Mutex;

static SERIAL: Mutex<()> = Mutex::new(());

const NR_2M: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages";

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn can_run(test: &str) -> bool {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    if is_root() {
        return true;
    }
    assert!(!ci, "{test}: hugepages.sh tests need root under CI=true");
    eprintln!("note: skipping {test}: needs root");
    false
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .join("scripts/hugepages.sh")
}

/// A private state folder and mount point for one test.
struct Private {
    state_dir: PathBuf,
    mount: PathBuf,
}

impl Private {
    fn new(tag: &str) -> Private {
        let pid = std::process::id();
        Private {
            state_dir: PathBuf::from(format!("/run/tcpcopy-hugepages-t{tag}{pid}")),
            mount: PathBuf::from(format!("/dev/hugepages-tcpcopy-t{tag}{pid}")),
        }
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new("bash")
            .arg(script())
            .args(args)
            .env("HUGEPAGES_STATE_DIR", &self.state_dir)
            .env("HUGEPAGES_MOUNT", &self.mount)
            .output()
            .expect("run hugepages.sh")
    }
}

impl Drop for Private {
    fn drop(&mut self) {
        // Whatever a failed assertion left behind.
        let _ = self.run(&["release"]);
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn nr_2m() -> u64 {
    std::fs::read_to_string(NR_2M)
        .expect("read nr_hugepages")
        .trim()
        .parse()
        .expect("nr_hugepages")
}

fn hugetlbfs_mounts() -> Vec<String> {
    std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.split_whitespace().nth(2) == Some("hugetlbfs"))
        .map(str::to_owned)
        .collect()
}

fn mem_available_pages() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .expect("MemAvailable")
        / 2048
}

#[test]
fn reserve_status_release_round_trip() {
    if !can_run("reserve_status_release_round_trip") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let private = Private::new("rt");
    let nr_before = nr_2m();
    let mounts_before = hugetlbfs_mounts();
    let want = nr_before + 8;

    let out = private.run(&["reserve", &want.to_string()]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(nr_2m(), want);
    let mount = private.mount.to_string_lossy().into_owned();
    assert!(
        hugetlbfs_mounts()
            .iter()
            .any(|m| m.split_whitespace().nth(1) == Some(&mount)),
        "{mount} mounted"
    );
    let state = std::fs::read_to_string(private.state_dir.join("state")).expect("state file");

    // Idempotent: the same reservation again changes nothing and records nothing new.
    let again = private.run(&["reserve", &want.to_string()]);
    assert!(again.status.success(), "{}", text(&again));
    assert!(text(&again).contains("unchanged"), "{}", text(&again));
    assert!(text(&again).contains("already mounted"), "{}", text(&again));
    assert_eq!(nr_2m(), want);
    assert_eq!(
        std::fs::read_to_string(private.state_dir.join("state")).unwrap(),
        state
    );

    let status = private.run(&["status"]);
    assert!(status.status.success(), "{}", text(&status));
    let status = text(&status);
    assert!(
        status.contains(&format!("2048 kB pages: total {want}")),
        "{status}"
    );
    assert!(
        status.contains(&format!("hugetlbfs mounted at {mount}")),
        "{status}"
    );
    assert!(
        status.contains(&format!("nr {NR_2M} {nr_before}")),
        "{status}"
    );

    let out = private.run(&["release"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(nr_2m(), nr_before, "page count restored");
    assert_eq!(hugetlbfs_mounts(), mounts_before, "mounts as before");
    assert!(!private.mount.exists(), "mount folder removed");
    assert!(!private.state_dir.exists(), "state folder removed");

    // Releasing twice is harmless.
    let out = private.run(&["release"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("nothing to release"), "{}", text(&out));
}

/// Per-node reservations round-trip on NUMA node 0. A machine without per-node counters for
/// node 0 tests what it can instead: `--node 0` is refused there (exit 2, named) and changes
/// nothing, and `status` reports the global 2 MiB count and no node. Either way a node that
/// does not exist is refused.
#[test]
fn per_node_reservation_round_trips() {
    if !can_run("per_node_reservation_round_trips") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let node_nr = "/sys/devices/system/node/node0/hugepages/hugepages-2048kB/nr_hugepages";
    let private = Private::new("node");
    let Ok(before) = std::fs::read_to_string(node_nr) else {
        eprintln!("note: no NUMA node 0 hugepage counters here; testing the refusal instead");
        assert_node_refused(&private, 0);
        let status = private.run(&["status"]);
        assert!(status.status.success(), "{}", text(&status));
        let status = text(&status);
        assert!(
            status.contains(&format!("2048 kB pages: total {}", nr_2m())),
            "{status}"
        );
        assert!(!status.contains("node 0:"), "{status}");
        assert_node_refused(&private, 4096);
        return;
    };
    let before: u64 = before.trim().parse().unwrap();
    let mounts_before = hugetlbfs_mounts();
    let out = private.run(&["reserve", &(before + 4).to_string(), "--node", "0"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("on node 0"), "{}", text(&out));
    let now: u64 = std::fs::read_to_string(node_nr)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(now, before + 4);
    let status = private.run(&["status"]);
    assert!(
        text(&status).contains(&format!("node 0: total {now}")),
        "{}",
        text(&status)
    );
    let out = private.run(&["release"]);
    assert!(out.status.success(), "{}", text(&out));
    let after: u64 = std::fs::read_to_string(node_nr)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(after, before);
    assert_eq!(hugetlbfs_mounts(), mounts_before);

    assert_node_refused(&private, 4096);
}

/// `reserve 4 --node NODE` exits 2 naming the problem (no such node, or no 2 MiB counter on
/// it) and changes nothing: page count, mounts, state folder.
fn assert_node_refused(private: &Private, node: u32) {
    let (nr_before, mounts_before) = (nr_2m(), hugetlbfs_mounts());
    let out = private.run(&["reserve", "4", "--node", &node.to_string()]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let why = if std::path::Path::new(&format!("/sys/devices/system/node/node{node}")).exists() {
        "pages are not supported".to_string()
    } else {
        format!("NUMA node {node} does not exist")
    };
    assert!(text(&out).contains(&why), "{}", text(&out));
    assert_eq!(nr_2m(), nr_before);
    assert_eq!(hugetlbfs_mounts(), mounts_before);
    assert!(!private.state_dir.exists());
}

#[test]
fn refusals_are_clear_and_change_nothing() {
    if !can_run("refusals_are_clear_and_change_nothing") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let private = Private::new("no");
    let nr_before = nr_2m();
    let mounts_before = hugetlbfs_mounts();

    // More than the machine has.
    let too_many = nr_before + mem_available_pages() + 1000;
    let out = private.run(&["reserve", &too_many.to_string()]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("not enough memory"), "{}", text(&out));
    assert!(text(&out).contains("MemAvailable"), "{}", text(&out));

    // Nonsense arguments.
    for args in [
        &["reserve"][..],
        &["reserve", "0"],
        &["reserve", "8", "--size", "3M"],
        &["frobnicate"],
    ] {
        let out = private.run(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
    }

    // Not root: a copy of the script run as nobody.
    let copy = std::env::temp_dir().join(format!("hugepages-{}.sh", std::process::id()));
    std::fs::copy(script(), &copy).unwrap();
    let has_setpriv = Command::new("setpriv").arg("--version").output().is_ok();
    if has_setpriv {
        let out = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "bash"])
            .arg(&copy)
            .args(["reserve", "8"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{}", text(&out));
        assert!(text(&out).contains("must run as root"), "{}", text(&out));
    } else {
        assert!(
            std::env::var("CI").map_or(true, |v| v != "true"),
            "setpriv missing (util-linux) under CI=true: the not-root refusal cannot be tested"
        );
        eprintln!("note: setpriv missing (util-linux); the not-root refusal is not tested");
    }
    let _ = std::fs::remove_file(&copy);

    assert_eq!(nr_2m(), nr_before);
    assert_eq!(hugetlbfs_mounts(), mounts_before);
    assert!(!private.state_dir.exists());
}
