//! The hub as a [`Source`]: the revision resolved to a commit and the files a load needs listed
//! (see `hub`); what the HF cache lacks is fetched into it (the side files and the weight files'
//! headers in step 3, for the plan: see `ahead`; the weights in step 4), and a hub that cannot be
//! reached falls back to the cache's snapshot of the revision.

use std::{
    path::Path,
    sync::{Arc, OnceLock},
};

use futures::future::BoxFuture;
use model_id::{ModelId, ModelSource, Revision};
use tokio_util::sync::CancellationToken;
use weights::ModelFiles;

use crate::{
    Error, Fetch, FetchProgress, HubFailure, Located, Source, Wanted,
    ahead::{self, Ahead, Heads},
    cache,
    hub::{Hub, HubConfig, RemoteFile},
};

/// The hub as a source: resolves the revision to a commit and lists what a load needs; the
/// files the cache lacks are fetched into it. A hub that cannot be reached falls back to a
/// cached snapshot of the revision.
pub struct HubSource {
    hub: Arc<Hub>,
}

impl HubSource {
    pub fn new(config: &HubConfig, cache: &Path) -> Result<Self, Error> {
        Ok(Self { hub: Arc::new(Hub::new(config, cache)?) })
    }
}

impl Source for HubSource {
    fn locate<'a>(&'a self, wanted: &'a Wanted) -> BoxFuture<'a, Result<Option<Located>, Error>> {
        Box::pin(async move {
            let hub = &self.hub;
            let (id, revision) = (&wanted.id, &wanted.revision);
            // A hub that answers slowly (within its stall timeout) must not hold a cancelled load.
            let resolved = tokio::select! {
                resolved = hub.resolve(id, revision, wanted.variant) => resolved,
                () = wanted.cancel.cancelled() => return Err(weights::Error::Cancelled.into()),
            };
            let snapshot = match resolved {
                Ok(snapshot) => snapshot,
                Err(Error::Hub { failure: HubFailure::Unavailable, reason })
                    if let Some(mut cached) = cache::in_hf_cache(&hub.cache, id, revision)? =>
                {
                    cached.description = format!("hub unreachable ({reason}); {}", cached.description);
                    return Ok(Some(cached));
                }
                Err(e) => return Err(e),
            };
            let files: Arc<dyn ModelFiles> = Arc::new(cache::snapshot(&hub.cache, id, &snapshot.commit)?);
            let missing = hub.missing(id, &snapshot);
            if missing.is_empty() {
                write_ref(hub, id, revision, &snapshot.commit);
                return Ok(Some(Located {
                    files,
                    source: ModelSource::Cache,
                    description: format!("cache hit: snapshot {}", snapshot.commit),
                    revision: snapshot.commit,
                    fetch: None,
                }));
            }
            let (weights, side) = missing.into_iter().partition(|f| f.path.ends_with(".safetensors"));
            let fetch = HubFetch {
                hub: hub.clone(),
                id: id.clone(),
                revision: revision.clone(),
                commit: snapshot.commit.clone(),
                files: files.clone(),
                side,
                weights,
                heads: OnceLock::new(),
            };
            Ok(Some(Located {
                files,
                source: ModelSource::Hub,
                description: format!(
                    "cache miss: {} files, {} bytes to download",
                    fetch.side.len() + fetch.weights.len(),
                    fetch.side.iter().chain(&fetch.weights).map(|f| f.size).sum::<u64>()
                ),
                revision: snapshot.commit,
                fetch: Some(Box::new(fetch)),
            }))
        })
    }

    fn has(&self, id: &ModelId, revision: &Revision) -> bool {
        matches!(cache::in_hf_cache(&self.hub.cache, id, revision), Ok(Some(_)))
    }

    fn lacks(&self, wanted: &Wanted) -> String {
        format!("not on the hub at revision {}", wanted.revision.as_str())
    }
}

/// The files of one snapshot the cache lacks: the side files (configs, indexes) are downloaded
/// whole and the weight files' headers read ahead in step 3, the weight files downloaded in step 4.
struct HubFetch {
    hub: Arc<Hub>,
    id: ModelId,
    revision: Revision,
    commit: String,
    /// The snapshot in the cache, where the files land.
    files: Arc<dyn ModelFiles>,
    side: Vec<RemoteFile>,
    weights: Vec<RemoteFile>,
    /// What step 3 planned from, to check the downloads against.
    heads: OnceLock<Arc<Heads>>,
}

