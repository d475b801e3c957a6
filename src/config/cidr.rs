//! IP networks for `trusted_proxies`: `"10.0.0.0/8"`, `"::1/128"`, or a bare IP.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// An IPv4 or IPv6 network. The address is stored with its host bits cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

const EXPECTED: &str = r#"expected IP or IP/PREFIX (e.g. "10.0.0.0/8", "127.0.0.1", "::1/128")"#;

impl Cidr {
    /// Builds a network, clearing host bits; `None` if the prefix is too long.
    pub fn new(addr: IpAddr, prefix: u8) -> Option<Cidr> {
        let addr = match addr {
            IpAddr::V4(a) if prefix <= 32 => IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask32(prefix))),
            IpAddr::V6(a) if prefix <= 128 => IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask128(prefix))),
            _ => return None,
        };
        Some(Cidr { addr, prefix })
    }

    /// The network address (host bits cleared).
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix_len(&self) -> u8 {
        self.prefix
    }

    /// Whether `ip` is inside this network. IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`)
    /// match IPv4 networks, and IPv4 addresses match IPv6 networks holding their mapped form.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => u32::from(ip) & mask32(self.prefix) == u32::from(net),
            (IpAddr::V4(net), IpAddr::V6(ip)) => match ip.to_ipv4_mapped() {
                Some(ip) => u32::from(ip) & mask32(self.prefix) == u32::from(net),
                None => false,
            },
            (IpAddr::V6(net), IpAddr::V6(ip)) => u128::from(ip) & mask128(self.prefix) == u128::from(net),
            (IpAddr::V6(net), IpAddr::V4(ip)) => u128::from(ip.to_ipv6_mapped()) & mask128(self.prefix) == u128::from(net),
        }
    }
}

fn mask32(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix.min(32))).unwrap_or(0)
}

fn mask128(prefix: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(prefix.min(128))).unwrap_or(0)
}

impl FromStr for Cidr {
    type Err = String;

    /// The error message is complete (it quotes the input and says what is expected).
    fn from_str(s: &str) -> Result<Cidr, String> {
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, prefix)) => (ip, Some(prefix)),
            None => (s, None),
        };
        let addr: IpAddr = ip.parse().map_err(|_| format!("invalid CIDR {s:?}: {ip:?} is not an IP address; {EXPECTED}"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => match p.parse::<u8>() {
                Ok(n) if n <= max => n,
                _ => {
                    let family = if addr.is_ipv4() { "IPv4" } else { "IPv6" };
                    return Err(format!("invalid CIDR {s:?}: prefix length must be at most {max} for {family}"));
                }
            },
            Some(_) => return Err(format!("invalid CIDR {s:?}: bad prefix length; {EXPECTED}")),
        };
        Cidr::new(addr, prefix).ok_or_else(|| format!("invalid CIDR {s:?}: {EXPECTED}"))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn cidr(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_and_displays() {
        assert_eq!(cidr("10.0.0.0/8").to_string(), "10.0.0.0/8");
        assert_eq!(cidr("127.0.0.1").to_string(), "127.0.0.1/32");
        assert_eq!(cidr("::1").to_string(), "::1/128");
        assert_eq!(cidr("::1/128").to_string(), "::1/128");
        assert_eq!(cidr("fd00::/8").to_string(), "fd00::/8");
        assert_eq!(cidr("0.0.0.0/0").to_string(), "0.0.0.0/0");
        assert_eq!(cidr("::/0").to_string(), "::/0");
        // Host bits are cleared.
        assert_eq!(cidr("10.1.2.3/8"), cidr("10.0.0.0/8"));
        assert_eq!(cidr("10.1.2.3/8").prefix_len(), 8);
        assert_eq!(cidr("10.1.2.3/8").addr(), ip("10.0.0.0"));
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            "",
            "/",
            "10.0.0.0/",
            "10.0.0.0/33",
            "::/129",
            "10.0.0.0/8/8",
            "10.0.0/8",
            "example.com",
            "10.0.0.0/-1",
            "10.0.0.0/+8",
            "10.0.0.0/ 8",
            "fe80::1%eth0",
            "10.0.0.0/999999999999",
        ] {
            let e = bad.parse::<Cidr>().expect_err(bad);
            assert!(e.starts_with("invalid CIDR"), "{e}");
        }
        assert!("10.0.0.0/33".parse::<Cidr>().unwrap_err().contains("at most 32"));
        assert!("x".parse::<Cidr>().unwrap_err().contains("expected IP or IP/PREFIX"));
    }

    #[test]
    fn contains_v4() {
        let c = cidr("10.0.0.0/8");
        assert!(c.contains(ip("10.0.0.0")));
        assert!(c.contains(ip("10.255.255.255")));
        assert!(!c.contains(ip("11.0.0.0")));
        assert!(!c.contains(ip("9.255.255.255")));
        assert!(cidr("0.0.0.0/0").contains(ip("1.2.3.4")));
        assert!(cidr("127.0.0.1").contains(ip("127.0.0.1")));
        assert!(!cidr("127.0.0.1").contains(ip("127.0.0.2")));
        assert!(!c.contains(ip("::1")));
    }

    #[test]
    fn contains_v6() {
        let c = cidr("fd00::/8");
        assert!(c.contains(ip("fd12::1")));
        assert!(!c.contains(ip("fe80::1")));
        assert!(cidr("::1/128").contains(ip("::1")));
        assert!(!cidr("::1/128").contains(ip("::2")));
        assert!(cidr("::/0").contains(ip("2001:db8::1")));
    }

    #[test]
    fn mapped_addresses_match_across_families() {
        assert!(cidr("10.0.0.0/8").contains(ip("::ffff:10.1.2.3")));
        assert!(!cidr("10.0.0.0/8").contains(ip("::ffff:11.1.2.3")));
        assert!(cidr("127.0.0.1").contains(ip("::ffff:127.0.0.1")));
        // Not mapped (IPv4-compatible form is deprecated and not treated as IPv4).
        assert!(!cidr("0.0.0.0/0").contains(ip("::1")));
        assert!(cidr("::ffff:0:0/96").contains(ip("192.0.2.1")));
        assert!(!cidr("::1/128").contains(ip("0.0.0.1")));
    }
}
