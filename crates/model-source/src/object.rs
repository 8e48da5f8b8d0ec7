//! Object storage: a model under a prefix of an S3 (or S3-compatible), GCS, Azure or HTTP
//! (WebDAV-listable) store, through the `object_store` crate. Locating lists the prefix once; the
//! planner and the readers then read the objects with ranged GETs of exactly the bytes they ask
//! for, written into their own buffers (the load's placement: no temporary file, no whole
//! object buffered). Every GET is pinned to the ETag (and version) listed, and every answer's
//! ETag, version, size and `Content-Range` are compared with the listing's, so an object that
//! changes mid-load fails the load instead of mixing two versions, even through a store (or a
//! cache in front of it) that ignores `If-Match`.
//!
//! `object_store` retries a request that fails before its body (5xx, refused connections, but
//! not a refused TLS certificate) with backoff; a body that breaks, stalls or trickles below the
//! minimum throughput is retried here, from the byte it stopped at, a bounded number of times.
//! The first GET of a load that fails for good ends its siblings at once. Its `get_ranges` would
//! merge neighbouring ranges into one request, so the readers issue their own chunked GETs, as
//! many at once as there are reader threads.

use std::{
    collections::{BTreeMap, HashMap},
    io,
    ops::Range,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::{StreamExt, TryStreamExt, future::BoxFuture};
use model_id::{ModelId, ModelSource, ObjectUrl, Revision, Scheme};
use object_store::{
    ClientOptions, GetOptions, GetRange, ObjectMeta, ObjectStore, RetryConfig,
    aws::AmazonS3Builder,
    azure::MicrosoftAzureBuilder,
    gcp::GoogleCloudStorageBuilder,
    http::HttpBuilder,
    list::{PaginatedListOptions, PaginatedListStore},
    path::Path,
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
/// How long a GET may deliver nothing before it is abandoned (`--object-timeout`); also the
/// window over which the minimum throughput is measured.
pub const DEFAULT_OBJECT_STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// The bytes per second a GET must average over each window of the stall timeout
/// (`--object-min-throughput`): below it, a store that trickles is abandoned like a silent one
/// instead of holding the load's slot and reservation for ever.
pub const DEFAULT_OBJECT_MIN_THROUGHPUT: u64 = 16 * 1024;
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
    /// Bytes per second, averaged over each `stall_timeout`; 0: only silence counts.
    pub min_throughput: u64,
}

impl Default for ObjectConfig {
    fn default() -> Self {
        Self {
            endpoint: None,
            chunk_bytes: DEFAULT_OBJECT_CHUNK,
            concurrency: DEFAULT_OBJECT_CONCURRENCY,
            stall_timeout: DEFAULT_OBJECT_STALL_TIMEOUT,
            min_throughput: DEFAULT_OBJECT_MIN_THROUGHPUT,
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
#[derive(Debug, Clone, thiserror::Error)]
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
    stores: Mutex<HashMap<(Scheme, String), Client>>,
}

/// One store's client, and the same client's paginated listing where the store has one (S3, GCS
/// and Azure: it lets a listing step past a key `object_store` cannot parse).
#[derive(Clone)]
struct Client {
    store: Arc<dyn ObjectStore>,
    pages: Option<Arc<dyn PaginatedListStore>>,
}

impl Client {
    fn paged<S: ObjectStore + PaginatedListStore>(store: S) -> Self {
        let store = Arc::new(store);
        Self { store: store.clone(), pages: Some(store) }
    }
}

impl ObjectSource {
    pub fn new(config: ObjectConfig) -> Self {
        Self { config, stores: Mutex::new(HashMap::new()) }
    }

    /// The client of `url`'s store, built from the environment's standard settings
    /// (`AWS_*`, `GOOGLE_*`, `AZURE_*`) and ours.
    fn store(&self, url: &ObjectUrl) -> Result<Client, ObjectError> {
        let key = (url.scheme, url.bucket.clone());
        if let Some(store) = sync::lock(&self.stores).get(&key) {
            return Ok(store.clone());
        }
        // Our stall timeout bounds every read; a whole-request timeout would cut a large chunk
        // on a slow link that is still delivering.
        let options = ClientOptions::new().with_timeout_disabled().with_connect_timeout(Duration::from_secs(10));
        let retry = RetryConfig { max_retries: 4, retry_timeout: Duration::from_secs(60), ..RetryConfig::default() };
        let built: Result<Client, object_store::Error> = match url.scheme {
            Scheme::S3 => {
                // Our client options replace those from_env read: AWS_ALLOW_HTTP is read again.
                let allow_http = std::env::var("AWS_ALLOW_HTTP").is_ok_and(|v| v.eq_ignore_ascii_case("true"));
                let mut builder = AmazonS3Builder::from_env()
                    .with_bucket_name(&url.bucket)
                    .with_client_options(options.with_allow_http(allow_http))
                    .with_http_connector(tls::NoRetryOfRefusedCertificates);
                let endpoint = self.config.endpoint.clone().or_else(|| std::env::var("AWS_ENDPOINT_URL_S3").ok());
                if let Some(endpoint) = endpoint {
                    let http = endpoint.starts_with("http://");
                    builder = builder.with_endpoint(endpoint);
                    if http {
                        builder = builder.with_allow_http(true);
                    }
                }
                builder.with_retry(retry).build().map(Client::paged)
            }
            // GOOGLE_BASE_URL (object_store's) points at another XML-API endpoint: plain HTTP
            // only when it says so.
            Scheme::Gcs => GoogleCloudStorageBuilder::from_env()
                .with_bucket_name(&url.bucket)
                .with_client_options(
                    options
                        .with_allow_http(std::env::var("GOOGLE_BASE_URL").is_ok_and(|url| url.starts_with("http://"))),
                )
                .with_http_connector(tls::NoRetryOfRefusedCertificates)
                .with_retry(retry)
                .build()
                .map(Client::paged),
            Scheme::Azure => MicrosoftAzureBuilder::from_env()
                .with_container_name(&url.bucket)
                .with_client_options(options)
                .with_http_connector(tls::NoRetryOfRefusedCertificates)
                .with_retry(retry)
                .build()
                .map(Client::paged),
            Scheme::Https | Scheme::Http => HttpBuilder::new()
                .with_url(format!("{}://{}", url.scheme.as_str(), url.bucket))
                .with_client_options(options.with_allow_http(url.scheme == Scheme::Http))
                .with_http_connector(tls::NoRetryOfRefusedCertificates)
                .with_retry(retry)
                .build()
                .map(|s| Client { store: Arc::new(s), pages: None }),
        };
        let store = built.map_err(|e| {
            // A store that cannot be configured is missing its credentials or settings.
            ObjectError { failure: ObjectFailure::Unauthenticated, reason: format!("configuring {url}: {e}") }
        })?;
        sync::lock(&self.stores).insert(key, store.clone());
        Ok(store)
    }

    async fn locate_url(&self, url: &ObjectUrl, wanted: &Wanted) -> Result<Located, Error> {
        let client = self.store(url)?;
        let metas: Vec<ObjectMeta> = tokio::select! {
            listed = tokio::time::timeout(self.config.stall_timeout, list(&client, url)) => {
                match listed {
                    Ok(listed) => listed?,
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
            // are not the model's files: a file the plan needs under such a name is missing.
            match relative.filter(|r| crate::is_relative_path(r)) {
                Some(relative) => {
                    objects.insert(relative.to_owned(), meta);
                }
                None => tracing::warn!(key = ?key, "skipping an object whose key is not a plain path under the prefix"),
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
            min_throughput: self.config.min_throughput,
            failed: CancellationToken::new(),
            first_failure: Mutex::new(None),
        });
        let files = ObjectFiles {
            url: url.clone(),
            store: client.store,
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

/// Keys asked for per page of a listing.
const PAGE_KEYS: usize = 1000;
/// Keys `object_store` cannot parse that one listing skips before it gives up.
const MAX_SKIPPED_KEYS: usize = 1000;
/// Empty pages in a row that say there is more, followed before the listing is taken as done.
const EMPTY_PAGES: usize = 3;

/// The objects under `url`'s prefix. A key `object_store` cannot parse (an empty, `.` or `..`
/// segment, a control character: legal in S3) fails the whole page it is on; with a paginated
/// listing, the page is asked for again in halves until that key is alone, and it is skipped
/// (logged), so one odd key beside a model does not break it.
async fn list(client: &Client, url: &ObjectUrl) -> Result<Vec<ObjectMeta>, ObjectError> {
    let what = || format!("listing {url}");
    let Some(pages) = &client.pages else {
        let prefix = Path::from(url.prefix.as_str());
        let listing = client.store.list(if url.prefix.is_empty() { None } else { Some(&prefix) });
        return listing.take(MAX_OBJECTS + 1).try_collect().await.map_err(|e| classify(&what(), &e));
    };
    let prefix = if url.prefix.is_empty() { None } else { Some(format!("{}/", url.prefix)) };
    let mut objects = Vec::new();
    // The last key listed (the pages are asked for after it), and the size of the next page:
    // halved while a page holds a key that cannot be parsed.
    let mut after: Option<String> = None;
    let mut keys = PAGE_KEYS;
    let mut skipped = 0;
    // The store's token for the page after an empty one that says there is more.
    let mut token: Option<String> = None;
    let mut empty_pages = 0;
    while objects.len() <= MAX_OBJECTS {
        let options = PaginatedListOptions {
            offset: after.clone(),
            max_keys: Some(keys),
            page_token: token.take(),
            ..Default::default()
        };
        let page = match pages.list_paginated(prefix.as_deref(), options).await {
            Ok(page) => page,
            Err(e) => match unparsable_key(&e) {
                Some(key) if keys == 1 && skipped < MAX_SKIPPED_KEYS => {
                    tracing::warn!(key = ?key, "skipping an object whose key is not a plain path");
                    skipped += 1;
                    after = Some(key.to_owned());
                    keys = PAGE_KEYS;
                    continue;
                }
                Some(_) if keys > 1 => {
                    keys /= 2;
                    continue;
                }
                _ => return Err(classify(&what(), &e)),
            },
        };
        let more = page.page_token.is_some();
        let Some(last) = page.result.objects.iter().map(|m| m.location.to_string()).max() else {
            // Azure counts the key at its (inclusive) offset in the page, then drops it: a page
            // of one can come back empty with more to come, reached through its token.
            empty_pages += 1;
            match (more, empty_pages) {
                (true, ..=EMPTY_PAGES) => token = page.page_token,
                _ => break,
            }
            continue;
        };
        empty_pages = 0;
        objects.extend(page.result.objects);
        // A key with a trailing '/' (a folder marker) is listed without it: the next page starts
        // after the key as it is stored.
        let next = if Some(&last) > after.as_ref() { last } else { format!("{last}/") };
        if !more || Some(&next) <= after.as_ref() {
            break;
        }
        after = Some(next);
    }
    Ok(objects)
}

/// The key a listing could not parse, if that is why it failed.
fn unparsable_key(e: &object_store::Error) -> Option<&str> {
    use object_store::path::Error as P;
    match e {
        object_store::Error::InvalidPath { source: P::EmptySegment { path } | P::BadSegment { path, .. } } => {
            Some(path)
        }
        _ => None,
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
/// threads), the load's cancel, the stall and throughput bounds, and the first failure.
struct Io {
    runtime: tokio::runtime::Handle,
    cancel: CancellationToken,
    stall: Duration,
    /// Bytes per second each GET must average over every `stall` window; 0: only silence counts.
    min_throughput: u64,
    /// Fired by the first read that fails for good: its siblings stop at once (with its error)
    /// instead of waiting on their own slow requests while the load holds its slot and memory.
    failed: CancellationToken,
    /// That first failure, which the siblings report too.
    first_failure: Mutex<Option<ObjectError>>,
}

impl Io {
    /// Records the load's first failure and stops the other reads.
    fn fail(&self, e: &io::Error) {
        if let Some(e) = ObjectError::of(e) {
            sync::lock(&self.first_failure).get_or_insert_with(|| e.clone());
        }
        self.failed.cancel();
    }

    /// What a read stopped by a sibling's failure says: that failure.
    fn sibling_failed(&self) -> io::Error {
        match sync::lock(&self.first_failure).clone() {
            Some(e) => e.into_io(),
            None => io::Error::other("another read of the load failed"),
        }
    }
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
    /// Fills `buf` from `offset`: one GET, and for a body that breaks, stalls or trickles, GETs of
    /// the rest after a backoff, up to [`CHUNK_RETRIES`] times. A failure for good stops the
    /// load's other reads.
    async fn read_into(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let read = self.read_retrying(buf, offset).await;
        if let Err(e) = &read
            && !self.io.cancel.is_cancelled()
        {
            self.io.fail(e);
        }
        read
    }

    async fn read_retrying(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
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
                        () = self.io.failed.cancelled() => return Err(self.io.sibling_failed()),
                    }
                }
            }
        }
    }

    /// `work`, unless the load is cancelled or another read fails first.
    async fn unless_stopped<T>(&self, work: impl Future<Output = T>) -> Result<T, Retry> {
        tokio::select! {
            done = work => Ok(done),
            () = self.io.cancel.cancelled() => Err(Retry::No(cancelled())),
            () = self.io.failed.cancelled() => Err(Retry::No(self.io.sibling_failed())),
        }
    }

    /// One ranged GET of `buf.len()` bytes at `offset`, counting what arrived in `filled`.
    async fn get(&self, buf: &mut [u8], offset: u64, filled: &mut usize) -> Result<(), Retry> {
        let range = offset..offset + buf.len() as u64;
        let options = GetOptions::new()
            .with_range(Some(GetRange::Bounded(range.clone())))
            .with_if_match(self.meta.e_tag.clone())
            .with_version(self.meta.version.clone());
        let answer =
            self.unless_stopped(tokio::time::timeout(self.io.stall, self.store.get_opts(&self.meta.location, options)));
        let mut body = match answer.await? {
            Err(_) => return Err(Retry::Yes(self.too_slow(0))),
            // object_store has retried what was worth retrying: this is its final answer.
            Ok(Err(e)) => return Err(Retry::No(classify(&self.shown, &e).into_io())),
            Ok(Ok(result)) => {
                self.same_object(&result.meta, &result.range, &range).map_err(|e| Retry::No(e.into_io()))?;
                result.into_stream()
            }
        };
        let mut at = 0;
        // Bytes received in the current window of `stall`, which must reach the minimum.
        let mut window = Window::new(self.io.stall, self.io.min_throughput);
        let mut silent_until = tokio::time::Instant::now() + self.io.stall;
        while at < buf.len() {
            let until = window.end.min(silent_until);
            let next = match self.unless_stopped(tokio::time::timeout_at(until, body.next())).await? {
                Ok(next) => next,
                Err(_) if until == silent_until => return Err(Retry::Yes(self.too_slow(0))),
                Err(_) => match window.next() {
                    Ok(()) => continue,
                    Err(got) => return Err(Retry::Yes(self.too_slow(got))),
                },
            };
            let bytes = match next {
                None => {
                    return Err(Retry::Yes(ObjectError {
                        failure: ObjectFailure::Unavailable,
                        reason: format!("{}: the body ended {} bytes early", self.shown, buf.len() - at),
                    }));
                }
                Some(Err(e)) => return Err(Retry::Yes(classify(&self.shown, &e))),
                Some(Ok(bytes)) => bytes,
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
            window.got(bytes.len());
            silent_until = tokio::time::Instant::now() + self.io.stall;
        }
        Ok(())
    }

    /// The answer to a GET of `asked` is of the object listed: its ETag, version and size, and
    /// the range it says it sent. A store (or a cache in front of it) that ignores `If-Match`
    /// would otherwise mix two versions of the object into one load.
    fn same_object(&self, answered: &ObjectMeta, sent: &Range<u64>, asked: &Range<u64>) -> Result<(), ObjectError> {
        let listed = &self.meta;
        let differs = |what: &str, listed: &dyn std::fmt::Debug, answered: &dyn std::fmt::Debug| ObjectError {
            failure: ObjectFailure::Changed,
            reason: format!(
                "{} changed while it was being read: its {what} was {listed:?} when listed, the store answered {answered:?}",
                self.shown
            ),
        };
        if let Some(etag) = &listed.e_tag
            && answered.e_tag.as_deref().map(bare_etag) != Some(bare_etag(etag))
        {
            return Err(differs("ETag", etag, &answered.e_tag));
        }
        if let Some(version) = &listed.version
            && answered.version.as_ref() != Some(version)
        {
            return Err(differs("version", version, &answered.version));
        }
        if answered.size != listed.size {
            return Err(differs("size", &listed.size, &answered.size));
        }
        // object_store checks the Content-Range against the range asked for; checked again here,
        // so that no store can place bytes at an offset the plan did not ask for.
        if sent != asked {
            return Err(differs("range", asked, sent));
        }
        Ok(())
    }

    /// A GET that sent `got` bytes in its last window of `stall`: nothing, or below the minimum.
    fn too_slow(&self, got: u64) -> ObjectError {
        let reason = if got == 0 {
            format!("{} sent nothing for {:?}", self.shown, self.io.stall)
        } else {
            format!(
                "{} sent {got} bytes in {:?}, below the minimum of {} bytes/s",
                self.shown, self.io.stall, self.io.min_throughput
            )
        };
        ObjectError { failure: ObjectFailure::Unavailable, reason }
    }
}

/// A GET's current window of the stall timeout, and the bytes it brought.
struct Window {
    end: tokio::time::Instant,
    length: Duration,
    /// The bytes a window must bring (at least 1: a silent window is a stall).
    needed: u64,
    got: u64,
}

impl Window {
    fn new(length: Duration, min_throughput: u64) -> Self {
        let needed = u64::try_from(u128::from(min_throughput) * length.as_millis() / 1000).unwrap_or(u64::MAX);
        Self { end: tokio::time::Instant::now() + length, length, needed: needed.max(1), got: 0 }
    }

    fn got(&mut self, bytes: usize) {
        self.got += bytes as u64;
    }

    /// At the window's end: the next one if this one brought enough, else what it brought.
    fn next(&mut self) -> Result<(), u64> {
        if self.got < self.needed {
            return Err(self.got);
        }
        self.end += self.length;
        self.got = 0;
        Ok(())
    }
}

/// An ETag without its weak marker and quotes: listings and GETs of some stores (Azure) quote it
/// differently.
fn bare_etag(etag: &str) -> &str {
    etag.trim_start_matches("W/").trim_matches('"')
}

/// Whether a failed GET is worth another try.
enum Retry {
    Yes(ObjectError),
    No(io::Error),
}

fn cancelled() -> io::Error {
    io::Error::new(io::ErrorKind::Interrupted, "the load was cancelled")
}

/// A store's TLS certificate that the client refuses (an unknown issuer, an expired or
/// mismatched certificate) is not retried: `object_store` retries every connect error with
/// backoff, but another try meets the same certificate.
mod tls {
    use std::{error::Error, future::Future, io, pin::Pin};

    use object_store::{
        ClientOptions,
        client::{
            HttpClient, HttpConnector, HttpError, HttpErrorKind, HttpRequest, HttpResponse, HttpService,
            ReqwestConnector,
        },
    };

    /// object_store's own reqwest client, with refused certificates made final.
    #[derive(Debug, Default, Clone, Copy)]
    pub(super) struct NoRetryOfRefusedCertificates;

    impl HttpConnector for NoRetryOfRefusedCertificates {
        fn connect(&self, options: &ClientOptions) -> object_store::Result<HttpClient> {
            Ok(HttpClient::new(Final(ReqwestConnector::default().connect(options)?)))
        }
    }

    #[derive(Debug)]
    struct Final(HttpClient);

    /// The TLS handshake refused the store: why, to be said once and not retried.
    #[derive(Debug, thiserror::Error)]
    #[error("the TLS handshake with the store failed (its certificate is not trusted, or TLS is not spoken): {0}")]
    struct Refused(#[source] HttpError);

    impl HttpService for Final {
        // What `#[async_trait]` makes of `async fn call`, written out (no macro crate for one impl).
        fn call<'a, 'b>(
            &'a self,
            request: HttpRequest,
        ) -> Pin<Box<dyn Future<Output = Result<HttpResponse, HttpError>> + Send + 'b>>
        where
            'a: 'b,
            Self: 'b,
        {
            Box::pin(async move {
                self.0.execute(request).await.map_err(|e| match e.kind() {
                    HttpErrorKind::Connect if refused_in_handshake(&e) => {
                        HttpError::new(HttpErrorKind::Unknown, Refused(e))
                    }
                    _ => e,
                })
            })
        }
    }

    /// Whether a connect error is a TLS handshake that failed: rustls (through tokio-rustls)
    /// reports every handshake error, a refused certificate among them, as `InvalidData`, which
    /// nothing else on the way to a connection does.
    fn refused_in_handshake(e: &HttpError) -> bool {
        e.source().is_some_and(says_invalid_data)
    }

    /// Whether `e`, or an error under it, is an `InvalidData` I/O error. hyper-rustls wraps the
    /// handshake's error in another I/O error, whose `source` skips it: `get_ref` reaches it.
    fn says_invalid_data(e: &(dyn Error + 'static)) -> bool {
        let mut cause = Some(e);
        while let Some(c) = cause {
            if let Some(io) = c.downcast_ref::<io::Error>() {
                let inner: Option<&(dyn Error + 'static)> = io.get_ref().map(|inner| inner as _);
                if io.kind() == io::ErrorKind::InvalidData || inner.is_some_and(says_invalid_data) {
                    return true;
                }
            }
            cause = c.source();
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use std::{future::Future, pin::Pin};

    use object_store::{
        ListResult,
        list::{PaginatedListOptions, PaginatedListResult, PaginatedListStore},
        memory::InMemory,
    };

    use super::*;

    /// A store's listing as S3 serves it (sorted keys, `start-after`, `max-keys`), or as Azure
    /// does (an inclusive `startFrom` whose key counts in the page and is then dropped, a marker
    /// to go on from), parsed as object_store parses it: a page holding a key it cannot parse
    /// fails whole.
    #[derive(Debug)]
    struct Keys {
        keys: Vec<String>,
        azure: bool,
    }

    impl PaginatedListStore for Keys {
        // What `#[async_trait]` makes of `async fn list_paginated`, written out.
        fn list_paginated<'a, 'b, 'c>(
            &'a self,
            prefix: Option<&'b str>,
            options: PaginatedListOptions,
        ) -> Pin<Box<dyn Future<Output = object_store::Result<PaginatedListResult>> + Send + 'c>>
        where
            'a: 'c,
            'b: 'c,
            Self: 'c,
        {
            let prefix = prefix.unwrap_or("").to_owned();
            let mut keys: Vec<&str> = self.keys.iter().map(String::as_str).filter(|k| k.starts_with(&prefix)).collect();
            keys.sort_unstable();
            let offset = options.offset.unwrap_or_default();
            let page: Vec<&str> = match &options.page_token {
                Some(marker) => keys.into_iter().filter(|k| *k > marker.as_str()).collect(),
                None if self.azure => keys.into_iter().filter(|k| *k >= offset.as_str()).collect(),
                None => keys.into_iter().filter(|k| *k > offset.as_str()).collect(),
            };
            let max = options.max_keys.unwrap_or(1000);
            let more = page.len() > max;
            let mut page = page[..page.len().min(max)].to_vec();
            let token = more.then(|| page.last().map(|k| (*k).to_owned())).flatten();
            if self.azure && options.page_token.is_none() && page.first() == Some(&offset.as_str()) {
                page.remove(0);
            }
            let parsed = page
                .iter()
                .map(|k| {
                    Path::parse(k).map(|location| ObjectMeta {
                        location,
                        last_modified: Default::default(),
                        size: 1,
                        e_tag: Some(format!("\"{k}\"")),
                        version: None,
                    })
                })
                .collect::<Result<Vec<_>, _>>();
            Box::pin(async move {
                let objects = parsed?;
                let result = ListResult { common_prefixes: Vec::new(), objects, extensions: Default::default() };
                Ok(PaginatedListResult { result, page_token: token })
            })
        }
    }

    /// Keys S3 allows but object_store cannot parse (an empty, `.` or `..` segment, a control
    /// character) are skipped, wherever they fall in the pages; every other key is listed once.
    #[tokio::test]
    async fn a_listing_steps_past_keys_it_cannot_parse() {
        let odd = ["m/a//b.txt", "m/./c.txt", "m/x/../d.txt", "m/tab\there", "m/..", "m/zz//last"];
        let good: Vec<String> = (0..2500).map(|i| format!("m/file-{i:04}.json")).collect();
        let mut keys: Vec<String> = odd.iter().map(|k| (*k).to_owned()).chain(good.iter().cloned()).collect();
        keys.push("other/model.safetensors".into());
        for azure in [false, true] {
            let pages = Arc::new(Keys { keys: keys.clone(), azure });
            let client = Client { store: Arc::new(InMemory::new()), pages: Some(pages) };
            let url = ObjectUrl::parse("s3://bucket/m").expect("valid").expect("a URL");
            let listed = list(&client, &url).await.expect("listed");
            let mut names: Vec<String> = listed.iter().map(|m| m.location.to_string()).collect();
            names.sort();
            assert_eq!(names, good, "azure: {azure}");
        }
    }
}
