//! Minimal HTTP/1.1 message reading shared by `httpload` and `labserver`: message heads, bodies framed
//! by `Content-Length`, chunked transfer coding or connection close, and the deterministic bodies and
//! paths both tools (and the tests that check them) agree on.

use std::io::{self, BufRead, Read};

use sha2::{Digest, Sha256};

/// Largest message head (start line plus headers) either tool accepts.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// A parsed message head: the start line and the header fields in arrival order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// The start line without its line ending (`GET /x HTTP/1.1` or `HTTP/1.1 200 OK`).
    pub start_line: String,
    /// Header fields as (name, value), value trimmed of surrounding whitespace.
    pub headers: Vec<(String, String)>,
}

impl Head {
    /// The value of the first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Whether any `name` header contains `token` in its comma-separated list (case-insensitive).
    pub fn has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    /// The `Content-Length`, if present.
    ///
    /// # Errors
    /// `InvalidData` when the value is not a decimal number or several headers disagree.
    pub fn content_length(&self) -> io::Result<Option<u64>> {
        let mut found: Option<u64> = None;
        for (_, v) in self
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        {
            let n: u64 = v
                .trim()
                .parse()
                .map_err(|_| invalid(format!("bad Content-Length {v:?}")))?;
            if found.is_some_and(|f| f != n) {
                return Err(invalid("conflicting Content-Length headers".into()));
            }
            found = Some(n);
        }
        Ok(found)
    }

    /// Whether the message uses the chunked transfer coding.
    pub fn is_chunked(&self) -> bool {
        self.has_token("transfer-encoding", "chunked")
    }
}

/// How a message body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    /// No body.
    None,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked transfer coding.
    Chunked,
    /// Everything until the peer closes the connection (responses only).
    UntilClose,
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Reads one line ending in LF (at most `limit` bytes); returns it without CR LF, or `None` on EOF
/// before any byte.
fn read_line<R: BufRead>(reader: &mut R, limit: usize) -> io::Result<Option<String>> {
    let mut line = Vec::new();
    let n = reader
        .by_ref()
        .take(limit as u64 + 1)
        .read_until(b'\n', &mut line)?;
    if n == 0 {
        return Ok(None);
    }
    if line.last() != Some(&b'\n') {
        if n > limit {
            return Err(invalid("line too long".into()));
        }
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed inside a line",
        ));
    }
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    String::from_utf8(line)
        .map(Some)
        .map_err(|_| invalid("line is not UTF-8".into()))
}

/// Reads a message head. Returns `Ok(None)` if the peer closed the connection before sending a byte
/// (the normal end of a keep-alive connection). Leading empty lines are skipped (RFC 9112 2.2).
///
/// # Errors
/// I/O errors (including read timeouts), `UnexpectedEof` inside the head, `InvalidData` for a
/// malformed or oversized head.
pub fn read_head<R: BufRead>(reader: &mut R) -> io::Result<Option<Head>> {
    let mut budget = MAX_HEAD_BYTES;
    let start_line = loop {
        match read_line(reader, budget)? {
            None => return Ok(None),
            Some(l) if l.is_empty() => budget = budget.saturating_sub(2),
            Some(l) => break l,
        }
        if budget == 0 {
            return Err(invalid("head too large".into()));
        }
    };
    budget = budget.saturating_sub(start_line.len() + 2);
    let mut headers = Vec::new();
    loop {
        let line = read_line(reader, budget)?.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed inside a head",
            )
        })?;
        if line.is_empty() {
            break;
        }
        budget = budget
            .checked_sub(line.len() + 2)
            .ok_or_else(|| invalid("head too large".into()))?;
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| invalid(format!("header line without ':': {line:?}")))?;
        if name.is_empty() || name.contains([' ', '\t']) {
            return Err(invalid(format!("bad header name {name:?}")));
        }
        headers.push((name.to_string(), value.trim().to_string()));
    }
    Ok(Some(Head {
        start_line,
        headers,
    }))
}

