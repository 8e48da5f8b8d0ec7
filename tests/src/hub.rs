//! A local Hugging Face Hub for tests: an HTTP server on `127.0.0.1:0` that serves fixture repos
//! from memory and speaks the part of the Hub's protocol that `huggingface_hub` (Python) and
//! `hf-hub` 1.0 (Rust) use to download models, with counters and fault injection.
//!
//! What it answers, as the real Hub does:
//!
//! - `GET /api/models/{org}/{name}` and `GET /api/models/{org}/{name}/revision/{rev}`: repo info
//!   (`id`, `modelId`, `sha`, `siblings`, `private`, `gated`, …; `?blobs=true` adds sizes and LFS).
//! - `GET /api/models/{org}/{name}/tree/{rev}[/{path}]` (`?recursive=true`): the file listing, with
//!   `lfs: {oid, size, pointerSize}` for LFS files. One page, no `Link` header.
//! - `HEAD`/`GET /{org}/{name}/resolve/{rev}/{path}`: `X-Repo-Commit`, `ETag` and `Content-Length`.
//!   Small files are served directly (`ETag` = quoted git blob sha1). LFS files (`*.safetensors`,
//!   and anything over [`LFS_THRESHOLD`]) get a `302` carrying `ETag`/`X-Linked-Etag` = quoted
//!   sha256 and `X-Linked-Size`, whose `Location` is on a SECOND host name,
//!   `http://localhost:PORT/_lfs/…` (the hub itself is `http://127.0.0.1:PORT`), so clients treat it
//!   as a CDN: they drop `Authorization` there. The store honours single `Range` requests.
//!   `X-Xet-Hash` is never sent, so clients use plain HTTP.
//! - Errors carry `X-Error-Code`: `RepoNotFound` (404, or 401 for a token repo without a token),
//!   `RevisionNotFound` (404), `EntryNotFound` (404, with `X-Repo-Commit`), `GatedRepo` (403).
//!
//! Revisions: a branch or tag name from [`HubRepo::refs`], or a full 40-hex commit id.
//!
//! Counters ([`TestHub::stats`]) count per (repo, file): `heads` (HEAD on `/resolve`), `gets` (the
//! request that serves the file: the store GET for LFS files, the `/resolve` GET for others; every
//! attempt counts, faulted or not), `bytes_sent`, and `range_reads` (a GET of a closed byte range,
//! as a header read ahead of a download: only [`Fault::Status`] applies to it, and it counts in
//! neither `gets` nor `bytes_sent`). [`TestHub::requests`] logs every request.
//! Faults ([`Fault`]) are set and cleared while the hub runs. Nothing here sleeps except the pacing
//! of [`Fault::Slow`]; tests wait with [`TestHub::wait_until`].

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    io,
    path::Path,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use anyhow::Context;
use axum::{
    Router,
    body::{Body, Bytes},
    extract::{Request, State},
    http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header},
    response::Response,
};
use serde_json::{Value, json};
use sha1::Sha1;
use sha2::{Digest, Sha256};
use tokio::{sync::watch, task::JoinHandle};

use crate::WAIT;

/// Files above this size are LFS files whatever their name (the Hub's limit for plain git files).
pub const LFS_THRESHOLD: usize = 10 << 20;

/// The bytes a body is streamed in when no fault paces it.
const CHUNK: usize = 64 << 10;

/// A repo's files at one commit: path (`/`-separated) → content.
pub type Files = BTreeMap<String, Bytes>;

/// Whether the hub stores `path` in LFS: `*.safetensors`, or anything over [`LFS_THRESHOLD`].
pub fn is_lfs(path: &str, len: usize) -> bool {
    path.ends_with(".safetensors") || len > LFS_THRESHOLD
}

/// Lower-case hex sha256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Git's blob id of `data`: `sha1("blob {len}\0" + data)`.
pub fn git_blob_sha1(data: &[u8]) -> String {
    let mut h = Sha1::new();
    h.update(format!("blob {}\0", data.len()).as_bytes());
    h.update(data);
    hex::encode(h.finalize())
}

/// The ETag the hub advertises for a file, unquoted: sha256 for LFS files, git blob sha1 otherwise.
/// It is also the file's blob name in an HF cache (`blobs/<etag>`).
pub fn etag_of(path: &str, data: &[u8]) -> String {
    if is_lfs(path, data.len()) { sha256_hex(data) } else { git_blob_sha1(data) }
}

/// The git-lfs pointer file git stores in place of an LFS file.
fn lfs_pointer(data: &[u8]) -> String {
    format!("version https://git-lfs.github.com/spec/v1\noid sha256:{}\nsize {}\n", sha256_hex(data), data.len())
}

/// A deterministic 40-hex commit id for a set of files (same files, same id).
pub fn commit_id(files: &Files) -> String {
    let mut h = Sha1::new();
    h.update(b"model-loader test hub commit\n");
    for (path, data) in files {
        h.update(format!("{} {} {path}\n", data.len(), etag_of(path, data)).as_bytes());
    }
    hex::encode(h.finalize())
}