impl Fetch for HubFetch {
    fn plan_files<'a>(
        &'a self,
        cancel: &'a CancellationToken,
        progress: &'a Arc<FetchProgress>,
    ) -> BoxFuture<'a, Result<Arc<dyn ModelFiles>, Error>> {
        Box::pin(async move {
            let (hub, id, commit) = (&self.hub, &self.id, self.commit.as_str());
            hub.download(id, commit, &self.side, cancel, progress).await?;
            let heads = Arc::new(hub.bounded(cancel, ahead::read_heads(hub, id, commit, &self.weights)).await?);
            let heads = self.heads.get_or_init(|| heads).clone();
            Ok(Arc::new(Ahead { files: self.files.clone(), heads }) as Arc<dyn ModelFiles>)
        })
    }

    fn files(&self) -> usize {
        self.weights.len()
    }

    fn bytes(&self) -> u64 {
        self.weights.iter().map(|f| f.size).sum()
    }

    fn paths(&self) -> Vec<&str> {
        self.weights.iter().map(|f| f.path.as_str()).collect()
    }

    fn fetch<'a>(
        &'a self,
        cancel: &'a CancellationToken,
        progress: &'a Arc<FetchProgress>,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            let (hub, id, commit) = (&self.hub, &self.id, self.commit.as_str());
            hub.download(id, commit, &self.weights, cancel, progress).await?;
            if let Some(heads) = self.heads.get() {
                let (files, heads) = (self.files.clone(), heads.clone());
                tokio::task::spawn_blocking(move || same_heads(files.as_ref(), &heads))
                    .await
                    .map_err(|e| weights::Error::Internal(format!("checking the downloads: {e}")))??;
            }
            write_ref(&self.hub, &self.id, &self.revision, &self.commit);
            Ok(())
        })
    }
}

/// Each downloaded file starts with the bytes its plan was made from (the hub answered one
/// commit's file both times); a file that does not fails the load as corrupt.
fn same_heads(files: &dyn ModelFiles, heads: &Heads) -> Result<(), Error> {
    for (path, head) in heads {
        let file = files.open(path)?.ok_or_else(|| weights::Error::NotFound(format!("{path} after its download")))?;
        let mut bytes = vec![0u8; head.bytes.len()];
        file.read_exact_at(&mut bytes, 0).map_err(|source| weights::Error::Read { file: path.clone(), source })?;
        if bytes != head.bytes {
            return Err(weights::Error::Corrupt {
                file: path.clone(),
                reason: "its header differs from the one read ahead of the download".into(),
            }
            .into());
        }
    }
    Ok(())
}

/// Records the revision's commit in the cache; a failure costs only offline lookups later.
fn write_ref(hub: &Hub, id: &ModelId, revision: &Revision, commit: &str) {
    if let Err(e) = hub.write_ref(id, revision, commit) {
        tracing::warn!(cause = %e, revision = revision.as_str(), "cannot record the revision in the HF cache");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{LocalFiles, ahead::Head};

    #[test]
    fn a_download_whose_header_differs_from_the_one_planned_from_is_corrupt() {
        let tmp = tempfile::tempdir().expect("tmp");
        std::fs::write(tmp.path().join("model.safetensors"), b"0123456789").expect("write");
        let files = LocalFiles::new(tmp.path().to_owned(), tmp.path().canonicalize().expect("root"));
        let heads = |bytes: &[u8]| -> Heads {
            [("model.safetensors".to_owned(), Arc::new(Head { size: 10, bytes: bytes.to_vec() }))].into()
        };
        same_heads(&files, &heads(b"0123")).expect("the same leading bytes");
        let err = same_heads(&files, &heads(b"0124")).expect_err("different leading bytes");
        assert!(
            matches!(&err, Error::Files(weights::Error::Corrupt { file, .. }) if file == "model.safetensors"),
            "{err}"
        );
    }
}
