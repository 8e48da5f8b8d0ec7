//! The typed Rust client of the `ModelLoader` gRPC API: connecting (http, https with a CA file or
//! mTLS, a bearer token), a load as a stream of typed progress ending in one outcome, and the
//! other calls with typed errors that keep the gRPC code and the server's error kind.
//!
//! Collaborators: `proto` (the generated messages and stubs) and tonic's transport. Used by the
//! CLI, the benchmark and the tests. It must never depend on the server or the test crate, and
//! never reach past the public gRPC API.

mod error;
mod progress;

use std::{
    path::{Path, PathBuf},
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use futures::{Stream, StreamExt};
use tonic::{
    metadata::AsciiMetadataValue,
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

pub use error::Error;
pub use progress::{Phase, Progress};
pub use proto::v1 as pb;

use pb::model_loader_client::ModelLoaderClient;

/// The largest message the client accepts (a ListTensors of a model with many tensors).
const MAX_MESSAGE: usize = 64 << 20;

/// Where and how to connect.
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
    /// `http://host:port`, `https://host:port`, or a bare `host:port` (plain http).
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

    /// A bearer token sent on every call.
    #[must_use]
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// The bearer token from the first line of a file, trimmed.
    pub fn token_file(self, path: impl AsRef<Path>) -> Result<Self, Error> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::bad_argument(format!("cannot read the token file {}: {e}", path.display())))?;
        let token = text.lines().next().unwrap_or_default().trim();
        if token.is_empty() {
            return Err(Error::bad_argument(format!("the token file {} is empty", path.display())));
        }
        Ok(self.token(token))
    }

    /// PEM root certificates for https (without it, the webpki roots).
    #[must_use]
    pub fn ca_file(mut self, path: impl AsRef<Path>) -> Self {
        self.ca_file = Some(path.as_ref().to_owned());
        self
    }

    /// A client certificate and its key (PEM), for servers that require mutual TLS.
    #[must_use]
    pub fn identity(mut self, cert: impl AsRef<Path>, key: impl AsRef<Path>) -> Self {
        self.identity = Some((cert.as_ref().to_owned(), key.as_ref().to_owned()));
        self
    }

    /// How long connecting may take (default 5 s).
    #[must_use]
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.connect_timeout = d;
        self
    }

    /// A deadline for each unary call; streams never get one (a load takes what it takes).
    #[must_use]
    pub fn request_timeout(mut self, d: Option<Duration>) -> Self {
        self.request_timeout = d;
        self
    }

    /// The server's URL as it will be used.
    pub fn server(&self) -> &str {
        &self.server
    }

    fn endpoint(&self) -> Result<Endpoint, Error> {
        let read = |path: &Path, what: &str| {
            std::fs::read(path)
                .map_err(|e| Error::bad_argument(format!("cannot read the {what} {}: {e}", path.display())))
        };
        let mut endpoint = Endpoint::from_shared(self.server.clone())
            .map_err(|e| Error::bad_argument(format!("{} is not a server address: {e}", self.server)))?
            .connect_timeout(self.connect_timeout);
        if self.server.starts_with("https://") {
            let mut tls = ClientTlsConfig::new();
            tls = match &self.ca_file {
                Some(path) => tls.ca_certificate(Certificate::from_pem(read(path, "CA file")?)),
                None => tls.with_webpki_roots(),
            };
            if let Some((cert, key)) = &self.identity {
                tls = tls.identity(Identity::from_pem(read(cert, "certificate")?, read(key, "key")?));
            }
            endpoint = endpoint.tls_config(tls).map_err(|e| Error::bad_argument(format!("bad TLS settings: {e}")))?;
        } else if self.ca_file.is_some() || self.identity.is_some() {
            return Err(Error::bad_argument(format!(
                "a CA file or a client certificate needs an https:// server, not {}",
                self.server
            )));
        }
        Ok(endpoint)
    }
}

/// Adds the bearer token to every call.
#[derive(Debug, Clone, Default)]
pub struct Auth {
    header: Option<AsciiMetadataValue>,
}

impl Interceptor for Auth {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(header) = &self.header {
            request.metadata_mut().insert("authorization", header.clone());
        }
        Ok(request)
    }
}

