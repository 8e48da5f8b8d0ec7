//! Staging buffers between the page cache and a device: a pool of host buffers allocated once at
//! start-up (pinned memory for a GPU, so copies from them are asynchronous DMA), lent to a load's
//! reader threads one at a time, and the device side of a copy behind [`CopyEngine`], so the
//! loader's scheduling is the same code, and is tested, without a GPU.
//!
//! A buffer comes back to the pool with the fence of the copy that reads it, unless the lender
//! saw that copy complete first ([`Lease::copied`]); the next borrower waits for a fence it
//! finds before writing into the buffer ([`Lease::fill`]). That is the one rule that makes reuse
//! safe, and it lives here rather than in each device.

use std::{
    collections::VecDeque,
    sync::{Condvar, Mutex, MutexGuard},
    time::Duration,
};

use candle_core::{DType, Tensor};

use crate::sync;

/// The size of each staging buffer. Small enough that a whole pool of them (24 by default) stays
/// in the CPU's last-level cache, where the kernel's copy from the page cache writes and the GPU's
/// DMA reads without either going to DRAM; large enough that a copy from pinned memory runs near
/// the link's speed. Sizes from 2 to 16 MiB were measured against each other
/// (docs/benchmarks/design-choices.md).
pub const BUFFER_BYTES: usize = 4 * 1024 * 1024;

/// The smallest chunk a reader fills at a time (unless the buffers are smaller).
pub const MIN_CHUNK_BYTES: usize = 1024 * 1024;

/// The bytes a reader thread fills and copies at a time for a load of `total` bytes on `threads`
/// threads: whole buffers when the load is large, smaller pieces when it has too few buffers'
/// worth for every thread to get several (a 100 MB checkpoint in 4 MiB pieces keeps only 24 reads
/// in flight on 16 threads, and the last ones alone), never below [`MIN_CHUNK_BYTES`].
pub fn chunk_bytes(total: u64, threads: usize, buffer_bytes: usize) -> usize {
    let per_read = usize::try_from(total / (threads.max(1) as u64 * 4)).unwrap_or(usize::MAX);
    let chunk = per_read.clamp(MIN_CHUNK_BYTES.min(buffer_bytes), buffer_bytes);
    // Page multiples read a little faster; buffers smaller than a page (tests) stay as they are.
    if chunk >= 4096 { chunk & !4095 } else { chunk }
}

/// Why a device refused an allocation, a copy or a wait.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A view of one tensor could not be made.
    #[error("tensor {tensor}: {source}")]
    Tensor {
        tensor: String,
        #[source]
        source: candle_core::Error,
    },
    #[cfg(feature = "cuda")]
    #[error(transparent)]
    Driver(#[from] candle_core::cuda::cudarc::driver::DriverError),
    #[cfg(feature = "cuda")]
    #[error("pinning {bytes} bytes of host memory: {source}")]
    Pinning {
        bytes: usize,
        #[source]
        source: candle_core::cuda::cudarc::driver::DriverError,
    },
    /// A request the device cannot serve as asked (a copy past the end of its allocation).
    #[error("{0}")]
    Refused(String),
}

/// The device side of staged copies.
pub trait CopyEngine: Send + Sync {
    /// A staging buffer's memory on the host.
    type Buffer: AsMut<[u8]> + AsRef<[u8]> + Send;
    /// The completion of one queued copy.
    type Fence: Send;
    /// Memory on the device, written by copies at byte offsets.
    type Allocation: Send + Sync;

