//! Optional authentication of the control channel (off by default: then not one byte on the
//! wire differs from the C tools).
//!
//! Both sides hold the same secret (read from a file, at least [`MIN_SECRET_LEN`] bytes) and
//! prove knowledge of it with HMAC-SHA256 (RFC 2104, FIPS 180-4). The secret itself never
//! crosses the wire.
//!
//! # TCP: challenge-response in both directions, before the version hello
//!
//! ```text
//!  tcpcopy -> intercept   CHALLENGE, 24 bytes
//!    0   4  magic "TCRA" (54 43 52 41)
//!    4   1  version 1
//!    5   3  zero
//!    8  16  Nc: tcpcopy's nonce (fresh random bytes per connection)
//!  intercept -> tcpcopy   RESPONSE, 56 bytes
//!    0   4  magic "TCRB" (54 43 52 42)
//!    4   1  version 1
//!    5   3  zero
//!    8  16  Ni: intercept's nonce (fresh random bytes per connection)
//!   24  32  HMAC-SHA256(secret, "tcpcopy-rs tcp auth v1 intercept" || Nc || Ni)
//!  tcpcopy -> intercept   PROOF, 32 bytes
//!    0  32  HMAC-SHA256(secret, "tcpcopy-rs tcp auth v1 tcpcopy" || Nc || Ni)
//! ```
//!
//! tcpcopy checks intercept's MAC before it sends its own proof (so it never talks to an
//! intercept without the secret); intercept checks the proof before it reports the connection,
//! reads any message or sends any record. Then the stream continues exactly as without
//! authentication: the 14-byte version hello, route messages one way, records the other way.
//! The two MACs use different labels, so neither can be reflected as the other. A C tool on the
//! other end fails at once: a C intercept reads "TCRA" as a non-zero client address ("client
//! too old") and closes; our intercept reads a C hello where it expects "TCRA" and refuses.
//!
//! # UDP: a keyed MAC on every datagram
//!
//! See [`udp`](crate::control::udp) for the datagram layout. With authentication, every datagram
//! ends with a 16-byte tag, HMAC-SHA256 truncated to its first 16 bytes ([`UDP_MAC_LEN`]),
//! over all bytes before it. The key is
//!
//! * for the opening (unkeyed) HELLO: `HMAC-SHA256(secret, "tcpcopy-rs udp v1 hello")`;
//! * for everything else, per session and direction, from tcpcopy's session id `S` (8 bytes,
//!   big-endian) and both nonces:
//!   `K_up = HMAC-SHA256(secret, "tcpcopy-rs udp v1 up" || S || Nc || Ni)` (tcpcopy → intercept),
//!   `K_down = HMAC-SHA256(secret, "tcpcopy-rs udp v1 down" || S || Nc || Ni)` (intercept →
//!   tcpcopy).
//!
//! Each datagram's sequence number is checked against a sliding window after its MAC
//! ([`SeqWindow`](crate::control::udp::SeqWindow)), so a replayed datagram is rejected; a
//! datagram from an older session fails the MAC because both nonces are fresh per session.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Shortest secret accepted.
pub const MIN_SECRET_LEN: usize = 16;
/// Longest secret file read.
pub const MAX_SECRET_LEN: usize = 4096;
/// Length of a nonce.
pub const NONCE_LEN: usize = 16;
/// Length of an HMAC-SHA256 tag.
pub const MAC_LEN: usize = 32;
/// Length of the truncated tag that ends an authenticated UDP datagram.
pub const UDP_MAC_LEN: usize = 16;
/// Length of the TCP CHALLENGE (tcpcopy → intercept).
pub const CHALLENGE_LEN: usize = 24;
/// Length of the TCP RESPONSE (intercept → tcpcopy).
pub const RESPONSE_LEN: usize = 56;
/// Length of the TCP PROOF (tcpcopy → intercept).
pub const PROOF_LEN: usize = 32;
/// Magic of the CHALLENGE.
pub const CHALLENGE_MAGIC: [u8; 4] = *b"TCRA";
/// Magic of the RESPONSE.
pub const RESPONSE_MAGIC: [u8; 4] = *b"TCRB";
/// Version byte of both TCP handshake messages.
pub const AUTH_VERSION: u8 = 1;

