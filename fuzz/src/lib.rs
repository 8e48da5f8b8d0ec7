//! What the fuzz targets share: files and model folders held in memory (the `weights` crate's
//! [`ReadAt`] and [`ModelFiles`], so the planner runs on fuzzed bytes without a file system),
//! a writer of small valid safetensors files for the folders' fixed parts, and the checks every
//! accepted header must pass.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    io,
    sync::Arc,
};

use model_id::TargetDtype;
use weights::{ModelFiles, ReadAt, header::TensorPlan};

/// One file's bytes, read at offsets like a file on disk.
pub struct MemoryFile<B>(pub B);

impl<B: AsRef<[u8]> + Send + Sync> ReadAt for MemoryFile<B> {
    fn size(&self) -> io::Result<u64> {
        Ok(self.0.as_ref().len() as u64)
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let bytes = self.0.as_ref();
        let start = usize::try_from(offset).map_err(io::Error::other)?;
        let end = start.checked_add(buf.len()).ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(bytes.get(start..end).ok_or(io::ErrorKind::UnexpectedEof)?);
        Ok(())
    }
}

/// A model's folder in memory: files by path relative to it (`unet/config.json`); folders are
/// the paths' parents. Every path the planner asks for must stay inside the folder (see
/// [`assert_confined`]): that is what its checks of component and shard names are for.
pub struct MemoryFolder(BTreeMap<String, Arc<[u8]>>);

/// Files by path and their bytes: a folder's fixed part.
pub type Files = Vec<(&'static str, Arc<[u8]>)>;

impl MemoryFolder {
    /// A folder of `files` and the file `path` of `bytes`.
    pub fn new(files: &Files, path: &str, bytes: &[u8]) -> Self {
        let mut folder: BTreeMap<String, Arc<[u8]>> = files.iter().map(|(p, b)| (p.to_string(), b.clone())).collect();
        folder.insert(path.to_owned(), bytes.into());
        Self(folder)
    }

    fn has_dir(&self, dir: &str) -> bool {
        dir.is_empty() || self.0.keys().any(|p| p.strip_prefix(dir).is_some_and(|rest| rest.starts_with('/')))
    }
}

impl ModelFiles for MemoryFolder {
    fn list(&self, dir: &str) -> Result<Vec<String>, weights::Error> {
        assert_confined(dir);
        if !self.has_dir(dir) {
            let source = io::Error::from(io::ErrorKind::NotFound);
            return Err(weights::Error::Read { file: dir.to_owned(), source });
        }
        let prefix = if dir.is_empty() { String::new() } else { format!("{dir}/") };
        let names: BTreeSet<&str> = self
            .0
            .keys()
            .filter_map(|p| p.strip_prefix(&prefix))
            .map(|rest| rest.split('/').next().unwrap_or(rest))
            .collect();
        Ok(names.into_iter().map(str::to_owned).collect())
    }

    fn is_dir(&self, dir: &str) -> Result<bool, weights::Error> {
        assert_confined(dir);
        Ok(self.has_dir(dir))
    }

    fn open(&self, path: &str) -> Result<Option<Arc<dyn ReadAt>>, weights::Error> {
        assert_confined(path);
        Ok(self.0.get(path).map(|bytes| Arc::new(MemoryFile(bytes.clone())) as Arc<dyn ReadAt>))
    }
}

/// Panics unless `path` is `""` or relative parts joined by `/`, none of them empty, `.` or
/// `..`, and without `\`: a path that cannot leave the model's folder. (A NUL is no escape: a
/// file system refuses the name, and the planner need not.)
pub fn assert_confined(path: &str) {
    let confined =
        path.is_empty() || (!path.contains('\\') && path.split('/').all(|part| !matches!(part, "" | "." | "..")));
    assert!(confined, "the planner asked for {path:?}, which may leave the model's folder");
}

/// A valid safetensors file of zeroed tensors `(name, dtype, shape)`, laid out in order.
pub fn safetensors(tensors: &[(&str, &str, &[usize])]) -> Vec<u8> {
    let size = |dtype: &str| match dtype {
        "U8" | "BOOL" | "F8_E4M3" => 1,
        "I16" | "F16" | "BF16" => 2,
        "U32" | "I32" | "F32" => 4,
        _ => 8,
    };
    let mut header = serde_json::Map::new();
    let mut end = 0;
    for &(name, dtype, shape) in tensors {
        let start = end;
        end += shape.iter().product::<usize>() * size(dtype);
        header
            .insert(name.to_owned(), serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [start, end]}));
    }
    let json = serde_json::to_vec(&header).expect("a map serializes");
    let mut file = (json.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(&json);
    file.resize(file.len() + end, 0);
    file
}

/// What `weights::header` promises of the tensors it accepts from a data section of `data_len`
/// bytes at `data_start`: sorted by offset, contiguous from the section's start to its end
/// without gap or overlap, unique names (`__metadata__` is never a tensor), and each one's
/// shape × dtype size equal to its byte length.
pub fn check_tensors(tensors: &[TensorPlan], data_start: u64, data_len: u64) {
    let mut at = data_start;
    let mut names = HashSet::with_capacity(tensors.len());
    for t in tensors {
        assert_eq!(t.offset, at, "tensor {}: not where the previous one ends", t.name);
        at = t.offset.checked_add(t.len).expect("a tensor ends inside the file");
        assert!(names.insert(t.name.as_str()), "tensor {} twice", t.name);
        assert_ne!(t.name, "__metadata__");
        let bytes = t.shape.iter().try_fold(t.dtype.size_in_bytes(), |n, &d| n.checked_mul(d));
        assert_eq!(bytes.map(|b| b as u64), Some(t.len), "tensor {}: shape {:?} of {:?}", t.name, t.shape, t.dtype);
        // What a load books against the budget, for each target: computed, never a panic.
        assert_eq!(t.resident_bytes(None), t.len);
        for target in [TargetDtype::F32, TargetDtype::F16, TargetDtype::BF16] {
            std::hint::black_box(t.resident_bytes(Some(target)));
        }
    }
    assert_eq!(at, data_start + data_len, "the tensors do not end where the data section does");
}
