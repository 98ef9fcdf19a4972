//! Statistics exposition: tcpcopy's and intercept's counters rendered as JSON and as Prometheus
//! text, written to a file (`--metrics-file`, replaced atomically at every statistics interval
//! and at exit) and served over HTTP (`--metrics-listen`: `GET /metrics`, `GET /stats.json`).
//!
//! The renderers are pure ([`Exposition`]): they read the public fields of the statistics
//! structs through field tables ([`Field`]) that carry the help text. A counter added to one of
//! those structs and not yet in its table is still exported (found through its `Debug` output,
//! with a generic help text), and a unit test names it so that the table gets its line.
//!
//! Prometheus names: `tcpcopy_<group>_<field>_total` for counters, without `_total` for gauges,
//! e.g. `tcpcopy_sessions_created_total{worker="0"} 12`. Per-worker series carry
//! `worker="<i>"`; the sum over workers carries `worker="all"` (so `sum()` over a family must
//! exclude it: `sum(tcpcopy_sessions_created_total{worker!="all"})`). Latencies are summaries in
//! seconds (quantiles 0.5, 0.9, 0.99, 0.999, `_sum`, `_count`) with a `_max_seconds` gauge.

use crate::intercept::InterceptStats;
use crate::tcpcopy::ingress::IngressStats;
use crate::tcpcopy::latency::Latency;
use crate::tcpcopy::TcpcopyStats;
use anyhow::Context;
use engine::control::server::ServerStats;
use engine::control::ClientStats;
use engine::port::PortStats;
use engine::session::SessionStats;
use hdrhistogram::Histogram;
use serde_json::{Map, Value};
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Whether a number only grows (a counter) or goes up and down (a gauge).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Monotonic since the start of the run (`_total` in Prometheus).
    Counter,
    /// A current level (table size, connections up).
    Gauge,
}

/// One exported number of a statistics struct.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    /// The field's name (the struct field's, or a shorter one for port counters).
    pub name: String,
    /// One line saying what it counts.
    pub help: &'static str,
    /// Counter or gauge.
    pub kind: Kind,
    /// The value.
    pub value: u64,
}

/// Help text of a field found only through `Debug` (not yet in its table).
const UNDOCUMENTED: &str = "see the struct's documentation";

macro_rules! fields {
    ($s:expr; $($kind:ident $field:ident: $help:literal),* $(,)?) => {{
        let s = $s;
        let mut v = vec![$(Field {
            name: stringify!($field).to_string(),
            help: $help,
            kind: Kind::$kind,
            value: s.$field as u64,
        }),*];
        add_undocumented(&mut v, &format!("{s:?}"));
        v
    }};
}

/// Appends the `name: number` pairs at the top level of a `Debug` rendering that `fields`
/// does not list yet (a counter added to the struct after its table was written).
fn add_undocumented(fields: &mut Vec<Field>, debug: &str) {
    for (name, value) in debug_fields(debug) {
        if !fields.iter().any(|f| f.name == name) {
            fields.push(Field {
                name,
                help: UNDOCUMENTED,
                kind: Kind::Counter,
                value,
            });
        }
    }
}

/// The `name: unsigned number` pairs at the top level of a struct's `Debug` rendering
/// (`Name { a: 1, b: 2, inner: Inner { .. } }` gives `a`, `b`); nested structs and other values
/// are skipped.
fn debug_fields(debug: &str) -> Vec<(String, u64)> {
    let Some(open) = debug.find('{') else {
        return Vec::new();
    };
    let body = &debug[open + 1..];
    let mut out = Vec::new();
    let mut depth = 0usize;
    let mut item = String::new();
    let mut flush = |item: &mut String| {
        if let Some((name, value)) = item.split_once(':') {
            let name = name.trim();
            if let Ok(value) = value.trim().parse::<u64>() {
                if !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    out.push((name.to_string(), value));
                }
            }
        }
        item.clear();
    };
    for c in body.chars() {
        match c {
            '{' | '[' | '(' => {
                depth += 1;
                item.push(c);
            }
            '}' | ']' | ')' if depth == 0 => break,
            '}' | ']' | ')' => {
                depth -= 1;
                item.push(c);
            }
            ',' if depth == 0 => flush(&mut item),
            _ => item.push(c),
        }
    }
    flush(&mut item);
    out
}

/// tcpcopy's ingress counters (per worker or summed).
pub fn ingress_fields(s: &IngressStats) -> Vec<Field> {
    fields!(s;
        Counter captured: "Frames examined by ingress.",
        Counter accepted: "Frames accepted and handed to the session engine.",
        Counter accepted_data: "Accepted frames carrying payload.",
        Counter not_ipv4: "Frames dropped: not IPv4 (ARP, IPv6, ...).",
        Counter not_tcp: "Frames dropped: IPv4 but not TCP.",
        Counter truncated: "Frames dropped: shorter than their link or IP header.",
        Counter bad_version: "Frames dropped: IPv4 version field not 4.",
        Counter bad_ihl: "Frames dropped: IPv4 header length below 5 or beyond the frame.",
        Counter bad_total_len: "Frames dropped: IPv4 total length below the header or beyond the frame.",
        Counter bad_data_offset: "Frames dropped: TCP data offset below 5 or beyond the segment.",
        Counter bad_options: "Frames dropped: malformed TCP options.",
        Counter fragments: "Frames dropped: IP fragments (not reassembled).",
        Counter cut_short: "Frames dropped: captured with fewer bytes than the packet had.",
        Counter too_big: "Frames dropped: larger than the transmit buffer.",
        Counter no_transfer: "Frames dropped: well-formed but matching no -x transfer.",
        Counter sampled_out: "Frames accepted by -x but not in the -r/-g sample.",
        Counter copies_made: "Extra packets made for -n copies.",
        Counter split_packets: "Captured packets longer than -M (merged by GRO/LRO), split into MTU-sized segments.",
        Counter split_pieces: "Segments the split packets were split into.",
        Counter localhost_rewritten: "Client addresses 127.0.0.1 replaced by -H.",
    )
}

/// The session engine's counters (per worker or summed).
pub fn session_fields(s: &SessionStats) -> Vec<Field> {
    fields!(s;
        Counter created: "Sessions created (from a captured SYN, or mid-stream).",
        Counter removed: "Sessions removed (for any reason).",
        Counter established: "Sessions whose handshake with the target completed (SYN-ACK seen).",
        Counter answered: "Sessions in which the target sent response data (first response seen).",
        Counter closed: "Sessions closed by both FINs.",
        Counter client_resets: "Sessions ended by a client RST.",
        Counter target_resets: "Sessions ended by a target RST.",
        Counter timed_out: "Sessions removed by -t/-k.",
        Counter gave_up: "Sessions given up after too many retransmissions.",
        Counter port_reuse_resets: "Open sessions reset because their client reused the 4-tuple with a new SYN.",
        Counter port_reuse_replaced: "Closed sessions replaced by a new SYN on the same 4-tuple.",
        Counter table_full: "New SYNs dropped because the table was full of busy sessions.",
        Counter evicted: "Sessions evicted to make room for a new SYN in a full table.",
        Counter client_no_session: "Client segments with no session that could not start one.",
        Counter mid_stream_created: "Sessions started mid-stream with a fabricated SYN (also in created).",
        Counter reconstructed: "Sessions rebuilt with a fabricated SYN after a target reset.",
        Counter module_vetoed: "Mid-stream sessions the protocol module refused.",
        Counter module_prefixes: "Mid-stream sessions the protocol module put bytes in front of.",
        Counter client_syn_retransmits: "Client SYN retransmissions absorbed.",
        Counter client_retransmits: "Client data retransmissions absorbed.",
        Counter client_acks_absorbed: "Client pure ACKs absorbed (tcpcopy makes its own).",
        Counter client_hole_fills: "Client segments that filled a capture hole; sent at once.",
        Counter queue_full: "Client segments dropped because the session's queue was full.",
        Counter pool_exhausted: "Client segments dropped because the segment pool was exhausted.",
        Counter chained_segments: "Client segments longer than a pool slot (GRO), stored as a chain.",
        Counter sent_segments: "Client segments sent to the target.",
        Counter sent_data: "Client segments with payload sent to the target.",
        Counter sent_syn: "SYNs sent (first transmissions).",
        Counter sent_fin: "FINs sent.",
        Counter sent_rst: "RSTs sent (replayed and fabricated).",
        Counter sent_acks: "Fabricated ACKs sent.",
        Counter retransmits: "Retransmissions to the target (SYNs included).",
        Counter pace_releases: "Held requests released by the silence rule.",
        Counter responses: "Replies received for a known session.",
        Counter response_data: "Replies with payload.",
        Counter response_no_session: "Replies that matched no session.",
        Counter stale_target_resets: "Handshakes that met an older connection at the target (reset, SYN resent).",
        Counter bad_synack: "SYN-ACKs whose acknowledgement did not match our SYN.",
    )
}

