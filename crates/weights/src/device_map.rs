//! Which of a load's devices each tensor goes to: pure bookkeeping over the plan, no memory.
//!
//! - [`Layout::Replicate`]: every tensor on every device.
//! - [`Layout::Split`], balanced: the model is cut into blocks that stay whole on one device (a
//!   transformer layer, `model.layers.7.*`; a module outside the layers, `lm_head.*`; a whole
//!   component of a pipeline), the blocks are ordered as the layers are numbered, and runs of
//!   consecutive blocks go to the devices in the order the target names them, each run close to
//!   an equal share of the bytes: as accelerate's `device_map="balanced"`, which also never splits
//!   a layer. Each device then holds its share give or take one block (see [`DeviceMap::split`]).
//! - [`Layout::Split`] with an explicit map: module prefixes to devices, as accelerate's
//!   `device_map={"model.layers.0": 0, ...}`; the longest prefix that matches a tensor's name at
//!   a `.` or `/` boundary wins (`""` matches everything). Every tensor must be matched, and every
//!   device named must be one of the target's.
//!
//! Step 3 reserves [`DeviceMap::bytes`] on each device before any byte is read.

use std::{cmp::Ordering, collections::BTreeMap};

use model_id::TargetDtype;
use resource_manager::{DeviceId, Layout, Target};

use crate::{
    header,
    plan::{self, LoadPlan},
};

/// Why a requested map cannot place the plan: the request's fault (INVALID_ARGUMENT).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceMapError {
    #[error("the device map sends {prefix:?} to {device}, which is not one of the load's devices ({devices})")]
    UnknownDevice { prefix: String, device: DeviceId, devices: String },
    #[error("the device map places no device for {count} tensor(s), such as {first}")]
    Unmapped { count: usize, first: String },
    #[error("the device map's entry {prefix:?} matches no tensor of the model")]
    Unused { prefix: String },
    #[error("a device map applies to a split load; a replicated one holds every tensor on every device")]
    MapWithReplicate,
    #[error("a device map places a model over several devices; this load is onto {device} alone")]
    OneDevice { device: DeviceId },
}

/// Where each tensor of a plan goes, and what that comes to on each device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceMap {
    devices: Vec<DeviceId>,
    /// Per tensor in plan order (components, files, tensors): the index of its device, or `None`
    /// for every device (replicated).
    assigned: Vec<Option<usize>>,
    /// Resident bytes per device, in the order of `devices`.
    bytes: Vec<u64>,
    /// The most bytes per device while loading: a tensor converted to another dtype is read
    /// whole as stored first (as [`LoadPlan::peak_bytes`] counts for one device).
    peak: Vec<u64>,
}

impl DeviceMap {
    /// The map of `plan` over `target`, its tensors resident as `dtype` (`None`: as stored): an
    /// explicit `map` of module prefixes to devices, or balanced.
    pub fn new(
        plan: &LoadPlan,
        target: &Target,
        dtype: Option<TargetDtype>,
        map: Option<&[(String, DeviceId)]>,
    ) -> Result<Self, DeviceMapError> {
        let tensors = tensors(plan, dtype);
        match (target.layout(), map) {
            _ if target.is_single() && map.is_none() => Ok(Self::on(target.devices(), &tensors, |_| Some(0))),
            (Layout::Replicate, Some(_)) => Err(DeviceMapError::MapWithReplicate),
            (Layout::Replicate, None) => Ok(Self::on(target.devices(), &tensors, |_| None)),
            (Layout::Split, Some(map)) => Self::explicit(target, &tensors, map),
            (Layout::Split, None) => Ok(Self::split(target.devices(), plan, &tensors)),
        }
    }

    /// The devices it places on, as the target names them.
    pub fn devices(&self) -> &[DeviceId] {
        &self.devices
    }

