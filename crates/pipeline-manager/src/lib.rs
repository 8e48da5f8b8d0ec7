//! Storage of loaded pipelines: each model's components, their tensors as resident on the device,
//! the facts read from their configs (`sample_size`), and the model's small files ([`ModelFile`]:
//! configs, tokenizer, scheduler) as plain bytes, served to clients that share no filesystem.
//!
//! A [`Pipeline`] owns its tensors and its [`Allocations`]: removing it from the store drops
//! both at once, which is what gives the memory back. A resident tensor is [`TensorData`]: a view
//! into memory its load's placement owns (a host buffer, a device allocation), or a candle tensor.
//! Resident tensors may live in [`SharedMemory`] that other processes map; a [`Lease`] is one
//! such client's hold on a pipeline (see `leases`).
//! This crate never reads weight files; the loader hands it finished pipelines.

mod leases;
mod shared;

use std::{
    borrow::Cow,
    collections::{BTreeMap, HashSet},
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use candle_core::{DType, Tensor};
use dashmap::DashMap;
pub use model_id::ModelId;
use resource_manager::{Allocations, DeviceId, Target};
use sha2::{Digest, Sha256};

use crate::leases::Clients;
pub use crate::{
    leases::{Attached, Lease},
    shared::{FileChanged, MemoryKind, Region, SharedMemory},
};

/// A tensor's values where they are resident, whoever owns that memory.
pub trait TensorData: Send + Sync + std::fmt::Debug {
    fn dtype(&self) -> DType;
    fn shape(&self) -> &[usize];
    /// Its bytes, little-endian, in row-major order: borrowed where they are in host memory, read
    /// back from a device otherwise.
    fn bytes(&self) -> candle_core::Result<Cow<'_, [u8]>>;
    /// The same values converted to `dtype`, on the same device.
    fn to_dtype(&self, dtype: DType) -> candle_core::Result<Box<dyn TensorData>>;
    /// Where its bytes are in memory other processes can map, if they are.
    fn region(&self) -> Option<Region<'_>> {
        None
    }

    fn size_bytes(&self) -> u64 {
        (self.shape().iter().product::<usize>() * self.dtype().size_in_bytes()) as u64
    }
}

impl TensorData for Tensor {
    fn dtype(&self) -> DType {
        Tensor::dtype(self)
    }

    fn shape(&self) -> &[usize] {
        self.dims()
    }

    fn bytes(&self) -> candle_core::Result<Cow<'_, [u8]>> {
        resident_bytes(self).map(Cow::Owned)
    }

    fn to_dtype(&self, dtype: DType) -> candle_core::Result<Box<dyn TensorData>> {
        Ok(Box::new(Tensor::to_dtype(self, dtype)?))
    }
}

/// One tensor as resident on its device.
#[derive(Debug)]
pub struct ResidentTensor {
    /// The name in its file (without the component prefix).
    pub name: String,
    pub data: Box<dyn TensorData>,
    /// Stored as BOOL: its U8 bytes are each 0 or 1, and it is listed as BOOL.
    pub is_bool: bool,
    /// The checkpoint file it was read from: an index into [`Pipeline::weight_files`] (a u32
    /// sits in the padding after `is_bool`: a tensor's metadata does not grow).
    pub file: u32,
    /// Its device: an index into [`Pipeline::target`]'s devices (at most 64 of them; a u8 in the
    /// same padding).
    pub device: u8,
}

impl ResidentTensor {
    /// The tensor's dtype as safetensors spells it ("F32", "BF16", "BOOL", ...).
    pub fn dtype_name(&self) -> &'static str {
        if self.is_bool { "BOOL" } else { dtype_name(self.data.dtype()) }
    }

    pub fn size_bytes(&self) -> u64 {
        self.data.size_bytes()
    }
}