/// A capture port's receive counters (`packets`, `bytes`, `dropped`).
pub fn capture_fields(s: &PortStats) -> Vec<Field> {
    vec![
        field(
            "packets",
            "Frames received from the capture port.",
            s.rx_packets,
        ),
        field("bytes", "Bytes received from the capture port.", s.rx_bytes),
        field(
            "dropped",
            "Frames the kernel or device dropped before they were read (ring full).",
            s.rx_dropped,
        ),
        field(
            "duplicates",
            "Frames left out because the same frame had just been seen on another listed interface.",
            s.rx_duplicates,
        ),
    ]
}

/// A transmit port's counters (`packets`, `bytes`, `errors`).
pub fn transmit_fields(s: &PortStats) -> Vec<Field> {
    vec![
        field("packets", "Packets sent to the target.", s.tx_packets),
        field("bytes", "Bytes sent to the target.", s.tx_bytes),
        field(
            "errors",
            "Packets that could not be sent (counted, then discarded).",
            s.tx_errors,
        ),
    ]
}

fn field(name: &str, help: &'static str, value: u64) -> Field {
    Field {
        name: name.to_string(),
        help,
        kind: Kind::Counter,
        value,
    }
}

/// tcpcopy's control channel counters (the intercept connections).
pub fn client_fields(s: &ClientStats) -> Vec<Field> {
    fields!(s;
        Gauge connections_up: "Connections (UDP: sessions) to intercepts currently established.",
        Counter connects: "Connections (UDP: sessions) established in total.",
        Counter reconnects: "Establishments of a connection that had been up before.",
        Counter connect_failures: "Connection attempts that failed (refused, unreachable, timed out).",
        Counter disconnects: "Established connections (UDP: sessions) lost.",
        Counter messages_sent: "Route messages queued to an intercept (one per intercept per message).",
        Counter messages_dropped: "Route messages not queued (intercept down, backlog full) or lost unsent.",
        Counter records_received: "Response records decoded and delivered.",
        Counter bytes_received: "Bytes read from intercepts.",
        Counter protocol_errors: "Framing errors and undecodable records.",
        Counter auth_failures: "Authentication failures.",
        Counter datagrams_sent: "UDP datagrams sent.",
        Counter datagrams_received: "UDP datagrams received and accepted.",
        Counter datagrams_lost: "UDP datagrams from intercepts lost on the way (not those our socket dropped).",
        Counter datagrams_reordered: "UDP datagrams that arrived after a later one.",
        Counter datagrams_replayed: "UDP datagrams dropped as duplicates or replays.",
        Counter datagrams_rejected: "UDP datagrams rejected (not this protocol, wrong MAC, unknown session).",
        Counter datagrams_send_dropped: "UDP datagrams not sent (socket queue full or send failed).",
        Counter datagrams_receive_dropped: "UDP datagrams our socket dropped on arrival (receive buffer full).",
        Counter records_lost: "Response records intercepts sent that never arrived (UDP).",
    )
}

/// intercept's control channel counters (the tcpcopy connections).
pub fn server_fields(s: &ServerStats) -> Vec<Field> {
    fields!(s;
        Gauge connections_up: "tcpcopy connections (UDP: confirmed peers) currently open.",
        Counter connections_accepted: "Connections accepted (UDP: peers confirmed) in total.",
        Counter connections_refused: "Connections closed at once because of the connection limit.",
        Counter refused_per_address: "Connections (UDP: new peers) refused: their address has its share.",
        Counter hello_timeouts: "TCP connections closed because no hello came in time.",
        Counter throttled: "Times a TCP connection was left unread: it sent route messages over its rate.",
        Counter hellos_unanswered: "UDP opening HELLOs of new sessions left unanswered (over their rate, or too many unconfirmed peers).",
        Counter disconnects: "Connections lost or closed (UDP: peers forgotten).",
        Counter hellos: "Hellos received.",
        Counter version_mismatches: "Hellos with a version other than 6.",
        Counter peers_too_old: "Connections closed because the first message was not a hello.",
        Counter messages_received: "Messages received after the hello.",
        Counter records_queued: "Records accepted into a batch.",
        Counter records_dropped: "Records dropped because their connection's backlog was full.",
        Counter records_no_connection: "Records for a connection that no longer exists.",
        Counter records_bad_length: "Records of the wrong size.",
        Counter batches: "Batches moved to a connection's output (UDP: datagrams).",
        Counter bytes_sent: "Bytes written to sockets.",
        Counter auth_ok: "Peers that proved the secret.",
        Counter auth_refused: "Peers refused by authentication.",
        Counter datagrams_received: "UDP datagrams received and accepted.",
        Counter datagrams_sent: "UDP datagrams sent.",
        Counter datagrams_lost: "UDP datagrams from tcpcopys lost on the way (not those our socket dropped).",
        Counter datagrams_reordered: "UDP datagrams that arrived after a later one.",
        Counter datagrams_replayed: "UDP datagrams dropped as duplicates or replays.",
        Counter datagrams_rejected: "UDP datagrams rejected (malformed, wrong MAC, unknown session).",
        Counter datagrams_send_dropped: "UDP datagrams not sent (socket queue full or send failed).",
        Counter datagrams_receive_dropped: "UDP datagrams our socket dropped on arrival (receive buffer full).",
        Counter messages_lost: "Route messages tcpcopys sent that never arrived (UDP).",
    )
}

/// intercept's own counters (without its capture port and control channel).
pub fn intercept_fields(s: &InterceptStats) -> Vec<Field> {
    fields!(s;
        Counter captured: "Frames examined.",
        Counter replies: "IPv4 TCP replies extracted.",
        Counter routed: "Replies handed to a tcpcopy connection.",
        Counter delayed: "Replies held because their route had not arrived (SYN/RST).",
        Counter delay_delivered: "Held replies delivered when their route arrived.",
        Counter no_route: "Replies with no route: dropped.",
        Counter send_dropped: "Replies dropped because a tcpcopy connection's buffer was full or gone.",
        Counter ring_full: "Replies dropped because the ring to the control thread was full.",
        Counter ignored: "Frames that were not IPv4 TCP, or malformed.",
        Counter client_add: "CLIENT_ADD messages.",
        Counter client_del: "CLIENT_DEL messages.",
        Counter connections: "tcpcopy connections accepted.",
        Counter disconnections: "tcpcopy connections lost.",
        Counter single_refused: "--single: connections refused or replaced by the generation rule.",
        Counter peers_refused: "Control connections refused: address not on --allow.",
        Counter routes_foreign: "CLIENT_ADDs refused: the route belongs to a tcpcopy at another address.",
        Counter removals_foreign: "CLIENT_DELs ignored: the route belongs to a tcpcopy at another address.",
        Counter routes_owner_full: "CLIENT_ADDs refused: the address holds its share of the route table.",
        Gauge routes: "Routes in the table (the largest replica).",
    )
}

/// The quantiles exported for each latency histogram.
pub const QUANTILES: [f64; 4] = [0.5, 0.9, 0.99, 0.999];

/// A histogram (microseconds) as JSON: `count`, `min`, `mean`, `p50`, `p90`, `p99`, `p999`,
/// `max`, in microseconds.
pub fn histogram_json(h: &Histogram<u64>) -> Value {
    let mut m = Map::new();
    m.insert("count".into(), h.len().into());
    let empty = h.is_empty();
    m.insert("min".into(), (if empty { 0 } else { h.min() }).into());
    m.insert(
        "mean".into(),
        Value::from(if empty { 0.0 } else { round3(h.mean()) }),
    );
    for (q, name) in QUANTILES.iter().zip(["p50", "p90", "p99", "p999"]) {
        m.insert(name.into(), h.value_at_quantile(*q).into());
    }
    m.insert("max".into(), h.max().into());
    Value::Object(m)
}

