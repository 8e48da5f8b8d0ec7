//! A safetensors file's header into tensor entries ([`TensorPlan`]), validated: a length within
//! [`MAX_HEADER_BYTES`] and the file, then the JSON by the format's own rules (known dtypes,
//! shape × dtype size = byte length, offsets contiguous from 0 without overlap) plus unique names,
//! and that the data ends exactly at the end of the file. It knows nothing of layouts or plans.
//!
//! Parsed here rather than with `safetensors::tensor::Metadata`, which builds a map of owned
//! names and a second index first: this single pass takes about half its time, and a checkpoint
//! of many small tensors spends most of its planning here (docs/benchmarks/design-choices.md).

use std::collections::HashSet;

use candle_core::DType;
use safetensors::Dtype;
use serde::{
    Deserialize, Deserializer,
    de::{MapAccess, Visitor},
};

use model_id::TargetDtype;

use crate::files::ReadAt;

/// The largest safetensors header we read (the format's own limit).
pub const MAX_HEADER_BYTES: u64 = 100 * 1024 * 1024;

/// The most tensors a model may have. The largest public checkpoints have about 100,000 (a
/// mixture of experts with per-expert scales); with the per-tensor metadata below, this bounds a
/// header's host memory to about 150 MB.
pub const MAX_TENSORS: usize = 250_000;

/// Host bytes one tensor holds during a load besides its data and its name: its plan, its entry
/// in the pipeline, its view (or candle tensor, once converted), and the allocator's share of
/// each. Measured with 200,000 one-element F32 tensors of 41-byte names: a load's peak grew RSS
/// by 576 bytes a tensor (its header read, the plan and the resident tensors at once); what stays
/// resident, once the heap is trimmed, by 242 (505 converted to BF16: a candle tensor each). With
/// the name and shape this books 598, the peak, for the load and while the model stays (a bound,
/// not the exact figure). The test `budget::the_books_cover_the_metadata_of_many_small_tensors`
/// checks it.
pub const TENSOR_METADATA_BYTES: u64 = 480;

/// What the budget books for the host memory of one tensor's metadata (see
/// [`TENSOR_METADATA_BYTES`]): the fixed part, its name (held twice: the plan's and the resident
/// tensor's), its shape.
pub fn metadata_bytes(name: &str, dims: usize) -> u64 {
    TENSOR_METADATA_BYTES + 2 * name.len() as u64 + 16 * dims as u64
}

/// One tensor: where its bytes are and what they hold.
#[derive(Debug, Clone)]
pub struct TensorPlan {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Absolute offset of its first byte in the file.
    pub offset: u64,
    pub len: u64,
    /// Stored as BOOL: held as U8 (candle has no bool), listed as BOOL, each byte 0 or 1.
    pub is_bool: bool,
}

/// Whether a load with a target dtype converts tensors of `dtype`: the 16-, 32- and 64-bit floats.
/// Integers, bools and FP8 (quantized weights whose scales live in other tensors) stay as stored.
pub fn converts(dtype: DType) -> bool {
    matches!(dtype, DType::F16 | DType::BF16 | DType::F32 | DType::F64)
}

impl TensorPlan {
    /// Host bytes of its metadata while loaded (see [`metadata_bytes`]).
    pub fn metadata_bytes(&self) -> u64 {
        metadata_bytes(&self.name, self.shape.len())
    }

    /// Bytes it will occupy once converted to `target` (see [`converts`]).
    pub fn resident_bytes(&self, target: Option<TargetDtype>) -> u64 {
        match target {
            // Saturating: a header may name a tensor (of a file still to fetch) so large that its
            // widened size does not fit; the budget then refuses it instead of booking a wrapped size.
            Some(t) if converts(self.dtype) => {
                let elems = self.shape.iter().fold(1u64, |n, &d| n.saturating_mul(d as u64));
                elems.saturating_mul(t.candle().size_in_bytes() as u64)
            }
            _ => self.len,
        }
    }
}

