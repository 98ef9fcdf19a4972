//! A capture filter applied in user space, for ports whose frames do not pass a kernel BPF
//! filter (DPDK devices): the same pcap expression, compiled by libpcap and run by its
//! interpreter on each frame.

use super::afpacket::PortError;

/// A compiled pcap filter expression for Ethernet frames. Not `Send`: build it on the thread
/// that uses it.
pub struct SoftFilter {
    program: pcap::BpfProgram,
    expression: String,
}

impl std::fmt::Debug for SoftFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoftFilter")
            .field("expression", &self.expression)
            .finish()
    }
}

impl SoftFilter {
    /// Compiles `expression` for Ethernet frames.
    ///
    /// # Errors
    /// [`PortError::BadFilter`] with libpcap's message.
    pub fn compile(expression: &str) -> Result<SoftFilter, PortError> {
        let bad = |message: String| PortError::BadFilter {
            filter: expression.to_owned(),
            message,
        };
        let capture =
            pcap::Capture::dead(pcap::Linktype::ETHERNET).map_err(|e| bad(e.to_string()))?;
        let program = capture
            .compile(expression, true)
            .map_err(|e| bad(e.to_string()))?;
        Ok(SoftFilter {
            program,
            expression: expression.to_owned(),
        })
    }

    /// True when `frame` (from its Ethernet header on) passes the filter.
    #[inline]
    pub fn matches(&self, frame: &[u8]) -> bool {
        self.program.filter(frame)
    }

    /// The expression it was compiled from.
    pub fn expression(&self) -> &str {
        &self.expression
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(proto: u8, sport: u16) -> Vec<u8> {
        let mut f = vec![0u8; 14 + 20 + 20];
        f[12] = 0x08;
        f[14] = 0x45;
        f[16..18].copy_from_slice(&40u16.to_be_bytes());
        f[23] = proto;
        f[26..30].copy_from_slice(&[10, 77, 0, 30]);
        f[34..36].copy_from_slice(&sport.to_be_bytes());
        f[46] = 0x50;
        f
    }

    #[test]
    fn filters_like_the_kernel_would() {
        let f = SoftFilter::compile("tcp and src host 10.77.0.30 and src port 8080").unwrap();
        assert!(f.matches(&frame(6, 8080)));
        assert!(!f.matches(&frame(6, 8081)));
        assert!(!f.matches(&frame(17, 8080)));
        assert!(!f.matches(&[0u8; 10]));
        let e = SoftFilter::compile("tcp and bogus")
            .unwrap_err()
            .to_string();
        assert!(e.contains("tcp and bogus"), "{e}");
    }
}
