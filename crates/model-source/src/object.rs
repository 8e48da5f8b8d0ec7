//! Object storage: a model under a prefix of an S3 (or S3-compatible), GCS, Azure or HTTP
//! (WebDAV-listable) store, through the `object_store` crate. Locating lists the prefix once; the
//! planner and the readers then read the objects with ranged GETs of exactly the bytes they ask
//! for, written into their own buffers (the load's placement: no temporary file, no whole
//! object buffered). Every GET is pinned to the ETag (and version) listed, so an object that
//! changes mid-load fails the load instead of mixing two versions.
//!
//! `object_store` retries a request that fails before its body (5xx, refused connections) with
//! backoff; a body that breaks or stalls is retried here, from the byte it stopped at, a bounded
//! number of times. Its `get_ranges` would merge neighbouring ranges into one request, so the
//! readers issue their own chunked GETs, as many at once as there are reader threads.

use std::{
    collections::{BTreeMap, HashMap},
    io,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::{StreamExt, TryStreamExt, future::BoxFuture};
use model_id::{ModelId, ModelSource, ObjectUrl, Revision, Scheme};
use object_store::{
    ClientOptions, GetOptions, GetRange, ObjectMeta, ObjectStore, RetryConfig, aws::AmazonS3Builder,
    azure::MicrosoftAzureBuilder, gcp::GoogleCloudStorageBuilder, http::HttpBuilder, path::Path,
};
use resource_manager::sync;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use weights::{ModelFiles, ReadAt};

use crate::{Error, Located, Source, Wanted};

/// The default size of one ranged GET of weights (`--object-chunk`).
pub const DEFAULT_OBJECT_CHUNK: usize = 16 * 1024 * 1024;
/// The default number of ranged GETs in flight for one load (`--object-concurrency`).
pub const DEFAULT_OBJECT_CONCURRENCY: usize = 16;
/// How long a GET may deliver nothing before it is abandoned (`--object-timeout`).
pub const DEFAULT_OBJECT_STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Retries of one chunk whose body broke or stalled, with backoff (requests that fail before
/// their body are retried by `object_store` as well).
const CHUNK_RETRIES: u32 = 4;
/// The most objects a model's prefix may hold: a listing is kept in memory for the load.
const MAX_OBJECTS: usize = 100_000;

/// How object stores are reached.
#[derive(Debug, Clone)]
pub struct ObjectConfig {
    /// The S3-compatible endpoint (`http://127.0.0.1:9000`); else `AWS_ENDPOINT_URL(_S3)` or AWS.
    pub endpoint: Option<String>,
    pub chunk_bytes: usize,
    pub concurrency: usize,
    pub stall_timeout: Duration,
}

impl Default for ObjectConfig {
    fn default() -> Self {
        Self {
            endpoint: None,
            chunk_bytes: DEFAULT_OBJECT_CHUNK,
            concurrency: DEFAULT_OBJECT_CONCURRENCY,
            stall_timeout: DEFAULT_OBJECT_STALL_TIMEOUT,
        }
    }
}

/// How an object-store request failed, for the gRPC code (SPEC §10).
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::Display)]
#[strum(serialize_all = "snake_case")]
pub enum ObjectFailure {
    /// No such object, prefix or bucket.
    NotFound,
    /// No credentials, or credentials the store refused to recognise.
    Unauthenticated,
    /// 403.
    PermissionDenied,
    /// 5xx, timeouts, broken connections, after the retries.
    Unavailable,
    /// An object changed since it was listed (its ETag no longer matches).
    Changed,
    Other,
}

impl ObjectFailure {
    pub fn kind(self) -> &'static str {
        match self {
            Self::NotFound => "object_not_found",
            Self::Unauthenticated => "object_unauthenticated",
            Self::PermissionDenied => "object_permission_denied",
            Self::Unavailable => "object_unavailable",
            Self::Changed => "object_changed",
            Self::Other => "object_other",
        }
    }
}

