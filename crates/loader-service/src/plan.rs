//! Step 3 (BUILD_STRATEGIES): which files a load reads, in which layout, and every tensor's place
//! in them, from the safetensors headers, validated before any offset is trusted.
//!
//! Layouts: a single `model.safetensors`; shards listed by `model.safetensors.index.json`; a
//! diffusers-style pipeline (`model_index.json` + one folder per component, each single-file or
//! sharded). Pickle weights (`*.bin`, `*.pt`, `*.ckpt`) are never opened.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    io::Read,
    path::{Path, PathBuf},
};

use crate::{
    error::LoadError,
    header::{self, HeaderError, TensorPlan},
    request::{ModelId, TargetDtype},
    source::Located,
    weights::{self, Choice},
};

/// The largest JSON side file (config, index) we read.
const MAX_JSON_BYTES: u64 = 64 * 1024 * 1024;

/// How the model's weights are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::Display)]
pub enum Layout {
    #[strum(serialize = "single-file safetensors")]
    SingleFile,
    #[strum(serialize = "sharded safetensors")]
    Sharded,
    #[strum(serialize = "diffusers pipeline")]
    Pipeline,
}

/// Everything a load will read, in order.
#[derive(Debug)]
pub struct LoadPlan {
    pub layout: Layout,
    pub components: Vec<ComponentPlan>,
}

/// One component (or the whole model, with an empty name).
#[derive(Debug)]
pub struct ComponentPlan {
    pub name: String,
    pub config: Option<serde_json::Value>,
    pub files: Vec<FilePlan>,
    /// The precision variant read (`fp16`), if any.
    pub variant: Option<String>,
}

/// The weights chosen in one folder.
struct Weights {
    layout: Layout,
    files: Vec<FilePlan>,
    variant: Option<String>,
}

/// One safetensors file, its header validated.
#[derive(Debug)]
pub struct FilePlan {
    /// Canonical path, confined to the source root.
    pub path: PathBuf,
    /// Relative to the model folder, for messages.
    pub display: String,
    /// Sorted by offset.
    pub tensors: Vec<TensorPlan>,
}

impl LoadPlan {
    pub fn files(&self) -> impl Iterator<Item = &FilePlan> {
        self.components.iter().flat_map(|c| c.files.iter())
    }

    /// Bytes read from the files.
    pub fn read_bytes(&self) -> u64 {
        self.files().flat_map(|f| &f.tensors).map(|t| t.len).sum()
    }

    /// Bytes resident after conversion to `target`: what the budget must hold.
    pub fn resident_bytes(&self, target: Option<TargetDtype>) -> u64 {
        self.files().flat_map(|f| &f.tensors).map(|t| t.resident_bytes(target)).sum()
    }

    /// The step's detail: "strategy: sharded safetensors, 2 files, 4.3 GB".
    pub fn describe(&self) -> String {
        let files = self.files().count();
        let gb = self.read_bytes() as f64 / 1e9;
        let mut s = format!("strategy: {}, {files} file{}, {gb:.3} GB", self.layout, if files == 1 { "" } else { "s" });
        if self.layout == Layout::Pipeline {
            let names: Vec<_> = self.components.iter().map(|c| c.name.as_str()).collect();
            s.push_str(&format!(" ({})", names.join(", ")));
        }
        let variants: BTreeSet<&str> = self.components.iter().filter_map(|c| c.variant.as_deref()).collect();
        for v in variants {
            s.push_str(&format!(", {v} variant"));
        }
        s
    }
}

/// Builds the plan for the model in `located`, reading the precision `variant` of each folder
/// that has one (`fp16`: see [`weights`]).
pub fn build(id: &ModelId, located: &Located, variant: Option<&str>) -> Result<LoadPlan, LoadError> {
    let planner = Planner { id, located, variant };
    let index = located.dir.join("model_index.json");
    if let Some(model_index) = planner.read_json(&index)? {
        return planner.pipeline(&model_index);
    }
    let Weights { layout, files, variant } = planner.weights_in(&located.dir)?.ok_or_else(|| LoadError::NotFound {
        model_id: id.to_string(),
        reason: "no safetensors weights in its folder".into(),
    })?;
    let config = planner.read_json(&located.dir.join("config.json"))?;
    Ok(LoadPlan { layout, components: vec![ComponentPlan { name: String::new(), config, files, variant }] })
}

struct Planner<'a> {
    id: &'a ModelId,
    located: &'a Located,
    variant: Option<&'a str>,
}