/// Reads every file under `dir` (recursively) into [`Files`], keyed by `/`-separated relative path.
pub fn read_dir_files(dir: &Path) -> anyhow::Result<Files> {
    fn walk(root: &Path, dir: &Path, out: &mut Files) -> anyhow::Result<()> {
        let mut entries = std::fs::read_dir(dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .collect::<Result<Vec<_>, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let path = entry.path();
            if entry.file_type()?.is_dir() {
                walk(root, &path, out)?;
            } else {
                let rel = path.strip_prefix(root)?;
                let key = rel.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/");
                let data = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
                out.insert(key, Bytes::from(data));
            }
        }
        Ok(())
    }
    let mut files = Files::new();
    walk(dir, dir, &mut files)?;
    anyhow::ensure!(!files.is_empty(), "no files under {}", dir.display());
    Ok(files)
}

/// Who may read a repo.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Access {
    /// Anyone.
    #[default]
    Public,
    /// Info and tree are public; every file answers `403` with `X-Error-Code: GatedRepo`.
    Gated,
    /// Every request needs `Authorization: Bearer <token>`: without one `401` with
    /// `X-Error-Code: RepoNotFound` (as the Hub answers for private repos), with a wrong one `401`
    /// "Invalid credentials in Authorization header". The LFS store (a CDN) needs none.
    Token(String),
}

/// One model repo: commits (each a full set of files), and branches/tags pointing at them.
#[derive(Debug, Clone)]
pub struct HubRepo {
    /// `org/name`.
    pub id: String,
    /// Commit id → the files at that commit.
    pub commits: BTreeMap<String, Files>,
    /// Branch or tag name → commit id; always has `main`.
    pub refs: BTreeMap<String, String>,
    pub access: Access,
}

impl HubRepo {
    /// A repo whose `main` is one commit of `files`.
    pub fn new<P: Into<String>, B: Into<Bytes>>(id: &str, files: impl IntoIterator<Item = (P, B)>) -> Self {
        let files: Files = files.into_iter().map(|(p, b)| (p.into(), b.into())).collect();
        let commit = commit_id(&files);
        Self {
            id: id.into(),
            commits: BTreeMap::from([(commit.clone(), files)]),
            refs: BTreeMap::from([("main".into(), commit)]),
            access: Access::Public,
        }
    }

    /// A repo whose `main` holds the files of a folder (e.g. one written by [`crate::fixture`]).
    pub fn from_dir(id: &str, dir: &Path) -> anyhow::Result<Self> {
        Ok(Self::new(id, read_dir_files(dir)?))
    }

    /// Adds a commit of `files` and points the branch or tag `name` at it (moving it if it exists,
    /// so `with_revision("main", …)` moves `main` and keeps the old commit reachable by id).
    pub fn with_revision<P: Into<String>, B: Into<Bytes>>(
        mut self,
        name: &str,
        files: impl IntoIterator<Item = (P, B)>,
    ) -> Self {
        let files: Files = files.into_iter().map(|(p, b)| (p.into(), b.into())).collect();
        let commit = commit_id(&files);
        self.commits.insert(commit.clone(), files);
        self.refs.insert(name.into(), commit);
        self
    }

    /// [`HubRepo::with_revision`] with the files of a folder.
    pub fn with_revision_from_dir(self, name: &str, dir: &Path) -> anyhow::Result<Self> {
        Ok(self.with_revision(name, read_dir_files(dir)?))
    }

    /// Points the branch or tag `name` at an existing commit.
    pub fn with_ref(mut self, name: &str, commit: &str) -> Self {
        assert!(self.commits.contains_key(commit), "{}: no commit {commit}", self.id);
        self.refs.insert(name.into(), commit.into());
        self
    }

    pub fn with_access(mut self, access: Access) -> Self {
        self.access = access;
        self
    }

    /// The commit `main` points at.
    pub fn commit(&self) -> &str {
        self.refs.get("main").expect("a repo has a main branch")
    }

    /// The files at `main`.
    pub fn files(&self) -> &Files {
        &self.commits[self.commit()]
    }

    /// The commit and files a revision (branch, tag or full commit id) names.
    pub fn resolve(&self, revision: &str) -> Option<(&str, &Files)> {
        let commit = self.refs.get(revision).map(String::as_str).unwrap_or(revision);
        self.commits.get_key_value(commit).map(|(c, f)| (c.as_str(), f))
    }
}

/// A fault injected for one (repo, file).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The bytes are streamed at about this rate (chunks of a tenth of it, paced). The client may
    /// drop the connection at any time; the body then ends ([`TestHub::active_bodies`]).
    Slow { bytes_per_sec: u64 },
    /// Every request for the file answers this status: HEAD and GET on `/resolve`, and the store.
    /// `404` carries `X-Error-Code: EntryNotFound`.
    Status(u16),
    /// Only the request that would serve the bytes answers this status; HEAD and the redirect are
    /// normal (a download that passed its metadata step then fails).
    BodyStatus(u16),
    /// Headers (with the full `Content-Length`) and half the body, then the connection is closed.
    DropMidBody,
    /// Headers (with the full `Content-Length`) and half the body, then nothing more: the
    /// connection stays open until the client gives up.
    Stall,
    /// The body has the advertised length but its last byte is flipped, so its sha256 (and git
    /// blob sha1) differ from the advertised ETag.
    WrongBytes,
}

