//! Frames on the attach socket: a 4-byte little-endian length, then that many bytes of one
//! prost message; a response's file descriptors travel as SCM_RIGHTS ancillary data with its
//! bytes, at most [`MAX_FDS`] a message: more go over several messages ([`pieces`]), each with a
//! part of the frame, so a reader collecting every descriptor that comes while it reads the frame
//! gets them all, in order. Written here with `rustix`'s `sendmsg`/`recvmsg`, which std's Unix
//! sockets lack.

use std::{
    io::{self, IoSlice, IoSliceMut},
    mem::MaybeUninit,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
};

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer, SendAncillaryMessage,
    SendFlags,
};

/// The largest request a server reads: a model id and a few fields need far less.
pub const MAX_REQUEST_BYTES: u32 = 64 * 1024;
/// The largest response a client reads (a checkpoint of 100,000 tensors is about 10 MB).
pub const MAX_RESPONSE_BYTES: u32 = 256 * 1024 * 1024;
/// File descriptors one message can carry (the kernel's SCM_MAX_FD).
pub const MAX_FDS: usize = 253;

/// `message` as a frame's bytes.
pub fn encode(message: &impl prost::Message) -> Vec<u8> {
    let body = message.encode_to_vec();
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(&body);
    frame
}

/// How a frame and its descriptors are sent: one message per [`MAX_FDS`] descriptors, each but
/// the last with one byte of the frame (a message cannot carry descriptors without bytes), the
/// last with the rest. The kernel never merges two messages with descriptors into one read, so
/// the reader gets each message's descriptors with its bytes.
pub fn pieces<'a, 'fd>(
    frame: &'a [u8],
    fds: &'a [BorrowedFd<'fd>],
) -> io::Result<Vec<(&'a [u8], &'a [BorrowedFd<'fd>])>> {
    let chunks: Vec<&[BorrowedFd<'fd>]> = fds.chunks(MAX_FDS).collect();
    let Some(last) = chunks.len().checked_sub(1) else { return Ok(vec![(frame, fds)]) };
    if last >= frame.len() {
        return Err(io::Error::other(format!("{} file descriptors with a frame of {} bytes", fds.len(), frame.len())));
    }
    Ok(chunks.into_iter().enumerate().map(|(i, c)| (if i < last { &frame[i..=i] } else { &frame[i..] }, c)).collect())
}

/// Sends `bytes` on a blocking or ready socket, `fds` (at most [`MAX_FDS`]) with its first bytes.
/// Returns the bytes sent, which may be fewer (send the rest with [`send_rest`]).
pub fn send(socket: BorrowedFd<'_>, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
    if fds.len() > MAX_FDS {
        return Err(io::Error::other(format!("{} file descriptors in one message; at most {MAX_FDS}", fds.len())));
    }
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len().max(1)))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::other("the file descriptors do not fit their ancillary buffer"));
    }
    Ok(rustix::net::sendmsg(socket, &[IoSlice::new(bytes)], &mut control, SendFlags::NOSIGNAL)?)
}

/// Sends the rest of a frame, without descriptors.
pub fn send_rest(socket: BorrowedFd<'_>, rest: &[u8]) -> io::Result<usize> {
    Ok(rustix::net::send(socket, rest, SendFlags::NOSIGNAL)?)
}

/// Receives into `buf`, collecting any file descriptors that arrive (close-on-exec) into `fds`.
/// Returns the bytes received; 0 at the end of the stream. Descriptors the kernel dropped (this
/// process is at its open-file limit) are an error.
pub fn recv(socket: impl AsFd, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = rustix::net::recvmsg(socket, &mut [IoSliceMut::new(buf)], &mut control, RecvFlags::CMSG_CLOEXEC)?;
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = message {
            fds.extend(received);
        }
    }
    if got.flags.contains(ReturnFlags::CTRUNC) {
        return Err(io::Error::other(
            "file descriptors sent with the answer were dropped: is this process at its open-file limit (ulimit -n)?",
        ));
    }
    Ok(got.bytes)
}

/// Reads one whole frame from a blocking socket: its message's bytes and every descriptor sent
/// with them. A frame longer than `max` or cut short is an error.
pub fn read_frame(socket: impl AsFd, max: u32) -> io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    let socket = socket.as_fd();
    let mut fds = Vec::new();
    let mut len = [0u8; 4];
    fill(socket, &mut len, &mut fds)?;
    let len = u32::from_le_bytes(len);
    if len > max {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("a frame of {len} bytes; at most {max}")));
    }
    let mut body = vec![0u8; len as usize];
    fill(socket, &mut body, &mut fds)?;
    Ok((body, fds))
}

fn fill(socket: BorrowedFd<'_>, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<()> {
    let mut at = 0;
    while at < buf.len() {
        match recv(socket, &mut buf[at..], fds) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the frame was cut short")),
            Ok(n) => at += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes one whole frame to a blocking socket, `fds` with its first bytes ([`pieces`]).
pub fn write_frame(socket: impl AsFd, frame: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let socket = socket.as_fd();
    for (bytes, fds) in pieces(frame, fds)? {
        let mut at = send(socket, bytes, fds)?;
        while at < bytes.len() {
            at += send_rest(socket, &bytes[at..])?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::{fd::AsFd, unix::net::UnixStream};

    use super::*;

    /// A memfd of `size` bytes: its size tells the descriptors apart on the other side.
    fn memfd(size: u64) -> OwnedFd {
        let fd = rustix::fs::memfd_create("wire-test", rustix::fs::MemfdFlags::CLOEXEC).expect("memfd");
        rustix::fs::ftruncate(&fd, size).expect("ftruncate");
        fd
    }

    /// More descriptors than one message can carry (SCM_MAX_FD) arrive, all and in order, with
    /// one frame read as any reader reads it.
    #[test]
    fn six_hundred_descriptors_travel_with_one_frame() {
        let (server, client) = UnixStream::pair().expect("socketpair");
        let files: Vec<OwnedFd> = (1..=600).map(memfd).collect();
        let body = vec![7u8; 5000];
        let frame = {
            let mut frame = (body.len() as u32).to_le_bytes().to_vec();
            frame.extend_from_slice(&body);
            frame
        };
        let writer = std::thread::spawn(move || {
            let fds: Vec<BorrowedFd<'_>> = files.iter().map(|f| f.as_fd()).collect();
            write_frame(&server, &frame, &fds)
        });
        let (got, fds) = read_frame(&client, MAX_RESPONSE_BYTES).expect("the frame arrives");
        writer.join().expect("writer").expect("the frame is written");
        assert_eq!(got, body);
        let sizes: Vec<u64> = fds.iter().map(|fd| rustix::fs::fstat(fd).expect("fstat").st_size as u64).collect();
        assert_eq!(sizes, (1..=600).collect::<Vec<u64>>());
    }
}
