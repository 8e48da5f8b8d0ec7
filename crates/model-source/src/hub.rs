//! The Hugging Face Hub as a source, through `hf-hub`: resolve a revision to its commit, list the
//! files a load needs, and download the missing ones into the HF cache (the layout Python's
//! `huggingface_hub` shares) with byte progress, cancellation and sha256 verification.
//!
//! Files land atomically (hf-hub writes `<blob>.incomplete` and renames it); an LFS file whose
//! bytes do not hash to the hub's sha256 is removed again before the load fails with DATA_LOSS.

use std::{
    collections::BTreeMap,
    io::Read,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use futures::{StreamExt, TryStreamExt};
use hf_hub::{
    HFClient, HFError,
    progress::{DownloadEvent, ProgressEvent, ProgressHandler},
    repository::RepoTreeEntry,
};
use model_id::{ModelId, Revision};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use weights::{
    choice::{self, Choice},
    small_files,
};

use crate::{Error, FetchProgress, HubFailure, cache::repo_folder};

/// How long the hub may send nothing (no answer, no byte) before a load gives up with UNAVAILABLE.
pub const DEFAULT_HUB_STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// How often a download checks that bytes still arrive.
const STALL_CHECK: Duration = Duration::from_millis(100);

/// Where and how to reach the hub.
#[derive(Clone)]
pub struct HubConfig {
    /// The hub's base URL (`HF_ENDPOINT`); `None` is huggingface.co.
    pub endpoint: Option<String>,
    /// The token sent as `Authorization: Bearer` (`HF_TOKEN`). Never logged.
    pub token: Option<String>,
    /// See [`DEFAULT_HUB_STALL_TIMEOUT`]. hf-hub's HTTP clients have no timeouts of their own.
    pub stall_timeout: Duration,
}

impl Default for HubConfig {
    fn default() -> Self {
        Self { endpoint: None, token: None, stall_timeout: DEFAULT_HUB_STALL_TIMEOUT }
    }
}

impl std::fmt::Debug for HubConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubConfig")
            .field("endpoint", &self.endpoint)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("stall_timeout", &self.stall_timeout)
            .finish()
    }
}

/// One file of a repo at a commit.
#[derive(Debug, Clone)]
pub struct RemoteFile {
    pub path: String,
    pub size: u64,
    /// The LFS sha256 of its content, when the listing gives one. hf-hub 1.0's tree entries expect
    /// a `sha256` field where the hub sends `oid`, so this is usually empty and [`verify`] checks
    /// the blob's name instead (hf-hub names LFS blobs by the hub's ETag, their sha256).
    pub sha256: Option<String>,
}

/// A revision resolved on the hub: its commit and the files a load of it needs.
#[derive(Debug, Clone)]
pub struct RemoteSnapshot {
    pub commit: String,
    pub needed: Vec<RemoteFile>,
}

/// A client of the hub writing into one HF cache.
pub struct Hub {
    client: HFClient,
    pub(crate) cache: PathBuf,
    stall_timeout: Duration,
}

impl Hub {
    pub fn new(config: &HubConfig, cache: &Path) -> Result<Self, Error> {
        let mut builder = HFClient::builder().cache_dir(cache).cache_enabled(true).retry_max_attempts(3);
        if let Some(endpoint) = &config.endpoint {
            builder = builder.endpoint(endpoint.trim_end_matches('/'));
        }
        if let Some(token) = &config.token {
            builder = builder.token(token);
        }
        let client = builder.build().map_err(|e| Error::Hub {
            failure: HubFailure::Other,
            reason: format!("configuring the hub client: {e}"),
        })?;
        Ok(Self { client, cache: cache.to_owned(), stall_timeout: config.stall_timeout })
    }

    pub(crate) fn repo(&self, id: &ModelId) -> hf_hub::repository::HFRepository<hf_hub::repository::RepoTypeModel> {
        let (org, name) = id.split();
        self.client.model(org.unwrap_or(""), name)
    }

    /// Resolves `revision` to its commit and lists the files a load needs (see [`needed_files`]),
    /// within the stall timeout.
    pub async fn resolve(
        &self,
        id: &ModelId,
        revision: &Revision,
        variant: Option<&str>,
    ) -> Result<RemoteSnapshot, Error> {
        tokio::time::timeout(self.stall_timeout, self.resolve_now(id, revision, variant))
            .await
            .map_err(|_| stalled(self.stall_timeout))?
    }

