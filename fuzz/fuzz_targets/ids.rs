//! What a request names, parsed where it enters: the model id (`ModelId::parse`), the revision
//! (`Revision::parse`), the target dtype and the device (`DeviceRequest`; lists of them,
//! `TargetRequest`; a placement, `Layout`), and the memory budget
//! as a flag gives it (`MemoryBudget`). The input, as UTF-8 (request fields are protobuf
//! strings), goes through each.
//!
//! An accepted id or revision is the input itself and cannot name a path outside a root: no
//! `..`, no leading `/`, no control characters; a refusal echoes only the input's start (120
//! characters; 40 for a dtype or device), since errors travel in a size-capped header.

#![no_main]

use libfuzzer_sys::fuzz_target;
use model_id::{InvalidRequest, ModelId, Revision, TargetDtype};
use resource_manager::{DeviceRequest, Layout, MAX_TARGET_DEVICES, MemoryBudget, ResourceError, TargetRequest};

/// `echo` is the start of `input`, at most `max` characters.
fn assert_echoes(input: &str, echo: &str, max: usize) {
    assert!(input.starts_with(echo) && echo.chars().count() <= max, "{echo:?} echoes {input:?}");
}

fn assert_path_safe(s: &str) {
    assert!(!s.contains("..") && !s.starts_with('/') && !s.chars().any(char::is_control), "{s:?} accepted");
}

fn refused(input: &str, e: &InvalidRequest, field: &str, max: usize) {
    assert_eq!(e.field, field);
    assert_echoes(input, &e.value, max);
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    match ModelId::parse(s) {
        Ok(id) => {
            assert_eq!((id.as_str(), id.to_string().as_str()), (s, s));
            assert_path_safe(s);
            let (org, name) = id.split();
            assert_eq!(org.map_or(name.to_owned(), |org| format!("{org}/{name}")), s);
        }
        Err(e) => refused(s, &e, "model_id", 120),
    }
    match Revision::parse(s) {
        Ok(rev) => {
            assert_eq!(rev.as_str(), s);
            assert_path_safe(s);
            assert!(!rev.is_commit() || (s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())));
        }
        Err(e) => refused(s, &e, "revision", 120),
    }
    match s.parse::<TargetDtype>() {
        Ok(dtype) => {
            assert_eq!(dtype.to_string().parse(), Ok(dtype), "its name parses back");
            assert_eq!(dtype.candle().size_in_bytes(), if dtype == TargetDtype::F32 { 4 } else { 2 });
        }
        Err(e) => refused(s, &e, "dtype", 40),
    }
    match s.parse::<DeviceRequest>() {
        Ok(DeviceRequest::Cpu) => assert_eq!(s, "cpu"),
        Ok(DeviceRequest::Cuda(None)) => assert_eq!(s, "cuda"),
        Ok(DeviceRequest::Cuda(Some(n))) => {
            assert_eq!(s.strip_prefix("cuda:").and_then(|d| d.parse().ok()), Some(n));
            assert_eq!(format!("cuda:{n}").parse::<DeviceRequest>().ok(), Some(DeviceRequest::Cuda(Some(n))));
        }
        Err(ResourceError::InvalidDevice(echo)) => assert_echoes(s, &echo, 40),
        Err(e) => panic!("a device is refused as invalid, not {e:?}"),
    }
    // Several devices: each comma-separated part a device, at most MAX_TARGET_DEVICES of them, or
    // `cuda:*`; a refusal echoes at most a bounded prefix.
    match s.parse::<TargetRequest>() {
        Ok(TargetRequest::AllGpus) => assert_eq!(s, "cuda:*"),
        Ok(TargetRequest::Devices(devices)) => {
            let parts: Vec<&str> = s.split(',').collect();
            assert!(devices.len() == parts.len() && devices.len() <= MAX_TARGET_DEVICES, "{s:?}");
            for (device, part) in devices.iter().zip(parts) {
                assert_eq!(part.parse::<DeviceRequest>().as_ref(), Ok(device), "{part:?} of {s:?}");
            }
        }
        Err(ResourceError::InvalidDevice(echo)) => assert!(echo.chars().count() <= 80, "{echo:?}"),
        Err(e) => panic!("a device list is refused as invalid, not {e:?}"),
    }
    match s.parse::<Layout>() {
        Ok(layout) => assert_eq!(layout.name(), s),
        Err(ResourceError::InvalidPlacement(echo)) => assert_echoes(s, &echo, 40),
        Err(e) => panic!("a placement is refused as invalid, not {e:?}"),
    }
    if let Ok(MemoryBudget::Percent(p)) = s.parse::<MemoryBudget>() {
        assert!(p > 0.0 && p <= 100.0, "{p}% accepted");
    }
});