    /// The resident bytes each device holds once loaded.
    pub fn bytes(&self) -> impl Iterator<Item = (DeviceId, u64)> + '_ {
        self.devices.iter().copied().zip(self.bytes.iter().copied())
    }

    /// The most bytes each device holds while loading: what step 3 reserves there.
    pub fn peak_bytes(&self) -> impl Iterator<Item = (DeviceId, u64)> + '_ {
        self.devices.iter().copied().zip(self.peak.iter().copied())
    }

    /// How many tensors it places (the plan's).
    pub fn tensors(&self) -> usize {
        self.assigned.len()
    }

    /// The devices of tensor `index` (in plan order): one for a split load, all for a replica.
    pub fn devices_of(&self, index: usize) -> &[DeviceId] {
        match self.assigned.get(index).copied().flatten() {
            Some(d) => std::slice::from_ref(&self.devices[d]),
            None => &self.devices,
        }
    }

    fn on(devices: &[DeviceId], tensors: &[Tensor], device: impl Fn(usize) -> Option<usize>) -> Self {
        let assigned: Vec<_> = (0..tensors.len()).map(device).collect();
        let (mut bytes, mut peak) = (vec![0u64; devices.len()], vec![0u64; devices.len()]);
        for (t, a) in tensors.iter().zip(&assigned) {
            let on = match a {
                Some(d) => *d..*d + 1,
                None => 0..devices.len(),
            };
            for d in on {
                bytes[d] = bytes[d].saturating_add(t.bytes);
                peak[d] = peak[d].saturating_add(t.peak);
            }
        }
        Self { devices: devices.to_vec(), assigned, bytes, peak }
    }

    /// Balanced: the blocks in layer order, each on the device whose equal share of the bytes
    /// holds the block's middle byte. A device's run then starts and ends within half a block of
    /// its share's edges, so it holds its share give or take one block's bytes, and never less
    /// than nothing or more than everything.
    fn split(devices: &[DeviceId], plan: &LoadPlan, tensors: &[Tensor]) -> Self {
        let mut blocks: BTreeMap<BlockKey, u64> = BTreeMap::new();
        let pipeline = plan.layout == plan::Layout::Pipeline;
        for t in tensors {
            let bytes = blocks.entry(block_of(pipeline, t)).or_default();
            *bytes = bytes.saturating_add(t.bytes);
        }
        let total: u128 = blocks.values().map(|&b| u128::from(b)).sum();
        let n = devices.len() as u128;
        let mut device_of = BTreeMap::new();
        let mut before = 0u128;
        for (key, bytes) in &blocks {
            let middle = 2 * before + u128::from(*bytes); // twice the block's middle byte
            let share = if total == 0 { 0 } else { (middle * n / (2 * total)).min(n - 1) };
            device_of.insert(key, share as usize);
            before += u128::from(*bytes);
        }
        Self::on(devices, tensors, |i| Some(device_of[&block_of(pipeline, &tensors[i])]))
    }

    fn explicit(target: &Target, tensors: &[Tensor], map: &[(String, DeviceId)]) -> Result<Self, DeviceMapError> {
        let devices = target.devices();
        let mut index = Vec::with_capacity(map.len());
        for (prefix, device) in map {
            let named = || devices.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
            let d = devices.iter().position(|d| d == device).ok_or_else(|| DeviceMapError::UnknownDevice {
                prefix: prefix.clone(),
                device: *device,
                devices: named(),
            })?;
            index.push(d);
        }
        let mut used = vec![false; map.len()];
        let mut unmapped = Vec::new();
        let mut assigned = Vec::with_capacity(tensors.len());
        for t in tensors {
            match entry_for(map, &t.name) {
                Some(entry) => {
                    used[entry] = true;
                    assigned.push(index[entry]);
                }
                None => {
                    unmapped.push(t.name.as_str());
                    assigned.push(0);
                }
            }
        }
        if !unmapped.is_empty() {
            let first = unmapped.iter().take(3).copied().collect::<Vec<_>>().join(", ");
            return Err(DeviceMapError::Unmapped { count: unmapped.len(), first });
        }
        if let Some(entry) = used.iter().position(|u| !u) {
            return Err(DeviceMapError::Unused { prefix: map[entry].0.clone() });
        }
        Ok(Self::on(devices, tensors, |i| Some(assigned[i])))
    }
}

/// A tensor as the map sees it: its name as clients see it (`component/name` in a pipeline) and
/// its resident bytes.
struct Tensor {
    name: String,
    component: usize,
    bytes: u64,
    peak: u64,
}

fn tensors(plan: &LoadPlan, dtype: Option<TargetDtype>) -> Vec<Tensor> {
    let mut out = Vec::new();
    for (c, component) in plan.components.iter().enumerate() {
        for t in component.files.iter().flat_map(|f| &f.tensors) {
            let name = pipeline_manager::tensor_name(&component.name, &t.name);
            let bytes = t.resident_bytes(dtype);
            let converted = dtype.is_some_and(|d| header::converts(t.dtype) && t.dtype != d.candle());
            let peak = bytes.saturating_add(if converted { t.len } else { 0 });
            out.push(Tensor { name, component: c, bytes, peak });
        }
    }
    out
}

