//! Step 3 for a model still to fetch: its files as they will be once fetched, so the plan is made
//! and its exact bytes reserved before step 4 moves any byte of weights. The weight files still
//! on the hub are seen through their leading bytes (the safetensors header, read ahead with
//! ranged requests) under their full size; everything else is the files at hand.

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    ops::Range,
    sync::Arc,
};

use futures::{StreamExt, TryStreamExt};
use model_id::ModelId;
use weights::{ModelFiles, ReadAt, header::MAX_HEADER_BYTES};

use crate::{
    DOWNLOAD_WORKERS, Error, HubFailure,
    hub::{Hub, RemoteFile, hub_error},
};

/// Bytes read ahead of each weight file at first: the whole header of almost every checkpoint
/// (a shard of a 70B model has a header of about 30 KB), so one ranged request per file.
pub(crate) const AHEAD_BYTES: u64 = 64 * 1024;

/// The leading bytes of a file not fetched yet, under the file's full size.
#[derive(Debug)]
pub(crate) struct Head {
    pub size: u64,
    pub bytes: Vec<u8>,
}

impl ReadAt for Head {
    fn size(&self) -> io::Result<u64> {
        Ok(self.size)
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset.checked_add(buf.len() as u64).filter(|&end| end <= self.bytes.len() as u64);
        let Some(end) = end else {
            return Err(io::Error::other(format!(
                "bytes {offset}..{} are not fetched yet (only the first {} are)",
                offset.saturating_add(buf.len() as u64),
                self.bytes.len()
            )));
        };
        buf.copy_from_slice(&self.bytes[offset as usize..end as usize]);
        Ok(())
    }
}

/// The weight files still to fetch, by path, each as its [`Head`].
pub(crate) type Heads = BTreeMap<String, Arc<Head>>;

/// A model's files as the plan sees them before its weights are fetched: `heads` over `files`.
pub(crate) struct Ahead {
    pub files: Arc<dyn ModelFiles>,
    pub heads: Arc<Heads>,
}

impl Ahead {
    /// The paths of `heads` inside folder `dir`, relative to it.
    fn heads_in<'a>(&'a self, dir: &'a str) -> impl Iterator<Item = &'a str> {
        self.heads.keys().filter_map(move |path| {
            if dir.is_empty() { Some(path.as_str()) } else { path.strip_prefix(dir)?.strip_prefix('/') }
        })
    }
}

impl ModelFiles for Ahead {
    fn list(&self, dir: &str) -> Result<Vec<String>, weights::Error> {
        let mut names = BTreeSet::new();
        if self.files.is_dir(dir)? {
            names.extend(self.files.list(dir)?);
        }
        names.extend(self.heads_in(dir).map(|rest| rest.split('/').next().unwrap_or(rest).to_owned()));
        Ok(names.into_iter().collect())
    }

    fn is_dir(&self, dir: &str) -> Result<bool, weights::Error> {
        Ok(self.files.is_dir(dir)? || self.heads_in(dir).next().is_some())
    }

    fn open(&self, path: &str) -> Result<Option<Arc<dyn ReadAt>>, weights::Error> {
        match self.heads.get(path) {
            Some(head) => Ok(Some(head.clone())),
            None => self.files.open(path),
        }
    }
}

/// Reads the head of every file of `files` from the hub, [`DOWNLOAD_WORKERS`] at a time.
pub(crate) async fn read_heads(hub: &Hub, id: &ModelId, commit: &str, files: &[RemoteFile]) -> Result<Heads, Error> {
    // Owned entries: a closure over borrowed ones trips the compiler's higher-ranked lifetimes
    // when the future is boxed as `Send` further up.
    let reads = files.iter().cloned().map(|file| async move {
        let head = read_head(hub, id, commit, &file).await?;
        Ok::<_, Error>((file.path, Arc::new(head)))
    });
    futures::stream::iter(reads).buffer_unordered(DOWNLOAD_WORKERS).try_collect().await
}

/// The first [`AHEAD_BYTES`] of `file`, and the rest of its header where it is longer. A header
/// longer than its file or the format's limit is not read further: the plan refuses it from the
/// length alone, as it does for a local file.
async fn read_head(hub: &Hub, id: &ModelId, commit: &str, file: &RemoteFile) -> Result<Head, Error> {
    let first = file.size.min(AHEAD_BYTES);
    let mut bytes = if first == 0 { Vec::new() } else { read_range(hub, id, commit, &file.path, 0..first).await? };
    if let Some(len) = bytes.first_chunk::<8>() {
        let end = 8u64.saturating_add(u64::from_le_bytes(*len));
        let have = bytes.len() as u64;
        if end > have && end <= file.size && end - 8 <= MAX_HEADER_BYTES {
            bytes.extend(read_range(hub, id, commit, &file.path, have..end).await?);
        }
    }
    Ok(Head { size: file.size, bytes })
}

