//! Errors on the data path and the status each one answers with (one match, one place).

use std::io;
use std::net::SocketAddr;

use hyper::StatusCode;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    #[error("WebSocket upgrade with an unsupported Sec-WebSocket-Version (only 13)")]
    WebSocketVersion,
    #[error("request body too slow")]
    BodyTooSlow,
    #[error("no route for host {host:?} path {path:?}")]
    NoRoute { host: String, path: String },
    #[error("this listener was removed by a reload")]
    ListenerGone,
    #[error("no server available in upstream {upstream:?}")]
    NoServer { upstream: String },
    #[error("every server of upstream {upstream:?} is at max_conns")]
    AllFull { upstream: String },
    #[error("connect to {addr} failed")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("TLS handshake with {addr} failed")]
    UpstreamTls {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("connect to {addr} timed out")]
    ConnectTimeout { addr: SocketAddr },
    #[error("handshake with {addr} failed")]
    Handshake {
        addr: SocketAddr,
        #[source]
        source: hyper::Error,
    },
    #[error("no response head from {addr} within the response_header timeout")]
    ResponseTimeout { addr: SocketAddr },
    #[error("request to {addr} failed")]
    Upstream {
        addr: SocketAddr,
        #[source]
        source: hyper::Error,
    },
    #[error("bad upgrade response from {addr}: {reason}")]
    BadUpgrade { addr: SocketAddr, reason: &'static str },
    #[error("bad response from {addr}: {reason}")]
    BadResponse { addr: SocketAddr, reason: &'static str },
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::WebSocketVersion => StatusCode::UPGRADE_REQUIRED,
            ProxyError::BodyTooSlow => StatusCode::REQUEST_TIMEOUT,
            ProxyError::NoRoute { .. } => StatusCode::NOT_FOUND,
            ProxyError::AllFull { .. } | ProxyError::NoServer { .. } | ProxyError::ListenerGone => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::ConnectTimeout { .. } | ProxyError::ResponseTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Connect { .. }
            | ProxyError::UpstreamTls { .. }
            | ProxyError::Handshake { .. }
            | ProxyError::Upstream { .. }
            | ProxyError::BadUpgrade { .. }
            | ProxyError::BadResponse { .. } => StatusCode::BAD_GATEWAY,
        }
    }

    /// The request was at fault and the connection should not be trusted further.
    pub fn closes_connection(&self) -> bool {
        matches!(self, ProxyError::BadRequest(_) | ProxyError::ListenerGone | ProxyError::WebSocketVersion | ProxyError::BodyTooSlow)
    }
}
