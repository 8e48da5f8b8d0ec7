//! gRPC-web's browser side on the gRPC port: which origins may call. Same origin only by default
//! (the dashboard served by this server); `--cors-origin` allows others.
//!
//! A request that carries an `Origin` header (every browser POST, and every CORS preflight) from
//! an origin that is neither the server's own nor allowed is refused with HTTP 403 before
//! anything else sees it: a preflight fails, and so does a request a page sends without one
//! (a `no-cors` POST, which would otherwise reach the service and act, though its page could not
//! read the answer). Requests without `Origin` (grpcurl, tonic, curl) are not browsers' and pass.
//! Allowed origins get their CORS headers from tower-http's `CorsLayer`.
//!
//! The server's own origin counts only when the page reached it by IP address or `localhost`:
//! a page of a DNS name that an attacker points at this address (DNS rebinding) would otherwise
//! be "same origin" with it. Reached by a DNS name, the name's origin goes in `--cors-origin`.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode, header};
use tower_http::cors::{AllowOrigin, CorsLayer};

/// An origin allowed to call from a browser page: `scheme://host[:port]`, lowercase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorsOrigin(String);

/// A `--cors-origin` that is not `http(s)://host[:port]`.
#[derive(Debug, thiserror::Error)]
#[error("not an origin such as https://example.com:8443 (scheme, host and port only): {0}")]
pub struct InvalidOrigin(String);

impl std::str::FromStr for CorsOrigin {
    type Err = InvalidOrigin;

    fn from_str(text: &str) -> Result<Self, InvalidOrigin> {
        let bad = || InvalidOrigin(text.to_owned());
        let trimmed = text.trim().trim_end_matches('/');
        let uri: http::Uri = trimmed.parse().map_err(|_| bad())?;
        let scheme_ok = matches!(uri.scheme_str(), Some("http" | "https"));
        let bare = uri.path_and_query().is_none_or(|p| p.as_str().is_empty() || p.as_str() == "/");
        match uri.authority() {
            Some(authority) if scheme_ok && bare && !authority.as_str().contains('@') => {
                Ok(Self(trimmed.to_ascii_lowercase()))
            }
            _ => Err(bad()),
        }
    }
}

/// Who may call from a browser page, shared by the gate and the CORS layer.
#[derive(Debug, Clone)]
pub struct Origins {
    /// `https` when the port serves TLS: the scheme of the server's own origin.
    scheme: &'static str,
    allowed: Arc<[CorsOrigin]>,
}

impl Origins {
    pub fn new(tls: bool, allowed: &[CorsOrigin]) -> Self {
        Self { scheme: if tls { "https" } else { "http" }, allowed: allowed.into() }
    }

    /// Whether a page of `origin` may call, for a request to `host` (the `Host` header, or the
    /// HTTP/2 `:authority`).
    fn allows(&self, origin: &HeaderValue, host: Option<&str>) -> bool {
        let Ok(origin) = origin.to_str() else { return false };
        let origin = origin.to_ascii_lowercase();
        let own = host
            .filter(|host| by_address(host))
            .is_some_and(|host| origin == format!("{}://{}", self.scheme, host.to_ascii_lowercase()));
        own || self.allowed.iter().any(|a| a.0 == origin)
    }

    fn allows_request(&self, origin: &HeaderValue, parts: &http::request::Parts) -> bool {
        self.allows(origin, host(&parts.headers, &parts.uri))
    }

    /// The CORS headers for allowed origins: preflights answered, gRPC-web's request headers
    /// allowed and its status headers readable by the page.
    pub fn cors(&self) -> CorsLayer {
        let origins = self.clone();
        CorsLayer::new()
            .allow_origin(AllowOrigin::predicate(move |origin, parts| origins.allows_request(origin, parts)))
            .allow_methods([Method::POST])
            .allow_headers([
                header::CONTENT_TYPE,
                header::AUTHORIZATION,
                HeaderName::from_static("x-grpc-web"),
                HeaderName::from_static("x-user-agent"),
                HeaderName::from_static("grpc-timeout"),
            ])
            .expose_headers([
                HeaderName::from_static("grpc-status"),
                HeaderName::from_static("grpc-message"),
                HeaderName::from_static("grpc-status-details-bin"),
            ])
            .max_age(Duration::from_secs(600))
    }
}