impl Fault {
    /// Whether the fault applies to a request that serves the bytes (`body`) or any other one.
    fn applies(&self, body: bool) -> bool {
        match self {
            Fault::Status(_) => true,
            Fault::BodyStatus(_) | Fault::Slow { .. } | Fault::DropMidBody | Fault::Stall | Fault::WrongBytes => body,
        }
    }
}

/// Counters for one (repo, file).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FileStats {
    /// HEAD requests on `/resolve` (a HEAD that follows the redirect to the store is not counted).
    pub heads: u64,
    /// Requests that serve the file (store GET for LFS, `/resolve` GET otherwise), faulted or not;
    /// a resumed download (`Range: bytes=N-`) counts, a ranged read does not.
    pub gets: u64,
    /// Body bytes of those requests handed to the connection.
    pub bytes_sent: u64,
    /// GETs of a closed byte range (`Range: bytes=A-B`): a header read ahead of a download. Only
    /// [`Fault::Status`] applies to them.
    pub range_reads: u64,
}

/// One request the hub received, in arrival order.
#[derive(Debug, Clone)]
pub struct HubRequest {
    pub method: String,
    /// The `Host` header: `127.0.0.1:PORT` for the hub, `localhost:PORT` for the LFS store.
    pub host: String,
    /// Path and query, as sent (percent-encoded).
    pub path: String,
    pub authorization: Option<String>,
    pub range: Option<String>,
    pub status: u16,
}

#[derive(Debug, Clone, Copy)]
struct FaultRule {
    fault: Fault,
    /// How many more requests it applies to; `None`: until cleared.
    remaining: Option<u32>,
}

type Key = (String, String);

struct Shared {
    store_base: String,
    repos: Mutex<BTreeMap<String, HubRepo>>,
    faults: Mutex<HashMap<Key, FaultRule>>,
    stats: Mutex<HashMap<Key, FileStats>>,
    log: Mutex<Vec<HubRequest>>,
    active_bodies: AtomicUsize,
    events: watch::Sender<u64>,
    /// While true, requests to `/api/` are held unanswered (a hub that is slow to resolve).
    api_held: watch::Sender<bool>,
    /// `/api/` requests being held now.
    held_api: AtomicUsize,
}

/// Locks a mutex, ignoring poisoning (a panicking test must not hide the hub's state).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn bump(&self) {
        self.events.send_modify(|n| *n += 1);
    }

    fn stat(&self, key: &Key, f: impl FnOnce(&mut FileStats)) {
        f(lock(&self.stats).entry(key.clone()).or_default());
        self.bump();
    }

    /// The fault for `key` if it applies to this request; consumes one use of a counted fault.
    fn take_fault(&self, key: &Key, body: bool) -> Option<Fault> {
        let mut faults = lock(&self.faults);
        let rule = faults.get_mut(key)?;
        if !rule.fault.applies(body) {
            return None;
        }
        let fault = rule.fault;
        if let Some(n) = rule.remaining.as_mut() {
            *n -= 1;
            if *n == 0 {
                faults.remove(key);
            }
        }
        Some(fault)
    }
}