/// An object-store failure carried through an `io::Error` (the readers' [`ReadAt`] speaks
/// I/O): the loader finds it with [`ObjectError::of`].
#[derive(Debug, thiserror::Error)]
#[error("{reason}")]
pub struct ObjectError {
    pub failure: ObjectFailure,
    pub reason: String,
}

impl ObjectError {
    /// The object-store failure behind an I/O error, if that is what it is.
    pub fn of(e: &io::Error) -> Option<&ObjectError> {
        e.get_ref().and_then(|inner| inner.downcast_ref::<ObjectError>())
    }

    fn into_io(self) -> io::Error {
        io::Error::other(self)
    }
}

/// What an `object_store` error means for a load of `what`.
fn classify(what: &str, e: &object_store::Error) -> ObjectError {
    use object_store::Error as E;
    // object_store's messages stop at reqwest's ("builder error"): the causes say what it was.
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        let said = c.to_string();
        if !text.contains(&said) {
            text.push_str(&format!(": {said}"));
        }
        cause = c.source();
    }
    let failure = match e {
        E::NotFound { .. } => ObjectFailure::NotFound,
        E::Precondition { .. } | E::NotModified { .. } => ObjectFailure::Changed,
        E::PermissionDenied { .. } => ObjectFailure::PermissionDenied,
        E::Unauthenticated { .. } => ObjectFailure::Unauthenticated,
        // A listing's or an unexpected status comes back Generic, its status only in the text:
        // object_store keeps the error that holds it private.
        E::Generic { .. } => match http_status(&text) {
            Some(404) => ObjectFailure::NotFound,
            Some(403) => ObjectFailure::PermissionDenied,
            Some(401) => ObjectFailure::Unauthenticated,
            Some(304 | 412) => ObjectFailure::Changed,
            Some(400..=499) => ObjectFailure::Other,
            // 5xx after the retries, timeouts, refused or broken connections.
            _ => ObjectFailure::Unavailable,
        },
        _ => ObjectFailure::Other,
    };
    let reason = match failure {
        ObjectFailure::Changed => {
            format!("{what} changed while it was being read (its ETag no longer matches): {text}")
        }
        _ => format!("{what}: {text}"),
    };
    ObjectError { failure, reason }
}

/// The HTTP status in an object_store error's text ("... status code: 404 Not Found ...").
fn http_status(text: &str) -> Option<u16> {
    let (_, rest) = text.split_once("status code: ")?;
    rest.get(..3)?.parse().ok()
}

/// Models in object stores, for ids in URL form.
pub struct ObjectSource {
    config: ObjectConfig,
    /// One client per store (scheme and bucket), kept: its connection pool is reused by every
    /// load from that store.
    stores: Mutex<HashMap<(Scheme, String), Arc<dyn ObjectStore>>>,
}

impl ObjectSource {
    pub fn new(config: ObjectConfig) -> Self {
        Self { config, stores: Mutex::new(HashMap::new()) }
    }