/// The safetensors spelling of a candle dtype.
pub fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::U8 => "U8",
        DType::U32 => "U32",
        DType::I16 => "I16",
        DType::I32 => "I32",
        DType::I64 => "I64",
        DType::BF16 => "BF16",
        DType::F16 => "F16",
        DType::F32 => "F32",
        DType::F64 => "F64",
        DType::F8E4M3 => "F8_E4M3",
        // The loader refuses the others (placeholder types in candle).
        DType::F6E2M3 => "F6_E2M3",
        DType::F6E3M2 => "F6_E3M2",
        DType::F4 => "F4",
        DType::F8E8M0 => "F8_E8M0",
        _ => "OTHER",
    }
}

/// A tensor's name as clients see it: `component/name` in a pipeline, `name` in a plain model
/// (whose one component's name is empty).
pub fn tensor_name(component: &str, name: &str) -> String {
    if component.is_empty() { name.to_owned() } else { format!("{component}/{name}") }
}

/// One component of a pipeline (`unet`, `vae`, ...), or the whole model for a plain repo.
#[derive(Debug)]
pub struct Component {
    /// The component's folder; empty for a plain (non-pipeline) model.
    pub name: String,
    /// `sample_size` from its `config.json`, when it has one (the config itself is not kept).
    pub sample_size: Option<u32>,
    /// In file order (components' files in plan order); [`Pipeline::tensor_infos`] sorts by name.
    pub tensors: Vec<ResidentTensor>,
}

/// One small non-weight file of a model (a config, a tokenizer file), kept whole with its
/// pipeline: `weights::small_files` says which files these are and fills them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelFile {
    /// Relative to the model's folder (`config.json`, `tokenizer/vocab.json`).
    pub path: String,
    /// Hex sha256 of `content`.
    pub sha256: String,
    /// Shared, so a stream of it outlives no lock and copies nothing up front.
    pub content: Arc<[u8]>,
}

impl ModelFile {
    /// The file at `path` holding `content`, its checksum computed.
    pub fn new(path: String, content: Vec<u8>) -> Self {
        let sha256 = hex::encode(Sha256::digest(&content));
        Self { path, sha256, content: content.into() }
    }

    pub fn size_bytes(&self) -> u64 {
        self.content.len() as u64
    }
}

/// A loaded model: everything resident for it, and the memory it holds.
#[derive(Debug)]
pub struct Pipeline {
    pub model_id: ModelId,
    /// Keyed by component name.
    pub components: BTreeMap<String, Component>,
    /// Its small files, sorted by path; their bytes are booked in the host's allocation with the
    /// tensors' metadata.
    pub files: Vec<Arc<ModelFile>>,
    /// Its checkpoint files, relative to the model's folder, in plan order
    /// (`unet/diffusion_pytorch_model.safetensors`); [`ResidentTensor::file`] indexes them.
    pub weight_files: Vec<String>,
    /// The devices its tensors are resident on.
    pub target: Target,
    pub revision: String,
    /// The accounting of its bytes, per device: its target's, and for a model on a GPU the
    /// host's for its tensors' metadata (names, shapes, views; a model on the CPU books them with
    /// its weights). Declared last: fields drop in order, so the tensors are freed before the
    /// allocations give their bytes back to the budget (and the heap to the OS).
    pub allocations: Allocations,
}

impl Drop for Pipeline {
    // Runs before the fields drop: the thread that frees the tensors must be able to (a GPU's
    // context current on it), so each device's tensors are dropped here, one device at a time,
    // with that device made ready first (a thread has one current context).
    fn drop(&mut self) {
        if self.target.is_single() {
            self.allocations.prepare_free();
            return;
        }
        for (index, &device) in self.target.devices().iter().enumerate() {
            if let Some(allocation) = self.allocations.get(device) {
                allocation.prepare_free();
            }
            for component in self.components.values_mut() {
                component.tensors.retain(|t| usize::from(t.device) != index);
            }
        }
    }
}

