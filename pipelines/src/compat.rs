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

/// True when a `-i` value names a capture file rather than interfaces: an existing regular
/// file that is not also the name of an interface (the C `--offline` build's `-i FILE`).
pub fn is_capture_file(value: &str) -> bool {
    if value.contains(',') || value == "any" {
        return false;
    }
    let interface = Path::new("/sys/class/net").join(value);
    Path::new(value).is_file() && !(value.len() < 16 && !value.contains('/') && interface.exists())
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
) -> anyhow::Result<()> {
    if range.contains(&value) {
        return Ok(());
    }
    anyhow::bail!(
        "bad {flag} value {value}: {meaning} must be {}..={}, e.g. {flag} {example}",
        range.start(),
        range.end()
    )
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
