//! Opening a model's files without trusting what they are. A FIFO, a socket or a device node
//! in a model folder would block `open` or `read` for ever (a FIFO waits for a writer) and wedge
//! the load slot, the unload and shutdown with it: files are opened non-blocking and refused
//! unless they are regular files, before a byte is read.

use std::{
    fs::{File, OpenOptions},
    io::{self, Read},
    os::unix::fs::{FileTypeExt, OpenOptionsExt},
    path::Path,
};

/// Why a path could not be opened as a model file.
#[derive(Debug)]
pub(crate) enum OpenError {
    /// The path is there but is not a regular file: what it is instead.
    NotAFile(&'static str),
    Io(io::Error),
}

/// `path` opened read-only if it is a regular file. `O_NONBLOCK` makes opening a FIFO return at
/// once (it has no effect on regular files' reads); the type is checked on the open file, so a
/// path swapped after a check cannot slip through.
pub(crate) fn open_regular(path: &Path) -> Result<File, OpenError> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(path)
        .map_err(|e| {
            if e.kind() == io::ErrorKind::IsADirectory { OpenError::NotAFile("a directory") } else { OpenError::Io(e) }
        })?;
    let kind = file.metadata().map_err(OpenError::Io)?.file_type();
    if kind.is_file() {
        return Ok(file);
    }
    Err(OpenError::NotAFile(if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_socket() {
        "a socket"
    } else if kind.is_char_device() || kind.is_block_device() {
        "a device"
    } else {
        "not a regular file"
    }))
}

/// The first line of a small text file (an HF cache ref), if it is a regular file that reads.
pub(crate) fn read_small(path: &Path, limit: u64) -> Option<String> {
    let mut text = String::new();
    open_regular(path).ok()?.take(limit).read_to_string(&mut text).ok()?;
    Some(text)
}

impl OpenError {
    /// As a files error about `file` (the path as the model names it).
    pub(crate) fn into_files(self, file: &str) -> weights::Error {
        match self {
            Self::NotAFile(what) => weights::Error::NotAFile { file: file.to_owned(), what },
            Self::Io(source) => weights::Error::Read { file: file.to_owned(), source },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fifo_a_directory_and_a_socket_are_refused_without_blocking() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fifo = dir.path().join("fifo");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::RUSR | rustix::fs::Mode::WUSR,
            0,
        )
        .expect("mkfifo");
        assert!(matches!(open_regular(&fifo), Err(OpenError::NotAFile("a FIFO"))));
        assert!(matches!(open_regular(dir.path()), Err(OpenError::NotAFile("a directory"))));
        let socket = dir.path().join("socket");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).expect("bind");
        // Opening a socket fails (ENXIO) before the type check; either way it is refused.
        assert!(open_regular(&socket).is_err());
        let file = dir.path().join("file");
        std::fs::write(&file, "abc").expect("write");
        assert!(open_regular(&file).is_ok());
        assert_eq!(read_small(&file, 2).as_deref(), Some("ab"));
        assert_eq!(read_small(&fifo, 2), None);
    }
}