/// The running hub. Dropping it stops accepting connections.
pub struct TestHub {
    url: String,
    store_url: String,
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

impl TestHub {
    /// Binds `127.0.0.1:0` (and `[::1]` on the same port where it can, so `localhost` works either
    /// way) and serves `repos`.
    pub async fn start(repos: impl IntoIterator<Item = HubRepo>) -> Self {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await.expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("local addr").port();
        let store_url = format!("http://localhost:{port}");
        let shared = Arc::new(Shared {
            store_base: store_url.clone(),
            repos: Mutex::new(repos.into_iter().map(|r| (r.id.clone(), r)).collect()),
            faults: Mutex::default(),
            stats: Mutex::default(),
            log: Mutex::default(),
            active_bodies: AtomicUsize::new(0),
            events: watch::channel(0).0,
            api_held: watch::channel(false).0,
            held_api: AtomicUsize::new(0),
        });
        let app = Router::new().fallback(handle).with_state(shared.clone());
        let mut tasks = Vec::new();
        if let Ok(v6) = tokio::net::TcpListener::bind(("::1", port)).await {
            let app = app.clone();
            tasks.push(tokio::spawn(async move {
                let _ = axum::serve(v6, app).await;
            }));
        }
        tasks.push(tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        }));
        Self { url: format!("http://127.0.0.1:{port}"), store_url, shared, tasks }
    }

    /// The hub's base URL, `http://127.0.0.1:PORT` (what `HF_ENDPOINT` is set to).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The LFS store's base URL, `http://localhost:PORT`: the same server under another host name.
    pub fn store_url(&self) -> &str {
        &self.store_url
    }

    /// Adds a repo, or replaces the one with the same id.
    pub fn put_repo(&self, repo: HubRepo) {
        lock(&self.shared.repos).insert(repo.id.clone(), repo);
    }

    pub fn remove_repo(&self, id: &str) {
        lock(&self.shared.repos).remove(id);
    }

    /// A copy of a repo as the hub now serves it.
    pub fn repo(&self, id: &str) -> HubRepo {
        lock(&self.shared.repos).get(id).cloned().unwrap_or_else(|| panic!("the hub has no repo {id}"))
    }

    pub fn set_access(&self, id: &str, access: Access) {
        lock(&self.shared.repos).get_mut(id).unwrap_or_else(|| panic!("the hub has no repo {id}")).access = access;
    }

    /// Injects `fault` for every request to `file` of `repo` it applies to, until cleared.
    pub fn set_fault(&self, repo: &str, file: &str, fault: Fault) {
        lock(&self.shared.faults).insert((repo.into(), file.into()), FaultRule { fault, remaining: None });
    }

    /// Injects `fault` for the next `times` requests it applies to, then clears it.
    pub fn set_fault_times(&self, repo: &str, file: &str, fault: Fault, times: u32) {
        let mut faults = lock(&self.shared.faults);
        if times == 0 {
            faults.remove(&(repo.into(), file.into()));
        } else {
            faults.insert((repo.into(), file.into()), FaultRule { fault, remaining: Some(times) });
        }
    }

    pub fn clear_fault(&self, repo: &str, file: &str) {
        lock(&self.shared.faults).remove(&(repo.into(), file.into()));
    }

    pub fn clear_faults(&self) {
        lock(&self.shared.faults).clear();
    }

    /// The counters of one (repo, file).
    pub fn stats(&self, repo: &str, file: &str) -> FileStats {
        lock(&self.shared.stats).get(&(repo.into(), file.into())).copied().unwrap_or_default()
    }

    /// Requests that served (or tried to serve) the bytes of `file`; see [`FileStats::gets`].
    pub fn get_count(&self, repo: &str, file: &str) -> u64 {
        self.stats(repo, file).gets
    }

    /// HEAD requests on `/resolve` for `file`.
    pub fn head_count(&self, repo: &str, file: &str) -> u64 {
        self.stats(repo, file).heads
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<HubRequest> {
        lock(&self.shared.log).clone()
    }

    /// Every `Authorization` header value received, in order.
    pub fn authorizations(&self) -> Vec<String> {
        lock(&self.shared.log).iter().filter_map(|r| r.authorization.clone()).collect()
    }

    /// Forgets counters and the request log (faults and repos stay).
    pub fn reset_counters(&self) {
        lock(&self.shared.stats).clear();
        lock(&self.shared.log).clear();
        self.shared.bump();
    }

    /// Holds every `/api/` request (repo info, listings: what resolving a revision asks) without
    /// an answer until [`TestHub::answer_api`]; a client that gives up ends its request.
    pub fn hold_api(&self) {
        self.shared.api_held.send_replace(true);
    }

    /// Lets held `/api/` requests (and later ones) be answered.
    pub fn answer_api(&self) {
        self.shared.api_held.send_replace(false);
    }

    /// `/api/` requests held right now.
    pub fn held_api(&self) -> usize {
        self.shared.held_api.load(Ordering::SeqCst)
    }

    /// Bodies being streamed right now (a body ends when it is sent or the client goes away).
    pub fn active_bodies(&self) -> usize {
        self.shared.active_bodies.load(Ordering::SeqCst)
    }

    /// Waits until `pred` holds, re-checking whenever the hub's state changes (a request, a
    /// chunk sent, a body ended); panics naming `what` after [`WAIT`].
    pub async fn wait_until(&self, what: &str, mut pred: impl FnMut(&Self) -> bool) {
        let mut events = self.shared.events.subscribe();
        let waited = tokio::time::timeout(WAIT, async {
            while !pred(self) {
                if events.changed().await.is_err() {
                    break;
                }
            }
        })
        .await;
        assert!(waited.is_ok(), "the test hub: {what} did not happen within {WAIT:?}");
    }
}

impl Drop for TestHub {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Request handling
// ---------------------------------------------------------------------------------------------

const X_REPO_COMMIT: &str = "x-repo-commit";
const X_LINKED_ETAG: &str = "x-linked-etag";
const X_LINKED_SIZE: &str = "x-linked-size";
const X_ERROR_CODE: &str = "x-error-code";
const X_ERROR_MESSAGE: &str = "x-error-message";

async fn handle(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let method = request.method().clone();
    let headers = request.headers().clone();
    let path_and_query = request.uri().path_and_query().map(|p| p.as_str().to_owned()).unwrap_or_default();
    let path = request.uri().path().to_owned();
    let query = request.uri().query().unwrap_or_default().to_owned();

    if path.starts_with("/api/") {
        hold_while_asked(&shared).await;
    }
    let response = route(&shared, &method, &path, &query, &headers);

    let text = |name: HeaderName| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    lock(&shared.log).push(HubRequest {
        method: method.to_string(),
        host: text(header::HOST).unwrap_or_default(),
        path: path_and_query,
        authorization: text(header::AUTHORIZATION),
        range: text(header::RANGE),
        status: response.status().as_u16(),
    });
    shared.bump();
    response
}

/// Waits while [`TestHub::hold_api`] is in force, counted in `held_api` (also when the client
/// leaves and the request is dropped).
async fn hold_while_asked(shared: &Shared) {
    struct Held<'a>(&'a Shared);
    impl Drop for Held<'_> {
        fn drop(&mut self) {
            self.0.held_api.fetch_sub(1, Ordering::SeqCst);
            self.0.bump();
        }
    }
    let mut held = shared.api_held.subscribe();
    if !*held.borrow_and_update() {
        return;
    }
    shared.held_api.fetch_add(1, Ordering::SeqCst);
    shared.bump();
    let _held = Held(shared);
    let _ = held.wait_for(|on| !*on).await;
}