fn round3(v: f64) -> f64 {
    if v.is_finite() {
        (v * 1000.0).round() / 1000.0
    } else {
        0.0
    }
}

fn fields_json(fields: &[Field]) -> Value {
    Value::Object(
        fields
            .iter()
            .map(|f| (f.name.clone(), Value::from(f.value)))
            .collect(),
    )
}

fn latency_json(l: &Latency) -> Value {
    let mut m = Map::new();
    m.insert("capture_to_tx_us".into(), histogram_json(&l.capture_to_tx));
    m.insert("reply_us".into(), histogram_json(&l.reply));
    Value::Object(m)
}

/// The parts a worker report and the sum over workers share.
struct WorkerView<'a> {
    ingress: &'a IngressStats,
    sessions: &'a SessionStats,
    table_len: usize,
    capture: &'a PortStats,
    transmit: &'a PortStats,
    control_queue_full: u64,
    replies: u64,
    replies_dispatched: u64,
    latency: Latency,
}

impl WorkerView<'_> {
    fn json(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("ingress".into(), fields_json(&ingress_fields(self.ingress)));
        m.insert(
            "sessions".into(),
            fields_json(&session_fields(self.sessions)),
        );
        m.insert("sessions_open".into(), (self.table_len as u64).into());
        m.insert("capture".into(), fields_json(&capture_fields(self.capture)));
        m.insert(
            "transmit".into(),
            fields_json(&transmit_fields(self.transmit)),
        );
        m.insert("control_queue_full".into(), self.control_queue_full.into());
        m.insert("replies".into(), self.replies.into());
        m.insert("replies_dispatched".into(), self.replies_dispatched.into());
        m.insert("latency".into(), latency_json(&self.latency));
        m
    }
}

fn worker_views(s: &TcpcopyStats) -> (WorkerView<'_>, Vec<WorkerView<'_>>) {
    let workers: Vec<WorkerView<'_>> = s
        .workers
        .iter()
        .enumerate()
        .map(|(i, w)| WorkerView {
            ingress: &w.ingress,
            sessions: &w.sessions,
            table_len: w.table_len,
            capture: &w.capture,
            transmit: &w.transmit,
            control_queue_full: w.control_queue_full,
            replies: w.replies,
            replies_dispatched: s.replies_dispatched.get(i).copied().unwrap_or(0),
            latency: w.latency.clone(),
        })
        .collect();
    let total = WorkerView {
        ingress: &s.ingress,
        sessions: &s.sessions,
        table_len: s.table_len,
        capture: &s.capture,
        transmit: &s.transmit,
        control_queue_full: s.control_queue_full,
        replies: s.workers.iter().map(|w| w.replies).sum(),
        replies_dispatched: s.replies_dispatched.iter().sum(),
        latency: s.latency(),
    };
    (total, workers)
}

/// tcpcopy's statistics as JSON: the sums over workers at the top level (`ingress`,
/// `sessions`, `sessions_open`, `capture`, `transmit`, `control_queue_full`, `replies`,
/// `replies_dispatched`, `latency`), then `control` (the control channel), `reply_queue_full`
/// and `workers` (one object of the same keys per worker, with its index in `worker`).
pub fn tcpcopy_json(s: &TcpcopyStats) -> Value {
    let (total, workers) = worker_views(s);
    let mut m = Map::new();
    m.insert("tool".into(), "tcpcopy".into());
    m.extend(total.json());
    m.insert("control".into(), fields_json(&client_fields(&s.control)));
    m.insert("reply_queue_full".into(), s.reply_queue_full.into());
    m.insert("shed".into(), s.shed.into());
    m.insert("resynced".into(), s.resynced.into());
    let mut dump = Map::new();
    dump.insert("written".into(), s.dump.written.into());
    dump.insert("dropped".into(), s.dump.dropped.into());
    dump.insert("errors".into(), s.dump.errors.into());
    m.insert("dump".into(), Value::Object(dump));
    m.insert(
        "workers".into(),
        Value::Array(
            workers
                .iter()
                .enumerate()
                .map(|(i, w)| {
                    let mut o = Map::new();
                    o.insert("worker".into(), (i as u64).into());
                    o.extend(w.json());
                    Value::Object(o)
                })
                .collect(),
        ),
    );
    Value::Object(m)
}

/// intercept's statistics as JSON: its own counters at the top level, then `capture` and
/// `control` (the control channel).
pub fn intercept_json(s: &InterceptStats) -> Value {
    let mut m = Map::new();
    m.insert("tool".into(), "intercept".into());
    if let Value::Object(own) = fields_json(&intercept_fields(s)) {
        m.extend(own);
    }
    m.insert("capture".into(), fields_json(&capture_fields(&s.capture)));
    m.insert("control".into(), fields_json(&server_fields(&s.control)));
    Value::Object(m)
}

/// Builds Prometheus text exposition (format 0.0.4): one `# HELP` and `# TYPE` line per family,
/// then its samples.
#[derive(Debug, Default)]
pub struct PrometheusText {
    out: String,
}

fn escape_help(text: &str) -> String {
    text.replace('\\', "\\\\").replace('\n', "\\n")
}

fn escape_label(text: &str) -> String {
    text.replace('\\', "\\\\")
        .replace('\n', "\\n")
        .replace('"', "\\\"")
}

/// Label pairs of one series, e.g. `[("worker", "0")]`.
pub type Labels<'a> = Vec<(&'a str, &'a str)>;

fn labels(pairs: &[(&str, &str)]) -> String {
    if pairs.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape_label(v)))
        .collect();
    format!("{{{}}}", inner.join(","))
}

fn number(v: f64) -> String {
    if v.is_finite() {
        format!("{v}")
    } else if v.is_nan() {
        "NaN".into()
    } else if v > 0.0 {
        "+Inf".into()
    } else {
        "-Inf".into()
    }
}

impl PrometheusText {
    /// An empty exposition.
    pub fn new() -> PrometheusText {
        PrometheusText::default()
    }

