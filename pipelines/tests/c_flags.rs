//! Every flag of the C tools (../shared/tcpcopy-spec.md §1.1 and §1.2) has an answer: it
//! works as in the C tool, or it is accepted with a warning that names what replaces it, or it
//! is refused with a message that says why and what to use (the README's C-flag table).
//!
//! Each case runs the real binary with `--check` (flags checked, the pipeline printed, no socket
//! opened, no root needed) and checks the exit status, the warning or error, and the pipeline.
//! The last test feeds every numeric flag extreme values: no value may make either tool panic.

use std::process::Command;

const TCPCOPY: &str = env!("CARGO_BIN_EXE_tcpcopy");
const INTERCEPT: &str = env!("CARGO_BIN_EXE_intercept");

/// The C usage note's minimal tcpcopy line, in lab addresses.
const BASE: [&str; 4] = ["-x", "80-10.77.0.30:8080", "-s", "10.77.0.40"];

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn run(bin: &str, args: &[&str]) -> Run {
    let out = Command::new(bin).args(args).output().expect("binary runs");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// tcpcopy with the base line, `extra` and `--check`.
fn tcpcopy(extra: &[&str]) -> Run {
    let mut args: Vec<&str> = BASE.to_vec();
    args.extend_from_slice(extra);
    args.push("--check");
    run(TCPCOPY, &args)
}

/// intercept with `-F`, `extra` and `--check`.
fn intercept(extra: &[&str]) -> Run {
    let mut args = vec!["-F", "tcp and src port 8080"];
    args.extend_from_slice(extra);
    args.push("--check");
    run(INTERCEPT, &args)
}

/// A pcap file with its global header only (Ethernet, microseconds).
fn empty_pcap() -> Vec<u8> {
    let mut pcap = 0xa1b2_c3d4u32.to_le_bytes().to_vec();
    pcap.extend_from_slice(&[2, 0, 4, 0]);
    for word in [0u32, 0, 65535, 1] {
        pcap.extend_from_slice(&word.to_le_bytes());
    }
    pcap
}

fn accepted(r: &Run, what: &str) {
    assert_eq!(r.code, 0, "{what}: not accepted\n{}{}", r.stdout, r.stderr);
}

fn accepted_with_warning(r: &Run, what: &str, warning: &str) {
    accepted(r, what);
    assert!(
        r.stderr.contains("warning: ") && r.stderr.contains(warning),
        "{what}: no warning naming '{warning}':\n{}",
        r.stderr
    );
}

fn refused(r: &Run, what: &str, reason: &str) {
    assert_eq!(r.code, 2, "{what}: not refused\n{}{}", r.stdout, r.stderr);
    assert!(
        r.stderr.contains(reason),
        "{what}: the message lacks '{reason}':\n{}",
        r.stderr
    );
    assert!(!r.stderr.contains("panicked"), "{what}: {}", r.stderr);
}

fn pipeline_line<'a>(r: &'a Run, prefix: &str) -> &'a str {
    r.stdout
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no '{prefix}' line:\n{}", r.stdout))
}

#[test]
fn the_usage_notes_lines_run_without_i() {
    // intercept -i eth0 -F 'tcp and src port 11511' -d / tcpcopy -x 11311-10.100.10.31:11511 -s 10.100.10.32 -d
    let r = run(
        TCPCOPY,
        &[
            "-x",
            "11311-10.100.10.31:11511",
            "-s",
            "10.100.10.32",
            "-d",
            "--check",
        ],
    );
    accepted(&r, "the usage note's tcpcopy line");
    let worker = pipeline_line(&r, "# worker 0:");
    assert!(
        worker.contains("capture afpacket any filter \"tcp and ((dst port 11311))\""),
        "{worker}"
    );
    let r = run(
        INTERCEPT,
        &[
            "-i",
            "eth0",
            "-F",
            "tcp and src port 11511",
            "-d",
            "--check",
        ],
    );
    accepted(&r, "the usage note's intercept line");
    assert!(pipeline_line(&r, "# worker 0:").contains("capture afpacket eth0"));
    // intercept without -i captures everywhere too.
    let r = intercept(&[]);
    accepted(&r, "intercept without -i");
    assert!(pipeline_line(&r, "# worker 0:").contains("capture afpacket any"));
}

