//! Address transforms of tcpcopy: the `-x` transfer list (which captured traffic goes to which
//! target) and the `-c` client address list.

use std::fmt;
use std::net::Ipv4Addr;

/// One `-x` entry: traffic to `[online_ip:]online_port` is replayed to `target_ip:target_port`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transfer {
    /// The online server's address; `None` matches any local address.
    pub online_ip: Option<Ipv4Addr>,
    /// The online server's port.
    pub online_port: u16,
    /// The target server's address.
    pub target_ip: Ipv4Addr,
    /// The target server's port.
    pub target_port: u16,
}

impl fmt::Display for Transfer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.online_ip {
            Some(ip) => write!(f, "{ip}:{}", self.online_port)?,
            None => write!(f, "{}", self.online_port)?,
        }
        write!(f, "-{}:{}", self.target_ip, self.target_port)
    }
}

/// A flag value that could not be used, with what was wrong and the accepted form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad {flag} value '{value}': {reason}; the form is {form}")]
pub struct FlagError {
    /// The flag (`-x`, `-c`, ...).
    pub flag: &'static str,
    /// The offending text.
    pub value: String,
    /// What is wrong with it.
    pub reason: String,
    /// The accepted form, with an example.
    pub form: &'static str,
}

const X_FORM: &str = "[onlineIP:]onlinePort-targetIP:targetPort[,...], e.g. 80-10.77.0.30:8080 or 10.0.0.5:80-10.0.0.9:8080";
const C_FORM: &str =
    "a comma list of IPv4 addresses or a.b.c.x ranges (x = 1..254), e.g. 10.9.9.x,10.9.8.7";

fn parse_port(text: &str, what: &str) -> Result<u16, String> {
    match text.parse::<u32>() {
        Ok(0) => Err(format!("{what} port 0 is not a port")),
        Ok(p) if p <= 65535 => Ok(p as u16),
        Ok(p) => Err(format!("{what} port {p} is out of range 1..65535")),
        Err(_) => Err(format!("{what} port '{text}' is not a number")),
    }
}

fn parse_ip(text: &str, what: &str) -> Result<Ipv4Addr, String> {
    text.parse::<Ipv4Addr>()
        .map_err(|_| format!("{what} address '{text}' is not an IPv4 address"))
}

/// Parses a `-x` transfer list.
///
/// # Errors
/// A [`FlagError`] naming the entry, what is wrong and the form.
pub fn parse_transfers(text: &str) -> Result<Vec<Transfer>, FlagError> {
    let err = |value: &str, reason: String| FlagError {
        flag: "-x",
        value: value.to_string(),
        reason,
        form: X_FORM,
    };
    if text.trim().is_empty() {
        return Err(err(text, "it is empty".into()));
    }
    let mut transfers = Vec::new();
    for entry in text.split(',') {
        let entry = entry.trim();
        let Some((online, target)) = entry.split_once('-') else {
            return Err(err(
                entry,
                "the entry has no '-' between the online and target sides".into(),
            ));
        };
        // The C --pcap-send build's form names a MAC on each side (`80@MAC-IP:port@MAC`): the
        // MACs are checked and set aside (the kernel finds the next hop; see the README).
        let online = strip_mac(online, "online").map_err(|r| err(entry, r))?;
        let target = strip_mac(target, "target").map_err(|r| err(entry, r))?;
        let (online_ip, online_port) = match online.rsplit_once(':') {
            Some((ip, port)) => (
                Some(parse_ip(ip, "online").map_err(|r| err(entry, r))?),
                parse_port(port, "online").map_err(|r| err(entry, r))?,
            ),
            None => (
                None,
                parse_port(online, "online").map_err(|r| err(entry, r))?,
            ),
        };
        let Some((ip, port)) = target.rsplit_once(':') else {
            return Err(err(
                entry,
                format!("the target side '{target}' needs IP:port"),
            ));
        };
        let target_ip = parse_ip(ip, "target").map_err(|r| err(entry, r))?;
        let target_port = parse_port(port, "target").map_err(|r| err(entry, r))?;
        if target_ip.is_unspecified() || target_ip.is_broadcast() || target_ip.is_multicast() {
            return Err(err(
                entry,
                format!("target address {target_ip} cannot be a target"),
            ));
        }
        transfers.push(Transfer {
            online_ip,
            online_port,
            target_ip,
            target_port,
        });
    }
    Ok(transfers)
}

