//! The Hugging Face cache as a source: the standard `models--org--name/{refs,snapshots,blobs}`
//! layout, shared with Python's `huggingface_hub`. A revision is a ref naming a commit, or the
//! commit itself; the snapshot of that commit is the model's folder.

use std::{path::Path, path::PathBuf, sync::Arc};

use futures::future::BoxFuture;
use model_id::{ModelId, ModelSource, Revision};

use crate::{Error, Located, Source, Wanted, local::LocalFiles};

/// More than a ref file (a 40-hex commit and a newline) ever holds.
pub(crate) const REF_LIMIT: u64 = 256;

/// The HF cache, read only.
#[derive(Debug, Clone)]
pub struct HfCache {
    cache: PathBuf,
}

impl HfCache {
    pub fn new(cache: PathBuf) -> Self {
        Self { cache }
    }
}

impl Source for HfCache {
    fn locate<'a>(&'a self, wanted: &'a Wanted) -> BoxFuture<'a, Result<Option<Located>, Error>> {
        Box::pin(async move { Ok(in_hf_cache(&self.cache, &wanted.id, &wanted.revision)?) })
    }

    fn has(&self, id: &ModelId, revision: &Revision) -> bool {
        matches!(in_hf_cache(&self.cache, id, revision), Ok(Some(_)))
    }

    fn lacks(&self, wanted: &Wanted) -> String {
        format!("not in the HF cache at revision {}", wanted.revision.as_str())
    }
}

/// `models--org--name`, as huggingface_hub names a repo's cache folder.
pub fn repo_folder(id: &ModelId) -> String {
    match id.split() {
        (Some(org), name) => format!("models--{org}--{name}"),
        (None, name) => format!("models--{name}"),
    }
}

fn is_commit(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The cache's snapshot of the commit the revision's ref (or the revision itself) names.
pub fn in_hf_cache(cache: &Path, id: &ModelId, revision: &Revision) -> Result<Option<Located>, weights::Error> {
    let Ok(cache) = cache.canonicalize() else { return Ok(None) };
    let repo_dir = cache.join(repo_folder(id));
    let commit = if revision.is_commit() {
        revision.as_str().to_owned()
    } else {
        match crate::open::read_small(&repo_dir.join("refs").join(revision.as_str()), REF_LIMIT) {
            Some(commit) => commit.trim().to_owned(),
            None => return Ok(None),
        }
    };
    if !is_commit(&commit) {
        return Err(weights::Error::NotFound(format!("the HF cache ref {} does not hold a commit", revision.as_str())));
    }
    let files = LocalFiles::new(repo_dir.join("snapshots").join(&commit), cache);
    let Some(files) = files.found()? else { return Ok(None) };
    Ok(Some(Located {
        files: Arc::new(files),
        source: ModelSource::Cache,
        description: format!("cache hit: snapshot {commit}"),
        revision: commit,
        fetch: None,
    }))
}

/// The cache's snapshot of `commit`, whose folder may not exist yet (a download fills it).
pub fn snapshot(cache: &Path, id: &ModelId, commit: &str) -> Result<LocalFiles, weights::Error> {
    let read_error = |source| weights::Error::Read { file: "the HF cache".into(), source };
    std::fs::create_dir_all(cache).map_err(read_error)?;
    let root = cache.canonicalize().map_err(read_error)?;
    let dir = root.join(repo_folder(id)).join("snapshots").join(commit);
    Ok(LocalFiles::new(dir, root))
}
