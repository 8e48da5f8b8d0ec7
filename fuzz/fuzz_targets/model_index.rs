//! The diffusers pipeline index (`model_index.json`), read by the planner
//! (`weights::plan::build`) from a folder in memory whose `model_index.json` is the input. The
//! folder's components are fixed: a single-file `unet`, a sharded `text_encoder`, a `scheduler`
//! with configuration only, `pickled` with only pickle weights, `_private` and `nested/inner`,
//! which no component name may reach.
//!
//! A plan built must hold, sorted and once each, only components the index names as
//! `"name": ["library", "class"]` with a name that is a folder (an id part without `/`, not
//! starting with `_`), each with weights read from inside that folder; every path the planner
//! asks for stays in the model's folder.

#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use model_id::ModelId;
use model_loader_fuzz::{Files, MemoryFolder, safetensors};
use weights::plan::{self, Layout};

static FOLDERS: LazyLock<Files> = LazyLock::new(|| {
    let index =
        br#"{"weight_map": {"w": "model-00001-of-00002.safetensors", "x": "model-00002-of-00002.safetensors"}}"#;
    vec![
        ("unet/diffusion_pytorch_model.safetensors", safetensors(&[("conv", "F16", &[2, 2])]).into()),
        ("unet/config.json", b"{\"in_channels\": 4}".to_vec().into()),
        ("text_encoder/model.safetensors.index.json", index.to_vec().into()),
        ("text_encoder/model-00001-of-00002.safetensors", safetensors(&[("w", "F32", &[3])]).into()),
        ("text_encoder/model-00002-of-00002.safetensors", safetensors(&[("x", "BF16", &[1])]).into()),
        ("scheduler/scheduler_config.json", b"{}".to_vec().into()),
        ("pickled/pytorch_model.bin", b"not read".to_vec().into()),
        ("_private/model.safetensors", safetensors(&[("p", "U8", &[1])]).into()),
        ("nested/inner/model.safetensors", safetensors(&[("n", "U8", &[1])]).into()),
    ]
});

fuzz_target!(|model_index: &[u8]| {
    let folder = MemoryFolder::new(&FOLDERS, "model_index.json", model_index);
    let Ok(plan) = plan::build(&folder, None) else { return };
    assert_eq!(plan.layout, Layout::Pipeline);
    let value: serde_json::Value = serde_json::from_slice(model_index).expect("a plan was built from it");
    let entries = value.as_object().expect("a pipeline's index is an object");
    assert!(!plan.components.is_empty());
    assert!(plan.components.windows(2).all(|w| w[0].name < w[1].name), "components sorted, once each");
    for c in &plan.components {
        let name = c.name.as_str();
        let pair = entries[name].as_array().expect("a component is a pair");
        assert!(pair.len() == 2 && pair.iter().all(|v| v.is_string()), "{name}: {pair:?}");
        assert!(!name.starts_with('_') && !name.contains('/') && ModelId::parse(name).is_ok(), "{name:?}");
        assert!(!c.files.is_empty(), "{name} has no weights");
        for f in &c.files {
            assert!(f.path.strip_prefix(name).is_some_and(|rest| rest.starts_with('/')), "{} outside {name}", f.path);
        }
    }
});