/// A connected client; cheap to clone (clones share the connection).
#[derive(Debug, Clone)]
pub struct Client {
    inner: ModelLoaderClient<InterceptedService<Channel, Auth>>,
    server: String,
    request_timeout: Option<Duration>,
    list_page_size: u32,
}

/// What to load.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadRequest {
    pub model_id: String,
    pub revision: Option<String>,
    pub device: Option<String>,
    pub dtype: Option<String>,
}

impl LoadRequest {
    /// A load of `model_id` with the server's defaults.
    pub fn new(model_id: impl Into<String>) -> Self {
        Self { model_id: model_id.into(), ..Self::default() }
    }
}

impl Client {
    /// Connects now, so that an unreachable server is an error here (kind `unreachable`).
    pub async fn connect(options: &ConnectOptions) -> Result<Client, Error> {
        let header = match &options.token {
            Some(token) => Some(
                format!("Bearer {token}")
                    .parse::<AsciiMetadataValue>()
                    .map_err(|_| Error::bad_argument("the token is not printable ASCII"))?,
            ),
            None => None,
        };
        let channel = options.endpoint()?.connect().await.map_err(|e| Error::unreachable(&options.server, &e))?;
        let mut client = Self::with_auth(channel, Auth { header }, options.server.clone());
        client.request_timeout = options.request_timeout;
        Ok(client)
    }

    /// A client over a channel made elsewhere, without a token.
    pub fn from_channel(channel: Channel) -> Client {
        Self::with_auth(channel, Auth::default(), String::new())
    }

    fn with_auth(channel: Channel, auth: Auth, server: String) -> Client {
        let inner = ModelLoaderClient::with_interceptor(channel, auth)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        Client { inner, server, request_timeout: None, list_page_size: 0 }
    }

    /// The server's URL this client was connected to (empty for [`Client::from_channel`]).
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The page size [`Client::list`] asks for (0: the server's default).
    #[must_use]
    pub fn list_page_size(mut self, size: u32) -> Self {
        self.list_page_size = size;
        self
    }

    fn unary<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(timeout) = self.request_timeout {
            request.set_timeout(timeout);
        }
        request
    }

    fn error(&self, status: tonic::Status) -> Error {
        Error::from_status(&self.server, status)
    }

    /// Starts (or joins) a load: its progress, then one outcome.
    pub async fn load(&self, request: LoadRequest) -> Result<LoadStream, Error> {
        let message = pb::LoadModelRequest {
            model_id: request.model_id,
            revision: request.revision,
            device: request.device,
            dtype: request.dtype,
        };
        let stream = self.inner.clone().load_model(message).await.map_err(|s| self.error(s))?.into_inner();
        Ok(LoadStream { inner: Some(stream), server: self.server.clone(), last: None })
    }

    /// Every status change and progress of one model, or of all models (`None`).
    pub async fn watch(&self, model_id: Option<&str>) -> Result<WatchStream, Error> {
        let message = pb::WatchModelsRequest { model_id: model_id.unwrap_or_default().to_owned() };
        let stream = self.inner.clone().watch_models(message).await.map_err(|s| self.error(s))?.into_inner();
        Ok(WatchStream { inner: stream, server: self.server.clone() })
    }

    /// Cancels a load in flight; true when one was loading.
    pub async fn cancel(&self, model_id: &str) -> Result<bool, Error> {
        let request = self.unary(pb::CancelLoadRequest { model_id: model_id.to_owned() });
        let response = self.inner.clone().cancel_load(request).await.map_err(|s| self.error(s))?;
        Ok(response.into_inner().was_loading)
    }

    /// Unloads a model (`force`: even with attached clients); true when it was loaded.
    pub async fn unload(&self, model_id: &str, force: bool) -> Result<bool, Error> {
        let request = self.unary(pb::UnloadModelRequest { model_id: model_id.to_owned(), force });
        let response = self.inner.clone().unload_model(request).await.map_err(|s| self.error(s))?;
        Ok(response.into_inner().was_loaded)
    }

    /// The status of one model.
    pub async fn get(&self, model_id: &str) -> Result<pb::ModelStatus, Error> {
        let request = self.unary(pb::GetModelRequest { model_id: model_id.to_owned() });
        let response = self.inner.clone().get_model(request).await.map_err(|s| self.error(s))?;
        Ok(response.into_inner())
    }

