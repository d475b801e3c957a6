//! Routing: the first route whose host and path prefix match names the upstream.

use crate::config::{HostMatch, RouteConfig};

#[derive(Debug)]
pub struct Router {
    routes: Vec<RouteConfig>,
}

impl Router {
    pub fn new(routes: &[RouteConfig]) -> Self {
        Self { routes: routes.to_vec() }
    }

    /// `host` is the request's host without port, any case; returns an upstream index.
    pub fn find(&self, host: &str, path: &str) -> Option<usize> {
        self.routes
            .iter()
            .find(|r| {
                r.host.as_ref().is_none_or(|h| host_matches(h, host)) && r.path_prefix.as_deref().is_none_or(|p| path_matches(p, path))
            })
            .map(|r| r.upstream)
    }
}

fn host_matches(m: &HostMatch, host: &str) -> bool {
    match m {
        HostMatch::Exact(name) => host.eq_ignore_ascii_case(name),
        // ".example.com" matches "a.example.com", not "example.com" nor "a.b.example.com".
        HostMatch::Wildcard(suffix) => {
            host.len() > suffix.len()
                && host.is_char_boundary(host.len() - suffix.len())
                && host[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
                && !host[..host.len() - suffix.len()].contains('.')
        }
    }
}

impl Router {
    /// `tls_passthrough`: the first route whose `sni` matches the ClientHello's server name;
    /// a route without `sni` is the default (also for a ClientHello without SNI).
    pub fn find_sni(&self, sni: Option<&str>) -> Option<usize> {
        self.routes
            .iter()
            .find(|r| match (&r.sni, sni) {
                (None, _) => true,
                (Some(m), Some(name)) => host_matches(m, name),
                (Some(_), None) => false,
            })
            .map(|r| r.upstream)
    }
}

/// Plain string prefix, as nginx's `location /prefix` does.
fn path_matches(prefix: &str, path: &str) -> bool {
    path.starts_with(prefix)
}

/// The host part of a `Host` header value: strips the port, keeps IPv6 brackets.
pub fn host_without_port(value: &str) -> &str {
    if value.starts_with('[') {
        return match value.find(']') {
            Some(end) => &value[..=end],
            None => value,
        };
    }
    match value.rfind(':') {
        Some(i) => &value[..i],
        None => value,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(host: Option<HostMatch>, prefix: Option<&str>, upstream: usize) -> RouteConfig {
        RouteConfig { host, sni: None, path_prefix: prefix.map(String::from), upstream }
    }

    #[test]
    fn first_match_wins_and_wildcards_match_one_label() {
        let r = Router::new(&[
            route(Some(HostMatch::Exact("chat.example.com".into())), Some("/ws"), 0),
            route(Some(HostMatch::Wildcard(".example.com".into())), None, 1),
            route(None, Some("/api"), 2),
        ]);
        assert_eq!(r.find("CHAT.example.com", "/ws/room"), Some(0));
        assert_eq!(r.find("chat.example.com", "/other"), Some(1));
        assert_eq!(r.find("a.example.com", "/"), Some(1));
        assert_eq!(r.find("a.b.example.com", "/"), None);
        assert_eq!(r.find("example.com", "/api/x"), Some(2));
        assert_eq!(r.find("other.org", "/"), None);
    }

    #[test]
    fn strips_ports() {
        assert_eq!(host_without_port("a.com:8080"), "a.com");
        assert_eq!(host_without_port("a.com"), "a.com");
        assert_eq!(host_without_port("[::1]:80"), "[::1]");
    }
}