/// Why a header was refused.
#[derive(Debug)]
pub enum HeaderError {
    Io(std::io::Error),
    Corrupt(String),
    Unsupported {
        tensor: String,
        dtype: String,
    },
    /// More than [`MAX_TENSORS`] entries: refused while parsing, before they take memory.
    TooManyTensors,
}

/// The tensors of `json` sorted by offset, checked against a data section of `data_len` bytes
/// that starts at byte `data_start` of the file.
pub fn tensors(json: &[u8], data_start: u64, data_len: u64) -> Result<Vec<TensorPlan>, HeaderError> {
    // The whole header is UTF-8, as the reference insists: serde_json checks the strings it
    // keeps, not those it skips.
    std::str::from_utf8(json).map_err(|e| HeaderError::Corrupt(format!("the header is not UTF-8: {e}")))?;
    let Raw(mut raw) = serde_json::from_slice(json).map_err(|e| {
        if e.to_string().starts_with(TOO_MANY_TENSORS) {
            HeaderError::TooManyTensors
        } else {
            HeaderError::Corrupt(format!("invalid header: {e}"))
        }
    })?;
    let mut names = HashSet::with_capacity(raw.len());
    if let Some((name, _)) = raw.iter().find(|(name, _)| !names.insert(name.as_str())) {
        return Err(HeaderError::Corrupt(format!("tensor {name} appears twice in the header")));
    }
    raw.sort_unstable_by_key(|(_, info)| info.data_offsets);
    let mut end = 0u64;
    for (name, info) in &raw {
        let (start, stop) = info.data_offsets;
        if start != end || stop < start {
            return Err(HeaderError::Corrupt(format!(
                "tensor {name}: data offsets [{start}, {stop}] overlap or leave a gap after byte {end}"
            )));
        }
        end = stop;
    }
    if end != data_len {
        return Err(HeaderError::Corrupt(format!(
            "the header describes {end} bytes of data but the file holds {data_len}: truncated or padded"
        )));
    }
    raw.into_iter()
        .map(|(name, info)| {
            let Some(dtype) = candle_dtype(info.dtype) else {
                return Err(HeaderError::Unsupported { tensor: name, dtype: format!("{:?}", info.dtype) });
            };
            let (start, stop) = info.data_offsets;
            let elems = info.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
            let bytes = elems.and_then(|n| n.checked_mul(dtype.size_in_bytes()));
            if bytes.is_none_or(|b| b as u64 != stop - start) {
                return Err(HeaderError::Corrupt(format!(
                    "tensor {name}: shape {:?} of {:?} does not take the {} bytes of its offsets",
                    info.shape,
                    info.dtype,
                    stop - start
                )));
            }
            let is_bool = info.dtype == Dtype::BOOL;
            Ok(TensorPlan { name, dtype, shape: info.shape, offset: data_start + start, len: stop - start, is_bool })
        })
        .collect()
}

/// The candle dtype that holds a safetensors dtype; `None` for those candle cannot hold: F8_E5M2
/// and the other types candle lacks, and those it has only as placeholders without an element
/// size or operations (F8_E8M0, F6_E2M3, F6_E3M2, F4), so that a tensor of them could not be sized,
/// viewed or checksummed.
fn candle_dtype(dtype: Dtype) -> Option<DType> {
    Some(match dtype {
        Dtype::BOOL | Dtype::U8 => DType::U8,
        Dtype::U32 => DType::U32,
        Dtype::I16 => DType::I16,
        Dtype::I32 => DType::I32,
        Dtype::I64 => DType::I64,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        Dtype::F32 => DType::F32,
        Dtype::F64 => DType::F64,
        Dtype::F8_E4M3 => DType::F8E4M3,
        _ => return None,
    })
}

#[derive(Deserialize)]
struct Info {
    dtype: Dtype,
    shape: Vec<usize>,
    data_offsets: (u64, u64),
}

