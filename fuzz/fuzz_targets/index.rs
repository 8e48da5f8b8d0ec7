//! The sharded-weights index (`model.safetensors.index.json`, its `weight_map`), read by the
//! planner (`weights::plan::build`) from a folder in memory whose index is the input. The folder's
//! shards are fixed: two valid ones, one holding a tensor of the first again, and one corrupt.
//!
//! A plan built must read exactly the shards the map names, each holding the tensors the map
//! puts in it, with no tensor in two files; every path the planner asks for stays in the folder.

#![no_main]

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    sync::LazyLock,
};

use libfuzzer_sys::fuzz_target;
use model_loader_fuzz::{Files, MemoryFolder, safetensors};
use weights::plan::{self, Layout};

const INDEX: &str = "model.safetensors.index.json";

static SHARDS: LazyLock<Files> = LazyLock::new(|| {
    vec![
        ("model-00001-of-00002.safetensors", safetensors(&[("a", "F32", &[2]), ("b", "BF16", &[2, 2])]).into()),
        ("model-00002-of-00002.safetensors", safetensors(&[("c", "I64", &[1]), ("d", "U8", &[3])]).into()),
        ("again.safetensors", safetensors(&[("a", "F16", &[1])]).into()),
        ("corrupt.safetensors", b"\x10\0\0\0\0\0\0\0{\"a\": 1}".to_vec().into()),
        ("config.json", b"{\"model_type\": \"demo\"}".to_vec().into()),
    ]
});

fuzz_target!(|index: &[u8]| {
    let folder = MemoryFolder::new(&SHARDS, INDEX, index);
    let Ok(plan) = plan::build(&folder, None) else { return };
    assert_eq!(plan.layout, Layout::Sharded);
    let [component] = plan.components.as_slice() else { panic!("{} components", plan.components.len()) };
    let value: serde_json::Value = serde_json::from_slice(index).expect("a plan was built from it");
    let map = value["weight_map"].as_object().expect("a plan has a weight_map");
    let mut wanted: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (tensor, shard) in map {
        wanted.entry(shard.as_str().expect("shards are named")).or_default().insert(tensor);
    }
    let read: BTreeSet<&str> = component.files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(read, wanted.keys().copied().collect(), "the shards read are the ones the map names");
    let mut seen = HashSet::new();
    for file in &component.files {
        let held: BTreeSet<&str> = file.tensors.iter().map(|t| t.name.as_str()).collect();
        assert!(wanted[file.path.as_str()].is_subset(&held), "{} lacks a tensor the map puts in it", file.path);
        for t in &file.tensors {
            assert!(seen.insert(t.name.as_str()), "tensor {} in two files", t.name);
        }
    }
});
