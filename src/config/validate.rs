//! Turns config text into a [`Config`], collecting every problem with its location.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::num::NonZeroU32;
use std::path::Path;
use std::time::Duration;

use toml::Spanned;

use super::file::{
    FileAdmin, FileCert, FileConfig, FileCookie, FileHash, FileHealth, FileIpHash, FileListener, FileListenerTimeouts, FileListenerTls,
    FileRoute, FileServer, FileUpstream, FileUpstreamTimeouts, FileUpstreamTls,
};
use super::{
    AdminConfig, Balance, Cidr, Config, ConfigError, ConfigErrors, CookieConfig, DrainConfig, FailOn, Fallback, HashConfig, HashKey,
    HealthConfig, HealthKind, HostMatch, IpHashMode, ListenerConfig, ListenerMode, ListenerTimeouts, ListenerTls, LoadReport, RouteConfig,
    SameSite, SendProxy, ServerConfig, TlsCert, TlsVersion, Underscores, UpstreamConfig, UpstreamTimeouts, UpstreamTls, parse_duration,
};

const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_KEEPALIVE: usize = 32;
const DEFAULT_MAX_FAILS: u32 = 1;
const DEFAULT_FAIL_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_BOUNDED_LOAD: f64 = 1.25;

/// Parses and validates `text`; `path` is only used in messages.
pub(super) fn validate(text: &str, path: &Path) -> Result<Config, ConfigErrors> {
    let mut cx = Ctx { text, path, errors: Vec::new(), warnings: Vec::new(), l4_refs: Vec::new() };
    let file: FileConfig = match toml::from_str(text) {
        Ok(file) => file,
        Err(e) => {
            cx.error(e.span().map(|s| s.start), rewrite_serde_message(e.message()));
            return Err(cx.finish());
        }
    };
    let mut config = cx.config(file);
    if cx.errors.is_empty() {
        let warnings = std::mem::take(&mut cx.warnings);
        config.warnings = cx.located(warnings);
        Ok(config)
    } else {
        Err(cx.finish())
    }
}

/// Collects errors as (byte offset, message); `None` means "no location".
struct Ctx<'a> {
    text: &'a str,
    path: &'a Path,
    errors: Vec<(Option<usize>, String)>,
    warnings: Vec<(Option<usize>, String)>,
    /// (offset, upstream index) of every upstream a layer-4 listener uses, checked once the
    /// upstreams are known: they cannot balance by cookie or HTTP request keys.
    l4_refs: Vec<(usize, usize)>,
}