/// Reads a body with the given framing, passing every piece of it to `sink`; returns its length.
///
/// # Errors
/// I/O errors, `UnexpectedEof` when the peer closes early, `InvalidData` for bad chunk framing.
pub fn read_body<R: BufRead>(
    reader: &mut R,
    framing: BodyFraming,
    sink: &mut dyn FnMut(&[u8]),
) -> io::Result<u64> {
    match framing {
        BodyFraming::None => Ok(0),
        BodyFraming::Length(n) => {
            copy_exact(reader, n, sink)?;
            Ok(n)
        }
        BodyFraming::UntilClose => {
            let mut total = 0u64;
            loop {
                let buf = reader.fill_buf()?;
                if buf.is_empty() {
                    return Ok(total);
                }
                let n = buf.len();
                sink(buf);
                reader.consume(n);
                total += n as u64;
            }
        }
        BodyFraming::Chunked => {
            let mut total = 0u64;
            loop {
                let line = read_line(reader, 1024)?.ok_or_else(|| {
                    io::Error::new(io::ErrorKind::UnexpectedEof, "closed before chunk size")
                })?;
                let size_text = line.split(';').next().unwrap_or("").trim();
                let size = u64::from_str_radix(size_text, 16)
                    .map_err(|_| invalid(format!("bad chunk size {line:?}")))?;
                if size == 0 {
                    // Trailer fields, then an empty line.
                    loop {
                        let t = read_line(reader, MAX_HEAD_BYTES)?.ok_or_else(|| {
                            io::Error::new(io::ErrorKind::UnexpectedEof, "closed in trailers")
                        })?;
                        if t.is_empty() {
                            return Ok(total);
                        }
                    }
                }
                copy_exact(reader, size, sink)?;
                total += size;
                let end = read_line(reader, 2)?;
                if end.as_deref() != Some("") {
                    return Err(invalid("chunk not followed by CRLF".into()));
                }
            }
        }
    }
}

fn copy_exact<R: BufRead>(
    reader: &mut R,
    mut n: u64,
    sink: &mut dyn FnMut(&[u8]),
) -> io::Result<()> {
    while n > 0 {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("connection closed with {n} body bytes missing"),
            ));
        }
        let take = buf.len().min(usize::try_from(n).unwrap_or(usize::MAX));
        sink(&buf[..take]);
        reader.consume(take);
        n -= take as u64;
    }
    Ok(())
}

/// A request line: method, request target and HTTP minor version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestLine {
    /// Method, e.g. `GET`.
    pub method: String,
    /// Request target as sent, e.g. `/p/000001`.
    pub target: String,
    /// 1 for HTTP/1.1, 0 for HTTP/1.0.
    pub minor: u8,
}

/// Parses `METHOD SP TARGET SP HTTP/1.x`.
///
/// # Errors
/// `InvalidData` for anything else.
pub fn parse_request_line(line: &str) -> io::Result<RequestLine> {
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(invalid(format!("bad request line {line:?}")));
    };
    let minor = match version {
        "HTTP/1.1" => 1,
        "HTTP/1.0" => 0,
        _ => return Err(invalid(format!("unsupported version {version:?}"))),
    };
    if method.is_empty() || target.is_empty() {
        return Err(invalid(format!("bad request line {line:?}")));
    }
    Ok(RequestLine {
        method: method.to_string(),
        target: target.to_string(),
        minor,
    })
}

/// Parses `HTTP/1.x SP STATUS [SP reason]`; returns (minor version, status).
///
/// # Errors
/// `InvalidData` for anything else.
pub fn parse_status_line(line: &str) -> io::Result<(u8, u16)> {
    let mut parts = line.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    let minor = match version {
        "HTTP/1.1" => 1,
        "HTTP/1.0" => 0,
        _ => return Err(invalid(format!("bad status line {line:?}"))),
    };
    let status: u16 = parts
        .next()
        .filter(|s| s.len() == 3)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| invalid(format!("bad status line {line:?}")))?;
    Ok((minor, status))
}

