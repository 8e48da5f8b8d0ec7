//! The benchmark's fixture models, written by code into the work folder on every run: a dense
//! sharded model of large mixed F32/BF16 tensors, and a checkpoint of thousands of small ones.

use std::path::{Path, PathBuf};

use anyhow::Context;
use fixtures::fixture::{self, Expected, TensorSpec};
use safetensors::Dtype;
use serde::Serialize;
use serde_json::json;

/// A fixture model on disk and what it holds.
#[derive(Debug, Clone, Serialize)]
pub struct Model {
    /// Its folder name under the model root, which is also its model id.
    pub id: String,
    #[serde(skip)]
    pub dir: PathBuf,
    /// Its safetensors files, in order.
    #[serde(skip)]
    pub files: Vec<PathBuf>,
    pub files_count: usize,
    pub tensors: usize,
    /// Bytes of tensor data (headers excluded).
    pub bytes: u64,
    #[serde(skip)]
    pub expected: Expected,
}

/// A tensor of `bytes` bytes of `dtype` (F32 or BF16), quick to build: one block of deterministic
/// values repeated.
fn large(name: &str, dtype: Dtype, bytes: usize, seed: u64) -> TensorSpec {
    let elem = if dtype == Dtype::BF16 { 2 } else { 4 };
    let elems = bytes / elem;
    let block_elems = elems.min(1 << 18);
    let block = match dtype {
        Dtype::BF16 => TensorSpec::bf16(name, &[block_elems], seed),
        _ => TensorSpec::f32(name, &[block_elems], seed),
    }
    .data;
    let mut data = Vec::with_capacity(elems * elem);
    while data.len() < elems * elem {
        let n = block.len().min(elems * elem - data.len());
        data.extend_from_slice(&block[..n]);
    }
    // Two dimensions, as weight matrices have, when the size allows.
    let shape = if elems.is_multiple_of(1024) { vec![elems / 1024, 1024] } else { vec![elems] };
    TensorSpec { name: name.into(), dtype, shape, data }
}

/// About `mib` MiB in `shards` files of `per_shard` tensors, F32 and BF16 in turn, with an index;
/// written a shard at a time.
pub fn dense(root: &Path, id: &str, mib: usize, shards: usize, per_shard: usize) -> anyhow::Result<Model> {
    dense_of(root, id, mib, shards, per_shard, |i| if i.is_multiple_of(2) { Dtype::F32 } else { Dtype::BF16 })
}

/// As [`dense`], every tensor BF16 (how large checkpoints are published).
pub fn dense_bf16(root: &Path, id: &str, mib: usize, shards: usize, per_shard: usize) -> anyhow::Result<Model> {
    dense_of(root, id, mib, shards, per_shard, |_| Dtype::BF16)
}

fn dense_of(
    root: &Path,
    id: &str,
    mib: usize,
    shards: usize,
    per_shard: usize,
    dtype_of: impl Fn(usize) -> Dtype,
) -> anyhow::Result<Model> {
    let dir = root.join(id);
    reset(&dir)?;
    write_json(&dir.join("config.json"), &json!({"model_type": "bench-dense"}))?;
    let per_tensor = (mib << 20) / (shards * per_shard);
    let mut weight_map = serde_json::Map::new();
    let mut files = Vec::new();
    for s in 0..shards {
        let name = format!("model-{:05}-of-{:05}.safetensors", s + 1, shards);
        let tensors: Vec<_> = (0..per_shard)
            .map(|i| {
                let dtype = dtype_of(s * per_shard + i);
                large(&format!("layers.{s}.{i}.weight"), dtype, per_tensor, (s * per_shard + i) as u64 + 1)
            })
            .collect();
        fixture::write_safetensors(&dir.join(&name), &tensors)?;
        for t in &tensors {
            weight_map.insert(t.name.clone(), json!(name));
        }
        files.push(dir.join(&name));
    }
    write_json(&dir.join("model.safetensors.index.json"), &json!({"metadata": {}, "weight_map": weight_map}))?;
    finish(id, dir, files)
}

/// `count` tensors of 1 to 256 KiB (doubling in turn), F32 and BF16 in turn, in one file.
pub fn many_small(root: &Path, id: &str, count: usize) -> anyhow::Result<Model> {
    many_small_of(root, id, count, |i| if i.is_multiple_of(2) { Dtype::F32 } else { Dtype::BF16 })
}

/// As [`many_small`], every tensor BF16.
pub fn many_small_bf16(root: &Path, id: &str, count: usize) -> anyhow::Result<Model> {
    many_small_of(root, id, count, |_| Dtype::BF16)
}

fn many_small_of(root: &Path, id: &str, count: usize, dtype_of: impl Fn(usize) -> Dtype) -> anyhow::Result<Model> {
    let dir = root.join(id);
    reset(&dir)?;
    write_json(&dir.join("config.json"), &json!({"model_type": "bench-small"}))?;
    let tensors: Vec<_> = (0..count)
        .map(|i| {
            let bytes = 1024 << (i % 9);
            large(&format!("blocks.{}.param{}", i / 16, i % 16), dtype_of(i), bytes, i as u64 + 7)
        })
        .collect();
    let file = dir.join("model.safetensors");
    fixture::write_safetensors(&file, &tensors)?;
    finish(id, dir, vec![file])
}

fn finish(id: &str, dir: PathBuf, files: Vec<PathBuf>) -> anyhow::Result<Model> {
    let expected = checksums_of_files(&files)?;
    Ok(Model {
        id: id.into(),
        files_count: files.len(),
        tensors: expected.tensors.len(),
        bytes: expected.bytes(),
        dir,
        files,
        expected,
    })
}

/// name → (dtype, shape, sha256) of every tensor in `files`, read back from disk: the reference
/// every loader is compared with.
pub fn checksums_of_files(files: &[PathBuf]) -> anyhow::Result<Expected> {
    let mut expected = Expected::default();
    for file in files {
        let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)?;
        for (name, view) in st.tensors() {
            expected.tensors.insert(
                name,
                (format!("{:?}", view.dtype()), view.shape().iter().map(|&d| d as u64).collect(), sha256(view.data())),
            );
        }
    }
    Ok(expected)
}

pub fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

fn reset(dir: &Path) -> anyhow::Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))
}

fn write_json(path: &Path, value: &serde_json::Value) -> anyhow::Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(value)? + "\n")?;
    Ok(())
}
