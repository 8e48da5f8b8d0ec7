//! Leases: the processes attached to a resident pipeline. While a pipeline has clients it is
//! never evicted, and it is unloaded only by force, which revokes their leases (their
//! connections close). A lease is taken and a pipeline closed under the same lock of the store's
//! entry, so no client attaches to a pipeline on its way out.

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use tokio_util::sync::CancellationToken;

use crate::Pipeline;

/// The clients of one stored pipeline.
#[derive(Debug, Default)]
pub(crate) struct Clients {
    count: AtomicUsize,
    /// Cancelled by a forced unload: every lease's holder lets go.
    revoked: CancellationToken,
}

impl Clients {
    pub(crate) fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    pub(crate) fn revoke(&self) {
        self.revoked.cancel();
    }

    /// A new lease on `pipeline`; the caller holds the store entry's lock.
    pub(crate) fn lease(self: &Arc<Self>, pipeline: Arc<Pipeline>) -> Lease {
        self.count.fetch_add(1, Ordering::SeqCst);
        Lease { pipeline, clients: self.clone() }
    }
}

/// One client's hold on a resident pipeline, until dropped.
#[derive(Debug)]
pub struct Lease {
    pipeline: Arc<Pipeline>,
    clients: Arc<Clients>,
}

impl Lease {
    pub fn pipeline(&self) -> &Arc<Pipeline> {
        &self.pipeline
    }

    /// Fires when a forced unload revokes the lease: its holder should let go at once.
    pub fn revoked(&self) -> CancellationToken {
        self.clients.revoked.clone()
    }

    /// The pipeline's clients now, this one included.
    pub fn clients(&self) -> usize {
        self.clients.count()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.clients.count.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A pipeline with clients that an unload without force may not take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{clients} clients are attached")]
pub struct Attached {
    pub clients: usize,
}
