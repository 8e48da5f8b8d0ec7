//! The load's two seams used from outside the crate, with no other change: a source that serves a
//! model from memory and a placement that counts the bytes it is given, plugged into a loader that
//! then runs all eight steps through them.

use std::{
    collections::BTreeMap,
    io,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
};

use futures::future::BoxFuture;
use loader_service::{
    LoadError, LoadRequest, LoadUpdate, LoaderConfig, LoaderParts, LoaderService, ModelId, Placements, Seams, Sources,
    model_source::{Error, Located, ModelSource, Revision, Source, Wanted},
    weights::{
        self, HostPlacement, ModelFiles, Placed, Placement, ReadAt,
        device_map::DeviceMap,
        placement::{Chunk, Chunking, Destination, Group},
    },
};
use pipeline_manager::PipelineManager;
use resource_manager::{DeviceId, DeviceRequest, Layout, MemoryBudget, ResourceManager, Target, TargetRequest};
use sha2::{Digest, Sha256};
use state_manager::StateManager;
use tokio_util::sync::CancellationToken;

/// Files' bytes by path.
type Files = BTreeMap<String, Arc<Vec<u8>>>;

/// A loader over `sources` and `placements`, booking on `resources` and keeping its models in
/// `pipelines`.
fn loader(
    sources: Vec<Arc<dyn Source>>,
    placements: Arc<dyn Placements>,
    (resources, pipelines): (&ResourceManager, &Arc<PipelineManager>),
    config: LoaderConfig,
) -> Arc<LoaderService> {
    let seams = Seams { sources: Sources::new(sources, "nothing else is asked"), placements };
    let parts = LoaderParts {
        config,
        state: Arc::new(StateManager::new(64)),
        resources: resources.clone(),
        pipelines: pipelines.clone(),
        cancel: CancellationToken::new(),
    };
    LoaderService::with_seams(parts, seams)
}

/// Files held in memory.
struct MemoryFiles(Files);

struct MemoryFile(Arc<Vec<u8>>);

impl ReadAt for MemoryFile {
    fn size(&self) -> io::Result<u64> {
        Ok(self.0.len() as u64)
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(io::Error::other)?;
        let bytes = self.0.get(start..start + buf.len()).ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(bytes);
        Ok(())
    }
}

impl ModelFiles for MemoryFiles {
    fn list(&self, dir: &str) -> Result<Vec<String>, weights::Error> {
        let names = self.0.keys().filter_map(|path| match path.rsplit_once('/') {
            Some((parent, name)) if parent == dir => Some(name.to_owned()),
            None if dir.is_empty() => Some(path.clone()),
            _ => None,
        });
        Ok(names.collect())
    }

    fn is_dir(&self, dir: &str) -> Result<bool, weights::Error> {
        Ok(self.0.keys().any(|path| path.starts_with(&format!("{dir}/"))))
    }

    fn open(&self, path: &str) -> Result<Option<Arc<dyn ReadAt>>, weights::Error> {
        Ok(self.0.get(path).map(|bytes| Arc::new(MemoryFile(bytes.clone())) as Arc<dyn ReadAt>))
    }
}

/// One model whose files are given (in memory); counts how often it was asked for.
struct MemorySource {
    id: ModelId,
    files: Arc<dyn ModelFiles>,
    asked: AtomicUsize,
}

impl Source for MemorySource {
    fn locate<'a>(&'a self, wanted: &'a Wanted) -> BoxFuture<'a, Result<Option<Located>, Error>> {
        self.asked.fetch_add(1, Ordering::SeqCst);
        let found = (wanted.id == self.id).then(|| Located {
            files: self.files.clone(),
            source: ModelSource::Local,
            revision: "in-memory".into(),
            description: "served from memory".into(),
            fetch: None,
        });
        Box::pin(async move { Ok(found) })
    }

    fn has(&self, id: &ModelId, _: &Revision) -> bool {
        *id == self.id
    }

    fn lacks(&self, _: &Wanted) -> String {
        "not in memory".into()
    }
}

/// Host memory, in chunks of 64 bytes, counting every byte the readers put there.
#[derive(Default)]
struct CountingPlacement {
    bytes: AtomicU64,
    chunks: AtomicUsize,
}

