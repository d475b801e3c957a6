//! A one-screen, human summary of a validated config (`tidegate check`), like `nginx -t`.

use std::fmt::Write as _;

use super::duration::format_duration;
use super::{Balance, Config, HostMatch, ServerConfig};

/// Renders `c` for humans; the last line is `configuration OK`.
pub fn summary(c: &Config) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = write_summary(&mut out, c);
    out
}

fn write_summary(out: &mut String, c: &Config) -> std::fmt::Result {
    writeln!(out, "configuration file {}", c.source.display())?;
    writeln!(out, "shutdown_timeout {}", format_duration(c.shutdown_timeout))?;

    for l in &c.listeners {
        let mode = l.mode.name();
        writeln!(out, "listener {:?} bind {} mode {mode}", l.name, l.bind)?;
        writeln!(
            out,
            "  timeouts: header_read {}, keepalive_idle {}",
            format_duration(l.timeouts.header_read),
            format_duration(l.timeouts.keepalive_idle)
        )?;
        if let Some(t) = &l.tls {
            let min = match t.min_version {
                super::TlsVersion::V1_2 => "1.2",
                super::TlsVersion::V1_3 => "1.3",
            };
            writeln!(
                out,
                "  tls: min_version {min}, alpn {}, handshake_timeout {}",
                t.alpn.join(","),
                format_duration(t.handshake_timeout)
            )?;
            for c in &t.certificates {
                let names = if c.loaded.names.is_empty() { "(no DNS names)".to_string() } else { c.loaded.names.join(" ") };
                let days = c.loaded.expires_in().map_or(String::new(), |s| format!(", expires in {} days", s / 86_400));
                writeln!(out, "    certificate {} [{names}]{}{days}", c.cert.display(), if c.default { " default" } else { "" })?;
            }
        }
        if !l.trusted_proxies.is_empty() {
            let proxies: Vec<String> = l.trusted_proxies.iter().map(ToString::to_string).collect();
            writeln!(out, "  trusted_proxies: {}", proxies.join(", "))?;
        }
        for r in &l.routes {
            let host = match &r.host {
                None => "*".to_string(),
                Some(HostMatch::Exact(h)) => h.clone(),
                Some(HostMatch::Wildcard(suffix)) => format!("*{suffix}"),
            };
            let path = r.path_prefix.as_deref().unwrap_or("/");
            let upstream = c.upstreams.get(r.upstream).map_or("?", |u| u.name.as_str());
            writeln!(out, "  route {host} {path} -> {upstream}")?;
        }
    }

    for (i, u) in c.upstreams.iter().enumerate() {
        let balance = match &u.balance {
            Balance::IpHash(super::IpHashMode::Nginx) => "ip_hash (nginx mode)".to_string(),
            Balance::Cookie(c) => format!("cookie {:?}{}", c.name, if c.secret.is_some() { " (signed)" } else { "" }),
            Balance::Hash(h) => format!("hash key {} bounded_load {}", h.key, h.bounded_load),
            other => other.name().to_string(),
        };
        let tries = if u.tries == 0 { "0 (every server once)".to_string() } else { u.tries.to_string() };
        let routed = c.listeners.iter().flat_map(|l| &l.routes).any(|r| r.upstream == i);
        if let Some(t) = &u.tls {
            writeln!(
                out,
                "upstream {:?} tls: sni {}, ca {}, verify {}",
                u.name,
                t.sni.as_deref().unwrap_or("(server address)"),
                t.ca.as_ref().map_or("(system roots)".to_string(), |p| p.display().to_string()),
                t.verify
            )?;
        }
        writeln!(
            out,
            "upstream {:?} balance {balance} keepalive {} tries {tries}{}",
            u.name,
            u.keepalive,
            if routed { "" } else { " (not routed to)" }
        )?;
        writeln!(
            out,
            "  timeouts: connect {}, response_header {}, tunnel_idle {}",
            format_duration(u.timeouts.connect),
            format_duration(u.timeouts.response_header),
            format_duration(u.timeouts.tunnel_idle)
        )?;
        for s in &u.servers {
            writeln!(out, "  server {}{}", s.addr, server_params(s))?;
        }
    }

    let routes: usize = c.listeners.iter().map(|l| l.routes.len()).sum();
    let servers: usize = c.upstreams.iter().map(|u| u.servers.len()).sum();
    writeln!(
        out,
        "{} {}, {} {}, {} {}, {} {}",
        c.listeners.len(),
        plural(c.listeners.len(), "listener"),
        routes,
        plural(routes, "route"),
        c.upstreams.len(),
        plural(c.upstreams.len(), "upstream"),
        servers,
        plural(servers, "server"),
    )?;
    writeln!(out, "configuration OK")
}