/// What ListTensors shows of one tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Prefixed with the component (`unet/conv.weight`) for pipelines.
    pub name: String,
    /// The device it is resident on.
    pub device: DeviceId,
    pub dtype: &'static str,
    pub shape: Vec<u64>,
    pub size_bytes: u64,
    /// Hex sha256 of the resident bytes (little-endian), when asked for.
    pub sha256: Option<String>,
}

/// The tensor's bytes could not be read back from its device.
#[derive(Debug, thiserror::Error)]
#[error("cannot read tensor {name} back from its device: {source}")]
pub struct ReadBackError {
    pub name: String,
    #[source]
    pub source: candle_core::Error,
}

/// Why ListTensors could not read a model's tensors.
#[derive(Debug, thiserror::Error)]
pub enum TensorsError {
    #[error(transparent)]
    ReadBack(#[from] ReadBackError),
    /// A file its tensors are mapped from changed: the model must not be served any more.
    #[error(transparent)]
    Changed(#[from] FileChanged),
}

impl Pipeline {
    /// Whether every memory its tensors live in still holds the bytes loaded (see
    /// [`SharedMemory::check`]); each memory is checked once.
    pub fn check_files(&self) -> Result<(), FileChanged> {
        let mut seen = HashSet::new();
        for (_, t) in self.tensors() {
            if let Some(region) = t.data.region()
                && seen.insert(region.memory.fd().as_raw_fd())
            {
                region.memory.check()?;
            }
        }
        Ok(())
    }

    /// The small file at `path`, if the model has it.
    pub fn file(&self, path: &str) -> Option<&Arc<ModelFile>> {
        self.files.binary_search_by(|f| f.path.as_str().cmp(path)).ok().and_then(|i| self.files.get(i))
    }

    /// Whether it holds a whole copy on each of several devices.
    pub fn is_replicated(&self) -> bool {
        !self.target.is_single() && self.target.layout() == resource_manager::Layout::Replicate
    }

    /// The device `tensor` is resident on.
    pub fn device_of(&self, tensor: &ResidentTensor) -> DeviceId {
        self.target.devices().get(usize::from(tensor.device)).copied().unwrap_or(self.target.first())
    }

    /// The checkpoint file `tensor` was read from ("" if the index is not one of its files).
    pub fn weight_file(&self, tensor: &ResidentTensor) -> &str {
        self.weight_files.get(tensor.file as usize).map_or("", String::as_str)
    }

    /// Bytes of its small files.
    pub fn files_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size_bytes()).sum()
    }

    /// Bytes of every resident tensor.
    pub fn weight_bytes(&self) -> u64 {
        self.tensors().map(|(_, t)| t.size_bytes()).sum()
    }

    /// Every tensor with its component.
    pub fn tensors(&self) -> impl Iterator<Item = (&Component, &ResidentTensor)> {
        self.components.values().flat_map(|c| c.tensors.iter().map(move |t| (c, t)))
    }

    /// `sample_size` from the `unet` component's config for pipelines, else the model's config.
    pub fn sample_size(&self) -> Option<u32> {
        match self.components.get("unet") {
            Some(unet) => unet.sample_size,
            None => self.components.get("").and_then(|c| c.sample_size),
        }
    }

    /// The dtype of the floating-point tensors ("F32", "BF16"), "mixed" when they differ, or the
    /// single dtype of a model without floats.
    pub fn dtype_summary(&self) -> String {
        // One pass, nothing collected: a checkpoint has thousands of tensors and few dtypes.
        let mut floats = self.tensors().map(|(_, t)| t.data.dtype()).filter(|d| d.is_float());
        match floats.next() {
            None => self.tensors().next().map_or("", |(_, t)| t.dtype_name()).to_owned(),
            Some(first) if floats.all(|d| d == first) => dtype_name(first).to_owned(),
            Some(_) => "mixed".to_owned(),
        }
    }