    /// The client of `url`'s store, built from the environment's standard settings
    /// (`AWS_*`, `GOOGLE_*`, `AZURE_*`) and ours.
    fn store(&self, url: &ObjectUrl) -> Result<Arc<dyn ObjectStore>, ObjectError> {
        let key = (url.scheme, url.bucket.clone());
        if let Some(store) = sync::lock(&self.stores).get(&key) {
            return Ok(store.clone());
        }
        // Our stall timeout bounds every read; a whole-request timeout would cut a large chunk
        // on a slow link that is still delivering.
        let options = ClientOptions::new().with_timeout_disabled().with_connect_timeout(Duration::from_secs(10));
        let retry = RetryConfig { max_retries: 4, retry_timeout: Duration::from_secs(60), ..RetryConfig::default() };
        let built: Result<Arc<dyn ObjectStore>, object_store::Error> = match url.scheme {
            Scheme::S3 => {
                // Our client options replace those from_env read: AWS_ALLOW_HTTP is read again.
                let allow_http = std::env::var("AWS_ALLOW_HTTP").is_ok_and(|v| v.eq_ignore_ascii_case("true"));
                let mut builder = AmazonS3Builder::from_env()
                    .with_bucket_name(&url.bucket)
                    .with_client_options(options.with_allow_http(allow_http));
                let endpoint = self.config.endpoint.clone().or_else(|| std::env::var("AWS_ENDPOINT_URL_S3").ok());
                if let Some(endpoint) = endpoint {
                    let http = endpoint.starts_with("http://");
                    builder = builder.with_endpoint(endpoint);
                    if http {
                        builder = builder.with_allow_http(true);
                    }
                }
                builder.with_retry(retry).build().map(|s| Arc::new(s) as _)
            }
            // GOOGLE_BASE_URL (object_store's) points at another XML-API endpoint: plain HTTP
            // only when it says so.
            Scheme::Gcs => GoogleCloudStorageBuilder::from_env()
                .with_bucket_name(&url.bucket)
                .with_client_options(
                    options
                        .with_allow_http(std::env::var("GOOGLE_BASE_URL").is_ok_and(|url| url.starts_with("http://"))),
                )
                .with_retry(retry)
                .build()
                .map(|s| Arc::new(s) as _),
            Scheme::Azure => MicrosoftAzureBuilder::from_env()
                .with_container_name(&url.bucket)
                .with_client_options(options)
                .with_retry(retry)
                .build()
                .map(|s| Arc::new(s) as _),
            Scheme::Https | Scheme::Http => HttpBuilder::new()
                .with_url(format!("{}://{}", url.scheme.as_str(), url.bucket))
                .with_client_options(options.with_allow_http(url.scheme == Scheme::Http))
                .with_retry(retry)
                .build()
                .map(|s| Arc::new(s) as _),
        };
        let store = built.map_err(|e| {
            // A store that cannot be configured is missing its credentials or settings.
            ObjectError { failure: ObjectFailure::Unauthenticated, reason: format!("configuring {url}: {e}") }
        })?;
        sync::lock(&self.stores).insert(key, store.clone());
        Ok(store)
    }

    async fn locate_url(&self, url: &ObjectUrl, wanted: &Wanted) -> Result<Located, Error> {
        let store = self.store(url)?;
        let prefix = Path::from(url.prefix.as_str());
        let listing = store.list(if url.prefix.is_empty() { None } else { Some(&prefix) });
        let metas: Vec<ObjectMeta> = tokio::select! {
            listed = tokio::time::timeout(self.config.stall_timeout, listing.take(MAX_OBJECTS + 1).try_collect()) => {
                match listed {
                    Ok(listed) => listed.map_err(|e| classify(&format!("listing {url}"), &e))?,
                    Err(_) => return Err(ObjectError {
                        failure: ObjectFailure::Unavailable,
                        reason: format!("listing {url} did not finish within {:?}", self.config.stall_timeout),
                    }.into()),
                }
            }
            () = wanted.cancel.cancelled() => return Err(weights::Error::Cancelled.into()),
        };
        if metas.len() > MAX_OBJECTS {
            return Err(weights::Error::OverLimit {
                file: url.to_string(),
                what: format!("more than {MAX_OBJECTS} objects under the prefix"),
            }
            .into());
        }
        let mut objects = BTreeMap::new();
        for meta in metas {
            let key = meta.location.as_ref();
            let relative =
                if url.prefix.is_empty() { Some(key) } else { key.strip_prefix(&format!("{}/", url.prefix)) };
            // Keys the listing returns outside the prefix, or that are not plain relative paths,
            // are not the model's files.
            if let Some(relative) = relative.filter(|r| crate::is_relative_path(r)) {
                objects.insert(relative.to_owned(), meta);
            }
        }
        if objects.is_empty() {
            return Err(
                ObjectError { failure: ObjectFailure::NotFound, reason: format!("no objects under {url}") }.into()
            );
        }
        let digest = digest(&objects);
        if wanted.revision != Revision::default() && wanted.revision.as_str() != digest {
            return Err(weights::Error::NotFound(format!(
                "revision {}: the objects under {url} have the digest {digest}",
                wanted.revision.as_str()
            ))
            .into());
        }
        let description = format!("{} objects under {url}, ETag digest {}", objects.len(), &digest[..12]);
        let io = Arc::new(Io {
            runtime: tokio::runtime::Handle::current(),
            cancel: wanted.cancel.clone(),
            stall: self.config.stall_timeout,
        });
        let files = ObjectFiles {
            url: url.clone(),
            store,
            objects,
            io,
            reading: weights::Reading { threads: self.config.concurrency, chunk_bytes: self.config.chunk_bytes },
        };
        Ok(Located {
            files: Arc::new(files),
            source: ModelSource::ObjectStore,
            revision: digest,
            description,
            fetch: None,
        })
    }
}

