//! The C tools' command lines, read as they were written: the forms only some C builds had
//! (`-i FILE` of the `--offline` build), flags that are accepted with a warning naming what
//! replaces them, and the numeric ranges every flag and YAML key is checked against (so no
//! value can overflow the time arithmetic behind it).

use std::fmt::Display;
use std::ops::RangeInclusive;
use std::path::Path;

/// Longest time a flag in seconds may name: one year (`-t`, `-k`, `--route-timeout`).
pub const MAX_SECONDS: u64 = 365 * 24 * 3600;

/// Longest statistics interval, in seconds: one day.
pub const MAX_STATS_INTERVAL: u64 = 24 * 3600;

/// Longest time a flag in milliseconds may name: one day (`--pace-idle-ms`, `-I`).
pub const MAX_MILLISECONDS: u64 = 24 * 3600 * 1000;

/// Argument ids of the flags that exist only so the C tools' command lines run (accepted and
/// ignored with a warning, or refused with the reason): they have no YAML key.
pub const C_ONLY_FLAGS: [&str; 8] = [
    "snaplen",
    "default_rtt",
    "pool_growth",
    "pass_list",
    "queue_length",
    "delay_buckets",
    "batch_size",
    "route_timeout_c",
];

/// Warnings about flags that were accepted for compatibility; each is printed on stderr at
/// once (before a daemon loses its terminal) and logged again once logging is up.
#[derive(Debug, Default)]
pub struct Warnings {
    program: &'static str,
    lines: Vec<String>,
}

impl Warnings {
    /// No warnings yet, for `program` (`tcpcopy` or `intercept`).
    pub fn new(program: &'static str) -> Warnings {
        Warnings {
            program,
            lines: Vec::new(),
        }
    }

    /// Prints `text` on stderr now and keeps it for [`Warnings::log`].
    pub fn warn(&mut self, text: impl Into<String>) {
        let text = text.into();
        eprintln!("{}: warning: {text}", self.program);
        self.lines.push(text);
    }

    /// Warns that each C flag given (`(flag, value, why)`) is accepted and ignored, and why.
    pub fn ignored(&mut self, flags: &[(&str, Option<&String>, &str)]) {
        for (flag, value, why) in flags {
            if let Some(value) = value {
                self.warn(format!("{flag} {value} ignored: {why}"));
            }
        }
    }

    /// What was said so far.
    pub fn lines(&self) -> &[String] {
        &self.lines
    }

    /// Logs every warning (once logging is set up).
    pub fn log(&self) {
        for line in &self.lines {
            tracing::warn!("{line}");
        }
    }
}

/// Addresses and networks (`10.0.0.5`, `10.0.0.0/24`, `fd00::/8`): intercept's `--allow`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowList {
    networks: Vec<(std::net::IpAddr, u8)>,
}

impl AllowList {
    /// Parses a comma list of addresses and networks.
    ///
    /// # Errors
    /// An item that is neither; the message shows the form.
    pub fn parse(text: &str) -> anyhow::Result<AllowList> {
        let bad = |item: &str| {
            anyhow::anyhow!(
                "bad --allow value '{text}': '{item}' is not an address or a network; the form is IP[/bits][,...], e.g. --allow 10.0.0.20,10.0.1.0/24"
            )
        };
        let mut networks = Vec::new();
        for item in text.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (address, bits) = match item.split_once('/') {
                Some((a, b)) => (a, Some(b)),
                None => (item, None),
            };
            let address: std::net::IpAddr = address.parse().map_err(|_| bad(item))?;
            let max = if address.is_ipv4() { 32 } else { 128 };
            let bits = match bits {
                Some(b) => b
                    .parse::<u8>()
                    .ok()
                    .filter(|&b| b <= max)
                    .ok_or_else(|| bad(item))?,
                None => max,
            };
            networks.push((address, bits));
        }
        if networks.is_empty() {
            return Err(bad(text));
        }
        Ok(AllowList { networks })
    }

    /// True when `address` is on the list.
    pub fn allows(&self, address: std::net::IpAddr) -> bool {
        use std::net::IpAddr;
        // An IPv4 peer may show as an IPv4-mapped IPv6 address on a dual-stack socket.
        let address = match address {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(address, IpAddr::V4),
            v4 => v4,
        };
        self.networks
            .iter()
            .any(|&(network, bits)| match (network, address) {
                (IpAddr::V4(n), IpAddr::V4(a)) => {
                    let mask = u32::MAX.checked_shl(32 - u32::from(bits)).unwrap_or(0);
                    u32::from(n) & mask == u32::from(a) & mask
                }
                (IpAddr::V6(n), IpAddr::V6(a)) => {
                    let mask = u128::MAX.checked_shl(128 - u32::from(bits)).unwrap_or(0);
                    u128::from(n) & mask == u128::from(a) & mask
                }
                _ => false,
            })
    }
}

impl std::fmt::Display for AllowList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (address, bits)) in self.networks.iter().enumerate() {
            let sep = if i == 0 { "" } else { "," };
            write!(f, "{sep}{address}/{bits}")?;
        }
        Ok(())
    }
}