    /// Opens a family: its `# HELP` and `# TYPE` lines (`counter`, `gauge`, `summary`).
    pub fn family(&mut self, name: &str, help: &str, kind: &str) {
        let _ = writeln!(self.out, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    /// One integer sample.
    pub fn sample(&mut self, name: &str, label_pairs: &[(&str, &str)], value: u64) {
        let _ = writeln!(self.out, "{name}{} {value}", labels(label_pairs));
    }

    /// One floating-point sample.
    pub fn sample_f64(&mut self, name: &str, label_pairs: &[(&str, &str)], value: f64) {
        let _ = writeln!(self.out, "{name}{} {}", labels(label_pairs), number(value));
    }

    /// A group of fields as families `<prefix>_<field>[_total]`, each with one sample per
    /// `(labels, fields)` series (all series list the same fields in the same order).
    pub fn fields(&mut self, prefix: &str, series: &[(Labels<'_>, Vec<Field>)]) {
        let Some((_, first)) = series.first() else {
            return;
        };
        for (j, f) in first.iter().enumerate() {
            let (name, kind) = match f.kind {
                Kind::Counter => (format!("{prefix}_{}_total", f.name), "counter"),
                Kind::Gauge => (format!("{prefix}_{}", f.name), "gauge"),
            };
            self.family(&name, f.help, kind);
            for (label_pairs, fields) in series {
                let value = fields
                    .get(j)
                    .filter(|g| g.name == f.name)
                    .or_else(|| fields.iter().find(|g| g.name == f.name))
                    .map_or(0, |g| g.value);
                self.sample(&name, label_pairs, value);
            }
        }
    }

    /// A latency histogram (microseconds) as a summary in seconds, `<name>_seconds`, plus a
    /// gauge `<name>_max_seconds`, one series per `(labels, histogram)`.
    pub fn latency(&mut self, name: &str, help: &str, series: &[(Labels<'_>, &Histogram<u64>)]) {
        let summary = format!("{name}_seconds");
        self.family(&summary, help, "summary");
        for (label_pairs, h) in series {
            for q in QUANTILES {
                let qs = format!("{q}");
                let mut with_q = label_pairs.clone();
                with_q.push(("quantile", &qs));
                self.sample_f64(&summary, &with_q, h.value_at_quantile(q) as f64 / 1e6);
            }
            let sum = if h.is_empty() {
                0.0
            } else {
                h.mean() * h.len() as f64 / 1e6
            };
            self.sample_f64(&format!("{summary}_sum"), label_pairs, sum);
            self.sample(&format!("{summary}_count"), label_pairs, h.len());
        }
        let max = format!("{name}_max_seconds");
        self.family(&max, &format!("Largest value of {summary}."), "gauge");
        for (label_pairs, h) in series {
            self.sample_f64(&max, label_pairs, h.max() as f64 / 1e6);
        }
    }

    /// The text.
    pub fn finish(self) -> String {
        self.out
    }
}

/// tcpcopy's statistics as Prometheus text: per-worker series (`worker="0"`, ...) and their
/// sum (`worker="all"`) for ingress, sessions, ports, queues and latencies; the control
/// channel's counters without a worker label.
pub fn tcpcopy_prometheus(s: &TcpcopyStats) -> String {
    let (total, workers) = worker_views(s);
    let names: Vec<String> = (0..workers.len()).map(|i| i.to_string()).collect();
    let mut views: Vec<(Labels<'_>, &WorkerView<'_>)> = workers
        .iter()
        .zip(&names)
        .map(|(w, n)| (vec![("worker", n.as_str())], w))
        .collect();
    views.push((vec![("worker", "all")], &total));
    let mut p = PrometheusText::new();
    p.family("tcpcopy_workers", "Worker threads.", "gauge");
    p.sample("tcpcopy_workers", &[], workers.len() as u64);
    let group = |f: &dyn Fn(&WorkerView<'_>) -> Vec<Field>| -> Vec<(Labels<'_>, Vec<Field>)> {
        views.iter().map(|(l, w)| (l.clone(), f(w))).collect()
    };
    p.fields("tcpcopy_ingress", &group(&|w| ingress_fields(w.ingress)));
    p.fields("tcpcopy_sessions", &group(&|w| session_fields(w.sessions)));
    p.fields(
        "tcpcopy_sessions",
        &group(&|w| {
            vec![Field {
                name: "open".into(),
                help: "Sessions in the session tables.",
                kind: Kind::Gauge,
                value: w.table_len as u64,
            }]
        }),
    );
    p.fields("tcpcopy_capture", &group(&|w| capture_fields(w.capture)));
    p.fields("tcpcopy_transmit", &group(&|w| transmit_fields(w.transmit)));
    p.fields(
        "tcpcopy",
        &group(&|w| {
            vec![
                field(
                    "control_queue_full",
                    "Route registrations dropped because the queue to the control thread was full.",
                    w.control_queue_full,
                ),
                field(
                    "replies_dispatched",
                    "Replies the control thread handed to the worker.",
                    w.replies_dispatched,
                ),
                field(
                    "replies",
                    "Replies the worker took from its queue.",
                    w.replies,
                ),
            ]
        }),
    );
    p.fields("tcpcopy_control", &[(vec![], client_fields(&s.control))]);
    p.fields(
        "tcpcopy",
        &[(
            vec![],
            vec![
                field(
                    "reply_queue_full",
                    "Replies dropped because a worker's queue was full.",
                    s.reply_queue_full,
                ),
                field(
                    "shed",
                    "Sessions shed to stay under the memory cap (-m).",
                    s.shed,
                ),
                field(
                    "resynced",
                    "Routes of open sessions registered again after an intercept connection came back.",
                    s.resynced,
                ),
                field(
                    "dump_written",
                    "Packets written to the --dump-sent file.",
                    s.dump.written,
                ),
                field(
                    "dump_dropped",
                    "Packets left out of the --dump-sent file (its writer fell behind).",
                    s.dump.dropped,
                ),
                field(
                    "dump_errors",
                    "Packets lost to write errors of the --dump-sent file.",
                    s.dump.errors,
                ),
            ],
        )],
    );
    let capture: Vec<(Labels<'_>, &Histogram<u64>)> = views
        .iter()
        .map(|(l, w)| (l.clone(), &w.latency.capture_to_tx))
        .collect();
    p.latency(
        "tcpcopy_capture_to_tx_latency",
        "Capture (kernel timestamp) to transmit, per accepted packet.",
        &capture,
    );
    let reply: Vec<(Labels<'_>, &Histogram<u64>)> = views
        .iter()
        .map(|(l, w)| (l.clone(), &w.latency.reply))
        .collect();
    p.latency(
        "tcpcopy_reply_latency",
        "Request sent to the first reply byte, per request.",
        &reply,
    );
    p.finish()
}

/// intercept's statistics as Prometheus text (`intercept_*`).
pub fn intercept_prometheus(s: &InterceptStats) -> String {
    let mut p = PrometheusText::new();
    p.fields("intercept", &[(vec![], intercept_fields(s))]);
    p.fields("intercept_capture", &[(vec![], capture_fields(&s.capture))]);
    p.fields("intercept_control", &[(vec![], server_fields(&s.control))]);
    p.finish()
}

/// Statistics that can be rendered for `--metrics-file` and `--metrics-listen`.
pub trait Exposition {
    /// As a JSON value.
    fn json(&self) -> Value;
    /// As Prometheus text exposition.
    fn prometheus(&self) -> String;
}

impl Exposition for TcpcopyStats {
    fn json(&self) -> Value {
        tcpcopy_json(self)
    }
    fn prometheus(&self) -> String {
        tcpcopy_prometheus(self)
    }
}

impl Exposition for InterceptStats {
    fn json(&self) -> Value {
        intercept_json(self)
    }
    fn prometheus(&self) -> String {
        intercept_prometheus(self)
    }
}

/// The format of `--metrics-file`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MetricsFormat {
    /// One JSON object.
    Json,
    /// Prometheus text exposition (e.g. for node_exporter's textfile collector).
    Prometheus,
}

impl MetricsFormat {
    /// The format a path implies: `.json` is JSON, anything else Prometheus text.
    pub fn for_path(path: &Path) -> MetricsFormat {
        match path.extension().and_then(|e| e.to_str()) {
            Some(e) if e.eq_ignore_ascii_case("json") => MetricsFormat::Json,
            _ => MetricsFormat::Prometheus,
        }
    }
}

fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    text.parse::<SocketAddr>().map_err(|_| {
        format!("'{text}' is not an address to listen on; the form is IP:PORT, e.g. 127.0.0.1:9114")
    })
}

/// The metrics flags both binaries share (`#[command(flatten)]`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct MetricsArgs {
    /// Write the statistics to this file at every --stats-interval and at exit (replaced
    /// atomically: PATH.tmp, then rename)
    #[arg(long, value_name = "PATH")]
    pub metrics_file: Option<PathBuf>,
    /// Format of --metrics-file: json or prometheus (default: json for a .json file, else prometheus)
    #[arg(long, value_name = "FORMAT", requires = "metrics_file")]
    pub metrics_format: Option<MetricsFormat>,
    /// Serve GET /metrics (Prometheus text) and GET /stats.json on this address, e.g. 127.0.0.1:9114
    #[arg(long, value_name = "IP:PORT", value_parser = parse_listen)]
    pub metrics_listen: Option<SocketAddr>,
}

/// Writes `contents` to `path` atomically: to `PATH.tmp`, then renamed over `path`.
///
/// # Errors
/// The temporary file cannot be written or renamed (named, with the cause).
pub fn write_atomically(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, contents)
        .with_context(|| format!("cannot write --metrics-file {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| {
        format!(
            "cannot rename {} to --metrics-file {}",
            tmp.display(),
            path.display()
        )
    })
}

/// The pages the HTTP server serves.
#[derive(Debug, Default)]
struct Pages {
    prometheus: String,
    json: String,
}

/// Time the server gives a client, in total, to send its request and take the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest request head read.
const MAX_REQUEST: usize = 8192;
/// Connections served at once, in total and from one address.
const MAX_CLIENTS: usize = 32;
const MAX_CLIENTS_PER_ADDRESS: usize = 4;

/// A tiny HTTP server: `GET /metrics` (Prometheus text) and `GET /stats.json`. An accept
/// thread hands each connection to a thread of its own, which has [`CLIENT_TIMEOUT`] in all
/// (not per read) to send its request and take the answer; at most [`MAX_CLIENTS`] connections
/// are served at once and [`MAX_CLIENTS_PER_ADDRESS`] from one address (more are closed at
/// once), so no slow or hostile client keeps another scrape waiting longer than that.
/// Stops when dropped (the accept thread at once; a client thread within its deadline).
#[derive(Debug)]
pub struct MetricsServer {
    addr: SocketAddr,
    pages: Arc<Mutex<Pages>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MetricsServer {
    /// Listens on `addr` (port 0: any free port) and starts serving.
    ///
    /// # Errors
    /// The address cannot be bound (in use, not local), or the thread cannot start.
    pub fn bind(addr: SocketAddr) -> anyhow::Result<MetricsServer> {
        let listener = TcpListener::bind(addr)
            .with_context(|| format!("cannot listen on --metrics-listen {addr}"))?;
        listener
            .set_nonblocking(true)
            .context("--metrics-listen: set_nonblocking")?;
        let addr = listener
            .local_addr()
            .context("--metrics-listen: local_addr")?;
        let pages = Arc::new(Mutex::new(Pages::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let pages = pages.clone();
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("metrics-http".into())
                .spawn(move || serve(&listener, &pages, &stop))
                .context("cannot start the --metrics-listen thread")?
        };
        Ok(MetricsServer {
            addr,
            pages,
            stop,
            thread: Some(thread),
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Replaces the pages served.
    pub fn publish(&self, prometheus: String, json: String) {
        if let Ok(mut pages) = self.pages.lock() {
            pages.prometheus = prometheus;
            pages.json = json;
        }
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The connections being served, by peer address.
#[derive(Debug, Default)]
struct Clients {
    by_address: std::collections::HashMap<std::net::IpAddr, usize>,
    total: usize,
}

fn serve(listener: &TcpListener, pages: &Arc<Mutex<Pages>>, stop: &AtomicBool) {
    let clients = Arc::new(Mutex::new(Clients::default()));
    while !stop.load(Ordering::Relaxed) {
        let (stream, peer) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(_) => {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
        };
        let address = peer.ip();
        let admitted = match clients.lock() {
            Ok(mut c) => {
                let mine = c.by_address.get(&address).copied().unwrap_or(0);
                let ok = c.total < MAX_CLIENTS && mine < MAX_CLIENTS_PER_ADDRESS;
                if ok {
                    c.total += 1;
                    *c.by_address.entry(address).or_default() += 1;
                }
                ok
            }
            Err(_) => false,
        };
        if !admitted {
            // Closed at once: this address (or everyone) has enough connections open.
            drop(stream);
            continue;
        }
        let (pages, served) = (Arc::clone(pages), Arc::clone(&clients));
        let spawned = std::thread::Builder::new()
            .name("metrics-client".into())
            .spawn(move || {
                let _ = answer(stream, &pages, Instant::now() + CLIENT_TIMEOUT);
                if let Ok(mut c) = served.lock() {
                    c.total -= 1;
                    if let Some(n) = c.by_address.get_mut(&address) {
                        *n -= 1;
                        if *n == 0 {
                            c.by_address.remove(&address);
                        }
                    }
                }
            });
        if spawned.is_err() {
            if let Ok(mut c) = clients.lock() {
                c.total -= 1;
                if let Some(n) = c.by_address.get_mut(&address) {
                    *n -= 1;
                }
            }
        }
    }
}

/// Time left until `deadline`, or a timed-out error (a zero timeout would mean "none").
fn left(deadline: Instant) -> std::io::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "metrics client out of time",
        ));
    }
    Ok(left)
}

/// The page a request asks for, as the metrics server sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Page {
    /// `/metrics`: Prometheus text.
    Prometheus,
    /// `/stats.json`.
    Json,
    /// Any other path (404).
    NotFound,
    /// A method other than GET and HEAD (405).
    MethodNotAllowed,
}

/// A request head, parsed as far as the metrics server reads it (the request line only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// What the request line asks for.
    pub page: Page,
    /// Whether the answer carries its body (not for HEAD).
    pub with_body: bool,
}

/// Whether `head` holds a whole request head (an empty line, CRLF or bare LF, ends it).
/// `scanned` bytes at its start were checked by an earlier call (0: none), so only what
/// arrived since is searched: a client sending one byte per read costs linear time, not
/// quadratic.
pub fn head_complete(head: &[u8], scanned: usize) -> bool {
    let tail = &head[scanned.saturating_sub(3).min(head.len())..];
    tail.windows(4).any(|w| w == b"\r\n\r\n") || tail.windows(2).any(|w| w == b"\n\n")
}

/// Parses the request line of `head` (bytes as received: any encoding, possibly cut short):
/// method and path; a query string is ignored. Never fails: garbage asks for nothing known.
pub fn parse_request(head: &[u8]) -> Request {
    let text = String::from_utf8_lossy(head);
    let mut words = text.lines().next().unwrap_or("").split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let with_body = method != "HEAD";
    let page = if method != "GET" && method != "HEAD" {
        Page::MethodNotAllowed
    } else {
        match path {
            "/metrics" => Page::Prometheus,
            "/stats.json" => Page::Json,
            _ => Page::NotFound,
        }
    };
    Request { page, with_body }
}

/// Reads one request head and answers it, all before `deadline`; the connection is closed
/// after the answer.
fn answer(mut stream: TcpStream, pages: &Mutex<Pages>, deadline: Instant) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let mut scanned = 0;
    while !head_complete(&head, scanned) {
        scanned = head.len();
        stream.set_read_timeout(Some(left(deadline)?))?;
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > MAX_REQUEST {
            return respond(
                &mut stream,
                "431 Request Header Fields Too Large",
                "text/plain",
                b"request too large\n",
                true,
            );
        }
    }
    stream.set_write_timeout(Some(left(deadline)?))?;
    let Request { page, with_body } = parse_request(&head);
    if page == Page::MethodNotAllowed {
        return respond(
            &mut stream,
            "405 Method Not Allowed",
            "text/plain",
            b"use GET\n",
            with_body,
        );
    }
    let (prometheus, json) = match pages.lock() {
        Ok(p) => (p.prometheus.clone(), p.json.clone()),
        Err(_) => (String::new(), String::new()),
    };
    let page = match page {
        Page::Prometheus => Some(("text/plain; version=0.0.4; charset=utf-8", prometheus)),
        Page::Json => Some(("application/json", json)),
        Page::NotFound | Page::MethodNotAllowed => None,
    };
    match page {
        Some((_, body)) if body.is_empty() => respond(
            &mut stream,
            "503 Service Unavailable",
            "text/plain",
            b"no statistics yet\n",
            with_body,
        ),
        Some((kind, body)) => respond(&mut stream, "200 OK", kind, body.as_bytes(), with_body),
        None => respond(
            &mut stream,
            "404 Not Found",
            "text/plain",
            b"GET /metrics (Prometheus text) or GET /stats.json\n",
            with_body,
        ),
    }
}

fn respond(
    stream: &mut TcpStream,
    status: &str,
    kind: &str,
    body: &[u8],
    with_body: bool,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    if with_body {
        stream.write_all(body)?;
    }
    stream.flush()
}

/// How often the served pages are refreshed.
const PUBLISH_EVERY: Duration = Duration::from_secs(1);

/// Drives `--metrics-file` and `--metrics-listen` from a binary's main loop: call
/// [`MetricsExporter::tick`] often (it renders only when something is due) and
/// [`MetricsExporter::finish`] with the final statistics.
#[derive(Debug)]
pub struct MetricsExporter {
    file: Option<(PathBuf, MetricsFormat)>,
    server: Option<MetricsServer>,
    interval: Option<Duration>,
    next_file: Option<Instant>,
    next_publish: Option<Instant>,
}

impl MetricsExporter {
    /// Sets up what the flags ask for (nothing when none is given): binds `--metrics-listen`
    /// at once. The file is written at the first tick, then every `interval` (`None`: only at
    /// [`MetricsExporter::finish`]).
    ///
    /// # Errors
    /// `--metrics-listen` cannot be bound.
    pub fn start(
        args: &MetricsArgs,
        interval: Option<Duration>,
    ) -> anyhow::Result<MetricsExporter> {
        let file = args.metrics_file.as_ref().map(|path| {
            (
                path.clone(),
                args.metrics_format
                    .unwrap_or_else(|| MetricsFormat::for_path(path)),
            )
        });
        let server = args.metrics_listen.map(MetricsServer::bind).transpose()?;
        if let Some(server) = &server {
            tracing::info!(
                "metrics: GET http://{}/metrics and /stats.json",
                server.local_addr()
            );
        }
        Ok(MetricsExporter {
            file,
            server,
            interval,
            next_file: None,
            next_publish: None,
        })
    }

    /// True when a file or a listener was asked for.
    pub fn is_enabled(&self) -> bool {
        self.file.is_some() || self.server.is_some()
    }

    /// The address `--metrics-listen` is bound to.
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        self.server.as_ref().map(MetricsServer::local_addr)
    }

    /// Writes the file and refreshes the served pages when due; `stats` is called only then.
    /// Write errors are logged, not returned (the replay goes on).
    pub fn tick<S: Exposition>(&mut self, now: Instant, stats: impl FnOnce() -> S) {
        let file_due = self.file.is_some()
            && match (self.next_file, self.interval) {
                (None, _) => true,
                (Some(at), Some(_)) => now >= at,
                (Some(_), None) => false,
            };
        let publish_due =
            self.server.is_some() && !matches!(self.next_publish, Some(at) if now < at);
        if !file_due && !publish_due {
            return;
        }
        let stats = stats();
        if file_due {
            self.write_file(&stats);
            self.next_file = Some(now + self.interval.unwrap_or(Duration::ZERO));
        }
        if publish_due {
            self.publish(&stats);
            self.next_publish = Some(now + PUBLISH_EVERY);
        }
    }

    /// Writes the file and publishes the final statistics.
    pub fn finish<S: Exposition>(&mut self, stats: &S) {
        self.write_file(stats);
        self.publish(stats);
    }

    fn write_file<S: Exposition>(&self, stats: &S) {
        let Some((path, format)) = &self.file else {
            return;
        };
        let text = match format {
            MetricsFormat::Json => json_text(stats),
            MetricsFormat::Prometheus => stats.prometheus(),
        };
        if let Err(e) = write_atomically(path, text.as_bytes()) {
            tracing::warn!("{e:#}");
        }
    }

    fn publish<S: Exposition>(&self, stats: &S) {
        if let Some(server) = &self.server {
            server.publish(stats.prometheus(), json_text(stats));
        }
    }
}

/// The JSON text of `stats` with the time it was rendered (`unix_time`, seconds), one line.
fn json_text<S: Exposition>(stats: &S) -> String {
    let mut value = stats.json();
    if let Value::Object(m) = &mut value {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_millis() as f64 / 1000.0);
        m.insert("unix_time".into(), Value::from(now));
    }
    let mut text = value.to_string();
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tcpcopy::WorkerReport;
    use std::collections::{BTreeMap, BTreeSet};

    #[test]
    fn request_heads() {
        let page = |head: &[u8]| parse_request(head);
        let get = |page| Request {
            page,
            with_body: true,
        };
        assert_eq!(
            page(b"GET /metrics HTTP/1.1\r\n\r\n"),
            get(Page::Prometheus)
        );
        assert_eq!(page(b"GET /stats.json?x=1 HTTP/1.0\n\n"), get(Page::Json));
        assert_eq!(page(b"GET /nope HTTP/1.1\r\n\r\n"), get(Page::NotFound));
        assert_eq!(
            page(b"POST /metrics HTTP/1.1\r\n\r\n"),
            get(Page::MethodNotAllowed)
        );
        assert_eq!(
            page(b"HEAD /metrics HTTP/1.1\r\n\r\n"),
            Request {
                page: Page::Prometheus,
                with_body: false
            }
        );
        // Garbage asks for nothing: empty, no path, invalid UTF-8, a request line cut short.
        assert_eq!(page(b""), get(Page::MethodNotAllowed));
        assert_eq!(page(b"GET"), get(Page::NotFound));
        assert_eq!(page(b"\xff\xfe /metrics\r\n"), get(Page::MethodNotAllowed));
        assert!(head_complete(b"GET / HTTP/1.1\r\n\r\n", 0));
        assert!(head_complete(b"GET /\n\n", 0));
        assert!(!head_complete(b"GET / HTTP/1.1\r\nHost: x\r\n", 0));
        // Found by the metrics_http fuzz target's rate (3,300 inputs/s): every read rescanned
        // the whole head. Only the new bytes (and the 3 before, for a split CRLF CRLF) are
        // searched now, with the same answers for heads that grow byte by byte.
        let head = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        for split in 0..head.len() {
            let whole = head_complete(&head[..split], 0);
            for scanned in 0..=split {
                let earlier = head_complete(&head[..scanned], 0);
                if !earlier {
                    assert_eq!(
                        head_complete(&head[..split], scanned),
                        whole,
                        "{split} {scanned}"
                    );
                }
            }
        }
    }

    /// Checks the Prometheus text format line by line: comments are HELP/TYPE of a valid name,
    /// every sample belongs to a family announced by TYPE before it (summary samples may add
    /// `_sum`/`_count`), labels are well-formed, values are numbers, no family is announced
    /// twice, no series repeats. Returns sample -> value.
    fn parse_prometheus(text: &str) -> BTreeMap<String, f64> {
        fn valid_name(n: &str) -> bool {
            let mut chars = n.chars();
            chars
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
        }
        let mut types: BTreeMap<String, String> = BTreeMap::new();
        let mut helps: BTreeSet<String> = BTreeSet::new();
        let mut samples = BTreeMap::new();
        let mut current: Option<(String, String)> = None;
        for line in text.lines() {
            assert!(!line.is_empty(), "empty line in:\n{text}");
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').expect("HELP name text");
                assert!(valid_name(name), "{line}");
                assert!(!help.is_empty(), "{line}");
                assert!(helps.insert(name.to_string()), "HELP twice: {line}");
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
                assert!(valid_name(name), "{line}");
                assert!(
                    ["counter", "gauge", "summary", "histogram", "untyped"].contains(&kind),
                    "{line}"
                );
                assert!(helps.contains(name), "TYPE before HELP: {line}");
                assert!(
                    types.insert(name.to_string(), kind.to_string()).is_none(),
                    "TYPE twice: {line}"
                );
                if kind == "counter" {
                    assert!(name.ends_with("_total"), "counter without _total: {line}");
                }
                current = Some((name.to_string(), kind.to_string()));
                continue;
            }
            assert!(!line.starts_with('#'), "stray comment: {line}");
            let (series, value) = line.rsplit_once(' ').expect("sample value");
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("value not a number: {line}"));
            let name = series.split('{').next().unwrap();
            assert!(valid_name(name), "{line}");
            if let Some(l) = series.strip_prefix(name) {
                if !l.is_empty() {
                    let inner = l
                        .strip_prefix('{')
                        .and_then(|l| l.strip_suffix('}'))
                        .unwrap_or_else(|| panic!("bad labels: {line}"));
                    for pair in inner.split(',') {
                        let (k, v) = pair.split_once('=').expect("label=value");
                        assert!(valid_name(k), "{line}");
                        assert!(
                            v.len() >= 2 && v.starts_with('"') && v.ends_with('"'),
                            "{line}"
                        );
                    }
                }
            }
            let (family, kind) = current.clone().expect("sample before any TYPE");
            let ok = name == family
                || (kind == "summary"
                    && (name == format!("{family}_sum") || name == format!("{family}_count")));
            assert!(ok, "sample {name} outside its family {family}: {line}");
            assert!(
                samples.insert(series.to_string(), value).is_none(),
                "series twice: {line}"
            );
        }
        samples
    }

