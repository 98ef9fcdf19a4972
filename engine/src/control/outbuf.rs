//! A bounded output buffer for one non-blocking socket: bytes are appended only if they fit
//! under the limit, and written out until the socket says `WouldBlock`.

use std::io::{self, Write};

/// Pending output of one connection, bounded by `limit` bytes.
#[derive(Debug)]
pub(crate) struct OutBuf {
    buf: Vec<u8>,
    pos: usize,
    limit: usize,
}

impl OutBuf {
    /// An empty buffer that holds at most `limit` pending bytes.
    pub(crate) fn new(limit: usize) -> OutBuf {
        OutBuf {
            buf: Vec::new(),
            pos: 0,
            limit,
        }
    }

    /// Bytes waiting to be written.
    pub(crate) fn pending(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Whether `n` more bytes fit under the limit.
    pub(crate) fn fits(&self, n: usize) -> bool {
        self.pending() + n <= self.limit
    }

    /// Appends `bytes` if they fit; `false` (and nothing appended) otherwise.
    pub(crate) fn push(&mut self, bytes: &[u8]) -> bool {
        if !self.fits(bytes.len()) {
            return false;
        }
        if self.pos > 0 && self.pos >= self.buf.len() / 2 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(bytes);
        true
    }

    /// Drops everything pending.
    pub(crate) fn clear(&mut self) {
        self.buf.clear();
        self.pos = 0;
    }

    /// Writes pending bytes until none are left or the writer would block; returns the bytes
    /// written.
    ///
    /// # Errors
    /// Any write error other than `WouldBlock`/`Interrupted`; a zero-length write is reported
    /// as `WriteZero`.
    pub(crate) fn write_to(&mut self, w: &mut impl Write) -> io::Result<usize> {
        let mut written = 0;
        while self.pos < self.buf.len() {
            match w.write(&self.buf[self.pos..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.pos += n;
                    written += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.pos == self.buf.len() {
            self.clear();
        }
        Ok(written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that takes at most `room` bytes, then would block.
    struct Slow {
        got: Vec<u8>,
        room: usize,
    }

    impl Write for Slow {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            if self.room == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = b.len().min(self.room).min(3);
            self.room -= n;
            self.got.extend_from_slice(&b[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn bounded_and_resumable() {
        let mut out = OutBuf::new(10);
        assert!(out.push(b"hello"));
        assert!(out.push(b"world"));
        assert!(!out.push(b"!"));
        assert_eq!(out.pending(), 10);
        let mut w = Slow {
            got: Vec::new(),
            room: 7,
        };
        assert_eq!(out.write_to(&mut w).unwrap(), 7);
        assert_eq!(out.pending(), 3);
        assert!(out.push(b"1234567"));
        assert!(!out.push(b"x"));
        w.room = 100;
        assert_eq!(out.write_to(&mut w).unwrap(), 10);
        assert_eq!(w.got, b"helloworld1234567");
        assert_eq!(out.pending(), 0);
    }
}