/// The device an explicit map puts the tensor `name` on (`component/name` in a pipeline): its
/// longest prefix's; `None` where none names it.
pub fn device_for(map: &[(String, DeviceId)], name: &str) -> Option<DeviceId> {
    entry_for(map, name).map(|entry| map[entry].1)
}

/// The entry of `map` that places `name`: the longest prefix naming it.
fn entry_for(map: &[(String, DeviceId)], name: &str) -> Option<usize> {
    let named = map.iter().enumerate().filter(|(_, (prefix, _))| matches(prefix, name));
    named.max_by_key(|(_, (prefix, _))| prefix.len()).map(|(entry, _)| entry)
}

/// Whether `prefix` names `name` or a module above it.
fn matches(prefix: &str, name: &str) -> bool {
    prefix.is_empty()
        || name
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('.') || rest.starts_with('/'))
}

/// A block that stays whole on one device, ordered as layers are numbered: the component of a
/// pipeline, else the name up to its first numbered part (`model.layers.7`), else the module
/// (`lm_head`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct BlockKey {
    component: usize,
    key: String,
}

fn block_of(pipeline: bool, t: &Tensor) -> BlockKey {
    if pipeline {
        return BlockKey { component: t.component, key: String::new() };
    }
    let parts: Vec<&str> = t.name.split('.').collect();
    let end = match parts.iter().position(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())) {
        Some(i) => i + 1,
        None => parts.len().saturating_sub(1).max(1),
    };
    BlockKey { component: t.component, key: parts[..end].join(".") }
}

impl Ord for BlockKey {
    /// Components in order, then names with their numbers compared as numbers (`layers.2` before
    /// `layers.10`).
    fn cmp(&self, other: &Self) -> Ordering {
        self.component.cmp(&other.component).then_with(|| natural(&self.key, &other.key))
    }
}

impl PartialOrd for BlockKey {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Compares runs of digits by their value and everything else byte by byte.
fn natural(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        match (a.first(), b.first()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let digits = |s: &[u8]| s.iter().take_while(|c| c.is_ascii_digit()).count();
                let (da, db) = (digits(a), digits(b));
                let (na, nb) = (trim_zeros(&a[..da]), trim_zeros(&b[..db]));
                let by_value = na.len().cmp(&nb.len()).then_with(|| na.cmp(nb)).then_with(|| da.cmp(&db));
                if by_value != Ordering::Equal {
                    return by_value;
                }
                (a, b) = (&a[da..], &b[db..]);
            }
            (Some(x), Some(y)) if x != y => return x.cmp(y),
            _ => (a, b) = (&a[1..], &b[1..]),
        }
    }
}

fn trim_zeros(digits: &[u8]) -> &[u8] {
    let zeros = digits.iter().take_while(|&&c| c == b'0').count();
    &digits[zeros..]
}

#[cfg(test)]
mod tests {
    use candle_core::DType;

    use super::*;
    use crate::{
        header::TensorPlan,
        plan::{ComponentPlan, FilePlan},
    };

    fn tensor(name: &str, bytes: u64) -> TensorPlan {
        TensorPlan {
            name: name.into(),
            dtype: DType::BF16,
            shape: vec![(bytes / 2) as usize],
            offset: 0,
            len: bytes,
            is_bool: false,
        }
    }

    fn component(name: &str, tensors: Vec<TensorPlan>) -> ComponentPlan {
        ComponentPlan {
            name: name.into(),
            sample_size: None,
            files: vec![FilePlan { path: "model.safetensors".into(), tensors }],
            variant: None,
        }
    }

    /// A Llama-like checkpoint as a safetensors header lists it (names sorted: `layers.10` before
    /// `layers.2`): embeddings, `layers` layers of uneven sizes, a norm and a head.
    fn llama(layers: usize) -> LoadPlan {
        let mut tensors = vec![tensor("model.embed_tokens.weight", 64_000), tensor("lm_head.weight", 64_000)];
        for l in 0..layers {
            let size = 10_000 + (l as u64 * 7919) % 5_000 * 2;
            for part in ["self_attn.q_proj.weight", "self_attn.o_proj.weight", "mlp.up_proj.weight"] {
                tensors.push(tensor(&format!("model.layers.{l}.{part}"), size));
            }
            tensors.push(tensor(&format!("model.layers.{l}.input_layernorm.weight"), 256));
        }
        tensors.push(tensor("model.norm.weight", 256));
        tensors.sort_by(|a, b| a.name.cmp(&b.name));
        LoadPlan { layout: plan::Layout::SingleFile, components: vec![component("", tensors)] }
    }

