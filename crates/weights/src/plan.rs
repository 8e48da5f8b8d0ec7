//! Step 3 (BUILD_STRATEGIES): which files a load reads, in which layout, and every tensor's place
//! in them, from the safetensors headers, validated before any offset is trusted.
//!
//! Layouts: a single `model.safetensors`; shards listed by `model.safetensors.index.json`; a
//! diffusers-style pipeline (`model_index.json` + one folder per component, each single-file or
//! sharded). Pickle weights (`*.bin`, `*.pt`, `*.ckpt`) are never opened.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use model_id::{ModelId, TargetDtype};

use crate::{
    Error,
    choice::{self, Choice},
    files::{ModelFiles, join},
    header::{self, HeaderError, TensorPlan},
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
    /// Relative to the model's folder (`unet/diffusion_pytorch_model.safetensors`).
    pub path: String,
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

/// Builds the plan for the model whose files are `files`, reading the precision `variant` of
/// each folder that has one (`fp16`: see [`choice`]).
pub fn build(files: &dyn ModelFiles, variant: Option<&str>) -> Result<LoadPlan, Error> {
    let planner = Planner { files, variant };
    if let Some(model_index) = planner.read_json("model_index.json")? {
        return planner.pipeline(&model_index);
    }
    let Weights { layout, files, variant } =
        planner.weights_in("")?.ok_or_else(|| Error::NotFound("no safetensors weights in its folder".into()))?;
    let config = planner.read_json("config.json")?;
    Ok(LoadPlan { layout, components: vec![ComponentPlan { name: String::new(), config, files, variant }] })
}

struct Planner<'a> {
    files: &'a dyn ModelFiles,
    variant: Option<&'a str>,
}

impl Planner<'_> {
    fn corrupt(&self, file: &str, reason: impl Into<String>) -> Error {
        Error::Corrupt { file: file.to_owned(), reason: reason.into() }
    }

    fn bad_config(&self, file: &str, reason: impl Into<String>) -> Error {
        Error::BadConfig { file: file.to_owned(), reason: reason.into() }
    }

    /// A JSON side file, if it exists.
    fn read_json(&self, path: &str) -> Result<Option<serde_json::Value>, Error> {
        let Some(file) = self.files.open(path)? else { return Ok(None) };
        let read_error = |source| Error::Read { file: path.to_owned(), source };
        let len = file.size().map_err(read_error)?.min(MAX_JSON_BYTES);
        let mut text = vec![0u8; len as usize];
        file.read_exact_at(&mut text, 0).map_err(read_error)?;
        serde_json::from_slice(&text).map(Some).map_err(|e| self.bad_config(path, e.to_string()))
    }

    fn pipeline(&self, model_index: &serde_json::Value) -> Result<LoadPlan, Error> {
        let entries =
            model_index.as_object().ok_or_else(|| self.bad_config("model_index.json", "not a JSON object"))?;
        let mut components = Vec::new();
        for (name, value) in entries {
            // Components are `"unet": ["diffusers", "UNet2DConditionModel"]`; keys starting with
            // '_' are pipeline metadata. A component name is a folder: check it like an id part.
            let is_component = value.as_array().is_some_and(|a| a.len() == 2 && a.iter().all(|v| v.is_string()));
            if name.starts_with('_') || !is_component || ModelId::parse(name).is_err() || name.contains('/') {
                continue;
            }
            if !self.files.is_dir(name)? {
                continue;
            }
            // Components without weights (scheduler, tokenizer) are configuration only.
            let Some(Weights { files, variant, .. }) = self.weights_in(name)? else { continue };
            let config = self.read_json(&join(name, "config.json"))?;
            components.push(ComponentPlan { name: name.clone(), config, files, variant });
        }
        if components.is_empty() {
            return Err(Error::NotFound("model_index.json names no component with safetensors weights".into()));
        }
        components.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(LoadPlan { layout: Layout::Pipeline, components })
    }

    /// The safetensors files of one folder (see [`choice::choose`]), their layout and variant;
    /// `None` if it has no weights at all; an error if it has only pickle weights.
    fn weights_in(&self, dir: &str) -> Result<Option<Weights>, Error> {
        let names = self.files.list(dir)?;
        match choice::choose(&names, self.variant) {
            Choice::Sharded { index, variant, .. } => {
                Ok(Some(Weights { layout: Layout::Sharded, files: self.sharded(dir, &index)?, variant }))
            }
            Choice::Files { files, variant } => {
                let files = files.iter().map(|n| self.header(&join(dir, n))).collect::<Result<Vec<_>, _>>()?;
                self.check_unique(&files)?;
                let layout = if files.len() == 1 { Layout::SingleFile } else { Layout::Sharded };
                Ok(Some(Weights { layout, files, variant }))
            }
            Choice::PickleOnly(files) => Err(Error::PickleOnly { files: files.join(", ") }),
            Choice::Nothing => Ok(None),
        }
    }

    fn sharded(&self, dir: &str, index_name: &str) -> Result<Vec<FilePlan>, Error> {
        let index_path = join(dir, index_name);
        let index = self.read_json(&index_path)?.unwrap_or_default();
        let weight_map = index
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| self.bad_config(&index_path, "no \"weight_map\" object"))?;
        let mut expected: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for (tensor, shard) in weight_map {
            let shard = shard.as_str().filter(|s| is_plain_file_name(s)).ok_or_else(|| {
                self.bad_config(&index_path, format!("tensor {tensor} maps to an invalid shard name"))
            })?;
            expected.entry(shard).or_default().insert(tensor);
        }
        let mut files = Vec::new();
        for (shard, tensors) in expected {
            let plan = self.header(&join(dir, shard))?;
            let present: BTreeSet<&str> = plan.tensors.iter().map(|t| t.name.as_str()).collect();
            if let Some(missing) = tensors.iter().find(|t| !present.contains(*t)) {
                return Err(self.corrupt(&plan.path, format!("tensor {missing} listed in {index_path} is missing")));
            }
            files.push(plan);
        }
        self.check_unique(&files)?;
        Ok(files)
    }

    fn check_unique(&self, files: &[FilePlan]) -> Result<(), Error> {
        let mut seen = HashMap::new();
        for f in files {
            for t in &f.tensors {
                if let Some(other) = seen.insert(t.name.as_str(), f.path.as_str()) {
                    return Err(self.corrupt(&f.path, format!("tensor {} is also in {other}", t.name)));
                }
            }
        }
        Ok(())
    }

    /// Reads and validates one file's header: its size, JSON, dtypes, shapes and offsets, and that
    /// the data section ends exactly at the end of the file.
    fn header(&self, path: &str) -> Result<FilePlan, Error> {
        let file = self.files.open(path)?.ok_or_else(|| Error::NotFound(format!("{path} is missing")))?;
        let tensors = header::read(file.as_ref()).map_err(|e| match e {
            HeaderError::Io(source) => Error::Read { file: path.to_owned(), source },
            HeaderError::Corrupt(reason) => self.corrupt(path, reason),
            HeaderError::Unsupported { tensor, dtype } => {
                Error::UnsupportedDtype { file: path.to_owned(), tensor, dtype }
            }
        })?;
        Ok(FilePlan { path: path.to_owned(), tensors })
    }
}

fn is_plain_file_name(s: &str) -> bool {
    !s.is_empty() && !s.contains('/') && !s.contains('\\') && s != "." && s != ".." && s.ends_with(".safetensors")
}