    fn sample_stats() -> TcpcopyStats {
        let mut workers = Vec::new();
        for i in 0..2u64 {
            let mut w = WorkerReport::default();
            w.ingress.captured = 100 + i;
            w.ingress.accepted = 90 + i;
            w.ingress.bad_options = i;
            w.sessions.created = 12 + i;
            w.sessions.responses = 40 + i;
            w.sessions.sent_syn = 12 + i;
            w.table_len = 3 + i as usize;
            w.capture.rx_packets = 100 + i;
            w.capture.rx_dropped = i;
            w.transmit.tx_packets = 80 + i;
            w.transmit.tx_errors = 2 * i;
            w.control_queue_full = i;
            w.replies = 41 + i;
            for us in 1..=100 {
                w.latency
                    .record_capture_to_tx(Duration::from_micros(us * (i + 1)));
            }
            w.latency.record_reply(Duration::from_millis(3));
            workers.push(w);
        }
        let mut stats = TcpcopyStats {
            workers,
            replies_dispatched: vec![41, 43],
            reply_queue_full: 7,
            ..TcpcopyStats::default()
        };
        stats.control.connections_up = 2;
        stats.control.messages_sent = 50;
        for w in &stats.workers {
            stats.ingress.merge(&w.ingress);
            stats.sessions.add(&w.sessions);
            stats.table_len += w.table_len;
            stats.capture.rx_packets += w.capture.rx_packets;
            stats.capture.rx_dropped += w.capture.rx_dropped;
            stats.transmit.tx_packets += w.transmit.tx_packets;
            stats.transmit.tx_errors += w.transmit.tx_errors;
            stats.control_queue_full += w.control_queue_full;
        }
        stats
    }

