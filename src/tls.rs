//! TLS: loading certificates and keys (with errors that name the file), choosing a
//! certificate by SNI, and the rustls configurations for listeners and for upstreams.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, ServerSessionMemoryCache};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use crate::config::{ListenerTls, TlsVersion};

/// The process-wide crypto provider (aws-lc-rs).
pub fn provider() -> Arc<CryptoProvider> {
    static P: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    P.get_or_init(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider())).clone()
}

/// A certificate chain with its key, checked to belong together.
#[derive(Debug, Clone)]
pub struct LoadedCert {
    pub key: Arc<CertifiedKey>,
    /// DNS names from the certificate's subjectAltName (lower-cased; may start with `*.`).
    pub names: Vec<String>,
    /// End of validity, in seconds since the Unix epoch.
    pub not_after: Option<i64>,
}

impl LoadedCert {
    /// Seconds until expiry (negative when expired).
    pub fn expires_in(&self) -> Option<i64> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
        self.not_after.map(|t| t - now)
    }
}

/// Loads a PEM certificate chain and a PEM private key (PKCS#8, PKCS#1 or SEC1).
pub fn load_cert(cert_path: &Path, key_path: &Path) -> Result<LoadedCert, String> {
    let pem = std::fs::read(cert_path).map_err(|e| format!("cannot read certificate {}: {e}", cert_path.display()))?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("certificate {} is not valid PEM: {e}", cert_path.display()))?;
    if chain.is_empty() {
        return Err(format!("no PEM certificate (BEGIN CERTIFICATE) found in {}", cert_path.display()));
    }
    let key_pem = std::fs::read(key_path).map_err(|e| format!("cannot read key {}: {e}", key_path.display()))?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => {
            format!("no private key (PKCS#8, PKCS#1 or SEC1 PEM) found in {}", key_path.display())
        }
        e => format!("key {} is not valid PEM: {e}", key_path.display()),
    })?;
    // The key on its own first, so a bad key is reported as the key's problem.
    let signing = provider().key_provider.load_private_key(key).map_err(|e| format!("key {} cannot be used: {e}", key_path.display()))?;
    let certified = CertifiedKey::new(chain, signing);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(rustls::Error::InconsistentKeys(_)) => {
            return Err(format!("key {} does not match certificate {}", key_path.display(), cert_path.display()));
        }
        Err(e) => return Err(format!("certificate {} cannot be used: {e}", cert_path.display())),
    }
    let (names, not_after) = der::names_and_expiry(&certified.cert[0])
        .ok_or_else(|| format!("certificate {} could not be parsed (X.509 DER)", cert_path.display()))?;
    Ok(LoadedCert { key: Arc::new(certified), names, not_after })
}

/// Picks a certificate by SNI: exact name, then a wildcard covering one more label, then the
/// default (also for a ClientHello without SNI).
#[derive(Debug)]
pub struct CertResolver {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `*.example.com` stored under `example.com`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Option<Arc<CertifiedKey>>,
}

impl CertResolver {
    pub fn new(certs: &[(LoadedCert, bool)]) -> Self {
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        // Earlier certificates win for a name listed twice.
        for (c, _) in certs.iter().rev() {
            for name in &c.names {
                match name.strip_prefix("*.") {
                    Some(rest) => wildcard.insert(rest.to_string(), c.key.clone()),
                    None => exact.insert(name.clone(), c.key.clone()),
                };
            }
        }
        let default = certs.iter().find(|(_, d)| *d).or(certs.first()).map(|(c, _)| c.key.clone());
        CertResolver { exact, wildcard, default }
    }

    pub fn resolve_name(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        if let Some(name) = sni {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            if let Some(k) = self.exact.get(&name) {
                return Some(k.clone());
            }
            if let Some((_, parent)) = name.split_once('.')
                && let Some(k) = self.wildcard.get(parent)
            {
                return Some(k.clone());
            }
        }
        self.default.clone()
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.resolve_name(hello.server_name())
    }
}

/// The rustls configuration of a TLS listener.
pub fn server_config(tls: &ListenerTls) -> Result<Arc<ServerConfig>, String> {
    let versions: &[&rustls::SupportedProtocolVersion] = match tls.min_version {
        TlsVersion::V1_2 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::V1_3 => &[&rustls::version::TLS13],
    };
    let certs: Vec<(LoadedCert, bool)> = tls.certificates.iter().map(|c| (c.loaded.clone(), c.default)).collect();
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .map_err(|e| format!("TLS versions: {e}"))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(CertResolver::new(&certs)));
    cfg.alpn_protocols = tls.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    cfg.session_storage = ServerSessionMemoryCache::new(16 * 1024);
    cfg.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new().map_err(|e| format!("TLS session tickets: {e}"))?;
    Ok(Arc::new(cfg))
}

