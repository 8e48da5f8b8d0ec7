//! `std::sync` locks with poisoning ignored. Every lock of the load path guards state that each
//! holder changes in one step (a push, a pop, a swap), so a holder that panicked cannot have left
//! it half-changed, and the next holder may go on. (parking_lot's locks have no poisoning, but on
//! the GPU path they loaded about 10% slower with every core busy: docs/benchmarks/design-choices.md.)

use std::{
    sync::{Condvar, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

/// Locks `mutex`, whether or not a holder panicked.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The value of `mutex`, whether or not a holder panicked.
pub fn into_inner<T>(mutex: Mutex<T>) -> T {
    mutex.into_inner().unwrap_or_else(PoisonError::into_inner)
}

/// Waits on `condvar` for at most `timeout` and locks again.
pub fn wait_timeout<'a, T>(condvar: &Condvar, guard: MutexGuard<'a, T>, timeout: Duration) -> MutexGuard<'a, T> {
    condvar.wait_timeout(guard, timeout).unwrap_or_else(PoisonError::into_inner).0
}
