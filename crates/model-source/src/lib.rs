//! Where a model's files come from, behind one trait: [`Source`] resolves an id and a revision to
//! the model's files ([`weights::ModelFiles`]: a listing, and files opened for positioned reads)
//! and says what must be fetched first ([`Fetch`]). Implemented by the model root
//! ([`ModelRoot`]), the Hugging Face cache ([`HfCache`]), the Hub ([`HubSource`], which
//! downloads into that cache) and object stores ([`ObjectSource`], for `s3://…` ids); [`Sources`]
//! asks them in order.
//!
//! Adding a source is one module implementing [`Source`], its place in [`Sources::from_config`]
//! and its settings. This crate never parses weights, never books memory and never speaks gRPC;
//! nothing outside the roots it was given is ever opened.

mod ahead;
mod cache;
mod hub;
mod hub_source;
mod local;
mod object;
mod open;

use std::{
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use futures::future::BoxFuture;
pub use model_id::{ModelId, ModelSource, Revision};
use resource_manager::sync;
use tokio_util::sync::CancellationToken;
use weights::ModelFiles;

pub use crate::{
    cache::HfCache,
    hub::{DEFAULT_HUB_STALL_TIMEOUT, DOWNLOAD_WORKERS, HubConfig},
    hub_source::HubSource,
    local::{LocalFiles, ModelRoot},
    object::{
        DEFAULT_OBJECT_CHUNK, DEFAULT_OBJECT_CONCURRENCY, DEFAULT_OBJECT_STALL_TIMEOUT, ObjectConfig, ObjectError,
        ObjectFailure, ObjectSource,
    },
};

/// Why a source failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// What the files are or hold: missing, escaping their root, unreadable, corrupt.
    #[error(transparent)]
    Files(#[from] weights::Error),
    #[error("the hub failed ({failure}): {reason}")]
    Hub { failure: HubFailure, reason: String },
    #[error("the object store failed ({}): {}", .0.failure, .0.reason)]
    Object(#[from] ObjectError),
}

/// How a hub request failed, for the gRPC code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::Display)]
#[strum(serialize_all = "snake_case")]
pub enum HubFailure {
    /// Unknown repo, revision or file.
    NotFound,
    /// 401: no token, or a token the hub rejected.
    Unauthenticated,
    /// 403, or a gated repo.
    PermissionDenied,
    /// 5xx, timeouts, refused connections (after hf-hub's bounded retries).
    Unavailable,
    Other,
}

impl HubFailure {
    pub fn kind(self) -> &'static str {
        match self {
            Self::NotFound => "hub_not_found",
            Self::Unauthenticated => "hub_unauthenticated",
            Self::PermissionDenied => "hub_permission_denied",
            Self::Unavailable => "hub_unavailable",
            Self::Other => "hub_other",
        }
    }
}

/// The model a load asks for.
#[derive(Debug, Clone)]
pub struct Wanted {
    pub id: ModelId,
    pub revision: Revision,
    /// The precision variant preferred where a folder has it (`fp16`).
    pub variant: Option<&'static str>,
    /// The load's cancel: sources whose files are read over the network end their requests on it.
    pub cancel: CancellationToken,
}

/// A model found: its files, where they came from, and what must be fetched before they are read.
pub struct Located {
    pub files: Arc<dyn ModelFiles>,
    pub source: ModelSource,
    /// The resolved commit; empty for the model root.
    pub revision: String,
    /// For step 2's detail.
    pub description: String,
    pub fetch: Option<Box<dyn Fetch>>,
}

impl std::fmt::Debug for Located {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Located")
            .field("source", &self.source)
            .field("revision", &self.revision)
            .field("description", &self.description)
            .field("fetch", &self.fetch.as_ref().map(|f| f.files()))
            .finish()
    }
}

/// Files a source must fetch before the model's files can be read. Step 3 plans from
/// [`Fetch::plan_files`] and reserves the exact bytes; step 4 fetches the rest with progress.
pub trait Fetch: Send + Sync {
    /// The model's files as the plan sees them before the weights are fetched: whatever the plan
    /// reads (side files, the weight files' headers) fetched now, until done, cancelled or
    /// stalled, files fetched whole counted in `progress`. Called once, before [`Fetch::fetch`].
    fn plan_files<'a>(
        &'a self,
        cancel: &'a CancellationToken,
        progress: &'a Arc<FetchProgress>,
    ) -> BoxFuture<'a, Result<Arc<dyn ModelFiles>, Error>>;
    /// How many files step 4 fetches, and their bytes.
    fn files(&self) -> usize;
    fn bytes(&self) -> u64;
    /// Their paths in the model's folder, in the order they are fetched.
    fn paths(&self) -> Vec<&str>;
    /// Fetches every file, counting bytes in `progress`, until done, cancelled or stalled; files
    /// whose leading bytes differ from what [`Fetch::plan_files`] showed fail it.
    fn fetch<'a>(
        &'a self,
        cancel: &'a CancellationToken,
        progress: &'a Arc<FetchProgress>,
    ) -> BoxFuture<'a, Result<(), Error>>;
}

/// Where a model's files come from.
pub trait Source: Send + Sync {
    /// Finds the model; `Ok(None)` when this source does not have it (the next one is asked).
    fn locate<'a>(&'a self, wanted: &'a Wanted) -> BoxFuture<'a, Result<Option<Located>, Error>>;
    /// Whether it has the model without asking anyone over the network.
    fn has(&self, id: &ModelId, revision: &Revision) -> bool;
    /// The models it lists for ListModels without being asked (the model root's folders).
    fn list(&self) -> Vec<ModelId> {
        Vec::new()
    }
    /// Says that it does not have the model, for the NOT_FOUND of a model no source has.
    fn lacks(&self, wanted: &Wanted) -> String;
}