    /// Room for `elems` elements of `dtype`, uninitialised.
    fn allocate(&self, dtype: DType, elems: usize) -> Result<Self::Allocation, DeviceError>;
    /// Queues a copy of the first `len` bytes of `from` to byte `offset` of `to` and returns at
    /// once: `from` is read until the fence completes.
    fn copy(
        &self,
        from: &Self::Buffer,
        len: usize,
        to: &Self::Allocation,
        offset: usize,
    ) -> Result<Self::Fence, DeviceError>;
    /// Queues a copy of `len` bytes at byte `offset` of `from`, an allocation of `source` (another
    /// device's engine), to the same offset of `to`, one of this engine's, and returns at once:
    /// device to device, never through the host (replicas fan out this way). `from`'s bytes there
    /// must be complete when it is queued. Engines without peer copies refuse.
    fn copy_from_peer(
        &self,
        source: &Self,
        from: &Self::Allocation,
        to: &Self::Allocation,
        offset: usize,
        len: usize,
    ) -> Result<Self::Fence, DeviceError>
    where
        Self: Sized,
    {
        let _ = (source, from, to, offset, len);
        Err(DeviceError::Refused("this device makes no peer copies".into()))
    }
    /// Blocks until the copy behind `fence` completed.
    fn wait(&self, fence: Self::Fence) -> Result<(), DeviceError>;
    /// Whether the copy behind `fence` completed, without blocking.
    fn is_done(&self, fence: &Self::Fence) -> Result<bool, DeviceError>;
    /// Blocks until every queued copy completed.
    fn synchronize(&self) -> Result<(), DeviceError>;
    /// Lets this thread free the engine's memory (a GPU's frees need its context current).
    fn prepare_free(&self) {}
    /// The allocation as a one-dimensional tensor of `elems` elements of `dtype`, sharing its
    /// memory (views of it are made while copies into it are in flight: its bytes are read only
    /// after [`CopyEngine::synchronize`]).
    fn tensor_of(&self, allocation: &Self::Allocation, dtype: DType, elems: usize) -> Result<Tensor, DeviceError>;
}

impl<B, F> std::fmt::Debug for StagingPool<B, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StagingPool").field("buffer_bytes", &self.buffer_bytes).field("count", &self.count).finish()
    }
}

/// A buffer and the copy that last read it.
struct Slot<B, F> {
    buffer: B,
    last_copy: Option<F>,
}

/// Staging buffers of one size, lent first in, first out: the buffer waited for is the one whose
/// copy was queued longest ago, so it has most likely completed.
pub struct StagingPool<B, F> {
    free: Mutex<VecDeque<Slot<B, F>>>,
    returned: Condvar,
    buffer_bytes: usize,
    count: usize,
}

impl<B: AsMut<[u8]> + AsRef<[u8]>, F> StagingPool<B, F> {
    /// A pool of these buffers, each `buffer_bytes` long (at least).
    pub fn new(buffers: Vec<B>, buffer_bytes: usize) -> Self {
        debug_assert!(buffers.iter().all(|b| b.as_ref().len() >= buffer_bytes));
        let count = buffers.len();
        let free = buffers.into_iter().map(|buffer| Slot { buffer, last_copy: None }).collect();
        Self { free: Mutex::new(free), returned: Condvar::new(), buffer_bytes, count }
    }

    /// The size of each buffer: the most one copy moves.
    pub fn buffer_bytes(&self) -> usize {
        self.buffer_bytes
    }

    /// How many buffers the pool has.
    pub fn count(&self) -> usize {
        self.count
    }

    /// How many buffers are in the pool now (not lent).
    pub fn idle(&self) -> usize {
        self.slots().len()
    }

    fn slots(&self) -> MutexGuard<'_, VecDeque<Slot<B, F>>> {
        // Each change is one push or pop: a panic elsewhere cannot leave the queue half-changed.
        sync::lock(&self.free)
    }

    /// Borrows the buffer returned longest ago, waiting for one if all are lent; `None` once
    /// `stop()` says so (checked about every millisecond while waiting).
    pub fn take(&self, stop: impl Fn() -> bool) -> Option<Lease<'_, B, F>> {
        let mut free = self.slots();
        loop {
            if stop() {
                return None;
            }
            if let Some(slot) = free.pop_front() {
                return Some(Lease { pool: self, slot: Some(slot) });
            }
            free = sync::wait_timeout(&self.returned, free, Duration::from_millis(1));
        }
    }
}

/// One borrowed buffer; it goes back to the pool when dropped, with its last copy's fence.
pub struct Lease<'p, B: AsMut<[u8]> + AsRef<[u8]>, F> {
    pool: &'p StagingPool<B, F>,
    slot: Option<Slot<B, F>>,
}