const LABEL_TCP_INTERCEPT: &[u8] = b"tcpcopy-rs tcp auth v1 intercept";
const LABEL_TCP_TCPCOPY: &[u8] = b"tcpcopy-rs tcp auth v1 tcpcopy";
const LABEL_UDP_HELLO: &[u8] = b"tcpcopy-rs udp v1 hello";
const LABEL_UDP_UP: &[u8] = b"tcpcopy-rs udp v1 up";
const LABEL_UDP_DOWN: &[u8] = b"tcpcopy-rs udp v1 down";

type HmacSha256 = Hmac<Sha256>;

/// Why authentication failed or could not be set up. Each variant's text is its message.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The secret file could not be read.
    #[error("cannot read the secret file {path}: {source}")]
    SecretFile {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The secret is too short to be worth anything.
    #[error("the secret is {0} bytes long; use at least {MIN_SECRET_LEN} (e.g. `head -c 32 /dev/urandom | base64 > FILE`)")]
    SecretTooShort(usize),
    /// The secret file is implausibly large.
    #[error("the secret file is over {MAX_SECRET_LEN} bytes; is it the right file?")]
    SecretTooLong,
    /// The peer's first bytes are not the expected handshake message (a peer without
    /// authentication, or another protocol).
    #[error("the peer does not authenticate (expected magic {expected:02x?}, got {got:02x?})")]
    BadMagic {
        /// The magic expected.
        expected: [u8; 4],
        /// The bytes received.
        got: [u8; 4],
    },
    /// The peer speaks another version of the handshake.
    #[error("authentication version {0} is not supported (expected {AUTH_VERSION})")]
    BadVersion(u8),
    /// The peer's MAC is wrong: it does not know the secret.
    #[error("the peer's proof is wrong: it does not hold the same secret")]
    BadProof,
    /// The OS random generator failed.
    #[error("the OS random generator failed: {0}")]
    Random(String),
}

/// The shared secret. Cheap to clone; its `Debug` never shows the bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<[u8]>);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({} bytes)", self.0.len())
    }
}

impl Secret {
    /// A secret from bytes.
    ///
    /// # Errors
    /// [`AuthError::SecretTooShort`] below [`MIN_SECRET_LEN`] bytes.
    pub fn new(bytes: &[u8]) -> Result<Secret, AuthError> {
        if bytes.len() < MIN_SECRET_LEN {
            return Err(AuthError::SecretTooShort(bytes.len()));
        }
        if bytes.len() > MAX_SECRET_LEN {
            return Err(AuthError::SecretTooLong);
        }
        Ok(Secret(bytes.into()))
    }

    /// The secret in `path`: the file's bytes without trailing line breaks (`\n`, `\r`), so
    /// `echo` and editors do not change it.
    ///
    /// # Errors
    /// [`AuthError::SecretFile`] if the file cannot be read, and the errors of
    /// [`new`](Self::new).
    pub fn from_file(path: &Path) -> Result<Secret, AuthError> {
        let bytes = std::fs::read(path).map_err(|source| AuthError::SecretFile {
            path: path.to_path_buf(),
            source,
        })?;
        let mut end = bytes.len();
        while end > 0 && matches!(bytes[end - 1], b'\n' | b'\r') {
            end -= 1;
        }
        Secret::new(&bytes[..end])
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Always false (a secret has at least [`MIN_SECRET_LEN`] bytes).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// HMAC-SHA256 with the secret as key over the concatenation of `parts`.
    pub fn mac(&self, parts: &[&[u8]]) -> [u8; MAC_LEN] {
        hmac_sha256(&self.0, parts)
    }

    /// The key of the opening (unkeyed) UDP HELLO.
    pub fn udp_hello_key(&self) -> MacKey {
        MacKey::new(&self.mac(&[LABEL_UDP_HELLO]))
    }

    /// The per-session UDP keys `(K_up, K_down)` for session `session` and nonces `nc`
    /// (tcpcopy's) and `ni` (intercept's).
    pub fn udp_session_keys(
        &self,
        session: u64,
        nc: &[u8; NONCE_LEN],
        ni: &[u8; NONCE_LEN],
    ) -> (MacKey, MacKey) {
        let s = session.to_be_bytes();
        let up = self.mac(&[LABEL_UDP_UP, &s, nc, ni]);
        let down = self.mac(&[LABEL_UDP_DOWN, &s, nc, ni]);
        (MacKey::new(&up), MacKey::new(&down))
    }
}

/// HMAC-SHA256 of the concatenation of `parts` under `key`.
pub fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; MAC_LEN] {
    // HMAC takes keys of any length.
    let mut mac = HmacSha256::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

/// A keyed HMAC-SHA256 with the key schedule done once (cloned per datagram).
#[derive(Clone)]
pub struct MacKey(HmacSha256);

impl fmt::Debug for MacKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MacKey(..)")
    }
}