#[test]
fn tcpcopy_capture_flags() {
    // -i: one interface, a list, any.
    for (i, shown) in [("eth0", "eth0"), ("eth0,eth1", "eth0,eth1"), ("any", "any")] {
        let r = tcpcopy(&["-i", i]);
        accepted(&r, "-i");
        assert!(
            pipeline_line(&r, "# worker 0:").contains(&format!("capture afpacket {shown} ")),
            "-i {i}: {}",
            r.stdout
        );
    }
    // -i FILE: the C --offline build's form, with its -a -I -T.
    let dir = std::env::temp_dir().join(format!("c-flags-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("empty.pcap");
    let pcap = empty_pcap();
    std::fs::write(&file, &pcap).unwrap();
    let path = file.to_str().unwrap();
    let r = tcpcopy(&["-i", path, "-a", "2", "-I", "1000", "-T", "3"]);
    accepted(&r, "-i FILE -a -I -T");
    assert!(pipeline_line(&r, "# worker 0:").contains(&format!("capture pcap file {path}")));
    let pcap_line = pipeline_line(&r, "# pcap:");
    assert!(
        pcap_line.contains("acceleration 2") && pcap_line.contains("3 round(s)"),
        "{pcap_line}"
    );
    // -T 0 is one round, as in the C tool (<1 -> 1).
    let r = tcpcopy(&["-i", path, "-T", "0"]);
    accepted(&r, "-T 0");
    assert!(pipeline_line(&r, "# pcap:").contains("1 round(s)"));
    std::fs::remove_dir_all(&dir).unwrap();
    // -a, -I, -T without a file: refused with the fix.
    for flag in ["-a", "-I", "-T"] {
        let r = tcpcopy(&[flag, "2"]);
        refused(
            &r,
            flag,
            "goes with a capture file to replay: add --pcap FILE (or -i FILE",
        );
    }
    // -F, -B.
    let r = tcpcopy(&["-F", "tcp and dst port 81", "-B", "16"]);
    accepted(&r, "-F -B");
    assert!(pipeline_line(&r, "# worker 0:").contains("filter \"tcp and dst port 81\""));
    refused(&tcpcopy(&["-B", "0"]), "-B 0", "bad -B value 0");
    refused(&tcpcopy(&["-B", "5000"]), "-B 5000", "must be 1..=4096");
    // -S: whole frames are kept.
    accepted_with_warning(
        &tcpcopy(&["-S", "1500"]),
        "-S",
        "-S 1500 ignored: tcpcopy captures whole frames",
    );
}

#[test]
fn tcpcopy_transmit_and_address_flags() {
    // -o: out of one interface.
    let r = tcpcopy(&["-o", "eth1"]);
    accepted(&r, "-o");
    assert!(pipeline_line(&r, "# worker 0:").contains("transmit raw socket out of eth1"));
    // -x with the C --pcap-send MACs: accepted, the MACs set aside with a warning.
    let r = run(
        TCPCOPY,
        &[
            "-x",
            "10.77.0.20:80@02:77:00:00:00:14-10.77.0.30:8080@02:77:00:00:00:1e",
            "-s",
            "10.77.0.40",
            "-o",
            "eth0",
            "--check",
        ],
    );
    accepted_with_warning(&r, "-x with MACs", "the MAC addresses in -x");
    assert!(r.stderr.contains("--next-hop MAC"), "{}", r.stderr);
    assert!(pipeline_line(&r, "# transfers:").contains("10.77.0.20:80-10.77.0.30:8080"));
    let r = run(
        TCPCOPY,
        &[
            "-x",
            "80@02:77-10.77.0.30:8080",
            "-s",
            "10.77.0.40",
            "--check",
        ],
    );
    refused(
        &r,
        "-x with a bad MAC",
        "the online MAC '02:77' is not a MAC address",
    );
    // -c, -H.
    accepted(&tcpcopy(&["-c", "10.9.9.x", "-H", "10.9.9.1"]), "-c -H");
    // -s with ports, -p, -C.
    let r = run(
        TCPCOPY,
        &[
            "-x",
            "80-10.77.0.30:8080",
            "-s",
            "10.77.0.40:5000,10.77.0.41",
            "-p",
            "6000",
            "-C",
            "4",
            "--check",
        ],
    );
    accepted(&r, "-s -p -C");
    let control = pipeline_line(&r, "# control:");
    assert!(
        control.contains("4 connection(s)")
            && control.contains("10.77.0.40:5000")
            && control.contains("10.77.0.41:6000"),
        "{control}"
    );
    accepted_with_warning(&tcpcopy(&["-C", "0"]), "-C 0", "-C 0 means 1 connection");
    refused(&tcpcopy(&["-C", "17"]), "-C 17", "bad -C value 17");
    refused(&tcpcopy(&["-p", "0"]), "-p 0", "bad -p value 0");
}

#[test]
fn tcpcopy_session_flags() {
    for (flags, what) in [
        (
            &["-n", "0"][..],
            "-n 0 (the original only, as the C default)",
        ),
        (&["-n", "3"][..], "-n 3"),
        (&["-f", "2"][..], "-f"),
        (&["-r", "0"][..], "-r 0 (all, as the C default)"),
        (&["-r", "100"][..], "-r 100"),
        (&["-g"][..], "-g"),
        (&["-m", "2048"][..], "-m"),
        (&["-M", "9000"][..], "-M"),
        (&["-D", "1400"][..], "-D"),
        (&["-t", "0"][..], "-t 0 (aggressive, as in the C tool)"),
        (&["-k", "0"][..], "-k 0 (-t + 120, as in the C tool)"),
        (&["-O", "-W", "-L"][..], "-O -W -L"),
        (
            &[
                "-l",
                "/tmp/tcpcopy-c-flags.log",
                "-P",
                "/tmp/tcpcopy-c-flags.pid",
                "-d",
            ][..],
            "-l -P -d",
        ),
    ] {
        accepted(&tcpcopy(flags), what);
    }
    accepted_with_warning(
        &tcpcopy(&["-R", "30"]),
        "-R",
        "-R 30 ignored: it has no effect in the C tcpcopy either",
    );
    accepted_with_warning(
        &tcpcopy(&["-U", "8"]),
        "-U",
        "-U 8 ignored: the session pool sizes itself; cap tcpcopy's memory with -m",
    );
    refused(
        &tcpcopy(&["-f", "32"]),
        "-f 32",
        "the client port space is split in 32 slices",
    );
    refused(&tcpcopy(&["-r", "150"]), "-r 150", "bad -r value 150");
    refused(&tcpcopy(&["-n", "1024"]), "-n 1024", "bad -n value 1024");
    refused(&tcpcopy(&["-M", "100"]), "-M 100", "bad -M value 100");
    refused(&tcpcopy(&["-D", "10"]), "-D 10", "bad -D value 10");
    refused(&tcpcopy(&["-m", "0"]), "-m 0", "bad -m value 0");
}

#[test]
fn version_and_help_as_the_c_tools() {
    for bin in [TCPCOPY, INTERCEPT] {
        let r = run(bin, &["-v"]);
        assert_eq!(r.code, 0);
        assert!(r.stdout.contains(env!("CARGO_PKG_VERSION")), "{}", r.stdout);
        let r = run(bin, &["-h"]);
        assert_eq!(r.code, 0);
        assert!(r.stdout.contains("-i <INTERFACE>"), "{}", r.stdout);
    }
}

#[test]
fn intercept_flags() {
    // -i list, -p, -b.
    let r = intercept(&["-i", "eth0,eth1", "-p", "5000", "-b", "10.77.0.40"]);
    accepted(&r, "-i -p -b");
    assert!(pipeline_line(&r, "# worker 0:").contains("capture afpacket eth0,eth1"));
    assert!(pipeline_line(&r, "# control:").contains("listen 10.77.0.40:5000"));
    // -D: the docker rewrite.
    accepted(&intercept(&["-D", "172.17.0.2-10.77.0.10"]), "-D");
    refused(
        &intercept(&["-D", "172.17.0.2"]),
        "-D without B",
        "bad -D value '172.17.0.2': the form is ipA-ipB",
    );
    // -c only with --single.
    accepted(&intercept(&["--single", "-c"]), "--single -c");
    refused(
        &intercept(&["-c"]),
        "-c alone",
        "-c (protect the connected tcpcopy) only applies with --single",
    );
    // -s and -n: sizes the C tool needed; accepted, ignored, warned.
    accepted_with_warning(&intercept(&["-s", "131072"]), "-s", "-s 131072 ignored");
    accepted_with_warning(
        &intercept(&["-n", "8"]),
        "-n",
        "-n 8 ignored: batches of records adapt",
    );
    // -x and -q: the --traditional build's; refused with the reason.
    refused(
        &intercept(&["-x", "10.77.0.10"]),
        "-x",
        "--traditional build",
    );
    refused(&intercept(&["-q", "4096"]), "-q", "NFQUEUE");
    // -t: the C intercept rejects it too.
    refused(&intercept(&["-t", "60"]), "-t", "--route-timeout SECONDS");
    // -l -P -d.
    accepted(
        &intercept(&[
            "-l",
            "/tmp/intercept-c-flags.log",
            "-P",
            "/tmp/intercept-c-flags.pid",
            "-d",
        ]),
        "-l -P -d",
    );
}

/// Extreme values for every numeric flag of both tools: each run exits 0 (accepted) or 2 (a
/// message naming the flag), never with a panic. Values that are accepted are also run past
/// `--check` for the flags whose value feeds time arithmetic at start-up (no root needed: the
/// tools fail later, at opening their sockets, with a clear error, or run until stopped).
#[test]
fn no_numeric_flag_value_makes_a_tool_panic() {
    let extremes = [
        "0",
        "1",
        "-1",
        "127",
        "128",
        "255",
        "256",
        "1023",
        "1024",
        "65535",
        "65536",
        "2147483647",
        "2147483648",
        "4294967295",
        "4294967296",
        "9223372036854775807",
        "18446744073709551615",
        "18446744073709551616",
        "1e308",
        "NaN",
        "inf",
        "0.0000001",
        "",
        "x",
    ];
    let tcpcopy_flags = [
        "-p",
        "-C",
        "-n",
        "-f",
        "-r",
        "-m",
        "-M",
        "-D",
        "-R",
        "-U",
        "-t",
        "-k",
        "-S",
        "-B",
        "--pace-idle-ms",
        "--stats-interval",
        "--workers",
    ];
    let offline_flags = ["-a", "-I", "-T", "--offline-tail-s"];
    let intercept_flags = [
        "-p",
        "-s",
        "-n",
        "-q",
        "--route-timeout",
        "--stats-interval",
        "--workers",
    ];
    let dir = std::env::temp_dir().join(format!("c-flags-n-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("empty.pcap");
    let pcap = empty_pcap();
    std::fs::write(&file, &pcap).unwrap();
    let path = file.to_str().unwrap().to_owned();
    let mut runs = 0;
    let mut check = |bin: &str, args: Vec<String>| {
        let out = Command::new(bin).args(&args).output().expect("binary runs");
        let code = out.status.code().unwrap_or(-1);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            (code == 0 || code == 2) && !stderr.contains("panicked"),
            "{bin} {args:?}: exit {code}\n{stderr}"
        );
        runs += 1;
    };
    for value in extremes {
        for flag in tcpcopy_flags {
            let mut args: Vec<String> = BASE.iter().map(|s| s.to_string()).collect();
            args.extend([flag.to_string(), value.to_string(), "--check".into()]);
            check(TCPCOPY, args);
        }
        for flag in offline_flags {
            let mut args: Vec<String> = BASE.iter().map(|s| s.to_string()).collect();
            args.extend([
                "-i".into(),
                path.clone(),
                flag.into(),
                value.into(),
                "--check".into(),
            ]);
            check(TCPCOPY, args);
        }
        for flag in intercept_flags {
            check(
                INTERCEPT,
                vec![
                    "-F".into(),
                    "tcp".into(),
                    flag.into(),
                    value.into(),
                    "--check".into(),
                ],
            );
        }
        // Past --check: the values that reach the start (time arithmetic, the metrics
        // exporter). Without root the capture cannot open and the tool exits 2 with the cause;
        // as root, the metrics file's first write comes before the capture opens; either way a
        // panic would show here. The intercept address is one nobody listens on.
        let metrics = dir.join("m.prom");
        for flag in ["-t", "-k", "--stats-interval", "--pace-idle-ms"] {
            let args: Vec<String> = [
                "-x",
                "65001-127.0.0.1:65002",
                "-s",
                "127.0.0.1:1",
                "-i",
                "nosuchif0",
                flag,
                value,
                "--metrics-file",
                metrics.to_str().unwrap(),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            check(TCPCOPY, args);
        }
        for flag in ["--route-timeout", "--stats-interval"] {
            let args: Vec<String> = [
                "-F",
                "tcp",
                "-i",
                "nosuchif0",
                "-p",
                "0",
                "-b",
                "127.0.0.1",
                flag,
                value,
                "--metrics-file",
                metrics.to_str().unwrap(),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            check(INTERCEPT, args);
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
    let per_value = tcpcopy_flags.len() + offline_flags.len() + intercept_flags.len() + 4 + 2;
    assert_eq!(runs, extremes.len() * per_value, "every combination ran");
}

/// Every numeric YAML key, set to extreme values in a `--config` file: each run exits 0 or 2,
/// never with a panic, and an out-of-range value names the YAML key and the file.
#[test]
fn no_numeric_yaml_key_value_makes_a_tool_panic() {
    let dir = std::env::temp_dir().join(format!("c-flags-yaml-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let tcpcopy_keys = [
        ("workers", "count"),
        ("sampling", "percent"),
        ("copies", "count"),
        ("copies", "instance"),
        ("session", "timeout"),
        ("session", "keepalive"),
        ("session", "fake_mss"),
        ("session", "mtu"),
        ("session", "pace_idle_ms"),
        ("session", "memory_mib"),
        ("control", "port"),
        ("control", "connections"),
        ("outputs", "stats_interval"),
    ];
    let intercept_keys = [
        ("workers", "count"),
        ("control", "port"),
        ("control", "route_timeout"),
        ("outputs", "stats_interval"),
    ];
    let values = [
        "0",
        "-1",
        "65536",
        "4294967296",
        "18446744073709551615",
        "1e400",
        "x",
    ];
    let mut named = 0;
    for (bin, keys, base) in [
        (
            TCPCOPY,
            &tcpcopy_keys[..],
            "transfers:\n  - {online: 80, target: 10.77.0.30:8080}\n",
        ),
        (INTERCEPT, &intercept_keys[..], "ports:\n  filter: tcp\n"),
    ] {
        for (section, key) in keys {
            for value in values {
                let mut text = base.to_string();
                if bin == TCPCOPY {
                    text.push_str("control:\n  intercepts: [10.77.0.40]\n");
                }
                if *section == "control" && bin == TCPCOPY {
                    text.push_str(&format!("  {key}: {value}\n"));
                } else {
                    text.push_str(&format!("{section}:\n  {key}: {value}\n"));
                }
                let file = dir.join("c.yaml");
                std::fs::write(&file, &text).unwrap();
                let r = run(bin, &["--config", file.to_str().unwrap(), "--check"]);
                assert!(
                    (r.code == 0 || r.code == 2) && !r.stderr.contains("panicked"),
                    "{bin} with {section}.{key}: {value}: exit {}\n{}",
                    r.code,
                    r.stderr
                );
                if r.code == 2 {
                    assert!(
                        r.stderr.contains(&format!("{section}.{key}")),
                        "{bin} with {section}.{key}: {value}: the error does not name the key\n{}",
                        r.stderr
                    );
                    named += 1;
                }
            }
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
    // Every refusal names the key: a parse error by its YAML path, a range error by the key
    // that set the flag. (Values the YAML types reject, e.g. -1 for an unsigned key, count too.)
    assert!(
        named >= (tcpcopy_keys.len() + intercept_keys.len()) * 3,
        "{named}"
    );
}
