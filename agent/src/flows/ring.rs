//! The last N flow events in memory (`--flow-buffer-capacity`), numbered so
//! that readers can page through them and followers can tell when the writer
//! overtook them (Hubble's ring buffer, with a lock instead of atomics: one
//! writer, few readers).

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, MutexGuard},
};

use tokio::sync::watch;
use weir_proto::flow::{Flow, LostEvent};

/// One entry: a flow or a report of lost events.
#[derive(Debug)]
pub enum Event {
    Flow(Box<Flow>),
    Lost(LostEvent),
}

#[derive(Debug)]
pub struct Entry {
    /// Position in the sequence of all entries ever written.
    pub seq: u64,
    /// Wall-clock nanoseconds since the epoch.
    pub time_ns: i128,
    pub event: Event,
}

#[derive(Debug)]
struct Inner {
    entries: VecDeque<Arc<Entry>>,
    capacity: usize,
    /// The sequence number of the next entry written.
    next_seq: u64,
    /// Flows (not lost-event reports) currently held.
    flows: usize,
    /// Flows written since start.
    seen_flows: u64,
}

/// A bounded ring shared by the reader task (the writer) and the gRPC
/// handlers.
#[derive(Debug)]
pub struct Ring {
    inner: Mutex<Inner>,
    /// The next sequence number, published after each batch of writes.
    written: watch::Sender<u64>,
}

/// A consistent view of the ring's counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stats {
    pub num_flows: u64,
    pub max_flows: u64,
    pub seen_flows: u64,
}

impl Ring {
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            inner: Mutex::new(Inner {
                entries: VecDeque::with_capacity(capacity.min(1 << 16)),
                capacity,
                next_seq: 0,
                flows: 0,
                seen_flows: 0,
            }),
            written: watch::channel(0).0,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends an entry, evicting the oldest when full. Followers see it
    /// after the next [`Ring::publish`].
    pub fn push(&self, time_ns: i128, event: Event) {
        let mut inner = self.lock();
        if inner.entries.len() == inner.capacity
            && let Some(old) = inner.entries.pop_front()
            && matches!(old.event, Event::Flow(_))
        {
            inner.flows -= 1;
        }
        if matches!(event, Event::Flow(_)) {
            inner.flows += 1;
            inner.seen_flows += 1;
        }
        let seq = inner.next_seq;
        inner.next_seq += 1;
        inner.entries.push_back(Arc::new(Entry { seq, time_ns, event }));
    }

    /// Wakes followers up for everything pushed so far.
    pub fn publish(&self) {
        let next = self.lock().next_seq;
        self.written.send_if_modified(|seq| {
            let changed = *seq != next;
            *seq = next;
            changed
        });
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.written.subscribe()
    }

    pub fn stats(&self) -> Stats {
        let inner = self.lock();
        Stats {
            num_flows: inner.flows as u64,
            max_flows: inner.capacity as u64,
            seen_flows: inner.seen_flows,
        }
    }

    /// The sequence numbers of the oldest entry held and of the next entry.
    pub fn bounds(&self) -> (u64, u64) {
        let inner = self.lock();
        (inner.next_seq - inner.entries.len() as u64, inner.next_seq)
    }

    /// Entries with sequence numbers in `from..to` that are still held, and
    /// how many of that range were already evicted.
    pub fn range(&self, from: u64, to: u64) -> (Vec<Arc<Entry>>, u64) {
        let inner = self.lock();
        let oldest = inner.next_seq - inner.entries.len() as u64;
        let to = to.min(inner.next_seq);
        let start = from.max(oldest);
        let lost = start.saturating_sub(from).min(to.saturating_sub(from));
        if start >= to {
            return (Vec::new(), lost);
        }
        let skip = (start - oldest) as usize;
        let take = (to - start) as usize;
        (inner.entries.iter().skip(skip).take(take).cloned().collect(), lost)
    }

    /// Walks the held entries from newest to oldest, up to `f` returning
    /// false; returns the sequence number of the last entry `f` accepted.
    pub fn scan_back(&self, mut f: impl FnMut(&Entry) -> bool) -> Option<u64> {
        let inner = self.lock();
        let mut last = None;
        for entry in inner.entries.iter().rev() {
            if !f(entry) {
                break;
            }
            last = Some(entry.seq);
        }
        last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow() -> Event {
        Event::Flow(Box::default())
    }

    #[test]
    fn keeps_the_last_capacity_entries() {
        let ring = Ring::new(3);
        for t in 0..5 {
            ring.push(t, flow());
        }
        assert_eq!(ring.stats(), Stats { num_flows: 3, max_flows: 3, seen_flows: 5 });
        assert_eq!(ring.bounds(), (2, 5));
        let (entries, lost) = ring.range(0, 5);
        assert_eq!(lost, 2);
        assert_eq!(entries.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![2, 3, 4]);
        let (entries, lost) = ring.range(3, 4);
        assert_eq!((entries.len(), lost), (1, 0));
    }

    #[test]
    fn lost_reports_are_not_flows() {
        let ring = Ring::new(2);
        ring.push(0, Event::Lost(LostEvent::default()));
        ring.push(1, flow());
        assert_eq!(ring.stats().num_flows, 1);
        ring.push(2, flow());
        assert_eq!(ring.stats(), Stats { num_flows: 2, max_flows: 2, seen_flows: 2 });
    }

    #[test]
    fn followers_are_woken_by_publish() {
        let ring = Ring::new(4);
        let mut rx = ring.subscribe();
        ring.push(0, flow());
        assert!(!rx.has_changed().unwrap());
        ring.publish();
        assert!(rx.has_changed().unwrap());
        assert_eq!(*rx.borrow_and_update(), 1);
    }
}
