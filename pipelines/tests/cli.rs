//! The command lines: bad flags and addresses exit non-zero with a message that names the
//! value and shows the accepted form (no root needed: they fail before opening anything).

use std::process::Command;

fn run(bin: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new(bin).args(args).output().expect("binary runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const TCPCOPY: &str = env!("CARGO_BIN_EXE_tcpcopy");
const INTERCEPT: &str = env!("CARGO_BIN_EXE_intercept");

#[test]
fn bad_transfer_names_the_value_and_the_form() {
    let (code, err) = run(
        TCPCOPY,
        &["-i", "lo", "-x", "80-10.0.0:99999", "-s", "10.0.0.40"],
    );
    assert_ne!(code, 0);
    assert!(err.contains("bad -x value '80-10.0.0:99999'"), "{err}");
    assert!(
        err.contains("target address '10.0.0' is not an IPv4 address"),
        "{err}"
    );
    assert!(
        err.contains("[onlineIP:]onlinePort-targetIP:targetPort"),
        "{err}"
    );
    let (code, err) = run(
        TCPCOPY,
        &["-i", "lo", "-x", "80-10.0.0.1:99999", "-s", "10.0.0.40"],
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("target port 99999 is out of range 1..65535"),
        "{err}"
    );
}

#[test]
fn bad_intercept_address_and_client_range_are_named() {
    let (code, err) = run(
        TCPCOPY,
        &["-i", "lo", "-x", "80-10.0.0.1:8080", "-s", "10.0.0:1"],
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("bad -s value '10.0.0:1'") && err.contains("ip[:port]"),
        "{err}"
    );
    let (code, err) = run(
        TCPCOPY,
        &[
            "-i",
            "lo",
            "-x",
            "80-10.0.0.1:8080",
            "-s",
            "10.0.0.4",
            "-c",
            "10.9.9.*",
        ],
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("bad -c value '10.9.9.*'") && err.contains("a.b.c.x"),
        "{err}"
    );
    let (code, err) = run(
        TCPCOPY,
        &[
            "-i",
            "lo",
            "-x",
            "80-10.0.0.1:8080",
            "-s",
            "10.0.0.4",
            "-C",
            "99",
        ],
    );
    assert_ne!(code, 0);
    assert!(err.contains("-C"), "{err}");
}

#[test]
fn missing_and_unknown_flags_are_reported() {
    let (code, err) = run(TCPCOPY, &["-i", "lo", "-s", "10.0.0.4"]);
    assert_ne!(code, 0);
    assert!(err.contains("-x <TRANSFERS>"), "{err}");
    let (code, err) = run(
        TCPCOPY,
        &["-i", "lo", "-x", "80-10.0.0.1:8080", "-s", "10.0.0.4", "-Q"],
    );
    assert_ne!(code, 0);
    assert!(err.contains("'-Q'"), "{err}");
    let (code, err) = run(INTERCEPT, &["-i", "lo", "-F", "tcp", "-b", "300.1.1.1"]);
    assert_ne!(code, 0);
    assert!(err.contains("bad -b value '300.1.1.1'"), "{err}");
}

#[test]
fn missing_interface_and_bad_filter_fail_at_start_with_the_cause() {
    let (code, err) = run(INTERCEPT, &["-i", "nosuchif0", "-F", "tcp", "-p", "0"]);
    assert_ne!(code, 0);
    assert!(err.contains("nosuchif0"), "{err}");
    let (code, err) = run(INTERCEPT, &["-i", "lo", "-F", "tcp and bogus", "-p", "0"]);
    assert_ne!(code, 0);
    assert!(err.contains("tcp and bogus"), "{err}");
}

#[test]
fn version_and_help() {
    let out = Command::new(TCPCOPY).arg("-v").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
    let out = Command::new(TCPCOPY).arg("-h").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "-x", "-s", "-c", "-C", "-p", "-t", "-k", "-W", "-l", "-d", "-P",
    ] {
        assert!(
            help.contains(&format!("{flag} ")),
            "help lacks {flag}: {help}"
        );
    }
}