impl MacKey {
    /// A key from raw bytes.
    pub fn new(key: &[u8]) -> MacKey {
        MacKey(HmacSha256::new_from_slice(key).unwrap_or_else(|_| unreachable!()))
    }

    /// The tag of `data` truncated to [`UDP_MAC_LEN`] bytes.
    pub fn tag16(&self, data: &[u8]) -> [u8; UDP_MAC_LEN] {
        let mut mac = self.0.clone();
        mac.update(data);
        let full: [u8; MAC_LEN] = mac.finalize().into_bytes().into();
        let mut out = [0u8; UDP_MAC_LEN];
        out.copy_from_slice(&full[..UDP_MAC_LEN]);
        out
    }

    /// Whether `tag` is the truncated tag of `data` (constant time).
    pub fn verify16(&self, data: &[u8], tag: &[u8]) -> bool {
        let mut mac = self.0.clone();
        mac.update(data);
        tag.len() == UDP_MAC_LEN && mac.verify_truncated_left(tag).is_ok()
    }
}

/// Fresh random bytes for a nonce or a session id.
///
/// # Errors
/// [`AuthError::Random`] if the OS generator fails (on Linux it does not, once booted).
pub fn random_nonce() -> Result<[u8; NONCE_LEN], AuthError> {
    let mut n = [0u8; NONCE_LEN];
    getrandom::fill(&mut n).map_err(|e| AuthError::Random(e.to_string()))?;
    Ok(n)
}

/// A random u64 (session ids).
///
/// # Errors
/// As [`random_nonce`].
pub fn random_u64() -> Result<u64, AuthError> {
    getrandom::u64().map_err(|e| AuthError::Random(e.to_string()))
}

/// Constant-time comparison of two byte strings of equal length.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The CHALLENGE bytes for nonce `nc`.
pub fn encode_challenge(nc: &[u8; NONCE_LEN]) -> [u8; CHALLENGE_LEN] {
    let mut b = [0u8; CHALLENGE_LEN];
    b[..4].copy_from_slice(&CHALLENGE_MAGIC);
    b[4] = AUTH_VERSION;
    b[8..].copy_from_slice(nc);
    b
}

/// The RESPONSE bytes for nonces `nc`, `ni` under `secret`.
pub fn encode_response(
    secret: &Secret,
    nc: &[u8; NONCE_LEN],
    ni: &[u8; NONCE_LEN],
) -> [u8; RESPONSE_LEN] {
    let mut b = [0u8; RESPONSE_LEN];
    b[..4].copy_from_slice(&RESPONSE_MAGIC);
    b[4] = AUTH_VERSION;
    b[8..24].copy_from_slice(ni);
    b[24..].copy_from_slice(&secret.mac(&[LABEL_TCP_INTERCEPT, nc, ni]));
    b
}

/// The PROOF bytes for nonces `nc`, `ni` under `secret`.
pub fn encode_proof(
    secret: &Secret,
    nc: &[u8; NONCE_LEN],
    ni: &[u8; NONCE_LEN],
) -> [u8; PROOF_LEN] {
    secret.mac(&[LABEL_TCP_TCPCOPY, nc, ni])
}

fn check_header(b: &[u8], magic: [u8; 4]) -> Result<(), AuthError> {
    let got = [b[0], b[1], b[2], b[3]];
    if got != magic {
        return Err(AuthError::BadMagic {
            expected: magic,
            got,
        });
    }
    if b[4] != AUTH_VERSION {
        return Err(AuthError::BadVersion(b[4]));
    }
    Ok(())
}

/// Collects exactly `N` bytes from a stream fed in arbitrary chunks.
#[derive(Debug, Clone)]
struct Fill<const N: usize> {
    buf: [u8; N],
    len: usize,
}

impl<const N: usize> Fill<N> {
    fn new() -> Self {
        Fill {
            buf: [0; N],
            len: 0,
        }
    }

    /// Takes what it still needs from `bytes`; returns the bytes taken and whether full.
    fn take(&mut self, bytes: &[u8]) -> (usize, bool) {
        let n = (N - self.len).min(bytes.len());
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
        (n, self.len == N)
    }
}

