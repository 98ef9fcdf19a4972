//! YAML configuration files for tcpcopy and intercept (`--config FILE`, `--check`).
//!
//! One file per tool. Every key maps to one command-line flag ([`TcpcopyFile`],
//! [`InterceptFile`]; the flag is named in each field's doc), unknown keys are errors, and a key
//! left out takes the flag's default. The file's values become the flags' defaults, so a flag
//! given on the command line overrides the file, key by key ([`parse_args`]). One exception
//! keeps a run coherent: a capture port chosen on the command line (`-i`, `--dpdk-rx` or
//! `--pcap`) replaces the file's port sections of the other kinds (`ports.afpacket`,
//! `ports.dpdk`, `ports.pcap`).
//!
//! Errors name the YAML path (`session.timeout`), the bad value and the accepted form; parse
//! errors keep the YAML library's line and column. The YAML library is `serde_norway`, the
//! maintained fork of `serde_yaml` (same serde model, its own maintained libyaml translation).
//!
//! ```
//! use pipelines::config::{ConfigFile, TcpcopyFile};
//! let file = TcpcopyFile::from_yaml("session:\n  timeout: 30\ntransfers: 80-10.0.0.30:8080\n").unwrap();
//! assert_eq!(file.session.unwrap().timeout, Some(30));
//! let err = TcpcopyFile::from_yaml("session:\n  timout: 30\n").unwrap_err().to_string();
//! assert!(err.contains("session: unknown field `timout`"), "{err}");
//! ```

use crate::intercept::InterceptConfig;
use crate::tcpcopy::transform::{parse_transfers, ClientAddrs, FlagError};
use crate::tcpcopy::TcpcopyConfig;
use crate::udpcopy::UdpcopyConfig;
use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::parser::ValueSource;
use clap::{ArgMatches, Command, CommandFactory, Parser};
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{SerializeMap, SerializeSeq, Serializer};
use serde::{Deserialize, Serialize};
use std::ffi::OsString;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

/// Why a configuration file, or the flags merged with it, cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read the config file {path}: {error}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        error: std::io::Error,
    },
    /// The text is not YAML, or does not fit the model: an unknown key, a value of the wrong
    /// type. The message starts with the YAML path and ends with the line and column.
    #[error("{0}")]
    Parse(#[from] serde_norway::Error),
    /// A value is malformed or out of range.
    #[error("bad {key} value '{value}': {reason}; the form is {form}")]
    Value {
        /// The YAML path, e.g. `session.timeout`.
        key: String,
        /// The offending value.
        value: String,
        /// What is wrong with it.
        reason: String,
        /// The accepted form, with an example.
        form: String,
    },
    /// Keys that cannot be used together, or a key whose check has no single value.
    #[error("{key}: {message}")]
    Invalid {
        /// The YAML path.
        key: String,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// A key whose flag this build's command line does not have.
    #[error("{key}: this build of the command has no flag for it (argument id {id})")]
    NoFlag {
        /// The YAML path.
        key: String,
        /// The clap argument id.
        id: &'static str,
    },
    /// An error in the file `path` (the inner error names the key).
    #[error("config file {path}: {error}")]
    InFile {
        /// The file.
        path: PathBuf,
        /// The error.
        error: Box<ConfigError>,
    },
}

/// The error of a `bad KEY value` kind.
fn bad(key: &str, value: impl fmt::Display, reason: impl Into<String>, form: &str) -> ConfigError {
    ConfigError::Value {
        key: key.to_string(),
        value: value.to_string(),
        reason: reason.into(),
        form: form.to_string(),
    }
}

/// A [`FlagError`] of the flag's parser, re-addressed to the YAML path `key`.
fn from_flag_error(key: &str, e: FlagError) -> ConfigError {
    bad(key, e.value, e.reason, e.form)
}

/// A flag error message (`bad -s value ...`) re-addressed to the YAML path `key`.
fn from_flag_message(key: &str, flag: &str, message: &str) -> ConfigError {
    let prefix = format!("bad {flag} value ");
    match message.strip_prefix(&prefix) {
        Some(rest) => ConfigError::Invalid {
            key: key.to_string(),
            message: format!("bad value {rest}"),
        },
        None => ConfigError::Invalid {
            key: key.to_string(),
            message: message.to_string(),
        },
    }
}

/// One key of a file as a flag's default: the YAML path, the clap argument id and the values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    /// The YAML path, e.g. `session.timeout`.
    pub key: String,
    /// The clap argument id (the `Args` field name), e.g. `timeout`.
    pub id: &'static str,
    /// The values as command-line text (one, or several for repeatable flags).
    pub values: Vec<String>,
}

/// A tool's configuration file model.
pub trait ConfigFile: Sized + Serialize {
    /// Parses and checks the YAML text.
    ///
    /// # Errors
    /// A parse error (YAML path, line and column) or a bad value (YAML path, value, form).
    fn from_yaml(text: &str) -> Result<Self, ConfigError>;

    /// The keys that are set, as flag defaults.
    fn settings(&self) -> Vec<Setting>;

    /// The settings read back from parsed flags (flags, file and defaults merged).
    fn from_matches(matches: &ArgMatches) -> Self;

    /// The argument id of every key.
    fn flag_ids() -> Vec<&'static str>;

    /// Reads, parses and checks the file at `path`.
    ///
    /// # Errors
    /// The file cannot be read, or [`ConfigFile::from_yaml`] fails (the file is named).
    fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        Self::from_yaml(&text).map_err(|error| ConfigError::InFile {
            path: path.to_path_buf(),
            error: Box::new(error),
        })
    }

    /// The settings as YAML text.
    ///
    /// # Errors
    /// The serializer fails (it does not for these models).
    fn to_yaml(&self) -> Result<String, ConfigError> {
        Ok(serde_norway::to_string(self)?)
    }
}

