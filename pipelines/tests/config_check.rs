//! YAML configuration files (`--config FILE`) and `--check`: every example in conf/ passes,
//! flags override keys, errors name the YAML path, and `--check` opens nothing (no root needed).

use std::path::{Path, PathBuf};
use std::process::Command;

const TCPCOPY: &str = env!("CARGO_BIN_EXE_tcpcopy");
const INTERCEPT: &str = env!("CARGO_BIN_EXE_intercept");

/// Runs `bin` with `args`: exit code, stdout, stderr.
fn run(bin: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin).args(args).output().expect("binary runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn conf_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../conf")
}

/// The YAML examples of conf/ with the binary that reads each.
fn examples() -> Vec<(PathBuf, &'static str)> {
    let mut files: Vec<(PathBuf, &'static str)> = std::fs::read_dir(conf_dir())
        .expect("conf/ exists")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            let bin = if name.starts_with("intercept") {
                INTERCEPT
            } else {
                TCPCOPY
            };
            (p, bin)
        })
        .collect();
    files.sort();
    files
}

fn temp_file(name: &str, text: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("{name}-{}.yaml", std::process::id()));
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn every_example_in_conf_passes_check() {
    let files = examples();
    assert!(files.len() >= 4, "conf/ examples: {files:?}");
    for (path, bin) in files {
        let path = path.to_str().unwrap();
        let (code, out, err) = run(bin, &["--config", path, "--check"]);
        assert_eq!(code, 0, "{path}: {err}");
        assert!(
            out.contains("# pipeline\n# worker 0: capture "),
            "{path}: {out}"
        );
        assert!(
            !out.contains("flags without a config key"),
            "a flag has no YAML key: {out}"
        );
        // The report is itself a configuration: fed back, it gives the same report.
        let again = temp_file("config-check-again", &out);
        let (code, out2, err) = run(bin, &["--config", again.to_str().unwrap(), "--check"]);
        let _ = std::fs::remove_file(&again);
        assert_eq!(code, 0, "{path} (report fed back): {err}");
        assert_eq!(out, out2, "{path}: the report is not a fixed point");
    }
}