/// tcpcopy's side of the TCP handshake (sans-IO).
#[derive(Debug, Clone)]
pub struct ClientHandshake {
    secret: Secret,
    nc: [u8; NONCE_LEN],
    response: Fill<RESPONSE_LEN>,
    done: bool,
}

/// What [`ClientHandshake::feed`] got to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientStep {
    /// The RESPONSE is not complete yet; all bytes were consumed.
    NeedMore,
    /// intercept proved the secret: send `proof` (then the version hello). `consumed` bytes of
    /// the input belonged to the handshake; the rest is records.
    Done {
        /// The PROOF to send.
        proof: [u8; PROOF_LEN],
        /// Input bytes used.
        consumed: usize,
    },
}

impl ClientHandshake {
    /// A handshake with a fresh nonce, and the CHALLENGE to send first.
    ///
    /// # Errors
    /// [`AuthError::Random`].
    pub fn start(secret: &Secret) -> Result<(ClientHandshake, [u8; CHALLENGE_LEN]), AuthError> {
        Ok(ClientHandshake::with_nonce(secret, random_nonce()?))
    }

    /// A handshake with a given nonce (tests).
    pub fn with_nonce(
        secret: &Secret,
        nc: [u8; NONCE_LEN],
    ) -> (ClientHandshake, [u8; CHALLENGE_LEN]) {
        (
            ClientHandshake {
                secret: secret.clone(),
                nc,
                response: Fill::new(),
                done: false,
            },
            encode_challenge(&nc),
        )
    }

    /// Consumes intercept's bytes.
    ///
    /// # Errors
    /// [`AuthError::BadMagic`] / [`AuthError::BadVersion`] when intercept does not speak this
    /// handshake, [`AuthError::BadProof`] when its MAC is wrong. The connection must be closed.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<ClientStep, AuthError> {
        if self.done {
            return Ok(ClientStep::Done {
                proof: [0; PROOF_LEN],
                consumed: 0,
            });
        }
        let (consumed, full) = self.response.take(bytes);
        if self.response.len >= 5 {
            check_header(&self.response.buf, RESPONSE_MAGIC)?;
        } else if self.response.len >= 4 {
            let b = &self.response.buf;
            if b[..4] != RESPONSE_MAGIC {
                return Err(AuthError::BadMagic {
                    expected: RESPONSE_MAGIC,
                    got: [b[0], b[1], b[2], b[3]],
                });
            }
        }
        if !full {
            return Ok(ClientStep::NeedMore);
        }
        let r = &self.response.buf;
        let mut ni = [0u8; NONCE_LEN];
        ni.copy_from_slice(&r[8..24]);
        let expected = self.secret.mac(&[LABEL_TCP_INTERCEPT, &self.nc, &ni]);
        if !ct_eq(&expected, &r[24..56]) {
            return Err(AuthError::BadProof);
        }
        self.done = true;
        Ok(ClientStep::Done {
            proof: encode_proof(&self.secret, &self.nc, &ni),
            consumed,
        })
    }
}

/// intercept's side of the TCP handshake (sans-IO).
#[derive(Debug, Clone)]
pub struct ServerHandshake {
    secret: Secret,
    ni: [u8; NONCE_LEN],
    nc: [u8; NONCE_LEN],
    challenge: Fill<CHALLENGE_LEN>,
    proof: Fill<PROOF_LEN>,
    responded: bool,
}

/// What [`ServerHandshake::feed`] got to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerStep {
    /// More bytes are needed; all were consumed. `respond` is the RESPONSE to send, once,
    /// when the CHALLENGE just completed.
    NeedMore {
        /// The RESPONSE to send now, if the CHALLENGE completed in this call.
        respond: Option<[u8; RESPONSE_LEN]>,
    },
    /// tcpcopy proved the secret; `consumed` input bytes belonged to the handshake, the rest
    /// starts with the version hello. `respond` as in `NeedMore` (CHALLENGE and PROOF can come
    /// in one read only from a peer that did not wait for the RESPONSE, but it is handled).
    Done {
        /// The RESPONSE to send now, if not sent yet.
        respond: Option<[u8; RESPONSE_LEN]>,
        /// Input bytes used.
        consumed: usize,
    },
}

impl ServerHandshake {
    /// A handshake with a fresh nonce.
    ///
    /// # Errors
    /// [`AuthError::Random`].
    pub fn start(secret: &Secret) -> Result<ServerHandshake, AuthError> {
        Ok(ServerHandshake::with_nonce(secret, random_nonce()?))
    }