    async fn resolve_now(
        &self,
        id: &ModelId,
        revision: &Revision,
        variant: Option<&str>,
    ) -> Result<RemoteSnapshot, Error> {
        let repo = self.repo(id);
        let info = repo.info().revision(revision.as_str().to_owned()).send().await.map_err(hub_error)?;
        let commit = info.sha.filter(|s| is_commit(s)).ok_or_else(|| Error::Hub {
            failure: HubFailure::Other,
            reason: format!("the hub gave no commit for revision {}", revision.as_str()),
        })?;
        let tree = repo.list_tree().revision(commit.clone()).recursive(true).send().map_err(hub_error)?;
        let mut files = Vec::new();
        let mut tree = std::pin::pin!(tree);
        while let Some(entry) = tree.next().await {
            if let RepoTreeEntry::File { path, size, lfs, .. } = entry.map_err(hub_error)? {
                // The listing is the hub's word on paths the download joins to the snapshot
                // folder: a hostile or broken hub must not name one outside it.
                if !crate::is_relative_path(&path) {
                    return Err(weights::Error::PathEscapes { path: shown_path(&path) }.into());
                }
                let sha256 = lfs.and_then(|l| l.sha256).filter(|s| s.len() == 64);
                files.push(RemoteFile { path, size, sha256 });
            }
        }
        let needed = needed_files(&files, variant)?;
        Ok(RemoteSnapshot { commit, needed })
    }

    /// Runs `work` (requests that send little, such as a header read) until it is done, `cancel`
    /// fires or the stall timeout passes.
    pub(crate) async fn bounded<T>(
        &self,
        cancel: &CancellationToken,
        work: impl Future<Output = Result<T, Error>>,
    ) -> Result<T, Error> {
        tokio::select! {
            result = tokio::time::timeout(self.stall_timeout, work) => result.map_err(|_| stalled(self.stall_timeout))?,
            () = cancel.cancelled() => Err(weights::Error::Cancelled.into()),
        }
    }

    /// The snapshot folder of `commit` in the cache.
    pub(crate) fn snapshot_dir(&self, id: &ModelId, commit: &str) -> PathBuf {
        self.cache.join(repo_folder(id)).join("snapshots").join(commit)
    }

    /// Records that `revision` names `commit` (`refs/<revision>`), as huggingface_hub does, so an
    /// offline load (ours or Python's) finds the snapshot. Written to a temporary file and renamed.
    pub(crate) fn write_ref(&self, id: &ModelId, revision: &Revision, commit: &str) -> std::io::Result<()> {
        if revision.is_commit() {
            return Ok(());
        }
        let path = self.cache.join(repo_folder(id)).join("refs").join(revision.as_str());
        if crate::open::read_small(&path, crate::cache::REF_LIMIT).is_some_and(|c| c.trim() == commit) {
            return Ok(());
        }
        let parent = path.parent().ok_or_else(|| std::io::Error::other("a ref has a folder"))?;
        std::fs::create_dir_all(parent)?;
        let tmp = parent.join(format!(".{}.tmp", path.file_name().and_then(|n| n.to_str()).unwrap_or("ref")));
        std::fs::write(&tmp, commit)?;
        std::fs::rename(&tmp, &path)
    }

    /// The needed files not yet in the cache's snapshot.
    pub(crate) fn missing(&self, id: &ModelId, snapshot: &RemoteSnapshot) -> Vec<RemoteFile> {
        let dir = self.snapshot_dir(id, &snapshot.commit);
        snapshot.needed.iter().filter(|f| !dir.join(&f.path).is_file()).cloned().collect()
    }

    /// Downloads `files` of `commit` into the cache, [`DOWNLOAD_WORKERS`] at a time, counting bytes
    /// done over all of them in `counter`, stopping when `cancel` fires or a file fails (the other
    /// downloads in flight are dropped). Each LFS file is verified against its sha256 as soon as it
    /// is complete; a mismatch removes it and fails with DATA_LOSS.
    pub(crate) async fn download(
        &self,
        id: &ModelId,
        commit: &str,
        files: &[RemoteFile],
        cancel: &CancellationToken,
        counter: &Arc<FetchProgress>,
    ) -> Result<(), Error> {
        let all = futures::stream::iter(files.iter().map(Ok))
            .try_for_each_concurrent(DOWNLOAD_WORKERS, |file| self.download_one(id, commit, file, counter));
        tokio::pin!(all);
        // A hub that stops sending (hf-hub's clients have no timeouts) fails the load instead of
        // holding it forever: dropping the downloads closes their connections, and stops each
        // between two chunks; hf-hub's `.incomplete` file is never taken for a blob (it is
        // truncated and rewritten by the next download).
        let mut tick = tokio::time::interval(STALL_CHECK);
        let (mut last_done, mut last_change) = (0, tokio::time::Instant::now());
        loop {
            tokio::select! {
                result = &mut all => return result,
                () = cancel.cancelled() => return Err(weights::Error::Cancelled.into()),
                _ = tick.tick() => {
                    let done = counter.done();
                    if done != last_done {
                        (last_done, last_change) = (done, tokio::time::Instant::now());
                    } else if last_change.elapsed() >= self.stall_timeout {
                        return Err(stalled(self.stall_timeout));
                    }
                }
            }
        }
    }

