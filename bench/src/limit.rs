//! The floor any loader pays on this machine: the model's files read into freshly allocated
//! buffers, with parallel positioned reads (one thread per core) and with one plain `read` each.

use std::{
    fs::File,
    io::Read,
    os::unix::fs::FileExt,
    path::PathBuf,
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use anyhow::Context;

/// Pieces the files are cut into for the threads: large enough that a read is one long copy.
const PIECE_BYTES: u64 = 64 << 20;

/// Reads every byte of `files` on `threads` threads with `pread` into fresh buffers; returns the
/// time and the bytes read. The buffers are dropped after the clock stops.
pub fn parallel_pread(files: &[PathBuf], threads: usize) -> anyhow::Result<(Duration, u64)> {
    let opened = files
        .iter()
        .map(|f| File::open(f).with_context(|| format!("opening {}", f.display())))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut pieces = Vec::new();
    for (i, file) in opened.iter().enumerate() {
        let len = file.metadata()?.len();
        let mut at = 0;
        while at < len {
            pieces.push((i, at, PIECE_BYTES.min(len - at)));
            at += PIECE_BYTES;
        }
    }
    let next = AtomicUsize::new(0);
    let start = Instant::now();
    let buffers = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads.max(1))
            .map(|_| {
                scope.spawn(|| -> std::io::Result<Vec<Vec<u8>>> {
                    let mut mine = Vec::new();
                    while let Some(&(file, at, len)) = pieces.get(next.fetch_add(1, Ordering::Relaxed)) {
                        let mut buf = vec![0u8; len as usize];
                        opened[file].read_exact_at(&mut buf, at)?;
                        mine.push(buf);
                    }
                    Ok(mine)
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().expect("a reader thread panicked")).collect::<Result<Vec<_>, _>>()
    })?;
    let elapsed = start.elapsed();
    let bytes = buffers.iter().flatten().map(|b| b.len() as u64).sum();
    drop(buffers);
    Ok((elapsed, bytes))
}

/// Reads every file with plain `read` calls on one thread into one fresh buffer each.
pub fn single_read(files: &[PathBuf]) -> anyhow::Result<(Duration, u64)> {
    let start = Instant::now();
    let mut buffers = Vec::with_capacity(files.len());
    for path in files {
        let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let mut buf = vec![0u8; file.metadata()?.len() as usize];
        file.read_exact(&mut buf)?;
        buffers.push(buf);
    }
    let elapsed = start.elapsed();
    let bytes = buffers.iter().map(|b| b.len() as u64).sum();
    drop(buffers);
    Ok((elapsed, bytes))
}

/// Reads the files once so that every measurement finds them in the page cache.
pub fn warm(files: &[PathBuf]) -> anyhow::Result<()> {
    let mut buf = vec![0u8; 8 << 20];
    for path in files {
        let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        while file.read(&mut buf)? > 0 {}
    }
    Ok(())
}