fn route(shared: &Arc<Shared>, method: &Method, path: &str, query: &str, headers: &HeaderMap) -> Response {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let api = |r: Response| if method == Method::GET || method == Method::HEAD { r } else { not_allowed() };
    match segments.as_slice() {
        ["api", "models", org, name] => api(info(shared, &repo_id(org, name), None, query, headers)),
        ["api", "models", org, name, "revision", rev] => {
            api(info(shared, &repo_id(org, name), Some(&decode(rev)), query, headers))
        }
        ["api", "models", org, name, "tree", rev, rest @ ..] => {
            api(tree(shared, &repo_id(org, name), &decode(rev), &join_decoded(rest), query, headers))
        }
        ["_lfs", org, name, commit, rest @ ..] if !rest.is_empty() => {
            store(shared, method, &repo_id(org, name), commit, &join_decoded(rest), headers)
        }
        [org, name, "resolve", rev, rest @ ..] if !rest.is_empty() => {
            resolve(shared, method, &repo_id(org, name), &decode(rev), &join_decoded(rest), headers)
        }
        _ => error(StatusCode::NOT_FOUND, None, "Sorry, we can't find the page you are looking for."),
    }
}

fn repo_id(org: &str, name: &str) -> String {
    format!("{}/{}", decode(org), decode(name))
}

/// Percent-decodes one path segment (`%2F` becomes `/`, as clients encode revisions that way).
fn decode(segment: &str) -> String {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Decodes path segments and joins them with `/`, dropping empty ones.
fn join_decoded(segments: &[&str]) -> String {
    segments.iter().map(|s| decode(s)).filter(|s| !s.is_empty()).collect::<Vec<_>>().join("/")
}

/// Percent-encodes a `/`-separated path for a URL, keeping the slashes.
fn encode_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for b in path.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Whether `?key=` is `true` (Python sends `True`/`true`, Rust `true`).
fn query_flag(query: &str, key: &str) -> bool {
    query.split('&').filter_map(|kv| kv.split_once('=')).any(|(k, v)| k == key && matches!(v, "true" | "True" | "1"))
}

fn error(status: StatusCode, code: Option<&str>, message: &str) -> Response {
    let mut response = json_response(status, &json!({ "error": message }));
    let h = response.headers_mut();
    if let Some(code) = code {
        h.insert(X_ERROR_CODE, HeaderValue::from_str(code).expect("error code header"));
    }
    h.insert(X_ERROR_MESSAGE, HeaderValue::from_str(message).expect("error message header"));
    response
}

fn not_allowed() -> Response {
    error(StatusCode::METHOD_NOT_ALLOWED, None, "Method not allowed")
}

fn json_response(status: StatusCode, value: &Value) -> Response {
    let body = serde_json::to_vec(value).expect("json");
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json; charset=utf-8")
        .header(header::CONTENT_LENGTH, body.len())
        .body(Body::from(body))
        .expect("response")
}

fn with_header(mut response: Response, name: &'static str, value: &str) -> Response {
    response.headers_mut().insert(name, HeaderValue::from_str(value).expect("header value"));
    response
}

/// The repo, after its access rules: `files` is whether the request reads file contents.
fn find_repo(shared: &Shared, id: &str, headers: &HeaderMap, files: bool) -> Result<HubRepo, Box<Response>> {
    let Some(repo) = lock(&shared.repos).get(id).cloned() else {
        return Err(Box::new(error(StatusCode::NOT_FOUND, Some("RepoNotFound"), "Repository not found")));
    };
    match &repo.access {
        Access::Public => {}
        Access::Gated if files => {
            let message = format!(
                "Access to model {id} is restricted. You must have access to it and be authenticated to access it. Please log in."
            );
            return Err(Box::new(error(StatusCode::FORBIDDEN, Some("GatedRepo"), &message)));
        }
        Access::Gated => {}
        Access::Token(token) => match headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
            None => {
                let refusal = error(StatusCode::UNAUTHORIZED, Some("RepoNotFound"), "Invalid username or password.");
                return Err(Box::new(refusal));
            }
            Some(v) if v.strip_prefix("Bearer ") != Some(token.as_str()) => {
                let refusal = error(StatusCode::UNAUTHORIZED, None, "Invalid credentials in Authorization header");
                return Err(Box::new(refusal));
            }
            Some(_) => {}
        },
    }
    Ok(repo)
}