impl Source for ObjectSource {
    fn locate<'a>(&'a self, wanted: &'a Wanted) -> BoxFuture<'a, Result<Option<Located>, Error>> {
        Box::pin(async move {
            match wanted.id.object_url() {
                Some(url) => self.locate_url(&url, wanted).await.map(Some),
                None => Ok(None),
            }
        })
    }

    fn has(&self, _id: &ModelId, _revision: &Revision) -> bool {
        // Only the store knows, and asking it is a request.
        false
    }

    fn lacks(&self, wanted: &Wanted) -> String {
        format!("{} is not an object-store URL", wanted.id)
    }
}

/// The revision of a model in an object store: sha256 over its objects' paths, sizes and ETags.
fn digest(objects: &BTreeMap<String, ObjectMeta>) -> String {
    let mut hash = Sha256::new();
    for (path, meta) in objects {
        hash.update(path.as_bytes());
        hash.update([0]);
        hash.update(meta.size.to_le_bytes());
        hash.update(meta.e_tag.as_deref().unwrap_or("").as_bytes());
        hash.update([0]);
        hash.update(meta.version.as_deref().unwrap_or("").as_bytes());
        hash.update([0]);
    }
    hex::encode(hash.finalize())
}

/// What every read of one load shares: the runtime the requests run on (readers are plain
/// threads), the load's cancel and the stall bound.
struct Io {
    runtime: tokio::runtime::Handle,
    cancel: CancellationToken,
    stall: Duration,
}

/// The objects under a model's prefix, as listed.
struct ObjectFiles {
    url: ObjectUrl,
    store: Arc<dyn ObjectStore>,
    /// By path relative to the prefix.
    objects: BTreeMap<String, ObjectMeta>,
    io: Arc<Io>,
    reading: weights::Reading,
}

impl ModelFiles for ObjectFiles {
    fn list(&self, dir: &str) -> Result<Vec<String>, weights::Error> {
        let under = if dir.is_empty() { String::new() } else { format!("{dir}/") };
        let mut names: Vec<String> = self
            .objects
            .keys()
            .filter_map(|path| path.strip_prefix(&under))
            .map(|rest| rest.split('/').next().unwrap_or(rest).to_owned())
            .collect();
        // Keys are sorted, names are not quite ("a.json" < "a/b", but "a" < "a.json").
        names.sort();
        names.dedup();
        Ok(names)
    }

    fn is_dir(&self, dir: &str) -> Result<bool, weights::Error> {
        let under = format!("{dir}/");
        Ok(dir.is_empty() || self.objects.range(under.clone()..).next().is_some_and(|(p, _)| p.starts_with(&under)))
    }

    fn open(&self, path: &str) -> Result<Option<Arc<dyn ReadAt>>, weights::Error> {
        let Some(meta) = self.objects.get(path) else { return Ok(None) };
        Ok(Some(Arc::new(ObjectFile {
            shown: format!("{}/{path}", self.url),
            store: self.store.clone(),
            meta: meta.clone(),
            io: self.io.clone(),
        })))
    }

    fn reading(&self) -> Option<weights::Reading> {
        Some(self.reading)
    }
}

/// One object, read with ranged GETs pinned to its listed ETag.
struct ObjectFile {
    /// `s3://bucket/prefix/path`, for messages.
    shown: String,
    store: Arc<dyn ObjectStore>,
    meta: ObjectMeta,
    io: Arc<Io>,
}

