//! The config file as written: raw serde structs, used only by `validate.rs`.
//!
//! Field order matters: serde's unknown-key message lists fields in declaration order,
//! and `validate.rs` names the table from the first one.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileConfig {
    pub shutdown_timeout: Option<Spanned<String>>,
    pub pid_file: Option<Spanned<String>>,
    pub reload_on_change: Option<bool>,
    pub admin: Option<Spanned<FileAdmin>>,
    pub log: Option<FileLog>,
    #[serde(default)]
    pub listener: Vec<Spanned<FileListener>>,
    /// Keyed by name; file order is recovered from the key spans.
    #[serde(default)]
    pub upstream: BTreeMap<Spanned<String>, FileUpstream>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileListener {
    pub name: Spanned<String>,
    pub bind: Spanned<String>,
    pub mode: Option<Spanned<String>>,
    pub trusted_proxies: Option<Vec<Spanned<String>>>,
    pub timeouts: Option<FileListenerTimeouts>,
    pub tls: Option<Spanned<FileListenerTls>>,
    pub upstream: Option<Spanned<String>>,
    pub accept_proxy: Option<Spanned<bool>>,
    pub max_connections: Option<Spanned<i64>>,
    pub max_connections_per_client: Option<Spanned<i64>>,
    pub header_underscores: Option<Spanned<String>>,
    #[serde(default)]
    pub route: Vec<Spanned<FileRoute>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileListenerTls {
    pub certificates: Spanned<Vec<Spanned<FileCert>>>,
    pub min_version: Option<Spanned<String>>,
    pub alpn: Option<Vec<Spanned<String>>>,
    pub handshake_timeout: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileCert {
    pub cert: Spanned<String>,
    pub key: Spanned<String>,
    pub default: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileUpstreamTls {
    pub enabled: Option<bool>,
    pub sni: Option<Spanned<String>>,
    pub ca: Option<Spanned<String>>,
    pub verify: Option<Spanned<bool>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileListenerTimeouts {
    pub header_read: Option<Spanned<String>>,
    pub keepalive_idle: Option<Spanned<String>>,
    pub body: Option<Spanned<String>>,
    pub body_min_rate: Option<Spanned<i64>>,
    pub send: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileRoute {
    pub host: Option<Spanned<String>>,
    pub sni: Option<Spanned<String>>,
    pub path_prefix: Option<Spanned<String>>,
    pub upstream: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileUpstream {
    pub balance: Option<Spanned<String>>,
    pub ip_hash: Option<Spanned<FileIpHash>>,
    pub cookie: Option<Spanned<FileCookie>>,
    pub hash: Option<Spanned<FileHash>>,
    pub keepalive: Option<Spanned<i64>>,
    pub tries: Option<Spanned<i64>>,
    pub servers: Option<Spanned<Vec<Spanned<FileServer>>>>,
    pub timeouts: Option<FileUpstreamTimeouts>,
    pub tls: Option<Spanned<FileUpstreamTls>>,
    pub health: Option<Spanned<FileHealth>>,
    pub fail_on: Option<Vec<Spanned<toml::Value>>>,
    pub panic_threshold: Option<Spanned<f64>>,
    pub drain_timeout: Option<Spanned<String>>,
    pub drain_spread: Option<Spanned<String>>,
    pub drain_close_code: Option<Spanned<i64>>,
    pub send_proxy: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileHealth {
    pub kind: Option<Spanned<String>>,
    pub path: Option<Spanned<String>>,
    pub host: Option<Spanned<String>>,
    pub expect: Option<Vec<Spanned<i64>>>,
    pub interval: Option<Spanned<String>>,
    pub timeout: Option<Spanned<String>>,
    pub rise: Option<Spanned<i64>>,
    pub fall: Option<Spanned<i64>>,
    pub load: Option<Spanned<String>>,
    pub start_healthy: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileUpstreamTimeouts {
    pub connect: Option<Spanned<String>>,
    pub response_header: Option<Spanned<String>>,
    pub tunnel_idle: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileServer {
    pub addr: Spanned<String>,
    pub weight: Option<Spanned<i64>>,
    pub max_fails: Option<Spanned<i64>>,
    pub fail_timeout: Option<Spanned<String>>,
    pub backup: Option<bool>,
    pub down: Option<bool>,
    pub max_conns: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileIpHash {
    pub mode: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileCookie {
    pub name: Option<Spanned<String>>,
    pub secret: Option<Spanned<String>>,
    pub max_age: Option<Spanned<String>>,
    pub path: Option<Spanned<String>>,
    pub domain: Option<Spanned<String>>,
    pub same_site: Option<Spanned<String>>,
    pub fallback: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileHash {
    pub key: Spanned<String>,
    pub bounded_load: Option<Spanned<f64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileAdmin {
    pub bind: Spanned<String>,
    pub token: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileLog {
    pub format: Option<Spanned<String>>,
}