fn revision_not_found(revision: &str) -> Response {
    error(StatusCode::NOT_FOUND, Some("RevisionNotFound"), &format!("Invalid rev id: {revision}"))
}

/// `GET /api/models/{id}[/revision/{rev}]`.
fn info(shared: &Shared, id: &str, revision: Option<&str>, query: &str, headers: &HeaderMap) -> Response {
    let repo = match find_repo(shared, id, headers, false) {
        Ok(repo) => repo,
        Err(response) => return *response,
    };
    let revision = revision.unwrap_or("main");
    let Some((commit, files)) = repo.resolve(revision) else {
        return revision_not_found(revision);
    };
    let blobs = query_flag(query, "blobs");
    let siblings: Vec<Value> = files
        .iter()
        .map(|(path, data)| {
            let mut sibling = json!({ "rfilename": path });
            if blobs {
                sibling["size"] = json!(data.len());
                sibling["blobId"] = json!(blob_oid(path, data));
                if is_lfs(path, data.len()) {
                    sibling["lfs"] = json!({
                        "size": data.len(),
                        "sha256": sha256_hex(data),
                        "pointerSize": lfs_pointer(data).len(),
                    });
                }
            }
            sibling
        })
        .collect();
    let (author, _) = id.split_once('/').unwrap_or(("", id));
    json_response(
        StatusCode::OK,
        &json!({
            "_id": &git_blob_sha1(id.as_bytes())[..24],
            "id": id,
            "modelId": id,
            "author": author,
            "sha": commit,
            "lastModified": "2024-01-01T00:00:00.000Z",
            "createdAt": "2024-01-01T00:00:00.000Z",
            "private": matches!(repo.access, Access::Token(_)),
            "gated": if repo.access == Access::Gated { json!("auto") } else { json!(false) },
            "disabled": false,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
        }),
    )
}

/// The git object id of a file as stored in git: the blob itself, or its LFS pointer.
fn blob_oid(path: &str, data: &[u8]) -> String {
    if is_lfs(path, data.len()) { git_blob_sha1(lfs_pointer(data).as_bytes()) } else { git_blob_sha1(data) }
}

/// `GET /api/models/{id}/tree/{rev}[/{dir}]`.
fn tree(shared: &Shared, id: &str, revision: &str, dir: &str, query: &str, headers: &HeaderMap) -> Response {
    let repo = match find_repo(shared, id, headers, false) {
        Ok(repo) => repo,
        Err(response) => return *response,
    };
    let Some((_, files)) = repo.resolve(revision) else {
        return revision_not_found(revision);
    };
    let recursive = query_flag(query, "recursive");
    let prefix = if dir.is_empty() { String::new() } else { format!("{dir}/") };
    let mut dirs = BTreeSet::new();
    let mut entries = Vec::new();
    for (path, data) in files.range(prefix.clone()..).take_while(|(p, _)| p.starts_with(&prefix)) {
        let rel = &path[prefix.len()..];
        let parts: Vec<&str> = rel.split('/').collect();
        let dir_levels = if recursive { parts.len() - 1 } else { (parts.len() - 1).min(1) };
        for level in 1..=dir_levels {
            dirs.insert(format!("{prefix}{}", parts[..level].join("/")));
        }
        if recursive || parts.len() == 1 {
            let mut entry = json!({ "type": "file", "oid": blob_oid(path, data), "size": data.len(), "path": path });
            if is_lfs(path, data.len()) {
                entry["lfs"] =
                    json!({ "oid": sha256_hex(data), "size": data.len(), "pointerSize": lfs_pointer(data).len() });
            }
            entries.push(entry);
        }
    }
    if !dir.is_empty() && entries.is_empty() && dirs.is_empty() {
        return error(StatusCode::NOT_FOUND, Some("EntryNotFound"), &format!("{dir} does not exist on \"{revision}\""));
    }
    let mut listing: Vec<Value> = dirs
        .iter()
        .map(|d| json!({ "type": "directory", "oid": git_blob_sha1(format!("tree {d}").as_bytes()), "size": 0, "path": d }))
        .collect();
    listing.extend(entries);
    json_response(StatusCode::OK, &Value::Array(listing))
}

/// The response a `Status` fault gives.
fn fault_status(code: u16, commit: &str) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let response = match code {
        404 => error(status, Some("EntryNotFound"), "Entry not found (injected fault)"),
        401 => error(status, None, "Invalid username or password. (injected fault)"),
        _ => error(status, None, &format!("injected fault: {code}")),
    };
    with_header(response, X_REPO_COMMIT, commit)
}

