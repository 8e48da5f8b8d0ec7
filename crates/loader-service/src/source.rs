//! Step 2 (CACHE_CHECK): where a model's files are. The local model root first, then the
//! Hugging Face cache (the standard `models--org--name/{refs,snapshots,blobs}` layout, shared with
//! Python's `huggingface_hub`). Nothing outside these two roots is ever opened.

use std::{
    fs::File,
    path::{Path, PathBuf},
};

use state_manager::ModelSource;

use crate::{
    error::LoadError,
    hub::{HubConfig, repo_folder},
    request::{ModelId, Revision},
};

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
}

/// A model's folder, found and confined to the root it was found in.
#[derive(Debug, Clone)]
pub struct Located {
    /// The folder holding the model's files (a snapshot for the cache).
    pub dir: PathBuf,
    /// The canonical root every file must stay inside.
    pub root: PathBuf,
    pub source: ModelSource,
    /// The resolved commit for the cache; empty for the model root.
    pub revision: String,
    /// For the step's detail.
    pub description: String,
}

impl Located {
    /// Opens `path` (inside the model's folder) if, with every symlink followed, it stays inside
    /// the root; `Ok(None)` if it does not exist.
    pub fn open(&self, model_id: &ModelId, path: &Path) -> Result<Option<File>, LoadError> {
        let Some(real) = self.confine(model_id, path)? else { return Ok(None) };
        File::open(&real).map(Some).map_err(|source| LoadError::ReadWeights {
            model_id: model_id.to_string(),
            file: self.display(path),
            source,
        })
    }

    /// The canonical path of `path` if it exists and stays inside the root.
    pub fn confine(&self, model_id: &ModelId, path: &Path) -> Result<Option<PathBuf>, LoadError> {
        let real = match path.canonicalize() {
            Ok(real) => real,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(LoadError::ReadWeights {
                    model_id: model_id.to_string(),
                    file: self.display(path),
                    source,
                });
            }
        };
        if !real.starts_with(&self.root) {
            return Err(LoadError::PathEscapes { model_id: model_id.to_string(), path: self.display(path).into() });
        }
        Ok(Some(real))
    }

    /// `path` relative to the model's folder, for messages (never an absolute path of the host).
    pub fn display(&self, path: &Path) -> String {
        path.strip_prefix(&self.dir).unwrap_or(path).display().to_string()
    }
}

/// Finds the model without the hub: the model root, else the HF cache snapshot the revision's
/// ref (or commit) names.
pub fn locate(config: &SourceConfig, id: &ModelId, revision: &Revision) -> Result<Located, LoadError> {
    locate_local(config, id, revision)?.ok_or_else(|| not_found(config, id, revision))
}

/// The model root, else the HF cache; `None` when neither has the model.
pub fn locate_local(config: &SourceConfig, id: &ModelId, revision: &Revision) -> Result<Option<Located>, LoadError> {
    if let Some(root) = &config.model_root
        && let Some(found) = in_model_root(root, id)?
    {
        return Ok(Some(found));
    }
    match &config.hf_cache {
        Some(cache) => in_hf_cache(cache, id, revision),
        None => Ok(None),
    }
}

/// The model root only.
pub fn locate_in_root(config: &SourceConfig, id: &ModelId) -> Result<Option<Located>, LoadError> {
    match &config.model_root {
        Some(root) => in_model_root(root, id),
        None => Ok(None),
    }
}

pub fn not_found(config: &SourceConfig, id: &ModelId, revision: &Revision) -> LoadError {
    let hub = if config.offline { "offline mode: the hub is not asked" } else { "no hub is configured" };
    LoadError::NotFound {
        model_id: id.to_string(),
        reason: format!("not in the model root, not in the HF cache at revision {}, and {hub}", revision.as_str()),
    }
}

/// The cache's snapshot of `commit` (its folder may not exist yet: a download fills it).
pub fn cache_snapshot(
    cache: &Path,
    id: &ModelId,
    commit: &str,
    source: ModelSource,
    description: String,
) -> Result<Located, LoadError> {
    std::fs::create_dir_all(cache).map_err(|source| LoadError::ReadWeights {
        model_id: id.to_string(),
        file: "the HF cache".into(),
        source,
    })?;
    let root = cache.canonicalize().map_err(|source| LoadError::ReadWeights {
        model_id: id.to_string(),
        file: "the HF cache".into(),
        source,
    })?;
    let dir = root.join(repo_folder(id)).join("snapshots").join(commit);
    Ok(Located { dir, root, source, revision: commit.to_owned(), description })
}

fn in_model_root(root: &Path, id: &ModelId) -> Result<Option<Located>, LoadError> {
    let Ok(root) = root.canonicalize() else { return Ok(None) };
    let dir = root.join(id.as_str());
    let located = Located {
        dir: dir.clone(),
        root: root.clone(),
        source: ModelSource::Local,
        revision: String::new(),
        description: format!("found in the model root: {id}"),
    };
    match located.confine(id, &dir)? {
        Some(real) if real.is_dir() => Ok(Some(Located { dir: real, ..located })),
        _ => Ok(None),
    }
}

