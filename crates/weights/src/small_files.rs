//! A model's small non-weight files that travel with it (configs, tokenizer, scheduler,
//! sentence-transformers' module configs): the one allowlist ([`travels`]) every source and the
//! hub's listing use, their limits ([`check`]), and step 3's read of them ([`collect`]) through
//! [`ModelFiles`], so every source serves them alike. docs/model-files.md has the table.

use std::sync::Arc;

use pipeline_manager::ModelFile;

use crate::{
    Error,
    files::{ModelFiles, join},
};

/// The largest small file kept: real tokenizer.json files reach 30+ MB (large vocabularies).
pub const MAX_FILE_BYTES: u64 = 64 * 1024 * 1024;
/// The most bytes of small files one model keeps. With the attach socket's tensor table this
/// stays under `attach::wire::MAX_RESPONSE_BYTES`, so `include_files` always fits one answer.
pub const MAX_MODEL_FILES_BYTES: u64 = 128 * 1024 * 1024;
/// The most small files one model keeps (a pipeline has a few dozen).
pub const MAX_FILES: usize = 512;

/// File names that travel, in the model's folder and in each folder one level down (diffusers
/// components, sentence-transformers modules). Besides these, `*.model` (sentencepiece).
const NAMES: [&str; 18] = [
    "config.json",
    "generation_config.json",
    "model_index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
    "scheduler_config.json",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
];

/// Whether the file at `path` (relative to the model's folder, `/`-separated) travels with the
/// model: a listed name, in the model's folder or one folder down; never deeper, never a
/// dotfile or a file in a dot-folder, never weights or anything unlisted.
pub fn travels(path: &str) -> bool {
    let mut parts = path.split('/');
    let (first, second, rest) = (parts.next(), parts.next(), parts.next());
    let name = match (first, second, rest) {
        (Some(name), None, None) => name,
        (Some(dir), Some(name), None) if is_plain(dir) => name,
        _ => return false,
    };
    is_plain(name) && (NAMES.contains(&name) || is_sentencepiece(name))
}

/// A name that is neither empty, a dotfile, `.` nor `..`.
fn is_plain(name: &str) -> bool {
    !name.is_empty() && !name.starts_with('.') && !name.contains('\\')
}

/// `tokenizer.model`, `spiece.model`, `sentencepiece.bpe.model`.
fn is_sentencepiece(name: &str) -> bool {
    name.strip_suffix(".model").is_some_and(|stem| !stem.is_empty())
}

/// Refuses small files past the limits: one file over [`MAX_FILE_BYTES`], more than
/// [`MAX_FILES`] files, or more than [`MAX_MODEL_FILES_BYTES`] in all. `files` are paths and
/// sizes; the error names the file, its size and the limit.
pub fn check<'a>(files: impl IntoIterator<Item = (&'a str, u64)>) -> Result<(), Error> {
    let (mut count, mut total) = (0usize, 0u64);
    for (path, size) in files {
        count += 1;
        total = total.saturating_add(size);
        let over = |what: String| Err(Error::OverLimit { file: path.to_owned(), what });
        if size > MAX_FILE_BYTES {
            return over(format!("{size} bytes is over the {MAX_FILE_BYTES}-byte limit of a small file"));
        }
        if count > MAX_FILES {
            return over(format!("one file more than the limit of {MAX_FILES} small files a model"));
        }
        if total > MAX_MODEL_FILES_BYTES {
            return over(format!(
                "{size} bytes brings the model's small files to {total} bytes, over the {MAX_MODEL_FILES_BYTES}-byte \
                 limit of a model's small files"
            ));
        }
    }
    Ok(())
}

/// Reads the small files of the model whose files are `files`: those [`travels`] lets through,
/// in the model's folder and each folder one level down, sorted by path, within the limits
/// (checked on the sizes before any byte is read).
pub fn collect(files: &dyn ModelFiles) -> Result<Vec<Arc<ModelFile>>, Error> {
    let mut found = Vec::new();
    for name in files.list("")? {
        if travels(&name) {
            found.push(name);
        } else if is_plain(&name) && files.is_dir(&name)? {
            found.extend(files.list(&name)?.into_iter().map(|n| join(&name, &n)).filter(|p| travels(p)));
        }
    }
    found.sort();
    let mut opened = Vec::with_capacity(found.len());
    for path in found {
        // A name the listing showed may be a folder (`config.json/`): not a file that travels.
        if files.is_dir(&path)? {
            continue;
        }
        let Some(file) = files.open(&path)? else { continue };
        let size = file.size().map_err(|source| Error::Read { file: path.clone(), source })?;
        opened.push((path, size, file));
    }
    check(opened.iter().map(|(path, size, _)| (path.as_str(), *size)))?;
    opened
        .into_iter()
        .map(|(path, size, file)| {
            let mut content = vec![0u8; usize::try_from(size).expect("within MAX_FILE_BYTES")];
            file.read_exact_at(&mut content, 0).map_err(|e| Error::read(&path, e))?;
            Ok(Arc::new(ModelFile::new(path, content)))
        })
        .collect()
}

