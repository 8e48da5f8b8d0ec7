//! The queue in front of the loads: at most `max` loads run past step 1 at once; later ones wait in
//! arrival order, know their place, and leave the queue when their future is dropped (cancel).

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, MutexGuard},
};

use resource_manager::sync;
use tokio::sync::watch;

/// Admits loads in arrival order, `max` at a time.
#[derive(Debug)]
pub struct LoadQueue {
    max: usize,
    inner: Mutex<Inner>,
    /// Notified on every change of `inner`, so waiters can look at their place again.
    changed: watch::Sender<()>,
}

#[derive(Debug, Default)]
struct Inner {
    running: usize,
    /// Tickets of the waiting loads, first in line at the front.
    waiting: VecDeque<u64>,
    next_ticket: u64,
}

/// A running load's place; gives it to the next in line when dropped.
#[derive(Debug)]
pub struct Slot {
    queue: Arc<LoadQueue>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.queue.update(|inner| inner.running -= 1);
    }
}

/// A waiting load's place in line; leaves the line when dropped before it was admitted.
struct Ticket<'a> {
    queue: &'a LoadQueue,
    id: u64,
    admitted: bool,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if !self.admitted {
            self.queue.update(|inner| inner.waiting.retain(|t| *t != self.id));
        }
    }
}

impl LoadQueue {
    /// `max` is at least 1.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self { max: max.max(1), inner: Mutex::new(Inner::default()), changed: watch::Sender::new(()) })
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        // Each update is a counter change or one queue operation: a poisoned lock is consistent.
        sync::lock(&self.inner)
    }

    fn update(&self, f: impl FnOnce(&mut Inner)) {
        f(&mut self.inner());
        self.changed.send_replace(());
    }

    /// Waits for a slot. `place(n)` is called with the number of loads ahead in the line whenever
    /// it changes, first when the load has to wait at all; an admitted load never hears of it.
    /// Like a progress bar it reports the latest place: when several loads ahead leave at once,
    /// the places in between are skipped.
    /// Dropping the future leaves the line.
    pub async fn admit(self: &Arc<Self>, mut place: impl FnMut(usize)) -> Slot {
        let mut changed = self.changed.subscribe();
        let mut ticket = {
            let mut inner = self.inner();
            if inner.waiting.is_empty() && inner.running < self.max {
                inner.running += 1;
                return Slot { queue: self.clone() };
            }
            let id = inner.next_ticket;
            inner.next_ticket += 1;
            inner.waiting.push_back(id);
            Ticket { queue: self, id, admitted: false }
        };
        self.changed.send_replace(());
        let mut told = None;
        loop {
            changed.borrow_and_update();
            let ahead = {
                let mut inner = self.inner();
                let ahead = inner.waiting.iter().position(|t| *t == ticket.id).unwrap_or(0);
                if ahead == 0 && inner.running < self.max {
                    inner.waiting.pop_front();
                    inner.running += 1;
                    ticket.admitted = true;
                    None
                } else {
                    Some(ahead)
                }
            };
            let Some(ahead) = ahead else {
                // The others move up a place.
                self.changed.send_replace(());
                return Slot { queue: self.clone() };
            };
            if told != Some(ahead) {
                told = Some(ahead);
                place(ahead);
            }
            // The sender lives in `self`, which outlives this borrow: `changed` cannot fail.
            let _ = changed.changed().await;
        }
    }

    /// (running, waiting) now.
    #[cfg(test)]
    pub fn len(&self) -> (usize, usize) {
        let inner = self.inner();
        (inner.running, inner.waiting.len())
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::Mutex as StdMutex, time::Duration};

    use super::*;

    const WAIT: Duration = Duration::from_secs(10);

    /// Spawns a waiter that records its places and sends its slot when admitted.
    fn waiter(
        queue: &Arc<LoadQueue>,
    ) -> (Arc<StdMutex<Vec<usize>>>, tokio::sync::oneshot::Receiver<Slot>, tokio::task::JoinHandle<()>) {
        let places = Arc::new(StdMutex::new(Vec::new()));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (queue, seen) = (queue.clone(), places.clone());
        let task = tokio::spawn(async move {
            let slot = queue.admit(|n| seen.lock().expect("places").push(n)).await;
            let _ = tx.send(slot);
        });
        (places, rx, task)
    }

    async fn until(queue: &LoadQueue, running: usize, waiting: usize) {
        let mut changed = queue.changed.subscribe();
        tokio::time::timeout(WAIT, async {
            while queue.len() != (running, waiting) {
                changed.changed().await.expect("the queue lives");
            }
        })
        .await
        .unwrap_or_else(|_| panic!("the queue never reached {running} running, {waiting} waiting: {:?}", queue.len()));
    }

    /// Loads beyond `max` wait in arrival order, hear their place as it changes, and are admitted
    /// one by one as slots free up.
    #[tokio::test]
    async fn waits_in_order_and_reports_places() {
        let queue = LoadQueue::new(2);
        let a = queue.admit(|_| panic!("a free slot is never queued")).await;
        let b = queue.admit(|_| panic!("a free slot is never queued")).await;
        let (c_places, c_slot, _c) = waiter(&queue);
        until(&queue, 2, 1).await;
        let (d_places, mut d_slot, _d) = waiter(&queue);
        until(&queue, 2, 2).await;
        assert_eq!(*c_places.lock().expect("places"), vec![0]);

        drop(a);
        let c = tokio::time::timeout(WAIT, c_slot).await.expect("c is admitted").expect("c's slot");
        until(&queue, 2, 1).await;
        assert!(d_slot.try_recv().is_err(), "d waits: both slots are taken");
        tokio::time::timeout(WAIT, async {
            while *d_places.lock().expect("places") != vec![1, 0] {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("d heard 1 ahead, then 0 ahead: {:?}", d_places.lock().expect("places")));

        drop(b);
        let d = tokio::time::timeout(WAIT, d_slot).await.expect("d is admitted").expect("d's slot");
        drop((c, d));
        until(&queue, 0, 0).await;
    }

    /// A waiting load that gives up leaves the line: those behind it move up, and nothing leaks.
    #[tokio::test]
    async fn a_cancelled_waiter_leaves_the_line() {
        let queue = LoadQueue::new(1);
        let a = queue.admit(|_| {}).await;
        let (_, _b_slot, b) = waiter(&queue);
        until(&queue, 1, 1).await;
        let (c_places, c_slot, _c) = waiter(&queue);
        until(&queue, 1, 2).await;
        b.abort();
        until(&queue, 1, 1).await;
        tokio::time::timeout(WAIT, async {
            while *c_places.lock().expect("places") != vec![1, 0] {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("c moved up: {:?}", c_places.lock().expect("places")));
        drop(a);
        let c = tokio::time::timeout(WAIT, c_slot).await.expect("c is admitted").expect("c's slot");
        drop(c);
        until(&queue, 0, 0).await;
    }
}