impl Planner<'_> {
    fn corrupt(&self, file: &str, reason: impl Into<String>) -> LoadError {
        LoadError::Corrupt { model_id: self.id.to_string(), file: file.to_owned(), reason: reason.into() }
    }

    fn read_error(&self, file: &str, source: std::io::Error) -> LoadError {
        LoadError::ReadWeights { model_id: self.id.to_string(), file: file.to_owned(), source }
    }

    /// A JSON side file, if it exists.
    fn read_json(&self, path: &Path) -> Result<Option<serde_json::Value>, LoadError> {
        let display = self.located.display(path);
        let Some(file) = self.located.open(self.id, path)? else { return Ok(None) };
        let mut text = Vec::new();
        file.take(MAX_JSON_BYTES).read_to_end(&mut text).map_err(|e| self.read_error(&display, e))?;
        serde_json::from_slice(&text).map(Some).map_err(|e| LoadError::BadConfig {
            model_id: self.id.to_string(),
            file: display,
            reason: e.to_string(),
        })
    }

    fn pipeline(&self, model_index: &serde_json::Value) -> Result<LoadPlan, LoadError> {
        let entries = model_index.as_object().ok_or_else(|| LoadError::BadConfig {
            model_id: self.id.to_string(),
            file: "model_index.json".into(),
            reason: "not a JSON object".into(),
        })?;
        let mut components = Vec::new();
        for (name, value) in entries {
            // Components are `"unet": ["diffusers", "UNet2DConditionModel"]`; keys starting with
            // '_' are pipeline metadata. A component name is a folder: check it like an id part.
            let is_component = value.as_array().is_some_and(|a| a.len() == 2 && a.iter().all(|v| v.is_string()));
            if name.starts_with('_') || !is_component || ModelId::parse(name).is_err() || name.contains('/') {
                continue;
            }
            let dir = self.located.dir.join(name);
            if self.located.confine(self.id, &dir)?.is_none_or(|d| !d.is_dir()) {
                continue;
            }
            // Components without weights (scheduler, tokenizer) are configuration only.
            let Some(Weights { files, variant, .. }) = self.weights_in(&dir)? else { continue };
            let config = self.read_json(&dir.join("config.json"))?;
            components.push(ComponentPlan { name: name.clone(), config, files, variant });
        }
        if components.is_empty() {
            return Err(LoadError::NotFound {
                model_id: self.id.to_string(),
                reason: "model_index.json names no component with safetensors weights".into(),
            });
        }
        components.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(LoadPlan { layout: Layout::Pipeline, components })
    }

    /// The safetensors files of one folder (see [`weights::choose`]), their layout and variant;
    /// `None` if it has no weights at all; an error if it has only pickle weights.
    fn weights_in(&self, dir: &Path) -> Result<Option<Weights>, LoadError> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .map_err(|e| self.read_error(&self.located.display(dir), e))?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect();
        names.sort();
        match weights::choose(&names, self.variant) {
            Choice::Sharded { index, variant, .. } => {
                Ok(Some(Weights { layout: Layout::Sharded, files: self.sharded(dir, &index)?, variant }))
            }
            Choice::Files { files, variant } => {
                let files = files.iter().map(|n| self.header(&dir.join(n))).collect::<Result<Vec<_>, _>>()?;
                self.check_unique(&files)?;
                let layout = if files.len() == 1 { Layout::SingleFile } else { Layout::Sharded };
                Ok(Some(Weights { layout, files, variant }))
            }
            Choice::PickleOnly(files) => {
                Err(LoadError::PickleOnly { model_id: self.id.to_string(), files: files.join(", ") })
            }
            Choice::Nothing => Ok(None),
        }
    }

    fn sharded(&self, dir: &Path, index_name: &str) -> Result<Vec<FilePlan>, LoadError> {
        let index_path = dir.join(index_name);
        let display = self.located.display(&index_path);
        let index = self.read_json(&index_path)?.unwrap_or_default();
        let weight_map = index.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| LoadError::BadConfig {
            model_id: self.id.to_string(),
            file: display.clone(),
            reason: "no \"weight_map\" object".into(),
        })?;
        let mut expected: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for (tensor, shard) in weight_map {
            let shard = shard.as_str().filter(|s| is_plain_file_name(s)).ok_or_else(|| LoadError::BadConfig {
                model_id: self.id.to_string(),
                file: display.clone(),
                reason: format!("tensor {tensor} maps to an invalid shard name"),
            })?;
            expected.entry(shard).or_default().insert(tensor);
        }
        let mut files = Vec::new();
        for (shard, tensors) in expected {
            let path = dir.join(shard);
            let plan = self.header(&path)?;
            let present: BTreeSet<&str> = plan.tensors.iter().map(|t| t.name.as_str()).collect();
            if let Some(missing) = tensors.iter().find(|t| !present.contains(*t)) {
                return Err(self.corrupt(&plan.display, format!("tensor {missing} listed in {display} is missing")));
            }
            files.push(plan);
        }
        self.check_unique(&files)?;
        Ok(files)
    }

    fn check_unique(&self, files: &[FilePlan]) -> Result<(), LoadError> {
        let mut seen = HashMap::new();
        for f in files {
            for t in &f.tensors {
                if let Some(other) = seen.insert(t.name.as_str(), f.display.as_str()) {
                    return Err(self.corrupt(&f.display, format!("tensor {} is also in {other}", t.name)));
                }
            }
        }
        Ok(())
    }

    /// Reads and validates one file's header: its size, JSON, dtypes, shapes and offsets, and that
    /// the data section ends exactly at the end of the file.
    fn header(&self, path: &Path) -> Result<FilePlan, LoadError> {
        let display = self.located.display(path);
        let file = self.located.open(self.id, path)?.ok_or_else(|| LoadError::NotFound {
            model_id: self.id.to_string(),
            reason: format!("{display} is missing"),
        })?;
        let tensors = header::read(&file).map_err(|e| match e {
            HeaderError::Io(source) => self.read_error(&display, source),
            HeaderError::Corrupt(reason) => self.corrupt(&display, reason),
            HeaderError::Unsupported { tensor, dtype } => {
                LoadError::UnsupportedDtype { model_id: self.id.to_string(), file: display.clone(), tensor, dtype }
            }
        })?;
        Ok(FilePlan { path: path.to_owned(), display, tensors })
    }
}

fn is_plain_file_name(s: &str) -> bool {
    !s.is_empty() && !s.contains('/') && !s.contains('\\') && s != "." && s != ".." && s.ends_with(".safetensors")
}