/// `side` without its `@MAC` suffix, the MAC checked (six hex bytes separated by ':').
fn strip_mac<'a>(side: &'a str, which: &str) -> Result<&'a str, String> {
    let Some((address, mac)) = side.split_once('@') else {
        return Ok(side);
    };
    let bytes: Vec<&str> = mac.split(':').collect();
    let valid = bytes.len() == 6
        && bytes
            .iter()
            .all(|b| b.len() == 2 && b.bytes().all(|c| c.is_ascii_hexdigit()));
    if !valid {
        return Err(format!(
            "the {which} MAC '{mac}' is not a MAC address like 00:1a:2b:3c:4d:5e"
        ));
    }
    Ok(address)
}

/// Finds the first transfer that matches a captured destination (spec §4.1).
#[inline]
pub fn match_transfer(transfers: &[Transfer], dst: Ipv4Addr, dst_port: u16) -> Option<&Transfer> {
    transfers
        .iter()
        .find(|t| t.online_port == dst_port && t.online_ip.is_none_or(|ip| ip == dst))
}

/// The pcap filter that selects what the transfers replay (spec §4.1), e.g.
/// `tcp and ((dst host 10.0.0.5 and dst port 80) or (dst port 81))`.
pub fn capture_filter(transfers: &[Transfer]) -> String {
    let parts: Vec<String> = transfers
        .iter()
        .map(|t| match t.online_ip {
            Some(ip) => format!("(dst host {ip} and dst port {})", t.online_port),
            None => format!("(dst port {})", t.online_port),
        })
        .collect();
    format!("tcp and ({})", parts.join(" or "))
}

/// The `-c` list: replayed client addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientAddrs {
    addrs: Vec<Ipv4Addr>,
}

impl ClientAddrs {
    /// Parses a `-c` list. Addresses equal to a target address are skipped (as the C tool does:
    /// the target would answer itself).
    ///
    /// # Errors
    /// A [`FlagError`] naming the item.
    pub fn parse(text: &str, transfers: &[Transfer]) -> Result<ClientAddrs, FlagError> {
        let err = |value: &str, reason: String| FlagError {
            flag: "-c",
            value: value.to_string(),
            reason,
            form: C_FORM,
        };
        let mut addrs = Vec::new();
        for item in text.split(',') {
            let item = item.trim();
            if item.is_empty() {
                return Err(err(text, "it has an empty item".into()));
            }
            if let Some(prefix) = item.strip_suffix(".x") {
                let base = parse_ip(&format!("{prefix}.0"), "client").map_err(|r| err(item, r))?;
                let o = base.octets();
                addrs.extend((1..=254).map(|i| Ipv4Addr::new(o[0], o[1], o[2], i)));
            } else {
                addrs.push(parse_ip(item, "client").map_err(|r| err(item, r))?);
            }
        }
        addrs.retain(|a| !transfers.iter().any(|t| t.target_ip == *a));
        if addrs.is_empty() {
            return Err(err(
                text,
                "no usable address remains (all equal a target address)".into(),
            ));
        }
        if addrs.len() > 4096 {
            return Err(err(
                text,
                format!("{} addresses is more than the 4096 allowed", addrs.len()),
            ));
        }
        Ok(ClientAddrs { addrs })
    }

    /// The replay address for a captured client address: a fixed choice per client (a hash,
    /// so it needs no memory, is the same in every worker and survives restarts).
    #[inline]
    pub fn map(&self, client: Ipv4Addr) -> Ipv4Addr {
        self.map_copy(client, 0)
    }

    /// The replay address of copy `copy` (`-n`; 0 = the original) of a client: the next
    /// addresses of the list after the original's, so copies use distinct addresses while
    /// the list is at least as long as the number of copies.
    #[inline]
    pub fn map_copy(&self, client: Ipv4Addr, copy: u16) -> Ipv4Addr {
        let h = u32::from(client).wrapping_mul(0x9E37_79B1);
        let h = (h ^ (h >> 15)).wrapping_mul(0x85EB_CA77);
        self.addrs[(h as usize + usize::from(copy)) % self.addrs.len()]
    }