    fn gpus(n: usize) -> Vec<DeviceId> {
        (0..n).map(DeviceId::Cuda).collect()
    }

    fn names_of(plan: &LoadPlan) -> Vec<String> {
        tensors(plan, None).into_iter().map(|t| t.name).collect()
    }

    /// Each device of a balanced split holds its equal share give or take the largest block;
    /// every layer is whole on one device, and the layers run in order over the devices.
    #[test]
    fn a_split_is_balanced_within_one_block_of_equal_shares() {
        for (layers, n) in [(32, 2), (32, 3), (80, 4), (7, 8), (3, 2)] {
            let plan = llama(layers);
            let target = Target::new(gpus(n), Layout::Split).expect("target");
            let map = DeviceMap::new(&plan, &target, None, None).expect("split");
            let total = plan.resident_bytes(None);
            let largest_block = 64_000;
            let bytes: Vec<u64> = map.bytes().map(|(_, b)| b).collect();
            assert_eq!(bytes.iter().sum::<u64>(), total);
            for b in &bytes {
                let ideal = total as f64 / n as f64;
                assert!((*b as f64 - ideal).abs() <= largest_block as f64, "{layers} layers on {n}: {bytes:?}");
            }
            let names = names_of(&plan);
            let device = |name: &str| map.devices_of(names.iter().position(|n| n == name).expect(name))[0];
            let mut last = DeviceId::Cuda(0);
            for l in 0..layers {
                let d = device(&format!("model.layers.{l}.self_attn.q_proj.weight"));
                for part in ["self_attn.o_proj.weight", "mlp.up_proj.weight", "input_layernorm.weight"] {
                    assert_eq!(device(&format!("model.layers.{l}.{part}")), d, "layer {l} is whole");
                }
                assert!(d >= last, "layer {l} on {d} after {last}: layers run in order");
                last = d;
            }
        }
    }

    /// Replicas: every tensor on every device, each holding the whole model.
    #[test]
    fn a_replica_holds_everything_on_every_device() {
        let plan = llama(4);
        let target = Target::new(gpus(3), Layout::Replicate).expect("target");
        let map = DeviceMap::new(&plan, &target, None, None).expect("replicate");
        let total = plan.resident_bytes(None);
        assert!(map.bytes().all(|(_, b)| b == total));
        assert_eq!(map.devices_of(0), &gpus(3)[..]);
        let map = vec![(String::new(), DeviceId::Cuda(0))];
        assert_eq!(DeviceMap::new(&plan, &target, None, Some(&map)), Err(DeviceMapError::MapWithReplicate));
    }

    /// One device takes everything, with or without a layout.
    #[test]
    fn one_device_holds_everything() {
        let plan = llama(2);
        let map = DeviceMap::new(&plan, &Target::one(DeviceId::Cpu), None, None).expect("one");
        assert_eq!(map.bytes().collect::<Vec<_>>(), vec![(DeviceId::Cpu, plan.resident_bytes(None))]);
    }

    /// An explicit map: the longest matching prefix wins, at module boundaries only.
    #[test]
    fn an_explicit_map_places_by_longest_prefix() {
        let plan = llama(3);
        let target = Target::new(gpus(2), Layout::Split).expect("target");
        let map = vec![
            (String::new(), DeviceId::Cuda(0)),
            ("model.layers.1".to_string(), DeviceId::Cuda(1)),
            ("model.layers.2.mlp".to_string(), DeviceId::Cuda(1)),
            ("lm_head".to_string(), DeviceId::Cuda(1)),
        ];
        let placed = DeviceMap::new(&plan, &target, None, Some(&map)).expect("explicit");
        let names = names_of(&plan);
        for (i, name) in names.iter().enumerate() {
            let on_1 = name.starts_with("model.layers.1.")
                || name.starts_with("model.layers.2.mlp.")
                || name == "lm_head.weight";
            assert_eq!(placed.devices_of(i), &[DeviceId::Cuda(if on_1 { 1 } else { 0 })], "{name}");
        }
        // `model.layers.1` is not a prefix of `model.layers.10`'s module: add a tenth layer.
        let plan = llama(11);
        let map = vec![("model.layers.1".to_string(), DeviceId::Cuda(1)), (String::new(), DeviceId::Cuda(0))];
        let placed = DeviceMap::new(&plan, &target, None, Some(&map)).expect("explicit");
        let names = names_of(&plan);
        let i = names.iter().position(|n| n == "model.layers.10.mlp.up_proj.weight").expect("layer 10");
        assert_eq!(placed.devices_of(i), &[DeviceId::Cuda(0)]);
        // Bytes follow the map.
        let on_1: u64 =
            tensors(&plan, None).iter().filter(|t| t.name.starts_with("model.layers.1.")).map(|t| t.bytes).sum();
        assert_eq!(placed.bytes().collect::<Vec<_>>()[1], (DeviceId::Cuda(1), on_1));
    }