    #[test]
    fn tcpcopy_prometheus_is_valid_and_matches_the_struct() {
        let stats = sample_stats();
        let text = tcpcopy_prometheus(&stats);
        let samples = parse_prometheus(&text);
        let get = |k: &str| {
            *samples
                .get(k)
                .unwrap_or_else(|| panic!("no sample {k} in:\n{text}"))
        };
        assert_eq!(get("tcpcopy_sessions_created_total{worker=\"0\"}"), 12.0);
        assert_eq!(get("tcpcopy_sessions_created_total{worker=\"1\"}"), 13.0);
        assert_eq!(get("tcpcopy_sessions_created_total{worker=\"all\"}"), 25.0);
        assert_eq!(get("tcpcopy_ingress_captured_total{worker=\"all\"}"), 201.0);
        assert_eq!(get("tcpcopy_ingress_bad_options_total{worker=\"1\"}"), 1.0);
        assert_eq!(get("tcpcopy_sessions_open{worker=\"all\"}"), 7.0);
        assert_eq!(get("tcpcopy_capture_dropped_total{worker=\"1\"}"), 1.0);
        assert_eq!(get("tcpcopy_transmit_errors_total{worker=\"all\"}"), 2.0);
        assert_eq!(get("tcpcopy_replies_dispatched_total{worker=\"1\"}"), 43.0);
        assert_eq!(get("tcpcopy_replies_total{worker=\"all\"}"), 83.0);
        assert_eq!(get("tcpcopy_control_connections_up"), 2.0);
        assert_eq!(get("tcpcopy_control_messages_sent_total"), 50.0);
        assert_eq!(get("tcpcopy_reply_queue_full_total"), 7.0);
        assert_eq!(get("tcpcopy_workers"), 2.0);
        // Latency: worker 0 recorded 1..=100 us, worker 1 2..=200 us.
        assert_eq!(
            get("tcpcopy_capture_to_tx_latency_seconds{worker=\"0\",quantile=\"0.5\"}"),
            50e-6
        );
        assert_eq!(
            get("tcpcopy_capture_to_tx_latency_seconds_count{worker=\"all\"}"),
            200.0
        );
        let sum = get("tcpcopy_capture_to_tx_latency_seconds_sum{worker=\"0\"}");
        assert!((sum - 5050e-6).abs() < 1e-4, "{sum}");
        assert_eq!(
            get("tcpcopy_capture_to_tx_latency_max_seconds{worker=\"1\"}"),
            200e-6
        );
        assert_eq!(
            get("tcpcopy_reply_latency_seconds_count{worker=\"all\"}"),
            2.0
        );
        // Every session counter has a series per worker and the sum.
        for f in session_fields(&stats.sessions) {
            for w in ["0", "1", "all"] {
                get(&format!(
                    "tcpcopy_sessions_{}_total{{worker=\"{w}\"}}",
                    f.name
                ));
            }
        }
    }

