//! Root-only smoke tests of the lab: topology, routes, nginx, labserver, httpload and teardown.
//! Each test brings up its own lab (unique namespace prefix) and tears it down.

use std::collections::BTreeSet;
use std::net::SocketAddrV4;
use std::process::{Command, Stdio};
use std::time::Duration;

use lab::http::{body_bytes, load_path, sha256_hex};
use lab::{require_root, Host, Lab, LabConfig};

fn expected_paths(tag: &str, n: u64) -> BTreeSet<String> {
    (0..n).map(|i| load_path("/p/", Some(tag), i)).collect()
}

#[test]
fn client_requests_reach_online_nginx_in_both_modes() {
    if !require_root() {
        return;
    }
    let lab = Lab::up().unwrap();
    let online = lab.nginx(Host::Online, 80).unwrap();
    let target = lab.nginx(Host::Target, 8080).unwrap();
    let to_online = "10.77.0.20:80";

    let close = lab
        .httpload(
            Host::Client,
            &[
                "--target",
                to_online,
                "--requests",
                "100",
                "--mode",
                "close",
                "--concurrency",
                "4",
                "--tag",
                "close",
            ],
        )
        .unwrap();
    assert!(close.all_ok(), "{close:?}");
    let keep = lab
        .httpload(
            Host::Client,
            &[
                "--target",
                to_online,
                "--requests",
                "100",
                "--mode",
                "keepalive",
                "--connections",
                "10",
                "--tag",
                "keep",
            ],
        )
        .unwrap();
    assert!(keep.all_ok(), "{keep:?}");
    assert_eq!(keep.connections_opened, 10);

    // nginx logs a request when it completes, before httpload sees the response: all 200 are there.
    let entries = online.entries();
    assert_eq!(entries.len(), 200, "{:?}", online.access_log_lines());
    let paths: BTreeSet<String> = entries.iter().map(|e| e.uri.clone()).collect();
    let mut want = expected_paths("close", 100);
    want.extend(expected_paths("keep", 100));
    assert_eq!(paths, want);
    assert!(entries
        .iter()
        .all(|e| e.status == 200 && *e.peer.ip() == Host::Client.addr()));
    let keep_conns: BTreeSet<u64> = entries
        .iter()
        .filter(|e| e.uri.contains("/keep-"))
        .map(|e| e.connection)
        .collect();
    assert_eq!(keep_conns.len(), 10);
    assert_eq!(
        entries
            .iter()
            .filter(|e| e.uri.contains("/keep-"))
            .map(|e| e.connection_requests)
            .max(),
        Some(10)
    );
    assert!(entries
        .iter()
        .filter(|e| e.uri.contains("/close-"))
        .all(|e| e.connection_requests == 1));

    // Large static responses arrive whole.
    let big = lab
        .httpload(
            Host::Client,
            &[
                "--target",
                to_online,
                "--requests",
                "4",
                "--mode",
                "keepalive",
                "--connections",
                "2",
                "--path",
                "/static/1m",
            ],
        )
        .unwrap();
    assert!(big.all_ok(), "{big:?}");
    assert_eq!(big.body_bytes_received, 4 * 1024 * 1024);
    assert_eq!(target.count(), 0);
}

#[test]
fn replies_to_the_client_are_routed_to_the_assistant_and_die_there() {
    if !require_root() {
        return;
    }
    let lab = Lab::up().unwrap();
    let target = lab.nginx(Host::Target, 8080).unwrap();
    let dropped_before = lab
        .net_counter(Host::Assistant, "Ip", "InAddrErrors")
        .unwrap();
    let (assistant_rx_before, _) = lab.iface_packets(Host::Assistant).unwrap();
    let target_out_before = lab.net_counter(Host::Target, "Tcp", "OutSegs").unwrap();

    let r = lab
        .httpload(
            Host::Client,
            &[
                "--target",
                "10.77.0.30:8080",
                "--requests",
                "1",
                "--timeout-s",
                "2",
                "--io-timeout-s",
                "2",
            ],
        )
        .unwrap();
    assert!(!r.all_ok());
    assert_eq!(r.errors.get("connect_timeout"), Some(&1), "{r:?}");

    // The SYN reached the target, which answered (SYN-ACK) through the assistant, whose IP layer
    // dropped it (not for its address, ip_forward=0).
    assert!(lab.net_counter(Host::Target, "Tcp", "OutSegs").unwrap() > target_out_before);
    assert!(lab.iface_packets(Host::Assistant).unwrap().0 > assistant_rx_before);
    assert!(
        lab.net_counter(Host::Assistant, "Ip", "InAddrErrors")
            .unwrap()
            > dropped_before
    );
    assert_eq!(target.count(), 0, "{:?}", target.access_log_lines());

    // The online host is directly routed to the target.
    let ok = lab
        .httpload(
            Host::Online,
            &[
                "--target",
                "10.77.0.30:8080",
                "--requests",
                "5",
                "--mode",
                "keepalive",
                "--connections",
                "1",
            ],
        )
        .unwrap();
    assert!(ok.all_ok(), "{ok:?}");
    assert_eq!(target.count(), 5);
    assert!(target
        .entries()
        .iter()
        .all(|e| *e.peer.ip() == Host::Online.addr()));
}