/// `HEAD`/`GET /{id}/resolve/{rev}/{path}`.
fn resolve(
    shared: &Arc<Shared>,
    method: &Method,
    id: &str,
    revision: &str,
    path: &str,
    headers: &HeaderMap,
) -> Response {
    if method != Method::GET && method != Method::HEAD {
        return not_allowed();
    }
    let repo = match find_repo(shared, id, headers, true) {
        Ok(repo) => repo,
        Err(response) => return *response,
    };
    let Some((commit, files)) = repo.resolve(revision) else {
        return revision_not_found(revision);
    };
    let Some(data) = files.get(path).cloned() else {
        let response =
            error(StatusCode::NOT_FOUND, Some("EntryNotFound"), &format!("{path} does not exist on \"{revision}\""));
        return with_header(response, X_REPO_COMMIT, commit);
    };
    let key: Key = (id.into(), path.into());
    let head = method == Method::HEAD;
    if head {
        shared.stat(&key, |s| s.heads += 1);
    }
    let lfs = is_lfs(path, data.len());
    let read = !head && !lfs && is_range_read(headers);
    let serves_body = !head && !lfs && !read;
    if serves_body {
        shared.stat(&key, |s| s.gets += 1);
    } else if read {
        shared.stat(&key, |s| s.range_reads += 1);
    }
    if let Some(fault) = shared.take_fault(&key, serves_body) {
        match fault {
            Fault::Status(code) | Fault::BodyStatus(code) => return fault_status(code, commit),
            body_fault if serves_body => {
                let response = serve_bytes(shared, key, data.clone(), headers, Some(body_fault));
                let response = with_header(response, header::ETAG.as_str(), &format!("\"{}\"", git_blob_sha1(&data)));
                return with_header(response, X_REPO_COMMIT, commit);
            }
            _ => {}
        }
    }
    if lfs {
        let sha = format!("\"{}\"", sha256_hex(&data));
        let location = format!("{}/_lfs/{}/{commit}/{}", shared.store_base, encode_path(id), encode_path(path));
        let body = format!("Found. Redirecting to {location}");
        return Response::builder()
            .status(StatusCode::FOUND)
            .header(header::LOCATION, &location)
            .header(X_REPO_COMMIT, commit)
            .header(header::ETAG, &sha)
            .header(X_LINKED_ETAG, &sha)
            .header(X_LINKED_SIZE, data.len())
            .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .header(header::CONTENT_LENGTH, body.len())
            .body(Body::from(body))
            .expect("response");
    }
    let etag = format!("\"{}\"", git_blob_sha1(&data));
    let response = if head {
        Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_LENGTH, data.len())
            .header(header::ACCEPT_RANGES, "bytes")
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .body(Body::empty())
            .expect("response")
    } else {
        serve_bytes(shared, key, data, headers, None)
    };
    with_header(with_header(response, header::ETAG.as_str(), &etag), X_REPO_COMMIT, commit)
}

/// `HEAD`/`GET /_lfs/{id}/{commit}/{path}`: the LFS store (a CDN: no auth, no hub headers).
fn store(shared: &Arc<Shared>, method: &Method, id: &str, commit: &str, path: &str, headers: &HeaderMap) -> Response {
    if method != Method::GET && method != Method::HEAD {
        return not_allowed();
    }
    let data = lock(&shared.repos).get(id).and_then(|r| r.commits.get(commit)).and_then(|f| f.get(path)).cloned();
    let Some(data) = data else {
        return error(StatusCode::NOT_FOUND, Some("NoSuchKey"), "The specified key does not exist.");
    };
    let key: Key = (id.into(), path.into());
    let get = method == Method::GET;
    let read = get && is_range_read(headers);
    let download = get && !read;
    if download {
        shared.stat(&key, |s| s.gets += 1);
    } else if read {
        shared.stat(&key, |s| s.range_reads += 1);
    }
    match shared.take_fault(&key, download) {
        Some(Fault::Status(code) | Fault::BodyStatus(code)) => fault_status(code, commit),
        Some(fault) => serve_bytes(shared, key, data, headers, Some(fault)),
        None if get => serve_bytes(shared, key, data, headers, None),
        None => Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_LENGTH, data.len())
            .header(header::ACCEPT_RANGES, "bytes")
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .body(Body::empty())
            .expect("response"),
    }
}

enum ByteRange {
    Whole,
    /// `start..end`, end exclusive.
    Part(usize, usize),
    Unsatisfiable,
}

/// Whether the request asks for a closed range (`bytes=A-B`), as a header read does; a resumed
/// download asks for the rest of the file (`bytes=N-`).
fn is_range_read(headers: &HeaderMap) -> bool {
    let spec = headers.get(header::RANGE).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().strip_prefix("bytes="));
    spec.and_then(|s| s.split_once('-'))
        .is_some_and(|(a, b)| a.trim().parse::<u64>().is_ok() && b.trim().parse::<u64>().is_ok())
}

