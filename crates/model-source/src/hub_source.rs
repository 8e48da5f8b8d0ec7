//! The hub as a [`Source`]: the revision resolved to a commit and the files a load needs listed
//! (see `hub`); what the HF cache lacks is fetched into it in step 4, and a hub that cannot be
//! reached falls back to the cache's snapshot of the revision.

use std::{path::Path, sync::Arc};

use futures::future::BoxFuture;
use model_id::{ModelId, ModelSource, Revision};
use tokio_util::sync::CancellationToken;

use crate::{
    Error, Fetch, FetchProgress, HubFailure, Located, Source, Wanted, cache,
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
            let snapshot = match hub.resolve(id, revision, wanted.variant).await {
                Ok(snapshot) => snapshot,
                Err(Error::Hub { failure: HubFailure::Unavailable, reason })
                    if let Some(mut cached) = cache::in_hf_cache(&hub.cache, id, revision)? =>
                {
                    cached.description = format!("hub unreachable ({reason}); {}", cached.description);
                    return Ok(Some(cached));
                }
                Err(e) => return Err(e),
            };
            let files = Arc::new(cache::snapshot(&hub.cache, id, &snapshot.commit)?);
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
            let bytes: u64 = missing.iter().map(|f| f.size).sum();
            let fetch = HubFetch {
                hub: hub.clone(),
                id: id.clone(),
                revision: revision.clone(),
                weight_bytes: snapshot.needed.iter().filter(|f| f.path.ends_with(".safetensors")).map(|f| f.size).sum(),
                commit: snapshot.commit.clone(),
                missing,
            };
            Ok(Some(Located {
                files,
                source: ModelSource::Hub,
                description: format!("cache miss: {} files, {bytes} bytes to download", fetch.missing.len()),
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

/// The files of one snapshot the cache lacks, downloaded in step 4.
struct HubFetch {
    hub: Arc<Hub>,
    id: ModelId,
    revision: Revision,
    commit: String,
    missing: Vec<RemoteFile>,
    weight_bytes: u64,
}

impl Fetch for HubFetch {
    fn files(&self) -> usize {
        self.missing.len()
    }

    fn bytes(&self) -> u64 {
        self.missing.iter().map(|f| f.size).sum()
    }

    fn paths(&self) -> Vec<&str> {
        self.missing.iter().map(|f| f.path.as_str()).collect()
    }

    fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }

    fn fetch<'a>(
        &'a self,
        cancel: &'a CancellationToken,
        progress: &'a Arc<FetchProgress>,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            self.hub.download(&self.id, &self.commit, &self.missing, cancel, progress).await?;
            write_ref(&self.hub, &self.id, &self.revision, &self.commit);
            Ok(())
        })
    }
}

/// Records the revision's commit in the cache; a failure costs only offline lookups later.
fn write_ref(hub: &Hub, id: &ModelId, revision: &Revision, commit: &str) {
    if let Err(e) = hub.write_ref(id, revision, commit) {
        tracing::warn!(cause = %e, revision = revision.as_str(), "cannot record the revision in the HF cache");
    }
}