/// How a request body is framed (RFC 9112 6.3: chunked wins over Content-Length).
///
/// # Errors
/// `InvalidData` for a bad `Content-Length`.
pub fn request_framing(head: &Head) -> io::Result<BodyFraming> {
    if head.is_chunked() {
        return Ok(BodyFraming::Chunked);
    }
    Ok(match head.content_length()? {
        Some(n) if n > 0 => BodyFraming::Length(n),
        _ => BodyFraming::None,
    })
}

/// How a response body is framed, given its status (RFC 9112 6.3; no HEAD requests here).
///
/// # Errors
/// `InvalidData` for a bad `Content-Length`.
pub fn response_framing(status: u16, head: &Head) -> io::Result<BodyFraming> {
    if (100..200).contains(&status) || status == 204 || status == 304 {
        return Ok(BodyFraming::None);
    }
    if head.is_chunked() {
        return Ok(BodyFraming::Chunked);
    }
    Ok(match head.content_length()? {
        Some(0) => BodyFraming::None,
        Some(n) => BodyFraming::Length(n),
        None => BodyFraming::UntilClose,
    })
}

/// Whether a connection stays open after a message with this head and HTTP minor version.
pub fn keeps_alive(minor: u8, head: &Head) -> bool {
    if head.has_token("connection", "close") {
        return false;
    }
    minor >= 1 || head.has_token("connection", "keep-alive")
}

/// A response read off a connection (its body went to the sink).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Body length in bytes.
    pub body_len: u64,
    /// Whether the connection may carry another request.
    pub keep_alive: bool,
}

/// Reads a whole response (skipping interim 1xx responses), body into `sink`. `Ok(None)` if the peer
/// closed the connection before sending any byte.
///
/// # Errors
/// As [`read_head`] and [`read_body`].
pub fn read_response<R: BufRead>(
    reader: &mut R,
    sink: &mut dyn FnMut(&[u8]),
) -> io::Result<Option<Response>> {
    let mut first = true;
    loop {
        let head = match read_head(reader)? {
            Some(h) => h,
            None if first => return Ok(None),
            None => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed after an interim response",
                ))
            }
        };
        first = false;
        let (minor, status) = parse_status_line(&head.start_line)?;
        if (100..200).contains(&status) && status != 101 {
            continue;
        }
        let framing = response_framing(status, &head)?;
        let body_len = read_body(reader, framing, sink)?;
        let keep_alive = framing != BodyFraming::UntilClose && keeps_alive(minor, &head);
        return Ok(Some(Response {
            status,
            body_len,
            keep_alive,
        }));
    }
}

