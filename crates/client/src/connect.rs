//! How to reach a server: its URL, a bearer token, TLS, timeouts.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use tonic::{
    metadata::AsciiMetadataValue,
    service::Interceptor,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

use crate::Error;

/// Where and how to connect. Files (token, CA, identity) are read when asked for or at connect.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    server: String,
    token: Option<String>,
    ca_file: Option<PathBuf>,
    identity: Option<(PathBuf, PathBuf)>,
    connect_timeout: Duration,
    request_timeout: Option<Duration>,
}

impl ConnectOptions {
    /// `server` is `http://host:port`, `https://host:port`, or a bare `host:port` (plain http).
    pub fn new(server: impl Into<String>) -> Self {
        let server = server.into();
        let server = if server.contains("://") { server } else { format!("http://{server}") };
        Self {
            server,
            token: None,
            ca_file: None,
            identity: None,
            connect_timeout: Duration::from_secs(5),
            request_timeout: None,
        }
    }

    /// A bearer token sent on every call (`authorization: Bearer <token>`).
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// The token from the first line of a file, trimmed (as the server reads its token files).
    pub fn token_file(self, path: impl AsRef<Path>) -> Result<Self, Error> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::bad_argument(format!("reading the token file {}: {e}", path.display())))?;
        let token = text.lines().next().unwrap_or_default().trim();
        if token.is_empty() {
            return Err(Error::bad_argument(format!("the token file {} is empty", path.display())));
        }
        Ok(self.token(token))
    }

    /// PEM roots that an https server's certificate must chain to (else the system's roots).
    pub fn ca_file(mut self, path: impl AsRef<Path>) -> Self {
        self.ca_file = Some(path.as_ref().to_owned());
        self
    }

    /// A PEM certificate and key this client presents to an https server (mutual TLS).
    pub fn identity(mut self, cert: impl AsRef<Path>, key: impl AsRef<Path>) -> Self {
        self.identity = Some((cert.as_ref().to_owned(), key.as_ref().to_owned()));
        self
    }

    /// How long connecting may take (5 s unless set).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long a unary call may wait for its answer (none unless set). Streams never time out:
    /// a load or a watch lasts as long as it lasts.
    pub fn request_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// The server's URL, with its scheme.
    pub fn server(&self) -> &str {
        &self.server
    }

    pub(crate) fn unary_timeout(&self) -> Option<Duration> {
        self.request_timeout
    }

    /// The bearer interceptor of the token, checked once here rather than on every call.
    pub(crate) fn bearer(&self) -> Result<Bearer, Error> {
        let Some(token) = &self.token else { return Ok(Bearer(None)) };
        let value = format!("Bearer {token}")
            .parse::<AsciiMetadataValue>()
            .map_err(|_| Error::bad_argument("the token has characters a gRPC header cannot carry"))?;
        Ok(Bearer(Some(value)))
    }

    /// Connects, with TLS for `https://`.
    pub(crate) async fn channel(&self) -> Result<Channel, Error> {
        let mut endpoint = Endpoint::from_shared(self.server.clone())
            .map_err(|e| Error::bad_argument(format!("the server address {:?} is not a URL: {e}", self.server)))?
            .connect_timeout(self.connect_timeout);
        if self.server.starts_with("https://") {
            endpoint = endpoint.tls_config(self.tls()?).map_err(|e| Error::unreachable(&self.server, &e))?;
        } else if self.ca_file.is_some() || self.identity.is_some() {
            return Err(Error::bad_argument(format!(
                "a CA file or a client certificate needs an https:// server address, not {}",
                self.server
            )));
        }
        endpoint.connect().await.map_err(|e| Error::unreachable(&self.server, &e))
    }

    fn tls(&self) -> Result<ClientTlsConfig, Error> {
        let read = |path: &Path, what: &str| {
            std::fs::read(path).map_err(|e| Error::bad_argument(format!("reading the {what} {}: {e}", path.display())))
        };
        let mut tls = ClientTlsConfig::new();
        tls = match &self.ca_file {
            Some(ca) => tls.ca_certificate(Certificate::from_pem(read(ca, "CA file")?)),
            None => tls.with_native_roots(),
        };
        if let Some((cert, key)) = &self.identity {
            tls = tls.identity(Identity::from_pem(read(cert, "client certificate")?, read(key, "client key")?));
        }
        Ok(tls)
    }
}

/// Adds the bearer token, if any, to every call.
#[derive(Debug, Clone)]
pub struct Bearer(pub(crate) Option<AsciiMetadataValue>);

impl Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bare host:port means plain http; a scheme is kept.
    #[test]
    fn bare_address_is_http() {
        assert_eq!(ConnectOptions::new("127.0.0.1:50051").server(), "http://127.0.0.1:50051");
        assert_eq!(ConnectOptions::new("https://h:1").server(), "https://h:1");
    }

    /// A token file gives its first line, trimmed; an empty one is refused.
    #[test]
    fn token_file_first_line() {
        let dir = std::env::temp_dir().join(format!("client-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a temp dir");
        let file = dir.join("token");
        std::fs::write(&file, "  s3cret \nsecond\n").expect("write");
        let options = ConnectOptions::new("h:1").token_file(&file).expect("a token");
        assert_eq!(options.token.as_deref(), Some("s3cret"));
        std::fs::write(&file, "\n").expect("write");
        let e = ConnectOptions::new("h:1").token_file(&file).expect_err("empty");
        assert_eq!(e.kind(), "bad_argument");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