#[test]
fn flags_override_the_file() {
    let onhost = conf_dir().join("tcpcopy-onhost.yaml");
    let onhost = onhost.to_str().unwrap();
    let (code, out, err) = run(TCPCOPY, &["--config", onhost, "--check"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("  timeout: 600\n"), "{out}");
    assert!(out.contains("  count: 2\n"), "{out}");
    let (code, out, err) = run(
        TCPCOPY,
        &[
            "--config",
            onhost,
            "--check",
            "-t",
            "30",
            "--workers",
            "1",
            "-x",
            "81-10.0.0.31:81",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("  timeout: 30\n"), "{out}");
    assert!(
        out.contains("- online: 81\n  target: 10.0.0.31:81\n"),
        "{out}"
    );
    assert!(!out.contains("# worker 1:"), "{out}");
    // A port chosen on the command line replaces the file's: --pcap instead of ports.afpacket,
    // and -a (which needs --pcap) works with the file's ports.pcap.
    let (code, out, err) = run(
        TCPCOPY,
        &[
            "--config",
            onhost,
            "--check",
            "--workers",
            "1",
            "--pcap",
            "x.pcap",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("capture pcap file x.pcap"), "{out}");
    assert!(!out.contains("afpacket"), "{out}");
    let offline = conf_dir().join("tcpcopy-offline.yaml");
    let (code, out, err) = run(
        TCPCOPY,
        &["--config", offline.to_str().unwrap(), "--check", "-a", "8"],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("acceleration: 8.0"), "{out}");
    let intercept = conf_dir().join("intercept.yaml");
    let (code, out, err) = run(
        INTERCEPT,
        &[
            "--config",
            intercept.to_str().unwrap(),
            "--check",
            "-F",
            "tcp and src port 9",
            "-p",
            "4000",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("filter: tcp and src port 9\n"), "{out}");
    assert!(out.contains("listen 0.0.0.0:4000"), "{out}");
}

#[test]
fn errors_name_the_yaml_path() {
    let cases: [(&str, &str, &[&str]); 5] = [
        (
            "transfers: 80-10.0.0.30:8080\ncontrol: {intercepts: [10.0.0.40]}\nsession:\n  timout: 5\n",
            TCPCOPY,
            &["session: unknown field `timout`", "line 4 column 3"],
        ),
        (
            "transfers: 80-10.0.0.30:8080\ncontrol:\n  connections: 40\n",
            TCPCOPY,
            &["bad control.connections value '40'", "from 1 to 16"],
        ),
        (
            "transfers:\n  - {online: 80, target: 10.0.0.300:8080}\n",
            TCPCOPY,
            &["bad transfers[0] value '80-10.0.0.300:8080'", "[onlineIP:]onlinePort"],
        ),
        (
            "ports:\n  filter: x\ncontrol:\n  bind: 10.0.0\n",
            INTERCEPT,
            &["control.bind: invalid IPv4 address syntax", "line 4 column 9"],
        ),
        (
            "ports: {filter: x}\nworkers: {count: 0}\n",
            INTERCEPT,
            &["bad workers.count value '0'"],
        ),
    ];
    for (text, bin, wanted) in cases {
        let path = temp_file("config-check-bad", text);
        let (code, out, err) = run(bin, &["--config", path.to_str().unwrap(), "--check"]);
        let _ = std::fs::remove_file(&path);
        assert_ne!(code, 0, "{text}: {out}");
        assert!(err.contains("config file "), "{err}");
        for w in wanted {
            assert!(err.contains(w), "{text}: wanted {w:?} in {err}");
        }
    }
}

#[test]
fn required_flags_keep_their_errors() {
    // Neither flag nor key: the same messages as without a file.
    let (code, _, plain) = run(TCPCOPY, &["-i", "lo", "-s", "10.0.0.40", "--check"]);
    assert_ne!(code, 0);
    assert!(plain.contains("-x <TRANSFERS>"), "{plain}");
    let empty = temp_file("config-check-empty", "session: {timeout: 5}\n");
    let empty = empty.to_str().unwrap().to_string();
    let (code, _, err) = run(
        TCPCOPY,
        &["--config", &empty, "-i", "lo", "-s", "10.0.0.40", "--check"],
    );
    assert_ne!(code, 0);
    assert!(err.contains("-x <TRANSFERS>"), "{err}");
    let (code, _, err) = run(
        TCPCOPY,
        &[
            "--config",
            &empty,
            "-i",
            "lo",
            "-x",
            "80-10.0.0.30:80",
            "--check",
        ],
    );
    assert_ne!(code, 0);
    assert!(err.contains("tcpcopy needs -s SERVERS"), "{err}");
    let (code, _, err) = run(INTERCEPT, &["--config", &empty, "--check"]);
    assert_ne!(code, 0);
    assert!(err.contains("unknown field `session`"), "{err}");
    let _ = std::fs::remove_file(&empty);
    // A flag error is reported as before, with the file in use.
    let onhost = conf_dir().join("tcpcopy-onhost.yaml");
    let (code, _, err) = run(
        TCPCOPY,
        &["--config", onhost.to_str().unwrap(), "--check", "-C", "40"],
    );
    assert_ne!(code, 0);
    assert!(err.contains("bad -C value 40"), "{err}");
}

#[test]
fn check_opens_no_socket() {
    // The metrics address is taken: a run would fail to bind it, --check does not try.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let onhost = conf_dir().join("tcpcopy-onhost.yaml");
    let (code, out, err) = run(
        TCPCOPY,
        &[
            "--config",
            onhost.to_str().unwrap(),
            "--check",
            "--metrics-listen",
            &addr,
            "-i",
            "no-such-interface0",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&format!("listen: {addr}")), "{out}");
    assert!(out.contains("capture afpacket no-such-interface0"), "{out}");
}
