//! A request on the attach socket: the input is what a client writes before it stops writing.
//! One end of a Unix socket pair gets it, and the other end reads it as the server does: one
//! frame (`attach::wire::read_frame`, a 4-byte little-endian length then at most
//! `MAX_REQUEST_BYTES`), decoded as an `AttachRequest`, whose fields are then checked with the
//! parsers the server's `lease` uses (the model id; the revision and device with
//! `load_if_needed`).
//!
//! A frame read must be the bytes its length names, and a refused one must be too long or cut
//! short; a decoded request must encode back to itself.

#![no_main]

use std::{
    io::{ErrorKind, Write},
    net::Shutdown,
    os::unix::net::UnixStream,
};

use attach::{AttachRequest, wire};
use libfuzzer_sys::fuzz_target;
use model_id::{ModelId, Revision};
use prost::Message;
use resource_manager::TargetRequest;

/// Past the longest frame a server reads, more bytes change nothing; within it, they fit a
/// socket's buffer, so one thread can write them all before reading.
const MAX_INPUT: usize = 4 + wire::MAX_REQUEST_BYTES as usize + 1;

fuzz_target!(|data: &[u8]| {
    let data = &data[..data.len().min(MAX_INPUT)];
    let (mut client, server) = UnixStream::pair().expect("a socket pair");
    client.write_all(data).expect("the input fits the socket's buffer");
    client.shutdown(Shutdown::Write).expect("shutdown");
    let len = data.first_chunk::<4>().map(|len| u32::from_le_bytes(*len));
    let body = match wire::read_frame(&server, wire::MAX_REQUEST_BYTES) {
        Ok((body, fds)) => {
            assert!(fds.is_empty());
            assert_eq!(Some(body.len() as u32), len);
            assert_eq!(body, data[4..4 + body.len()]);
            body
        }
        Err(e) if e.kind() == ErrorKind::InvalidData => {
            assert!(len.is_some_and(|len| len > wire::MAX_REQUEST_BYTES), "refused: {e}");
            return;
        }
        Err(e) => {
            assert_eq!(e.kind(), ErrorKind::UnexpectedEof, "{e}");
            assert!(len.is_none_or(|len| data.len() < 4 + len as usize), "a whole frame refused: {e}");
            return;
        }
    };
    let Ok(request) = AttachRequest::decode(body.as_slice()) else { return };
    assert_eq!(AttachRequest::decode(request.encode_to_vec().as_slice()).ok().as_ref(), Some(&request));
    if ModelId::parse(&request.model_id).is_err() || !request.load_if_needed {
        return;
    }
    if let Some(rev) = request.revision.as_deref().filter(|r| !r.is_empty()) {
        let _ = Revision::parse(rev);
    }
    if let Some(device) = request.device.as_deref().filter(|d| !d.is_empty()) {
        let _ = device.parse::<TargetRequest>();
    }
});