/// Why the command line could not be parsed: clap's own error (printed by clap, with its exit
/// code; `--help` and `--version` come this way too) or the configuration file's.
#[derive(Debug, thiserror::Error)]
pub enum ArgsError {
    /// A flag error, help or version.
    #[error("{0}")]
    Clap(#[from] clap::Error),
    /// The `--config` file.
    #[error("{0}")]
    Config(#[from] ConfigError),
}

/// The arguments of the process, merged with the `--config FILE` they name (when the command
/// has a `config` argument): see [`parse_args_from`]. A clap error (bad flag, `--help`) is
/// printed and ends the process as clap does.
///
/// # Errors
/// The configuration file cannot be read or is bad.
pub fn parse_args<A: Parser, F: ConfigFile>() -> Result<(A, ArgMatches), ConfigError> {
    match parse_args_from::<A, F, _, _>(std::env::args_os()) {
        Ok(parsed) => Ok(parsed),
        Err(ArgsError::Clap(e)) => e.exit(),
        Err(ArgsError::Config(e)) => Err(e),
    }
}

/// The capture port kinds and the argument id that selects each.
const PORT_KINDS: [(&str, &str); 3] = [
    ("ports.afpacket.", "interface"),
    ("ports.dpdk.", "dpdk_rx"),
    ("ports.pcap.", "pcap"),
];

/// Parses `argv` (program name first) into `A`, with the file named by `--config` (argument id
/// `config`) as the defaults of the flags: a flag given on the command line wins over the file,
/// a key of the file wins over the flag's built-in default. Flags the file supplies are no
/// longer required. A capture port chosen on the command line drops the file's port sections of
/// the other kinds. Also returns the matches, for [`effective_yaml`] and `value_source`.
///
/// # Errors
/// clap's error, or the file's ([`ConfigError::NoFlag`] when the command lacks a key's flag).
pub fn parse_args_from<A, F, I, T>(argv: I) -> Result<(A, ArgMatches), ArgsError>
where
    A: Parser,
    F: ConfigFile,
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let argv: Vec<OsString> = argv.into_iter().map(Into::into).collect();
    let mut command = A::command();
    let has = |command: &Command, id: &str| command.get_arguments().any(|a| a.get_id() == id);
    // The flags the command line gives, and the file's (rendered as clap renders them).
    let mut given: Vec<String> = Vec::new();
    let mut supplied: Vec<&str> = Vec::new();
    if has(&command, "config") {
        // A first pass that tolerates missing flags finds --config and what the command line
        // gives; the real pass below reports errors.
        let first = command
            .clone()
            .ignore_errors(true)
            .try_get_matches_from(argv.clone());
        if let Ok(first) = first {
            given = command
                .get_arguments()
                .map(|a| a.get_id().to_string())
                .filter(|id| first.value_source(id) == Some(ValueSource::CommandLine))
                .collect();
            if let Ok(Some(path)) = first.try_get_one::<PathBuf>("config") {
                let file = F::load(path)?;
                let chosen = PORT_KINDS.iter().find(|(_, id)| {
                    has(&command, id) && first.value_source(id) == Some(ValueSource::CommandLine)
                });
                for setting in file.settings() {
                    if let Some((kind, _)) = chosen {
                        let other_port = PORT_KINDS
                            .iter()
                            .any(|(k, _)| k != kind && setting.key.starts_with(k));
                        if other_port {
                            continue;
                        }
                    }
                    if !has(&command, setting.id) {
                        return Err(ConfigError::NoFlag {
                            key: setting.key,
                            id: setting.id,
                        }
                        .into());
                    }
                    // clap takes `'static` defaults (without its `string` feature): the few
                    // values of one file, leaked once at startup.
                    let values: Vec<&'static str> = setting
                        .values
                        .into_iter()
                        .map(|v| &*Box::leak(v.into_boxed_str()))
                        .collect();
                    supplied.push(setting.id);
                    command = command
                        .mut_arg(setting.id, |arg| arg.default_values(values).required(false));
                }
            }
        }
    }
    let matches = match command.clone().try_get_matches_from(argv.clone()) {
        // A flag given here that `requires` one the file supplies (`-a` needs `--pcap`): clap
        // does not count defaults as present, so relax the requirement when the file meets it.
        Err(e) if e.kind() == ErrorKind::MissingRequiredArgument && !supplied.is_empty() => {
            let mut built = command.clone();
            built.build();
            let supplied: Vec<String> = built
                .get_arguments()
                .filter(|a| supplied.contains(&a.get_id().as_str()))
                .map(|a| a.to_string())
                .collect();
            let met = match e.get(ContextKind::InvalidArg) {
                Some(ContextValue::Strings(missing)) => {
                    !missing.is_empty() && missing.iter().all(|m| supplied.contains(m))
                }
                _ => false,
            };
            if !met {
                return Err(e.into());
            }
            for id in &given {
                command = command.mut_arg(id, |arg| arg.requires(clap::builder::Resettable::Reset));
            }
            command.try_get_matches_from(argv)?
        }
        other => other?,
    };
    let args = A::from_arg_matches(&matches)?;
    Ok((args, matches))
}

/// The effective settings (flags, file and built-in defaults merged) as YAML, followed by a
/// comment naming the flags of `A` that no key of `F` maps to (none, normally).
///
/// # Errors
/// The serializer fails (it does not for these models).
pub fn effective_yaml<A: CommandFactory, F: ConfigFile>(
    matches: &ArgMatches,
) -> Result<String, ConfigError> {
    let mut yaml = F::from_matches(matches).to_yaml()?;
    let unmapped = unmapped_flags::<A, F>();
    if !unmapped.is_empty() {
        yaml.push_str(&format!(
            "# flags without a config key (give them on the command line): {}\n",
            unmapped.join(" ")
        ));
    }
    Ok(yaml)
}

/// The flags of `A` (as `-x` or `--long`) that no key of `F` maps to, besides `--config`,
/// `--check`, help and version.
pub fn unmapped_flags<A: CommandFactory, F: ConfigFile>() -> Vec<String> {
    let ids = F::flag_ids();
    A::command()
        .get_arguments()
        .filter(|arg| {
            let id = arg.get_id().as_str();
            !matches!(
                arg.get_action(),
                clap::ArgAction::Help
                    | clap::ArgAction::HelpLong
                    | clap::ArgAction::HelpShort
                    | clap::ArgAction::Version
            ) && id != "config"
                && id != "check"
                && !crate::compat::C_ONLY_FLAGS.contains(&id)
                && !ids.contains(&id)
        })
        .map(|arg| match (arg.get_long(), arg.get_short()) {
            (Some(long), _) => format!("--{long}"),
            (None, Some(short)) => format!("-{short}"),
            (None, None) => arg.get_id().to_string(),
        })
        .collect()
}

/// What `--check` prints: the effective settings, then the pipeline lines as YAML comments
/// (so the whole report can serve as a configuration file).
pub fn check_report(effective: &str, pipeline: &[String]) -> String {
    let mut out = String::from("# effective settings (flags override the file)\n");
    out.push_str(effective);
    out.push_str("# pipeline\n");
    for line in pipeline {
        out.push_str("# ");
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// One line per worker and port of a checked tcpcopy configuration, then the transfers and the
/// control channel.
pub fn tcpcopy_pipeline(config: &TcpcopyConfig) -> Vec<String> {
    let workers = config.workers.max(1);
    let capture = match (&config.dpdk, &config.offline) {
        (Some(d), _) => format!("dpdk {}", d.rx_device),
        (None, Some(o)) => format!("pcap file {}", o.path.display()),
        (None, None) => format!("afpacket {}", config.interface),
    };
    let transmit = match (&config.dpdk, &config.output_interface) {
        (Some(d), _) => format!(
            "dpdk {}{}",
            d.tx_device.as_deref().unwrap_or(&d.rx_device),
            d.next_hop
                .as_deref()
                .map(|h| format!(" next hop {h}"))
                .unwrap_or_default()
        ),
        (None, Some(i)) => format!("raw socket out of {i}"),
        (None, None) => "raw socket by the routing table".to_string(),
    };
    let mut lines: Vec<String> = (0..workers)
        .map(|i| {
            let share = if workers > 1 {
                format!(" (client ports {}/{workers})", i + 1)
            } else {
                String::new()
            };
            let core = match &config.cores {
                Some(cores) if !cores.is_empty() => format!("core {}", cores[i % cores.len()]),
                _ => "not pinned".to_string(),
            };
            format!(
                "worker {i}: capture {capture}{share} filter \"{}\", transmit {transmit}, {core}",
                config.filter
            )
        })
        .collect();
    if let Some(o) = &config.offline {
        lines.push(format!(
            "pcap: acceleration {}, {}, {} round(s), tail {:?}",
            o.acceleration,
            o.idle_gap.map_or("idle gaps kept".to_string(), |g| format!(
                "idle gaps over {g:?} skipped"
            )),
            o.rounds,
            o.tail
        ));
    }
    let transfers: Vec<String> = config.transfers.iter().map(|t| t.to_string()).collect();
    lines.push(format!(
        "transfers: {}{}",
        transfers.join(","),
        config
            .clients
            .as_ref()
            .map(|c| format!(", {} client address(es)", c.addrs().len()))
            .unwrap_or_default()
    ));
    let intercepts: Vec<String> = config.intercepts.iter().map(|a| a.to_string()).collect();
    lines.push(format!(
        "control: {} connection(s) over {} to each of {} ({:?} framing, {:?} records, {})",
        config.connections,
        config.transport,
        intercepts.join(","),
        config.framing,
        config.record_format,
        if config.auth.is_some() {
            "authenticated"
        } else {
            "no authentication"
        }
    ));
    lines
}

/// The pipeline lines of a checked `tcpcopy --udp` configuration.
pub fn udpcopy_pipeline(config: &UdpcopyConfig) -> Vec<String> {
    let transfers: Vec<String> = config
        .replay
        .transfers
        .iter()
        .map(|t| t.to_string())
        .collect();
    vec![
        format!(
            "worker 0: capture afpacket {} filter \"{}\", transmit {}",
            config.interface,
            config.filter,
            config
                .output_interface
                .as_deref()
                .map_or("raw socket by the routing table".to_string(), |i| format!(
                    "raw socket out of {i}"
                ))
        ),
        format!(
            "udp transfers: {}, mtu {}",
            transfers.join(","),
            config.replay.mtu
        ),
    ]
}

/// One line per capture worker of a checked intercept configuration, then the listener.
pub fn intercept_pipeline(config: &InterceptConfig) -> Vec<String> {
    let capture = match &config.dpdk {
        Some(d) => format!("dpdk {} (filter in user space)", d.rx_device),
        None => format!("afpacket {}", config.interface),
    };
    let mut lines: Vec<String> = (0..config.workers.max(1))
        .map(|i| format!("worker {i}: capture {capture} filter \"{}\"", config.filter))
        .collect();
    lines.push(format!(
        "control: listen {} over {} ({:?} framing, {:?} records, {}), routes idle {:?}{}",
        config.listen,
        config.transport,
        config.framing,
        config.record_format,
        if config.auth.is_some() {
            "authenticated"
        } else {
            "no authentication"
        },
        config.route_timeout,
        match (config.single, config.protect) {
            (true, true) => ", single, protected",
            (true, false) => ", single",
            _ => "",
        }
    ));
    if let Some(allow) = &config.allow {
        lines.push(format!("control: only tcpcopys at {allow} may connect"));
    }
    lines
}

// ---- values: flag text and back ----

/// A setting's value as command-line text, and read back from parsed flags.
trait FlagValue: Sized {
    /// The flag's values.
    fn to_args(&self) -> Vec<String>;
    /// The value from the flag's raw values (`None` if they do not parse).
    fn from_raw(raw: Vec<String>) -> Option<Self>;
}

macro_rules! flag_value_by_str {
    ($($ty:ty),*) => {$(
        impl FlagValue for $ty {
            fn to_args(&self) -> Vec<String> {
                vec![self.to_string()]
            }
            fn from_raw(raw: Vec<String>) -> Option<Self> {
                raw.first()?.parse().ok()
            }
        }
    )*};
}
flag_value_by_str!(u8, u16, u32, u64, usize, f64, bool, String, Ipv4Addr);

impl FlagValue for PathBuf {
    fn to_args(&self) -> Vec<String> {
        vec![self.display().to_string()]
    }
    fn from_raw(raw: Vec<String>) -> Option<Self> {
        raw.into_iter().next().map(PathBuf::from)
    }
}

/// Reads the value of argument `id` from `matches` (`None`: not set, or no such argument).
fn read<T: FlagValue>(matches: &ArgMatches, id: &str) -> Option<T> {
    if let Ok(Some(flag)) = matches.try_get_one::<bool>(id) {
        return T::from_raw(vec![flag.to_string()]);
    }
    let raw = matches.try_get_raw(id).ok()??;
    T::from_raw(raw.map(|v| v.to_string_lossy().into_owned()).collect())
}

/// A comma list flag (`-s`, `-c`, `--cores`): in YAML a list, or one string with commas.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct List(pub Vec<String>);

impl List {
    /// The flag's text: the items joined by commas.
    pub fn text(&self) -> String {
        self.0.join(",")
    }
}

impl FlagValue for List {
    fn to_args(&self) -> Vec<String> {
        vec![self.text()]
    }
    fn from_raw(raw: Vec<String>) -> Option<Self> {
        Some(List(
            raw.first()?
                .split(',')
                .map(|s| s.trim().to_string())
                .collect(),
        ))
    }
}

impl Serialize for List {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(self.0.len()))?;
        for item in &self.0 {
            match item.parse::<u64>() {
                Ok(n) if n.to_string() == *item => seq.serialize_element(&n)?,
                _ => seq.serialize_element(item)?,
            }
        }
        seq.end()
    }
}

/// Accepts a YAML scalar (string, integer, float, boolean) as its text.
struct Scalar(String);

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string or a number")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
        }
        deserializer.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for List {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = List;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list, or one string with commas (a,b)")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<List, E> {
                Ok(List(v.split(',').map(|s| s.trim().to_string()).collect()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<List, E> {
                Ok(List(vec![v.to_string()]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<List, A::Error> {
                let mut items = Vec::new();
                while let Some(Scalar(item)) = seq.next_element()? {
                    items.push(item);
                }
                Ok(List(items))
            }
        }
        deserializer.deserialize_any(V)
    }
}

/// A repeatable flag (`--dpdk-vdev`, `--dpdk-pci`): in YAML a list, or one string (one item:
/// commas stay, `net_af_packet0,iface=eth0` is one device).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Many(pub Vec<String>);

impl FlagValue for Many {
    fn to_args(&self) -> Vec<String> {
        self.0.clone()
    }
    fn from_raw(raw: Vec<String>) -> Option<Self> {
        Some(Many(raw))
    }
}

impl<'de> Deserialize<'de> for Many {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Many;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list of strings, or one string")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Many, E> {
                Ok(Many(vec![v.to_string()]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Many, A::Error> {
                let mut items = Vec::new();
                while let Some(Scalar(item)) = seq.next_element()? {
                    items.push(item);
                }
                Ok(Many(items))
            }
        }
        deserializer.deserialize_any(V)
    }
}

/// One `-x` entry: `{online: 80, target: 10.0.0.30:8080}` or the flag's text
/// `80-10.0.0.30:8080`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransferEntry {
    /// `[onlineIP:]onlinePort-targetIP:targetPort`.
    Text(String),
    /// The two sides.
    Pair {
        /// `[onlineIP:]onlinePort`, e.g. `80` or `10.0.0.5:80`.
        online: String,
        /// `targetIP:targetPort`, e.g. `10.0.0.30:8080`.
        target: String,
    },
}

impl TransferEntry {
    /// The entry as `-x` text.
    pub fn text(&self) -> String {
        match self {
            TransferEntry::Text(t) => t.clone(),
            TransferEntry::Pair { online, target } => format!("{online}-{target}"),
        }
    }
}

/// The `-x` transfer list: in YAML a list of `{online, target}` maps or `-x` strings, or one
/// `-x` string.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Transfers(pub Vec<TransferEntry>);

impl Transfers {
    /// The list as `-x` text.
    pub fn text(&self) -> String {
        let entries: Vec<String> = self.0.iter().map(TransferEntry::text).collect();
        entries.join(",")
    }
}

impl FlagValue for Transfers {
    fn to_args(&self) -> Vec<String> {
        vec![self.text()]
    }
    fn from_raw(raw: Vec<String>) -> Option<Self> {
        Some(Transfers(
            raw.first()?
                .split(',')
                .map(|entry| {
                    let entry = entry.trim();
                    match entry.split_once('-') {
                        Some((online, target)) => TransferEntry::Pair {
                            online: online.to_string(),
                            target: target.to_string(),
                        },
                        None => TransferEntry::Text(entry.to_string()),
                    }
                })
                .collect(),
        ))
    }
}

impl Serialize for Transfers {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(self.0.len()))?;
        for entry in &self.0 {
            seq.serialize_element(entry)?;
        }
        seq.end()
    }
}