    /// All addresses.
    pub fn addrs(&self) -> &[Ipv4Addr] {
        &self.addrs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transfers_with_the_c_pcap_send_macs() {
        // The C tool's usage line for --pcap-send builds.
        let t = parse_transfers(
            "10.0.0.5:80@00:1a:2b:3c:4d:5e-10.0.0.9:8080@00:aa:bb:cc:dd:ee,81@00:1a:2b:3c:4d:5e-10.0.0.9:8081",
        )
        .unwrap();
        assert_eq!(t[0].to_string(), "10.0.0.5:80-10.0.0.9:8080");
        assert_eq!(t[1].online_port, 81);
        assert_eq!(t[1].target_port, 8081);
        let e = parse_transfers("80@00:1a:2b-10.0.0.9:8080")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("the online MAC '00:1a:2b' is not a MAC address"),
            "{e}"
        );
        let e = parse_transfers("80-10.0.0.9:8080@zz:aa:bb:cc:dd:ee")
            .unwrap_err()
            .to_string();
        assert!(e.contains("the target MAC 'zz:aa:bb:cc:dd:ee'"), "{e}");
    }

    #[test]
    fn transfers_all_forms() {
        let t = parse_transfers("80-10.0.0.9:8080,10.0.0.5:81-10.0.0.9:8081").unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].online_ip, None);
        assert_eq!(t[0].online_port, 80);
        assert_eq!(t[0].target_ip, Ipv4Addr::new(10, 0, 0, 9));
        assert_eq!(t[1].online_ip, Some(Ipv4Addr::new(10, 0, 0, 5)));
        assert_eq!(t[1].to_string(), "10.0.0.5:81-10.0.0.9:8081");
        assert_eq!(
            match_transfer(&t, Ipv4Addr::new(1, 2, 3, 4), 80),
            Some(&t[0])
        );
        assert_eq!(match_transfer(&t, Ipv4Addr::new(1, 2, 3, 4), 81), None);
        assert_eq!(
            match_transfer(&t, Ipv4Addr::new(10, 0, 0, 5), 81),
            Some(&t[1])
        );
        assert_eq!(
            capture_filter(&t),
            "tcp and ((dst port 80) or (dst host 10.0.0.5 and dst port 81))"
        );
    }

    #[test]
    fn transfer_errors_name_the_problem_and_the_form() {
        let e = parse_transfers("80-10.0.0:99999").unwrap_err().to_string();
        assert!(e.contains("'80-10.0.0:99999'"), "{e}");
        assert!(
            e.contains("target address '10.0.0' is not an IPv4 address"),
            "{e}"
        );
        assert!(
            e.contains("[onlineIP:]onlinePort-targetIP:targetPort"),
            "{e}"
        );
        let e = parse_transfers("80-10.0.0.1:99999")
            .unwrap_err()
            .to_string();
        assert!(e.contains("target port 99999 is out of range"), "{e}");
        let e = parse_transfers("80").unwrap_err().to_string();
        assert!(e.contains("no '-'"), "{e}");
        let e = parse_transfers("http-10.0.0.1:80").unwrap_err().to_string();
        assert!(e.contains("online port 'http' is not a number"), "{e}");
        assert!(parse_transfers("80-10.0.0.1").is_err());
        assert!(parse_transfers("").is_err());
    }

    #[test]
    fn client_ranges() {
        let t = parse_transfers("80-10.9.9.7:8080").unwrap();
        let c = ClientAddrs::parse("10.9.9.x,192.168.1.1", &t).unwrap();
        assert_eq!(c.addrs().len(), 254); // 253 from the range (10.9.9.7 is the target) + 1
        let a = c.map(Ipv4Addr::new(10, 77, 0, 10));
        assert_eq!(a, c.map(Ipv4Addr::new(10, 77, 0, 10)));
        assert!(c.addrs().contains(&a));
        let mut seen = std::collections::HashSet::new();
        for i in 0..1000u32 {
            seen.insert(c.map(Ipv4Addr::from(0x0a00_0000 + i)));
        }
        assert!(seen.len() > 200, "{}", seen.len());
        let e = ClientAddrs::parse("10.9.9.*", &t).unwrap_err().to_string();
        assert!(e.contains("-c") && e.contains("10.9.9.*"), "{e}");
    }
}
