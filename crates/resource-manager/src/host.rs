//! Host memory: how much this process may use (the cgroup limit in a container, else what the
//! machine has available), and making freed tensor memory really go back to the operating system.

use std::path::{Path, PathBuf};

/// Tensors at least this large get their own mapping from the allocator (see
/// [`configure_allocator`]); smaller ones share the heap and come back through
/// [`release_free_memory`].
pub const OWN_MAPPING_BYTES: usize = 256 * 1024;

/// The memory this process may use: the cgroup's memory limit when one is set (a container, a
/// systemd unit), else `MemAvailable` at the time of the call.
pub fn capacity() -> u64 {
    let meminfo = MemInfo::read();
    match cgroup_memory(&read_file) {
        Some(cgroup) => cgroup.limit.min(meminfo.total),
        None => meminfo.available,
    }
}

/// Memory free now: the cgroup's limit minus its working set (usage without inactive page cache)
/// when a limit is set, never more than `MemAvailable`.
pub fn available() -> u64 {
    let meminfo = MemInfo::read();
    match cgroup_memory(&read_file) {
        Some(cgroup) => cgroup.limit.saturating_sub(cgroup.working_set).min(meminfo.available),
        None => meminfo.available,
    }
}

/// Makes large allocations come back to the OS on free. glibc serves an allocation from its own
/// `mmap` (unmapped on free) only above a threshold that starts at 128 KiB and *rises* to the size
/// of each mapped block freed, up to 32 MiB: after the first unload, tensors of a few MiB would be
/// carved from the heap, where freed memory mostly stays resident. A fixed threshold turns the
/// rise off, so every tensor of [`OWN_MAPPING_BYTES`] or more is its own mapping and an unload
/// returns its pages at once. Other allocators manage this themselves: a no-op there.
pub fn configure_allocator() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if !glibc::set_mmap_threshold(OWN_MAPPING_BYTES) {
            tracing::warn!("the allocator refused a fixed mmap threshold: freed tensor memory may stay resident");
        }
    });
}