    /// What is resident, sorted by full name; checksums read every byte back from the device,
    /// with the model's files checked before and after (a read that raced a change of a file
    /// reports the change).
    pub fn tensor_infos(&self, with_checksums: bool) -> Result<Vec<TensorInfo>, TensorsError> {
        if with_checksums {
            self.check_files()?;
        }
        let infos = self
            .tensors()
            .map(|(component, t)| {
                let name = tensor_name(&component.name, &t.name);
                let sha256 = if with_checksums {
                    let bytes = t.data.bytes().map_err(|source| ReadBackError { name: name.clone(), source })?;
                    Some(hex::encode(Sha256::digest(&bytes)))
                } else {
                    None
                };
                Ok(TensorInfo {
                    device: self.device_of(t),
                    dtype: t.dtype_name(),
                    shape: t.data.shape().iter().map(|&d| d as u64).collect(),
                    size_bytes: t.size_bytes(),
                    sha256,
                    name,
                })
            })
            .collect::<Result<Vec<_>, ReadBackError>>();
        if with_checksums {
            self.check_files()?;
        }
        let mut infos = infos?;
        // Names are unique on a device (a replicated model has each once per device): an unstable
        // sort gives the one order.
        infos.sort_unstable_by(|a, b| a.name.cmp(&b.name).then(a.device.cmp(&b.device)));
        Ok(infos)
    }
}

/// The tensor's bytes as resident, little-endian, in row-major order.
pub fn resident_bytes(tensor: &Tensor) -> candle_core::Result<Vec<u8>> {
    let flat = tensor.flatten_all()?;
    // A GPU tensor may be a view into a larger allocation, and reading one back copies its whole
    // allocation: copy just its elements on the device first.
    let flat = if flat.device().is_cpu() { flat } else { flat.force_contiguous()? };
    fn bytes<T: candle_core::WithDType + bytemuck::Pod>(t: &Tensor) -> candle_core::Result<Vec<u8>> {
        Ok(bytemuck::cast_slice(&t.to_vec1::<T>()?).to_vec())
    }
    match flat.dtype() {
        DType::U8 => flat.to_vec1::<u8>(),
        DType::U32 => bytes::<u32>(&flat),
        DType::I16 => bytes::<i16>(&flat),
        DType::I32 => bytes::<i32>(&flat),
        DType::I64 => bytes::<i64>(&flat),
        DType::BF16 => bytes::<half::bf16>(&flat),
        DType::F16 => bytes::<half::f16>(&flat),
        DType::F32 => bytes::<f32>(&flat),
        DType::F64 => bytes::<f64>(&flat),
        DType::F8E4M3 => bytes::<float8::F8E4M3>(&flat),
        other => Err(candle_core::Error::Msg(format!("no byte view of {other:?}"))),
    }
}

/// The loaded pipelines, by model id, with when each was last used.
#[derive(Debug, Default)]
pub struct PipelineManager {
    pipelines: DashMap<ModelId, Stored>,
    /// A logical clock: each use takes the next tick, so ticks order uses exactly (no two equal).
    clock: AtomicU64,
}

#[derive(Debug)]
struct Stored {
    pipeline: Arc<Pipeline>,
    last_used: u64,
    /// The wall-clock time of the same use (milliseconds since the Unix epoch), for people: the
    /// tick orders uses, this says when.
    used_unix_ms: u64,
    clients: Arc<Clients>,
    /// On its way out: no new lease.
    closed: bool,
}

/// A loaded model as eviction sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resident {
    pub model_id: ModelId,
    pub bytes: u64,
    /// The tick of its last use: smaller is longer ago.
    pub last_used: u64,
}

