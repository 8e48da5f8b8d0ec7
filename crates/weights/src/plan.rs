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
    header::{self, HeaderError, MAX_TENSORS, TensorPlan},
};

/// The largest JSON side file (config, index) we read: real ones are kilobytes (a thousand-shard
/// index a few MiB); a bigger one is refused rather than parsed into memory the budget does not
/// count.
pub const MAX_JSON_BYTES: u64 = 16 * 1024 * 1024;

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
    /// `sample_size` from its `config.json`: the one config fact kept (the config itself is not).
    pub sample_size: Option<u32>,
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
        self.files().flat_map(|f| &f.tensors).map(|t| t.len).fold(0, u64::saturating_add)
    }

    /// The most bytes a load to `target` holds at once: the resident bytes, plus the bytes as
    /// read of each tensor a conversion replaces (read whole before step 7 converts them).
    pub fn peak_bytes(&self, target: Option<TargetDtype>) -> u64 {
        let replaced = |t: &TensorPlan| target.is_some_and(|d| header::converts(t.dtype) && t.dtype != d.candle());
        let tensors = self.files().flat_map(|f| &f.tensors);
        tensors
            .map(|t| t.resident_bytes(target).saturating_add(if replaced(t) { t.len } else { 0 }))
            .fold(0, u64::saturating_add)
    }

    /// Bytes resident after conversion to `target`: what the budget must hold.
    pub fn resident_bytes(&self, target: Option<TargetDtype>) -> u64 {
        self.files().flat_map(|f| &f.tensors).map(|t| t.resident_bytes(target)).fold(0, u64::saturating_add)
    }

    /// Host bytes of the tensors' metadata (names, shapes, views) while the model is loaded: on
    /// the host whatever the device, and booked there.
    pub fn metadata_bytes(&self) -> u64 {
        self.files().flat_map(|f| &f.tensors).map(TensorPlan::metadata_bytes).fold(0, u64::saturating_add)
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
    let sample_size = planner.config_facts("config.json")?;
    Ok(LoadPlan { layout, components: vec![ComponentPlan { name: String::new(), sample_size, files, variant }] })
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

    /// Why `path` did not parse: not JSON at all, or JSON of the wrong shape (serde says what it
    /// expected and what it found).
    fn json_error(&self, path: &str, e: &serde_json::Error) -> Error {
        match e.classify() {
            serde_json::error::Category::Data => self.bad_config(path, format!("valid JSON of the wrong shape: {e}")),
            _ => self.bad_config(path, format!("not valid JSON: {e}")),
        }
    }

    fn not_an_object(&self, path: &str, value: &serde_json::Value) -> Error {
        self.bad_config(path, format!("not a JSON object but {}", json_kind(value)))
    }

    /// A JSON side file, if it exists.
    fn read_json(&self, path: &str) -> Result<Option<serde_json::Value>, Error> {
        let Some(text) = self.read_json_bytes(path)? else { return Ok(None) };
        serde_json::from_slice(&text).map(Some).map_err(|e| self.json_error(path, &e))
    }

    /// A JSON side file's bytes, if it exists, within [`MAX_JSON_BYTES`].
    fn read_json_bytes(&self, path: &str) -> Result<Option<Vec<u8>>, Error> {
        let Some(file) = self.files.open(path)? else { return Ok(None) };
        let read_error = |source| Error::Read { file: path.to_owned(), source };
        let len = file.size().map_err(read_error)?;
        if len > MAX_JSON_BYTES {
            let what = format!("{len} bytes is over the {MAX_JSON_BYTES}-byte limit of a JSON side file");
            return Err(Error::OverLimit { file: path.to_owned(), what });
        }
        let mut text = vec![0u8; len as usize];
        file.read_exact_at(&mut text, 0).map_err(read_error)?;
        Ok(Some(text))
    }

    /// The facts kept of a `config.json`: `sample_size` (diffusers writes an int, some configs
    /// `[h, w]`: the first). Parsed into that one field; the rest is checked as JSON and dropped.
    fn config_facts(&self, path: &str) -> Result<Option<u32>, Error> {
        #[derive(serde::Deserialize)]
        struct Facts {
            sample_size: Option<serde_json::Value>,
        }
        let Some(text) = self.read_json_bytes(path)? else { return Ok(None) };
        // serde would also take an array for the struct (`[64]`): anything but an object is
        // parsed whole, only to say what it is.
        if text.trim_ascii_start().first() != Some(&b'{') {
            let value: serde_json::Value = serde_json::from_slice(&text).map_err(|e| self.json_error(path, &e))?;
            return Err(self.not_an_object(path, &value));
        }
        let facts: Facts = serde_json::from_slice(&text).map_err(|e| self.json_error(path, &e))?;
        let n = facts.sample_size.and_then(|v| v.as_u64().or_else(|| v.as_array()?.first()?.as_u64()));
        Ok(n.and_then(|n| u32::try_from(n).ok()))
    }

    fn pipeline(&self, model_index: &serde_json::Value) -> Result<LoadPlan, Error> {
        let entries = model_index.as_object().ok_or_else(|| self.not_an_object("model_index.json", model_index))?;
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
            let sample_size = self.config_facts(&join(name, "config.json"))?;
            components.push(ComponentPlan { name: name.clone(), sample_size, files, variant });
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
            .ok_or_else(|| self.bad_config(&index_path, "expected an object with a \"weight_map\" object"))?;
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

    /// Names are unique across the files, and there are at most [`MAX_TENSORS`] of them.
    fn check_unique(&self, files: &[FilePlan]) -> Result<(), Error> {
        let count: usize = files.iter().map(|f| f.tensors.len()).sum();
        if count > MAX_TENSORS {
            let file = files.last().map_or_else(String::new, |f| f.path.clone());
            return Err(Error::OverLimit {
                file,
                what: format!("{count} tensors: over the limit of {MAX_TENSORS} tensors a model"),
            });
        }
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
            HeaderError::TooManyTensors => Error::OverLimit {
                file: path.to_owned(),
                what: format!("more than {MAX_TENSORS} tensors: over the limit of {MAX_TENSORS} tensors a model"),
            },
            HeaderError::Unsupported { tensor, dtype } => {
                Error::UnsupportedDtype { file: path.to_owned(), tensor, dtype }
            }
        })?;
        Ok(FilePlan { path: path.to_owned(), tensors })
    }
}

