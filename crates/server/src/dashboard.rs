//! The dashboard page at `GET /` of the gRPC port, and its assets: files of `web/dist/` embedded
//! in the binary, so the page is the same origin as the gRPC-web calls it makes and needs no
//! CORS. Served without a token (the page asks for one); every call it makes goes through auth.
//!
//! Each file has a strong `ETag` (its content's SHA-256), answers `If-None-Match` with 304, and
//! goes out with `Cache-Control: no-cache` (the browser asks again, and a new binary's page is
//! never stale) and a strict `Content-Security-Policy`: scripts, styles and calls from this origin
//! only, nothing inline. With `--no-dashboard`, and for any other path, a GET is 404. Only GET and
//! HEAD are answered here: gRPC never uses them, and every other request goes on to gRPC.

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use sha2::{Digest, Sha256};

/// The embedded files: (path served, bytes, content type). The first is also served at `/`.
const FILES: &[(&str, &[u8], &str)] = &[
    ("/index.html", include_bytes!("../../../web/dist/index.html"), "text/html; charset=utf-8"),
    ("/app.js", include_bytes!("../../../web/dist/app.js"), "text/javascript; charset=utf-8"),
    ("/app.css", include_bytes!("../../../web/dist/app.css"), "text/css; charset=utf-8"),
];

/// What the page may load and call: this origin's own files and gRPC-web, nothing inline, no
/// frames, no forms.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    connect-src 'self'; img-src 'self' data:; font-src 'self'; base-uri 'none'; form-action 'none'; \
    frame-ancestors 'none'";

/// One embedded file, ready to serve.
#[derive(Debug)]
struct File {
    bytes: Bytes,
    content_type: HeaderValue,
    /// `"<sha256 hex>"`: strong, quoted.
    etag: HeaderValue,
}

/// The embedded files by path, hashed once at start-up.
#[derive(Debug, Clone)]
pub struct Page(Arc<HashMap<&'static str, File>>);

impl Page {
    pub fn embedded() -> Self {
        let files = FILES
            .iter()
            .map(|&(path, bytes, content_type)| {
                let etag = format!("\"{}\"", hex::encode(Sha256::digest(bytes)));
                let file = File {
                    bytes: Bytes::from_static(bytes),
                    content_type: HeaderValue::from_static(content_type),
                    etag: HeaderValue::from_str(&etag).expect("a quoted hex digest is a header value"),
                };
                (path, file)
            })
            .collect();
        Self(Arc::new(files))
    }

    fn file(&self, path: &str) -> Option<&File> {
        let path = if path == "/" { FILES[0].0 } else { path };
        self.0.get(path)
    }

    /// The answer to a GET or HEAD of `path`.
    fn respond(&self, path: &str, headers: &http::HeaderMap, head: bool) -> Response<tonic::body::Body> {
        let Some(file) = self.file(path) else { return text(StatusCode::NOT_FOUND, "not found\n") };
        let fresh = headers.get_all(header::IF_NONE_MATCH).iter().any(|v| matches_etag(v, &file.etag));
        let (status, body) = match (fresh, head) {
            (true, _) => (StatusCode::NOT_MODIFIED, tonic::body::Body::empty()),
            (false, true) => (StatusCode::OK, tonic::body::Body::empty()),
            (false, false) => (StatusCode::OK, tonic::body::Body::new(http_body_util::Full::new(file.bytes.clone()))),
        };
        let mut response = Response::new(body);
        *response.status_mut() = status;
        let h = response.headers_mut();
        h.insert(header::ETAG, file.etag.clone());
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        if status == StatusCode::OK {
            h.insert(header::CONTENT_TYPE, file.content_type.clone());
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(file.bytes.len()));
            h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
            h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
            h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
        }
        response
    }
}

/// Whether an `If-None-Match` value names `etag` (weak comparison, as RFC 9110 asks for it).
fn matches_etag(value: &HeaderValue, etag: &HeaderValue) -> bool {
    let Ok(value) = value.to_str() else { return false };
    let ours = etag.to_str().expect("our ETag is ASCII");
    value.split(',').map(str::trim).any(|tag| tag == "*" || tag.trim_start_matches("W/") == ours)
}

fn text(status: StatusCode, body: &'static str) -> Response<tonic::body::Body> {
    let mut response =
        Response::new(tonic::body::Body::new(http_body_util::Full::new(Bytes::from_static(body.as_bytes()))));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

/// The tower layer that answers GET and HEAD with the page (`None`: `--no-dashboard`, 404).
#[derive(Debug, Clone)]
pub struct ServePage(pub Option<Page>);

impl<S> tower::Layer<S> for ServePage {
    type Service = WithPage<S>;

    fn layer(&self, inner: S) -> WithPage<S> {
        WithPage { inner, page: self.0.clone() }
    }
}

/// A service behind [`ServePage`].
#[derive(Debug, Clone)]
pub struct WithPage<S> {
    inner: S,
    page: Option<Page>,
}

impl<S, B> tower::Service<Request<B>> for WithPage<S>
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
        let head = request.method() == Method::HEAD;
        if !head && request.method() != Method::GET {
            return Box::pin(self.inner.call(request));
        }
        let response = match &self.page {
            Some(page) => page.respond(request.uri().path(), request.headers(), head),
            None => text(StatusCode::NOT_FOUND, "the dashboard is off (--no-dashboard)\n"),
        };
        Box::pin(async move { Ok(response) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(page: &Page, path: &str, if_none_match: Option<&str>) -> Response<tonic::body::Body> {
        let mut headers = http::HeaderMap::new();
        if let Some(tag) = if_none_match {
            headers.insert(header::IF_NONE_MATCH, HeaderValue::from_str(tag).expect("header"));
        }
        page.respond(path, &headers, false)
    }

    /// `/` is the index; each file's ETag is its quoted SHA-256; a matching If-None-Match (also
    /// weak, in a list, or `*`) is 304, another 200; unknown paths are 404.
    #[test]
    fn files_are_served_with_content_hash_etags() {
        let page = Page::embedded();
        let index = get(&page, "/", None);
        assert_eq!(index.status(), StatusCode::OK);
        let etag = index.headers()[header::ETAG].to_str().expect("ascii").to_owned();
        assert_eq!(etag, format!("\"{}\"", hex::encode(Sha256::digest(FILES[0].1))));
        assert_eq!(get(&page, "/index.html", None).headers()[header::ETAG], etag.as_str());
        assert_eq!(index.headers()[header::CONTENT_TYPE], "text/html; charset=utf-8");
        assert!(
            index.headers()[header::CONTENT_SECURITY_POLICY].to_str().expect("ascii").contains("script-src 'self'")
        );
        for tag in [etag.clone(), format!("W/{etag}"), format!("\"other\", {etag}"), "*".into()] {
            assert_eq!(get(&page, "/", Some(&tag)).status(), StatusCode::NOT_MODIFIED, "{tag}");
        }
        assert_eq!(get(&page, "/", Some("\"other\"")).status(), StatusCode::OK);
        assert_ne!(get(&page, "/app.js", None).headers()[header::ETAG], etag.as_str(), "one hash per file");
        assert_eq!(get(&page, "/nope.js", None).status(), StatusCode::NOT_FOUND);
        assert_eq!(get(&page, "/../Cargo.toml", None).status(), StatusCode::NOT_FOUND);
    }
}
