//! Builds Hugging Face style model folders with real safetensors files, and remembers what it
//! wrote (every tensor's dtype, shape and sha256) so tests can compare with what is resident.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use anyhow::Context;
use safetensors::{Dtype, tensor::TensorView};
use serde_json::json;
use sha2::{Digest, Sha256};

/// One tensor to write.
#[derive(Debug, Clone)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl TensorSpec {
    /// An F32 tensor of deterministic values in [-0.1, 0.1) drawn from `seed`.
    pub fn f32(name: &str, shape: &[usize], seed: u64) -> Self {
        let n: usize = shape.iter().product();
        let mut rng = XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let values: Vec<f32> = (0..n).map(|_| rng.unit() * 0.2 - 0.1).collect();
        Self {
            name: name.into(),
            dtype: Dtype::F32,
            shape: shape.to_vec(),
            data: bytemuck::cast_slice(&values).to_vec(),
        }
    }

    /// A large F32 tensor, quick to build: a 1 MiB block of deterministic values, repeated.
    pub fn f32_large(name: &str, elems: usize, seed: u64) -> Self {
        let block = Self::f32(name, &[elems.min(1 << 18)], seed).data;
        let mut data = Vec::with_capacity(elems * 4);
        while data.len() < elems * 4 {
            let n = block.len().min(elems * 4 - data.len());
            data.extend_from_slice(&block[..n]);
        }
        Self { name: name.into(), dtype: Dtype::F32, shape: vec![elems], data }
    }

    /// A BF16 tensor of deterministic values.
    pub fn bf16(name: &str, shape: &[usize], seed: u64) -> Self {
        let f = Self::f32(name, shape, seed);
        let values: Vec<half::bf16> =
            bytemuck::cast_slice::<u8, f32>(&f.data).iter().map(|&v| half::bf16::from_f32(v)).collect();
        Self { dtype: Dtype::BF16, data: bytemuck::cast_slice(&values).to_vec(), ..f }
    }

    /// An FP8 (F8_E4M3) tensor of deterministic values in [-0.1, 0.1), as FP8 checkpoints store
    /// quantized weights (their scales are separate F32 or BF16 tensors).
    pub fn f8_e4m3(name: &str, shape: &[usize], seed: u64) -> Self {
        let f = Self::f32(name, shape, seed);
        let values = bytemuck::cast_slice::<u8, f32>(&f.data).iter().map(|&v| float8::F8E4M3::from_f32(v).to_bits());
        Self { dtype: Dtype::F8_E4M3, data: values.collect(), ..f }
    }

    /// An I64 tensor `0..n`.
    pub fn i64_range(name: &str, n: usize) -> Self {
        let values: Vec<i64> = (0..n as i64).collect();
        Self { name: name.into(), dtype: Dtype::I64, shape: vec![n], data: bytemuck::cast_slice(&values).to_vec() }
    }

    pub fn sha256(&self) -> String {
        hex::encode(Sha256::digest(&self.data))
    }
}

/// A small, fast, deterministic generator (the fixtures must be byte-for-byte reproducible).
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// What a fixture holds: full tensor name (`unet/x` for pipelines) → (dtype, shape, sha256).
#[derive(Debug, Clone, Default)]
pub struct Expected {
    pub tensors: BTreeMap<String, (String, Vec<u64>, String)>,
    /// What the server books for the tensors' metadata (names as in their files).
    metadata: u64,
}

impl Expected {
    /// Tensors as a loader reported them (to compare with a fixture's); it books nothing.
    pub fn observed(tensors: BTreeMap<String, (String, Vec<u64>, String)>) -> Self {
        Self { tensors, metadata: 0 }
    }

    fn add(&mut self, prefix: &str, tensors: &[TensorSpec]) {
        for t in tensors {
            self.metadata += weights::header::metadata_bytes(&t.name, t.shape.len());
            let name = if prefix.is_empty() { t.name.clone() } else { format!("{prefix}/{}", t.name) };
            self.tensors
                .insert(name, (format!("{:?}", t.dtype), t.shape.iter().map(|&d| d as u64).collect(), t.sha256()));
        }
    }

    /// Host bytes the server books for the tensors' metadata (ModelStatus.metadata_bytes).
    pub fn metadata_bytes(&self) -> u64 {
        self.metadata
    }

    /// What a load of it as stored holds on the CPU: its weights and their metadata.
    pub fn booked(&self) -> u64 {
        self.bytes() + self.metadata
    }

