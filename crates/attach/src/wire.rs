//! Frames on the attach socket: a 4-byte little-endian length, then that many bytes of one
//! prost message; a response's file descriptors travel as SCM_RIGHTS ancillary data with its
//! bytes. Written here with `rustix`'s `sendmsg`/`recvmsg`, which std's Unix sockets lack.

use std::{
    io::{self, IoSlice, IoSliceMut},
    mem::MaybeUninit,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
};

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer, SendAncillaryMessage, SendFlags,
};

/// The largest request a server reads: a model id and a few fields need far less.
pub const MAX_REQUEST_BYTES: u32 = 64 * 1024;
/// The largest response a client reads (a checkpoint of 100,000 tensors is about 10 MB).
pub const MAX_RESPONSE_BYTES: u32 = 256 * 1024 * 1024;
/// File descriptors one frame can carry (the kernel's SCM_MAX_FD).
pub const MAX_FDS: usize = 253;

/// `message` as a frame's bytes.
pub fn encode(message: &impl prost::Message) -> Vec<u8> {
    let body = message.encode_to_vec();
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(&body);
    frame
}

/// Sends `frame` on a blocking or ready socket, `fds` with its first bytes. Returns the bytes
/// sent, which may be fewer than the frame's (send the rest with [`send_rest`]).
pub fn send(socket: BorrowedFd<'_>, frame: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
    if fds.len() > MAX_FDS {
        return Err(io::Error::other(format!("{} file descriptors in one frame; at most {MAX_FDS}", fds.len())));
    }
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len().max(1)))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::other("the file descriptors do not fit their ancillary buffer"));
    }
    Ok(rustix::net::sendmsg(socket, &[IoSlice::new(frame)], &mut control, SendFlags::NOSIGNAL)?)
}

/// Sends the rest of a frame, without descriptors.
pub fn send_rest(socket: BorrowedFd<'_>, rest: &[u8]) -> io::Result<usize> {
    Ok(rustix::net::send(socket, rest, SendFlags::NOSIGNAL)?)
}

/// Receives into `buf`, collecting any file descriptors that arrive (close-on-exec) into `fds`.
/// Returns the bytes received; 0 at the end of the stream.
pub fn recv(socket: impl AsFd, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = rustix::net::recvmsg(socket, &mut [IoSliceMut::new(buf)], &mut control, RecvFlags::CMSG_CLOEXEC)?;
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = message {
            fds.extend(received);
        }
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

/// Writes one whole frame to a blocking socket, `fds` with its first bytes.
pub fn write_frame(socket: impl AsFd, frame: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let socket = socket.as_fd();
    let mut at = send(socket, frame, fds)?;
    while at < frame.len() {
        at += send_rest(socket, &frame[at..])?;
    }
    Ok(())
}
