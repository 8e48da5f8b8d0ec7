//! Which weight files of a folder a load reads, from their names alone: the same rules for a folder
//! on disk (plan) and a repo listing on the hub (what to download).
//!
//! Preference: the precision variant asked for (diffusers naming: `model.fp16.safetensors`,
//! shards `model.fp16-00001-of-00002.safetensors` with `model.safetensors.index.fp16.json`), then
//! the plain files: the shard index, the one `model.safetensors` /
//! `diffusion_pytorch_model.safetensors`, or every other plain `*.safetensors`. Pickle weights are
//! only ever named, to refuse them.

/// The usual names of a single weights file.
const SINGLE_NAMES: [&str; 2] = ["model", "diffusion_pytorch_model"];
const PICKLE_SUFFIXES: [&str; 5] = [".bin", ".pt", ".pth", ".ckpt", ".pkl"];

/// The weight files chosen in one folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    /// Shards listed by this index file; `shards` are the folder's files of the same variant (all
    /// of them: the index is read only once it is on disk).
    Sharded { index: String, shards: Vec<String>, variant: Option<String> },
    /// These files, each read whole (one file, or shards without an index).
    Files { files: Vec<String>, variant: Option<String> },
    /// Only pickle weights: refused.
    PickleOnly(Vec<String>),
    /// No weights at all (a scheduler or tokenizer folder).
    Nothing,
}

/// The precision variant a file name carries: `fp16` for `model.fp16.safetensors` and
/// `model.fp16-00001-of-00002.safetensors`; `None` for plain files and anything not safetensors.
pub fn variant_of(name: &str) -> Option<&str> {
    let stem = name.strip_suffix(".safetensors")?;
    let (_, tail) = stem.rsplit_once('.')?;
    Some(strip_shard_suffix(tail))
}

/// `fp16-00001-of-00002` → `fp16`.
fn strip_shard_suffix(s: &str) -> &str {
    let shard = |p: &str| p.len() >= 5 && p.bytes().all(|b| b.is_ascii_digit());
    let parts: Vec<&str> = s.rsplitn(4, '-').collect();
    match parts.as_slice() {
        [of_total, "of", index, head] if shard(of_total) && shard(index) => head,
        _ => s,
    }
}

/// Chooses the weights among `names` (file names of one folder), preferring `variant` when the
/// folder has it.
pub fn choose(names: &[String], variant: Option<&str>) -> Choice {
    let has = |n: &str| names.iter().any(|x| x == n);
    let weights_of = |v: Option<&str>| -> Vec<String> {
        names.iter().filter(|n| n.ends_with(".safetensors") && variant_of(n) == v).cloned().collect()
    };
    let mut candidates = Vec::new();
    if let Some(v) = variant {
        candidates.push(Some(v));
    }
    candidates.push(None);
    for v in candidates {
        let weights = weights_of(v);
        if weights.is_empty() {
            continue;
        }
        let variant = v.map(str::to_owned);
        for base in SINGLE_NAMES {
            let index = match v {
                Some(v) => format!("{base}.safetensors.index.{v}.json"),
                None => format!("{base}.safetensors.index.json"),
            };
            if has(&index) {
                return Choice::Sharded { index, shards: weights, variant };
            }
        }
        for base in SINGLE_NAMES {
            let single = match v {
                Some(v) => format!("{base}.{v}.safetensors"),
                None => format!("{base}.safetensors"),
            };
            if has(&single) {
                return Choice::Files { files: vec![single], variant };
            }
        }
        return Choice::Files { files: weights, variant };
    }
    let pickles: Vec<String> =
        names.iter().filter(|n| PICKLE_SUFFIXES.iter().any(|s| n.ends_with(s))).cloned().collect();
    if pickles.is_empty() { Choice::Nothing } else { Choice::PickleOnly(pickles) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = list.iter().map(|s| s.to_string()).collect();
        v.sort();
        v
    }

    fn files(list: &[&str], variant: Option<&str>) -> Choice {
        Choice::Files { files: names(list), variant: variant.map(str::to_owned) }
    }

    #[test]
    fn variants_are_read_from_names() {
        assert_eq!(variant_of("model.safetensors"), None);
        assert_eq!(variant_of("model-00001-of-00002.safetensors"), None);
        assert_eq!(variant_of("model.fp16.safetensors"), Some("fp16"));
        assert_eq!(variant_of("diffusion_pytorch_model.fp16-00001-of-00002.safetensors"), Some("fp16"));
        assert_eq!(variant_of("model.bf16.safetensors"), Some("bf16"));
        assert_eq!(variant_of("model.fp16.bin"), None);
    }

    /// The asked-for variant wins where it exists; elsewhere the plain files; no variant asked
    /// for never picks a variant.
    #[test]
    fn the_variant_is_preferred_when_present() {
        let single = names(&["config.json", "model.safetensors", "model.fp16.safetensors", "model.bin"]);
        assert_eq!(choose(&single, Some("fp16")), files(&["model.fp16.safetensors"], Some("fp16")));
        assert_eq!(choose(&single, None), files(&["model.safetensors"], None));
        assert_eq!(choose(&single, Some("bf16")), files(&["model.safetensors"], None));

        let sharded = names(&[
            "diffusion_pytorch_model.safetensors.index.json",
            "diffusion_pytorch_model-00001-of-00002.safetensors",
            "diffusion_pytorch_model-00002-of-00002.safetensors",
            "diffusion_pytorch_model.safetensors.index.fp16.json",
            "diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
            "diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
        ]);
        assert_eq!(
            choose(&sharded, Some("fp16")),
            Choice::Sharded {
                index: "diffusion_pytorch_model.safetensors.index.fp16.json".into(),
                shards: names(&[
                    "diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
                    "diffusion_pytorch_model.fp16-00002-of-00002.safetensors"
                ]),
                variant: Some("fp16".into()),
            }
        );
        assert_eq!(
            choose(&sharded, None),
            Choice::Sharded {
                index: "diffusion_pytorch_model.safetensors.index.json".into(),
                shards: names(&[
                    "diffusion_pytorch_model-00001-of-00002.safetensors",
                    "diffusion_pytorch_model-00002-of-00002.safetensors"
                ]),
                variant: None,
            }
        );
    }

    /// Other plain names are read together; only-variant folders are not taken for plain loads;
    /// pickles are named to be refused.
    #[test]
    fn other_names_pickles_and_nothing() {
        let other = names(&["a.safetensors", "b.safetensors", "a.fp16.safetensors"]);
        assert_eq!(choose(&other, None), files(&["a.safetensors", "b.safetensors"], None));
        assert_eq!(choose(&other, Some("fp16")), files(&["a.fp16.safetensors"], Some("fp16")));
        assert_eq!(
            choose(&names(&["model.fp16.safetensors", "model.bin"]), None),
            Choice::PickleOnly(vec!["model.bin".into()])
        );
        assert_eq!(choose(&names(&["scheduler_config.json"]), Some("fp16")), Choice::Nothing);
    }
}