struct Counting<'a> {
    inner: &'a dyn Destination,
    counts: &'a CountingPlacement,
}

impl Destination for Counting<'_> {
    fn fill(
        &self,
        index: usize,
        stop: &dyn Fn() -> bool,
        fill: &mut dyn FnMut(&mut [u8]) -> Result<(), weights::Error>,
    ) -> Result<bool, weights::Error> {
        self.inner.fill(index, stop, &mut |buffer| {
            fill(buffer)?;
            self.counts.bytes.fetch_add(buffer.len() as u64, Ordering::SeqCst);
            self.counts.chunks.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
    }
}

impl Placement for CountingPlacement {
    fn chunking(&self, _: u64, _: usize) -> Chunking {
        Chunking { chunk: 64, edge_chunk: 64, edge: 0 }
    }

    fn place(
        &self,
        groups: &[Group],
        chunks: &[Chunk],
        readers: &(dyn Fn(&dyn Destination) + Sync),
    ) -> Result<Box<dyn Placed>, weights::Error> {
        HostPlacement.place(groups, chunks, &|inner| readers(&Counting { inner, counts: self }))
    }
}

struct Toy(Arc<CountingPlacement>);

impl Placements for Toy {
    fn placement(&self, _: &Target, _: Option<&DeviceMap>, _: &ModelId) -> Result<Arc<dyn Placement>, LoadError> {
        Ok(self.0.clone())
    }
}

/// A small model: a config and one safetensors file of an F32 and an I64 tensor.
fn model() -> (Files, Vec<(String, Vec<u8>)>) {
    use safetensors::{Dtype, tensor::TensorView};
    let w: Vec<u8> = (0..300u32).flat_map(|i| (i as f32 * 0.5).to_le_bytes()).collect();
    let ids: Vec<u8> = (0..10i64).flat_map(|i| (i * 7).to_le_bytes()).collect();
    let views = [
        ("w", TensorView::new(Dtype::F32, vec![30, 10], &w).expect("w")),
        ("ids", TensorView::new(Dtype::I64, vec![10], &ids).expect("ids")),
    ];
    let file = safetensors::serialize(views, None).expect("serialize");
    let files = BTreeMap::from([
        ("config.json".to_owned(), Arc::new(br#"{"sample_size": 8}"#.to_vec())),
        ("model.safetensors".to_owned(), Arc::new(file)),
    ]);
    (files, vec![("ids".into(), ids), ("w".into(), w)])
}

#[test]
fn a_toy_source_and_a_toy_placement_load_a_model_through_every_step() {
    let id = ModelId::parse("toy/in-memory").expect("id");
    let (files, tensors) = model();
    let source =
        Arc::new(MemorySource { id: id.clone(), files: Arc::new(MemoryFiles(files)), asked: AtomicUsize::new(0) });
    let placement = Arc::new(CountingPlacement::default());
    let resources =
        ResourceManager::with_cpu_capacity(1 << 30, MemoryBudget::Bytes(1 << 20), DeviceRequest::Cpu).expect("cpu");
    let pipelines = Arc::new(PipelineManager::new());
    let placements = Arc::new(Toy(placement.clone()));
    let loader = loader(vec![source.clone()], placements, (&resources, &pipelines), LoaderConfig::default());

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let (mut steps, outcome) = runtime.block_on(async {
        let mut stream = loader.load(LoadRequest::new(id.clone())).await.expect("the load starts");
        let mut steps = Vec::new();
        loop {
            match tokio::time::timeout(std::time::Duration::from_secs(60), stream.next()).await {
                Ok(Some(LoadUpdate::Progress(p))) => steps.push(p.step.number()),
                Ok(Some(LoadUpdate::Done(outcome))) => break (steps, outcome),
                Ok(None) => panic!("the stream ended without an outcome"),
                Err(_) => panic!("no update within 60 s"),
            }
        }
    });
    assert!(outcome.is_ok(), "{outcome:?}");
    steps.dedup();
    assert_eq!(steps.len(), 8, "every step, in order: {steps:?}");
    assert!(steps.windows(2).all(|w| w[0] < w[1]), "{steps:?}");
    assert_eq!(source.asked.load(Ordering::SeqCst), 1);

    let data_bytes: u64 = tensors.iter().map(|(_, b)| b.len() as u64).sum();
    assert_eq!(placement.bytes.load(Ordering::SeqCst), data_bytes, "the placement got every byte once");
    assert!(placement.chunks.load(Ordering::SeqCst) >= (data_bytes / 64) as usize, "in chunks of 64 bytes");
    let pipeline = pipelines.get(&id).expect("registered");
    assert_eq!(pipeline.sample_size(), Some(8), "the config came through the source");
    let infos = pipeline.tensor_infos(true).expect("checksums");
    for (info, (name, bytes)) in infos.iter().zip(&tensors) {
        assert_eq!(&info.name, name);
        assert_eq!(info.sha256.as_deref(), Some(hex::encode(Sha256::digest(bytes)).as_str()), "{name}");
    }
    // `w` is 30×10, `ids` 10; the config travels with the model as a small file.
    let metadata = weights::header::metadata_bytes("w", 2) + weights::header::metadata_bytes("ids", 1);
    let small_files = br#"{"sample_size": 8}"#.len() as u64;
    assert_eq!(
        resources.usage()[0].used_bytes,
        data_bytes + metadata + small_files,
        "booked: the weights, their metadata and the config"
    );

    let missing = ModelId::parse("toy/elsewhere").expect("id");
    let message = runtime.block_on(async move {
        let mut stream = loader.load(LoadRequest::new(missing)).await.expect("starts");
        loop {
            if let Some(LoadUpdate::Done(outcome)) = stream.next().await {
                break outcome.expect_err("not found").to_string();
            }
        }
    });
    assert_eq!(message, "model toy/elsewhere not found: not in memory, and nothing else is asked");
}

/// Files on a filesystem that has stalled: listing them blocks until the gate opens, as a read
/// from a hung network mount blocks in the kernel.
struct StalledFiles(std::sync::Mutex<std::sync::mpsc::Receiver<()>>);

impl ModelFiles for StalledFiles {
    fn list(&self, _: &str) -> Result<Vec<String>, weights::Error> {
        let _ = self.0.lock().expect("gate").recv();
        Err(weights::Error::NotFound("the filesystem came back empty".into()))
    }

    fn is_dir(&self, _: &str) -> Result<bool, weights::Error> {
        Ok(false)
    }

    fn open(&self, _: &str) -> Result<Option<Arc<dyn ReadAt>>, weights::Error> {
        Ok(None)
    }
}

/// A load whose files block for ever at step 3 does not wedge its load slot: CancelLoad ends it
/// CANCELLED at once while the blocked thread is still stuck, and the next load (with one load
/// slot in all) gets the slot and loads.
#[test]
fn a_load_stalled_in_its_files_is_cancelled_and_frees_its_slot() {
    let stalled_id = ModelId::parse("toy/stalled").expect("id");
    let good_id = ModelId::parse("toy/in-memory").expect("id");
    // Made before the gate, so it is dropped after it: a failed assertion drops the gate, which
    // frees the blocked thread the runtime's drop waits for.
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let (gate, stalled) = std::sync::mpsc::channel();
    let stalled_files: Arc<dyn ModelFiles> = Arc::new(StalledFiles(std::sync::Mutex::new(stalled)));
    let stalled = Arc::new(MemorySource { id: stalled_id.clone(), files: stalled_files, asked: AtomicUsize::new(0) });
    let good = Arc::new(MemorySource {
        id: good_id.clone(),
        files: Arc::new(MemoryFiles(model().0)),
        asked: AtomicUsize::new(0),
    });
    let resources =
        ResourceManager::with_cpu_capacity(1 << 30, MemoryBudget::Bytes(1 << 20), DeviceRequest::Cpu).expect("cpu");
    let placements = Arc::new(Toy(Arc::new(CountingPlacement::default())));
    let one_slot = LoaderConfig { max_concurrent_loads: 1, ..LoaderConfig::default() };
    let loader = loader(vec![stalled, good], placements, (&resources, &Arc::new(PipelineManager::new())), one_slot);
    runtime.block_on(async {
        let wait = std::time::Duration::from_secs(30);
        let mut stream = loader.load(LoadRequest::new(stalled_id.clone())).await.expect("the load starts");
        // Step 3 reached: the plan's thread is blocked in the files.
        loop {
            match tokio::time::timeout(wait, stream.next()).await.expect("progress") {
                Some(LoadUpdate::Progress(p)) if p.step.number() == 3 => break,
                Some(LoadUpdate::Progress(_)) => {}
                other => panic!("the stalled load ended early: {:?}", other.is_some()),
            }
        }
        // A request for another dtype than the load in flight is refused, not joined.
        let bf16 =
            LoadRequest { dtype: Some(loader_service::TargetDtype::BF16), ..LoadRequest::new(stalled_id.clone()) };
        let refused = loader.load(bf16).await.err().expect("another dtype than in flight is refused");
        assert_eq!(refused.kind(), loader_service::Kind::Conflict, "{refused}");
        assert_eq!(
            refused.to_string(),
            "model toy/stalled is loading on cpu (as stored); asked for BF16: unload it first to load it so"
        );
        let mut joined = loader.load(LoadRequest::new(stalled_id.clone())).await.expect("the same request joins");
        assert!(loader.cancel(&stalled_id), "the stalled load is in flight");
        let outcome = loop {
            match tokio::time::timeout(wait, stream.next()).await.expect("the cancel ends the stalled load") {
                Some(LoadUpdate::Done(outcome)) => break outcome,
                Some(LoadUpdate::Progress(_)) => {}
                None => panic!("no outcome"),
            }
        };
        assert!(outcome.expect_err("cancelled").is_cancelled());
        loop {
            match tokio::time::timeout(wait, joined.next()).await.expect("the joined stream ends too") {
                Some(LoadUpdate::Done(outcome)) => break assert!(outcome.expect_err("cancelled").is_cancelled()),
                Some(LoadUpdate::Progress(_)) => {}
                None => panic!("no outcome"),
            }
        }
        let mut next = loader.load(LoadRequest::new(good_id.clone())).await.expect("the next load starts");
        loop {
            match tokio::time::timeout(wait, next.next()).await.expect("the next load gets the slot") {
                Some(LoadUpdate::Done(outcome)) => break outcome.expect("the next load loads"),
                Some(LoadUpdate::Progress(_)) => {}
                None => panic!("no outcome"),
            }
        }
    });
    gate.send(()).expect("the blocked thread is still waiting");
}

/// Two fake GPUs (books alone), each tensor's bytes in host memory that counts what its device
/// was given: the devices' placements of a load over several, through the same
/// `placement_over_devices` the server's own placements use.
struct FakeGpus(Vec<Arc<CountingPlacement>>);

impl FakeGpus {
    fn one(&self, device: DeviceId) -> Result<Arc<dyn Placement>, LoadError> {
        match device {
            DeviceId::Cuda(n) => Ok(self.0[n].clone()),
            DeviceId::Cpu => Ok(Arc::new(HostPlacement)),
        }
    }
}

impl Placements for FakeGpus {
    fn placement(
        &self,
        target: &Target,
        map: Option<&DeviceMap>,
        _: &ModelId,
    ) -> Result<Arc<dyn Placement>, LoadError> {
        if !target.is_single() {
            return loader_service::placement_over_devices(target, map, |d| self.one(d));
        }
        self.one(target.first())
    }
}

/// A Llama-like checkpoint: an embedding, `layers` layers of two F32 tensors and a head.
fn layered(layers: usize) -> (Files, u64) {
    use safetensors::{Dtype, tensor::TensorView};
    let mut named: Vec<(String, Vec<u8>, Vec<usize>)> = Vec::new();
    let mut push = |name: String, rows: usize| {
        let bytes: Vec<u8> = (0..rows * 16).flat_map(|i| ((i * 31 % 97) as f32).to_le_bytes()).collect();
        named.push((name, bytes, vec![rows, 16]));
    };
    push("model.embed_tokens.weight".into(), 64);
    for l in 0..layers {
        push(format!("model.layers.{l}.mlp.weight"), 40 + l * 3);
        push(format!("model.layers.{l}.attn.weight"), 24);
    }
    push("lm_head.weight".into(), 64);
    let total = named.iter().map(|(_, b, _)| b.len() as u64).sum();
    let views = named.iter().map(|(n, b, s)| (n.clone(), TensorView::new(Dtype::F32, s.clone(), b).expect("view")));
    let file = safetensors::serialize(views, None).expect("serialize");
    let files = BTreeMap::from([
        ("config.json".to_owned(), Arc::new(b"{}".to_vec())),
        ("model.safetensors".to_owned(), Arc::new(file)),
    ]);
    (files, total)
}

/// The end of a load's stream.
async fn outcome(loader: &Arc<LoaderService>, request: LoadRequest) -> Result<(), String> {
    let mut stream = loader.load(request).await.map_err(|e| format!("[{}] {e}", e.kind().name()))?;
    loop {
        match tokio::time::timeout(std::time::Duration::from_secs(60), stream.next()).await {
            Ok(Some(LoadUpdate::Done(outcome))) => {
                break outcome.map_err(|e| format!("[{}] {e}", e.kind().name()));
            }
            Ok(Some(LoadUpdate::Progress(_))) => {}
            Ok(None) => panic!("the stream ended without an outcome"),
            Err(_) => panic!("no outcome within 60 s"),
        }
    }
}

/// A loader over three fake GPUs (books alone) loading `toy/layers` from memory: cuda:0 and
/// cuda:2 of 1 MiB, cuda:1 too small for the whole model.
struct Gpus {
    id: ModelId,
    total: u64,
    gpus: Vec<Arc<CountingPlacement>>,
    resources: ResourceManager,
    pipelines: Arc<PipelineManager>,
    loader: Arc<LoaderService>,
    runtime: tokio::runtime::Runtime,
}

impl Gpus {
    fn new() -> Self {
        let (files, total) = layered(6);
        Self::serving(Arc::new(MemoryFiles(files)), total)
    }

    /// The same loader, `toy/layers` being `files` of `total` tensor bytes.
    fn serving(files: Arc<dyn ModelFiles>, total: u64) -> Self {
        let id = ModelId::parse("toy/layers").expect("id");
        let source = Arc::new(MemorySource { id: id.clone(), files, asked: AtomicUsize::new(0) });
        let gpus: Vec<_> = (0..3).map(|_| Arc::new(CountingPlacement::default())).collect();
        let capacities = [1 << 20, total * 3 / 4, 1 << 20];
        let resources = ResourceManager::with_test_devices(1 << 30, &capacities, MemoryBudget::Percent(100.0));
        let pipelines = Arc::new(PipelineManager::new());
        let placements = Arc::new(FakeGpus(gpus.clone()));
        let loader = loader(vec![source], placements, (&resources, &pipelines), LoaderConfig::default());
        let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
        Self { id, total, gpus, resources, pipelines, loader, runtime }
    }

    fn request(&self, device: &str) -> LoadRequest {
        LoadRequest {
            device: Some(device.parse::<TargetRequest>().expect("devices")),
            ..LoadRequest::new(self.id.clone())
        }
    }

    fn load(&self, request: LoadRequest) -> Result<(), String> {
        self.runtime.block_on(outcome(&self.loader, request))
    }

    fn used(&self, device: DeviceId) -> u64 {
        self.resources.usage_of(device).expect("device").used_bytes
    }

    /// Bytes the placement of cuda:`gpu` was given.
    fn counted(&self, gpu: usize) -> u64 {
        self.gpus[gpu].bytes.load(Ordering::SeqCst)
    }
}

/// A load split over two (fake) GPUs: step 3 reserves each GPU's share, every tensor lands on the
/// GPU its device map gives it (balanced, or an explicit map) and nowhere else, each GPU's books
/// hold its tensors' bytes, and unloading frees every GPU.
#[test]
fn a_model_split_over_two_gpus_is_booked_and_placed_per_gpu() {
    let g = Gpus::new();
    let (gpu0, gpu1) = (DeviceId::Cuda(0), DeviceId::Cuda(1));

    // Balanced: each GPU holds about half, whole layers; every byte lands once.
    g.load(g.request("cuda:0,cuda:1")).expect("split load");
    let pipeline = g.pipelines.get(&g.id).expect("registered");
    assert_eq!(pipeline.target.to_string(), "cuda:0,cuda:1");
    let infos = pipeline.tensor_infos(false).expect("infos");
    let on = |d: DeviceId| infos.iter().filter(|t| t.device == d).map(|t| t.size_bytes).sum::<u64>();
    assert_eq!((on(gpu0) + on(gpu1), g.used(gpu0), g.used(gpu1)), (g.total, on(gpu0), on(gpu1)));
    assert_eq!((g.counted(0), g.counted(1)), (on(gpu0), on(gpu1)), "each GPU's placement got its own tensors' bytes");
    assert!(on(gpu0).abs_diff(on(gpu1)) <= 64 * 16 * 4, "balanced within one block: {} vs {}", on(gpu0), on(gpu1));
    for l in 0..6 {
        let device =
            |part: &str| infos.iter().find(|t| t.name == format!("model.layers.{l}.{part}.weight")).expect("t").device;
        assert_eq!(device("mlp"), device("attn"), "layer {l} is whole on one GPU");
    }
    drop(pipeline);
    let freed = g.loader.unload_loaded(&g.id, None, false).expect("unloaded");
    assert!(freed >= g.total, "{freed} of the weights' {} bytes", g.total);
    assert_eq!((g.used(gpu0), g.used(gpu1)), (0, 0), "unloading frees every GPU");

    // An explicit map: the head on cuda:1, everything else on cuda:0.
    let map = vec![(String::new(), gpu0), ("lm_head".into(), gpu1)];
    g.load(LoadRequest { device_map: map, ..g.request("cuda:0,cuda:1") }).expect("explicit map");
    assert_eq!(g.used(gpu1), 64 * 16 * 4, "only the head on cuda:1");
    g.loader.unload_loaded(&g.id, None, false).expect("unloaded");
}

/// Replicas: the whole model booked and placed on each of two GPUs, each tensor listed once per
/// GPU with the same bytes, and an unload frees both.
#[test]
fn a_model_replicated_on_two_gpus_is_whole_on_each() {
    let g = Gpus::new();
    let (gpu0, gpu1, gpu2) = (DeviceId::Cuda(0), DeviceId::Cuda(1), DeviceId::Cuda(2));
    g.load(LoadRequest { placement: Some(Layout::Replicate), ..g.request("cuda:0,cuda:2") }).expect("replicas");
    assert_eq!((g.used(gpu0), g.used(gpu1), g.used(gpu2)), (g.total, 0, g.total));
    assert_eq!([g.counted(0), g.counted(2)], [g.total, g.total], "each GPU's placement got it all");
    let pipeline = g.pipelines.get(&g.id).expect("registered");
    let infos = pipeline.tensor_infos(true).expect("infos");
    assert_eq!(infos.len(), 2 * 14);
    for pair in infos.chunks(2) {
        assert_eq!((&pair[0].name, pair[0].device, pair[1].device), (&pair[1].name, gpu0, gpu2));
        assert_eq!(pair[0].sha256, pair[1].sha256, "{}: the same bytes on both", pair[0].name);
    }
    drop(pipeline);
    g.loader.unload_loaded(&g.id, None, false).expect("unloaded");
    assert_eq!((g.used(gpu0), g.used(gpu2)), (0, 0), "unloading frees every replica");
}

/// Bad maps, a GPU short of room (split or replicated) and a GPU the machine lacks are refused,
/// each naming what is wrong, with nothing left booked.
#[test]
fn loads_over_several_gpus_are_refused_by_name() {
    let g = Gpus::new();
    let (gpu0, gpu1) = (DeviceId::Cuda(0), DeviceId::Cuda(1));
    let map = |entries: Vec<(&str, DeviceId)>| LoadRequest {
        device_map: entries.into_iter().map(|(p, d)| (p.to_owned(), d)).collect(),
        ..g.request("cuda:0,cuda:1")
    };
    let cases = [
        (
            map(vec![("", gpu0), ("lm_head", DeviceId::Cuda(3))]),
            "[invalid_device] the device map sends \"lm_head\" to cuda:3",
        ),
        (map(vec![("model.layers", gpu0)]), "[invalid_device] the device map places no device for 2 tensor(s)"),
        (map(vec![("", gpu0), ("model.layerz", gpu1)]), "[invalid_device] the device map's entry \"model.layerz\""),
        (map(vec![("", gpu1)]), "[over_budget] not enough memory on cuda:1"),
        (
            LoadRequest { placement: Some(Layout::Replicate), ..g.request("cuda:0,cuda:1") },
            "[over_budget] not enough memory on cuda:1",
        ),
        (
            LoadRequest { device_map: vec![(String::new(), gpu0)], ..g.request("cuda:0") },
            "[invalid_device] a device map places a model over several devices",
        ),
        (g.request("cuda:0,cuda:5"), "[device_unavailable] device cuda:5 is not available"),
    ];
    for (request, expected) in cases {
        let error = g.load(request).expect_err(expected);
        assert!(error.starts_with(expected), "{error}\nexpected: {expected}");
        let reserved = g.resources.usage_of(gpu0).expect("cuda:0").reserved_bytes;
        assert_eq!((g.used(gpu0), g.used(gpu1), reserved), (0, 0, 0));
    }
}

/// A second load of a split model with an explicit device map joins it only where the model's
/// tensors are where that map puts them; another map is a conflict naming both, and a request
/// naming no map takes the model as it is.
#[test]
fn a_resident_split_model_is_joined_only_by_its_own_map() {
    let g = Gpus::new();
    let (gpu0, gpu1) = (DeviceId::Cuda(0), DeviceId::Cuda(2));
    let with = |map: Vec<(&str, DeviceId)>| LoadRequest {
        device_map: map.into_iter().map(|(p, d)| (p.to_owned(), d)).collect(),
        ..g.request("cuda:0,cuda:2")
    };
    g.load(with(vec![("", gpu0), ("lm_head", gpu1)])).expect("explicit map");
    g.load(with(vec![("", gpu0), ("lm_head", gpu1)])).expect("the same map joins");
    g.load(with(vec![("model", gpu0), ("lm_head", gpu1)])).expect("another map placing the same: joins");
    g.load(g.request("cuda:0,cuda:2")).expect("no map: the model as it is");
    let error = g.load(with(vec![("", gpu1), ("lm_head", gpu0)])).expect_err("another placement");
    let expected = "[conflict] model toy/layers is loaded on cuda:0,cuda:2 as F32; asked for cuda:0,cuda:2 with map =cuda:2,lm_head=cuda:0";
    assert!(error.starts_with(expected), "{error}\nexpected: {expected}");
    assert_eq!(g.used(gpu1), 64 * 16 * 4, "the model stayed as it was");
}

/// While a split load with an explicit map is in flight, a second load asking for another map is
/// refused at once naming both, one asking for the same map joins it, and one naming no map takes
/// it as it is.
#[test]
fn a_split_load_in_flight_is_joined_only_by_its_own_map() {
    let (gate, stalled) = std::sync::mpsc::channel();
    let g = Gpus::serving(Arc::new(StalledFiles(std::sync::Mutex::new(stalled))), 0);
    // Bound after the loader, so dropped before it: a failed assertion drops the gate, which frees
    // the blocked thread the runtime's drop waits for.
    let gate = gate;
    let (gpu0, gpu2) = (DeviceId::Cuda(0), DeviceId::Cuda(2));
    let with = |map: Vec<(&str, DeviceId)>| LoadRequest {
        device_map: map.into_iter().map(|(p, d)| (p.to_owned(), d)).collect(),
        ..g.request("cuda:0,cuda:2")
    };
    g.runtime.block_on(async {
        let first = g.loader.load(with(vec![("", gpu0), ("lm_head", gpu2)])).await.expect("the load starts");
        let other = g.loader.load(with(vec![("", gpu2)])).await.map(|_| ()).expect_err("another map");
        let expected = "model toy/layers is loading on cuda:0,cuda:2 with map =cuda:0,lm_head=cuda:2 (as stored); \
                        asked for cuda:0,cuda:2 with map =cuda:2";
        assert!(other.to_string().starts_with(expected), "{other}\nexpected: {expected}");
        g.loader.load(with(vec![("", gpu0), ("lm_head", gpu2)])).await.expect("the same map joins");
        g.loader.load(g.request("cuda:0,cuda:2")).await.expect("no map joins");
        assert!(g.loader.cancel(&g.id), "the load was in flight");
        drop(first);
    });
    gate.send(()).expect("the blocked thread is still waiting");
}