    /// Every model the server knows, following every page.
    pub async fn list(&self) -> Result<Vec<pb::ModelStatus>, Error> {
        let mut models = Vec::new();
        let mut page_token = String::new();
        loop {
            let request = self.unary(pb::ListModelsRequest { page_size: self.list_page_size, page_token });
            let page = self.inner.clone().list_models(request).await.map_err(|s| self.error(s))?.into_inner();
            models.extend(page.models);
            if page.next_page_token.is_empty() {
                return Ok(models);
            }
            page_token = page.next_page_token;
        }
    }

    /// Memory per device: budget, used, reserved, and what each model holds.
    pub async fn resources(&self) -> Result<pb::GetResourcesResponse, Error> {
        let request = self.unary(pb::GetResourcesRequest {});
        let response = self.inner.clone().get_resources(request).await.map_err(|s| self.error(s))?;
        Ok(response.into_inner())
    }

    /// The tensors of a loaded model, with their SHA-256 when `checksums`.
    pub async fn tensors(&self, model_id: &str, checksums: bool) -> Result<Vec<pb::TensorInfo>, Error> {
        let request = self.unary(pb::ListTensorsRequest { model_id: model_id.to_owned(), with_checksums: checksums });
        let response = self.inner.clone().list_tensors(request).await.map_err(|s| self.error(s))?;
        Ok(response.into_inner().tensors)
    }
}

/// One item of a load's stream: progress, then exactly one `Finished` as the last item.
#[derive(Debug, Clone)]
pub enum LoadUpdate {
    Progress(Progress),
    Finished(Result<(), Error>),
}

/// The stream of one load ([`LoadUpdate`]s); it ends after `Finished`.
#[derive(Debug)]
pub struct LoadStream {
    inner: Option<tonic::Streaming<pb::ModelLoadProgress>>,
    server: String,
    last: Option<Progress>,
}

impl LoadStream {
    /// Reads the load to its end: the last progress on success, the load's error otherwise.
    pub async fn finish(mut self) -> Result<Progress, Error> {
        while let Some(update) = self.next().await {
            if let LoadUpdate::Finished(outcome) = update {
                outcome?;
                break;
            }
        }
        self.last
            .take()
            .ok_or_else(|| Error::new(tonic::Code::Internal, "internal", "the load ended without any progress"))
    }

    /// The last progress seen.
    pub fn last(&self) -> Option<&Progress> {
        self.last.as_ref()
    }
}

impl Stream for LoadStream {
    type Item = LoadUpdate;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<LoadUpdate>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else { return Poll::Ready(None) };
        let update = match futures::ready!(inner.poll_next_unpin(cx)) {
            Some(Ok(message)) => {
                let progress = Progress::from(message);
                this.last = Some(progress.clone());
                return Poll::Ready(Some(LoadUpdate::Progress(progress)));
            }
            Some(Err(status)) => LoadUpdate::Finished(Err(Error::from_status(&this.server, status))),
            None => LoadUpdate::Finished(Ok(())),
        };
        this.inner = None;
        Poll::Ready(Some(update))
    }
}

/// One event of [`Client::watch`].
#[derive(Debug, Clone)]
pub enum WatchEvent {
    Status(pb::ModelStatus),
    Progress(Progress),
}

/// The stream of [`Client::watch`].
#[derive(Debug)]
pub struct WatchStream {
    inner: tonic::Streaming<pb::ModelEvent>,
    server: String,
}

impl Stream for WatchStream {
    type Item = Result<WatchEvent, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            let event = match futures::ready!(this.inner.poll_next_unpin(cx)) {
                None => return Poll::Ready(None),
                Some(Err(status)) => return Poll::Ready(Some(Err(Error::from_status(&this.server, status)))),
                Some(Ok(event)) => event,
            };
            // An event without a body (a newer server's kind) is skipped, not an error.
            match event.event {
                Some(pb::model_event::Event::Status(s)) => return Poll::Ready(Some(Ok(WatchEvent::Status(s)))),
                Some(pb::model_event::Event::Progress(p)) => {
                    return Poll::Ready(Some(Ok(WatchEvent::Progress(Progress::from(p)))));
                }
                None => {}
            }
        }
    }
}