/// The bytes `range` of `path` at `commit`, with one ranged GET. Only the range is kept: a server
/// that ignores `Range` and sends the whole file is read no further than the range's end, and is
/// refused where the range does not start at 0 (its bytes would be the wrong ones).
async fn read_range(hub: &Hub, id: &ModelId, commit: &str, path: &str, range: Range<u64>) -> Result<Vec<u8>, Error> {
    let want = range.end - range.start;
    let (start, repo) = (range.start, hub.repo(id));
    let request = repo.download_file_stream().filename(path.to_owned()).revision(commit.to_owned()).range(range);
    let (length, mut body) = request.send().await.map_err(hub_error)?;
    let unavailable = |reason: String| Error::Hub { failure: HubFailure::Unavailable, reason };
    if start > 0 && length.is_some_and(|n| n != want) {
        return Err(unavailable(format!("{path}: the hub did not answer a request for {want} bytes at {start}")));
    }
    let mut bytes = Vec::with_capacity(want as usize);
    while (bytes.len() as u64) < want {
        let Some(chunk) = body.next().await else { break };
        let chunk = chunk.map_err(hub_error)?;
        let take = chunk.len().min((want - bytes.len() as u64) as usize);
        bytes.extend_from_slice(&chunk[..take]);
    }
    if (bytes.len() as u64) < want {
        return Err(unavailable(format!("{path}: the hub sent {} of the {want} bytes at {start}", bytes.len())));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Files at hand: `config.json` and a folder `unet/` with its config.
    struct AtHand;

    impl ModelFiles for AtHand {
        fn list(&self, dir: &str) -> Result<Vec<String>, weights::Error> {
            Ok(match dir {
                "" => vec!["config.json".into(), "unet".into()],
                "unet" => vec!["config.json".into()],
                _ => return Err(weights::Error::NotFound(dir.into())),
            })
        }

        fn is_dir(&self, dir: &str) -> Result<bool, weights::Error> {
            Ok(matches!(dir, "" | "unet"))
        }

        fn open(&self, _path: &str) -> Result<Option<Arc<dyn ReadAt>>, weights::Error> {
            Ok(None)
        }
    }

    fn ahead() -> Ahead {
        let head = |size| Arc::new(Head { size, bytes: vec![1, 2, 3, 4] });
        let heads = [
            ("model.safetensors", head(10)),
            ("unet/model.safetensors", head(20)),
            ("vae/diffusion_pytorch_model.safetensors", head(30)),
        ];
        Ahead { files: Arc::new(AtHand), heads: Arc::new(heads.map(|(p, h)| (p.to_owned(), h)).into()) }
    }

    #[test]
    fn lists_the_heads_among_the_files_at_hand() {
        let files = ahead();
        assert_eq!(files.list("").expect("answers"), ["config.json", "model.safetensors", "unet", "vae"]);
        assert_eq!(files.list("unet").expect("answers"), ["config.json", "model.safetensors"]);
        assert_eq!(files.list("vae").expect("answers"), ["diffusion_pytorch_model.safetensors"]);
        assert!(files.list("text_encoder").expect("answers").is_empty());
        assert!(
            files.is_dir("vae").expect("answers")
                && files.is_dir("").expect("answers")
                && files.is_dir("unet").expect("answers")
        );
        assert!(!files.is_dir("model.safetensors").expect("answers") && !files.is_dir("va").expect("answers"));
    }

    #[test]
    fn a_head_serves_its_bytes_under_the_full_size_and_nothing_past_them() {
        let file = ahead().open("unet/model.safetensors").expect("answers").expect("a head");
        assert_eq!(file.size().expect("answers"), 20);
        let mut buf = [0u8; 3];
        file.read_exact_at(&mut buf, 1).expect("answers");
        assert_eq!(buf, [2, 3, 4]);
        let past = file.read_exact_at(&mut buf, 2).expect_err("past the head");
        assert!(past.to_string().contains("not fetched yet"), "{past}");
        assert!(file.read_exact_at(&mut buf, u64::MAX).is_err());
    }
}
