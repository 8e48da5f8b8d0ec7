//! Models in folders: [`LocalFiles`] serves one model's folder, confined to the root it was
//! found in, and [`ModelRoot`] is the source of the folders under the model root (`<root>/<name>`
//! or `<root>/<org>/<name>`).

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use futures::future::BoxFuture;
use model_id::{ModelId, ModelSource, Revision};
use weights::{ModelFiles, ReadAt};

use crate::{Error, Located, Source, Wanted, open::open_regular};

/// One model's folder. Every path is resolved with every symlink followed and must stay inside
/// the canonical root: nothing outside it is ever opened.
#[derive(Debug, Clone)]
pub struct LocalFiles {
    /// The folder holding the model's files (a snapshot for the cache; it may not exist yet).
    dir: PathBuf,
    /// The canonical root every file must stay inside.
    root: PathBuf,
}

impl LocalFiles {
    pub fn new(dir: PathBuf, root: PathBuf) -> Self {
        Self { dir, root }
    }

    /// The canonical path of `path` (relative to the model's folder) if it exists and stays
    /// inside the root.
    fn confine(&self, path: &str) -> Result<Option<PathBuf>, weights::Error> {
        let real = match self.dir.join(path).canonicalize() {
            Ok(real) => real,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error()) => {
                return Err(weights::Error::NotAFile { file: path.to_owned(), what: "a symlink loop" });
            }
            Err(source) => return Err(weights::Error::Read { file: path.to_owned(), source }),
        };
        if !real.starts_with(&self.root) {
            return Err(weights::Error::PathEscapes { path: path.to_owned() });
        }
        Ok(Some(real))
    }

    /// The model's folder itself, if it is a folder inside the root.
    pub(crate) fn found(self) -> Result<Option<Self>, weights::Error> {
        match self.confine("")? {
            Some(real) if real.is_dir() => Ok(Some(Self { dir: real, ..self })),
            _ => Ok(None),
        }
    }
}

impl ModelFiles for LocalFiles {
    fn list(&self, dir: &str) -> Result<Vec<String>, weights::Error> {
        let read_error = |source| weights::Error::Read { file: dir.to_owned(), source };
        let real = self.confine(dir)?.unwrap_or_else(|| self.dir.join(dir));
        let mut names: Vec<String> = std::fs::read_dir(real)
            .map_err(read_error)?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect();
        names.sort();
        Ok(names)
    }

    fn is_dir(&self, dir: &str) -> Result<bool, weights::Error> {
        Ok(self.confine(dir)?.is_some_and(|d| d.is_dir()))
    }

    fn open(&self, path: &str) -> Result<Option<Arc<dyn ReadAt>>, weights::Error> {
        let Some(real) = self.confine(path)? else { return Ok(None) };
        let file = open_regular(&real).map_err(|e| e.into_files(path))?;
        Ok(Some(Arc::new(file)))
    }
}

/// The folders of models under one root.
#[derive(Debug, Clone)]
pub struct ModelRoot {
    root: PathBuf,
}

impl ModelRoot {
    pub fn new(root: PathBuf) -> Self {
        Self { root }
    }

    fn find(&self, id: &ModelId) -> Result<Option<LocalFiles>, weights::Error> {
        let Ok(root) = self.root.canonicalize() else { return Ok(None) };
        LocalFiles::new(root.join(id.as_str()), root).found()
    }
}

impl Source for ModelRoot {
    fn locate<'a>(&'a self, wanted: &'a Wanted) -> BoxFuture<'a, Result<Option<Located>, Error>> {
        Box::pin(async move {
            let Some(files) = self.find(&wanted.id)? else { return Ok(None) };
            Ok(Some(Located {
                files: Arc::new(files),
                source: ModelSource::Local,
                revision: String::new(),
                description: format!("found in the model root: {}", wanted.id),
                fetch: None,
            }))
        })
    }

    fn has(&self, id: &ModelId, _revision: &Revision) -> bool {
        matches!(self.find(id), Ok(Some(_)))
    }

    /// Folders (`name` or `org/name`) holding a config, a pipeline index or safetensors files.
    fn list(&self) -> Vec<ModelId> {
        let mut found = Vec::new();
        for (name, path) in subdirs(&self.root) {
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

    fn lacks(&self, _wanted: &Wanted) -> String {
        "not in the model root".into()
    }
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
    use crate::{ModelSource, SourceConfig, Sources, Wanted};

    fn id(s: &str) -> ModelId {
        ModelId::parse(s).expect("valid id")
    }

    /// The offline sources of `config` asked for `id` at `revision`.
    fn locate(config: &SourceConfig, id: &ModelId, revision: &Revision) -> Result<Located, Error> {
        let sources = Sources::from_config(config).expect("sources");
        let wanted = Wanted { id: id.clone(), revision: revision.clone(), variant: None, cancel: Default::default() };
        let runtime = tokio::runtime::Builder::new_current_thread().build().expect("a runtime");
        runtime.block_on(sources.locate(&wanted))
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
        assert!(matches!(missing, Error::Files(weights::Error::NotFound(_))), "{missing}");
        // Only the sources that could hold a repo id speak: the object-store source is not asked.
        assert!(!missing.to_string().contains("object-store"), "{missing}");
        let other_rev = locate(&config, &id("org/cached"), &Revision::parse("v2").expect("rev"));
        assert!(matches!(other_rev, Err(Error::Files(weights::Error::NotFound(_)))));
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
        let config = SourceConfig { model_root: Some(root), offline: true, ..SourceConfig::default() };
        let err = locate(&config, &id("escape"), &Revision::default()).expect_err("refused");
        assert!(matches!(err, Error::Files(weights::Error::PathEscapes { .. })), "{err}");
    }
}