impl<B: AsMut<[u8]> + AsRef<[u8]>, F> Lease<'_, B, F> {
    fn slot(&mut self) -> &mut Slot<B, F> {
        self.slot.as_mut().expect("a lease holds its slot until dropped")
    }

    /// The buffer's bytes to write into, once the copy that last read them has completed.
    pub fn fill<E: CopyEngine<Buffer = B, Fence = F>>(&mut self, engine: &E) -> Result<&mut [u8], DeviceError> {
        let slot = self.slot();
        if let Some(fence) = slot.last_copy.take() {
            engine.wait(fence)?;
        }
        let bytes = self.pool.buffer_bytes;
        Ok(&mut self.slot().buffer.as_mut()[..bytes])
    }

    /// Whether the copy that reads this buffer completed (true if none was queued), without
    /// blocking. Once it has, the buffer goes back to the pool ready to be written, and whoever
    /// takes it next needs no call to the device.
    pub fn copied<E: CopyEngine<Buffer = B, Fence = F>>(&mut self, engine: &E) -> Result<bool, DeviceError> {
        let slot = self.slot();
        let Some(fence) = &slot.last_copy else { return Ok(true) };
        let done = engine.is_done(fence)?;
        if done {
            slot.last_copy = None;
        }
        Ok(done)
    }

    /// Queues a copy of the buffer's first `len` bytes to byte `offset` of `to`.
    pub fn copy_to<E: CopyEngine<Buffer = B, Fence = F>>(
        &mut self,
        engine: &E,
        len: usize,
        to: &E::Allocation,
        offset: usize,
    ) -> Result<(), DeviceError> {
        let slot = self.slot();
        debug_assert!(slot.last_copy.is_none(), "fill waits for the last copy before a buffer is written again");
        slot.last_copy = Some(engine.copy(&slot.buffer, len, to, offset)?);
        Ok(())
    }
}