/// The step's words for them: "7 small files (2.1 MB)", "4 small files (712 B)".
pub fn describe(files: &[Arc<ModelFile>]) -> String {
    let bytes: u64 = files.iter().map(|f| f.size_bytes()).sum();
    let s = if files.len() == 1 { "" } else { "s" };
    let size = match bytes {
        0..1_000 => format!("{bytes} B"),
        1_000..1_000_000 => format!("{:.1} kB", bytes as f64 / 1e3),
        _ => format!("{:.1} MB", bytes as f64 / 1e6),
    };
    format!("{} small file{s} ({size})", files.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Configs, tokenizer files, sentencepiece models, pipeline and sentence-transformers
    /// configs travel, in the model's folder and one folder down.
    #[test]
    fn what_travels() {
        for path in [
            "config.json",
            "generation_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "added_tokens.json",
            "vocab.txt",
            "vocab.json",
            "merges.txt",
            "tokenizer.model",
            "spiece.model",
            "sentencepiece.bpe.model",
            "chat_template.jinja",
            "model_index.json",
            "modules.json",
            "sentence_bert_config.json",
            "config_sentence_transformers.json",
            "1_Pooling/config.json",
            "2_Normalize/config.json",
            "unet/config.json",
            "scheduler/scheduler_config.json",
            "tokenizer/vocab.json",
            "tokenizer/merges.txt",
            "feature_extractor/preprocessor_config.json",
        ] {
            assert!(travels(path), "{path} travels");
        }
    }

    /// Weights, pickles, READMEs, dotfiles, files two folders down and odd paths never travel.
    #[test]
    fn what_never_travels() {
        for path in [
            "README.md",
            "pytorch_model.bin",
            "model.safetensors",
            "model.safetensors.index.json",
            "unet/diffusion_pytorch_model.safetensors",
            "x/y/config.json",
            "a/b/c/tokenizer.json",
            ".env",
            ".model",
            ".cache/config.json",
            "./config.json",
            "../config.json",
            "/config.json",
            "unet//config.json",
            "",
            "extra/secret.txt",
            "onnx/model.onnx",
            "config.json.bak",
            "tokenizer.model.lock",
            "dir\\config.json",
        ] {
            assert!(!travels(path), "{path} never travels");
        }
    }

    /// The step's words count the files and give their bytes in a unit that shows them.
    #[test]
    fn described_in_a_readable_unit() {
        let file = |len: usize| Arc::new(ModelFile::new("config.json".into(), vec![0; len]));
        assert_eq!(describe(&[]), "0 small files (0 B)");
        assert_eq!(describe(&[file(712)]), "1 small file (712 B)");
        assert_eq!(describe(&[file(1500), file(600)]), "2 small files (2.1 kB)");
        assert_eq!(describe(&[file(2_100_000)]), "1 small file (2.1 MB)");
    }

    /// The limits name the file, its size and the limit crossed.
    #[test]
    fn limits_name_the_file_and_the_limit() {
        check([("config.json", 10), ("tokenizer.json", MAX_FILE_BYTES)]).expect("within");
        let big = check([("config.json", 10), ("tokenizer.json", MAX_FILE_BYTES + 1)]).expect_err("one too big");
        let said = big.to_string();
        assert!(said.contains("tokenizer.json") && said.contains(&(MAX_FILE_BYTES + 1).to_string()), "{said}");
        assert!(said.contains(&format!("{MAX_FILE_BYTES}-byte limit of a small file")), "{said}");

        let half = MAX_MODEL_FILES_BYTES / 2;
        let total = check([("a/config.json", half), ("b/config.json", half), ("c/config.json", 1)]).expect_err("sum");
        let said = total.to_string();
        assert!(said.starts_with("c/config.json:") && said.contains("limit of a model's small files"), "{said}");

        let names: Vec<String> = (0..=MAX_FILES).map(|i| format!("d{i}/config.json")).collect();
        let many = check(names.iter().map(|n| (n.as_str(), 1))).expect_err("too many");
        assert!(many.to_string().contains(&format!("limit of {MAX_FILES} small files")), "{many}");
        assert!(matches!(many, Error::OverLimit { .. }));
    }
}
