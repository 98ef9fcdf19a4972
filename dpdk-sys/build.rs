//! Finds the system's DPDK, generates the bindings and compiles the C wrappers of DPDK's
//! `static inline` fast path.
//!
//! Where DPDK comes from, in order:
//! 1. `DPDK_SYS_INCLUDE_DIRS` set (colon-separated): no pkg-config; libraries from
//!    `DPDK_SYS_LIBS` (comma-separated, default the ones these bindings use) in
//!    `DPDK_SYS_LIB_DIRS` (colon-separated, optional). Extra compiler flags in `DPDK_SYS_CFLAGS`.
//! 2. Otherwise `pkg-config libdpdk` (set `PKG_CONFIG_PATH` to the folder of another DPDK's
//!    `libdpdk.pc`). A failed probe stops the build with the fix.
//!
//! The DPDK version is read from `rte_build_config.h` and becomes cfgs: `dpdk_ge_YY_MM` for every
//! LTS at or below it (`dpdk_ge_21_11`, `dpdk_ge_22_11`, ...), and the `DEP_DPDK_VERSION`
//! variable of crates that depend on this one.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// LTS releases turned into `dpdk_ge_*` cfgs.
const KNOWN_RELEASES: &[(u32, u32)] = &[(21, 11), (22, 11), (23, 11), (24, 11), (25, 11)];
/// Oldest DPDK these bindings are written for.
const MIN_VERSION: &str = "21.11";
/// Libraries linked when pkg-config is bypassed.
const DEFAULT_LIBS: &str =
    "rte_ethdev,rte_net,rte_mbuf,rte_mempool,rte_ring,rte_eal,rte_kvargs,rte_telemetry";

const FIX: &str = "apt-get install libdpdk-dev libclang-dev, or set PKG_CONFIG_PATH to the \
folder holding the libdpdk.pc of your DPDK (or DPDK_SYS_INCLUDE_DIRS/DPDK_SYS_LIB_DIRS)";

/// What the build needs to know about the DPDK it builds against.
struct Dpdk {
    include_dirs: Vec<PathBuf>,
    /// Flags for clang (bindgen) and cc: `-I`, `-D`, `-include rte_config.h`, `-march=...`.
    cflags: Vec<String>,
    lib_dirs: Vec<PathBuf>,
    libs: Vec<String>,
}

fn var(name: &str) -> Option<String> {
    println!("cargo:rerun-if-env-changed={name}");
    env::var(name).ok().filter(|v| !v.is_empty())
}

fn split_paths(value: &str) -> Vec<PathBuf> {
    env::split_paths(value)
        .filter(|p| !p.as_os_str().is_empty())
        .collect()
}

