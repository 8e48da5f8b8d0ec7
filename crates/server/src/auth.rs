//! Bearer-token auth for the `modelloader.v1.ModelLoader` and `inference.GRPCInferenceService`
//! services (`--auth-token-file`): one `role:token` per line, roles `read` (every RPC that changes
//! nothing) and `admin` (also LoadModel, CancelLoad, UnloadModel, RepositoryModelLoad and
//! RepositoryModelUnload). A request without a known token is UNAUTHENTICATED; a `read` token on a
//! mutating RPC is PERMISSION_DENIED. Health, reflection and the v2 ServerLive and ServerReady
//! stay open for probes. The file is read again on SIGHUP (a bad file keeps the tokens in force, with a
//! warning). Tokens are compared by their SHA-256 in constant time and never logged.

use std::{
    future::Future,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, RwLock},
    task::{Context, Poll},
};

use anyhow::Context as _;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::Status;

/// The services the tokens guard, each with its RPCs that change what the server holds; health
/// and reflection are not under them.
const GUARDED: [(&str, &[&str]); 2] = [
    ("/modelloader.v1.ModelLoader/", &["LoadModel", "CancelLoad", "UnloadModel"]),
    ("/inference.GRPCInferenceService/", &["RepositoryModelLoad", "RepositoryModelUnload"]),
];

/// The v2 probes, open like gRPC health (KServe and Triton's own probes ask them).
const OPEN: [&str; 2] = ["/inference.GRPCInferenceService/ServerLive", "/inference.GRPCInferenceService/ServerReady"];

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, strum::EnumString, strum::Display)]
#[strum(serialize_all = "lowercase")]
pub enum Role {
    Read,
    Admin,
}

/// A role and the SHA-256 of its token.
type Digest32 = (Role, [u8; 32]);

/// The tokens in force, shared with the SIGHUP reloader.
#[derive(Debug, Clone)]
pub struct Tokens {
    file: Arc<PathBuf>,
    digests: Arc<RwLock<Vec<Digest32>>>,
}

impl Tokens {
    /// Reads `file`: at start-up a file that does not parse is an error.
    pub fn load(file: &Path) -> anyhow::Result<Self> {
        let digests = read(file)?;
        Ok(Self { file: Arc::new(file.to_owned()), digests: Arc::new(RwLock::new(digests)) })
    }

    /// Reads the file again; on failure the tokens in force stay.
    pub fn reload(&self) {
        match read(&self.file) {
            Ok(digests) => {
                let (admin, read) = (
                    digests.iter().filter(|(r, _)| *r == Role::Admin).count(),
                    digests.iter().filter(|(r, _)| *r == Role::Read).count(),
                );
                *self.digests.write().unwrap_or_else(std::sync::PoisonError::into_inner) = digests;
                tracing::info!(file = %self.file.display(), admin, read, "auth tokens reloaded");
            }
            Err(e) => tracing::warn!(error = %format!("{e:#}"), "auth tokens not reloaded; the previous ones stay"),
        }
    }

    /// The role of `token`. Every known token is compared (no early exit), each in constant time.
    fn role(&self, token: &str) -> Option<Role> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let digests = self.digests.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut found = None;
        for (role, known) in digests.iter() {
            if bool::from(known.ct_eq(&digest)) {
                found = found.max(Some(*role));
            }
        }
        found
    }

    /// Whether the request (`path`, the `authorization` header) may go on.
    fn check(&self, path: &str, authorization: Option<&[u8]>) -> Result<(), Status> {
        let Some((method, mutating)) =
            GUARDED.iter().find_map(|(service, mutating)| Some((path.strip_prefix(service)?, *mutating)))
        else {
            return Ok(());
        };
        if OPEN.contains(&path) {
            return Ok(());
        }
        let token = authorization
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim)
            .ok_or_else(|| Status::unauthenticated("missing credentials: send `authorization: Bearer <token>`"))?;
        let role = self.role(token).ok_or_else(|| Status::unauthenticated("unknown token"))?;
        if role < Role::Admin && mutating.contains(&method) {
            return Err(Status::permission_denied(format!("{method} needs an admin token; this one is {role}")));
        }
        Ok(())
    }
}

/// The token file: `role:token` lines; blank lines and `#` comments skipped.
fn read(file: &Path) -> anyhow::Result<Vec<Digest32>> {
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let mut digests = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        // The line number, never the line: it holds a secret.
        let bad = || anyhow::anyhow!("{} line {}: expected `read:<token>` or `admin:<token>`", file.display(), n + 1);
        let (role, token) = line.split_once(':').ok_or_else(bad)?;
        let role: Role = role.trim().parse().map_err(|_| bad())?;
        let token = token.trim();
        anyhow::ensure!(!token.is_empty(), "{} line {}: the token is empty", file.display(), n + 1);
        digests.push((role, Sha256::digest(token.as_bytes()).into()));
    }
    anyhow::ensure!(!digests.is_empty(), "{} holds no token", file.display());
    Ok(digests)
}