impl Serialize for TransferEntry {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            TransferEntry::Text(t) => serializer.serialize_str(t),
            TransferEntry::Pair { online, target } => {
                let mut map = serializer.serialize_map(Some(2))?;
                match online.parse::<u16>() {
                    Ok(port) if port.to_string() == *online => {
                        map.serialize_entry("online", &port)?
                    }
                    _ => map.serialize_entry("online", online)?,
                }
                map.serialize_entry("target", target)?;
                map.end()
            }
        }
    }
}

/// The map form of a transfer entry.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PairForm {
    online: Scalar,
    target: String,
}

impl<'de> Deserialize<'de> for TransferEntry {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = TransferEntry;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "{online: PORT or IP:PORT, target: IP:PORT} or a string like 80-10.0.0.30:8080",
                )
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<TransferEntry, E> {
                Ok(TransferEntry::Text(v.trim().to_string()))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<TransferEntry, A::Error> {
                let pair = PairForm::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(TransferEntry::Pair {
                    online: pair.online.0,
                    target: pair.target,
                })
            }
        }
        deserializer.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for Transfers {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Transfers;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "a list of {online, target} maps, or a -x string like 80-10.0.0.30:8080",
                )
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Transfers, E> {
                Ok(Transfers(
                    v.split(',')
                        .map(|e| TransferEntry::Text(e.trim().to_string()))
                        .collect(),
                ))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Transfers, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = seq.next_element()? {
                    entries.push(entry);
                }
                Ok(Transfers(entries))
            }
        }
        deserializer.deserialize_any(V)
    }
}

