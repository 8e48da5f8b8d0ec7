//! The safetensors header parser (`weights::header`), the first code to see a weight file's
//! bytes. The first input byte picks what the rest is:
//! - even: a whole file (8-byte little-endian header length, JSON, data), through `header::read`;
//! - odd: the data section's start and length (8 bytes little-endian each), then the header's
//!   JSON alone, through `header::tensors` (a file still on the hub is planned from its header
//!   and the size the hub reports, so the section may be far larger than the input).
//!
//! Every accepted header must pass `check_tensors`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use model_loader_fuzz::{MemoryFile, check_tensors};
use weights::header;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    if mode % 2 == 0 {
        if let Ok(tensors) = header::read(&MemoryFile(rest)) {
            let header_len = u64::from_le_bytes(rest[..8].try_into().expect("8 bytes"));
            assert!(header_len <= weights::MAX_HEADER_BYTES);
            let data_start = 8 + header_len;
            check_tensors(&tensors, data_start, rest.len() as u64 - data_start);
        }
    } else {
        let Some((start, rest)) = rest.split_first_chunk::<8>() else { return };
        let Some((len, json)) = rest.split_first_chunk::<8>() else { return };
        let (data_start, data_len) = (u64::from_le_bytes(*start), u64::from_le_bytes(*len));
        // A section that would end past 2^64 bytes is no file's.
        if data_start.checked_add(data_len).is_none() {
            return;
        }
        if let Ok(tensors) = header::tensors(json, data_start, data_len) {
            check_tensors(&tensors, data_start, data_len);
        }
    }
});