/// What a JSON value is, for messages.
fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

fn is_plain_file_name(s: &str) -> bool {
    !s.is_empty() && !s.contains('/') && !s.contains('\\') && s != "." && s != ".." && s.ends_with(".safetensors")
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::ReadAt;

    /// A model folder on disk without subfolders.
    struct Folder(tempfile::TempDir);

    impl Folder {
        /// A one-tensor `model.safetensors` and the side files `files`.
        fn with(files: &[(&str, &str)]) -> Self {
            let dir = tempfile::tempdir().expect("tmp");
            let mut header = br#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#.to_vec();
            header.resize(header.len().next_multiple_of(8), b' ');
            let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
            bytes.extend(header);
            bytes.extend(1f32.to_le_bytes());
            std::fs::write(dir.path().join("model.safetensors"), bytes).expect("weights");
            for (name, text) in files {
                std::fs::write(dir.path().join(name), text).expect("side file");
            }
            Self(dir)
        }
    }

    impl ModelFiles for Folder {
        fn list(&self, dir: &str) -> Result<Vec<String>, Error> {
            assert!(dir.is_empty(), "no subfolders");
            let entries = std::fs::read_dir(self.0.path()).expect("read_dir");
            let mut names: Vec<String> =
                entries.map(|e| e.expect("entry").file_name().into_string().expect("utf-8")).collect();
            names.sort();
            Ok(names)
        }

        fn is_dir(&self, dir: &str) -> Result<bool, Error> {
            Ok(dir.is_empty())
        }

        fn open(&self, path: &str) -> Result<Option<Arc<dyn ReadAt>>, Error> {
            Ok(std::fs::File::open(self.0.path().join(path)).ok().map(|f| Arc::new(f) as Arc<dyn ReadAt>))
        }
    }

    fn refusal(files: &[(&str, &str)]) -> String {
        let folder = Folder::with(files);
        let err = build(&folder, None).expect_err("refused");
        assert!(matches!(err, Error::BadConfig { .. }), "{err:?}");
        err.to_string()
    }

    /// Valid JSON of the wrong shape says what was expected, not that the JSON is invalid; JSON
    /// that does not parse says so.
    #[test]
    fn a_side_file_of_the_wrong_shape_says_what_is_wrong() {
        let folder = Folder::with(&[("config.json", r#"{"sample_size": 64}"#)]);
        assert_eq!(build(&folder, None).expect("plans").components[0].sample_size, Some(64));

        for (file, text, says) in [
            ("config.json", "[1, 2]", "config.json: not a JSON object but an array"),
            ("config.json", " [64]", "config.json: not a JSON object but an array"),
            ("config.json", r#""text""#, "config.json: not a JSON object but a string"),
            ("config.json", r#"{"sample_size": 64"#, "config.json: not valid JSON"),
            ("config.json", "{\"sample_size\": 1,", "config.json: not valid JSON"),
            ("model_index.json", "[]", "model_index.json: not a JSON object but an array"),
        ] {
            let said = refusal(&[(file, text)]);
            assert!(said.contains(says), "{file} = {text}: {said}");
            assert_eq!(said.contains("not valid JSON"), says.contains("not valid JSON"), "{file} = {text}: {said}");
        }
    }
}