    #[test]
    fn tcpcopy_json_parses_and_matches_the_struct() {
        let stats = sample_stats();
        let text = json_text(&stats);
        let v: Value = serde_json::from_str(&text).expect("valid JSON");
        assert_eq!(v["tool"], "tcpcopy");
        assert_eq!(v["sessions"]["created"], 25);
        assert_eq!(v["ingress"]["captured"], 201);
        assert_eq!(v["sessions_open"], 7);
        assert_eq!(v["capture"]["dropped"], 1);
        assert_eq!(v["transmit"]["packets"], 161);
        assert_eq!(v["control"]["messages_sent"], 50);
        assert_eq!(v["reply_queue_full"], 7);
        assert_eq!(v["replies_dispatched"], 84);
        assert_eq!(v["workers"][1]["worker"], 1);
        assert_eq!(v["workers"][1]["sessions"]["created"], 13);
        assert_eq!(v["workers"][1]["replies_dispatched"], 43);
        assert_eq!(v["workers"][0]["latency"]["capture_to_tx_us"]["p50"], 50);
        assert_eq!(v["latency"]["capture_to_tx_us"]["count"], 200);
        assert_eq!(v["latency"]["reply_us"]["count"], 2);
        assert!(v["unix_time"].as_f64().unwrap() > 1.0e9);
        // Every field of the structs is there.
        let sessions = v["sessions"].as_object().unwrap();
        for f in session_fields(&stats.sessions) {
            assert_eq!(sessions[&f.name], f.value, "{}", f.name);
        }
    }

    #[test]
    fn intercept_renderings_match_the_struct() {
        let mut s = InterceptStats {
            captured: 10,
            routed: 8,
            routes: 3,
            ..InterceptStats::default()
        };
        s.capture.rx_packets = 10;
        s.control.connections_up = 1;
        s.control.records_queued = 8;
        let samples = parse_prometheus(&intercept_prometheus(&s));
        assert_eq!(samples["intercept_captured_total"], 10.0);
        assert_eq!(samples["intercept_routed_total"], 8.0);
        assert_eq!(samples["intercept_routes"], 3.0);
        assert_eq!(samples["intercept_capture_packets_total"], 10.0);
        assert_eq!(samples["intercept_control_connections_up"], 1.0);
        assert_eq!(samples["intercept_control_records_queued_total"], 8.0);
        let v: Value = serde_json::from_str(&json_text(&s)).unwrap();
        assert_eq!(v["tool"], "intercept");
        assert_eq!(v["routed"], 8);
        assert_eq!(v["routes"], 3);
        assert_eq!(v["capture"]["packets"], 10);
        assert_eq!(v["control"]["records_queued"], 8);
    }

    /// A counter added to a statistics struct is exported anyway (found through `Debug`);
    /// this test names it so that its table gets a line with help text.
    #[test]
    fn every_counter_has_a_documented_line() {
        let tables: Vec<(&str, Vec<Field>)> = vec![
            (
                "IngressStats (ingress_fields)",
                ingress_fields(&IngressStats::default()),
            ),
            (
                "SessionStats (session_fields)",
                session_fields(&SessionStats::default()),
            ),
            (
                "ClientStats (client_fields)",
                client_fields(&ClientStats::default()),
            ),
            (
                "ServerStats (server_fields)",
                server_fields(&ServerStats::default()),
            ),
            (
                "InterceptStats (intercept_fields)",
                intercept_fields(&InterceptStats::default()),
            ),
        ];
        for (table, fields) in tables {
            let missing: Vec<&str> = fields
                .iter()
                .filter(|f| f.help == UNDOCUMENTED)
                .map(|f| f.name.as_str())
                .collect();
            assert!(
                missing.is_empty(),
                "add {missing:?} to the table of {table} in pipelines/src/metrics.rs"
            );
        }
        // The structs that are rendered by hand: a new field must be added to the renderers.
        let tcpcopy = format!("{:?}", TcpcopyStats::default());
        for name in top_level_names(&tcpcopy) {
            assert!(
                [
                    "ingress",
                    "sessions",
                    "table_len",
                    "capture",
                    "transmit",
                    "control",
                    "control_queue_full",
                    "reply_queue_full",
                    "replies_dispatched",
                    "workers",
                    "shed",
                    "resynced",
                    "dump"
                ]
                .contains(&name.as_str()),
                "TcpcopyStats.{name} is not rendered by pipelines/src/metrics.rs"
            );
        }
        let port = format!("{:?}", PortStats::default());
        assert_eq!(
            top_level_names(&port),
            [
                "rx_packets",
                "rx_bytes",
                "rx_dropped",
                "rx_duplicates",
                "tx_packets",
                "tx_bytes",
                "tx_errors"
            ],
            "PortStats changed: update capture_fields/transmit_fields"
        );
    }