/// A single `bytes=` range (`a-b`, `a-`, `-n`); anything else is served whole.
fn parse_range(headers: &HeaderMap, len: usize) -> ByteRange {
    let Some(spec) = headers.get(header::RANGE).and_then(|v| v.to_str().ok()) else {
        return ByteRange::Whole;
    };
    let Some(spec) = spec.trim().strip_prefix("bytes=") else {
        return ByteRange::Whole;
    };
    if spec.contains(',') {
        return ByteRange::Whole;
    }
    let Some((a, b)) = spec.split_once('-') else {
        return ByteRange::Whole;
    };
    let (a, b) = (a.trim(), b.trim());
    let parsed = match (a.parse::<usize>(), b.parse::<usize>()) {
        (Ok(start), Ok(last)) if start <= last => Some((start, (last + 1).min(len))),
        (Ok(start), Err(_)) if b.is_empty() => Some((start, len)),
        (Err(_), Ok(n)) if a.is_empty() && n > 0 => Some((len.saturating_sub(n), len)),
        _ => None,
    };
    match parsed {
        Some((start, end)) if start < len && start < end => ByteRange::Part(start, end),
        Some(_) => ByteRange::Unsatisfiable,
        None => ByteRange::Whole,
    }
}

/// Serves `data` (or the requested range of it) as a streamed body, with a body fault applied.
fn serve_bytes(shared: &Arc<Shared>, key: Key, data: Bytes, headers: &HeaderMap, fault: Option<Fault>) -> Response {
    let total = data.len();
    let mut builder = Response::builder()
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::CONTENT_TYPE, "application/octet-stream");
    let (start, end) = match parse_range(headers, total) {
        ByteRange::Whole => {
            builder = builder.status(StatusCode::OK);
            (0, total)
        }
        ByteRange::Part(start, end) => {
            builder = builder
                .status(StatusCode::PARTIAL_CONTENT)
                .header(header::CONTENT_RANGE, format!("bytes {start}-{}/{total}", end - 1));
            (start, end)
        }
        ByteRange::Unsatisfiable => return unsatisfiable(total),
    };
    let mut body = data.slice(start..end);
    if fault == Some(Fault::WrongBytes) && !body.is_empty() {
        let mut wrong = body.to_vec();
        let last = wrong.len() - 1;
        wrong[last] ^= 0xFF;
        body = Bytes::from(wrong);
    }
    let (chunk, pace) = match fault {
        Some(Fault::Slow { bytes_per_sec }) => {
            let bps = bytes_per_sec.max(1);
            let chunk = (bps / 10).max(1);
            (chunk as usize, Some(Duration::from_secs_f64(chunk as f64 / bps as f64)))
        }
        _ => (CHUNK, None),
    };
    let len = body.len();
    let limit = if matches!(fault, Some(Fault::DropMidBody | Fault::Stall)) { len / 2 } else { len };
    let stream = BodyStream {
        counted: !is_range_read(headers),
        data: body,
        pos: 0,
        limit,
        drop_at_limit: fault == Some(Fault::DropMidBody),
        stall_at_limit: fault == Some(Fault::Stall),
        chunk,
        pace,
        key,
        shared: shared.clone(),
    };
    shared.active_bodies.fetch_add(1, Ordering::SeqCst);
    shared.bump();
    let chunks = futures::stream::unfold(stream, |mut s| async move {
        if s.pos >= s.limit {
            if s.stall_at_limit {
                // Hang until the client drops the connection (which drops this stream).
                futures::future::pending::<()>().await;
            }
            if s.drop_at_limit {
                s.drop_at_limit = false;
                // Let the connection flush the head and the bytes so far (hyper flushes while the
                // body is pending), then fail the body: hyper closes the connection mid-body.
                tokio::task::yield_now().await;
                tokio::time::sleep(Duration::from_millis(20)).await;
                let aborted = io::Error::new(io::ErrorKind::ConnectionAborted, "injected fault: DropMidBody");
                return Some((Err(aborted), s));
            }
            return None;
        }
        if let Some(pace) = s.pace {
            tokio::time::sleep(pace).await;
        }
        let n = s.chunk.min(s.limit - s.pos);
        let chunk = s.data.slice(s.pos..s.pos + n);
        s.pos += n;
        if s.counted {
            s.shared.stat(&s.key, |st| st.bytes_sent += n as u64);
        }
        Some((Ok(chunk), s))
    });
    builder.header(header::CONTENT_LENGTH, len).body(Body::from_stream(chunks)).expect("response")
}

/// 416 for a range past the end of a file of `total` bytes.
fn unsatisfiable(total: usize) -> Response {
    Response::builder()
        .status(StatusCode::RANGE_NOT_SATISFIABLE)
        .header(header::CONTENT_RANGE, format!("bytes */{total}"))
        .header(header::CONTENT_LENGTH, 0)
        .body(Body::empty())
        .expect("response")
}

/// The state of one streamed body; dropping it (sent, or the client went away) ends the body.
struct BodyStream {
    /// Whether its bytes count in `bytes_sent` (not for a ranged read).
    counted: bool,
    data: Bytes,
    pos: usize,
    limit: usize,
    drop_at_limit: bool,
    stall_at_limit: bool,
    chunk: usize,
    pace: Option<Duration>,
    key: Key,
    shared: Arc<Shared>,
}

impl Drop for BodyStream {
    fn drop(&mut self) {
        self.shared.active_bodies.fetch_sub(1, Ordering::SeqCst);
        self.shared.bump();
    }
}