impl ReadAt for ObjectFile {
    fn size(&self) -> io::Result<u64> {
        Ok(self.meta.size)
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset.checked_add(buf.len() as u64).filter(|&end| end <= self.meta.size);
        if end.is_none() {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("{} ends first", self.shown)));
        }
        if buf.is_empty() {
            return Ok(());
        }
        // Readers are plain threads (or blocking-pool threads): they wait here for the request.
        self.io.runtime.block_on(self.read_into(buf, offset))
    }
}

impl ObjectFile {
    /// Fills `buf` from `offset`: one GET, and for a body that breaks or stalls, GETs of the rest
    /// after a backoff, up to [`CHUNK_RETRIES`] times.
    async fn read_into(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut filled = 0;
        let mut retries = 0;
        loop {
            match self.get(&mut buf[filled..], offset + filled as u64, &mut filled).await {
                Ok(()) => return Ok(()),
                Err(Retry::No(e)) => return Err(e),
                Err(Retry::Yes(e)) if retries == CHUNK_RETRIES => return Err(e.into_io()),
                Err(Retry::Yes(e)) => {
                    retries += 1;
                    tracing::debug!(object = %self.shown, retries, cause = %e, "retrying a ranged GET");
                    let backoff = Duration::from_millis(100 << retries);
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = self.io.cancel.cancelled() => return Err(cancelled()),
                    }
                }
            }
        }
    }

    /// One ranged GET of `buf.len()` bytes at `offset`, counting what arrived in `filled`.
    async fn get(&self, buf: &mut [u8], offset: u64, filled: &mut usize) -> Result<(), Retry> {
        let range = offset..offset + buf.len() as u64;
        let options = GetOptions::new()
            .with_range(Some(GetRange::Bounded(range)))
            .with_if_match(self.meta.e_tag.clone())
            .with_version(self.meta.version.clone());
        let stalled = || ObjectError {
            failure: ObjectFailure::Unavailable,
            reason: format!("{} sent nothing for {:?}", self.shown, self.io.stall),
        };
        let answer = tokio::select! {
            answer = tokio::time::timeout(self.io.stall, self.store.get_opts(&self.meta.location, options)) => answer,
            () = self.io.cancel.cancelled() => return Err(Retry::No(cancelled())),
        };
        let mut body = match answer {
            Err(_) => return Err(Retry::Yes(stalled())),
            // object_store has retried what was worth retrying: this is its final answer.
            Ok(Err(e)) => return Err(Retry::No(classify(&self.shown, &e).into_io())),
            Ok(Ok(result)) => result.into_stream(),
        };
        let mut at = 0;
        while at < buf.len() {
            let next = tokio::select! {
                next = tokio::time::timeout(self.io.stall, body.next()) => next,
                () = self.io.cancel.cancelled() => return Err(Retry::No(cancelled())),
            };
            let bytes = match next {
                Err(_) => return Err(Retry::Yes(stalled())),
                Ok(None) => {
                    return Err(Retry::Yes(ObjectError {
                        failure: ObjectFailure::Unavailable,
                        reason: format!("{}: the body ended {} bytes early", self.shown, buf.len() - at),
                    }));
                }
                Ok(Some(Err(e))) => return Err(Retry::Yes(classify(&self.shown, &e))),
                Ok(Some(Ok(bytes))) => bytes,
            };
            let Some(to) = buf.get_mut(at..at + bytes.len()) else {
                return Err(Retry::No(
                    ObjectError {
                        failure: ObjectFailure::Other,
                        reason: format!("{}: the store sent more bytes than the range asked for", self.shown),
                    }
                    .into_io(),
                ));
            };
            to.copy_from_slice(&bytes);
            at += bytes.len();
            *filled += bytes.len();
        }
        Ok(())
    }
}

/// Whether a failed GET is worth another try.
enum Retry {
    Yes(ObjectError),
    No(io::Error),
}

fn cancelled() -> io::Error {
    io::Error::new(io::ErrorKind::Interrupted, "the load was cancelled")
}