#[test]
fn labserver_on_target_receives_a_1mib_post_from_online() {
    if !require_root() {
        return;
    }
    let lab = Lab::up().unwrap();
    let server = lab.labserver(Host::Target, 8081).unwrap();
    let body = body_bytes(1 << 20, 5);
    for extra in [&[][..], &["--chunked"][..]] {
        let mut args = vec![
            "--target",
            "10.77.0.30:8081",
            "--requests",
            "1",
            "--post-bytes",
            "1048576",
            "--seed",
            "5",
        ];
        args.extend_from_slice(extra);
        let r = lab.httpload(Host::Online, &args).unwrap();
        assert!(r.all_ok(), "{r:?}");
        assert_eq!(r.body_sha256, sha256_hex(&body));
    }
    let entries = server.entries();
    assert_eq!(entries.len(), 2, "{:?}", server.lines());
    for e in entries {
        assert_eq!(*e.peer.ip(), Host::Online.addr());
        assert_eq!((e.method.as_str(), e.path.as_str()), ("POST", "/p/000000"));
        assert_eq!(e.body_len, 1 << 20);
        assert_eq!(e.sha256, sha256_hex(&body));
    }
}

#[test]
fn spawn_run_and_in_ns_see_the_host() {
    if !require_root() {
        return;
    }
    let lab = Lab::up().unwrap();
    let out = lab
        .run(Host::Assistant, "sysctl", &["-n", "net.ipv4.ip_forward"])
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0");
    let out = lab
        .run(Host::Target, "ip", &["-4", "route", "show"])
        .unwrap();
    let routes = String::from_utf8_lossy(&out.stdout);
    assert!(routes.contains("10.77.0.10 via 10.77.0.40"), "{routes}");
    assert!(routes.contains("10.9.9.0/24 via 10.77.0.40"), "{routes}");

    let mut p = lab
        .spawn(
            Host::Online,
            "sh",
            &["-c", "ip -4 -o addr show dev eth0; echo err >&2"],
        )
        .unwrap();
    assert!(p.wait_exit(Duration::from_secs(30)).unwrap().success());
    assert!(p.stdout().contains("10.77.0.20/24"), "{}", p.log());
    assert_eq!(p.stderr(), "err\n");

    // A socket opened by in_ns lives in the host's namespace.
    let listener = lab
        .in_ns(Host::Target, || {
            std::net::TcpListener::bind("10.77.0.30:9999")
        })
        .unwrap()
        .unwrap();
    let addr = SocketAddrV4::new(Host::Target.addr(), 9999);
    lab.wait_port(Host::Online, addr, Duration::from_secs(10))
        .unwrap();
    drop(listener);
}