/// True when a `-i` value names a capture file rather than interfaces: an existing regular
/// file that is not also the name of an interface (the C `--offline` build's `-i FILE`).
pub fn is_capture_file(value: &str) -> bool {
    if value.contains(',') || value == "any" {
        return false;
    }
    let interface = Path::new("/sys/class/net").join(value);
    Path::new(value).is_file() && !(value.len() < 16 && !value.contains('/') && interface.exists())
}

/// A number outside its flag's range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "bad {flag} value {value}: {meaning} must be {start}..={end}, e.g. {flag} {example}{origin}"
)]
pub struct RangeError {
    /// The flag, e.g. `-t`.
    pub flag: String,
    /// The value given.
    pub value: String,
    /// What the value means.
    pub meaning: String,
    /// The range's first value.
    pub start: String,
    /// The range's last value.
    pub end: String,
    /// A good value.
    pub example: String,
    /// Where the value came from when not the command line (` (set by the YAML key
    /// session.timeout in FILE)`), else empty.
    pub origin: String,
}

/// Checks that `value` of `flag` lies in `range`; the error names the flag, the value, the
/// range, what the value means, and an example.
///
/// # Errors
/// The value is outside the range.
pub fn check_range<T: PartialOrd + Display>(
    flag: &str,
    value: T,
    range: RangeInclusive<T>,
    meaning: &str,
    example: &str,
) -> Result<(), Box<RangeError>> {
    if range.contains(&value) {
        return Ok(());
    }
    Err(Box::new(RangeError {
        flag: flag.to_owned(),
        value: value.to_string(),
        meaning: meaning.to_owned(),
        start: range.start().to_string(),
        end: range.end().to_string(),
        example: example.to_owned(),
        origin: String::new(),
    }))
}

/// `--stats-interval` (both tools) against its range.
///
/// # Errors
/// Above [`MAX_STATS_INTERVAL`].
pub fn check_stats_interval(seconds: u64) -> Result<(), Box<RangeError>> {
    check_range(
        "--stats-interval",
        seconds,
        0..=MAX_STATS_INTERVAL,
        "the statistics interval in seconds (0: only at exit)",
        "5",
    )
}

/// Names the YAML key of `config` that set the flag of `error`, when the command line did not
/// give that flag (its value then came from the file).
pub fn name_yaml_key<A: clap::CommandFactory, F: crate::config::ConfigFile>(
    mut error: Box<RangeError>,
    matches: &clap::ArgMatches,
    config: Option<&Path>,
) -> Box<RangeError> {
    let Some(path) = config else {
        return error;
    };
    let flag = error.flag.trim_start_matches('-');
    let command = A::command();
    let Some(arg) = command.get_arguments().find(|a| {
        a.get_long() == Some(flag) || a.get_short().is_some_and(|s| flag == s.to_string())
    }) else {
        return error;
    };
    let id = arg.get_id().as_str();
    if matches.value_source(id) == Some(clap::parser::ValueSource::CommandLine) {
        return error;
    }
    if let Ok(file) = F::load(path) {
        if let Some(setting) = file.settings().into_iter().find(|s| s.id == id) {
            error.origin = format!(
                " (set by the YAML key {} in {})",
                setting.key,
                path.display()
            );
        }
    }
    error
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_errors_name_flag_value_range_and_example() {
        assert!(check_range("-t", 600u64, 0..=MAX_SECONDS, "the session timeout", "600").is_ok());
        let e = check_range(
            "-t",
            u64::MAX,
            0..=MAX_SECONDS,
            "the session timeout",
            "600",
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            e,
            "bad -t value 18446744073709551615: the session timeout must be 0..=31536000, e.g. -t 600"
        );
    }

    #[test]
    fn allow_lists_match_addresses_and_networks() {
        let a = AllowList::parse("10.77.0.20, 10.78.0.0/16,fd00::/8").unwrap();
        for yes in ["10.77.0.20", "10.78.3.4", "fd00::1", "::ffff:10.77.0.20"] {
            assert!(a.allows(yes.parse().unwrap()), "{yes}");
        }
        for no in ["10.77.0.21", "10.79.0.1", "fe80::1", "127.0.0.1"] {
            assert!(!a.allows(no.parse().unwrap()), "{no}");
        }
        assert!(AllowList::parse("0.0.0.0/0")
            .unwrap()
            .allows("1.2.3.4".parse().unwrap()));
        for bad in ["", "10.0.0", "10.0.0.0/33", "x", "10.0.0.1/-1"] {
            let e = AllowList::parse(bad).unwrap_err().to_string();
            assert!(e.contains("bad --allow value"), "{e}");
        }
    }

    #[test]
    fn capture_files_and_interfaces_are_told_apart() {
        let dir = std::env::temp_dir().join(format!("compat-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("capture.pcap");
        std::fs::write(&file, b"x").unwrap();
        assert!(is_capture_file(file.to_str().unwrap()));
        assert!(!is_capture_file(dir.to_str().unwrap()), "a directory");
        assert!(!is_capture_file("lo"), "an interface");
        assert!(!is_capture_file("eth0,eth1"));
        assert!(!is_capture_file("any"));
        assert!(!is_capture_file(dir.join("missing.pcap").to_str().unwrap()));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