/// The rustls configuration for connecting to an upstream's servers.
pub fn client_config(ca: Option<&Path>, verify: bool) -> Result<Arc<ClientConfig>, String> {
    let builder =
        ClientConfig::builder_with_provider(provider()).with_safe_default_protocol_versions().map_err(|e| format!("TLS versions: {e}"))?;
    let mut cfg = if !verify {
        builder.dangerous().with_custom_certificate_verifier(Arc::new(NoVerify(provider()))).with_no_client_auth()
    } else {
        let mut roots = RootCertStore::empty();
        match ca {
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| format!("cannot read CA file {}: {e}", path.display()))?;
                for cert in CertificateDer::pem_slice_iter(&pem) {
                    let cert = cert.map_err(|e| format!("CA file {} is not valid PEM: {e}", path.display()))?;
                    roots.add(cert).map_err(|e| format!("CA file {}: {e}", path.display()))?;
                }
                if roots.is_empty() {
                    return Err(format!("no PEM certificate (BEGIN CERTIFICATE) found in CA file {}", path.display()));
                }
            }
            None => {
                let native = rustls_native_certs::load_native_certs();
                roots.add_parsable_certificates(native.certs);
                if roots.is_empty() {
                    return Err("no trusted CA certificates found on this system; set `ca` to a PEM file".into());
                }
            }
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// The name an upstream connection presents (SNI) and verifies: `sni` when configured, else
/// the server's IP address.
pub fn server_name(sni: Option<&str>, addr: std::net::SocketAddr) -> ServerName<'static> {
    sni.and_then(|s| ServerName::try_from(s.to_string()).ok()).unwrap_or_else(|| ServerName::IpAddress(addr.ip().into()))
}

/// `verify = false`: accepts any certificate (the handshake signature is still checked).
/// Public so tests and tools that talk to self-signed servers use the same verifier.
pub struct NoVerify(Arc<CryptoProvider>);

impl NoVerify {
    pub fn new(provider: Arc<CryptoProvider>) -> Self {
        NoVerify(provider)
    }
}

impl fmt::Debug for NoVerify {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NoVerify")
    }
}

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Default TLS handshake deadline.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Just enough DER to read a certificate's DNS names and its notAfter.
mod der {
    /// (tag, content, rest)
    fn tlv(d: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, d) = d.split_first()?;
        let (&first, mut d) = d.split_first()?;
        let len = if first < 0x80 {
            usize::from(first)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 || d.len() < n {
                return None;
            }
            let mut len = 0usize;
            for &b in &d[..n] {
                len = (len << 8) | usize::from(b);
            }
            d = &d[n..];
            len
        };
        if d.len() < len {
            return None;
        }
        Some((tag, &d[..len], &d[len..]))
    }

    const SAN_OID: &[u8] = &[0x55, 0x1d, 0x11];

    pub fn names_and_expiry(cert: &[u8]) -> Option<(Vec<String>, Option<i64>)> {
        let (_, certificate, _) = tlv(cert)?;
        let (_, mut tbs, _) = tlv(certificate)?;
        // version [0] EXPLICIT, optional
        if tbs.first() == Some(&0xa0) {
            tbs = tlv(tbs)?.2;
        }
        let (_, _serial, rest) = tlv(tbs)?;
        let (_, _sig_alg, rest) = tlv(rest)?;
        let (_, _issuer, rest) = tlv(rest)?;
        let (_, validity, rest) = tlv(rest)?;
        let (_, _not_before, v) = tlv(validity)?;
        let (tag, not_after, _) = tlv(v)?;
        let not_after = parse_time(tag, not_after);
        let (_, _subject, rest) = tlv(rest)?;
        let (_, _spki, mut rest) = tlv(rest)?;
        let mut names = Vec::new();
        while !rest.is_empty() {
            let (tag, content, r) = tlv(rest)?;
            rest = r;
            if tag != 0xa3 {
                continue;
            }
            let (_, mut exts, _) = tlv(content)?;
            while !exts.is_empty() {
                let (_, ext, r) = tlv(exts)?;
                exts = r;
                let (_, oid, mut e) = tlv(ext)?;
                if oid != SAN_OID {
                    continue;
                }
                if e.first() == Some(&0x01) {
                    e = tlv(e)?.2; // critical BOOLEAN
                }
                let (_, octets, _) = tlv(e)?;
                let (_, mut general_names, _) = tlv(octets)?;
                while !general_names.is_empty() {
                    let (tag, value, r) = tlv(general_names)?;
                    general_names = r;
                    if tag == 0x82
                        && let Ok(s) = std::str::from_utf8(value)
                    {
                        names.push(s.to_ascii_lowercase());
                    }
                }
            }
        }
        Some((names, not_after))
    }

    /// UTCTime (0x17) `YYMMDDHHMMSSZ` or GeneralizedTime (0x18) `YYYYMMDDHHMMSSZ`.
    fn parse_time(tag: u8, v: &[u8]) -> Option<i64> {
        let s = std::str::from_utf8(v).ok()?.strip_suffix('Z')?;
        let (year, rest) = match tag {
            0x17 => {
                let y: i64 = s.get(..2)?.parse().ok()?;
                (if y >= 50 { 1900 + y } else { 2000 + y }, s.get(2..)?)
            }
            0x18 => (s.get(..4)?.parse().ok()?, s.get(4..)?),
            _ => return None,
        };
        let num = |r: std::ops::Range<usize>| -> Option<i64> { rest.get(r)?.parse().ok() };
        let (month, day, hour, min, sec) = (num(0..2)?, num(2..4)?, num(4..6)?, num(6..8)?, num(8..10)?);
        Some(days_from_civil(year, month, day) * 86_400 + hour * 3600 + min * 60 + sec)
    }

    /// Days since 1970-01-01 (Howard Hinnant's algorithm).
    fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
        let y = if m <= 2 { y - 1 } else { y };
        let era = if y >= 0 { y } else { y - 399 } / 400;
        let yoe = y - era * 400;
        let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        era * 146_097 + doe - 719_468
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn epoch_days() {
            assert_eq!(super::days_from_civil(1970, 1, 1), 0);
            assert_eq!(super::days_from_civil(2000, 3, 1), 11_017);
            assert_eq!(super::parse_time(0x17, b"491231235959Z"), Some(2_524_607_999));
            assert_eq!(super::parse_time(0x18, b"20500101000000Z"), Some(2_524_608_000));
        }
    }
}