    /// A device outside the target, a tensor no entry places and an entry that places nothing are
    /// each refused by name.
    #[test]
    fn bad_maps_are_refused_by_name() {
        let plan = llama(2);
        let target = Target::new(gpus(2), Layout::Split).expect("target");
        let unknown = vec![(String::new(), DeviceId::Cuda(0)), ("lm_head".to_string(), DeviceId::Cuda(3))];
        let e = DeviceMap::new(&plan, &target, None, Some(&unknown)).expect_err("cuda:3");
        assert!(e.to_string().contains("\"lm_head\" to cuda:3") && e.to_string().contains("cuda:0,cuda:1"), "{e}");

        let partial = vec![("model.layers".to_string(), DeviceId::Cuda(0)), ("lm_head".to_string(), DeviceId::Cuda(1))];
        let e = DeviceMap::new(&plan, &target, None, Some(&partial)).expect_err("misses tensors");
        assert_eq!(
            e,
            DeviceMapError::Unmapped { count: 2, first: "model.embed_tokens.weight, model.norm.weight".into() }
        );

        let typo = vec![(String::new(), DeviceId::Cuda(0)), ("model.layerz".to_string(), DeviceId::Cuda(1))];
        let e = DeviceMap::new(&plan, &target, None, Some(&typo)).expect_err("typo");
        assert_eq!(e, DeviceMapError::Unused { prefix: "model.layerz".into() });
    }

    /// A pipeline's components stay whole, and its names are `component/name`.
    #[test]
    fn a_pipeline_splits_by_component() {
        let plan = LoadPlan {
            layout: plan::Layout::Pipeline,
            components: vec![
                component("text_encoder", vec![tensor("a.0.w", 300), tensor("a.1.w", 300)]),
                component("unet", vec![tensor("down.0.w", 2_000), tensor("up.0.w", 2_000)]),
                component("vae", vec![tensor("dec.w", 900)]),
            ],
        };
        let target = Target::new(gpus(2), Layout::Split).expect("target");
        let map = DeviceMap::new(&plan, &target, None, None).expect("split");
        let devices: Vec<DeviceId> = (0..5).map(|i| map.devices_of(i)[0]).collect();
        assert_eq!(devices[0], devices[1], "the text encoder is whole");
        assert_eq!(devices[2], devices[3], "the unet is whole");
        let explicit = vec![("unet".to_string(), DeviceId::Cuda(1)), (String::new(), DeviceId::Cuda(0))];
        let map = DeviceMap::new(&plan, &target, None, Some(&explicit)).expect("explicit");
        assert_eq!(map.bytes().collect::<Vec<_>>(), vec![(DeviceId::Cuda(0), 1_500), (DeviceId::Cuda(1), 4_000)]);
    }

    /// Conversion changes what a device holds: the map books resident bytes.
    #[test]
    fn shares_are_of_resident_bytes() {
        let plan = llama(2);
        let target = Target::new(gpus(2), Layout::Split).expect("target");
        let as_f32 = DeviceMap::new(&plan, &target, Some(TargetDtype::F32), None).expect("split");
        assert_eq!(as_f32.bytes().map(|(_, b)| b).sum::<u64>(), 2 * plan.resident_bytes(None));
        // While loading, each device also holds its tensors as stored: the plan's peak, shared out.
        let peak: u64 = as_f32.peak_bytes().map(|(_, b)| b).sum();
        assert_eq!(peak, plan.peak_bytes(Some(TargetDtype::F32)));
        let as_stored = DeviceMap::new(&plan, &target, None, None).expect("split");
        assert!(as_stored.peak_bytes().eq(as_stored.bytes()), "nothing converted: the peak is the end state");
    }

    #[test]
    fn numbers_sort_by_value() {
        let mut keys = vec!["layers.10", "layers.2", "layers.02x", "lm_head", "layers.1", "embed"];
        keys.sort_by(|a, b| natural(a, b));
        assert_eq!(keys, vec!["embed", "layers.1", "layers.2", "layers.02x", "layers.10", "lm_head"]);
    }
}
