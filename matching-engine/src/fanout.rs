//! Fan-out of event batches to several consumers (market data, persistence, notifications), each
//! with its own bounded queue.
//!
//! The engine thread calls [`FanOut::publish`] once per group commit with a [`Batch`]: the events
//! of the commands accepted in it, in one shared allocation (`Arc<[E]>`), and the range of
//! sequence numbers they came from. Each consumer gets a clone of the `Arc`, never a copy of the
//! events.
//!
//! # A consumer that falls behind
//!
//! Publishing never blocks and never waits for a consumer. When a consumer's queue is full, that
//! consumer is **lagged**: it is dropped from the fan-out at once, keeps the batches already in
//! its queue (contiguous, ending just before the one it missed), and after them its
//! [`Subscriber::recv`] answers [`RecvError::Lagged`] with the first sequence number it missed.
//! It must then resync from a snapshot (and the journal) and subscribe again. Other consumers and
//! the engine are not slowed down.
//!
//! Architecture invariant: the engine thread never blocks on a consumer, and no consumer sees a
//! gap: it sees every batch from its subscription on, in order, then `Lagged` or `Closed`.

use crate::sequencer::wait::Waiter;
use crossbeam::queue::ArrayQueue;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The events of one group commit, shared by every consumer.
#[derive(Debug, PartialEq, Eq)]
pub struct Batch<E> {
    /// Sequence number of the first accepted command in the batch.
    pub first_seq: u64,
    /// Sequence number of the last accepted command in the batch (`>= first_seq`).
    pub last_seq: u64,
    /// The events of the batch's accepted commands, in order.
    pub events: Arc<[E]>,
}

impl<E> Clone for Batch<E> {
    fn clone(&self) -> Self {
        Self {
            first_seq: self.first_seq,
            last_seq: self.last_seq,
            events: Arc::clone(&self.events),
        }
    }
}

/// Why a [`Subscriber`] receives no more batches.
#[derive(Clone, Copy, PartialEq, Eq, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RecvError {
    /// The consumer fell behind and was dropped; it missed every batch from this sequence number
    /// on and must resync from a snapshot.
    #[error("consumer lagged: missed batches from sequence number {missed_from_seq}")]
    Lagged {
        /// The first sequence number of the first batch it did not get.
        missed_from_seq: u64,
    },
    /// The publisher stopped (engine shutdown); every batch published was received.
    #[error("publisher closed")]
    Closed,
}

/// Why a subscription failed.
#[derive(Clone, Copy, PartialEq, Eq, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SubscribeError {
    /// Too many subscriptions wait to be taken up by the publisher; try again later.
    #[error("too many pending subscriptions")]
    Busy,
    /// The capacity is zero.
    #[error("a subscriber's capacity must be at least one batch")]
    ZeroCapacity,
}

#[derive(Debug)]
struct Slot<E> {
    queue: ArrayQueue<Batch<E>>,
    waiter: Waiter,
    /// Zero while healthy; else the first missed sequence number.
    lagged_from: AtomicU64,
    closed: AtomicBool,
}

impl<E> Slot<E> {
    fn close(&self) {
        self.closed.store(true, SeqCst);
        self.waiter.wake();
    }
}

#[derive(Debug)]
struct Joining<E> {
    queue: ArrayQueue<Arc<Slot<E>>>,
    closed: AtomicBool,
}

/// The publishing side, owned by the engine thread.
#[derive(Debug)]
pub struct FanOut<E> {
    slots: Vec<Arc<Slot<E>>>,
    joining: Arc<Joining<E>>,
    lagged: u64,
}

/// Lets any thread subscribe to a [`FanOut`]. Cheap to clone.
#[derive(Debug)]
pub struct Subscriptions<E> {
    joining: Arc<Joining<E>>,
}

impl<E> Clone for Subscriptions<E> {
    fn clone(&self) -> Self {
        Self {
            joining: Arc::clone(&self.joining),
        }
    }
}

/// One consumer's end: a bounded queue of batches. Dropping it unsubscribes.
#[derive(Debug)]
pub struct Subscriber<E> {
    slot: Arc<Slot<E>>,
}

impl<E> FanOut<E> {
    /// A fan-out with no consumer; at most `max_pending_subscriptions` subscriptions may wait to
    /// be taken up between two publications.
    pub fn new(max_pending_subscriptions: usize) -> Self {
        Self {
            slots: Vec::new(),
            joining: Arc::new(Joining {
                queue: ArrayQueue::new(max_pending_subscriptions.max(1)),
                closed: AtomicBool::new(false),
            }),
            lagged: 0,
        }
    }

    /// A handle to subscribe with, from any thread.
    pub fn subscriptions(&self) -> Subscriptions<E> {
        Subscriptions {
            joining: Arc::clone(&self.joining),
        }
    }

    /// Consumers currently served (after the last publication).
    pub fn consumers(&self) -> usize {
        self.slots.len()
    }

    /// Consumers marked lagged so far.
    pub fn lagged(&self) -> u64 {
        self.lagged
    }

