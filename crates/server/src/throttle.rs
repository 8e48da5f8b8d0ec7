//! A warning that a flood of clients or failures could repeat many times a second (a connection
//! cap hit, `accept` out of descriptors) is logged at most once per interval.

use std::{
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

/// When its line was last logged.
#[derive(Debug, Default)]
pub(crate) struct LogThrottle {
    last: Mutex<Option<Instant>>,
}

impl LogThrottle {
    /// Whether to log now: not within `every` of the last time this said yes.
    pub(crate) fn allow(&self, every: Duration) -> bool {
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        if last.is_some_and(|at| at.elapsed() < every) {
            return false;
        }
        *last = Some(Instant::now());
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first line is logged, a repeat within the interval is not, one after it is.
    #[test]
    fn logs_once_per_interval() {
        let throttle = LogThrottle::default();
        assert!(throttle.allow(Duration::from_secs(60)));
        assert!(!throttle.allow(Duration::from_secs(60)));
        assert!(throttle.allow(Duration::ZERO));
    }
}
