//! The URL form of a model id: a prefix in an object store (`s3://bucket/models/llama`), parsed
//! strictly so that what reaches a store is a bucket and a key prefix of the names the store
//! itself would accept, and never a path that means something else (`..`, empty segments).

use std::fmt;

/// The longest object-store id accepted (S3 keys are at most 1,024 bytes).
pub const MAX_OBJECT_ID: usize = 1024;

/// Which kind of store a URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scheme {
    /// `s3://bucket/prefix`: Amazon S3 or an S3-compatible server (an endpoint setting).
    S3,
    /// `gs://bucket/prefix`: Google Cloud Storage.
    Gcs,
    /// `az://container/prefix`: Azure Blob Storage.
    Azure,
    /// `https://host[:port]/path` (or `http://`): a folder served over HTTP with ranges.
    Https,
    Http,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::S3 => "s3",
            Self::Gcs => "gs",
            Self::Azure => "az",
            Self::Https => "https",
            Self::Http => "http",
        }
    }
}

/// A model's location in an object store: the store (scheme and bucket, container or host) and
/// the key prefix its files are under (`""` for the bucket's root), without trailing `/`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectUrl {
    pub scheme: Scheme,
    /// The bucket (S3, GCS), the container (Azure) or `host[:port]` (HTTP).
    pub bucket: String,
    pub prefix: String,
}

impl fmt::Display for ObjectUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.scheme.as_str(), self.bucket)?;
        if !self.prefix.is_empty() {
            write!(f, "/{}", self.prefix)?;
        }
        Ok(())
    }
}

impl ObjectUrl {
    /// `Ok(None)` when `id` is not a URL (no `://`); else the URL, or why it is refused.
    pub fn parse(id: &str) -> Result<Option<Self>, &'static str> {
        let Some((scheme, rest)) = id.split_once("://") else { return Ok(None) };
        let scheme = match scheme {
            "s3" => Scheme::S3,
            "gs" => Scheme::Gcs,
            "az" => Scheme::Azure,
            "https" => Scheme::Https,
            "http" => Scheme::Http,
            _ => return Err("the only URL schemes are s3://, gs://, az://, https:// and http://"),
        };
        if id.len() > MAX_OBJECT_ID {
            return Err("an object-store id is at most 1024 characters");
        }
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        match scheme {
            Scheme::S3 | Scheme::Gcs => check_bucket(bucket, scheme == Scheme::Gcs)?,
            Scheme::Azure => check_container(bucket)?,
            Scheme::Https | Scheme::Http => check_host(bucket)?,
        }
        if rest.contains('/') {
            check_prefix(prefix)?;
        }
        Ok(Some(Self { scheme, bucket: bucket.to_owned(), prefix: prefix.to_owned() }))
    }
}

/// S3's bucket rules (GCS's are the same, with `_` allowed): 3–63 lowercase letters, digits,
/// `.` and `-`, starting and ending with a letter or digit, no `..`.
fn check_bucket(bucket: &str, underscore: bool) -> Result<(), &'static str> {
    let allowed =
        |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-' || underscore && b == b'_';
    if !(3..=63).contains(&bucket.len()) {
        return Err("a bucket name has 3 to 63 characters");
    }
    if !bucket.bytes().all(allowed) {
        return Err("a bucket name has only lowercase letters, digits, '.' and '-'");
    }
    if !bucket.starts_with(|c: char| c.is_ascii_alphanumeric())
        || !bucket.ends_with(|c: char| c.is_ascii_alphanumeric())
    {
        return Err("a bucket name starts and ends with a letter or a digit");
    }
    if bucket.contains("..") {
        return Err("a bucket name has no '..'");
    }
    Ok(())
}

/// Azure's container rules: 3–63 lowercase letters, digits and single `-`, starting and ending
/// with a letter or digit.
fn check_container(container: &str) -> Result<(), &'static str> {
    let fits = (3..=63).contains(&container.len())
        && container.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !container.starts_with('-')
        && !container.ends_with('-')
        && !container.contains("--");
    if fits { Ok(()) } else { Err("a container name has 3 to 63 lowercase letters, digits and single '-'") }
}

/// `host` or `host:port`: a DNS name or an IPv4 address, a port of digits.
fn check_host(host: &str) -> Result<(), &'static str> {
    let (name, port) = host.split_once(':').unwrap_or((host, ""));
    let name_ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    let port_ok =
        !host.contains(':') || (!port.is_empty() && port.len() <= 5 && port.bytes().all(|b| b.is_ascii_digit()));
    if name_ok && port_ok { Ok(()) } else { Err("expected a host name or address, and an optional port") }
}

/// Key segments: not empty, not `.` or `..`, of letters, digits and `-_.+=@~`.
fn check_prefix(prefix: &str) -> Result<(), &'static str> {
    if prefix.is_empty() {
        return Err("a trailing '/' names no prefix: remove it");
    }
    for segment in prefix.split('/') {
        if segment.is_empty() {
            return Err("empty path segments ('//' or a trailing '/') are not allowed");
        }
        if segment == "." || segment == ".." {
            return Err("'.' and '..' segments are not allowed");
        }
        if !segment.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.+=@~".contains(&b)) {
            return Err("a path segment has only letters, digits and '-', '_', '.', '+', '=', '@', '~'");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Buckets, containers and hosts follow their stores' rules; prefixes have no empty, `.`
    /// or `..` segment; ids without `://` are not URLs.
    #[test]
    fn object_urls_are_parsed_strictly() {
        let url = ObjectUrl::parse("s3://my-bucket/models/llama-3").expect("valid").expect("a URL");
        assert_eq!((url.scheme, url.bucket.as_str(), url.prefix.as_str()), (Scheme::S3, "my-bucket", "models/llama-3"));
        assert_eq!(url.to_string(), "s3://my-bucket/models/llama-3");
        let root = ObjectUrl::parse("gs://b_1.x").expect("valid").expect("a URL");
        assert_eq!((root.scheme, root.prefix.as_str()), (Scheme::Gcs, ""));
        for ok in ["az://container-1/m", "https://example.com/m/v1", "http://127.0.0.1:9000/b/m"] {
            assert!(matches!(ObjectUrl::parse(ok), Ok(Some(_))), "{ok}");
        }
        assert_eq!(ObjectUrl::parse("org/name"), Ok(None));
        let long = format!("s3://bucket/{}", "a".repeat(1100));
        for bad in [
            "ftp://host/x",
            "s3://",
            "s3://ab/x",
            "s3://Bucket/x",
            "s3://-bucket/x",
            "s3://bu..cket/x",
            "s3://bucket/",
            "s3://bucket//x",
            "s3://bucket/a/../b",
            "s3://bucket/./b",
            "s3://bucket/a b",
            "s3://bucket/a\u{0}b",
            "s3://b_ucket/x",
            "az://con--tainer/x",
            "https://host:port/x",
            "https://-host/x",
            "https:///x",
            &long,
        ] {
            assert!(ObjectUrl::parse(bad).is_err(), "{bad:?}");
        }
    }
}