pub fn in_hf_cache(cache: &Path, id: &ModelId, revision: &Revision) -> Result<Option<Located>, LoadError> {
    let Ok(cache) = cache.canonicalize() else { return Ok(None) };
    let repo_dir = cache.join(repo_folder(id));
    let commit = if revision.is_commit() {
        revision.as_str().to_owned()
    } else {
        match std::fs::read_to_string(repo_dir.join("refs").join(revision.as_str())) {
            Ok(commit) => commit.trim().to_owned(),
            Err(_) => return Ok(None),
        }
    };
    if !(commit.len() == 40 && commit.bytes().all(|b| b.is_ascii_hexdigit())) {
        return Err(LoadError::NotFound {
            model_id: id.to_string(),
            reason: format!("the HF cache ref {} does not hold a commit", revision.as_str()),
        });
    }
    let dir = repo_dir.join("snapshots").join(&commit);
    let located = Located {
        dir: dir.clone(),
        root: cache,
        source: ModelSource::Cache,
        revision: commit.clone(),
        description: format!("cache hit: snapshot {commit}"),
    };
    match located.confine(id, &dir)? {
        Some(real) if real.is_dir() => Ok(Some(Located { dir: real, ..located })),
        _ => Ok(None),
    }
}

/// The ids of the models in the model root: folders (`name` or `org/name`) holding a config,
/// a pipeline index or safetensors files.
pub fn local_models(config: &SourceConfig) -> Vec<ModelId> {
    let Some(root) = &config.model_root else { return Vec::new() };
    let mut found = Vec::new();
    for (name, path) in subdirs(root) {
        if looks_like_model(&path) {
            found.extend(ModelId::parse(&name).ok());
        } else {
            for (inner, inner_path) in subdirs(&path) {
                if looks_like_model(&inner_path) {
                    found.extend(ModelId::parse(&format!("{name}/{inner}")).ok());
                }
            }
        }
    }
    found.sort();
    found
}

fn subdirs(dir: &Path) -> Vec<(String, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    entries
        .filter_map(|e| {
            let e = e.ok()?;
            // Symlinked folders are listed only if they are folders; loading checks confinement.
            let path = e.path();
            path.is_dir().then(|| Some((e.file_name().into_string().ok()?, path)))?
        })
        .collect()
}

fn looks_like_model(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else { return false };
    entries.filter_map(|e| e.ok()?.file_name().into_string().ok()).any(|n| {
        n == "config.json"
            || n == "model_index.json"
            || n.ends_with(".safetensors")
            || n.ends_with(".safetensors.index.json")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> ModelId {
        ModelId::parse(s).expect("valid id")
    }

    /// The model root wins over the cache; the cache resolves refs to snapshots; nothing is NOT_FOUND.
    #[test]
    fn locates_in_root_then_cache() {
        let tmp = tempfile::tempdir().expect("tmp");
        let root = tmp.path().join("models");
        let cache = tmp.path().join("hub");
        std::fs::create_dir_all(root.join("org/local")).expect("mkdir");
        let commit = "0123456789abcdef0123456789abcdef01234567";
        let repo = cache.join("models--org--cached");
        std::fs::create_dir_all(repo.join("snapshots").join(commit)).expect("mkdir");
        std::fs::create_dir_all(repo.join("refs")).expect("mkdir");
        std::fs::write(repo.join("refs/main"), commit).expect("write");
        let config =
            SourceConfig { model_root: Some(root), hf_cache: Some(cache), offline: true, ..SourceConfig::default() };

        let local = locate(&config, &id("org/local"), &Revision::default()).expect("local");
        assert_eq!(local.source, ModelSource::Local);
        let cached = locate(&config, &id("org/cached"), &Revision::default()).expect("cached");
        assert_eq!((cached.source, cached.revision.as_str()), (ModelSource::Cache, commit));
        let by_commit = locate(&config, &id("org/cached"), &Revision::parse(commit).expect("rev")).expect("by commit");
        assert_eq!(by_commit.revision, commit);
        let missing = locate(&config, &id("org/missing"), &Revision::default()).expect_err("missing");
        assert!(matches!(missing, LoadError::NotFound { .. }), "{missing}");
        let other_rev = locate(&config, &id("org/cached"), &Revision::parse("v2").expect("rev"));
        assert!(matches!(other_rev, Err(LoadError::NotFound { .. })));
    }

    /// A model folder that is a symlink leading out of the model root is refused.
    #[test]
    fn symlink_out_of_root_is_refused() {
        let tmp = tempfile::tempdir().expect("tmp");
        let root = tmp.path().join("models");
        let outside = tmp.path().join("outside");
        std::fs::create_dir_all(&root).expect("mkdir");
        std::fs::create_dir_all(&outside).expect("mkdir");
        std::os::unix::fs::symlink(&outside, root.join("escape")).expect("symlink");
        let config = SourceConfig { model_root: Some(root), ..SourceConfig::default() };
        let err = locate(&config, &id("escape"), &Revision::default()).expect_err("refused");
        assert!(matches!(err, LoadError::PathEscapes { .. }), "{err}");
    }
}