    /// Downloads and verifies one file, adding its bytes to `counter` as they arrive.
    async fn download_one(
        &self,
        id: &ModelId,
        commit: &str,
        file: &RemoteFile,
        counter: &Arc<FetchProgress>,
    ) -> Result<(), Error> {
        let _in_flight = counter.start(&file.path);
        let progress =
            Arc::new(FileProgress { file: file.path.clone(), seen: AtomicU64::new(0), counter: counter.clone() });
        let repo = self.repo(id);
        let download = repo
            .download_file()
            .filename(file.path.clone())
            .revision(commit.to_owned())
            .progress(progress.clone())
            .send();
        let path = download.await.map_err(hub_error)?;
        let remote = file.clone();
        tokio::task::spawn_blocking(move || verify(&remote, &path))
            .await
            .map_err(|e| weights::Error::Internal(format!("verifying: {e}")))??;
        // The file is complete: count what its progress events did not (a small file may send none).
        progress.advance_to(file.size);
        Ok(())
    }
}

/// Files of one load downloaded at once, as huggingface_hub's `snapshot_download` (8 workers).
pub const DOWNLOAD_WORKERS: usize = 8;

/// Checks a downloaded file against what the hub announced: its size, and for an LFS file (a blob
/// named by its sha256, the hub's ETag) the sha256 of its bytes. A file that fails is removed
/// (blob and snapshot link) before the error: a body of the wrong length is a failed transfer
/// (hf-hub writes an error response's body like any other), UNAVAILABLE; the right length with
/// the wrong hash is corruption, DATA_LOSS.
fn verify(remote: &RemoteFile, path: &Path) -> Result<(), Error> {
    let name = remote.path.as_str();
    let read_error = |source| weights::Error::Read { file: name.to_owned(), source };
    let blob = path.canonicalize().map_err(read_error)?;
    let remove = || {
        let _ = std::fs::remove_file(path);
        let _ = std::fs::remove_file(&blob);
    };
    let size = std::fs::metadata(&blob).map_err(read_error)?.len();
    if size != remote.size {
        remove();
        return Err(Error::Hub {
            failure: HubFailure::Unavailable,
            reason: format!("{name}: received {size} bytes of {}; removed from the cache", remote.size),
        });
    }
    let blob_name = blob.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_owned();
    let expected = remote.sha256.clone().or_else(|| {
        (blob_name.len() == 64 && blob_name.bytes().all(|b| b.is_ascii_hexdigit())).then(|| blob_name.clone())
    });
    let Some(expected) = expected else { return Ok(()) };
    let mut file = std::fs::File::open(&blob).map_err(read_error)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(read_error)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let actual = hex::encode(hasher.finalize());
    if actual == expected {
        return Ok(());
    }
    // Nothing that looks complete may stay behind.
    remove();
    Err(weights::Error::Corrupt {
        file: name.to_owned(),
        reason: format!("downloaded bytes hash to sha256 {actual}, the hub says {expected}; removed from the cache"),
    }
    .into())
}

/// Turns hf-hub's progress events for one file into bytes added to the load's counter.
struct FileProgress {
    file: String,
    /// The file's bytes counted so far.
    seen: AtomicU64,
    counter: Arc<FetchProgress>,
}

impl FileProgress {
    /// Counts the file's bytes up to `bytes` (never back: events may arrive out of order).
    fn advance_to(&self, bytes: u64) {
        let before = self.seen.fetch_max(bytes, Ordering::Relaxed);
        if bytes > before {
            self.counter.add(bytes - before);
        }
    }
}

impl ProgressHandler for FileProgress {
    fn on_progress(&self, event: &ProgressEvent) {
        if let ProgressEvent::Download(DownloadEvent::Progress { files }) = event {
            for f in files.iter().filter(|f| f.filename == self.file) {
                self.advance_to(f.bytes_completed);
            }
        }
    }
}

/// A path from the hub fit for a message: escaped, at most 80 characters.
fn shown_path(path: &str) -> String {
    let escaped = path.escape_debug().to_string();
    match escaped.char_indices().nth(80) {
        Some((end, _)) => format!("{}…", &escaped[..end]),
        None => escaped,
    }
}

