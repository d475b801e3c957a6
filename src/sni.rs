//! Reading the server name from a TLS ClientHello without terminating TLS (for
//! `tls_passthrough`). Bounded: the ClientHello must fit in `MAX_HELLO` bytes.

/// Largest ClientHello accepted (records' headers included).
pub const MAX_HELLO: usize = 16 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hello {
    Incomplete,
    /// A complete ClientHello; the server name if it had one (lower-cased).
    Done(Option<String>),
    Invalid(&'static str),
}

/// Parses the ClientHello at the start of `buf` (possibly spread over several records).
pub fn parse(buf: &[u8]) -> Hello {
    // Reassemble the handshake message from consecutive handshake records.
    let mut msg = Vec::new();
    let mut pos = 0;
    let mut need: Option<usize> = None;
    loop {
        if let Some(n) = need
            && msg.len() >= n
        {
            break;
        }
        if pos + 5 > buf.len() {
            return if buf.len() >= MAX_HELLO { Hello::Invalid("ClientHello too large") } else { Hello::Incomplete };
        }
        let (ctype, major, len) = (buf[pos], buf[pos + 1], usize::from(u16::from_be_bytes([buf[pos + 3], buf[pos + 4]])));
        if ctype != 0x16 {
            return Hello::Invalid("not a TLS handshake record");
        }
        if major != 3 || len == 0 || len > 16384 + 2048 {
            return Hello::Invalid("bad TLS record header");
        }
        if pos + 5 + len > buf.len() {
            return if pos + 5 + len > MAX_HELLO { Hello::Invalid("ClientHello too large") } else { Hello::Incomplete };
        }
        msg.extend_from_slice(&buf[pos + 5..pos + 5 + len]);
        pos += 5 + len;
        if need.is_none() && msg.len() >= 4 {
            if msg[0] != 0x01 {
                return Hello::Invalid("first handshake message is not a ClientHello");
            }
            let n = 4 + (usize::from(msg[1]) << 16 | usize::from(msg[2]) << 8 | usize::from(msg[3]));
            if n > MAX_HELLO {
                return Hello::Invalid("ClientHello too large");
            }
            need = Some(n);
        }
    }
    let n = need.expect("set before the loop ends");
    match server_name(&msg[4..n]) {
        Ok(name) => Hello::Done(name),
        Err(why) => Hello::Invalid(why),
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], &'static str> {
        if self.0.len() < n {
            return Err("ClientHello truncated");
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<usize, &'static str> {
        Ok(usize::from(self.take(1)?[0]))
    }
    fn u16(&mut self) -> Result<usize, &'static str> {
        let b = self.take(2)?;
        Ok(usize::from(u16::from_be_bytes([b[0], b[1]])))
    }
}

fn server_name(body: &[u8]) -> Result<Option<String>, &'static str> {
    let mut r = Reader(body);
    r.take(2)?; // legacy_version
    r.take(32)?; // random
    let sid = r.u8()?;
    r.take(sid)?;
    let suites = r.u16()?;
    r.take(suites)?;
    let comp = r.u8()?;
    r.take(comp)?;
    if r.0.is_empty() {
        return Ok(None); // no extensions
    }
    let ext_len = r.u16()?;
    let mut exts = Reader(r.take(ext_len)?);
    while !exts.0.is_empty() {
        let ty = exts.u16()?;
        let len = exts.u16()?;
        let data = exts.take(len)?;
        if ty != 0 {
            continue;
        }
        let mut d = Reader(data);
        let list_len = d.u16()?;
        let mut list = Reader(d.take(list_len)?);
        while !list.0.is_empty() {
            let name_type = list.u8()?;
            let name_len = list.u16()?;
            let name = list.take(name_len)?;
            if name_type == 0 {
                let name = std::str::from_utf8(name).map_err(|_| "server name is not ASCII")?.trim_end_matches('.');
                // Checked after the trailing dots go: "." alone is no name.
                if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_') {
                    return Err("server name has invalid characters");
                }
                return Ok(Some(name.to_ascii_lowercase()));
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello from a real rustls client, for `name`.
    fn hello(name: &str) -> Vec<u8> {
        use std::sync::Arc;
        let cfg = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let server = rustls_pki_types::ServerName::try_from(name.to_string()).unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(cfg), server).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn reads_sni_from_a_real_client_hello_at_every_cut() {
        let h = hello("Chat.Example.com");
        assert_eq!(parse(&h), Hello::Done(Some("chat.example.com".into())));
        for cut in 0..h.len() {
            assert_eq!(parse(&h[..cut]), Hello::Incomplete, "cut {cut}");
        }
        // An IP address name: rustls sends no SNI.
        assert_eq!(parse(&hello("127.0.0.1")), Hello::Done(None));
    }

    #[test]
    fn hello_split_over_two_records() {
        let h = hello("a.example.org");
        let body = &h[5..];
        let (a, b) = body.split_at(40);
        let mut split = vec![0x16, 3, 1];
        split.extend_from_slice(&(a.len() as u16).to_be_bytes());
        split.extend_from_slice(a);
        split.extend_from_slice(&[0x16, 3, 1]);
        split.extend_from_slice(&(b.len() as u16).to_be_bytes());
        split.extend_from_slice(b);
        assert_eq!(parse(&split), Hello::Done(Some("a.example.org".into())));
    }

    #[test]
    fn garbage_is_refused() {
        assert!(matches!(parse(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), Hello::Invalid(_)));
        assert!(matches!(parse(&[0x16, 3, 1, 0, 4, 2, 0, 0, 0]), Hello::Invalid(_)));
        assert!(matches!(parse(&[0x16, 3, 1, 0, 5, 1, 0, 0, 1, 0]), Hello::Invalid(_)));
        // A huge declared handshake length.
        assert!(matches!(parse(&[0x16, 3, 1, 0, 4, 1, 0xff, 0xff, 0xff]), Hello::Invalid(_)));
    }
}