fn probe() -> Dpdk {
    let extra: Vec<String> = var("DPDK_SYS_CFLAGS")
        .map(|v| v.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default();
    if let Some(includes) = var("DPDK_SYS_INCLUDE_DIRS") {
        let include_dirs = split_paths(&includes);
        let mut cflags: Vec<String> = include_dirs
            .iter()
            .map(|d| format!("-I{}", d.display()))
            .collect();
        cflags.extend(extra);
        let libs = var("DPDK_SYS_LIBS").unwrap_or_else(|| DEFAULT_LIBS.to_owned());
        return Dpdk {
            include_dirs,
            cflags,
            lib_dirs: var("DPDK_SYS_LIB_DIRS")
                .map(|v| split_paths(&v))
                .unwrap_or_default(),
            libs: libs
                .split(',')
                .map(|l| l.trim().to_owned())
                .filter(|l| !l.is_empty())
                .collect(),
        };
    }
    var("PKG_CONFIG_PATH");
    var("PKG_CONFIG_LIBDIR");
    let library = match pkg_config::Config::new()
        .atleast_version(MIN_VERSION)
        .cargo_metadata(false)
        .probe("libdpdk")
    {
        Ok(library) => library,
        Err(e) => panic!(
            "\n\ndpdk-sys: cannot find DPDK (libdpdk >= {MIN_VERSION}) with pkg-config.\n\
             fix: {FIX}.\n\
             (only the `dpdk` feature of engine needs DPDK; the default build does not.)\n\
             pkg-config said: {e}\n"
        ),
    };
    // The crate keeps only -I and -D; DPDK's .pc also says `-include rte_config.h` and the
    // `-march` its headers were configured for, which the inline functions depend on.
    let pkg_config = env::var("PKG_CONFIG").unwrap_or_else(|_| "pkg-config".to_owned());
    let output = Command::new(&pkg_config)
        .args(["--cflags", "libdpdk"])
        .output()
        .unwrap_or_else(|e| panic!("dpdk-sys: cannot run {pkg_config}: {e}; fix: {FIX}"));
    assert!(
        output.status.success(),
        "dpdk-sys: `{pkg_config} --cflags libdpdk` failed: {}; fix: {FIX}",
        String::from_utf8_lossy(&output.stderr)
    );
    let mut cflags: Vec<String> = String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    cflags.extend(extra);
    Dpdk {
        include_dirs: library.include_paths,
        cflags,
        lib_dirs: library.link_paths,
        libs: library.libs,
    }
}

/// `(year, month, minor)` from `rte_build_config.h`.
fn version(dpdk: &Dpdk) -> (u32, u32, u32) {
    for dir in &dpdk.include_dirs {
        // Debian keeps the build config in the multiarch folder next to the generic one.
        let candidates = [
            dir.join("rte_build_config.h"),
            dir.join("../x86_64-linux-gnu/dpdk/rte_build_config.h"),
            dir.join("../aarch64-linux-gnu/dpdk/rte_build_config.h"),
        ];
        for path in candidates {
            if let Ok(text) = std::fs::read_to_string(&path) {
                println!("cargo:rerun-if-changed={}", path.display());
                let field = |name: &str| {
                    text.lines().find_map(|line| {
                        let mut words = line.split_whitespace();
                        (words.next() == Some("#define") && words.next() == Some(name))
                            .then(|| words.next()?.parse::<u32>().ok())
                            .flatten()
                    })
                };
                if let (Some(y), Some(m), Some(n)) = (
                    field("RTE_VER_YEAR"),
                    field("RTE_VER_MONTH"),
                    field("RTE_VER_MINOR"),
                ) {
                    return (y, m, n);
                }
            }
        }
    }
    panic!(
        "dpdk-sys: no rte_build_config.h with RTE_VER_YEAR/MONTH/MINOR under {:?}; fix: {FIX}",
        dpdk.include_dirs
    );
}

fn main() {
    println!("cargo:rerun-if-changed=wrapper.h");
    println!("cargo:rerun-if-changed=shim.c");
    println!("cargo:rerun-if-changed=build.rs");
    for (y, m) in KNOWN_RELEASES {
        println!("cargo::rustc-check-cfg=cfg(dpdk_ge_{y}_{m})");
    }

    let dpdk = probe();
    let (year, month, minor) = version(&dpdk);
    for (y, m) in KNOWN_RELEASES {
        if (year, month) >= (*y, *m) {
            println!("cargo:rustc-cfg=dpdk_ge_{y}_{m}");
        }
    }
    println!("cargo:rustc-env=DPDK_SYS_VERSION={year}.{month:02}.{minor}");
    // Metadata for dependents (DEP_DPDK_VERSION, DEP_DPDK_INCLUDE).
    println!("cargo:version={year}.{month:02}.{minor}");
    let includes = env::join_paths(&dpdk.include_dirs).expect("include paths join");
    println!("cargo:include={}", includes.to_string_lossy());

    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let wrapper = manifest.join("wrapper.h");
    let static_fns = out.join("static_fns");
    generate(&dpdk, &wrapper, &static_fns, &out.join("bindings.rs"));

    // The C side first, so the static archive comes before the DPDK libraries it calls on the
    // link line (they are linked --as-needed).
    let mut build = cc::Build::new();
    build
        .file(static_fns.with_extension("c"))
        .file(manifest.join("shim.c"))
        .include(&manifest)
        .warnings(false)
        .opt_level(2);
    for flag in &dpdk.cflags {
        build.flag(flag);
    }
    build.compile("dpdk_sys_wrappers");

    for dir in &dpdk.lib_dirs {
        println!("cargo:rustc-link-search=native={}", dir.display());
    }
    for lib in &dpdk.libs {
        println!("cargo:rustc-link-lib={lib}");
    }
}

fn generate(dpdk: &Dpdk, wrapper: &Path, static_fns: &Path, bindings_out: &Path) {
    let functions = [
        // EAL, lcores, errors, logs, version
        "rte_eal_init",
        "rte_eal_cleanup",
        "rte_eal_process_type",
        "rte_eal_has_hugepages",
        "rte_eal_remote_launch",
        "rte_eal_wait_lcore",
        "rte_eal_mp_wait_lcore",
        "rte_lcore_id",
        "rte_lcore_count",
        "rte_lcore_index",
        "rte_lcore_to_socket_id",
        "rte_get_main_lcore",
        "rte_get_next_lcore",
        "rte_socket_id",
        "rte_thread_register",
        "rte_thread_unregister",
        "rte_strerror",
        "rte_version",
        "rte_log_set_global_level",
        "rte_log_get_global_level",
        // cycles
        "rte_get_tsc_cycles",
        "rte_get_tsc_hz",
        "rte_rdtsc",
        "rte_rdtsc_precise",
        "rte_delay_us_block",
        // mempool and mbuf
        "rte_pktmbuf_pool_create",
        "rte_mempool_free",
        "rte_mempool_lookup",
        "rte_mempool_avail_count",
        "rte_mempool_in_use_count",
        "rte_pktmbuf_alloc",
        "rte_pktmbuf_alloc_bulk",
        "rte_pktmbuf_free",
        "rte_pktmbuf_free_bulk",
        "rte_pktmbuf_append",
        "rte_pktmbuf_prepend",
        "rte_pktmbuf_adj",
        "rte_pktmbuf_trim",
        "rte_pktmbuf_reset",
        "rte_pktmbuf_headroom",
        "rte_pktmbuf_tailroom",
        "rte_pktmbuf_data_room_size",
        "rte_pktmbuf_linearize",
        // ring
        "rte_ring_create",
        "rte_ring_free",
        "rte_ring_count",
        "rte_ring_enqueue_burst",
        "rte_ring_dequeue_burst",
        // ethdev
        "rte_eth_dev_count_avail",
        "rte_eth_dev_is_valid_port",
        "rte_eth_find_next",
        "rte_eth_dev_get_port_by_name",
        "rte_eth_dev_get_name_by_port",
        "rte_eth_dev_info_get",
        "rte_eth_dev_socket_id",
        "rte_eth_dev_configure",
        "rte_eth_dev_adjust_nb_rx_tx_desc",
        "rte_eth_rx_queue_setup",
        "rte_eth_tx_queue_setup",
        "rte_eth_dev_start",
        "rte_eth_dev_stop",
        "rte_eth_dev_close",
        "rte_eth_dev_set_mtu",
        "rte_eth_dev_get_mtu",
        "rte_eth_promiscuous_enable",
        "rte_eth_promiscuous_disable",
        "rte_eth_promiscuous_get",
        "rte_eth_link_get",
        "rte_eth_link_get_nowait",
        "rte_eth_macaddr_get",
        "rte_eth_stats_get",
        "rte_eth_stats_reset",
        "rte_eth_rx_burst",
        "rte_eth_tx_burst",
        // C helpers (shim.c)
        "dpdk_sys_.*",
    ];
    let mut builder = bindgen::Builder::default()
        .header(wrapper.to_string_lossy())
        .clang_args(&dpdk.cflags)
        .allowlist_function(functions.join("|"))
        .allowlist_var("DPDK_SYS_.*")
        .allowlist_var(
            "RTE_(MAX_ETHPORTS|MAX_LCORE|MAX_QUEUES_PER_PORT|PKTMBUF_HEADROOM|MBUF_DEFAULT_.*|\
             MBUF_F_TX_.*|MBUF_F_RX_.*|VER_.*|LOG_.*|ETHER_ADDR_LEN|ETH_NAME_MAX_LEN|\
             MEMPOOL_CACHE_MAX_SIZE|ETH_LINK_.*|ETH_SPEED_NUM_.*|ETH_RSS_.*)",
        )
        .allowlist_var("SOCKET_ID_ANY|LCORE_ID_ANY")
        .allowlist_type("rte_eth_(conf|dev_info|stats|link|rss_conf|rxconf|txconf)")
        .allowlist_type("rte_(mbuf|mempool|ring|ether_addr|proc_type_t|rmt_call_main_t)")
        // Packed structs holding aligned ones (rustc rejects them); never needed here.
        .blocklist_type("rte_l2tpv2_.*|rte_gtp_.*|rte_ether_hdr|rte_vlan_hdr|rte_arp_.*")
        .opaque_type("rte_l2tpv2_.*|rte_gtp_.*")
        // Internals reached through the allowlist that the engine never touches.
        .opaque_type("rte_eth_fp_ops|rte_mempool_ops.*|rte_mempool_cache|rte_eth_dev_portconf")
        .default_enum_style(bindgen::EnumVariation::Consts)
        .prepend_enum_name(false)
        .derive_default(true)
        .derive_debug(true)
        .impl_debug(false)
        .generate_comments(false)
        .layout_tests(true)
        .size_t_is_usize(true)
        .wrap_static_fns(true)
        .wrap_static_fns_path(static_fns)
        .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()));
    if env::var("DPDK_SYS_BINDGEN_DEBUG").is_ok() {
        builder = builder.emit_diagnostics();
    }
    println!("cargo:rerun-if-env-changed=DPDK_SYS_BINDGEN_DEBUG");
    let bindings = builder.generate().unwrap_or_else(|e| {
        panic!(
            "dpdk-sys: bindgen failed over {}: {e}\n\
             fix: apt-get install libclang-dev (bindgen needs libclang), or set LIBCLANG_PATH",
            wrapper.display()
        )
    });
    bindings
        .write_to_file(bindings_out)
        .expect("write bindings.rs");
}