impl PipelineManager {
    pub fn new() -> Self {
        Self::default()
    }

    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed)
    }

    /// Milliseconds since the Unix epoch now (0 for a clock set before it).
    fn now_unix_ms() -> u64 {
        let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
    }

    /// Stores a finished pipeline (a use); a previous one of the same model (there should be none)
    /// is returned to the caller to drop.
    pub fn insert(&self, pipeline: Pipeline) -> Option<Arc<Pipeline>> {
        let stored = Stored {
            pipeline: Arc::new(pipeline),
            last_used: self.tick(),
            used_unix_ms: Self::now_unix_ms(),
            clients: Arc::default(),
            closed: false,
        };
        self.pipelines.insert(stored.pipeline.model_id.clone(), stored).map(|old| old.pipeline)
    }

    pub fn get(&self, model_id: &ModelId) -> Option<Arc<Pipeline>> {
        self.pipelines.get(model_id).map(|p| p.pipeline.clone())
    }

    /// Marks the model as used now (asked for again, or its tensors read); false if not stored.
    pub fn touch(&self, model_id: &ModelId) -> bool {
        let tick = self.tick();
        let now = Self::now_unix_ms();
        self.pipelines
            .get_mut(model_id)
            .map(|mut p| {
                p.last_used = tick;
                p.used_unix_ms = now;
            })
            .is_some()
    }

    /// When the model was last used, in milliseconds since the Unix epoch; 0 if not stored.
    pub fn last_used_unix_ms(&self, model_id: &ModelId) -> u64 {
        self.pipelines.get(model_id).map_or(0, |p| p.used_unix_ms)
    }

    /// A lease on the model's pipeline (a use), unless it is not stored or on its way out.
    pub fn attach(&self, model_id: &ModelId) -> Option<Lease> {
        let tick = self.tick();
        let mut stored = self.pipelines.get_mut(model_id).filter(|s| !s.closed)?;
        stored.last_used = tick;
        stored.used_unix_ms = Self::now_unix_ms();
        Some(stored.clients.lease(stored.pipeline.clone()))
    }

    /// How many clients hold a lease on the model's pipeline.
    pub fn clients(&self, model_id: &ModelId) -> usize {
        self.pipelines.get(model_id).map_or(0, |s| s.clients.count())
    }

    /// Closes the model's pipeline to new leases before it is taken out, refusing while clients
    /// hold one unless `force`, which revokes theirs. A model not stored is left alone.
    pub fn close(&self, model_id: &ModelId, force: bool) -> Result<(), Attached> {
        let Some(mut stored) = self.pipelines.get_mut(model_id) else { return Ok(()) };
        let clients = stored.clients.count();
        if clients > 0 && !force {
            return Err(Attached { clients });
        }
        stored.closed = true;
        stored.clients.revoke();
        Ok(())
    }

    /// The pipelines on `device` (one of their target's) without clients, least recently used
    /// first, with the bytes they hold there.
    pub fn least_recently_used(&self, device: DeviceId) -> Vec<Resident> {
        let mut resident: Vec<Resident> = self
            .pipelines
            .iter()
            .filter(|p| p.pipeline.target.contains(device) && !p.closed && p.clients.count() == 0)
            .map(|p| Resident {
                model_id: p.key().clone(),
                bytes: p.pipeline.allocations.bytes(device),
                last_used: p.last_used,
            })
            .collect();
        resident.sort_by_key(|r| r.last_used);
        resident
    }

    /// Takes the pipeline out of the store. Its memory returns when the last holder (a
    /// ListTensors in progress, at most) drops it.
    pub fn remove(&self, model_id: &ModelId) -> Option<Arc<Pipeline>> {
        self.pipelines.remove(model_id).map(|(_, p)| p.pipeline)
    }

    pub fn len(&self) -> usize {
        self.pipelines.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pipelines.is_empty()
    }
}

#[cfg(test)]
mod tests {
    /// A valid model id.
    fn id(s: &str) -> model_id::ModelId {
        model_id::ModelId::parse(s).expect("a valid id")
    }

    use candle_core::Device;
    use resource_manager::{DeviceRequest, MemoryBudget, ResourceManager};

    use super::*;

    fn pipeline(components: Vec<Component>) -> (ResourceManager, Pipeline) {
        let rm =
            ResourceManager::with_cpu_capacity(1 << 30, MemoryBudget::Bytes(1 << 20), DeviceRequest::Cpu).expect("cpu");
        let allocations = rm.reserve_all(&[(DeviceId::Cpu, 0)], &id("m")).expect("fits").commit(|_| 64);
        let pipeline = Pipeline {
            model_id: id("m"),
            components: components.into_iter().map(|c| (c.name.clone(), c)).collect(),
            files: Vec::new(),
            weight_files: Vec::new(),
            target: Target::one(DeviceId::Cpu),
            revision: String::new(),
            allocations,
        };
        (rm, pipeline)
    }