    /// Hands `batch` to every consumer without blocking; a consumer whose queue is full is marked
    /// lagged and dropped. New subscribers are taken up first; dropped subscribers are removed.
    pub fn publish(&mut self, batch: &Batch<E>) {
        assert!(
            batch.first_seq <= batch.last_seq,
            "a batch has a sequence range"
        );
        while let Some(slot) = self.joining.queue.pop() {
            self.slots.push(slot);
        }
        let mut lagged = 0;
        self.slots.retain(|slot| {
            if Arc::strong_count(slot) == 1 {
                return false; // The subscriber is gone.
            }
            match slot.queue.push(batch.clone()) {
                Ok(()) => {
                    slot.waiter.wake();
                    true
                }
                Err(_) => {
                    slot.lagged_from.store(batch.first_seq, SeqCst);
                    slot.waiter.wake();
                    lagged += 1;
                    false
                }
            }
        });
        if lagged > 0 {
            tracing::warn!(
                lagged,
                missed_from_seq = batch.first_seq,
                "fan-out consumers fell behind"
            );
            self.lagged += lagged;
        }
    }

    /// Closes every consumer: each receives what is queued, then [`RecvError::Closed`].
    pub fn close(&mut self) {
        self.joining.closed.store(true, SeqCst);
        while let Some(slot) = self.joining.queue.pop() {
            slot.close();
        }
        for slot in self.slots.drain(..) {
            slot.close();
        }
    }
}

impl<E> Drop for FanOut<E> {
    fn drop(&mut self) {
        self.close();
    }
}

impl<E> Subscriptions<E> {
    /// Subscribes a consumer with room for `capacity` batches. It receives every batch published
    /// from the next publication on.
    pub fn subscribe(&self, capacity: usize) -> Result<Subscriber<E>, SubscribeError> {
        if capacity == 0 {
            return Err(SubscribeError::ZeroCapacity);
        }
        let slot = Arc::new(Slot {
            queue: ArrayQueue::new(capacity),
            waiter: Waiter::default(),
            lagged_from: AtomicU64::new(0),
            closed: AtomicBool::new(false),
        });
        if self.joining.queue.push(Arc::clone(&slot)).is_err() {
            return Err(SubscribeError::Busy);
        }
        // Either the publisher's close drains the joining queue after our push, or we see it
        // closed here: a subscriber is never left waiting on a publisher that is gone.
        if self.joining.closed.load(SeqCst) {
            slot.close();
        }
        Ok(Subscriber { slot })
    }
}

impl<E> Subscriber<E> {
    /// The next batch if one is queued, `Ok(None)` if none is yet.
    pub fn try_recv(&mut self) -> Result<Option<Batch<E>>, RecvError> {
        if let Some(batch) = self.slot.queue.pop() {
            return Ok(Some(batch));
        }
        let missed_from_seq = self.slot.lagged_from.load(SeqCst);
        let end = if missed_from_seq != 0 {
            RecvError::Lagged { missed_from_seq }
        } else if self.slot.closed.load(SeqCst) {
            RecvError::Closed
        } else {
            return Ok(None);
        };
        // The flag is set after the last push: look once more before reporting the end.
        match self.slot.queue.pop() {
            Some(batch) => Ok(Some(batch)),
            None => Err(end),
        }
    }

    /// The next batch, blocking until one is published or the subscription ends.
    pub fn recv(&mut self) -> Result<Batch<E>, RecvError> {
        let slot = Arc::clone(&self.slot);
        slot.waiter.wait(|| self.try_recv().transpose())
    }

    /// Like [`recv`](Self::recv) but gives up after `timeout` with `Ok(None)`.
    pub fn recv_timeout(&mut self, timeout: Duration) -> Result<Option<Batch<E>>, RecvError> {
        let slot = Arc::clone(&self.slot);
        let deadline = Instant::now() + timeout;
        slot.waiter
            .wait_until(Some(deadline), &mut || self.try_recv().transpose())
            .transpose()
    }

    /// Batches waiting in this consumer's queue.
    pub fn queued(&self) -> usize {
        self.slot.queue.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(seq: u64) -> Batch<u64> {
        Batch {
            first_seq: seq,
            last_seq: seq,
            events: Arc::from(vec![seq, seq * 10]),
        }
    }

    #[test]
    fn a_full_consumer_is_lagged_and_others_get_everything() {
        let mut fanout = FanOut::new(4);
        let subs = fanout.subscriptions();
        let mut fast = subs.subscribe(2).unwrap();
        let mut slow = subs.subscribe(2).unwrap();
        for seq in 1..=10 {
            fanout.publish(&batch(seq));
            assert_eq!(fast.try_recv().unwrap().unwrap().first_seq, seq);
        }
        assert_eq!(fanout.consumers(), 1);
        assert_eq!(fanout.lagged(), 1);
        assert_eq!(slow.try_recv().unwrap().unwrap().first_seq, 1);
        assert_eq!(slow.recv().unwrap().first_seq, 2);
        assert_eq!(slow.recv(), Err(RecvError::Lagged { missed_from_seq: 3 }));
        drop(fanout);
        assert_eq!(fast.recv(), Err(RecvError::Closed));
    }

    #[test]
    fn late_and_dropped_subscribers() {
        let mut fanout = FanOut::new(1);
        let subs = fanout.subscriptions();
        fanout.publish(&batch(1));
        let mut late = subs.subscribe(8).unwrap();
        assert_eq!(subs.subscribe(8).err(), Some(SubscribeError::Busy));
        assert_eq!(late.recv_timeout(Duration::from_millis(1)), Ok(None));
        fanout.publish(&batch(2));
        assert_eq!(late.try_recv().unwrap().unwrap().first_seq, 2);
        drop(late);
        fanout.publish(&batch(3));
        assert_eq!(fanout.consumers(), 0);
        fanout.close();
        let mut after = subs.subscribe(1).unwrap();
        assert_eq!(after.recv(), Err(RecvError::Closed));
    }
}