#[test]
fn down_kills_leftover_processes_and_removes_every_namespace() {
    if !require_root() {
        return;
    }
    let mut lab = Lab::up_with(LabConfig {
        offloads: true,
        ..Default::default()
    })
    .unwrap();
    let prefix = lab.prefix().to_string();
    assert_eq!(lab.namespaces().len(), 5);
    let features = lab.run(Host::Online, "ethtool", &["-k", "eth0"]).unwrap();
    assert!(String::from_utf8_lossy(&features.stdout).contains("tcp-segmentation-offload: on"));
    let online = lab.nginx(Host::Online, 80).unwrap();
    let r = lab
        .httpload(
            Host::Client,
            &[
                "--target",
                "10.77.0.20:80",
                "--requests",
                "20",
                "--path",
                "/static/256k",
            ],
        )
        .unwrap();
    assert!(r.all_ok(), "{r:?}");

    // A process the harness does not track (and that ignores SIGTERM).
    let mut stray = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.ns(Host::Target),
            "sh",
            "-c",
            "trap '' TERM; exec sleep 600",
        ])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    lab.down().unwrap();
    let status = (0..500)
        .find_map(|_| {
            let s = stray.try_wait().unwrap();
            if s.is_none() {
                std::thread::sleep(Duration::from_millis(10));
            }
            s
        })
        .expect("lab down must kill processes left in the namespaces");
    assert!(!status.success());
    assert!(lab::namespaces_with_prefix(&prefix).is_empty());
    let list = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&list.stdout).contains(&prefix));
    drop(online);
}

/// `LabConfig::second_online`: a fifth host, online2 (10.77.0.21), on the bridge with neighbour
/// entries both ways: the client reaches its nginx, it reaches the target, `Lab::pids` lists what
/// runs there, and teardown kills that and removes its namespace.
#[test]
fn second_online_host_is_wired_in_and_torn_down() {
    if !require_root() {
        return;
    }
    let mut lab = Lab::up_with(LabConfig {
        second_online: true,
        ..Default::default()
    })
    .unwrap();
    let prefix = lab.prefix().to_string();
    assert_eq!(lab.namespaces().len(), 6);
    assert!(lab.namespaces().contains(&lab.ns(Host::Online2)));
    let mut online2 = lab.nginx(Host::Online2, 80).unwrap();
    let target = lab.nginx(Host::Target, 8080).unwrap();
    let r = lab
        .httpload(
            Host::Client,
            &[
                "--target",
                "10.77.0.21:80",
                "--requests",
                "50",
                "--tag",
                "o2",
            ],
        )
        .unwrap();
    assert!(r.all_ok(), "{r:?}");
    assert_eq!(online2.wait_count(50, Duration::from_secs(10)), 50);
    assert_eq!(
        online2.paths().into_iter().collect::<BTreeSet<_>>(),
        expected_paths("o2", 50)
    );
    assert!(online2
        .entries()
        .iter()
        .all(|e| *e.peer.ip() == Host::Client.addr()));
    lab.wait_port(Host::Online2, target.addr(), Duration::from_secs(10))
        .unwrap();
    let pid = online2.proc().pid();
    assert_eq!(lab.pids(Host::Online2).unwrap(), vec![pid]);
    assert!(!lab.pids(Host::Online).unwrap().contains(&pid));
    lab.down().unwrap();
    assert!(online2.proc().wait_exit(Duration::from_secs(5)).is_ok());
    assert!(lab::namespaces_with_prefix(&prefix).is_empty());
}

#[test]
fn a_panicking_test_still_tears_its_lab_down() {
    if !require_root() {
        return;
    }
    let prefix = std::sync::Mutex::new(String::new());
    let result = std::panic::catch_unwind(|| {
        let lab = Lab::up().unwrap();
        *prefix.lock().unwrap() = lab.prefix().to_string();
        let _server = lab.labserver(Host::Target, 8081).unwrap();
        panic!("test failure inside a lab");
    });
    assert!(result.is_err());
    let prefix = prefix.into_inner().unwrap();
    assert!(!prefix.is_empty());
    assert!(lab::namespaces_with_prefix(&prefix).is_empty());
    // The logs of a failed test are kept for inspection; this failure was on purpose.
    let kept = std::env::temp_dir().join(format!("tcpcopy-lab-{prefix}"));
    assert!(kept.join("labserver-target-8081.log").exists());
    std::fs::remove_dir_all(kept).unwrap();
}

#[test]
fn labs_left_by_dead_test_processes_are_swept() {
    if !require_root() {
        return;
    }
    // A pid that no longer exists.
    let mut child = Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let stale = format!("tl{dead}x0-");
    let up = Command::new("bash")
        .arg(lab::lab_script())
        .args(["up", &stale])
        .output()
        .unwrap();
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    assert_eq!(lab::namespaces_with_prefix(&stale).len(), 5);
    let lab = Lab::up().unwrap();
    assert!(lab::namespaces_with_prefix(&stale).is_empty());
    drop(lab);
}