    fn top_level_names(debug: &str) -> Vec<String> {
        let body = &debug[debug.find('{').unwrap() + 1..];
        let mut depth = 0;
        let mut names = Vec::new();
        let mut item = String::new();
        for c in body.chars() {
            match c {
                '{' | '[' | '(' => depth += 1,
                '}' | ']' | ')' if depth == 0 => break,
                '}' | ']' | ')' => depth -= 1,
                ',' if depth == 0 => {
                    names.push(item.split(':').next().unwrap().trim().to_string());
                    item.clear();
                    continue;
                }
                _ => {}
            }
            if depth == 0 {
                item.push(c);
            }
        }
        if !item.trim().is_empty() {
            names.push(item.split(':').next().unwrap().trim().to_string());
        }
        names
    }

    #[test]
    fn debug_fields_finds_top_level_numbers_only() {
        let text = "S { a: 1, b: Inner { c: 2 }, d: [1, 2], e: 30, f: -1, g: true }";
        assert_eq!(
            debug_fields(text),
            vec![("a".to_string(), 1), ("e".to_string(), 30)]
        );
        assert!(debug_fields("garbage").is_empty());
        assert!(debug_fields("S { a: ").is_empty());
    }

    #[test]
    fn format_follows_the_extension() {
        assert_eq!(
            MetricsFormat::for_path(Path::new("/run/x.json")),
            MetricsFormat::Json
        );
        assert_eq!(
            MetricsFormat::for_path(Path::new("/run/x.prom")),
            MetricsFormat::Prometheus
        );
        assert_eq!(
            MetricsFormat::for_path(Path::new("/run/metrics")),
            MetricsFormat::Prometheus
        );
    }

    #[test]
    fn bad_listen_address_names_the_form() {
        let e = parse_listen("9114").unwrap_err();
        assert!(e.contains("IP:PORT, e.g. 127.0.0.1:9114"), "{e}");
        assert_eq!(
            parse_listen("127.0.0.1:9114").unwrap(),
            "127.0.0.1:9114".parse().unwrap()
        );
    }

    fn http_get(addr: SocketAddr, request: &str) -> String {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    /// Slow clients (a byte at a time, never finishing their request) neither keep a scrape
    /// waiting (it is answered while they are all still connected) nor stay past their
    /// deadline; a flood of connections from one address is cut at its share.
    #[test]
    fn slow_clients_do_not_hold_the_endpoint() {
        let server = MetricsServer::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        server.publish("# metrics\n".into(), "{}".into());
        let addr = server.local_addr();
        let mut slow: Vec<TcpStream> = (0..MAX_CLIENTS_PER_ADDRESS - 1)
            .map(|_| {
                let mut s = TcpStream::connect(addr).unwrap();
                s.write_all(b"GET /met").unwrap();
                s
            })
            .collect();
        let answer = http_get(addr, "GET /metrics HTTP/1.0\r\n\r\n");
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
        // Every slow client is still connected: the scrape did not wait for any of them.
        for s in &mut slow {
            s.set_nonblocking(true).unwrap();
            let mut b = [0u8; 16];
            match s.read(&mut b) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                other => panic!("a slow client was answered or closed early: {other:?}"),
            }
            s.set_nonblocking(false).unwrap();
        }
        // The server cuts each at its deadline: a read sees the connection end (bounded wait).
        for s in &mut slow {
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut b = [0u8; 64];
            match s.read(&mut b) {
                Ok(0) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
                other => panic!("a slow client was not cut at its deadline: {other:?}"),
            }
        }
        // One address's flood: beyond its share, connections are closed at once; a scrape
        // still gets through once the share frees.
        let flood: Vec<TcpStream> = (0..MAX_CLIENTS_PER_ADDRESS + 4)
            .map(|_| TcpStream::connect(addr).unwrap())
            .collect();
        let mut closed = 0;
        for s in &flood {
            s.set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            let mut b = [0u8; 8];
            if matches!((&*s).read(&mut b), Ok(0)) {
                closed += 1;
            }
        }
        assert!(
            closed >= 4,
            "only {closed} of the flood were closed at once"
        );
        drop(flood);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let _ = s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n");
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            if out.starts_with("HTTP/1.1 200 OK") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no scrape served after the flood"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    #[test]
    fn exporter_writes_the_file_atomically_and_serves_both_pages() {
        let dir = std::env::temp_dir().join(format!("metrics-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("stats.json");
        let args = MetricsArgs {
            metrics_file: Some(path.clone()),
            metrics_format: None,
            metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
        };
        let mut exporter = MetricsExporter::start(&args, Some(Duration::from_secs(3600))).unwrap();
        let addr = exporter.listen_addr().unwrap();
        let early = http_get(addr, "GET /metrics HTTP/1.0\r\n\r\n");
        assert!(early.starts_with("HTTP/1.1 503"), "{early}");
        let stats = sample_stats();
        let now = Instant::now();
        exporter.tick(now, || stats.clone());
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(v["sessions"]["created"], 25);
        // Not due again within the interval: the closure is not called.
        exporter.tick(now + Duration::from_millis(10), || -> TcpcopyStats {
            panic!("rendered before it was due")
        });
        let metrics = http_get(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(metrics.starts_with("HTTP/1.1 200 OK"), "{metrics}");
        assert!(metrics.contains("text/plain; version=0.0.4"), "{metrics}");
        let body = metrics.split_once("\r\n\r\n").unwrap().1;
        let samples = parse_prometheus(body);
        assert_eq!(
            samples["tcpcopy_sessions_created_total{worker=\"all\"}"],
            25.0
        );
        let json = http_get(addr, "GET /stats.json HTTP/1.1\r\n\r\n");
        let body = json.split_once("\r\n\r\n").unwrap().1;
        let v: Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["workers"][0]["sessions"]["created"], 12);
        assert!(http_get(addr, "GET /nope HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
        assert!(http_get(addr, "POST /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405"));
        // A client that sends garbage and hangs up does not stop the server.
        drop(TcpStream::connect(addr).unwrap());
        let mut final_stats = stats.clone();
        final_stats.workers[0].sessions.created = 100;
        final_stats.sessions.created = 113;
        exporter.finish(&final_stats);
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(v["sessions"]["created"], 113);
        assert!(!dir.join("stats.json.tmp").exists());
        let again = http_get(addr, "GET /stats.json HTTP/1.1\r\n\r\n");
        assert!(again.contains("\"created\":113"), "{again}");
        drop(exporter);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn prometheus_file_by_default() {
        let dir = std::env::temp_dir().join(format!("metrics-prom-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tcpcopy.prom");
        let args = MetricsArgs {
            metrics_file: Some(path.clone()),
            ..MetricsArgs::default()
        };
        let mut exporter = MetricsExporter::start(&args, None).unwrap();
        assert!(exporter.is_enabled() && exporter.listen_addr().is_none());
        let s = InterceptStats {
            routed: 5,
            ..InterceptStats::default()
        };
        exporter.tick(Instant::now(), || s.clone());
        // Without an interval the file is written at the first tick and at finish only.
        exporter.tick(
            Instant::now() + Duration::from_secs(60),
            || -> InterceptStats { panic!("no interval: nothing is due") },
        );
        let samples = parse_prometheus(&std::fs::read_to_string(&path).unwrap());
        assert_eq!(samples["intercept_routed_total"], 5.0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