/// A deterministic pseudo-random body of `len` bytes (xorshift64* seeded by `seed`). `httpload
/// --post-bytes` sends `body_bytes(len, seed)`; tests recompute it to check what arrived.
pub fn body_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed ^ 0x9E37_79B9_7F4A_7C15;
    if state == 0 {
        state = 1;
    }
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Lower-case hex SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// The path `httpload` uses for request `index` (0-based): `{prefix}{index:06}`, or
/// `{prefix}{tag}-{index:06}` with a tag. Example: `load_path("/p/", Some("a"), 7) == "/p/a-000007"`.
pub fn load_path(prefix: &str, tag: Option<&str>, index: u64) -> String {
    match tag {
        Some(t) if !t.is_empty() => format!("{prefix}{t}-{index:06}"),
        _ => format!("{prefix}{index:06}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufReader, Cursor};

    fn collect(input: &[u8]) -> (io::Result<Option<Response>>, Vec<u8>, Vec<u8>) {
        let mut r = BufReader::with_capacity(7, Cursor::new(input.to_vec()));
        let mut body = Vec::new();
        let res = read_response(&mut r, &mut |b| body.extend_from_slice(b));
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).unwrap();
        (res, body, rest)
    }

    #[test]
    fn content_length_response_leaves_next_message() {
        let (res, body, rest) = collect(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloHTTP/1.1 204 No Content\r\n\r\n",
        );
        assert_eq!(
            res.unwrap().unwrap(),
            Response {
                status: 200,
                body_len: 5,
                keep_alive: true
            }
        );
        assert_eq!(body, b"hello");
        assert_eq!(rest, b"HTTP/1.1 204 No Content\r\n\r\n");
    }

    #[test]
    fn chunked_response_with_extensions_and_trailers() {
        let (res, body, rest) = collect(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n4;x=y\r\nWiki\r\n5\r\npedia\r\n0\r\nX-T: 1\r\n\r\nNEXT",
        );
        assert_eq!(res.unwrap().unwrap().body_len, 9);
        assert_eq!(body, b"Wikipedia");
        assert_eq!(rest, b"NEXT");
    }

    #[test]
    fn interim_response_is_skipped_and_close_is_honoured() {
        let (res, body, _) = collect(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
        );
        assert_eq!(
            res.unwrap().unwrap(),
            Response {
                status: 201,
                body_len: 2,
                keep_alive: false
            }
        );
        assert_eq!(body, b"ok");
    }

    #[test]
    fn body_until_close_and_http10() {
        let (res, body, _) = collect(b"HTTP/1.0 200 OK\r\n\r\nall of it");
        assert_eq!(
            res.unwrap().unwrap(),
            Response {
                status: 200,
                body_len: 9,
                keep_alive: false
            }
        );
        assert_eq!(body, b"all of it");
        let (res, _, _) =
            collect(b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 0\r\n\r\n");
        assert!(res.unwrap().unwrap().keep_alive);
    }

    #[test]
    fn eof_cases() {
        assert!(collect(b"").0.unwrap().is_none());
        let e = collect(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort")
            .0
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        let e = collect(b"HTTP/1.1 200 OK\r\nContent-").0.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn malformed_input_is_invalid_data() {
        for bad in [
            &b"HTTP/1.1 20 OK\r\n\r\n"[..],
            b"HTTP/2 200 OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nNoColon\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nab\r\n0\r\n\r\n",
        ] {
            let e = collect(bad).0.unwrap_err();
            assert_eq!(
                e.kind(),
                io::ErrorKind::InvalidData,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let huge = format!(
            "HTTP/1.1 200 OK\r\nX: {}\r\n\r\n",
            "a".repeat(MAX_HEAD_BYTES)
        );
        assert_eq!(
            collect(huge.as_bytes()).0.unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
    }

    #[test]
    fn request_heads_and_framing() {
        let mut r = Cursor::new(
            b"\r\nPOST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"
                .to_vec(),
        );
        let head = read_head(&mut r).unwrap().unwrap();
        let line = parse_request_line(&head.start_line).unwrap();
        assert_eq!(
            (line.method.as_str(), line.target.as_str(), line.minor),
            ("POST", "/up", 1)
        );
        assert_eq!(request_framing(&head).unwrap(), BodyFraming::Chunked);
        assert_eq!(head.header("HOST"), Some("x"));
        assert!(parse_request_line("GET /x").is_err());
        assert!(parse_request_line("GET /x HTTP/3").is_err());
        assert!(keeps_alive(
            1,
            &Head {
                start_line: String::new(),
                headers: vec![]
            }
        ));
        assert!(!keeps_alive(
            0,
            &Head {
                start_line: String::new(),
                headers: vec![]
            }
        ));
    }

    #[test]
    fn deterministic_bodies_and_paths() {
        assert_eq!(body_bytes(1000, 1), body_bytes(1000, 1));
        assert_ne!(body_bytes(1000, 1), body_bytes(1000, 2));
        assert_eq!(body_bytes(13, 1), body_bytes(1000, 1)[..13]);
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(load_path("/p/", None, 123), "/p/000123");
        assert_eq!(load_path("/p/", Some("run1"), 7), "/p/run1-000007");
        assert_eq!(load_path("/p/", Some(""), 1_234_567), "/p/1234567");
    }
}