/// `--transport`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportName {
    /// TCP, the C tools' format.
    Tcp,
    /// UDP datagrams with sequence numbers.
    Udp,
}

impl FlagValue for TransportName {
    fn to_args(&self) -> Vec<String> {
        vec![match self {
            TransportName::Tcp => "tcp".into(),
            TransportName::Udp => "udp".into(),
        }]
    }
    fn from_raw(raw: Vec<String>) -> Option<Self> {
        match raw.first()?.to_ascii_lowercase().as_str() {
            "tcp" => Some(TransportName::Tcp),
            "udp" => Some(TransportName::Udp),
            _ => None,
        }
    }
}

/// `--metrics-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MetricsFormatName {
    /// One JSON object.
    Json,
    /// Prometheus text.
    Prometheus,
}

impl FlagValue for MetricsFormatName {
    fn to_args(&self) -> Vec<String> {
        vec![match self {
            MetricsFormatName::Json => "json".into(),
            MetricsFormatName::Prometheus => "prometheus".into(),
        }]
    }
    fn from_raw(raw: Vec<String>) -> Option<Self> {
        match raw.first()?.to_ascii_lowercase().as_str() {
            "json" => Some(MetricsFormatName::Json),
            "prometheus" => Some(MetricsFormatName::Prometheus),
            _ => None,
        }
    }
}

// ---- the sections ----