/// Where models may be read from.
#[derive(Debug, Clone, Default)]
pub struct SourceConfig {
    /// Folders of models, one per id (`<root>/<name>` or `<root>/<org>/<name>`).
    pub model_root: Option<PathBuf>,
    /// The Hugging Face hub cache (`.../huggingface/hub`).
    pub hf_cache: Option<PathBuf>,
    /// Never reach the hub.
    pub offline: bool,
    /// How to reach the hub when not offline.
    pub hub: HubConfig,
    /// How to reach object stores (ids in URL form).
    pub object: ObjectConfig,
}

/// The sources of a server: ids in URL form go to the object-store source, every other id to
/// the chain, asked in order.
pub struct Sources {
    chain: Vec<Arc<dyn Source>>,
    /// For `s3://…` ids; none of the chain's sources is ever asked for one (they would take
    /// `s3:` for a folder name).
    object: Option<Arc<dyn Source>>,
    /// Appended to the NOT_FOUND of a model no source has.
    last_word: String,
}

impl Sources {
    /// These sources, in this order (and no object-store source).
    pub fn new(chain: Vec<Arc<dyn Source>>, last_word: impl Into<String>) -> Self {
        Self { chain, object: None, last_word: last_word.into() }
    }

    /// The model root, then the hub (which falls back to the HF cache when unreachable) or,
    /// offline or without a cache to download into, the HF cache.
    pub fn from_config(config: &SourceConfig) -> Result<Self, Error> {
        let mut chain: Vec<Arc<dyn Source>> = Vec::new();
        if let Some(root) = &config.model_root {
            chain.push(Arc::new(ModelRoot::new(root.clone())));
        }
        let last_word = match (&config.hf_cache, config.offline) {
            (Some(cache), false) => {
                chain.push(Arc::new(HubSource::new(&config.hub, cache)?));
                "the hub does not have it"
            }
            (Some(cache), true) => {
                chain.push(Arc::new(HfCache::new(cache.clone())));
                "offline mode: the hub is not asked"
            }
            (None, offline) => {
                if offline {
                    "offline mode: the hub is not asked"
                } else {
                    "no hub is configured"
                }
            }
        };
        let object: Arc<dyn Source> = Arc::new(ObjectSource::new(config.object.clone()));
        Ok(Self { object: Some(object), ..Self::new(chain, last_word) })
    }

    /// The first source's answer that has the model, else NOT_FOUND saying where it was looked for.
    pub async fn locate(&self, wanted: &Wanted) -> Result<Located, Error> {
        if wanted.id.object_url().is_some() {
            let found = match &self.object {
                Some(object) => object.locate(wanted).await?,
                None => None,
            };
            return found.ok_or_else(|| {
                weights::Error::NotFound(format!("{}: no object-store source is configured", wanted.id)).into()
            });
        }
        for source in &self.chain {
            if let Some(found) = source.locate(wanted).await? {
                return Ok(found);
            }
        }
        let mut said: Vec<String> = self.chain.iter().map(|s| s.lacks(wanted)).collect();
        said.push(format!("and {}", self.last_word));
        Err(weights::Error::NotFound(said.join(", ")).into())
    }

    /// Whether any source has the model without asking the network.
    pub fn has(&self, id: &ModelId, revision: &Revision) -> bool {
        id.object_url().is_none() && self.chain.iter().any(|s| s.has(id, revision))
    }

    /// The models the sources list, sorted, each once.
    pub fn list(&self) -> Vec<ModelId> {
        let mut ids: Vec<ModelId> = self.chain.iter().flat_map(|s| s.list()).collect();
        ids.sort();
        ids.dedup();
        ids
    }
}

/// A relative path a remote source names (a hub listing, an object key under a prefix): segments
/// that are not empty, `.` or `..`, with no `\\`, NUL or other control character anywhere (so no
/// absolute path, no climbing out, no Windows-style separator for a later tool to misread).
pub(crate) fn is_relative_path(path: &str) -> bool {
    !path.is_empty()
        && !path.chars().any(|c| c == '\\' || c.is_control())
        && path.split('/').all(|segment| !segment.is_empty() && segment != "." && segment != "..")
}

/// Bytes fetched so far over all files of a load, and the files being fetched.
#[derive(Debug, Default)]
pub struct FetchProgress {
    done: AtomicU64,
    /// The files in flight, oldest first.
    in_flight: Mutex<Vec<String>>,
}

impl FetchProgress {
    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    pub fn add(&self, bytes: u64) {
        self.done.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Notes `file` as in flight until the guard is dropped (done, failed or cancelled).
    pub fn start(&self, file: &str) -> InFlight<'_> {
        sync::lock(&self.in_flight).push(file.to_owned());
        InFlight { progress: self, file: file.to_owned() }
    }

    /// The file the progress bar names: the oldest one still in flight (empty when none is).
    pub fn file(&self) -> String {
        sync::lock(&self.in_flight).first().cloned().unwrap_or_default()
    }
}

/// A file in flight; dropping it takes the file off the list.
pub struct InFlight<'a> {
    progress: &'a FetchProgress,
    file: String,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut files = sync::lock(&self.progress.in_flight);
        if let Some(at) = files.iter().position(|f| *f == self.file) {
            files.remove(at);
        }
    }
}