/// Whether `host` (`name[:port]`) is an IP address or `localhost`, which no DNS answer can move.
fn by_address(host: &str) -> bool {
    let Ok(authority) = host.parse::<http::uri::Authority>() else { return false };
    let name = authority.host().trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
    name.parse::<std::net::IpAddr>().is_ok() || name == "localhost"
}

/// The host a request was sent to.
fn host<'a>(headers: &'a http::HeaderMap, uri: &'a http::Uri) -> Option<&'a str> {
    headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| uri.authority().map(http::uri::Authority::as_str))
}

/// The tower layer that refuses (403) requests from origins not allowed.
#[derive(Debug, Clone)]
pub struct RequireOrigin(pub Origins);

impl<S> tower::Layer<S> for RequireOrigin {
    type Service = OriginGate<S>;

    fn layer(&self, inner: S) -> OriginGate<S> {
        OriginGate { inner, origins: self.0.clone() }
    }
}

/// A service behind [`RequireOrigin`].
#[derive(Debug, Clone)]
pub struct OriginGate<S> {
    inner: S,
    origins: Origins,
}

impl<S, B> tower::Service<Request<B>> for OriginGate<S>
where
    S: tower::Service<Request<B>, Response = Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        if let Some(origin) = request.headers().get(header::ORIGIN)
            && !self.origins.allows(origin, host(request.headers(), request.uri()))
        {
            metrics::counter!("model_loader_origin_refused_total").increment(1);
            let text = format!(
                "origin {} may not call this server: open the page this server serves, or allow the origin with --cors-origin\n",
                String::from_utf8_lossy(origin.as_bytes())
            );
            let mut response = Response::new(tonic::body::Body::new(text));
            *response.status_mut() = StatusCode::FORBIDDEN;
            response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
            return Box::pin(async move { Ok(response) });
        }
        Box::pin(self.inner.call(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin(text: &str) -> HeaderValue {
        HeaderValue::from_str(text).expect("header")
    }

    /// `--cors-origin` takes `http(s)://host[:port]` only, and compares without case.
    #[test]
    fn origins_parse_strictly() {
        let ok = |t: &str| t.parse::<CorsOrigin>().map(|o| o.0);
        assert_eq!(ok("https://Example.com:8443/").expect("valid"), "https://example.com:8443");
        assert_eq!(ok("http://127.0.0.1:3000").expect("valid"), "http://127.0.0.1:3000");
        for bad in ["example.com", "ftp://example.com", "https://example.com/page", "https://u@example.com", "*", ""] {
            assert!(bad.parse::<CorsOrigin>().is_err(), "{bad:?} is refused");
        }
    }

    /// The server's own origin (its scheme and the request's host) is always allowed; others only
    /// when listed.
    #[test]
    fn own_origin_and_listed_ones_are_allowed() {
        let listed = ["https://ui.example.com".parse().expect("valid")];
        let plain = Origins::new(false, &listed);
        assert!(plain.allows(&origin("http://127.0.0.1:50051"), Some("127.0.0.1:50051")));
        assert!(!plain.allows(&origin("https://127.0.0.1:50051"), Some("127.0.0.1:50051")), "another scheme");
        assert!(!plain.allows(&origin("http://127.0.0.1:50052"), Some("127.0.0.1:50051")), "another port");
        assert!(plain.allows(&origin("https://UI.example.com"), Some("127.0.0.1:50051")));
        assert!(!plain.allows(&origin("https://evil.example.com"), Some("127.0.0.1:50051")));
        assert!(!plain.allows(&origin("null"), Some("127.0.0.1:50051")));
        assert!(!plain.allows(&origin("http://127.0.0.1:50051"), None), "no host: not the own origin");
        assert!(Origins::new(true, &[]).allows(&origin("https://localhost:1"), Some("localhost:1")));
        assert!(plain.allows(&origin("http://[::1]:50051"), Some("[::1]:50051")));
        let rebound = origin("http://attacker.example:50051");
        assert!(!plain.allows(&rebound, Some("attacker.example:50051")), "a DNS name is not trusted as own");
        let named = Origins::new(false, &["http://attacker.example:50051".parse().expect("valid")]);
        assert!(named.allows(&rebound, Some("attacker.example:50051")), "unless listed");
    }
}