    /// Bytes of all tensors.
    pub fn bytes(&self) -> u64 {
        self.tensors
            .values()
            .map(|(dtype, shape, _)| {
                let elem = match dtype.as_str() {
                    "F32" | "I32" | "U32" => 4,
                    "F16" | "BF16" | "I16" => 2,
                    "F64" | "I64" => 8,
                    _ => 1,
                };
                shape.iter().product::<u64>() * elem
            })
            .sum()
    }
}

/// Writes one safetensors file.
pub fn write_safetensors(path: &Path, tensors: &[TensorSpec]) -> anyhow::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let views = tensors
        .iter()
        .map(|t| Ok((t.name.clone(), TensorView::new(t.dtype, t.shape.clone(), &t.data)?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    safetensors::serialize_to_file(views, None, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn write_json(path: &Path, value: &serde_json::Value) -> anyhow::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(path, serde_json::to_string_pretty(value)? + "\n")?;
    Ok(())
}

/// A model with one `model.safetensors` and a `config.json`.
pub fn single_file_model(dir: &Path, tensors: &[TensorSpec]) -> anyhow::Result<Expected> {
    write_json(&dir.join("config.json"), &json!({"model_type": "test", "hidden_size": 64}))?;
    write_safetensors(&dir.join("model.safetensors"), tensors)?;
    let mut expected = Expected::default();
    expected.add("", tensors);
    Ok(expected)
}

/// A model split into `shards` files with a `model.safetensors.index.json`.
pub fn sharded_model(dir: &Path, tensors: &[TensorSpec], shards: usize) -> anyhow::Result<Expected> {
    write_json(&dir.join("config.json"), &json!({"model_type": "test"}))?;
    let per_shard = tensors.len().div_ceil(shards.max(1));
    let mut weight_map = serde_json::Map::new();
    for (i, chunk) in tensors.chunks(per_shard.max(1)).enumerate() {
        let name = format!("model-{:05}-of-{:05}.safetensors", i + 1, shards);
        write_safetensors(&dir.join(&name), chunk)?;
        for t in chunk {
            weight_map.insert(t.name.clone(), json!(name));
        }
    }
    let total: usize = tensors.iter().map(|t| t.data.len()).sum();
    write_json(
        &dir.join("model.safetensors.index.json"),
        &json!({"metadata": {"total_size": total}, "weight_map": weight_map}),
    )?;
    let mut expected = Expected::default();
    expected.add("", tensors);
    Ok(expected)
}

/// `count` F32 tensors of `elems` elements each, seeded by index.
pub fn f32_tensors(prefix: &str, count: usize, elems: usize) -> Vec<TensorSpec> {
    (0..count).map(|i| TensorSpec::f32(&format!("{prefix}.{i}.weight"), &[elems], i as u64 + 1)).collect()
}

/// A model shaped like a small transformer, in 2 shards: an F32 embedding (`vocab` × `hidden`), a
/// BF16 output head, and per layer four F32 attention matrices (`hidden`²), three BF16 MLP
/// matrices (4 × `hidden`²) and small F32 biases and norms (`hidden`). Sizes from KiB to tens of
/// MiB, as allocators meet them in real models. hidden 512, 16 layers, vocab 32000: ~266 MB.
pub fn transformer_like_model(dir: &Path, hidden: usize, layers: usize, vocab: usize) -> anyhow::Result<Expected> {
    let mut tensors = vec![
        TensorSpec { shape: vec![vocab, hidden], ..TensorSpec::f32_large("embed.weight", vocab * hidden, 1) },
        TensorSpec::bf16("lm_head.weight", &[vocab, hidden], 2),
    ];
    for l in 0..layers {
        let seed = 100 * (l as u64 + 1);
        for (i, m) in ["q", "k", "v", "o"].iter().enumerate() {
            tensors.push(TensorSpec::f32(&format!("layers.{l}.attn.{m}.weight"), &[hidden, hidden], seed + i as u64));
            tensors.push(TensorSpec::f32(&format!("layers.{l}.attn.{m}.bias"), &[hidden], seed + 10 + i as u64));
        }
        for (i, (m, shape)) in
            [("up", [4 * hidden, hidden]), ("gate", [4 * hidden, hidden]), ("down", [hidden, 4 * hidden])]
                .iter()
                .enumerate()
        {
            tensors.push(TensorSpec::bf16(&format!("layers.{l}.mlp.{m}.weight"), shape, seed + 20 + i as u64));
        }
        for (i, n) in ["attn_norm", "mlp_norm"].iter().enumerate() {
            tensors.push(TensorSpec::f32(&format!("layers.{l}.{n}.weight"), &[hidden], seed + 30 + i as u64));
        }
    }
    sharded_model(dir, &tensors, 2)
}

/// A model of about `mib` MiB in `shards` files of `per_shard` F32 tensors each, written one shard
/// at a time so the builder never holds more than a shard in memory.
pub fn large_sharded_model(dir: &Path, mib: usize, shards: usize, per_shard: usize) -> anyhow::Result<Expected> {
    write_json(&dir.join("config.json"), &json!({"model_type": "test"}))?;
    let elems = mib * (1 << 20) / 4 / (shards * per_shard);
    let mut weight_map = serde_json::Map::new();
    let mut expected = Expected::default();
    for s in 0..shards {
        let name = format!("model-{:05}-of-{:05}.safetensors", s + 1, shards);
        let tensors: Vec<_> = (0..per_shard)
            .map(|i| TensorSpec::f32_large(&format!("layers.{s}.{i}.weight"), elems, (s * per_shard + i) as u64 + 1))
            .collect();
        write_safetensors(&dir.join(&name), &tensors)?;
        for t in &tensors {
            weight_map.insert(t.name.clone(), json!(name));
        }
        expected.add("", &tensors);
    }
    write_json(&dir.join("model.safetensors.index.json"), &json!({"metadata": {}, "weight_map": weight_map}))?;
    Ok(expected)
}

/// The bundled demo: a tiny diffusers-style pipeline (`unet` with `sample_size` 32, `vae`, and a
/// weightless `scheduler`), a few MB of deterministic F32 weights.
pub fn demo_tiny_sd(dir: &Path) -> anyhow::Result<Expected> {
    write_json(
        &dir.join("model_index.json"),
        &json!({
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": "0.30.0",
            "scheduler": ["diffusers", "DDIMScheduler"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"]
        }),
    )?;
    write_json(
        &dir.join("scheduler/scheduler_config.json"),
        &json!({"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_schedule": "scaled_linear"}),
    )?;
    write_json(
        &dir.join("unet/config.json"),
        &json!({
            "_class_name": "UNet2DConditionModel",
            "sample_size": 32,
            "in_channels": 4,
            "out_channels": 4,
            "block_out_channels": [64, 128],
            "cross_attention_dim": 128
        }),
    )?;
    write_json(
        &dir.join("vae/config.json"),
        &json!({
            "_class_name": "AutoencoderKL",
            "sample_size": 64,
            "in_channels": 3,
            "latent_channels": 4,
            "block_out_channels": [32, 64]
        }),
    )?;
    let unet = vec![
        TensorSpec::f32("conv_in.weight", &[64, 4, 3, 3], 1),
        TensorSpec::f32("conv_in.bias", &[64], 2),
        TensorSpec::f32("down_blocks.0.resnets.0.conv1.weight", &[64, 64, 3, 3], 3),
        TensorSpec::f32("down_blocks.0.resnets.0.conv2.weight", &[64, 64, 3, 3], 4),
        TensorSpec::f32("down_blocks.1.resnets.0.conv1.weight", &[128, 64, 3, 3], 5),
        TensorSpec::f32("down_blocks.1.resnets.0.conv2.weight", &[128, 128, 3, 3], 6),
        TensorSpec::f32("mid_block.attentions.0.to_q.weight", &[128, 128], 7),
        TensorSpec::f32("mid_block.attentions.0.to_k.weight", &[128, 128], 8),
        TensorSpec::f32("mid_block.attentions.0.to_v.weight", &[128, 128], 9),
        TensorSpec::f32("up_blocks.0.resnets.0.conv1.weight", &[128, 256, 3, 3], 10),
        TensorSpec::f32("conv_out.weight", &[4, 64, 3, 3], 11),
        TensorSpec::f32("conv_out.bias", &[4], 12),
    ];
    let vae = vec![
        TensorSpec::f32("encoder.conv_in.weight", &[32, 3, 3, 3], 21),
        TensorSpec::f32("encoder.down_blocks.0.resnets.0.conv1.weight", &[32, 32, 3, 3], 22),
        TensorSpec::f32("encoder.down_blocks.1.resnets.0.conv1.weight", &[64, 32, 3, 3], 23),
        TensorSpec::f32("decoder.up_blocks.0.resnets.0.conv1.weight", &[64, 64, 3, 3], 24),
        TensorSpec::f32("decoder.conv_out.weight", &[3, 32, 3, 3], 25),
        TensorSpec::f32("quant_conv.weight", &[8, 8, 1, 1], 26),
    ];
    write_safetensors(&dir.join("unet/diffusion_pytorch_model.safetensors"), &unet)?;
    write_safetensors(&dir.join("vae/diffusion_pytorch_model.safetensors"), &vae)?;
    let mut expected = Expected::default();
    expected.add("unet", &unet);
    expected.add("vae", &vae);
    Ok(expected)
}

/// The bundled models folder of the repository.
pub fn repo_models_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models")
}
