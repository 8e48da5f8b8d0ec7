//! What names a model and what a load asks of it, validated where it enters: the model id, the
//! revision, the target dtype, and which kind of source the files came from. The lowest crate:
//! every other one keys and reports models by these types. It never touches a file or a device.

mod object;

use std::{fmt, str::FromStr};

pub use crate::object::{MAX_OBJECT_ID, ObjectUrl, Scheme};

/// The longest part of a repo id the hub accepts.
const MAX_ID_PART: usize = 96;
/// The longest revision we accept (a branch or tag name; commits are 40 hex digits).
const MAX_REVISION: usize = 255;

/// A model id: a Hugging Face repo id (`org/name`), the name of a folder under the model root
/// (`name`), or a prefix in an object store (`s3://bucket/prefix`, see [`ObjectUrl`]). Checked
/// against the hub's (or the store's) rules, so it can never name a path outside the roots.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModelId(String);

/// Why a request field was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field} {value:?}: {reason}")]
pub struct InvalidRequest {
    pub field: &'static str,
    pub value: String,
    pub reason: &'static str,
}

impl ModelId {
    pub fn parse(id: &str) -> Result<Self, InvalidRequest> {
        let invalid = |reason| InvalidRequest { field: "model_id", value: id.chars().take(120).collect(), reason };
        if ObjectUrl::parse(id).map_err(invalid)?.is_some() {
            return Ok(Self(id.to_owned()));
        }
        if id.is_empty() {
            return Err(invalid("empty"));
        }
        if id.len() > 2 * MAX_ID_PART + 1 {
            return Err(invalid("too long"));
        }
        let parts: Vec<&str> = id.split('/').collect();
        if parts.len() > 2 {
            return Err(invalid("expected \"name\" or \"org/name\""));
        }
        for part in parts {
            check_part(part).map_err(invalid)?;
        }
        Ok(Self(id.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Its object-store location, for an id in URL form.
    pub fn object_url(&self) -> Option<ObjectUrl> {
        // Parsed when the id was made: it cannot fail now.
        ObjectUrl::parse(&self.0).ok().flatten()
    }

    /// `(org, name)` for an `org/name` id.
    pub fn split(&self) -> (Option<&str>, &str) {
        match self.0.split_once('/') {
            Some((org, name)) => (Some(org), name),
            None => (None, &self.0),
        }
    }
}

fn check_part(part: &str) -> Result<(), &'static str> {
    if part.is_empty() {
        return Err("empty part");
    }
    if part.len() > MAX_ID_PART {
        return Err("a part is longer than 96 characters");
    }
    if !part.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')) {
        return Err("only letters, digits, '-', '_' and '.' are allowed");
    }
    if part.contains("..") {
        return Err("'..' is not allowed");
    }
    if part.starts_with(['-', '.']) || part.ends_with(['-', '.']) {
        return Err("a part may not start or end with '-' or '.'");
    }
    Ok(())
}

// Maps keyed by `ModelId` are looked up by `&str` too (a progress message names its model as
// text): the derived `Hash` and `Eq` are the inner string's, as `Borrow` requires.
impl std::borrow::Borrow<str> for ModelId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ModelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a loaded model's files came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, strum::Display)]
#[strum(serialize_all = "lowercase")]
pub enum ModelSource {
    /// A folder under the model root.
    Local,
    /// A snapshot in the Hugging Face cache.
    Cache,
    /// Downloaded from the hub.
    Hub,
    /// Read from an object store (`s3://`, `gs://`, `az://`, `https://`).
    #[strum(serialize = "object_store")]
    ObjectStore,
}

/// A branch, tag or commit.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Revision(String);

/// The revision used when a request names none.
pub const DEFAULT_REVISION: &str = "main";

impl Default for Revision {
    fn default() -> Self {
        Self(DEFAULT_REVISION.to_owned())
    }
}

impl Revision {
    pub fn parse(rev: &str) -> Result<Self, InvalidRequest> {
        let invalid = |reason| InvalidRequest { field: "revision", value: rev.chars().take(120).collect(), reason };
        if rev.is_empty() {
            return Err(invalid("empty"));
        }
        if rev.len() > MAX_REVISION {
            return Err(invalid("too long"));
        }
        if !rev.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/')) {
            return Err(invalid("only letters, digits, '-', '_', '.' and '/' are allowed"));
        }
        if rev.contains("..") || rev.starts_with('/') || rev.ends_with('/') || rev.contains("//") {
            return Err(invalid("not a valid ref name"));
        }
        Ok(Self(rev.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A full commit hash (40 hex digits).
    pub fn is_commit(&self) -> bool {
        self.0.len() == 40 && self.0.bytes().all(|b| b.is_ascii_hexdigit())
    }
}

/// The floating-point dtype a load converts its float tensors to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, strum::Display)]
pub enum TargetDtype {
    #[strum(serialize = "F32")]
    F32,
    #[strum(serialize = "F16")]
    F16,
    #[strum(serialize = "BF16")]
    BF16,
}

impl FromStr for TargetDtype {
    type Err = InvalidRequest;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(Self::F32),
            "f16" | "float16" | "fp16" => Ok(Self::F16),
            "bf16" | "bfloat16" => Ok(Self::BF16),
            _ => Err(InvalidRequest {
                field: "dtype",
                value: s.chars().take(40).collect(),
                reason: "expected \"f32\", \"f16\" or \"bf16\"",
            }),
        }
    }
}

impl TargetDtype {
    pub fn candle(self) -> candle_core::DType {
        match self {
            Self::F32 => candle_core::DType::F32,
            Self::F16 => candle_core::DType::F16,
            Self::BF16 => candle_core::DType::BF16,
        }
    }

    /// The precision variant of the weight files that holds this dtype already (diffusers
    /// naming: `model.fp16.safetensors`), read instead of the full-precision files when present.
    pub fn variant(self) -> Option<&'static str> {
        match self {
            Self::F32 => None,
            Self::F16 => Some("fp16"),
            Self::BF16 => Some("bf16"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hub-style ids pass; paths, '..', control characters, empty and over-long ids do not.
    #[test]
    fn model_ids_follow_the_hub_rules() {
        for ok in ["demo/tiny-sd", "gpt2", "org_1/model.v2", "A/b-c_d.e"] {
            assert!(ModelId::parse(ok).is_ok(), "{ok}");
        }
        let long = "a".repeat(200);
        for bad in ["", "../x", "/abs", "a//b", "a/b/c", "a\u{0}b", "a\nb", "x/..", "-a", "a.", "a b", &long, "a/"] {
            assert!(ModelId::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(ModelId::parse("o/n").expect("valid").split(), (Some("o"), "n"));
    }

    /// Revisions are ref names or commits; dtypes are the three float types.
    #[test]
    fn revisions_and_dtypes() {
        assert!(Revision::parse("main").is_ok());
        assert!(Revision::parse("refs/pr/1").is_ok());
        assert!(Revision::parse(&"a".repeat(40)).expect("ok").is_commit());
        for bad in ["", "../main", "/x", "a b", "x//y"] {
            assert!(Revision::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!("bf16".parse(), Ok(TargetDtype::BF16));
        assert_eq!("F16".parse(), Ok(TargetDtype::F16));
        assert!("int8".parse::<TargetDtype>().is_err());
    }
}