/// Gives the free pages of the allocator's heaps back to the OS (small tensors share the heap with
/// everything else, so their freed memory is scattered between live blocks). Called after a
/// model's memory was freed; takes a few milliseconds at most.
pub fn release_free_memory() {
    glibc::trim();
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod glibc {
    // Two glibc calls that take plain integers, touch no memory of ours and are thread-safe
    // (they take the allocator's own locks).
    #![allow(unsafe_code)]

    /// `mallopt(M_MMAP_THRESHOLD, bytes)`; false if glibc refused it.
    pub fn set_mmap_threshold(bytes: usize) -> bool {
        let Ok(bytes) = libc::c_int::try_from(bytes) else { return false };
        // SAFETY: mallopt only reads its two integer arguments.
        unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, bytes) == 1 }
    }

    /// `malloc_trim(0)`: returns every free page of every arena to the OS.
    pub fn trim() {
        // SAFETY: malloc_trim only reads its integer argument.
        unsafe {
            libc::malloc_trim(0);
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod glibc {
    pub fn set_mmap_threshold(_bytes: usize) -> bool {
        true
    }

    pub fn trim() {}
}

fn read_file(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

struct MemInfo {
    total: u64,
    available: u64,
}

impl MemInfo {
    fn read() -> Self {
        let meminfo = read_file(Path::new("/proc/meminfo")).unwrap_or_default();
        let field = |name: &str| {
            meminfo.lines().find_map(|l| {
                let rest = l.strip_prefix(name)?.strip_prefix(':')?;
                let kib: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
                Some(kib * 1024)
            })
        };
        let total = field("MemTotal").unwrap_or(u64::MAX);
        Self { total, available: field("MemAvailable").unwrap_or(total) }
    }
}

/// The memory limit of this process's cgroup and what the cgroup uses.
#[derive(Debug, PartialEq, Eq)]
struct CgroupMemory {
    limit: u64,
    /// Usage minus inactive file pages (what the kernel would not easily reclaim), as the kubelet
    /// counts it.
    working_set: u64,
}

/// The tightest memory limit on the way from this process's cgroup up to the hierarchy's root,
/// cgroup v1 (memory controller) or v2, found through `/proc/self/{cgroup,mountinfo}`.
fn cgroup_memory(read: &dyn Fn(&Path) -> Option<String>) -> Option<CgroupMemory> {
    let cgroups = read(Path::new("/proc/self/cgroup"))?;
    let mountinfo = read(Path::new("/proc/self/mountinfo"))?;
    let (dir, top, v1) = cgroup_dir(&cgroups, &mountinfo)?;
    let (limit_file, usage_file, inactive_key) = if v1 {
        ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
    } else {
        ("memory.max", "memory.current", "inactive_file")
    };
    let number = |path: PathBuf| read(&path)?.trim().parse::<u64>().ok();
    let mut tightest: Option<(u64, PathBuf)> = None;
    let mut level = dir.as_path();
    loop {
        // "max" (v2) does not parse: no limit at this level. v1 writes "no limit" as a huge number.
        if let Some(limit) = number(level.join(limit_file)).filter(|&l| l < 1 << 62)
            && tightest.as_ref().is_none_or(|(t, _)| limit < *t)
        {
            tightest = Some((limit, level.to_owned()));
        }
        if level == top {
            break;
        }
        level = level.parent()?;
    }
    let (limit, at) = tightest?;
    let usage = number(at.join(usage_file)).unwrap_or(0);
    let inactive = read(&at.join("memory.stat"))
        .and_then(|stat| {
            stat.lines().find_map(|l| l.strip_prefix(inactive_key)?.strip_prefix(' ')?.trim().parse::<u64>().ok())
        })
        .unwrap_or(0);
    Some(CgroupMemory { limit, working_set: usage.saturating_sub(inactive) })
}

/// The folder of this process's memory cgroup, the mount point above which no limit applies to
/// it, and whether it is cgroup v1. The memory controller's v1 hierarchy wins over v2 (hybrid
/// systems mount both and give memory to v1).
fn cgroup_dir(cgroups: &str, mountinfo: &str) -> Option<(PathBuf, PathBuf, bool)> {
    let v1 = cgroups.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        controllers.split(',').any(|c| c == "memory").then_some(path)
    });
    let v2 = cgroups.lines().find_map(|l| l.strip_prefix("0::"));
    let (path, v1) = match (v1, v2) {
        (Some(path), _) => (path, true),
        (None, Some(path)) => (path, false),
        (None, None) => return None,
    };
    let (root, mount_point) = mountinfo.lines().find_map(|l| {
        // "36 25 0:32 /root /mount/point opts - fstype source superopts"
        let (fields, fs) = l.split_once(" - ")?;
        let fields: Vec<&str> = fields.split(' ').collect();
        let fs: Vec<&str> = fs.split(' ').collect();
        let wanted = if v1 {
            fs.first() == Some(&"cgroup") && fs.get(2).is_some_and(|o| o.split(',').any(|o| o == "memory"))
        } else {
            fs.first() == Some(&"cgroup2")
        };
        wanted.then(|| Some((*fields.get(3)?, *fields.get(4)?)))?
    })?;
    // The process's path is relative to the hierarchy's root; the mount shows the part under `root`.
    let relative = Path::new(path).strip_prefix(root).ok()?;
    let top = PathBuf::from(mount_point);
    Some((top.join(relative), top, v1))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// A file of 100 bytes of header and the u32 values 0..1000 after it.
    fn files(entries: &[(&str, &str)]) -> impl Fn(&Path) -> Option<String> + use<> {
        let map: HashMap<PathBuf, String> = entries.iter().map(|(p, c)| (PathBuf::from(p), c.to_string())).collect();
        move |p: &Path| map.get(p).cloned()
    }

    /// cgroup v2: the tightest limit up the tree, usage without inactive page cache.
    #[test]
    fn cgroup_v2_limit() {
        let read = files(&[
            ("/proc/self/cgroup", "0::/kubepods/pod1/c1\n"),
            ("/proc/self/mountinfo", "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw\n"),
            ("/sys/fs/cgroup/kubepods/pod1/c1/memory.max", "max\n"),
            ("/sys/fs/cgroup/kubepods/pod1/memory.max", "1073741824\n"),
            ("/sys/fs/cgroup/kubepods/pod1/memory.current", "500000000\n"),
            ("/sys/fs/cgroup/kubepods/pod1/memory.stat", "anon 1\ninactive_file 100000000\nactive_file 5\n"),
            ("/sys/fs/cgroup/kubepods/memory.max", "4294967296\n"),
        ]);
        assert_eq!(cgroup_memory(&read), Some(CgroupMemory { limit: 1 << 30, working_set: 400_000_000 }));
    }

    /// A container sees its own cgroup as the root of the hierarchy.
    #[test]
    fn cgroup_v2_in_a_container() {
        let read = files(&[
            ("/proc/self/cgroup", "0::/\n"),
            ("/proc/self/mountinfo", "30 23 0:26 / /sys/fs/cgroup ro - cgroup2 cgroup2 rw\n"),
            ("/sys/fs/cgroup/memory.max", "2147483648\n"),
            ("/sys/fs/cgroup/memory.current", "1000\n"),
        ]);
        assert_eq!(cgroup_memory(&read), Some(CgroupMemory { limit: 2 << 30, working_set: 1000 }));
    }

    /// cgroup v1 (hybrid systems): the memory controller's mount, its root prefix removed; a huge
    /// number means no limit.
    #[test]
    fn cgroup_v1_limit_and_no_limit() {
        let mountinfo = "35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n\
                         41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n";
        let limited = files(&[
            ("/proc/self/cgroup", "4:memory:/api/job7\n0::/\n"),
            ("/proc/self/mountinfo", mountinfo),
            ("/sys/fs/cgroup/memory/api/job7/memory.limit_in_bytes", "536870912\n"),
            ("/sys/fs/cgroup/memory/api/job7/memory.usage_in_bytes", "300\n"),
            ("/sys/fs/cgroup/memory/api/job7/memory.stat", "cache 9\ntotal_inactive_file 100\n"),
            ("/sys/fs/cgroup/memory/api/memory.limit_in_bytes", "9223372036854771712\n"),
            ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "9223372036854771712\n"),
        ]);
        assert_eq!(cgroup_memory(&limited), Some(CgroupMemory { limit: 512 << 20, working_set: 200 }));
        let unlimited = files(&[
            ("/proc/self/cgroup", "4:memory:/api/job7\n0::/\n"),
            ("/proc/self/mountinfo", mountinfo),
            ("/sys/fs/cgroup/memory/api/job7/memory.limit_in_bytes", "9223372036854771712\n"),
            ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "9223372036854771712\n"),
        ]);
        assert_eq!(cgroup_memory(&unlimited), None);
        assert_eq!(cgroup_memory(&files(&[])), None);
    }

    fn rss() -> u64 {
        let status = read_file(Path::new("/proc/self/status")).expect("/proc/self/status");
        let kib = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).expect("VmRSS");
        kib.trim().trim_end_matches("kB").trim().parse::<u64>().expect("a number of kB") * 1024
    }

    /// Freed tensor-sized buffers go back to the OS, even after a large block was freed first
    /// (which makes glibc's default threshold rise and put later blocks on the heap).
    #[test]
    fn freed_buffers_return_to_the_os() {
        configure_allocator();
        drop(std::hint::black_box(vec![1u8; 24 << 20]));
        let before = rss();
        let buffers: Vec<Vec<u8>> = (0..96).map(|i| vec![i as u8 | 1; (1 << 20) + i * 4096]).collect();
        let loaded = rss();
        assert!(loaded > before + (90 << 20), "the buffers are resident: {before} -> {loaded}");
        drop(std::hint::black_box(buffers));
        release_free_memory();
        let after = rss();
        assert!(after < before + (8 << 20), "RSS came back: {before} before, {loaded} loaded, {after} after");
    }

    /// This machine's figures are sane: positive, and never more than the machine has.
    #[test]
    fn this_machine() {
        let (capacity, available, total) = (capacity(), available(), MemInfo::read().total);
        assert!(capacity > 0 && available > 0, "capacity {capacity}, available {available}");
        assert!(capacity <= total && available <= total, "capacity {capacity}, available {available}, total {total}");
    }
}