/// The header's tensors in the order of their keys; `__metadata__` (free-form strings) is
/// validated and dropped.
struct Raw(Vec<(String, Info)>);

impl<'de> Deserialize<'de> for Raw {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Entries;
        impl<'de> Visitor<'de> for Entries {
            type Value = Raw;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object of tensors")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Raw, A::Error> {
                let mut tensors = Vec::with_capacity(map.size_hint().unwrap_or(0));
                let mut metadata = false;
                while let Some(name) = map.next_key::<String>()? {
                    if name == "__metadata__" {
                        // As the reference reads it: once at most, null or strings by string.
                        if std::mem::replace(&mut metadata, true) {
                            return Err(serde::de::Error::duplicate_field("__metadata__"));
                        }
                        map.next_value::<Option<Metadata>>()?;
                    } else if tensors.len() == MAX_TENSORS {
                        return Err(serde::de::Error::custom(TOO_MANY_TENSORS));
                    } else {
                        tensors.push((name, map.next_value()?));
                    }
                }
                Ok(Raw(tensors))
            }
        }
        deserializer.deserialize_map(Entries)
    }
}

/// The message of the parse error that stops a header at [`MAX_TENSORS`] entries.
const TOO_MANY_TENSORS: &str = "too many tensors";

/// `__metadata__`: checked to be a map of strings to strings, and dropped.
struct Metadata;

impl<'de> Deserialize<'de> for Metadata {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Strings;
        impl<'de> Visitor<'de> for Strings {
            type Value = Metadata;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a map of strings to strings")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Metadata, A::Error> {
                while map.next_entry::<String, String>()?.is_some() {}
                Ok(Metadata)
            }
        }
        deserializer.deserialize_map(Strings)
    }
}

