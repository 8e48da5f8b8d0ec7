//! The peer loaders, each reading every tensor of a model into host memory: candle's own
//! `safetensors::load` and `MmapedSafetensors`, and Python's `safetensors.numpy.load_file` in
//! its own process.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use candle_core::{Device, Tensor};
use fixtures::fixture::Expected;
use model_manager::pipeline_manager::{dtype_name, resident_bytes};
use serde::Deserialize;

use crate::models::sha256;

/// Tensors a peer produced, by name.
pub type Loaded = HashMap<String, Tensor>;

/// candle's `safetensors::load` on every file (it reads the file into memory, then converts each
/// tensor into its own buffer).
pub fn candle_load(files: &[PathBuf]) -> anyhow::Result<(Duration, Loaded)> {
    let start = Instant::now();
    let mut all = HashMap::new();
    for file in files {
        all.extend(candle_core::safetensors::load(file, &Device::Cpu)?);
    }
    Ok((start.elapsed(), all))
}

/// candle's `MmapedSafetensors` over all files, every tensor loaded to the CPU (copied out of the
/// mapping).
pub fn candle_mmap(files: &[PathBuf]) -> anyhow::Result<(Duration, Loaded)> {
    let start = Instant::now();
    let mapped = map(files)?;
    let mut all = HashMap::new();
    for (name, _) in mapped.tensors() {
        let tensor = mapped.load(&name, &Device::Cpu)?;
        all.insert(name, tensor);
    }
    Ok((start.elapsed(), all))
}

#[allow(unsafe_code)]
fn map(files: &[PathBuf]) -> anyhow::Result<candle_core::safetensors::MmapedSafetensors> {
    // SAFETY: the mapping is only unsound if the files change while mapped; the benchmark wrote
    // them and nothing else touches them while it runs.
    Ok(unsafe { candle_core::safetensors::MmapedSafetensors::multi(files)? })
}

/// name → (dtype, shape, sha256) of tensors in host memory.
pub fn checksums(loaded: &Loaded) -> anyhow::Result<Expected> {
    let mut expected = Expected::default();
    for (name, tensor) in loaded {
        let bytes = resident_bytes(tensor)?;
        expected.tensors.insert(
            name.clone(),
            (dtype_name(tensor.dtype()).to_owned(), tensor.dims().iter().map(|&d| d as u64).collect(), sha256(&bytes)),
        );
    }
    Ok(expected)
}

/// Runs a peer in a process of its own and reads the one JSON object it prints; a failure says
/// how it ended and the end of what it wrote to stderr.
pub fn json_of<T: serde::de::DeserializeOwned>(command: &mut Command, what: &str) -> anyhow::Result<T> {
    let output = command.output().with_context(|| format!("running {what}"))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.trim_end().lines().rev().take(5).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!("{what} failed ({}): {}", output.status, tail.join("\n"));
    }
    serde_json::from_slice(&output.stdout).with_context(|| format!("reading {what}'s JSON"))
}

/// What the Python peer script prints.
#[derive(Debug, Deserialize)]
struct PythonRun {
    version: String,
    seconds: Vec<f64>,
    tensors: HashMap<String, (String, Vec<u64>, String)>,
}

/// The Python peer's runs and what it read.
pub struct Python {
    pub version: String,
    pub runs: Vec<Duration>,
    pub tensors: Expected,
}

/// Times `safetensors.numpy.load_file` on every file `runs` times after a warm-up, in a Python
/// process of its own (`python3`, with safetensors, numpy and ml_dtypes installed).
pub fn python(script: &Path, files: &[PathBuf], runs: usize) -> anyhow::Result<Python> {
    let run: PythonRun =
        json_of(Command::new("python3").arg(script).arg("--runs").arg(runs.to_string()).args(files), "the Python peer")
            .context("(`pip install safetensors numpy ml_dtypes` installs what it needs)")?;
    Ok(Python {
        version: run.version,
        runs: run.seconds.into_iter().map(Duration::from_secs_f64).collect(),
        tensors: Expected::observed(run.tensors.into_iter().collect()),
    })
}