impl Ctx<'_> {
    fn error(&mut self, offset: Option<usize>, message: impl Into<String>) {
        self.errors.push((offset, message.into()));
    }

    fn error_at<T>(&mut self, at: &Spanned<T>, message: impl Into<String>) {
        self.error(Some(at.span().start), message);
    }

    fn line_of<T>(&self, at: &Spanned<T>) -> usize {
        line_col(self.text, at.span().start).0
    }

    fn warn_at<T>(&mut self, at: &Spanned<T>, message: impl Into<String>) {
        self.warnings.push((Some(at.span().start), message.into()));
    }

    /// A path from the config, relative to the config file's directory.
    fn resolve_path(&self, p: &str) -> std::path::PathBuf {
        let p = Path::new(p);
        if p.is_absolute() { p.to_path_buf() } else { self.path.parent().unwrap_or(Path::new("")).join(p) }
    }

    fn finish(self) -> ConfigErrors {
        let errors = self.located(self.errors.clone());
        ConfigErrors(errors)
    }

    fn located(&self, list: Vec<(Option<usize>, String)>) -> Vec<ConfigError> {
        let mut errors: Vec<ConfigError> = list
            .into_iter()
            .map(|(offset, message)| {
                let (line, col) = offset.map_or((0, 0), |o| line_col(self.text, o));
                ConfigError { file: self.path.to_path_buf(), line, col, message }
            })
            .collect();
        errors.sort_by_key(|e| (e.line, e.col));
        errors
    }

    fn config(&mut self, file: FileConfig) -> Config {
        let FileConfig { shutdown_timeout, pid_file, reload_on_change, admin, log, listener, upstream } = file;
        let admin = admin.and_then(|a| self.admin(a));
        let log_json = match log.and_then(|l| l.format) {
            None => false,
            Some(f) => match f.get_ref().as_str() {
                "text" => false,
                "json" => true,
                other => {
                    self.error_at(&f, format!(r#"unknown log format {other:?}; expected "text" or "json""#));
                    false
                }
            },
        };
        let pid_file = pid_file.map(|p| self.resolve_path(p.get_ref()));
        let shutdown_timeout = self.duration(shutdown_timeout.as_ref(), "shutdown_timeout", DEFAULT_SHUTDOWN_TIMEOUT);

        // Upstreams first (in file order) so routes can refer to them by index.
        let mut upstream: Vec<(Spanned<String>, FileUpstream)> = upstream.into_iter().collect();
        upstream.sort_by_key(|(name, _)| name.span().start);
        let names: Vec<String> = upstream.iter().map(|(n, _)| n.get_ref().clone()).collect();
        let upstreams: Vec<UpstreamConfig> = upstream.into_iter().map(|(name, u)| self.upstream(name, u)).collect();

        if listener.is_empty() {
            self.error(None, "no [[listener]] defined; at least one listener is required");
        }
        let mut listeners: Vec<ListenerConfig> = Vec::with_capacity(listener.len());
        // (name, line) and (bind, listener name, line) seen so far, for duplicate checks.
        let mut seen_names: Vec<(String, usize)> = Vec::new();
        let mut seen_binds: Vec<(SocketAddr, String, usize)> = Vec::new();
        for l in listener {
            let line = self.line_of(&l);
            let l = self.listener(l, line, &names, &mut seen_names, &mut seen_binds);
            listeners.push(l);
        }
        for (at, idx) in std::mem::take(&mut self.l4_refs) {
            let Some(u) = upstreams.get(idx) else { continue };
            let problem = match &u.balance {
                Balance::Cookie(_) => Some("balance = \"cookie\" needs HTTP".to_string()),
                Balance::Hash(h) if h.key != HashKey::Ip => Some(format!("hash key \"{}\" needs HTTP; only \"ip\" works for TCP", h.key)),
                _ => None,
            };
            if let Some(p) = problem {
                self.error(
                    Some(at),
                    format!("upstream {:?} is used by a layer-4 listener, but {p}; use round_robin, least_conn, p2c, ip_hash or hash with key = \"ip\"", u.name),
                );
            }
        }
        Config {
            source: self.path.to_path_buf(),
            shutdown_timeout,
            listeners,
            upstreams,
            warnings: Vec::new(),
            pid_file,
            reload_on_change: reload_on_change.unwrap_or(true),
            admin,
            log_json,
        }
    }

    fn listener(
        &mut self,
        l: Spanned<FileListener>,
        header_line: usize,
        upstream_names: &[String],
        seen_names: &mut Vec<(String, usize)>,
        seen_binds: &mut Vec<(SocketAddr, String, usize)>,
    ) -> ListenerConfig {
        let header = l.span().start;
        let FileListener {
            name,
            bind,
            mode,
            trusted_proxies,
            timeouts,
            tls,
            upstream,
            accept_proxy,
            max_connections,
            max_connections_per_client,
            header_underscores,
            route,
        } = l.into_inner();
        let max_connections = max_connections.and_then(|m| self.int(&m, "max_connections", 0, u64::from(u32::MAX))).unwrap_or(0) as u32;
        let max_connections_per_client =
            max_connections_per_client.and_then(|m| self.int(&m, "max_connections_per_client", 0, u64::from(u32::MAX))).unwrap_or(0) as u32;
        let header_underscores = match header_underscores {
            None => Underscores::Drop,
            Some(u) => match u.get_ref().as_str() {
                "drop" => Underscores::Drop,
                "reject" => Underscores::Reject,
                "allow" => Underscores::Allow,
                other => {
                    self.error_at(&u, format!(r#"invalid header_underscores {other:?}; expected "drop" (default), "reject" or "allow""#));
                    Underscores::Drop
                }
            },
        };

        if name.get_ref().trim().is_empty() {
            self.error_at(&name, "listener name must not be empty");
        } else if let Some((_, line)) = seen_names.iter().find(|(n, _)| n == name.get_ref()) {
            let msg = format!("duplicate listener name {:?} (first defined on line {line})", name.get_ref());
            self.error_at(&name, msg);
        } else {
            seen_names.push((name.get_ref().clone(), self.line_of(&name)));
        }

        let bind_addr = match socket_addr(bind.get_ref(), false) {
            Ok(a) => a,
            Err(e) => {
                self.error_at(&bind, e);
                SocketAddr::from(([0, 0, 0, 0], 0))
            }
        };
        if bind_addr.port() != 0 {
            let clash = seen_binds.iter().find(|(b, _, _)| {
                b.port() == bind_addr.port()
                    && (*b == bind_addr
                        || (b.is_ipv4() == bind_addr.is_ipv4() && (b.ip().is_unspecified() || bind_addr.ip().is_unspecified())))
            });
            if let Some((other, other_name, line)) = clash {
                let msg = if *other == bind_addr {
                    format!(
                        "duplicate bind {bind_addr}: already used by listener {other_name:?} (line {line}); each listener needs its own IP:PORT"
                    )
                } else {
                    format!(
                        "bind {bind_addr} overlaps {other} of listener {other_name:?} (line {line}); each listener needs its own IP:PORT"
                    )
                };
                self.error_at(&bind, msg);
            }
            seen_binds.push((bind_addr, name.get_ref().clone(), self.line_of(&bind)));
        }

        let mode = match mode {
            None => ListenerMode::Http,
            Some(m) => match m.get_ref().as_str() {
                "http" => ListenerMode::Http,
                "tcp" => ListenerMode::Tcp,
                "tls_passthrough" => ListenerMode::TlsPassthrough,
                other => {
                    self.error_at(&m, format!(r#"unknown mode {other:?}; expected "http", "tcp" or "tls_passthrough""#));
                    ListenerMode::Http
                }
            },
        };

        let mut proxies = Vec::new();
        for p in trusted_proxies.unwrap_or_default() {
            match p.get_ref().parse::<Cidr>() {
                Ok(c) => proxies.push(c),
                Err(e) => self.error_at(&p, e),
            }
        }

        let timeouts = match timeouts {
            None => ListenerTimeouts::default(),
            Some(t) => {
                let FileListenerTimeouts { header_read, keepalive_idle, body, body_min_rate, send } = t;
                let d = ListenerTimeouts::default();
                ListenerTimeouts {
                    header_read: self.duration(header_read.as_ref(), "header_read", d.header_read),
                    keepalive_idle: self.duration(keepalive_idle.as_ref(), "keepalive_idle", d.keepalive_idle),
                    body: self.duration(body.as_ref(), "body", d.body),
                    body_min_rate: body_min_rate.and_then(|r| self.int(&r, "body_min_rate", 0, 1 << 40)).unwrap_or(d.body_min_rate),
                    send: self.duration(send.as_ref(), "send", d.send),
                }
            }
        };

        let routes: Vec<RouteConfig> = match (mode, upstream) {
            (ListenerMode::Tcp, Some(u)) => {
                for r in &route {
                    self.error_at(r, r#"a mode = "tcp" listener sends everything to its `upstream`; [[listener.route]] is not used"#);
                }
                let index = self.upstream_ref(&u, upstream_names);
                self.l4_refs.push((u.span().start, index));
                vec![RouteConfig { host: None, sni: None, path_prefix: None, upstream: index }]
            }
            (ListenerMode::Tcp, None) => {
                let msg = format!(
                    r#"listener {:?} (line {header_line}) has mode = "tcp" but no upstream; add upstream = "NAME""#,
                    name.get_ref()
                );
                self.error(Some(header), msg);
                Vec::new()
            }
            (_, Some(u)) => {
                self.error_at(&u, r#"`upstream` on a listener applies to mode = "tcp" only; use [[listener.route]] here"#);
                Vec::new()
            }
            (_, None) => {
                if route.is_empty() {
                    let msg = format!(
                        "listener {:?} (line {header_line}) has no routes; add at least one [[listener.route]] with an upstream",
                        name.get_ref()
                    );
                    self.error(Some(header), msg);
                }
                route.into_iter().map(|r| self.route(r, mode, upstream_names)).collect()
            }
        };

        let accept_proxy = match accept_proxy {
            Some(a) if *a.get_ref() => {
                if proxies.is_empty() {
                    self.error_at(&a, "accept_proxy needs trusted_proxies: the addresses of the balancers allowed to send PROXY headers");
                }
                true
            }
            _ => false,
        };
        if mode == ListenerMode::TlsPassthrough
            && let Some(t) = &tls
        {
            self.error_at(
                t,
                r#"a mode = "tls_passthrough" listener does not terminate TLS; remove [listener.tls] (or use mode = "tcp" to terminate)"#,
            );
        }
        let tls = tls.map(|t| self.listener_tls(t));
        ListenerConfig {
            name: name.into_inner(),
            bind: bind_addr,
            mode,
            routes,
            timeouts,
            trusted_proxies: proxies,
            tls,
            accept_proxy,
            max_connections,
            max_connections_per_client,
            header_underscores,
        }
    }

    /// `[listener.tls]`: loads every certificate now, so `check` and a reload catch a missing,
    /// unreadable or mismatched file before anything changes.
    fn listener_tls(&mut self, t: Spanned<FileListenerTls>) -> ListenerTls {
        let FileListenerTls { certificates, min_version, alpn, handshake_timeout } = t.into_inner();
        let min_version = match min_version {
            None => TlsVersion::V1_2,
            Some(v) => match v.get_ref().as_str() {
                "1.2" => TlsVersion::V1_2,
                "1.3" => TlsVersion::V1_3,
                other => {
                    self.error_at(&v, format!(r#"invalid min_version {other:?}; expected "1.2" or "1.3""#));
                    TlsVersion::V1_2
                }
            },
        };
        let alpn = match alpn {
            None => vec!["http/1.1".to_string()],
            Some(list) => {
                for p in &list {
                    if p.get_ref() != "http/1.1" {
                        self.error_at(p, format!(r#"unsupported ALPN protocol {:?}; tidegate speaks "http/1.1""#, p.get_ref()));
                    }
                }
                list.into_iter().map(Spanned::into_inner).collect()
            }
        };
        let handshake_timeout = self.duration(handshake_timeout.as_ref(), "handshake_timeout", crate::tls::DEFAULT_HANDSHAKE_TIMEOUT);
        if certificates.get_ref().is_empty() {
            self.error_at(
                &certificates,
                r#"[listener.tls] needs at least one certificate, e.g. certificates = [{ cert = "tls/site.crt", key = "tls/site.key" }]"#,
            );
        }
        let mut out = Vec::new();
        let mut defaults = 0;
        for c in certificates.into_inner() {
            let FileCert { cert, key, default } = c.into_inner();
            let default = default.unwrap_or(false);
            if default {
                defaults += 1;
                if defaults > 1 {
                    self.error_at(&cert, "only one certificate may be the default");
                }
            }
            let (cert_path, key_path) = (self.resolve_path(cert.get_ref()), self.resolve_path(key.get_ref()));
            match crate::tls::load_cert(&cert_path, &key_path) {
                Ok(loaded) => {
                    if let Some(left) = loaded.expires_in() {
                        if left <= 0 {
                            self.warn_at(&cert, format!("certificate {} has expired", cert_path.display()));
                        } else if left < 14 * 86_400 {
                            self.warn_at(&cert, format!("certificate {} expires in {} day(s)", cert_path.display(), left / 86_400));
                        }
                    }
                    if loaded.names.is_empty() && !default {
                        self.warn_at(
                            &cert,
                            format!(
                                "certificate {} has no DNS names (subjectAltName); it can only serve as the default",
                                cert_path.display()
                            ),
                        );
                    }
                    out.push(TlsCert { cert: cert_path, key: key_path, default, loaded });
                }
                Err(e) => {
                    // Point at the key for key problems, at the cert otherwise.
                    if e.starts_with("cannot read key")
                        || e.starts_with("no private key")
                        || e.starts_with(&format!("key {}", key_path.display()))
                    {
                        self.error_at(&key, e);
                    } else {
                        self.error_at(&cert, e);
                    }
                }
            }
        }
        ListenerTls { certificates: out, min_version, alpn, handshake_timeout }
    }

    fn upstream_tls(&mut self, t: Spanned<FileUpstreamTls>) -> Option<UpstreamTls> {
        let at = t.span().start;
        let FileUpstreamTls { enabled, sni, ca, verify } = t.into_inner();
        if enabled == Some(false) {
            return None;
        }
        if let Some(s) = &sni
            && rustls_pki_types::ServerName::try_from(s.get_ref().as_str()).is_err()
        {
            self.error_at(s, format!("invalid sni {:?}: expected a DNS name like \"svc.internal\"", s.get_ref()));
        }
        let verify_flag = verify.as_ref().is_none_or(|v| *v.get_ref());
        if let Some(v) = &verify
            && !verify_flag
        {
            self.warn_at(v, "verify = false: upstream certificates are not checked; anyone on the path can impersonate these servers");
        }
        let ca_path = ca.as_ref().map(|c| self.resolve_path(c.get_ref()));
        match crate::tls::client_config(ca_path.as_deref(), verify_flag) {
            Ok(client) => Some(UpstreamTls { sni: sni.map(Spanned::into_inner), ca: ca_path, verify: verify_flag, client }),
            Err(e) => {
                match &ca {
                    Some(c) => self.error_at(c, e),
                    None => self.error(Some(at), e),
                }
                None
            }
        }
    }

    fn admin(&mut self, a: Spanned<FileAdmin>) -> Option<AdminConfig> {
        let FileAdmin { bind, token } = a.into_inner();
        let addr = match socket_addr(bind.get_ref(), false) {
            Ok(a) => a,
            Err(e) => {
                self.error_at(&bind, e);
                return None;
            }
        };
        if let Some(t) = &token
            && (t.get_ref().len() < 16 || t.get_ref().bytes().any(|b| !b.is_ascii_graphic()))
        {
            self.error_at(t, "admin token must be at least 16 visible ASCII characters");
        }
        if !addr.ip().is_loopback() && token.is_none() {
            self.error_at(
                &bind,
                format!("admin bind {addr} is not loopback, so it needs a token (token = \"...\", at least 16 characters); anyone who reaches it could drain servers"),
            );
        }
        Some(AdminConfig { bind: addr, token: token.map(Spanned::into_inner) })
    }

    fn health(&mut self, h: Spanned<FileHealth>) -> HealthConfig {
        let FileHealth { kind, path, host, expect, interval, timeout, rise, fall, load, start_healthy } = h.into_inner();
        let kind = match kind {
            None => HealthKind::Http,
            Some(k) => match k.get_ref().as_str() {
                "http" => HealthKind::Http,
                "tcp" => HealthKind::Tcp,
                "websocket" => HealthKind::WebSocket,
                other => {
                    self.error_at(&k, format!(r#"unknown health kind {other:?}; expected "http", "tcp" or "websocket""#));
                    HealthKind::Http
                }
            },
        };
        let path = match path {
            None => "/".to_string(),
            Some(p) => {
                if !p.get_ref().starts_with('/') || p.get_ref().bytes().any(|b| b.is_ascii_control() || b == b' ') {
                    self.error_at(&p, format!(r#"invalid health path {:?}: expected a path starting with "/""#, p.get_ref()));
                }
                p.into_inner()
            }
        };
        if let Some(h) = &host
            && (h.get_ref().is_empty() || h.get_ref().bytes().any(|b| b.is_ascii_control() || b == b' '))
        {
            self.error_at(h, format!("invalid health host {:?}", h.get_ref()));
        }
        let mut codes = Vec::new();
        for e in expect.unwrap_or_default() {
            if let Some(c) = self.int(&e, "expect", 100, 599) {
                codes.push(c as u16);
            }
        }
        let timeout_at = timeout.as_ref().map(|t| t.span().start);
        let interval = self.duration(interval.as_ref(), "interval", Duration::from_secs(2));
        let timeout = self.duration(timeout.as_ref(), "timeout", Duration::from_secs(1));
        let rise = rise.and_then(|r| self.int(&r, "rise", 1, 1000)).map_or(2, |r| r as u32);
        let fall = fall.and_then(|f| self.int(&f, "fall", 1, 1000)).map_or(3, |f| f as u32);
        let load = load.and_then(|l| {
            let raw = l.get_ref().as_str();
            let parsed = if raw == "body" {
                Some(LoadReport::Body)
            } else if let Some(h) = raw.strip_prefix("header:") {
                (!h.is_empty() && h.bytes().all(is_cookie_name_byte)).then(|| LoadReport::Header(h.to_ascii_lowercase()))
            } else if let Some(p) = raw.strip_prefix("json:") {
                (p.is_empty() || p.starts_with('/')).then(|| LoadReport::Json(p.to_string()))
            } else {
                None
            };
            match parsed {
                Some(LoadReport::Json(_) | LoadReport::Body) if kind != HealthKind::Http => {
                    self.error_at(
                        &l,
                        format!(r#"load {raw:?} reads the response body, which only kind = "http" checks have; use "header:NAME""#),
                    );
                    None
                }
                Some(_) if kind == HealthKind::Tcp => {
                    self.error_at(&l, r#"load needs an http or websocket check; kind = "tcp" only connects"#);
                    None
                }
                Some(p) => Some(p),
                None => {
                    self.error_at(&l, format!(r#"invalid load {raw:?}: expected "header:NAME", "json:/json/pointer" or "body""#));
                    None
                }
            }
        });
        if timeout > interval {
            // Not fatal, but checks would pile up behind each other.
            self.error(timeout_at, format!("health timeout ({timeout:?}) must not exceed interval ({interval:?})"));
        }
        HealthConfig {
            kind,
            path,
            host: host.map(Spanned::into_inner),
            expect: codes,
            interval,
            timeout,
            rise,
            fall,
            load,
            start_healthy: start_healthy.unwrap_or(false),
        }
    }

    fn fail_on(&mut self, list: Option<Vec<Spanned<toml::Value>>>) -> FailOn {
        let Some(list) = list else { return FailOn::default() };
        let mut f = FailOn { connect: false, timeout: false, statuses: Vec::new() };
        for v in list {
            match v.get_ref() {
                toml::Value::String(s) if s == "connect" => f.connect = true,
                toml::Value::String(s) if s == "timeout" => f.timeout = true,
                toml::Value::Integer(n) if (500..=599).contains(n) => f.statuses.push(*n as u16),
                other => {
                    self.error_at(&v, format!(r#"invalid fail_on entry {other}: expected "connect", "timeout" or a 5xx status like 502"#))
                }
            }
        }
        f
    }

    fn route(&mut self, r: Spanned<FileRoute>, mode: ListenerMode, upstream_names: &[String]) -> RouteConfig {
        let at = r.span().start;
        let FileRoute { host, sni, path_prefix, upstream } = r.into_inner();
        let parse = |h: Option<Spanned<String>>, this: &mut Self| {
            h.and_then(|h| match parse_host(h.get_ref()) {
                Ok(m) => Some(m),
                Err(e) => {
                    this.error_at(&h, e);
                    None
                }
            })
        };
        if mode == ListenerMode::TlsPassthrough {
            for (key, present) in [("host", host.is_some()), ("path_prefix", path_prefix.is_some())] {
                if present {
                    self.error(
                        Some(at),
                        format!(r#"`{key}` cannot be seen on a mode = "tls_passthrough" listener (TLS is not terminated); route by `sni`"#),
                    );
                }
            }
        } else if let Some(s) = &sni {
            self.error_at(s, r#"`sni` routes apply to mode = "tls_passthrough" listeners; on HTTP listeners route by `host`"#);
        }
        let host = parse(host, self);
        let sni = parse(sni, self);
        if let Some(p) = &path_prefix
            && let Err(e) = check_path_prefix(p.get_ref())
        {
            self.error_at(p, e);
        }
        let index = self.upstream_ref(&upstream, upstream_names);
        if mode != ListenerMode::Http {
            self.l4_refs.push((upstream.span().start, index));
        }
        RouteConfig { host, sni, path_prefix: path_prefix.map(Spanned::into_inner), upstream: index }
    }

    /// Resolves an upstream name used by a route or a TCP listener.
    fn upstream_ref(&mut self, upstream: &Spanned<String>, upstream_names: &[String]) -> usize {
        match upstream_names.iter().position(|n| n == upstream.get_ref()) {
            Some(i) => i,
            None => {
                let msg = if upstream_names.is_empty() {
                    format!(
                        "unknown upstream {:?}; no upstreams are defined (add an [upstream.{}] table)",
                        upstream.get_ref(),
                        upstream.get_ref()
                    )
                } else {
                    format!("unknown upstream {:?}; defined upstreams: {}", upstream.get_ref(), upstream_names.join(", "))
                };
                self.error_at(upstream, msg);
                0
            }
        }
    }

    fn upstream(&mut self, name: Spanned<String>, u: FileUpstream) -> UpstreamConfig {
        let FileUpstream {
            balance,
            ip_hash,
            cookie,
            hash,
            keepalive,
            tries,
            servers,
            timeouts,
            tls,
            health,
            fail_on,
            panic_threshold,
            drain_timeout,
            drain_spread,
            drain_close_code,
            send_proxy,
        } = u;
        let send_proxy = send_proxy.and_then(|v| match v.get_ref().as_str() {
            "v1" => Some(SendProxy::V1),
            "v2" => Some(SendProxy::V2),
            other => {
                self.error_at(&v, format!(r#"invalid send_proxy {other:?}; expected "v1" or "v2""#));
                None
            }
        });
        let d = DrainConfig::default();
        let drain = DrainConfig {
            timeout: self.duration_or_zero(drain_timeout.as_ref(), "drain_timeout", d.timeout),
            spread: self.duration_or_zero(drain_spread.as_ref(), "drain_spread", d.spread),
            close_code: match drain_close_code {
                None => d.close_code,
                Some(c) if matches!(*c.get_ref(), 1001 | 1012) => *c.get_ref() as u16,
                Some(c) => {
                    self.error_at(&c, format!("drain_close_code must be 1001 (Going Away) or 1012 (Service Restart), got {}", c.get_ref()));
                    d.close_code
                }
            },
        };
        let tls = tls.and_then(|t| self.upstream_tls(t));
        let health = health.map(|h| self.health(h));
        let fail_on = self.fail_on(fail_on);
        let panic_threshold = panic_threshold.and_then(|p| {
            let v = *p.get_ref();
            if (0.0..=1.0).contains(&v) {
                Some(v)
            } else {
                self.error_at(&p, format!("panic_threshold must be between 0.0 and 1.0 (a share of servers), got {v}"));
                None
            }
        });
        let n = name.get_ref();
        if n.is_empty() {
            self.error_at(&name, "upstream name must not be empty; expected letters, digits, '_', '.' or '-'");
        } else if let Some(c) = n.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))) {
            let msg = format!("invalid upstream name {n:?}: character {c:?} is not allowed; expected letters, digits, '_', '.' or '-'");
            self.error_at(&name, msg);
        }

        let balance = self.balance(n, balance, ip_hash, cookie, hash);
        let keepalive = keepalive
            .and_then(|k| self.int(&k, "keepalive", 0, usize::MAX as u64))
            .map_or(DEFAULT_KEEPALIVE, |k| usize::try_from(k).unwrap_or(DEFAULT_KEEPALIVE));
        let tries = tries.and_then(|t| self.int(&t, "tries", 0, usize::MAX as u64)).map_or(0, |t| usize::try_from(t).unwrap_or(0));

        let timeouts = match timeouts {
            None => UpstreamTimeouts::default(),
            Some(t) => {
                let FileUpstreamTimeouts { connect, response_header, tunnel_idle } = t;
                let d = UpstreamTimeouts::default();
                UpstreamTimeouts {
                    connect: self.duration(connect.as_ref(), "connect", d.connect),
                    response_header: self.duration(response_header.as_ref(), "response_header", d.response_header),
                    tunnel_idle: self.duration(tunnel_idle.as_ref(), "tunnel_idle", d.tunnel_idle),
                }
            }
        };

        let mut out: Vec<ServerConfig> = Vec::new();
        match servers {
            Some(s) if !s.get_ref().is_empty() => {
                let list = s.into_inner();
                if list.iter().all(|s| s.get_ref().down == Some(true)) {
                    let msg = format!("upstream {n:?}: all servers are down; at least one must be up");
                    self.error_at(&name, msg);
                } else if list.iter().all(|s| s.get_ref().backup == Some(true)) {
                    let msg = format!("upstream {n:?} has no primary server: every server is backup; at least one must not be");
                    self.error_at(&name, msg);
                }
                let mut seen: BTreeMap<SocketAddr, usize> = BTreeMap::new();
                for s in list {
                    if let Some(server) = self.server(s.into_inner(), &mut seen) {
                        out.push(server);
                    }
                }
            }
            Some(s) => {
                let msg = format!(r#"upstream {n:?} has no servers; expected e.g. servers = [{{ addr = "127.0.0.1:9000" }}]"#);
                self.error_at(&s, msg);
            }
            None => {
                let msg = format!(r#"upstream {n:?} has no servers; expected e.g. servers = [{{ addr = "127.0.0.1:9000" }}]"#);
                self.error_at(&name, msg);
            }
        }

        UpstreamConfig {
            name: name.into_inner(),
            balance,
            servers: out,
            timeouts,
            keepalive,
            tries,
            tls,
            health,
            fail_on,
            panic_threshold,
            drain,
            send_proxy,
        }
    }

    /// `balance` and the tables that refine it; a table for another algorithm is an error.
    fn balance(
        &mut self,
        upstream: &str,
        balance: Option<Spanned<String>>,
        ip_hash: Option<Spanned<FileIpHash>>,
        cookie: Option<Spanned<FileCookie>>,
        hash: Option<Spanned<FileHash>>,
    ) -> Balance {
        const NAMES: &str = "round_robin, least_conn, p2c (or random_two), ip_hash, cookie, hash";
        let name = balance.as_ref().map_or("round_robin", |b| b.get_ref().as_str());
        let balance_span = balance.as_ref().map(|b| b.span().start);
        let result = match name {
            "round_robin" => Balance::RoundRobin,
            "least_conn" => Balance::LeastConn,
            "p2c" | "random_two" => Balance::P2c,
            "ip_hash" => Balance::IpHash(IpHashMode::Consistent),
            "cookie" => Balance::Cookie(CookieConfig {
                name: "tg_srv".into(),
                secret: None,
                max_age: None,
                path: "/".into(),
                domain: None,
                same_site: SameSite::Lax,
                fallback: Fallback::LeastConn,
            }),
            "hash" => Balance::Hash(HashConfig { key: HashKey::Ip, bounded_load: DEFAULT_BOUNDED_LOAD }),
            other => {
                self.error(balance_span, format!("unknown balance {other:?} in upstream {upstream:?}; expected one of: {NAMES}"));
                Balance::RoundRobin
            }
        };
        let known = matches!(name, "round_robin" | "least_conn" | "p2c" | "random_two" | "ip_hash" | "cookie" | "hash");
        let misplaced = |table: &str, wants: &str| {
            format!("[upstream.{upstream}.{table}] only applies with balance = {wants:?}, but balance is {name:?}")
        };
        match result {
            Balance::IpHash(_) => {
                if let Some(t) = ip_hash {
                    let FileIpHash { mode } = t.into_inner();
                    if let Some(m) = mode {
                        match m.get_ref().as_str() {
                            "consistent" => {}
                            "nginx" => return self.reject_tables(upstream, name, cookie, hash, Balance::IpHash(IpHashMode::Nginx)),
                            other => {
                                self.error_at(&m, format!(r#"unknown ip_hash mode {other:?}; expected "consistent" (default) or "nginx""#))
                            }
                        }
                    }
                }
                self.reject_tables(upstream, name, cookie, hash, result)
            }
            Balance::Cookie(mut c) => {
                if let Some(t) = cookie {
                    let FileCookie { name: cname, secret, max_age, path, domain, same_site, fallback } = t.into_inner();
                    if let Some(n) = cname {
                        if n.get_ref().is_empty() || !n.get_ref().bytes().all(is_cookie_name_byte) {
                            self.error_at(
                                &n,
                                format!("invalid cookie name {:?}: expected letters, digits and !#$%&'*+-.^_`|~", n.get_ref()),
                            );
                        }
                        c.name = n.into_inner();
                    }
                    if let Some(s) = secret {
                        if s.get_ref().len() < 16 {
                            self.error_at(&s, "cookie secret must be at least 16 characters");
                        }
                        c.secret = Some(s.into_inner());
                    }
                    if let Some(m) = max_age {
                        c.max_age = Some(self.duration(Some(&m), "max_age", Duration::from_secs(3600)));
                    }
                    if let Some(p) = path {
                        if !p.get_ref().starts_with('/') || !p.get_ref().bytes().all(is_cookie_attr_byte) {
                            self.error_at(&p, format!("invalid cookie path {:?}: expected a path starting with \"/\"", p.get_ref()));
                        }
                        c.path = p.into_inner();
                    }
                    if let Some(d) = domain {
                        if d.get_ref().is_empty() || !d.get_ref().bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-') {
                            self.error_at(
                                &d,
                                format!("invalid cookie domain {:?}: expected a host name like \"example.com\"", d.get_ref()),
                            );
                        }
                        c.domain = Some(d.into_inner());
                    }
                    if let Some(s) = same_site {
                        c.same_site = match s.get_ref().to_ascii_lowercase().as_str() {
                            "lax" => SameSite::Lax,
                            "strict" => SameSite::Strict,
                            "none" => SameSite::None,
                            _ => {
                                self.error_at(&s, format!(r#"invalid same_site {:?}; expected "lax", "strict" or "none""#, s.get_ref()));
                                SameSite::Lax
                            }
                        };
                    }
                    if let Some(f) = fallback {
                        c.fallback = match f.get_ref().as_str() {
                            "round_robin" => Fallback::RoundRobin,
                            "least_conn" => Fallback::LeastConn,
                            "p2c" | "random_two" => Fallback::P2c,
                            other => {
                                self.error_at(
                                    &f,
                                    format!("invalid cookie fallback {other:?}; expected one of: round_robin, least_conn, p2c"),
                                );
                                Fallback::LeastConn
                            }
                        };
                    }
                }
                if let Some(t) = ip_hash {
                    self.error_at(&t, misplaced("ip_hash", "ip_hash"));
                }
                if let Some(t) = hash {
                    self.error_at(&t, misplaced("hash", "hash"));
                }
                Balance::Cookie(c)
            }
            Balance::Hash(mut h) => {
                match hash {
                    None => self.error(
                        balance_span,
                        format!(r#"balance = "hash" needs [upstream.{upstream}.hash] with a key, e.g. key = "header:X-User-Id""#),
                    ),
                    Some(t) => {
                        let FileHash { key, bounded_load } = t.into_inner();
                        match parse_hash_key(key.get_ref()) {
                            Ok(k) => h.key = k,
                            Err(e) => self.error_at(&key, e),
                        }
                        if let Some(b) = bounded_load {
                            let v = *b.get_ref();
                            if v == 0.0 || (v.is_finite() && v >= 1.0) {
                                h.bounded_load = v;
                            } else {
                                self.error_at(&b, format!("bounded_load must be 0 (off) or at least 1.0, got {v}"));
                            }
                        }
                    }
                }
                if let Some(t) = ip_hash {
                    self.error_at(&t, misplaced("ip_hash", "ip_hash"));
                }
                if let Some(t) = cookie {
                    self.error_at(&t, misplaced("cookie", "cookie"));
                }
                Balance::Hash(h)
            }
            other => {
                if known && let Some(t) = ip_hash {
                    self.error_at(&t, misplaced("ip_hash", "ip_hash"));
                }
                if known { self.reject_tables(upstream, name, cookie, hash, other) } else { other }
            }
        }
    }

    fn reject_tables(
        &mut self,
        upstream: &str,
        name: &str,
        cookie: Option<Spanned<FileCookie>>,
        hash: Option<Spanned<FileHash>>,
        result: Balance,
    ) -> Balance {
        if let Some(t) = cookie {
            self.error_at(&t, format!(r#"[upstream.{upstream}.cookie] only applies with balance = "cookie", but balance is {name:?}"#));
        }
        if let Some(t) = hash {
            self.error_at(&t, format!(r#"[upstream.{upstream}.hash] only applies with balance = "hash", but balance is {name:?}"#));
        }
        result
    }

    fn server(&mut self, s: FileServer, seen: &mut BTreeMap<SocketAddr, usize>) -> Option<ServerConfig> {
        let FileServer { addr, weight, max_fails, fail_timeout, backup, down, max_conns } = s;
        let sock = match socket_addr(addr.get_ref(), true) {
            Ok(a) if a.port() == 0 => {
                let msg =
                    format!("invalid address {:?}: port 0 is not allowed for a server; expected a port from 1 to 65535", addr.get_ref());
                self.error_at(&addr, msg);
                None
            }
            Ok(a) => {
                let line = self.line_of(&addr);
                if let Some(first) = seen.get(&a) {
                    let msg = format!("duplicate server {:?} ({a}) in this upstream (first on line {first})", addr.get_ref());
                    self.error_at(&addr, msg);
                } else {
                    seen.insert(a, line);
                }
                Some(a)
            }
            Err(e) => {
                self.error_at(&addr, e);
                None
            }
        };
        let weight = match &weight {
            None => NonZeroU32::MIN,
            Some(w) if *w.get_ref() < 1 => {
                self.error_at(w, format!("weight must be at least 1, got {}", w.get_ref()));
                NonZeroU32::MIN
            }
            // Bounded so a consistent-hash ring (160 points per unit) stays reasonable.
            Some(w) => {
                self.int(w, "weight", 1, 10_000).and_then(|w| u32::try_from(w).ok()).and_then(NonZeroU32::new).unwrap_or(NonZeroU32::MIN)
            }
        };
        let max_fails = max_fails
            .and_then(|m| self.int(&m, "max_fails", 0, u32::MAX.into()))
            .map_or(DEFAULT_MAX_FAILS, |m| u32::try_from(m).unwrap_or(DEFAULT_MAX_FAILS));
        let fail_timeout = self.duration(fail_timeout.as_ref(), "fail_timeout", DEFAULT_FAIL_TIMEOUT);
        let max_conns = max_conns.and_then(|m| self.int(&m, "max_conns", 0, u32::MAX.into())).map_or(0, |m| u32::try_from(m).unwrap_or(0));
        Some(ServerConfig {
            addr: sock?,
            weight,
            max_fails,
            fail_timeout,
            backup: backup.unwrap_or(false),
            down: down.unwrap_or(false),
            max_conns,
        })
    }

    /// An integer key that must lie in `min..=max`.
    fn int(&mut self, v: &Spanned<i64>, key: &str, min: u64, max: u64) -> Option<u64> {
        let n = *v.get_ref();
        match u64::try_from(n) {
            Ok(u) if (min..=max).contains(&u) => Some(u),
            _ => {
                let msg = if min == 0 && n < 0 {
                    format!("{key} must be 0 or more, got {n}")
                } else {
                    format!("{key} must be between {min} and {max}, got {n}")
                };
                self.error_at(v, msg);
                None
            }
        }
    }

    /// A duration key that may be zero ("0s": at once); `default` when absent or invalid.
    fn duration_or_zero(&mut self, v: Option<&Spanned<String>>, key: &str, default: Duration) -> Duration {
        let Some(v) = v else { return default };
        match parse_duration(v.get_ref()) {
            Ok(d) => d,
            Err(e) => {
                self.error_at(v, format!("{key}: {e}"));
                default
            }
        }
    }

    /// A duration key (must be > 0); `default` when absent or invalid.
    fn duration(&mut self, v: Option<&Spanned<String>>, key: &str, default: Duration) -> Duration {
        let Some(v) = v else { return default };
        match parse_duration(v.get_ref()) {
            Ok(d) if d.is_zero() => {
                self.error_at(v, format!("{key} must be greater than 0, got {:?}", v.get_ref()));
                default
            }
            Ok(d) => d,
            Err(e) => {
                self.error_at(v, e);
                default
            }
        }
    }
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = text.get(..offset).unwrap_or_default();
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = before.get(line_start..).unwrap_or_default().chars().count() + 1;
    (line, col)
}

/// Makes serde's messages speak TOML: keys rather than fields, and name the table.
fn rewrite_serde_message(msg: &str) -> String {
    let msg = msg.trim_end();
    if let Some(rest) = msg.strip_prefix("unknown field `") {
        let Some((key, expected)) = rest.split_once('`') else {
            return msg.to_string();
        };
        // "expected one of `a`, `b`" / "expected `a`" / "there are no fields"
        let fields: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
        let table = match fields.first().copied() {
            Some("shutdown_timeout") => "at top level",
            Some("name") if fields.get(1) == Some(&"secret") => "in upstream cookie",
            Some("name") => "in [[listener]]",
            Some("mode") => "in upstream ip_hash",
            Some("key") => "in upstream hash",
            Some("header_read") => "in listener timeouts",
            Some("host") => "in [[listener.route]]",
            Some("certificates") => "in [listener.tls]",
            Some("cert") => "in a certificate",
            Some("enabled") => "in upstream tls",
            Some("bind") if fields.get(1) == Some(&"token") => "in [admin]",
            Some("format") => "in [log]",
            Some("kind") => "in upstream health",
            Some("balance") => "in upstream",
            Some("connect") => "in upstream timeouts",
            Some("addr") => "in server",
            _ => "here",
        };
        return if fields.is_empty() {
            format!("unknown key {key:?} {table}; no keys are allowed here")
        } else {
            format!("unknown key {key:?} {table}; expected one of: {}", fields.join(", "))
        };
    }
    if let Some(rest) = msg.strip_prefix("missing field `")
        && let Some(key) = rest.strip_suffix('`')
    {
        return format!("missing required key {key:?}");
    }
    // Serde's Rust type names, in TOML terms.
    let mut msg = msg.to_string();
    for (rust, toml) in
        [("expected i64", "expected an integer"), ("expected a sequence", "expected an array"), ("expected a map", "expected a table")]
    {
        msg = msg.replace(rust, toml);
    }
    // "expected struct FileServer" -> "expected a table"
    if let Some((head, rest)) = msg.split_once("expected struct ") {
        let tail = rest.trim_start_matches(|c: char| c.is_ascii_alphanumeric() || c == '_');
        msg = format!("{head}expected a table{tail}");
    }
    msg
}

/// Route `host`: exact or `*.example.com`, lower-cased, no port/path/spaces.
fn parse_host(raw: &str) -> Result<HostMatch, String> {
    const EXPECTED: &str = r#"expected a host name like "chat.example.com" or "*.example.com""#;
    let bad = |why: &str| format!("invalid host {raw:?}: {why}; {EXPECTED}");
    if raw.is_empty() {
        return Err(bad("empty (leave host out to match any host)"));
    }
    if raw.chars().any(char::is_whitespace) {
        return Err(bad("must not contain spaces"));
    }
    if raw.contains('/') {
        return Err(bad("must not contain a path (use path_prefix)"));
    }
    let h = raw.to_ascii_lowercase();
    if let Some(inner) = h.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
        return match inner.parse::<std::net::Ipv6Addr>() {
            Ok(ip) => Ok(HostMatch::Exact(format!("[{ip}]"))),
            Err(_) => Err(bad("not a valid IPv6 address")),
        };
    }
    if h.contains(':') {
        return Err(bad("must not contain a port"));
    }
    let (wildcard, name) = match h.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, h.as_str()),
    };
    if name.contains('*') || (h.contains('*') && !wildcard) {
        return Err(bad(r#"a wildcard is only allowed as the whole first label, as in "*.example.com""#));
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))) {
        return Err(bad(&format!("character {c:?} is not allowed (use punycode for international names)")));
    }
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() || name.split('.').any(str::is_empty) {
        return Err(bad("empty label"));
    }
    Ok(if wildcard { HostMatch::Wildcard(format!(".{name}")) } else { HostMatch::Exact(name.to_string()) })
}

fn check_path_prefix(p: &str) -> Result<(), String> {
    if !p.starts_with('/') {
        return Err(format!(r#"invalid path_prefix {p:?}: expected a path starting with "/", e.g. "/ws""#));
    }
    if p.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("invalid path_prefix {p:?}: must not contain spaces or control characters"));
    }
    if p.contains(['?', '#']) {
        return Err(format!("invalid path_prefix {p:?}: must be a path only, without '?' query or '#' fragment"));
    }
    Ok(())
}

/// `IP:PORT`; with `resolve`, also `host:port` through the system resolver (first result).
fn socket_addr(s: &str, resolve: bool) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    let expected = r#"expected IP:PORT (e.g. "127.0.0.1:9000", IPv6 as "[::1]:9000")"#;
    if let Ok(ip) = s.parse::<IpAddr>() {
        let hint = if ip.is_ipv6() { "; IPv6 needs brackets and a port" } else { "; the port is missing" };
        return Err(format!("invalid address {s:?}: {expected}{hint}"));
    }
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err(format!("invalid address {s:?}: {expected}"));
    };
    let Ok(port) = port.parse::<u16>() else {
        return Err(format!("invalid address {s:?}: {expected}; the port must be a number from 0 to 65535"));
    };
    let hostname_like = !host.is_empty()
        && host.len() <= 253
        && host.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        && !host.chars().all(|c| c.is_ascii_digit() || c == '.')
        && !host.starts_with(['.', '-']);
    if !hostname_like {
        return Err(format!("invalid address {s:?}: {expected}"));
    }
    if !resolve {
        return Err(format!("invalid address {s:?}: {expected}; host names are not allowed here"));
    }
    match (host, port).to_socket_addrs() {
        Ok(mut addrs) => addrs.next().ok_or_else(|| format!("cannot resolve {s:?}: no addresses found; {expected}")),
        Err(e) => Err(format!("cannot resolve {s:?}: {e}; {expected}")),
    }
}

/// RFC 6265 cookie-name (an HTTP token).
fn is_cookie_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Bytes allowed in a cookie attribute value we write (no `;`, no controls, no spaces).
fn is_cookie_attr_byte(b: u8) -> bool {
    b.is_ascii_graphic() && b != b';' && b != b','
}

/// `header:NAME`, `cookie:NAME`, `query:NAME`, `path` or `ip`.
fn parse_hash_key(raw: &str) -> Result<HashKey, String> {
    const EXPECTED: &str = r#"expected "header:NAME", "cookie:NAME", "query:NAME", "path" or "ip""#;
    let (kind, arg) = match raw.split_once(':') {
        Some((k, a)) => (k, Some(a)),
        None => (raw, None),
    };
    let need_arg = |a: Option<&str>| match a {
        Some(a) if !a.is_empty() && a.bytes().all(is_cookie_name_byte) => Ok(a.to_string()),
        _ => Err(format!("invalid hash key {raw:?}: {kind}: needs a name; {EXPECTED}")),
    };
    match (kind, arg) {
        ("header", a) => need_arg(a).map(|n| HashKey::Header(n.to_ascii_lowercase())),
        ("cookie", a) => need_arg(a).map(HashKey::Cookie),
        ("query", a) => need_arg(a).map(HashKey::Query),
        ("path", None) => Ok(HashKey::Path),
        ("ip", None) => Ok(HashKey::Ip),
        _ => Err(format!("invalid hash key {raw:?}; {EXPECTED}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Config, ConfigErrors> {
        validate(text, Path::new("t.toml"))
    }

    /// Errors as (line, col, message).
    fn errs(text: &str) -> Vec<(usize, usize, String)> {
        match load(text) {
            Ok(_) => panic!("expected errors for:\n{text}"),
            Err(e) => e.0.into_iter().map(|e| (e.line, e.col, e.message)).collect(),
        }
    }

    fn one_err(text: &str) -> (usize, usize, String) {
        let mut e = errs(text);
        assert_eq!(e.len(), 1, "{e:#?}");
        e.remove(0)
    }

    const GOOD: &str = r#"
[[listener]]
name = "public"
bind = "127.0.0.1:8080"

  [[listener.route]]
  upstream = "chat"

[upstream.chat]
servers = [
  { addr = "127.0.0.1:9001" },
]
"#;

    #[test]
    fn shipped_configs_validate() {
        let demo = validate(include_str!("../../conf/demo.toml"), Path::new("conf/demo.toml")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(demo.listeners.len(), 1);
        assert_eq!(demo.listeners[0].name, "demo");
        assert_eq!(demo.listeners[0].bind, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(demo.upstreams.len(), 1);
        let up = &demo.upstreams[0];
        assert_eq!(up.name, "demo");
        let addrs: Vec<String> = up.servers.iter().map(|s| s.addr.to_string()).collect();
        assert_eq!(addrs, ["127.0.0.1:9101", "127.0.0.1:9102", "127.0.0.1:9103"]);
        assert!(up.servers.iter().all(|s| s.weight.get() == 1 && !s.backup && !s.down));

        let reference = include_str!("../../conf/tidegate.toml");
        let full = validate(reference, Path::new("conf/tidegate.toml")).unwrap_or_else(|e| panic!("{e}"));
        assert!(!full.listeners.is_empty());
        // Every key of the schema appears in the reference config.
        for key in [
            "shutdown_timeout",
            "[[listener]]",
            "name",
            "bind",
            "mode",
            "trusted_proxies",
            "[listener.timeouts]",
            "header_read",
            "keepalive_idle",
            "[[listener.route]]",
            "host",
            "path_prefix",
            "upstream",
            "balance",
            "keepalive",
            "tries",
            "servers",
            "addr",
            "weight",
            "max_fails",
            "fail_timeout",
            "backup",
            "down",
            "max_conns",
            "connect",
            "response_header",
            "tunnel_idle",
        ] {
            assert!(reference.contains(key), "reference config lacks {key}");
        }
    }

    #[test]
    fn good_config_and_defaults() {
        let c = load(GOOD).unwrap();
        assert_eq!(c.source, Path::new("t.toml"));
        assert_eq!(c.shutdown_timeout, Duration::from_secs(30));
        let l = &c.listeners[0];
        assert_eq!(l.mode, ListenerMode::Http);
        assert_eq!(l.timeouts, ListenerTimeouts::default());
        assert!(l.trusted_proxies.is_empty());
        assert_eq!(l.routes[0].upstream, 0);
        assert_eq!(l.routes[0].host, None);
        let u = &c.upstreams[0];
        assert_eq!((u.keepalive, u.tries, u.balance.clone()), (32, 0, Balance::RoundRobin));
        assert_eq!(u.timeouts, UpstreamTimeouts::default());
        let s = &u.servers[0];
        assert_eq!(
            (s.weight.get(), s.max_fails, s.fail_timeout, s.backup, s.down, s.max_conns),
            (1, 1, Duration::from_secs(10), false, false, 0)
        );
    }

    #[test]
    fn full_config_values() {
        let c = load(
            r#"
shutdown_timeout = "1m30s"
[[listener]]
name = "a"
bind = "[::1]:0"
trusted_proxies = ["10.0.0.0/8", "127.0.0.1"]
timeouts = { header_read = "5s", keepalive_idle = "2m" }
  [[listener.route]]
  host = "Chat.Example.COM"
  path_prefix = "/ws"
  upstream = "zeta"
  [[listener.route]]
  host = "*.example.com"
  upstream = "alpha"
[[listener]]
name = "b"
bind = "127.0.0.1:0"
  [[listener.route]]
  upstream = "alpha"
[upstream.zeta]
keepalive = 0
tries = 2
servers = [
  { addr = "127.0.0.1:9001", weight = 3, max_fails = 0, fail_timeout = "1s", max_conns = 7 },
  { addr = "[::1]:9002", backup = true },
  { addr = "localhost:9003", down = true },
]
[upstream.zeta.timeouts]
connect = "250ms"
response_header = "1s"
tunnel_idle = "1d"
[upstream.alpha]
servers = [{ addr = "127.0.0.1:9001" }]
"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.shutdown_timeout, Duration::from_secs(90));
        // Upstreams keep file order, not alphabetical order.
        let names: Vec<&str> = c.upstreams.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(names, ["zeta", "alpha"]);
        let l = &c.listeners[0];
        assert_eq!(l.timeouts.header_read, Duration::from_secs(5));
        assert_eq!(l.timeouts.keepalive_idle, Duration::from_secs(120));
        assert_eq!(l.trusted_proxies.len(), 2);
        assert_eq!(l.routes[0].host, Some(HostMatch::Exact("chat.example.com".into())));
        assert_eq!(l.routes[0].path_prefix.as_deref(), Some("/ws"));
        assert_eq!(l.routes[0].upstream, 0);
        assert_eq!(l.routes[1].host, Some(HostMatch::Wildcard(".example.com".into())));
        assert_eq!(l.routes[1].upstream, 1);
        let z = c.upstream("zeta").unwrap();
        assert_eq!((z.keepalive, z.tries), (0, 2));
        assert_eq!(z.timeouts.connect, Duration::from_millis(250));
        assert_eq!(z.timeouts.tunnel_idle, Duration::from_secs(86_400));
        let s = &z.servers[0];
        assert_eq!((s.weight.get(), s.max_fails, s.max_conns), (3, 0, 7));
        assert_eq!(s.fail_timeout, Duration::from_secs(1));
        assert!(z.servers[1].backup && z.servers[2].down);
        assert_eq!(z.servers[2].addr.port(), 9003);
    }

    #[test]
    fn syntax_error() {
        let (line, col, msg) = one_err("[[listener]]\nname = \"a\nbind = 1\n");
        assert_eq!((line, col), (2, 10), "{msg}");
        assert!(msg.contains("expected"), "{msg}");
        let (line, _, _) = one_err("[[listener]]\nname = \"a\"\nbind == \"x\"\n");
        assert_eq!(line, 3);
    }

    #[test]
    fn unknown_key_in_server() {
        let text = GOOD.replace(r#"{ addr = "127.0.0.1:9001" },"#, r#"{ addr = "127.0.0.1:9001", wieght = 2 },"#);
        let (line, col, msg) = one_err(&text);
        assert_eq!((line, col), (11, 30));
        assert_eq!(
            msg,
            r#"unknown key "wieght" in server; expected one of: addr, weight, max_fails, fail_timeout, backup, down, max_conns"#
        );
    }

    #[test]
    fn unknown_keys_elsewhere() {
        let (line, col, msg) = one_err(&format!("shutdown = \"1s\"\n{GOOD}"));
        assert_eq!((line, col), (1, 1));
        assert!(
            msg.starts_with(
                r#"unknown key "shutdown" at top level; expected one of: shutdown_timeout, pid_file, reload_on_change, admin, log, listener, upstream"#
            ),
            "{msg}"
        );
        let (line, _, msg) = one_err(&GOOD.replace("bind =", "port = 1\nbind ="));
        assert_eq!(line, 4);
        assert!(msg.contains("in [[listener]]"), "{msg}");
        let (line, _, msg) = one_err(&GOOD.replace("upstream = \"chat\"", "upstream = \"chat\"\n  hots = \"x\""));
        assert_eq!(line, 8);
        assert!(msg.contains("in [[listener.route]]; expected one of: host, sni, path_prefix, upstream"), "{msg}");
        let (line, _, msg) = one_err(&GOOD.replace("servers =", "balanse = \"x\"\nservers ="));
        assert_eq!(line, 10);
        assert!(msg.contains("in upstream;"), "{msg}");
    }

    #[test]
    fn missing_required_key() {
        let (line, _, msg) = one_err(&GOOD.replace("bind = \"127.0.0.1:8080\"\n", ""));
        assert!(msg.contains(r#"missing required key "bind""#), "{msg}");
        assert!(line >= 1);
    }

    #[test]
    fn route_to_missing_upstream() {
        let text = format!(
            "{}\n[upstream.api]\nservers = [{{ addr = \"127.0.0.1:9002\" }}]\n",
            GOOD.replace("upstream = \"chat\"", "upstream = \"chatt\"")
        );
        let (line, col, msg) = one_err(&text);
        assert_eq!((line, col), (7, 14));
        assert_eq!(msg, r#"unknown upstream "chatt"; defined upstreams: chat, api"#);
    }

    #[test]
    fn duplicate_bind_points_at_second() {
        let text = format!("{GOOD}\n[[listener]]\nname = \"two\"\nbind = \"127.0.0.1:8080\"\n[[listener.route]]\nupstream = \"chat\"\n");
        let (line, col, msg) = one_err(&text);
        assert_eq!((line, col), (16, 8));
        assert!(msg.starts_with("duplicate bind 127.0.0.1:8080"), "{msg}");
        assert!(msg.contains(r#""public" (line 4)"#), "{msg}");
        // Port 0 may repeat; a wildcard overlaps a specific address on the same port.
        let zero = text.replace(":8080", ":0");
        assert!(load(&zero).is_ok());
        let overlap = text.replacen("127.0.0.1:8080", "0.0.0.0:8080", 1);
        let (line, _, msg) = one_err(&overlap);
        assert_eq!(line, 16);
        assert!(msg.contains("overlaps"), "{msg}");
    }

    #[test]
    fn duplicate_listener_name() {
        let text = format!("{GOOD}\n[[listener]]\nname = \"public\"\nbind = \"127.0.0.1:0\"\n[[listener.route]]\nupstream = \"chat\"\n");
        let (line, col, msg) = one_err(&text);
        assert_eq!((line, col), (15, 8));
        assert!(msg.contains("duplicate listener name"), "{msg}");
    }

    #[test]
    fn empty_servers() {
        let text = GOOD.replace("  { addr = \"127.0.0.1:9001\" },\n", "");
        let (line, col, msg) = one_err(&text);
        assert_eq!((line, col), (10, 11));
        assert!(msg.starts_with(r#"upstream "chat" has no servers"#), "{msg}");
        let text =
            "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:1\"\n[[listener.route]]\nupstream = \"x\"\n[upstream.x]\nkeepalive = 1\n";
        let (line, col, msg) = one_err(text);
        assert_eq!((line, col), (6, 11));
        assert!(msg.starts_with(r#"upstream "x" has no servers"#), "{msg}");
    }

    #[test]
    fn weight_zero() {
        let text = GOOD.replace(r#"{ addr = "127.0.0.1:9001" }"#, r#"{ addr = "127.0.0.1:9001", weight = 0 }"#);
        let (line, col, msg) = one_err(&text);
        assert_eq!((line, col), (11, 39));
        assert!(msg.starts_with("weight must be at least 1"), "{msg}");
        let big = GOOD.replace(r#"{ addr = "127.0.0.1:9001" }"#, r#"{ addr = "127.0.0.1:9001", weight = 10001 }"#);
        assert!(one_err(&big).2.contains("between 1 and 10000"));
    }

    #[test]
    fn bad_duration() {
        let text = format!("shutdown_timeout = \"10 seconds\"\n{GOOD}");
        let (line, col, msg) = one_err(&text);
        assert_eq!((line, col), (1, 20));
        assert_eq!(msg, r#"invalid duration "10 seconds": expected a number followed by ms, s, m, h or d (e.g. "250ms", "10s")"#);
        let zero = GOOD.replace("servers =", "timeouts = { connect = \"0s\" }\nservers =");
        let (line, _, msg) = one_err(&zero);
        assert_eq!(line, 10);
        assert!(msg.contains("connect must be greater than 0"), "{msg}");
    }

    #[test]
    fn bad_address() {
        let text = GOOD.replace(r#""127.0.0.1:9001""#, r#""127.0.0.1""#);
        let (line, col, msg) = one_err(&text);
        assert_eq!((line, col), (11, 12));
        assert!(msg.starts_with(r#"invalid address "127.0.0.1": expected IP:PORT"#), "{msg}");
        let bind = GOOD.replace("127.0.0.1:8080", "127.0.0.1");
        let (line, col, msg) = one_err(&bind);
        assert_eq!((line, col), (4, 8));
        assert!(msg.starts_with(r#"invalid address "127.0.0.1": expected IP:PORT"#), "{msg}");
        for bad in ["::1:9000", "1.2.3:80", "[::1]", "127.0.0.1:99999", "a b:80", ":80", "127.0.0.1:0"] {
            let t = GOOD.replace("127.0.0.1:9001", bad);
            let (line, _, msg) = one_err(&t);
            assert_eq!(line, 11, "{bad}: {msg}");
            assert!(msg.contains("expected"), "{bad}: {msg}");
        }
        let unresolvable = GOOD.replace("127.0.0.1:9001", "no-such-host.invalid:80");
        let (line, _, msg) = one_err(&unresolvable);
        assert_eq!(line, 11);
        assert!(msg.starts_with(r#"cannot resolve "no-such-host.invalid:80""#), "{msg}");
        // Host names are not accepted for bind.
        assert!(one_err(&GOOD.replace("127.0.0.1:8080", "localhost:8080")).2.contains("not allowed"));
    }

    #[test]
    fn collects_all_errors_sorted() {
        let text = r#"shutdown_timeout = "0s"
[[listener]]
name = "a"
bind = "nope"
mode = "udp"
trusted_proxies = ["10.0.0.0/33"]
timeouts = { header_read = "-1s" }
  [[listener.route]]
  host = "example.com:80"
  path_prefix = "ws"
  upstream = "missing"
[[listener]]
name = "b"
bind = "127.0.0.1:1"
[upstream."bad name"]
balance = "fastest"
keepalive = -1
tries = -2
servers = [
  { addr = "127.0.0.1:1", weight = 0, max_fails = -1, fail_timeout = "x", max_conns = -5 },
  { addr = "127.0.0.1:1" },
]
[upstream.allbackup]
servers = [{ addr = "127.0.0.1:1", backup = true }]
[upstream.alldown]
servers = [{ addr = "127.0.0.1:1", down = true }]
"#;
        let e = errs(text);
        let lines: Vec<usize> = e.iter().map(|e| e.0).collect();
        let mut sorted = lines.clone();
        sorted.sort();
        assert_eq!(lines, sorted);
        let expect = [
            (1, "shutdown_timeout must be greater than 0"),
            (4, r#"invalid address "nope""#),
            (5, r#"unknown mode "udp"; expected "http", "tcp" or "tls_passthrough""#),
            (6, "invalid CIDR"),
            (7, r#"invalid duration "-1s""#),
            (9, "must not contain a port"),
            (10, r#"expected a path starting with "/""#),
            (11, r#"unknown upstream "missing"; defined upstreams: bad name, allbackup, alldown"#),
            (12, r#"listener "b" (line 12) has no routes"#),
            (15, r#"invalid upstream name "bad name""#),
            (
                16,
                r#"unknown balance "fastest" in upstream "bad name"; expected one of: round_robin, least_conn, p2c (or random_two), ip_hash, cookie, hash"#,
            ),
            (17, "keepalive must be 0 or more"),
            (18, "tries must be 0 or more"),
            (20, "weight must be at least 1"),
            (20, "max_fails must be 0 or more"),
            (20, r#"invalid duration "x""#),
            (20, "max_conns must be 0 or more"),
            (21, "duplicate server"),
            (23, "no primary server"),
            (25, "all servers are down"),
        ];
        for (line, needle) in expect {
            assert!(e.iter().any(|(l, _, m)| *l == line && m.contains(needle)), "missing line {line}: {needle}\n{e:#?}");
        }
        assert_eq!(e.len(), expect.len(), "{e:#?}");
        let shown = load(text).unwrap_err().to_string();
        assert!(shown.starts_with("t.toml:1:20: shutdown_timeout must be greater than 0"), "{shown}");
        assert_eq!(shown.lines().count(), expect.len());
    }

    #[test]
    fn type_errors_speak_toml() {
        let (line, col, msg) = one_err(&GOOD.replace("bind = \"127.0.0.1:8080\"", "bind = \"127.0.0.1:8080\"\ntimeouts = 5"));
        assert_eq!((line, col), (5, 12));
        assert_eq!(msg, "invalid type: integer `5`, expected a table");
        let (line, _, msg) = one_err(&GOOD.replace("{ addr = \"127.0.0.1:9001\" }", "{ addr = \"127.0.0.1:9001\", weight = \"2\" }"));
        assert_eq!(line, 11);
        assert!(msg.ends_with("expected an integer"), "{msg}");
        let (_, _, msg) = one_err("listener = 5\n");
        assert!(msg.ends_with("expected an array"), "{msg}");
    }

    #[test]
    fn every_prefix_of_reference_config_is_handled() {
        let text = include_str!("../../conf/tidegate.toml");
        for (i, _) in text.char_indices() {
            if let Err(e) = load(&text[..i]) {
                assert!(!e.0.is_empty());
                assert!(e.0.iter().all(|e| !e.message.is_empty()), "{e}");
            }
        }
    }

    #[test]
    fn no_listener() {
        let e = load("").unwrap_err();
        assert_eq!(e.0.len(), 1);
        assert!(e.0[0].message.contains("at least one listener"));
        assert_eq!(e.to_string(), "t.toml: no [[listener]] defined; at least one listener is required");
    }

    #[test]
    fn hosts() {
        assert_eq!(parse_host("Example.com"), Ok(HostMatch::Exact("example.com".into())));
        assert_eq!(parse_host("example.com."), Ok(HostMatch::Exact("example.com".into())));
        assert_eq!(parse_host("*.Example.com"), Ok(HostMatch::Wildcard(".example.com".into())));
        assert_eq!(parse_host("[::1]"), Ok(HostMatch::Exact("[::1]".into())));
        assert_eq!(parse_host("localhost"), Ok(HostMatch::Exact("localhost".into())));
        for bad in [
            "",
            "*",
            "*.",
            "a.*.com",
            "*example.com",
            "**.example.com",
            "ex ample.com",
            "example.com/ws",
            "example.com:80",
            "a..b",
            ".example.com",
            "exämple.com",
            "[zz]",
        ] {
            let e = parse_host(bad).expect_err(bad);
            assert!(e.contains("expected a host name"), "{e}");
        }
    }

    #[test]
    fn line_col_counts_chars() {
        let t = "ab\nçdé\n";
        assert_eq!(line_col(t, 0), (1, 1));
        assert_eq!(line_col(t, 3), (2, 1));
        assert_eq!(line_col(t, 5), (2, 2)); // after 'ç' (2 bytes)
        assert_eq!(line_col(t, 6), (2, 3));
        assert_eq!(line_col(t, 4), (2, 1)); // inside 'ç': clamps back
        assert_eq!(line_col(t, 1000), (3, 1));
        // Unicode before a bad value still gives a character column.
        let text = format!("# ééé\nshutdown_timeout = \"é\"\n{GOOD}");
        let (line, col, _) = one_err(&text);
        assert_eq!((line, col), (2, 20));
    }
}