fn is_commit(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The files a load of this repo needs, chosen by name the way the loader picks its layout
/// ([`weights::choose`], preferring the precision `variant` where a folder has it): the small
/// files that travel with a model ([`small_files::travels`]: configs, tokenizer files), each
/// folder's chosen weights and the index naming its shards. Nothing else is ever requested (never
/// `*.bin`, a README or a stray file), and small files past their limits are refused from the
/// listing's sizes, before any download.
fn needed_files(files: &[RemoteFile], variant: Option<&str>) -> Result<Vec<RemoteFile>, Error> {
    let mut by_dir: BTreeMap<&str, Vec<&RemoteFile>> = BTreeMap::new();
    for f in files {
        let dir = f.path.rsplit_once('/').map_or("", |(d, _)| d);
        // One level of folders at most (diffusers components); deeper files are not model files.
        if dir.contains('/') {
            continue;
        }
        by_dir.entry(dir).or_default().push(f);
    }
    let name = |f: &RemoteFile| f.path.rsplit('/').next().unwrap_or("").to_owned();
    let mut needed = Vec::new();
    let mut pickles = Vec::new();
    for (dir, entries) in &by_dir {
        let names: Vec<String> = entries.iter().map(|f| name(f)).collect();
        let chosen = match choice::choose(&names, variant) {
            Choice::Sharded { mut shards, index, .. } => {
                shards.push(index);
                shards
            }
            Choice::Files { files, .. } => files,
            Choice::PickleOnly(files) => {
                if dir.is_empty() {
                    pickles.extend(files);
                }
                Vec::new()
            }
            // A component without weights (scheduler, tokenizer): its small files only.
            Choice::Nothing => Vec::new(),
        };
        needed.extend(
            entries.iter().filter(|f| small_files::travels(&f.path) || chosen.contains(&name(f))).map(|f| (*f).clone()),
        );
    }
    small_files::check(needed.iter().filter(|f| small_files::travels(&f.path)).map(|f| (f.path.as_str(), f.size)))?;
    if !needed.iter().any(|f| f.path.ends_with(".safetensors")) {
        if !pickles.is_empty() {
            return Err(weights::Error::PickleOnly { files: pickles.join(", ") }.into());
        }
        return Err(weights::Error::NotFound("the repo has no safetensors weights".into()).into());
    }
    Ok(needed)
}

/// The hub answered nothing for `timeout`.
fn stalled(timeout: Duration) -> Error {
    Error::Hub {
        failure: HubFailure::Unavailable,
        reason: format!("the hub sent nothing for {}s", timeout.as_secs_f64()),
    }
}

/// Maps a hub failure to the load error the server turns into a gRPC code.
pub(crate) fn hub_error(e: HFError) -> Error {
    let failure = match &e {
        HFError::RepoNotFound { .. }
        | HFError::RevisionNotFound { .. }
        | HFError::EntryNotFound { .. }
        | HFError::LocalEntryNotFound { .. } => HubFailure::NotFound,
        HFError::AuthRequired { .. } => HubFailure::Unauthenticated,
        HFError::Forbidden { .. } => HubFailure::PermissionDenied,
        HFError::RateLimited { .. } | HFError::Request { .. } | HFError::CacheLockTimeout { .. } => {
            HubFailure::Unavailable
        }
        HFError::Http { context } if context.status.is_server_error() => HubFailure::Unavailable,
        HFError::Http { context } if context.status.as_u16() == 401 => HubFailure::Unauthenticated,
        HFError::Http { context } if context.status.as_u16() == 403 => HubFailure::PermissionDenied,
        HFError::Http { context } if context.status.as_u16() == 404 => HubFailure::NotFound,
        _ => HubFailure::Other,
    };
    let reason = match e {
        // hf-hub appends the URL to reqwest's message, which already names it: say it once, then
        // the causes (a refused connection, a TLS failure), which neither message shows.
        HFError::Request { source, url } => {
            let url = url.or_else(|| source.url().map(ToString::to_string));
            let source = source.without_url();
            let mut reason = source.to_string();
            if let Some(url) = url {
                reason = format!("{reason} ({url})");
            }
            let mut cause = std::error::Error::source(&source);
            while let Some(c) = cause {
                reason = format!("{reason}: {c}");
                cause = c.source();
            }
            reason
        }
        e => e.to_string(),
    };
    Error::Hub { failure, reason }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_paths_stay_inside_the_snapshot() {
        for good in ["config.json", "unet/config.json", "a.b/c..d.json", "x/y/z.safetensors"] {
            assert!(crate::is_relative_path(good), "{good}");
        }
        for bad in ["", "/PWNED.json", "../up.json", "a/../../b", "./x", "a/.", "a//b", "a/", "a\\b", "x\0y", "x\ny"] {
            assert!(!crate::is_relative_path(bad), "{bad:?}");
        }
        assert_eq!(shown_path("a\0b"), "a\\0b");
        assert_eq!(shown_path(&"x".repeat(200)).chars().count(), 81);
    }

    fn files(paths: &[&str]) -> Vec<RemoteFile> {
        paths.iter().map(|p| RemoteFile { path: (*p).into(), size: 1, sha256: None }).collect()
    }

    fn needed(paths: &[&str]) -> Result<Vec<String>, Error> {
        Ok(needed_files(&files(paths), None)?.into_iter().map(|f| f.path).collect())
    }

    /// Only what the chosen layout needs is downloaded: never pickles, never precision variants,
    /// never a second copy of the weights; configs of weightless components come along.
    #[test]
    fn picks_only_the_files_the_layout_needs() {
        let single = needed(&["config.json", "model.safetensors", "pytorch_model.bin", "README.md"]).expect("single");
        assert_eq!(single, ["config.json", "model.safetensors"]);
        let tokenizer = needed(&[
            ".gitattributes",
            "1_Pooling/config.json",
            "README.md",
            "config.json",
            "extra/secret.txt",
            "merges.txt",
            "model.safetensors",
            "onnx/model.onnx",
            "pytorch_model.bin",
            "tokenizer.model",
            "train_args.json",
            "vocab.txt",
            "x/y/config.json",
        ])
        .expect("tokenizer files");
        assert_eq!(
            tokenizer,
            ["config.json", "merges.txt", "model.safetensors", "tokenizer.model", "vocab.txt", "1_Pooling/config.json"]
        );
        let sharded = needed(&[
            "config.json",
            "model.safetensors.index.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "model.fp16.safetensors",
            "pytorch_model-00001-of-00002.bin",
        ])
        .expect("sharded");
        assert_eq!(
            sharded,
            [
                "config.json",
                "model.safetensors.index.json",
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors"
            ]
        );
        let pipeline = needed(&[
            "model_index.json",
            "scheduler/scheduler_config.json",
            "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors",
            "unet/diffusion_pytorch_model.fp16.safetensors",
            "unet/diffusion_pytorch_model.bin",
        ])
        .expect("pipeline");
        assert_eq!(
            pipeline,
            [
                "model_index.json",
                "scheduler/scheduler_config.json",
                "unet/config.json",
                "unet/diffusion_pytorch_model.safetensors"
            ]
        );
        assert!(matches!(
            needed(&["config.json", "pytorch_model.bin"]),
            Err(Error::Files(weights::Error::PickleOnly { .. }))
        ));
        assert!(matches!(needed(&["README.md"]), Err(Error::Files(weights::Error::NotFound(_)))));
    }

    /// A small file past its limit is refused from the listing, before anything is downloaded.
    #[test]
    fn a_small_file_past_its_limit_is_refused_before_any_download() {
        let mut listing = files(&["config.json", "model.safetensors", "tokenizer.json"]);
        listing[2].size = small_files::MAX_FILE_BYTES + 1;
        let err = needed_files(&listing, None).expect_err("too big");
        assert!(
            matches!(&err, Error::Files(weights::Error::OverLimit { file, .. }) if file == "tokenizer.json"),
            "{err}"
        );
    }

    /// An F16 load downloads the fp16 variant of each component that has one, and the plain
    /// weights of the others.
    #[test]
    fn picks_the_fp16_variant_where_there_is_one() {
        let listing = files(&[
            "model_index.json",
            "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors.index.json",
            "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
            "unet/diffusion_pytorch_model-00002-of-00002.safetensors",
            "unet/diffusion_pytorch_model.safetensors.index.fp16.json",
            "unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
            "unet/diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
            "vae/config.json",
            "vae/diffusion_pytorch_model.safetensors",
        ]);
        let paths: Vec<String> =
            needed_files(&listing, Some("fp16")).expect("fp16").into_iter().map(|f| f.path).collect();
        assert_eq!(
            paths,
            [
                "model_index.json",
                "unet/config.json",
                "unet/diffusion_pytorch_model.safetensors.index.fp16.json",
                "unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
                "unet/diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
                "vae/config.json",
                "vae/diffusion_pytorch_model.safetensors",
            ]
        );
    }
}
