//! The PROXY protocol (HAProxy's v1 text and v2 binary headers): written to servers so they
//! learn the real client address, and read from trusted balancers in front of tidegate.
//!
//! The parser is strict and bounded: a v1 line is at most 107 bytes, a v2 header's length is
//! checked against a cap, LOCAL commands carry no address, TLVs are skipped without reading
//! past the header.

use std::net::{IpAddr, SocketAddr};

/// v2 signature.
pub const V2_SIG: [u8; 12] = [0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A];
/// Longest v1 line, CRLF included (the spec's limit).
pub const V1_MAX: usize = 107;
/// Largest v2 header accepted (16-byte fixed part plus addresses and TLVs).
pub const V2_MAX: usize = 16 + 1024;

/// What a header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// The balancer's own connection (health check): use the socket's peer.
    Local,
    /// A proxied connection from `source` to `destination`.
    Proxied { source: SocketAddr, destination: SocketAddr },
    /// v1 `UNKNOWN` or v2 UNSPEC/unix: a proxied connection whose address we cannot use.
    Unknown,
}

/// Parse result over a prefix of the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// Need more bytes.
    Incomplete,
    /// A header of `len` bytes.
    Done(Header, usize),
    /// Not a valid PROXY header.
    Invalid(&'static str),
}

/// Parses a v1 or v2 header at the start of `buf`.
pub fn parse(buf: &[u8]) -> Parsed {
    if buf.is_empty() {
        return Parsed::Incomplete;
    }
    if buf[0] == b'P' {
        return parse_v1(buf);
    }
    if buf[0] == V2_SIG[0] {
        return parse_v2(buf);
    }
    Parsed::Invalid("not a PROXY protocol header")
}

fn parse_v1(buf: &[u8]) -> Parsed {
    let prefix = b"PROXY ";
    let n = buf.len().min(prefix.len());
    if buf[..n] != prefix[..n] {
        return Parsed::Invalid("not a PROXY protocol header");
    }
    let Some(end) = buf.iter().take(V1_MAX).position(|&b| b == b'\n') else {
        return if buf.len() >= V1_MAX { Parsed::Invalid("v1 header longer than 107 bytes") } else { Parsed::Incomplete };
    };
    if end == 0 || buf[end - 1] != b'\r' {
        return Parsed::Invalid("v1 header not ended by CRLF");
    }
    let Ok(line) = std::str::from_utf8(&buf[prefix.len()..end - 1]) else { return Parsed::Invalid("v1 header is not ASCII") };
    let parts: Vec<&str> = line.split(' ').collect();
    let header = match parts.as_slice() {
        ["UNKNOWN", ..] => Header::Unknown,
        [proto @ ("TCP4" | "TCP6"), src, dst, sport, dport] => {
            let (Ok(src), Ok(dst)) = (src.parse::<IpAddr>(), dst.parse::<IpAddr>()) else {
                return Parsed::Invalid("v1 header has a bad address");
            };
            if (*proto == "TCP4") != (src.is_ipv4() && dst.is_ipv4()) || src.is_ipv4() != dst.is_ipv4() {
                return Parsed::Invalid("v1 address family does not match the protocol");
            }
            let (Some(sport), Some(dport)) = (port(sport), port(dport)) else { return Parsed::Invalid("v1 header has a bad port") };
            Header::Proxied { source: SocketAddr::new(src, sport), destination: SocketAddr::new(dst, dport) }
        }
        _ => return Parsed::Invalid("v1 header is malformed"),
    };
    Parsed::Done(header, end + 1)
}

/// A port: 1 to 5 digits, no sign, no leading zero (except "0" itself), at most 65535.
fn port(s: &str) -> Option<u16> {
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) || (s.len() > 1 && s.starts_with('0')) {
        return None;
    }
    s.parse().ok()
}

fn parse_v2(buf: &[u8]) -> Parsed {
    let n = buf.len().min(12);
    if buf[..n] != V2_SIG[..n] {
        return Parsed::Invalid("bad v2 signature");
    }
    if buf.len() < 16 {
        return Parsed::Incomplete;
    }
    let ver_cmd = buf[12];
    if ver_cmd >> 4 != 2 {
        return Parsed::Invalid("unsupported v2 version");
    }
    let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if 16 + len > V2_MAX {
        return Parsed::Invalid("v2 header too long");
    }
    if buf.len() < 16 + len {
        return Parsed::Incomplete;
    }
    let body = &buf[16..16 + len];
    let header = match ver_cmd & 0x0f {
        0x0 => Header::Local,
        0x1 => match buf[13] {
            // TCP over IPv4
            0x11 => {
                if body.len() < 12 {
                    return Parsed::Invalid("v2 IPv4 addresses truncated");
                }
                let src = IpAddr::from([body[0], body[1], body[2], body[3]]);
                let dst = IpAddr::from([body[4], body[5], body[6], body[7]]);
                Header::Proxied {
                    source: SocketAddr::new(src, u16::from_be_bytes([body[8], body[9]])),
                    destination: SocketAddr::new(dst, u16::from_be_bytes([body[10], body[11]])),
                }
            }
            // TCP over IPv6
            0x21 => {
                if body.len() < 36 {
                    return Parsed::Invalid("v2 IPv6 addresses truncated");
                }
                let mut s = [0u8; 16];
                let mut d = [0u8; 16];
                s.copy_from_slice(&body[..16]);
                d.copy_from_slice(&body[16..32]);
                Header::Proxied {
                    source: SocketAddr::new(IpAddr::from(s), u16::from_be_bytes([body[32], body[33]])),
                    destination: SocketAddr::new(IpAddr::from(d), u16::from_be_bytes([body[34], body[35]])),
                }
            }
            // UNSPEC, UDP, unix: no usable TCP address.
            0x00 | 0x12 | 0x22 | 0x31 | 0x32 => Header::Unknown,
            _ => return Parsed::Invalid("bad v2 address family"),
        },
        _ => return Parsed::Invalid("bad v2 command"),
    };
    // TLVs after the addresses are skipped: `len` already covers them.
    Parsed::Done(header, 16 + len)
}