/// Defines a section: a struct of optional keys (each `key: Type => "clap id"`), optional
/// sub-sections, and the conversions to flag defaults and back.
macro_rules! section {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $( $(#[$fmeta:meta])* $field:ident : $ty:ty => $id:literal, )*
        }
        $( sections { $( $(#[$smeta:meta])* $sub:ident : $sty:ty, )* } )?
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct $name {
            $(
                $(#[$fmeta])*
                #[serde(default, skip_serializing_if = "Option::is_none")]
                pub $field: Option<$ty>,
            )*
            $($(
                $(#[$smeta])*
                #[serde(default, skip_serializing_if = "Option::is_none")]
                pub $sub: Option<$sty>,
            )*)?
        }

        impl $name {
            /// Appends the keys that are set, under `prefix` (`session.`).
            #[allow(unused_variables)]
            fn settings(&self, prefix: &str, out: &mut Vec<Setting>) {
                $(
                    if let Some(value) = &self.$field {
                        out.push(Setting {
                            key: format!("{prefix}{}", stringify!($field)),
                            id: $id,
                            values: FlagValue::to_args(value),
                        });
                    }
                )*
                $($(
                    if let Some(section) = &self.$sub {
                        section.settings(&format!("{prefix}{}.", stringify!($sub)), out);
                    }
                )*)?
            }

            /// Appends the argument ids of every key.
            fn ids(out: &mut Vec<&'static str>) {
                $( out.push($id); )*
                $($( <$sty>::ids(out); )*)?
            }

            /// The section read back from parsed flags.
            #[allow(unused_variables)]
            fn from_matches(matches: &ArgMatches) -> Self {
                $name {
                    $( $field: read::<$ty>(matches, $id), )*
                    $($(
                        $sub: Some(<$sty>::from_matches(matches))
                            .filter(|s| *s != <$sty>::default()),
                    )*)?
                }
            }
        }
    };
}

section! {
    /// `ports.afpacket`: capture on a kernel interface.
    pub struct Afpacket {
        /// `-i`: where to capture: `eth0`, a list `eth0,eth1`, or `any` (every interface,
        /// the default without the key).
        interface: String => "interface",
        /// `-B` (tcpcopy): the capture ring's size in MiB, 1..=4096.
        buffer_mib: u32 => "capture_buffer_mib",
    }
}

section! {
    /// `ports.dpdk`: capture and transmit through DPDK devices.
    pub struct Dpdk {
        /// `--dpdk-rx`: the capture device (PCI address or vdev name).
        rx: String => "dpdk_rx",
        /// `--dpdk-tx`: the transmit device (default: `rx`).
        tx: String => "dpdk_tx",
        /// `--dpdk-vdev`: virtual devices, e.g. `[net_af_packet0,iface=eth0]`.
        vdev: Many => "dpdk_vdev",
        /// `--dpdk-pci`: allowed PCI devices.
        pci: Many => "dpdk_pci",
        /// `--dpdk-in-memory`.
        in_memory: bool => "dpdk_in_memory",
        /// `--dpdk-lcores`.
        lcores: String => "dpdk_lcores",
        /// `--next-hop`: MAC or IPv4 address of the next hop.
        next_hop: String => "next_hop",
    }
}

section! {
    /// `ports.pcap`: replay a capture file instead of capturing live.
    pub struct Pcap {
        /// `--pcap`: the pcap or pcapng file.
        file: PathBuf => "pcap",
        /// `-a`: replay N times faster than captured (0.01..=1000000).
        acceleration: f64 => "acceleration",
        /// `-I`: gaps longer than this many milliseconds are skipped (0: off).
        idle_gap_ms: u64 => "idle_gap_ms",
        /// `-T`: replay the file N times.
        repeats: u32 => "rounds",
        /// `--offline-tail-s`: seconds a round waits for open sessions after the file's end.
        tail_s: f64 => "offline_tail_s",
    }
}

section! {
    /// `ports` of tcpcopy: where packets come from and go to (one of `afpacket`, `dpdk`, `pcap`).
    pub struct TcpcopyPorts {
        /// `-F`: capture filter (default: made from the transfers).
        filter: String => "filter",
        /// `-o`: send replayed packets out of this interface only.
        output_interface: String => "output_interface",
    }
    sections {
        /// Kernel interface capture.
        afpacket: Afpacket,
        /// DPDK ports.
        dpdk: Dpdk,
        /// Capture file replay.
        pcap: Pcap,
    }
}

section! {
    /// `workers` of tcpcopy.
    pub struct TcpcopyWorkers {
        /// `--workers`: worker threads (1..=64).
        count: usize => "workers",
        /// `--cores`: pin worker i to the i-th core, e.g. `[2, 3]`.
        cores: List => "cores",
        /// `--busy-poll`: never park the workers.
        busy_poll: bool => "busy_poll",
    }
}

section! {
    /// `transforms`: client address rewrites.
    pub struct Transforms {
        /// `-c`: replay client addresses, e.g. `[10.9.9.x]`.
        clients: List => "clients",
        /// `-H`: replace the client address 127.0.0.1 by this one.
        localhost_as: Ipv4Addr => "localhost_as",
    }
}

section! {
    /// `sampling`: which sessions are replayed.
    pub struct Sampling {
        /// `-r`: this percentage of the sessions (1..=100).
        percent: u32 => "sample",
        /// `-g`: ramp up from 1 % to all in 100 s.
        ramp: bool => "ramp",
    }
}

section! {
    /// `copies`: multiplied replay.
    pub struct Copies {
        /// `-n`: replay every session N times (1..=1023).
        count: u16 => "copies",
        /// `-f`: instance number 0..=31.
        instance: u8 => "instance",
    }
}

section! {
    /// `session`: the session engine's tunables.
    pub struct Session {
        /// `-t`: seconds of target silence after which a session is reset.
        timeout: u64 => "timeout",
        /// `-k`: keep-alive seconds of idle sessions (default: timeout + 120).
        keepalive: u64 => "keepalive",
        /// `-W`: do not wait for the target's response.
        no_wait: bool => "no_wait",
        /// `-O`: replay only sessions whose SYN was captured.
        only_syn: bool => "only_syn",
        /// `-D`: MSS of fabricated SYNs (64..=65495).
        fake_mss: u16 => "fake_mss",
        /// `-M`: MTU towards the target (576..=65535).
        mtu: u16 => "mtu",
        /// `--pace-idle-ms`: silence after which a held request is released.
        pace_idle_ms: u64 => "pace_idle_ms",
        /// `-m`: memory cap in MiB (idle sessions are shed near it).
        memory_mib: u64 => "memory_mib",
        /// `--module`: protocol module, e.g. `line-auth=AUTH :AUTH secret`.
        module: String => "module",
    }
}

section! {
    /// `control` of tcpcopy: the channel to intercept.
    pub struct TcpcopyControl {
        /// `-s`: intercept addresses `ip[:port]`, e.g. `[10.0.0.40]`.
        intercepts: List => "servers",
        /// `-p`: intercept port for entries without one.
        port: u16 => "port",
        /// `-C`: connections to each intercept (1..=16).
        connections: usize => "connections",
        /// `--transport`: `tcp` or `udp`.
        transport: TransportName => "transport",
        /// `--auth-file`: the shared secret's file.
        auth_file: PathBuf => "auth_file",
        /// `--payload-records`.
        payload_records: bool => "payload_records",
        /// `--plain-framing`.
        plain_framing: bool => "plain_framing",
        /// `-L`: accepted for compatibility.
        lonely: bool => "lonely",
    }
}

section! {
    /// `outputs.metrics`: statistics exposition.
    pub struct Metrics {
        /// `--metrics-file`.
        file: PathBuf => "metrics_file",
        /// `--metrics-format`: `json` or `prometheus`.
        format: MetricsFormatName => "metrics_format",
        /// `--metrics-listen`: `IP:PORT`.
        listen: String => "metrics_listen",
    }
}

section! {
    /// `outputs` of tcpcopy: logs, statistics, process.
    pub struct TcpcopyOutputs {
        /// `-l`: log file (default: stderr).
        log_file: PathBuf => "log",
        /// `--log-level`: error, warn, info, debug, trace (or an env-filter directive).
        log_level: String => "log_level",
        /// `--stats-interval`: seconds between statistics lines (0: only at exit).
        stats_interval: u64 => "stats_interval",
        /// `--histogram-log`: HdrHistogram interval log.
        histogram_log: PathBuf => "histogram_log",
        /// `--dump-sent`: pcap file of every packet sent to the target.
        dump_sent: PathBuf => "dump_sent",
        /// `-P`: pid file.
        pid_file: PathBuf => "pid_file",
        /// `-d`: run as a daemon.
        daemon: bool => "daemon",
    }
    sections {
        /// Metrics file and listener.
        metrics: Metrics,
    }
}

section! {
    /// A tcpcopy configuration file (`tcpcopy --config FILE`).
    pub struct TcpcopyFile {
        /// `--udp`: stateless UDP replay.
        udp: bool => "udp",
        /// `-x`: what to replay where.
        transfers: Transfers => "transfers",
    }
    sections {
        /// Capture and transmit ports.
        ports: TcpcopyPorts,
        /// Worker threads.
        workers: TcpcopyWorkers,
        /// Client address rewrites.
        transforms: Transforms,
        /// Session sampling.
        sampling: Sampling,
        /// Copies and instances.
        copies: Copies,
        /// Session tunables.
        session: Session,
        /// The control channel.
        control: TcpcopyControl,
        /// Logs, statistics, process.
        outputs: TcpcopyOutputs,
    }
}

section! {
    /// `ports` of intercept (one of `afpacket`, `dpdk`).
    pub struct InterceptPorts {
        /// `-F`: capture filter selecting the target's replies.
        filter: String => "filter",
    }
    sections {
        /// Kernel interface capture.
        afpacket: Afpacket,
        /// DPDK capture.
        dpdk: Dpdk,
    }
}

section! {
    /// `workers` of intercept.
    pub struct InterceptWorkers {
        /// `--workers`: capture threads (1..=64).
        count: usize => "workers",
    }
}

section! {
    /// `control` of intercept: the listener for tcpcopy and the routes.
    pub struct InterceptControl {
        /// `-b`: address to listen on.
        bind: Ipv4Addr => "bind",
        /// `-p`: port to listen on.
        port: u16 => "port",
        /// `--transport`: `tcp` or `udp`.
        transport: TransportName => "transport",
        /// `--auth-file`: the shared secret's file.
        auth_file: PathBuf => "auth_file",
        /// `--payload-records`.
        payload_records: bool => "payload_records",
        /// `--plain-framing`.
        plain_framing: bool => "plain_framing",
        /// `--route-timeout`: seconds after which an idle route is forgotten.
        route_timeout: u64 => "route_timeout",
        /// `--single`: no routing, replies spread over the connected tcpcopys.
        single: bool => "single",
        /// `-c`: with `single`, refuse a new tcpcopy while one is connected.
        protect: bool => "protect",
        /// `--allow`: the tcpcopy addresses or networks that may connect, e.g.
        /// `10.0.0.20,10.0.1.0/24`.
        allow: String => "allow",
        /// `-D`: the C "docker" rewrite `ipA-ipB` (replies to ipA are routed as replies to
        /// ipB).
        rewrite_client: String => "rewrite_client",
    }
}

section! {
    /// `outputs` of intercept.
    pub struct InterceptOutputs {
        /// `-l`: log file (default: stderr).
        log_file: PathBuf => "log",
        /// `--log-level`.
        log_level: String => "log_level",
        /// `--stats-interval`.
        stats_interval: u64 => "stats_interval",
        /// `-P`: pid file.
        pid_file: PathBuf => "pid_file",
        /// `-d`: run as a daemon.
        daemon: bool => "daemon",
    }
    sections {
        /// Metrics file and listener.
        metrics: Metrics,
    }
}

section! {
    /// An intercept configuration file (`intercept --config FILE`).
    pub struct InterceptFile {
    }
    sections {
        /// Capture port and filter.
        ports: InterceptPorts,
        /// Capture threads.
        workers: InterceptWorkers,
        /// Listener and routes.
        control: InterceptControl,
        /// Logs, statistics, process.
        outputs: InterceptOutputs,
    }
}

// ---- checks ----

/// At most one port kind in `ports`.
fn check_port_kinds(kinds: &[(&str, bool)]) -> Result<(), ConfigError> {
    let set: Vec<&str> = kinds.iter().filter(|(_, s)| *s).map(|(k, _)| *k).collect();
    if set.len() > 1 {
        return Err(ConfigError::Invalid {
            key: "ports".into(),
            message: format!(
                "{} are set; give one capture port: {}",
                set.join(" and "),
                kinds.iter().map(|(k, _)| *k).collect::<Vec<_>>().join(", ")
            ),
        });
    }
    Ok(())
}

fn check_dpdk(dpdk: &Dpdk) -> Result<(), ConfigError> {
    if let Some(hop) = &dpdk.next_hop {
        crate::ports::parse_next_hop(hop).map_err(|e| ConfigError::Invalid {
            key: "ports.dpdk.next_hop".into(),
            message: format!("{e:#}"),
        })?;
    }
    Ok(())
}

fn check_workers(count: Option<usize>) -> Result<(), ConfigError> {
    match count {
        Some(n) if !(1..=crate::intercept::MAX_WORKERS).contains(&n) => Err(bad(
            "workers.count",
            n,
            "not 1..=64 worker threads",
            "a number from 1 to 64, e.g. 2",
        )),
        _ => Ok(()),
    }
}

fn check_outputs(log_level: Option<&String>, metrics: Option<&Metrics>) -> Result<(), ConfigError> {
    if let Some(level) = log_level {
        if tracing_subscriber::EnvFilter::try_new(level).is_err() {
            return Err(bad(
                "outputs.log_level",
                level,
                "not a log level",
                "error, warn, info, debug or trace (or a RUST_LOG directive)",
            ));
        }
    }
    if let Some(listen) = metrics.and_then(|m| m.listen.as_ref()) {
        if listen.parse::<SocketAddr>().is_err() {
            return Err(bad(
                "outputs.metrics.listen",
                listen,
                "not an address to listen on",
                "IP:PORT, e.g. 127.0.0.1:9114",
            ));
        }
    }
    Ok(())
}

/// `control.port`: 1..65535.
fn check_port(port: Option<u16>) -> Result<(), ConfigError> {
    if port == Some(0) {
        return Err(bad(
            "control.port",
            0,
            "port 0 is not a port",
            "1..65535, e.g. 36524",
        ));
    }
    Ok(())
}

impl TcpcopyFile {
    /// Checks every value on its own (combinations with command-line flags are checked when the
    /// pipeline is built).
    fn check(&self) -> Result<(), ConfigError> {
        let transfers = match &self.transfers {
            Some(list) => {
                if list.0.is_empty() {
                    return Err(bad(
                        "transfers",
                        "[]",
                        "the list is empty",
                        "a list of {online, target}, e.g. [{online: 80, target: 10.0.0.30:8080}]",
                    ));
                }
                let mut parsed = Vec::new();
                for (i, entry) in list.0.iter().enumerate() {
                    let text = entry.text();
                    let one = parse_transfers(&text)
                        .map_err(|e| from_flag_error(&format!("transfers[{i}]"), e))?;
                    if one.len() != 1 {
                        return Err(bad(
                            &format!("transfers[{i}]"),
                            text,
                            "one list item holds several transfers",
                            "one transfer per item, e.g. {online: 80, target: 10.0.0.30:8080}",
                        ));
                    }
                    parsed.extend(one);
                }
                parsed
            }
            None => Vec::new(),
        };
        if let Some(ports) = &self.ports {
            check_port_kinds(&[
                ("ports.afpacket", ports.afpacket.is_some()),
                ("ports.dpdk", ports.dpdk.is_some()),
                ("ports.pcap", ports.pcap.is_some()),
            ])?;
            if let Some(dpdk) = &ports.dpdk {
                check_dpdk(dpdk)?;
            }
            if let Some(pcap) = &ports.pcap {
                use crate::tcpcopy::offline::{MAX_ACCELERATION, MIN_ACCELERATION};
                if let Some(a) = pcap.acceleration {
                    if !(MIN_ACCELERATION..=MAX_ACCELERATION).contains(&a) {
                        return Err(bad(
                            "ports.pcap.acceleration",
                            a,
                            "out of range",
                            "a number from 0.01 (100x slower) to 1000000, e.g. 10",
                        ));
                    }
                }
                if pcap.repeats == Some(0) {
                    return Err(bad(
                        "ports.pcap.repeats",
                        0,
                        "the file is replayed at least once",
                        "a number from 1, e.g. 3",
                    ));
                }
                if let Some(t) = pcap.tail_s {
                    if !(t.is_finite() && (0.0..=86_400.0).contains(&t)) {
                        return Err(bad(
                            "ports.pcap.tail_s",
                            t,
                            "out of range",
                            "seconds from 0 to 86400, e.g. 5",
                        ));
                    }
                }
            }
        }
        let workers = self.workers.as_ref();
        check_workers(workers.and_then(|w| w.count))?;
        if let Some(cores) = workers.and_then(|w| w.cores.as_ref()) {
            for (i, core) in cores.0.iter().enumerate() {
                if core.parse::<usize>().is_err() {
                    return Err(bad(
                        &format!("workers.cores[{i}]"),
                        core,
                        "not a core number",
                        "a list of core numbers, e.g. [2, 3]",
                    ));
                }
            }
        }
        if let Some(clients) = self.transforms.as_ref().and_then(|t| t.clients.as_ref()) {
            ClientAddrs::parse(&clients.text(), &transfers)
                .map_err(|e| from_flag_error("transforms.clients", e))?;
        }
        if let Some(percent) = self.sampling.as_ref().and_then(|s| s.percent) {
            crate::tcpcopy::copies::Sampling::percent(percent)
                .map_err(|e| from_flag_error("sampling.percent", e))?;
        }
        if let Some(copies) = &self.copies {
            crate::tcpcopy::copies::PortPlan::new(
                copies.count.unwrap_or(1),
                copies.instance.unwrap_or(0),
                workers.and_then(|w| w.count).unwrap_or(1),
            )
            .map_err(|e| {
                let key = if e.flag == "-f" {
                    "copies.instance"
                } else {
                    "copies.count"
                };
                from_flag_error(key, e)
            })?;
        }
        if let Some(session) = &self.session {
            if let Some(mtu) = session.mtu {
                if mtu < crate::tcpcopy::ingress::MIN_MTU {
                    return Err(bad(
                        "session.mtu",
                        mtu,
                        "the MTU towards the target is too small",
                        "576..=65535, e.g. 1500",
                    ));
                }
            }
            if let Some(mib) = session.memory_mib {
                if !(1..=1 << 22).contains(&mib) {
                    return Err(bad(
                        "session.memory_mib",
                        mib,
                        "out of range for the memory cap",
                        "MiB from 1 to 4194304, e.g. 2048",
                    ));
                }
            }
            if let Some(mss) = session.fake_mss {
                if !(64..=65495).contains(&mss) {
                    return Err(bad(
                        "session.fake_mss",
                        mss,
                        "out of range for the MSS of fabricated SYNs",
                        "64..=65495, e.g. 1460",
                    ));
                }
            }
        }
        if let Some(control) = &self.control {
            check_port(control.port)?;
            if let Some(list) = &control.intercepts {
                if list.0.is_empty() {
                    return Err(bad(
                        "control.intercepts",
                        "[]",
                        "the list is empty",
                        "a list of ip[:port], e.g. [10.0.0.40]",
                    ));
                }
                if list.0.len() > 32 {
                    return Err(bad(
                        "control.intercepts",
                        list.text(),
                        format!("{} intercepts is more than the 32 supported", list.0.len()),
                        "a list of up to 32 ip[:port], e.g. [10.0.0.40]",
                    ));
                }
                for (i, item) in list.0.iter().enumerate() {
                    crate::cli::parse_servers(item, control.port.unwrap_or(36524)).map_err(
                        |e| {
                            from_flag_message(
                                &format!("control.intercepts[{i}]"),
                                "-s",
                                &format!("{e:#}"),
                            )
                        },
                    )?;
                }
            }
            if let Some(n) = control.connections {
                if !(1..=16).contains(&n) {
                    return Err(bad(
                        "control.connections",
                        n,
                        "not 1..16 connections per intercept",
                        "a number from 1 to 16, e.g. 2",
                    ));
                }
            }
        }
        if let Some(outputs) = &self.outputs {
            check_outputs(outputs.log_level.as_ref(), outputs.metrics.as_ref())?;
        }
        Ok(())
    }
}

impl InterceptFile {
    /// Checks every value on its own.
    fn check(&self) -> Result<(), ConfigError> {
        if let Some(ports) = &self.ports {
            check_port_kinds(&[
                ("ports.afpacket", ports.afpacket.is_some()),
                ("ports.dpdk", ports.dpdk.is_some()),
            ])?;
            if let Some(dpdk) = &ports.dpdk {
                check_dpdk(dpdk)?;
            }
        }
        check_workers(self.workers.as_ref().and_then(|w| w.count))?;
        if let Some(control) = &self.control {
            check_port(control.port)?;
        }
        if let Some(outputs) = &self.outputs {
            check_outputs(outputs.log_level.as_ref(), outputs.metrics.as_ref())?;
        }
        Ok(())
    }
}

/// The [`ConfigFile`] implementation, the same for both tools: `$trim` keeps only the port
/// section in use (the others hold nothing but their flags' defaults).
macro_rules! config_file {
    ($file:ident, $ports:ident, $trim:expr) => {
        impl ConfigFile for $file {
            fn from_yaml(text: &str) -> Result<Self, ConfigError> {
                let file: $file = if text.trim().is_empty() {
                    $file::default()
                } else {
                    serde_norway::from_str(text)?
                };
                file.check()?;
                Ok(file)
            }

            fn settings(&self) -> Vec<Setting> {
                let mut out = Vec::new();
                $file::settings(self, "", &mut out);
                out
            }

            fn from_matches(matches: &ArgMatches) -> Self {
                let mut file = $file::from_matches(matches);
                if let Some(ports) = &mut file.ports {
                    let trim: fn(&mut $ports) = $trim;
                    trim(ports);
                }
                file
            }

            fn flag_ids() -> Vec<&'static str> {
                let mut out = Vec::new();
                $file::ids(&mut out);
                out
            }
        }
    };
}

config_file!(TcpcopyFile, TcpcopyPorts, |ports| {
    ports.afpacket = ports.afpacket.take().filter(|a| a.interface.is_some());
    ports.dpdk = ports.dpdk.take().filter(|d| d.rx.is_some());
    ports.pcap = ports.pcap.take().filter(|p| p.file.is_some());
});

config_file!(InterceptFile, InterceptPorts, |ports| {
    ports.afpacket = ports.afpacket.take().filter(|a| a.interface.is_some());
    ports.dpdk = ports.dpdk.take().filter(|d| d.rx.is_some());
});

#[cfg(test)]
mod tests {
    use super::*;
    use clap::ArgAction;

    const FULL: &str = "
udp: false
transfers:
  - online: 80
    target: 10.0.0.30:8080
  - 10.0.0.5:443-10.0.0.31:8443
ports:
  filter: tcp and dst port 80
  output_interface: eth1
  afpacket:
    interface: eth0
workers:
  count: 2
  cores: [2, 3]
  busy_poll: true
transforms:
  clients: [10.9.9.x, 10.9.8.7]
  localhost_as: 10.9.9.1
sampling:
  percent: 50
  ramp: false
copies:
  count: 3
  instance: 1
session:
  timeout: 30
  keepalive: 60
  no_wait: true
  only_syn: false
  fake_mss: 1400
  mtu: 9000
  pace_idle_ms: 50
control:
  intercepts: [10.0.0.40, 10.0.0.41:4000]
  port: 36524
  connections: 4
  transport: udp
  auth_file: /etc/tcpcopy/secret
  payload_records: false
  plain_framing: false
  lonely: true
outputs:
  log_file: /var/log/tcpcopy.log
  log_level: debug
  stats_interval: 10
  histogram_log: /tmp/h.hlog
  pid_file: /run/tcpcopy.pid
  daemon: false
  metrics:
    file: /tmp/m.json
    format: json
    listen: 127.0.0.1:9114
";

    #[test]
    fn round_trip() {
        let file = TcpcopyFile::from_yaml(FULL).unwrap();
        let text = file.to_yaml().unwrap();
        let again = TcpcopyFile::from_yaml(&text).unwrap();
        assert_eq!(file, again, "{text}");
        assert_eq!(
            file.transfers.as_ref().unwrap().text(),
            "80-10.0.0.30:8080,10.0.0.5:443-10.0.0.31:8443"
        );
        assert!(text.contains("cores:\n  - 2\n  - 3"), "{text}");
        let intercept = "ports:\n  filter: tcp and src port 8080\n  afpacket: {interface: eth0}\n\
                         control: {bind: 10.0.0.40, port: 4000, single: true, protect: true}\n";
        let file = InterceptFile::from_yaml(intercept).unwrap();
        assert_eq!(
            InterceptFile::from_yaml(&file.to_yaml().unwrap()).unwrap(),
            file
        );
    }

    #[test]
    fn settings_name_flags_and_values() {
        let file = TcpcopyFile::from_yaml(FULL).unwrap();
        let settings = ConfigFile::settings(&file);
        let find = |key: &str| settings.iter().find(|s| s.key == key).unwrap().clone();
        assert_eq!(find("session.timeout").id, "timeout");
        assert_eq!(find("session.timeout").values, ["30"]);
        assert_eq!(
            find("control.intercepts").values,
            ["10.0.0.40,10.0.0.41:4000"]
        );
        assert_eq!(find("outputs.metrics.format").values, ["json"]);
        assert_eq!(find("workers.busy_poll").values, ["true"]);
        // Every key has a distinct flag.
        let mut ids: Vec<_> = settings.iter().map(|s| s.id).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), settings.len());
    }

    #[test]
    fn unknown_key_names_the_path() {
        let err = TcpcopyFile::from_yaml("session:\n  timeout: 5\n  timout: 30\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("session: unknown field `timout`"), "{err}");
        assert!(err.contains("line 3 column 3"), "{err}");
        let err = TcpcopyFile::from_yaml("ports:\n  pcap:\n    repeat: 2\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("ports.pcap: unknown field `repeat`"), "{err}");
        let err = InterceptFile::from_yaml("outputs:\n  histogram_log: x\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("outputs: unknown field `histogram_log`"),
            "{err}"
        );
        let err = TcpcopyFile::from_yaml("transfers:\n  - {online: 80, taget: 1.2.3.4:5}\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("transfers[0]: unknown field `taget`"), "{err}");
    }

    #[test]
    fn bad_value_names_the_path_and_the_form() {
        let err = TcpcopyFile::from_yaml("session:\n  timeout: soon\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("session.timeout: invalid type"), "{err}");
        assert!(err.contains("line 2 column 12"), "{err}");
        let err = TcpcopyFile::from_yaml("transfers:\n  - {online: 80, target: 10.0.0:99}\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("bad transfers[0] value '80-10.0.0:99'"),
            "{err}"
        );
        assert!(
            err.contains("target address '10.0.0' is not an IPv4 address"),
            "{err}"
        );
        assert!(err.contains("the form is [onlineIP:]onlinePort"), "{err}");
        let err = TcpcopyFile::from_yaml("control:\n  connections: 17\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "bad control.connections value '17': not 1..16 connections per intercept; \
             the form is a number from 1 to 16, e.g. 2"
        );
        let err = TcpcopyFile::from_yaml("control:\n  intercepts: [10.0.0.40, 10.0.0:1]\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("control.intercepts[1]: bad value '10.0.0:1'"),
            "{err}"
        );
        assert!(err.contains("ip[:port]"), "{err}");
        let err = TcpcopyFile::from_yaml("sampling: {percent: 0}\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("bad sampling.percent value '0'"), "{err}");
        let err = TcpcopyFile::from_yaml("copies: {instance: 40}\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("bad copies.instance value '40'"), "{err}");
        let err = TcpcopyFile::from_yaml("control: {transport: tpc}\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("control.transport: unknown variant `tpc`"),
            "{err}"
        );
        let err = TcpcopyFile::from_yaml(
            "ports:\n  afpacket: {interface: eth0}\n  pcap: {file: a.pcap}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("ports.afpacket and ports.pcap are set"),
            "{err}"
        );
        let err = TcpcopyFile::from_yaml("session: {mtu: 100}\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("bad session.mtu value '100'") && err.contains("576..=65535"),
            "{err}"
        );
        let err = TcpcopyFile::from_yaml("transfers: [80-1.2.3.4:5, {online: 1.2.3.4:80}]\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("transfers[1]: missing field `target`"),
            "{err}"
        );
        let err = TcpcopyFile::from_yaml("outputs: {log_level: 'lo[ud'}\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("bad outputs.log_level value"), "{err}");
    }

    #[test]
    fn malformed_yaml_does_not_panic() {
        for text in [
            "{",
            "- a\nb: c",
            ":::",
            "transfers: [",
            "\t\tx",
            "session: [1, 2]",
        ] {
            assert!(TcpcopyFile::from_yaml(text).is_err(), "{text}");
            assert!(InterceptFile::from_yaml(text).is_err(), "{text}");
        }
        assert_eq!(TcpcopyFile::from_yaml("").unwrap(), TcpcopyFile::default());
        // Plain scalars are read as text where a key takes text.
        let file =
            TcpcopyFile::from_yaml("ports: {dpdk: {rx: x, lcores: 2, pci: 0000:01:00.0}}").unwrap();
        let dpdk = file.ports.unwrap().dpdk.unwrap();
        assert_eq!(dpdk.lcores.as_deref(), Some("2"));
        assert_eq!(dpdk.pci, Some(Many(vec!["0000:01:00.0".into()])));
    }

    /// A command with a few of tcpcopy's flags.
    #[derive(Debug, clap::Parser)]
    struct Mini {
        #[arg(short = 'x')]
        transfers: String,
        #[arg(short = 't', default_value_t = 600)]
        timeout: u64,
        #[arg(short = 'C', default_value_t = 2)]
        connections: usize,
        #[arg(short = 'W', action = ArgAction::SetTrue)]
        no_wait: bool,
        #[arg(short = 'i')]
        interface: Option<String>,
        #[arg(long)]
        pcap: Option<PathBuf>,
        #[arg(short = 'a', default_value_t = 1.0, requires = "pcap")]
        acceleration: f64,
        #[arg(long)]
        config: Option<PathBuf>,
    }

    #[test]
    fn unmapped_flags_are_named() {
        assert_eq!(unmapped_flags::<Mini, TcpcopyFile>(), Vec::<String>::new());
        #[derive(Debug, clap::Parser)]
        struct Extra {
            #[arg(long)]
            config: Option<PathBuf>,
            #[arg(long)]
            check: bool,
            #[arg(short = 'Z')]
            zed: bool,
            #[arg(long)]
            new_flag: Option<u64>,
        }
        assert_eq!(unmapped_flags::<Extra, TcpcopyFile>(), ["-Z", "--new-flag"]);
    }

    fn temp_file(name: &str, text: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!("{name}-{}.yaml", std::process::id()));
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn flags_override_the_file() {
        let path = temp_file(
            "config-override",
            "transfers: 80-10.0.0.30:8080\nsession: {timeout: 30, no_wait: true}\n\
             ports: {pcap: {file: a.pcap}}\n",
        );
        let config = path.to_str().unwrap();
        // The file's values replace the built-in defaults, and -x is no longer required.
        let (args, matches) =
            parse_args_from::<Mini, TcpcopyFile, _, _>(["t", "--config", config]).unwrap();
        assert_eq!(args.transfers, "80-10.0.0.30:8080");
        assert_eq!(
            (args.timeout, args.connections, args.no_wait),
            (30, 2, true)
        );
        assert_eq!(args.pcap, Some(PathBuf::from("a.pcap")));
        assert_eq!(
            matches.value_source("timeout"),
            Some(ValueSource::DefaultValue)
        );
        // Flags given on the command line win, key by key; -i drops the file's pcap port.
        let (args, _) = parse_args_from::<Mini, TcpcopyFile, _, _>([
            "t",
            "--config",
            config,
            "-t",
            "7",
            "-x",
            "81-10.0.0.30:81",
            "-i",
            "eth1",
        ])
        .unwrap();
        assert_eq!(args.timeout, 7);
        assert_eq!(args.transfers, "81-10.0.0.30:81");
        assert!(args.no_wait);
        assert_eq!(args.pcap, None);
        assert_eq!(args.interface.as_deref(), Some("eth1"));
        // -a needs --pcap: the file's pcap port meets that; without it the flag is refused.
        let (args, _) =
            parse_args_from::<Mini, TcpcopyFile, _, _>(["t", "--config", config, "-a", "4"])
                .unwrap();
        assert_eq!((args.acceleration, args.pcap), (4.0, Some("a.pcap".into())));
        let err = parse_args_from::<Mini, TcpcopyFile, _, _>([
            "t", "--config", config, "-i", "eth1", "-a", "4",
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("--pcap <PCAP>"), "{err}");
        // Without a file, -x stays required with clap's message.
        let err = parse_args_from::<Mini, TcpcopyFile, _, _>(["t"]).unwrap_err();
        assert!(err.to_string().contains("-x <TRANSFERS>"), "{err}");
        // A key the command has no flag for is an error, not ignored.
        let other = temp_file("config-noflag", "control: {connections: 3, port: 1}\n");
        let err = parse_args_from::<Mini, TcpcopyFile, _, _>([
            "t",
            "-x",
            "80-1.2.3.4:5",
            "--config",
            other.to_str().unwrap(),
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("control.port"), "{err}");
        // The effective settings read back from the matches.
        let (_, matches) =
            parse_args_from::<Mini, TcpcopyFile, _, _>(["t", "--config", config, "-C", "5"])
                .unwrap();
        let effective = TcpcopyFile::from_matches(&matches);
        let session = effective.session.unwrap();
        assert_eq!((session.timeout, session.no_wait), (Some(30), Some(true)));
        assert_eq!(effective.control.unwrap().connections, Some(5));
        let _ = std::fs::remove_file(path);
        let _ = std::fs::remove_file(other);
    }

    #[test]
    fn bad_file_is_named() {
        let path = temp_file("config-bad", "session:\n  timeout: -1\n");
        let err =
            parse_args_from::<Mini, TcpcopyFile, _, _>(["t", "--config", path.to_str().unwrap()])
                .unwrap_err()
                .to_string();
        assert!(err.starts_with("config file "), "{err}");
        assert!(
            err.contains("session.timeout: invalid type: integer `-1`, expected u64"),
            "{err}"
        );
        let _ = std::fs::remove_file(path);
        let err = parse_args_from::<Mini, TcpcopyFile, _, _>([
            "t",
            "--config",
            "/nonexistent/tcpcopy.yaml",
        ])
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("cannot read the config file /nonexistent/tcpcopy.yaml"),
            "{err}"
        );
    }
}
