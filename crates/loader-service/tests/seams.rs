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
        placement::{Chunk, Chunking, Destination, Group},
    },
};
use pipeline_manager::PipelineManager;
use resource_manager::{DeviceId, DeviceRequest, MemoryBudget, ResourceManager};
use sha2::{Digest, Sha256};
use state_manager::StateManager;
use tokio_util::sync::CancellationToken;

/// Files' bytes by path.
type Files = BTreeMap<String, Arc<Vec<u8>>>;

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

/// One model, in memory; counts how often it was asked for.
struct MemorySource {
    id: ModelId,
    files: Arc<MemoryFiles>,
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
    fn placement(&self, _: DeviceId, _: &ModelId) -> Result<Arc<dyn Placement>, LoadError> {
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
    let seams = Seams {
        sources: Sources::new(vec![source.clone()], "nothing else is asked"),
        placements: Arc::new(Toy(placement.clone())),
    };
    let parts = LoaderParts {
        config: LoaderConfig::default(),
        state: Arc::new(StateManager::new(64)),
        resources: resources.clone(),
        pipelines: pipelines.clone(),
        cancel: CancellationToken::new(),
    };
    let loader = LoaderService::with_seams(parts, seams);

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
    assert_eq!(resources.usage()[0].used_bytes, data_bytes, "booked as the model's bytes");

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