/// The header to send a server for a connection from `source` to `destination`.
pub fn encode(version: crate::config::SendProxy, source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let (source, destination) = (canonical(source), canonical(destination));
    let same_family = source.is_ipv4() == destination.is_ipv4();
    match version {
        crate::config::SendProxy::V1 => {
            if !same_family {
                return b"PROXY UNKNOWN\r\n".to_vec();
            }
            let proto = if source.is_ipv4() { "TCP4" } else { "TCP6" };
            format!("PROXY {proto} {} {} {} {}\r\n", source.ip(), destination.ip(), source.port(), destination.port()).into_bytes()
        }
        crate::config::SendProxy::V2 => {
            let mut out = V2_SIG.to_vec();
            out.push(0x21);
            match (source.ip(), destination.ip()) {
                (IpAddr::V4(s), IpAddr::V4(d)) => {
                    out.push(0x11);
                    out.extend_from_slice(&12u16.to_be_bytes());
                    out.extend_from_slice(&s.octets());
                    out.extend_from_slice(&d.octets());
                }
                (IpAddr::V6(s), IpAddr::V6(d)) => {
                    out.push(0x21);
                    out.extend_from_slice(&36u16.to_be_bytes());
                    out.extend_from_slice(&s.octets());
                    out.extend_from_slice(&d.octets());
                }
                _ => {
                    out.push(0x00);
                    out.extend_from_slice(&0u16.to_be_bytes());
                    return out;
                }
            }
            out.extend_from_slice(&source.port().to_be_bytes());
            out.extend_from_slice(&destination.port().to_be_bytes());
            out
        }
    }
}

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// Reads a PROXY header from `stream` without consuming any byte after it (peek, then read
/// exactly the header). Bounded by the caller's timeout.
pub async fn read_header(stream: &mut tokio::net::TcpStream) -> Result<Header, String> {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; V2_MAX];
    loop {
        let n = stream.peek(&mut buf).await.map_err(|e| format!("reading PROXY header: {e}"))?;
        if n == 0 {
            return Err("connection closed before a PROXY header".into());
        }
        match parse(&buf[..n]) {
            Parsed::Done(h, len) => {
                // The bytes were peeked, so this completes at once.
                stream.read_exact(&mut buf[..len]).await.map_err(|e| format!("reading PROXY header: {e}"))?;
                return Ok(h);
            }
            Parsed::Invalid(why) => return Err(why.into()),
            // More bytes are on their way; peek again shortly (peek does not wait for new data).
            Parsed::Incomplete => tokio::time::sleep(std::time::Duration::from_millis(2)).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SendProxy;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v1_and_v2_round_trip_ipv4_and_ipv6() {
        for (src, dst) in [("203.0.113.7:51000", "10.0.0.1:443"), ("[2001:db8::1]:4000", "[2001:db8::2]:80")] {
            for v in [SendProxy::V1, SendProxy::V2] {
                let bytes = encode(v, sa(src), sa(dst));
                let mut with_payload = bytes.clone();
                with_payload.extend_from_slice(b"GET / HTTP/1.1\r\n");
                assert_eq!(parse(&with_payload), Parsed::Done(Header::Proxied { source: sa(src), destination: sa(dst) }, bytes.len()));
                for cut in 0..bytes.len() {
                    assert_eq!(parse(&bytes[..cut]), Parsed::Incomplete, "{v:?} cut at {cut}");
                }
            }
        }
    }

    #[test]
    fn v2_local_unspec_and_tlvs() {
        let mut local = V2_SIG.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0x00, 0x03, 1, 2, 3]);
        assert_eq!(parse(&local), Parsed::Done(Header::Local, 19));
        let mut v = encode(SendProxy::V2, sa("1.2.3.4:5"), sa("6.7.8.9:10"));
        // Append a TLV (type 0x04 NOOP, length 2) and fix the length.
        v.extend_from_slice(&[0x04, 0x00, 0x02, 0xAA, 0xBB]);
        let len = (v.len() - 16) as u16;
        v[14..16].copy_from_slice(&len.to_be_bytes());
        assert!(matches!(parse(&v), Parsed::Done(Header::Proxied { .. }, n) if n == v.len()));
    }

    #[test]
    fn malformed_headers_are_refused() {
        let long = format!("PROXY TCP4 1.2.3.4 5.6.7.8 1 2{}\r\n", " ".repeat(100));
        for bad in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n",
            b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 ::1 ::1 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
            long.as_bytes(),
            &[0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0B, 0x21, 0x11, 0, 12],
            &[0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A, 0x31, 0x11, 0, 12],
            &[0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A, 0x21, 0x11, 0, 4, 1, 2, 3, 4],
            &[0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A, 0x21, 0x11, 0xFF, 0xFF],
        ] {
            assert!(matches!(parse(bad), Parsed::Invalid(_)), "{:?} -> {:?}", String::from_utf8_lossy(bad), parse(bad));
        }
    }
}
