//! TLS for the gRPC listener, with rustls: a certificate and key (`--tls-cert`, `--tls-key`), and
//! for mutual TLS the CA that client certificates must chain to (`--tls-client-ca`). The files are
//! read again whenever one of them changes (cert-manager rotates them in place): each handshake
//! looks at their modification times and sizes, and a set that no longer loads keeps the last
//! good configuration, with a warning.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::SystemTime,
};

use anyhow::Context;
use rustls::{
    RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};
use tokio::net::TcpStream;

/// Where the TLS files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Set: clients must present a certificate signed by this CA.
    pub client_ca: Option<PathBuf>,
}

impl TlsFiles {
    fn paths(&self) -> impl Iterator<Item = &Path> {
        [self.cert.as_path(), self.key.as_path()].into_iter().chain(self.client_ca.as_deref())
    }

    /// What identifies the files' current contents without reading them.
    fn stamp(&self) -> Stamp {
        self.paths().map(|p| std::fs::metadata(p).ok().and_then(|m| Some((m.modified().ok()?, m.len())))).collect()
    }

    /// The rustls configuration the files give now.
    fn load(&self) -> anyhow::Result<ServerConfig> {
        let certs = CertificateDer::pem_file_iter(&self.cert)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .with_context(|| format!("reading the certificate chain {}", self.cert.display()))?;
        anyhow::ensure!(!certs.is_empty(), "{} holds no certificate", self.cert.display());
        let key = PrivateKeyDer::from_pem_file(&self.key)
            .with_context(|| format!("reading the private key {}", self.key.display()))?;
        // One provider named, so the choice never depends on which rustls features other crates
        // turned on.
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?;
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                for cert in CertificateDer::pem_file_iter(ca).with_context(|| format!("reading {}", ca.display()))? {
                    roots.add(cert.with_context(|| format!("reading {}", ca.display()))?)?;
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .with_context(|| format!("the client CA {}", ca.display()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder.with_single_cert(certs, key).context("the certificate and key do not match")?;
        // HTTP/1.1 too: browsers' gRPC-web calls and the dashboard page.
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(config)
    }
}

/// What identifies the files' contents: each one's modification time and size.
type Stamp = Vec<Option<(SystemTime, u64)>>;

/// Accepts TLS connections with the files' current configuration.
#[derive(Clone)]
pub struct TlsAcceptor {
    files: Arc<TlsFiles>,
    current: Arc<Mutex<(Stamp, tokio_rustls::TlsAcceptor)>>,
}

impl TlsAcceptor {
    /// Loads the files: at start-up a set that does not load is an error.
    pub fn new(files: TlsFiles) -> anyhow::Result<Self> {
        let stamp = files.stamp();
        let config = files.load()?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        Ok(Self { files: Arc::new(files), current: Arc::new(Mutex::new((stamp, acceptor))) })
    }

    /// The acceptor for `files` if TLS is on (an error names the flags).
    pub fn for_flags(files: Option<TlsFiles>) -> anyhow::Result<Option<Self>> {
        files.map(Self::new).transpose().context("TLS (--tls-cert, --tls-key, --tls-client-ca)")
    }

    /// The acceptor, reloaded first if a file changed.
    fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let mut current = self.current.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let stamp = self.files.stamp();
        if stamp != current.0 {
            match self.files.load() {
                Ok(config) => {
                    tracing::info!(cert = %self.files.cert.display(), "TLS files changed: reloaded");
                    current.1 = tokio_rustls::TlsAcceptor::from(Arc::new(config));
                }
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "TLS files changed but do not load; keeping the last good ones")
                }
            }
            // Recorded either way, so a broken set is reported once, not at every handshake.
            current.0 = stamp;
        }
        current.1.clone()
    }

    /// The TLS handshake on `socket`.
    pub async fn accept(&self, socket: TcpStream) -> std::io::Result<tokio_rustls::server::TlsStream<TcpStream>> {
        self.acceptor().accept(socket).await
    }
}