/// Reads one file's header: its length fits the limit and the file, then its entries (see
/// [`tensors`]).
pub fn read(file: &dyn ReadAt) -> Result<Vec<TensorPlan>, HeaderError> {
    let file_bytes = file.size().map_err(HeaderError::Io)?;
    let mut len = [0u8; 8];
    if file_bytes < 8 {
        return Err(HeaderError::Corrupt(format!("{file_bytes} bytes is too short for a safetensors header")));
    }
    file.read_exact_at(&mut len, 0).map_err(HeaderError::Io)?;
    let header_len = u64::from_le_bytes(len);
    if header_len > MAX_HEADER_BYTES {
        return Err(HeaderError::Corrupt(format!(
            "header length {header_len} exceeds the limit of {MAX_HEADER_BYTES}"
        )));
    }
    if 8 + header_len > file_bytes {
        return Err(HeaderError::Corrupt(format!(
            "header length {header_len} is larger than the file ({file_bytes} bytes): truncated?"
        )));
    }
    let mut json = vec![0u8; header_len as usize];
    file.read_exact_at(&mut json, 8).map_err(HeaderError::Io)?;
    let data_start = 8 + header_len;
    tensors(&json, data_start, file_bytes - data_start)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn parse(header: serde_json::Value, data_len: u64) -> Result<Vec<TensorPlan>, HeaderError> {
        tensors(&serde_json::to_vec(&header).expect("json"), 0, data_len)
    }

    /// Found reading the code behind the `header` fuzz target (fuzz/): the size a load books for
    /// a tensor converted to a wider dtype overflowed (wrapping to 0 in a release build) for a
    /// header whose data section (the size the hub reports for a file still to fetch) is 2^63
    /// bytes.
    #[test]
    fn resident_bytes_of_a_huge_tensor_do_not_overflow() {
        let header = json!({"a": {"dtype": "F16", "shape": [1u64 << 62], "data_offsets": [0, 1u64 << 63]}});
        let got = parse(header, 1 << 63).expect("valid");
        assert!(got[0].resident_bytes(Some(TargetDtype::F32)) >= got[0].len);
    }

    fn corrupt(header: serde_json::Value, data_len: u64) -> String {
        match parse(header, data_len) {
            Err(HeaderError::Corrupt(reason)) => reason,
            other => panic!("expected a corrupt header, got {other:?}"),
        }
    }

    #[test]
    fn tensors_come_sorted_by_offset_with_metadata_skipped() {
        let header = json!({
            "__metadata__": {"format": "pt"},
            "b": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [16, 28]},
            "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
            "empty": {"dtype": "I64", "shape": [0], "data_offsets": [28, 28]},
        });
        // Offsets in the file count from the start of the data section (here byte 100).
        let got = tensors(&serde_json::to_vec(&header).expect("json"), 100, 28).expect("valid");
        let names: Vec<_> = got.iter().map(|e| (e.name.as_str(), e.dtype, e.offset, e.len)).collect();
        assert_eq!(names, [("a", DType::F32, 100, 16), ("b", DType::BF16, 116, 12), ("empty", DType::I64, 128, 0)]);
        assert_eq!(got[1].shape, [2, 3]);
    }

    #[test]
    fn names_with_escapes_are_read_whole() {
        let got = parse(json!({"a\"b\\n": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}), 1);
        assert_eq!(got.expect("valid")[0].name, "a\"b\\n");
    }

    #[test]
    fn every_rule_of_the_format_is_checked() {
        let f32_at =
            |start: u64, end: u64| json!({"dtype": "F32", "shape": [(end - start) / 4], "data_offsets": [start, end]});
        assert!(corrupt(json!({"a": f32_at(0, 16), "b": f32_at(8, 24)}), 24).contains("overlap"));
        assert!(corrupt(json!({"a": f32_at(0, 16), "b": f32_at(20, 36)}), 36).contains("gap"));
        assert!(corrupt(json!({"a": f32_at(4, 16)}), 16).contains("gap"));
        assert!(corrupt(json!({"a": {"dtype": "F32", "shape": [1], "data_offsets": [8, 4]}}), 8).contains("[8, 4]"));
        assert!(corrupt(json!({"a": f32_at(0, 16)}), 24).contains("truncated or padded"));
        assert!(
            corrupt(json!({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}), 16).contains("shape [3]")
        );
        let huge = json!({"a": {"dtype": "F32", "shape": [usize::MAX, 2], "data_offsets": [0, 16]}});
        assert!(corrupt(huge, 16).contains("does not take"), "an overflowing shape is refused, not wrapped");
        assert!(
            corrupt(json!({"a": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 1]}}), 1).contains("invalid header")
        );
        assert!(corrupt(json!([1, 2]), 0).contains("invalid header"));
        let twice = br#"{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
                         "a": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}"#;
        assert!(matches!(tensors(twice, 0, 2), Err(HeaderError::Corrupt(r)) if r.contains("appears twice")));
    }

    #[test]
    fn dtypes_candle_cannot_hold_are_unsupported() {
        for dtype in ["F8_E5M2", "F8_E8M0", "F4", "C64"] {
            let header = json!({"a": {"dtype": dtype, "shape": [4], "data_offsets": [0, 4]}});
            match parse(header, 4) {
                Err(HeaderError::Unsupported { tensor, dtype: got }) => {
                    assert_eq!((tensor.as_str(), got.as_str()), ("a", dtype))
                }
                other => panic!("{dtype}: expected unsupported, got {other:?}"),
            }
        }
    }

    /// FP8 (F8_E4M3) is held as candle's `F8E4M3`, one byte an element.
    #[test]
    fn fp8_is_held() {
        let header = json!({"a": {"dtype": "F8_E4M3", "shape": [2, 2], "data_offsets": [0, 4]}});
        let got = parse(header, 4).expect("FP8 is held");
        assert_eq!((got[0].dtype, got[0].len), (DType::F8E4M3, 4));
    }
}