/// The server's non-default parameters, nginx style (` weight=2 backup`).
fn server_params(s: &ServerConfig) -> String {
    let mut p = String::new();
    if s.weight.get() != 1 {
        p.push_str(&format!(" weight={}", s.weight));
    }
    if s.max_fails != 1 {
        p.push_str(&format!(" max_fails={}", s.max_fails));
    }
    if s.fail_timeout != std::time::Duration::from_secs(10) {
        p.push_str(&format!(" fail_timeout={}", format_duration(s.fail_timeout)));
    }
    if s.max_conns != 0 {
        p.push_str(&format!(" max_conns={}", s.max_conns));
    }
    if s.backup {
        p.push_str(" backup");
    }
    if s.down {
        p.push_str(" down");
    }
    p
}

fn plural(n: usize, word: &str) -> String {
    if n == 1 { word.to_string() } else { format!("{word}s") }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn summarises_everything() {
        let text = r#"
[[listener]]
name = "public"
bind = "127.0.0.1:8080"
trusted_proxies = ["10.0.0.0/8"]
  [[listener.route]]
  host = "*.example.com"
  path_prefix = "/ws"
  upstream = "chat"
  [[listener.route]]
  upstream = "api"
[upstream.chat]
servers = [
  { addr = "127.0.0.1:9001" },
  { addr = "127.0.0.1:9002", weight = 2 },
  { addr = "127.0.0.1:9003", backup = true },
  { addr = "127.0.0.1:9004", down = true, max_fails = 3, fail_timeout = "30s", max_conns = 10 },
]
[upstream.api]
servers = [{ addr = "127.0.0.1:9005" }]
[upstream.spare]
servers = [{ addr = "127.0.0.1:9006" }]
"#;
        let c = crate::config::load_str(text, Path::new("x.toml")).unwrap_or_else(|e| panic!("{e}"));
        let s = summary(&c);
        for needle in [
            "configuration file x.toml\n",
            "listener \"public\" bind 127.0.0.1:8080 mode http\n",
            "  trusted_proxies: 10.0.0.0/8\n",
            "  route *.example.com /ws -> chat\n",
            "  route * / -> api\n",
            "upstream \"chat\" balance round_robin keepalive 32 tries 0 (every server once)\n",
            "  server 127.0.0.1:9001\n",
            "  server 127.0.0.1:9002 weight=2\n",
            "  server 127.0.0.1:9003 backup\n",
            "  server 127.0.0.1:9004 max_fails=3 fail_timeout=30s max_conns=10 down\n",
            "upstream \"spare\" balance round_robin keepalive 32 tries 0 (every server once) (not routed to)\n",
            "1 listener, 2 routes, 3 upstreams, 6 servers\n",
        ] {
            assert!(s.contains(needle), "missing {needle:?} in:\n{s}");
        }
        assert!(s.ends_with("configuration OK\n"), "{s}");
        assert!(s.lines().count() < 40);
    }

    #[test]
    fn reference_config_summary() {
        let text = include_str!("../../conf/tidegate.toml");
        let c = crate::config::load_str(text, Path::new("conf/tidegate.toml")).unwrap_or_else(|e| panic!("{e}"));
        let s = summary(&c);
        println!("{s}");
        assert!(s.starts_with("configuration file conf/tidegate.toml\n"), "{s}");
        assert!(s.ends_with("configuration OK\n"), "{s}");
    }
}