    /// The file and device indexes sit in padding: a resident tensor is as large as before it
    /// named them (the budget's per-tensor metadata figure was measured at this size).
    #[test]
    fn naming_the_file_and_device_does_not_grow_a_tensor() {
        assert_eq!(std::mem::size_of::<ResidentTensor>(), 48);
    }

    fn tensor(name: &str, values: Vec<f32>) -> ResidentTensor {
        let n = values.len();
        ResidentTensor {
            name: name.into(),
            data: Box::new(Tensor::from_vec(values, n, &Device::Cpu).expect("tensor")),
            is_bool: false,
            file: 0,
            device: 0,
        }
    }

    /// A tensor that notes its device when it is dropped.
    #[derive(Debug)]
    struct NotesDrop(Tensor, u8, Arc<std::sync::Mutex<Vec<u8>>>);

    impl TensorData for NotesDrop {
        fn dtype(&self) -> DType {
            self.0.dtype()
        }
        fn shape(&self) -> &[usize] {
            self.0.dims()
        }
        fn bytes(&self) -> candle_core::Result<Cow<'_, [u8]>> {
            self.0.bytes()
        }
        fn to_dtype(&self, dtype: DType) -> candle_core::Result<Box<dyn TensorData>> {
            Ok(Box::new(self.0.to_dtype(dtype)?))
        }
    }

    impl Drop for NotesDrop {
        fn drop(&mut self) {
            self.2.lock().expect("log").push(self.1);
        }
    }

    /// A model over two GPUs frees one GPU's tensors, then the other's (each with its own context
    /// made current first, which only a GPU shows), however its components interleave them.
    #[test]
    fn a_model_over_several_devices_is_freed_device_by_device() {
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let on = |device: u8| ResidentTensor {
            data: Box::new(NotesDrop(Tensor::zeros(2, DType::F32, &Device::Cpu).expect("zeros"), device, log.clone())),
            device,
            ..tensor("t", vec![0.0])
        };
        let (_rm, mut p) = pipeline(vec![
            Component { name: "a".into(), sample_size: None, tensors: vec![on(0), on(1), on(0), on(1)] },
            Component { name: "b".into(), sample_size: None, tensors: vec![on(1), on(0)] },
        ]);
        p.target =
            Target::new(vec![DeviceId::Cuda(0), DeviceId::Cuda(1)], resource_manager::Layout::Split).expect("two");
        drop(p);
        assert_eq!(*log.lock().expect("log"), vec![0, 0, 0, 1, 1, 1]);
    }

    /// One float dtype names the model; two make it "mixed"; integers count only without floats.
    #[test]
    fn dtype_summary_of_floats_and_integers() {
        let cast = |t: ResidentTensor, d: DType| ResidentTensor { data: t.data.to_dtype(d).expect("cast"), ..t };
        let summary = |tensors: Vec<ResidentTensor>| {
            pipeline(vec![Component { name: String::new(), sample_size: None, tensors }]).1.dtype_summary()
        };
        let (a, b, c) = (|| tensor("a", vec![1.0]), || tensor("b", vec![2.0]), || tensor("c", vec![3.0]));
        assert_eq!(summary(vec![cast(a(), DType::U8), cast(b(), DType::BF16), cast(c(), DType::BF16)]), "BF16");
        assert_eq!(summary(vec![cast(a(), DType::BF16), cast(b(), DType::U8), cast(c(), DType::F32)]), "mixed");
        assert_eq!(summary(vec![cast(a(), DType::I64), cast(b(), DType::U8)]), "I64");
        assert_eq!(summary(vec![]), "");
    }

    /// sample_size comes from the unet's config in a pipeline; names carry the component prefix;
    /// checksums are of the little-endian bytes.
    #[test]
    fn pipeline_facts_and_tensor_infos() {
        let (_rm, p) = pipeline(vec![
            Component { name: "unet".into(), sample_size: Some(32), tensors: vec![tensor("w", vec![1.0, 2.0])] },
            Component { name: "vae".into(), sample_size: Some(256), tensors: vec![] },
        ]);
        assert_eq!(p.sample_size(), Some(32));
        assert_eq!(p.weight_bytes(), 8);
        assert_eq!(p.dtype_summary(), "F32");
        let infos = p.tensor_infos(true).expect("read back");
        let mut le = Vec::new();
        le.extend_from_slice(&1.0f32.to_le_bytes());
        le.extend_from_slice(&2.0f32.to_le_bytes());
        assert_eq!(
            infos,
            vec![TensorInfo {
                name: "unet/w".into(),
                device: DeviceId::Cpu,
                dtype: "F32",
                shape: vec![2],
                size_bytes: 8,
                sha256: Some(hex::encode(Sha256::digest(&le))),
            }]
        );
    }

    /// A small file is found by its exact path among files sorted by path, with its checksum.
    #[test]
    fn small_files_by_path() {
        let (_rm, mut p) = pipeline(vec![]);
        let file = |path: &str, text: &str| Arc::new(ModelFile::new(path.into(), text.as_bytes().to_vec()));
        p.files = vec![file("config.json", "{}"), file("tokenizer/vocab.json", "{\"a\": 1}")];
        assert_eq!(p.file("tokenizer/vocab.json").map(|f| f.size_bytes()), Some(8));
        assert_eq!(p.file("config.json").map(|f| f.sha256.clone()), Some(hex::encode(Sha256::digest(b"{}"))));
        assert!(p.file("vocab.json").is_none() && p.file("").is_none());
        assert_eq!(p.files_bytes(), 10);
    }

    /// Removing a pipeline drops its allocation: the accounting goes back to zero.
    #[test]
    fn removing_frees_the_accounting() {
        let (rm, p) = pipeline(vec![Component { name: String::new(), sample_size: None, tensors: vec![] }]);
        let store = PipelineManager::new();
        store.insert(p);
        assert_eq!(rm.usage()[0].used_bytes, 64);
        drop(store.remove(&id("m")));
        assert_eq!(rm.usage()[0].used_bytes, 0);
        assert!(store.is_empty());
    }

    /// Least recently used first: a touch moves a model to the back; other devices are left out.
    #[test]
    fn least_recently_used_order() {
        let rm =
            ResourceManager::with_cpu_capacity(1 << 30, MemoryBudget::Bytes(1 << 20), DeviceRequest::Cpu).expect("cpu");
        let store = PipelineManager::new();
        for (name, bytes) in [("a", 10), ("b", 20), ("c", 30)] {
            let id = id(name);
            store.insert(Pipeline {
                model_id: id.clone(),
                components: BTreeMap::new(),
                files: Vec::new(),
                weight_files: Vec::new(),
                target: Target::one(DeviceId::Cpu),
                revision: String::new(),
                allocations: rm.reserve_all(&[(DeviceId::Cpu, bytes)], &id).expect("fits").commit(|_| bytes),
            });
        }
        let order = |store: &PipelineManager| -> Vec<(String, u64)> {
            store.least_recently_used(DeviceId::Cpu).into_iter().map(|r| (r.model_id.to_string(), r.bytes)).collect()
        };
        assert_eq!(order(&store), [("a".into(), 10), ("b".into(), 20), ("c".into(), 30)]);
        assert!(store.touch(&id("a")));
        assert!(!store.touch(&id("nobody")));
        assert_eq!(order(&store), [("b".into(), 20), ("c".into(), 30), ("a".into(), 10)]);
        assert!(store.least_recently_used(DeviceId::Cuda(0)).is_empty());
    }
}