    /// A handshake with a given nonce (tests).
    pub fn with_nonce(secret: &Secret, ni: [u8; NONCE_LEN]) -> ServerHandshake {
        ServerHandshake {
            secret: secret.clone(),
            ni,
            nc: [0; NONCE_LEN],
            challenge: Fill::new(),
            proof: Fill::new(),
            responded: false,
        }
    }

    /// Consumes tcpcopy's bytes.
    ///
    /// # Errors
    /// [`AuthError::BadMagic`] (a peer that does not authenticate, e.g. a C tcpcopy whose
    /// first bytes are the version hello), [`AuthError::BadVersion`], [`AuthError::BadProof`]
    /// (a wrong secret). The connection must be refused.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<ServerStep, AuthError> {
        let mut used = 0;
        let mut respond = None;
        if !self.responded {
            let (n, full) = self.challenge.take(bytes);
            used += n;
            let c = &self.challenge.buf;
            if self.challenge.len >= 4 && c[..4] != CHALLENGE_MAGIC {
                return Err(AuthError::BadMagic {
                    expected: CHALLENGE_MAGIC,
                    got: [c[0], c[1], c[2], c[3]],
                });
            }
            if !full {
                return Ok(ServerStep::NeedMore { respond: None });
            }
            check_header(c, CHALLENGE_MAGIC)?;
            self.nc.copy_from_slice(&c[8..24]);
            self.responded = true;
            respond = Some(encode_response(&self.secret, &self.nc, &self.ni));
        }
        let (n, full) = self.proof.take(&bytes[used..]);
        used += n;
        if !full {
            return Ok(ServerStep::NeedMore { respond });
        }
        let expected = encode_proof(&self.secret, &self.nc, &self.ni);
        if !ct_eq(&expected, &self.proof.buf) {
            return Err(AuthError::BadProof);
        }
        Ok(ServerStep::Done {
            respond,
            consumed: used,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret() -> Secret {
        Secret::new(b"0123456789abcdef-lab-secret").unwrap()
    }

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn hmac_matches_rfc4231_case_2() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        let mac = hmac_sha256(b"Jefe", &[b"what do ya want ", b"for nothing?"]);
        assert_eq!(
            mac.to_vec(),
            hex("5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")
        );
        let key = MacKey::new(b"Jefe");
        let tag = key.tag16(b"what do ya want for nothing?");
        assert_eq!(tag.to_vec(), hex("5bdcc146bf60754e6a042426089575c7"));
        assert!(key.verify16(b"what do ya want for nothing?", &tag));
        assert!(!key.verify16(b"what do ya want for nothing!", &tag));
        assert!(!key.verify16(b"what do ya want for nothing?", &tag[..15]));
    }

    #[test]
    fn secrets_are_checked_and_trimmed() {
        assert!(matches!(
            Secret::new(b"short"),
            Err(AuthError::SecretTooShort(5))
        ));
        let dir = std::env::temp_dir().join(format!("auth-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("secret");
        std::fs::write(&f, b"0123456789abcdef-lab-secret\r\n").unwrap();
        assert_eq!(Secret::from_file(&f).unwrap(), secret());
        assert_eq!(format!("{:?}", secret()), "Secret(27 bytes)");
        let err = Secret::from_file(&dir.join("missing")).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn tcp_handshake_golden_bytes() {
        let s = secret();
        let nc = [0x11; 16];
        let ni = [0x22; 16];
        let (mut client, challenge) = ClientHandshake::with_nonce(&s, nc);
        let mut expected = b"TCRA".to_vec();
        expected.extend_from_slice(&[1, 0, 0, 0]);
        expected.extend_from_slice(&[0x11; 16]);
        assert_eq!(challenge.to_vec(), expected);

        let mut server = ServerHandshake::with_nonce(&s, ni);
        let step = server.feed(&challenge).unwrap();
        let ServerStep::NeedMore {
            respond: Some(response),
        } = step
        else {
            panic!("{step:?}");
        };
        let mac = hmac_sha256(
            b"0123456789abcdef-lab-secret",
            &[b"tcpcopy-rs tcp auth v1 intercept", &nc, &ni],
        );
        let mut expected = b"TCRB".to_vec();
        expected.extend_from_slice(&[1, 0, 0, 0]);
        expected.extend_from_slice(&[0x22; 16]);
        expected.extend_from_slice(&mac);
        assert_eq!(response.to_vec(), expected);

        // The response arrives one byte at a time, followed by a record batch.
        let mut stream = response.to_vec();
        stream.extend_from_slice(&[0, 1]);
        let mut proof = None;
        for (i, b) in stream.iter().enumerate() {
            match client.feed(std::slice::from_ref(b)).unwrap() {
                ClientStep::NeedMore => assert!(i < RESPONSE_LEN - 1),
                ClientStep::Done { proof: p, consumed } => {
                    assert_eq!(i, RESPONSE_LEN - 1);
                    assert_eq!(consumed, 1);
                    proof = Some(p);
                    break;
                }
            }
        }
        let proof = proof.unwrap();
        let expected = hmac_sha256(
            b"0123456789abcdef-lab-secret",
            &[b"tcpcopy-rs tcp auth v1 tcpcopy", &nc, &ni],
        );
        assert_eq!(proof, expected);

        // Proof and the version hello in one read.
        let mut bytes = proof.to_vec();
        bytes.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 6, 0, 0, 0, 0, 0, 0]);
        assert_eq!(
            server.feed(&bytes).unwrap(),
            ServerStep::Done {
                respond: None,
                consumed: 32
            }
        );
    }

    #[test]
    fn wrong_secret_is_refused_both_ways() {
        let good = secret();
        let bad = Secret::new(b"another secret of 24 b.").unwrap();
        // tcpcopy with the wrong secret: intercept's proof fails at tcpcopy.
        let (mut client, challenge) = ClientHandshake::with_nonce(&bad, [1; 16]);
        let mut server = ServerHandshake::with_nonce(&good, [2; 16]);
        let ServerStep::NeedMore {
            respond: Some(response),
        } = server.feed(&challenge).unwrap()
        else {
            panic!()
        };
        assert!(matches!(client.feed(&response), Err(AuthError::BadProof)));
        // A peer that skips the check and sends a made-up proof: refused by intercept.
        assert!(matches!(server.feed(&[0u8; 32]), Err(AuthError::BadProof)));
        // A proof computed with the wrong secret.
        let mut server = ServerHandshake::with_nonce(&good, [2; 16]);
        server.feed(&challenge).unwrap();
        let forged = encode_proof(&bad, &[1; 16], &[2; 16]);
        assert!(matches!(server.feed(&forged), Err(AuthError::BadProof)));
    }

    #[test]
    fn peers_without_auth_are_refused() {
        // A C tcpcopy's version hello where the CHALLENGE should be.
        let mut server = ServerHandshake::with_nonce(&secret(), [2; 16]);
        let hello = [0u8, 0, 0, 0, 0, 0, 0, 6, 0, 0, 0, 0, 0, 0];
        assert!(matches!(
            server.feed(&hello),
            Err(AuthError::BadMagic {
                got: [0, 0, 0, 0],
                ..
            })
        ));
        // A C intercept's record batch where the RESPONSE should be.
        let (mut client, _) = ClientHandshake::with_nonce(&secret(), [1; 16]);
        assert!(matches!(
            client.feed(&[0, 1, 0x45, 0]),
            Err(AuthError::BadMagic { .. })
        ));
        let mut server = ServerHandshake::with_nonce(&secret(), [2; 16]);
        let mut c = encode_challenge(&[1; 16]);
        c[4] = 9;
        assert!(matches!(server.feed(&c), Err(AuthError::BadVersion(9))));
    }

    #[test]
    fn udp_keys_are_distinct_per_direction_and_session() {
        let s = secret();
        let (up, down) = s.udp_session_keys(7, &[1; 16], &[2; 16]);
        let (up2, _) = s.udp_session_keys(7, &[1; 16], &[3; 16]);
        let data = b"datagram";
        assert_ne!(up.tag16(data), down.tag16(data));
        assert_ne!(up.tag16(data), up2.tag16(data));
        let expected = hmac_sha256(
            &hmac_sha256(
                b"0123456789abcdef-lab-secret",
                &[
                    b"tcpcopy-rs udp v1 up",
                    &7u64.to_be_bytes(),
                    &[1; 16],
                    &[2; 16],
                ],
            ),
            &[data],
        );
        assert_eq!(up.tag16(data), expected[..16]);
        let hello = hmac_sha256(
            &hmac_sha256(
                b"0123456789abcdef-lab-secret",
                &[b"tcpcopy-rs udp v1 hello"],
            ),
            &[data],
        );
        assert_eq!(s.udp_hello_key().tag16(data), hello[..16]);
    }
}