impl<B: AsMut<[u8]> + AsRef<[u8]>, F> Drop for Lease<'_, B, F> {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            self.pool.slots().push_back(slot);
            self.pool.returned.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Buffers named by their first byte, fences that complete at once.
    struct Tagged;

    impl CopyEngine for Tagged {
        type Buffer = Vec<u8>;
        type Fence = u8;
        type Allocation = ();
        fn allocate(&self, _: DType, _: usize) -> Result<(), DeviceError> {
            Ok(())
        }
        fn copy(&self, from: &Vec<u8>, _: usize, _: &(), _: usize) -> Result<u8, DeviceError> {
            Ok(from[0])
        }
        fn wait(&self, _: u8) -> Result<(), DeviceError> {
            Ok(())
        }
        fn is_done(&self, _: &u8) -> Result<bool, DeviceError> {
            Ok(true)
        }
        fn synchronize(&self) -> Result<(), DeviceError> {
            Ok(())
        }
        fn tensor_of(&self, _: &(), _: DType, _: usize) -> Result<Tensor, DeviceError> {
            Err(DeviceError::Refused("no tensors".into()))
        }
    }

    fn pool(n: u8) -> StagingPool<Vec<u8>, u8> {
        StagingPool::new((0..n).map(|i| vec![i; 4]).collect(), 4)
    }

    #[test]
    fn buffers_are_lent_first_in_first_out_and_come_back_on_drop() {
        let pool = pool(3);
        let first = |l: &mut Lease<'_, Vec<u8>, u8>| l.fill(&Tagged).expect("fill")[0];
        let mut a = pool.take(|| false).expect("a buffer");
        let mut b = pool.take(|| false).expect("a buffer");
        assert_eq!((first(&mut a), first(&mut b)), (0, 1));
        assert_eq!(pool.idle(), 1);
        drop(b);
        drop(a);
        // 2 was never lent; then 1 and 0 in the order they came back.
        let mut leases: Vec<_> = (0..3).map(|_| pool.take(|| false).expect("a buffer")).collect();
        assert_eq!(leases.iter_mut().map(first).collect::<Vec<u8>>(), vec![2, 1, 0]);
    }

    /// A copy into an allocation completes once the test sets that allocation's flag (its fence
    /// is the flag); waits are counted.
    #[derive(Default)]
    struct Manual {
        waits: std::sync::atomic::AtomicUsize,
    }

    impl CopyEngine for Manual {
        type Buffer = Vec<u8>;
        type Fence = std::sync::Arc<std::sync::atomic::AtomicBool>;
        type Allocation = Self::Fence;
        fn allocate(&self, _: DType, _: usize) -> Result<Self::Fence, DeviceError> {
            Ok(Default::default())
        }
        fn copy(&self, _: &Vec<u8>, _: usize, completes: &Self::Fence, _: usize) -> Result<Self::Fence, DeviceError> {
            Ok(completes.clone())
        }
        fn wait(&self, _: Self::Fence) -> Result<(), DeviceError> {
            self.waits.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        }
        fn is_done(&self, fence: &Self::Fence) -> Result<bool, DeviceError> {
            Ok(fence.load(std::sync::atomic::Ordering::SeqCst))
        }
        fn synchronize(&self) -> Result<(), DeviceError> {
            Ok(())
        }
        fn tensor_of(&self, _: &Self::Fence, _: DType, _: usize) -> Result<Tensor, DeviceError> {
            Err(DeviceError::Refused("no tensors".into()))
        }
    }

    #[test]
    fn a_buffer_seen_copied_comes_back_without_a_fence_and_one_not_yet_copied_with_it() {
        let engine = Manual::default();
        let pool = StagingPool::new(vec![vec![0u8; 4]], 4);
        let completes = engine.allocate(DType::U8, 4).expect("an allocation");
        let mut lease = pool.take(|| false).expect("the buffer");
        assert!(lease.copied(&engine).expect("no copy yet"), "a buffer never copied counts as copied");
        lease.copy_to(&engine, 4, &completes, 0).expect("a copy");
        assert!(!lease.copied(&engine).expect("a query"), "still in flight");
        completes.store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(lease.copied(&engine).expect("a query"));
        drop(lease);
        pool.take(|| false).expect("the buffer").fill(&engine).expect("fill");
        assert_eq!(engine.waits.load(std::sync::atomic::Ordering::SeqCst), 0, "its next borrower did not wait");

        // Given back while its copy is in flight: the next borrower waits for that copy.
        let mut lease = pool.take(|| false).expect("the buffer");
        lease.copy_to(&engine, 4, &Default::default(), 0).expect("a copy");
        assert!(!lease.copied(&engine).expect("a query"));
        drop(lease);
        pool.take(|| false).expect("the buffer").fill(&engine).expect("fill");
        assert_eq!(engine.waits.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[test]
    fn chunks_are_whole_buffers_for_large_loads_and_smaller_for_small_ones() {
        let mib = 1 << 20;
        assert_eq!(chunk_bytes(8 << 30, 16, BUFFER_BYTES), BUFFER_BYTES);
        // 100 MB on 16 threads: 64 chunks of about 1.5 MiB, page-aligned.
        let small = chunk_bytes(100_000_000, 16, BUFFER_BYTES);
        assert_eq!(small, (100_000_000 / 64) & !4095);
        assert_eq!(chunk_bytes(1000, 16, BUFFER_BYTES), mib, "never below the minimum");
        assert_eq!(chunk_bytes(1000, 16, 512), 512, "nor above the buffer");
    }

    /// A `stop` for [`StagingPool::take`] that says `stop` and reports, once, that `take` has
    /// looked for a buffer, found none and waited (it asks `stop` a second time only then).
    fn waiting_signal(
        stop: &std::sync::atomic::AtomicBool,
    ) -> (impl Fn() -> bool + Send + Sync + '_, std::sync::mpsc::Receiver<()>) {
        let (waiting, waited) = std::sync::mpsc::channel();
        let asked = std::sync::atomic::AtomicUsize::new(0);
        let check = move || {
            if asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 1 {
                let _ = waiting.send(());
            }
            stop.load(std::sync::atomic::Ordering::SeqCst)
        };
        (check, waited)
    }

    #[test]
    fn a_borrower_waits_for_a_buffer_and_stops_when_told() {
        let bound = Duration::from_secs(60);
        let pool = pool(1);
        let held = pool.take(|| false).expect("the only buffer");
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            let (check, waited) = waiting_signal(&stop);
            let waiter = s.spawn(|| pool.take(check).is_some());
            waited.recv_timeout(bound).expect("the borrower waits for a buffer");
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
            assert!(!waiter.join().expect("waiter"), "stopped while every buffer was lent");
        });
        drop(held);
        assert_eq!(pool.idle(), 1);
        let never = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            let held = pool.take(|| false).expect("the only buffer");
            let (check, waited) = waiting_signal(&never);
            let waiter = s.spawn(|| pool.take(check).is_some());
            waited.recv_timeout(bound).expect("the borrower waits for a buffer");
            drop(held);
            assert!(waiter.join().expect("waiter"), "got the buffer once it came back");
        });
    }
}