/// Handles every SIGHUP until the process ends: re-reads the tokens, or says nothing is
/// reloadable without them.
pub fn reload_on_sighup(tokens: Option<Tokens>) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangup = signal(SignalKind::hangup()).context("installing a SIGHUP handler")?;
    Ok(tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            match &tokens {
                Some(tokens) => {
                    tracing::info!("SIGHUP received: reloading the auth tokens");
                    tokens.reload();
                }
                None => tracing::info!("SIGHUP received: nothing to reload (no --auth-token-file)"),
            }
        }
    }))
}

/// The tower layer that checks the token of every request to the guarded service.
#[derive(Debug, Clone)]
pub struct RequireToken(pub Option<Tokens>);

impl<S> tower::Layer<S> for RequireToken {
    type Service = Guarded<S>;

    fn layer(&self, inner: S) -> Guarded<S> {
        Guarded { inner, tokens: self.0.clone() }
    }
}

/// A service behind [`RequireToken`].
#[derive(Debug, Clone)]
pub struct Guarded<S> {
    inner: S,
    tokens: Option<Tokens>,
}

impl<S, B> tower::Service<http::Request<B>> for Guarded<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if let Some(tokens) = &self.tokens {
            let authorization = request.headers().get(http::header::AUTHORIZATION).map(|v| v.as_bytes());
            if let Err(status) = tokens.check(request.uri().path(), authorization) {
                metrics::counter!("model_loader_auth_refused_total", "code" => format!("{:?}", status.code()))
                    .increment(1);
                return Box::pin(async move { Ok(status.into_http()) });
            }
        }
        Box::pin(self.inner.call(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(text: &str) -> anyhow::Result<Tokens> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("tokens");
        std::fs::write(&file, text)?;
        Tokens::load(&file)
    }

    #[test]
    fn roles_gate_the_mutating_rpcs_and_leave_the_rest_open() {
        let t = tokens("# operators\nadmin: s3cret\n\nread:viewer\n").expect("tokens");
        let load = "/modelloader.v1.ModelLoader/LoadModel";
        let get = "/modelloader.v1.ModelLoader/GetModel";
        assert!(t.check(load, Some(b"Bearer s3cret")).is_ok());
        assert!(t.check(get, Some(b"Bearer viewer")).is_ok());
        // A model's small files change nothing: a read token reads them.
        for method in ["GetModelFiles", "ReadModelFile", "ListTensors"] {
            let path = format!("/modelloader.v1.ModelLoader/{method}");
            assert!(t.check(&path, Some(b"Bearer viewer")).is_ok(), "{method} with a read token");
        }
        assert_eq!(t.check(load, Some(b"Bearer viewer")).map_err(|s| s.code()), Err(tonic::Code::PermissionDenied));
        assert_eq!(t.check(get, Some(b"Bearer nope")).map_err(|s| s.code()), Err(tonic::Code::Unauthenticated));
        assert_eq!(t.check(get, None).map_err(|s| s.code()), Err(tonic::Code::Unauthenticated));
        assert_eq!(t.check(get, Some(b"s3cret")).map_err(|s| s.code()), Err(tonic::Code::Unauthenticated));
        assert!(t.check("/grpc.health.v1.Health/Check", None).is_ok(), "health stays open");
        assert!(t.check("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", None).is_ok());
    }

    #[test]
    fn the_v2_protocol_is_guarded_the_same_way_except_its_probes() {
        let t = tokens("admin:s3cret\nread:viewer\n").expect("tokens");
        let v2 = |method: &str| format!("/inference.GRPCInferenceService/{method}");
        for method in ["RepositoryModelLoad", "RepositoryModelUnload"] {
            assert!(t.check(&v2(method), Some(b"Bearer s3cret")).is_ok(), "{method} with an admin token");
            let refused = t.check(&v2(method), Some(b"Bearer viewer")).map_err(|s| s.code());
            assert_eq!(refused, Err(tonic::Code::PermissionDenied), "{method} with a read token");
        }
        for method in ["RepositoryIndex", "ModelReady", "ModelMetadata", "ServerMetadata", "ModelInfer"] {
            assert!(t.check(&v2(method), Some(b"Bearer viewer")).is_ok(), "{method} with a read token");
            assert_eq!(t.check(&v2(method), None).map_err(|s| s.code()), Err(tonic::Code::Unauthenticated), "{method}");
        }
        for probe in ["ServerLive", "ServerReady"] {
            assert!(t.check(&v2(probe), None).is_ok(), "{probe} stays open");
        }
    }

    #[test]
    fn a_bad_file_names_the_line_but_never_the_token() {
        let e = tokens("admin:ok\nroot:hunter2\n").expect_err("an unknown role").to_string();
        assert!(e.contains("line 2") && !e.contains("hunter2"), "{e}");
        assert!(tokens("# nothing\n").is_err(), "a file without tokens is refused");
        assert!(tokens("read:\n").is_err(), "an empty token is refused");
    }
}
