//! The queue between a request's finished spans and the exporter: spans arrive already encoded
//! (`request_span` writes each one's protobuf at its end), wait here, and one thread of ours sends
//! them in batches, as the SDK's batch span processor does, without a `SpanData` per span or a
//! channel message per span.
//!
//! The batch processor's settings are honoured: `OTEL_BSP_SCHEDULE_DELAY` (ms between exports,
//! 5000), `OTEL_BSP_MAX_QUEUE_SIZE` (2048 spans waiting; a span beyond it is dropped and counted)
//! and `OTEL_BSP_MAX_EXPORT_BATCH_SIZE` (512 spans per export, and an export starts early once
//! that many wait). A request never waits on an export: it holds the lock for one append.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Sends one batch: the `ScopeSpans.spans` fields back to back. Runs on the queue's thread.
pub type Sink = Box<dyn FnMut(&[u8]) -> Result<(), String> + Send>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchConfig {
    pub schedule_delay: Duration,
    pub max_queue: usize,
    pub max_batch: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig { schedule_delay: Duration::from_millis(5000), max_queue: 2048, max_batch: 512 }
    }
}

impl BatchConfig {
    /// The SDK's variables; a value that is not a number is ignored, as the SDK ignores it.
    pub fn from_env() -> BatchConfig {
        BatchConfig::from_lookup(|k| std::env::var(k).ok())
    }

    fn from_lookup(get: impl Fn(&str) -> Option<String>) -> BatchConfig {
        let num = |k: &str| get(k).and_then(|v| v.trim().parse::<u64>().ok());
        let d = BatchConfig::default();
        let max_queue = num("OTEL_BSP_MAX_QUEUE_SIZE").filter(|n| *n > 0).map_or(d.max_queue, |n| n as usize);
        let max_batch = num("OTEL_BSP_MAX_EXPORT_BATCH_SIZE").filter(|n| *n > 0).map_or(d.max_batch, |n| n as usize);
        BatchConfig {
            schedule_delay: num("OTEL_BSP_SCHEDULE_DELAY").map_or(d.schedule_delay, Duration::from_millis),
            max_queue,
            // As the SDK: a batch never exceeds the queue.
            max_batch: max_batch.min(max_queue),
        }
    }
}

#[derive(Default)]
struct Pending {
    /// Batches of `max_batch` spans, oldest first, each one buffer sent as it is: a batch is
    /// never copied out of a longer buffer (at 512 spans of ≈ 400 bytes, twice per export).
    full: VecDeque<Vec<u8>>,
    /// The batch being filled, and how many spans it holds.
    filling: Vec<u8>,
    filling_spans: usize,
    /// Sent buffers, emptied, for the next batches (their capacity kept).
    spare: Vec<Vec<u8>>,
    dropped: u64,
    failed: u64,
    exported: u64,
    /// Bumped by `flush`; the thread answers with `flushed`.
    flush_asked: u64,
    flushed: u64,
    closing: bool,
    closed: bool,
}

impl Pending {
    fn waiting(&self, max_batch: usize) -> usize {
        self.full.len() * max_batch + self.filling_spans
    }

    /// The next batch to send and its span count: a full one, else (when `partial`) the one
    /// being filled.
    fn next_batch(&mut self, max_batch: usize, partial: bool) -> Option<(Vec<u8>, usize)> {
        if let Some(b) = self.full.pop_front() {
            return Some((b, max_batch));
        }
        if partial && self.filling_spans > 0 {
            let n = std::mem::take(&mut self.filling_spans);
            return Some((self.take_filling(), n));
        }
        None
    }

    /// The batch being filled, replaced by a spare buffer, or by a new one that starts at this
    /// batch's size rather than growing to it.
    fn take_filling(&mut self) -> Vec<u8> {
        let fresh = self.spare.pop().unwrap_or_else(|| Vec::with_capacity(self.filling.len()));
        std::mem::replace(&mut self.filling, fresh)
    }

    /// A sent buffer back, emptied, for a later batch (a few are enough to cycle).
    fn give_back(&mut self, mut buf: Vec<u8>) {
        if self.spare.len() < 3 {
            buf.clear();
            self.spare.push(buf);
        }
    }
}

pub struct SpanQueue {
    cfg: BatchConfig,
    pending: Mutex<Pending>,
    /// Wakes the exporter thread (a full batch, a flush, closing).
    work: Condvar,
    /// Wakes whoever waits on a flush or the close.
    done: Condvar,
}

static QUEUE: OnceLock<Arc<SpanQueue>> = OnceLock::new();

/// Starts the process's queue and its thread. Later calls change nothing.
pub fn install(cfg: BatchConfig, sink: Sink) -> std::io::Result<()> {
    let queue = Arc::new(SpanQueue::new(cfg));
    if QUEUE.set(queue.clone()).is_ok() {
        queue.spawn(sink)?;
    }
    Ok(())
}

/// The process's queue, once installed (tracing on).
pub fn get() -> Option<&'static SpanQueue> {
    QUEUE.get().map(|q| &**q)
}

/// What became of the spans handed to a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counts {
    pub exported: u64,
    /// Refused because the queue was full.
    pub dropped: u64,
    /// In batches the sink failed to send.
    pub failed: u64,
    pub waiting: usize,
}

impl SpanQueue {
    pub fn new(cfg: BatchConfig) -> SpanQueue {
        SpanQueue { cfg, pending: Mutex::new(Pending::default()), work: Condvar::new(), done: Condvar::new() }
    }

    pub fn spawn(self: &Arc<Self>, sink: Sink) -> std::io::Result<()> {
        let me = self.clone();
        std::thread::Builder::new().name("span-export".into()).spawn(move || me.run(sink)).map(|_| ())
    }

    /// Appends one span: `write` puts its `ScopeSpans.spans` field. Dropped (and counted) when
    /// the queue is full or closed.
    pub fn push(&self, write: impl FnOnce(&mut Vec<u8>)) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if p.waiting(self.cfg.max_batch) >= self.cfg.max_queue || p.closing {
            p.dropped += 1;
            return;
        }
        write(&mut p.filling);
        p.filling_spans += 1;
        if p.filling_spans == self.cfg.max_batch {
            let batch = p.take_filling();
            p.full.push_back(batch);
            p.filling_spans = 0;
            self.work.notify_one();
        }
    }

    pub fn counts(&self) -> Counts {
        let p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        Counts { exported: p.exported, dropped: p.dropped, failed: p.failed, waiting: p.waiting(self.cfg.max_batch) }
    }

    /// Exports everything waiting now; false when that did not finish within `bound`.
    pub fn flush(&self, bound: Duration) -> bool {
        let deadline = Instant::now() + bound;
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        p.flush_asked += 1;
        let ticket = p.flush_asked;
        self.work.notify_one();
        while p.flushed < ticket && !p.closed {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            p = self.done.wait_timeout(p, left).unwrap_or_else(|e| e.into_inner()).0;
        }
        true
    }

    /// Exports what waits and stops the thread; later spans are dropped. False when that did not
    /// finish within `bound`.
    pub fn close(&self, bound: Duration) -> bool {
        let deadline = Instant::now() + bound;
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        p.closing = true;
        self.work.notify_one();
        while !p.closed {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            p = self.done.wait_timeout(p, left).unwrap_or_else(|e| e.into_inner()).0;
        }
        true
    }

    fn run(&self, mut sink: Sink) {
        let mut next = Instant::now() + self.cfg.schedule_delay;
        loop {
            let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                let due = Instant::now() >= next;
                if p.closing || p.flush_asked > p.flushed || !p.full.is_empty() || due {
                    break;
                }
                let left = next.saturating_duration_since(Instant::now());
                p = self.work.wait_timeout(p, left).unwrap_or_else(|e| e.into_inner()).0;
            }
            let (closing, ticket) = (p.closing, p.flush_asked);
            // What waits now goes out, the lock not held while sending; the batch being filled
            // too, once. Spans that arrive meanwhile go out only as a full batch (or at close):
            // sending them at once made a stream of small exports under load (measured: 46 spans
            // per export, against 512).
            let mut partial = p.filling_spans > 0;
            while let Some((batch, n)) = p.next_batch(self.cfg.max_batch, partial || closing) {
                // The batch being filled holds fewer than `max_batch`: that was the owed one.
                partial &= n == self.cfg.max_batch;
                drop(p);
                let sent = sink(&batch);
                p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
                p.give_back(batch);
                match sent {
                    Ok(()) => p.exported += n as u64,
                    Err(e) => {
                        p.failed += n as u64;
                        eprintln!("graceful: span export failed ({n} spans): {e}");
                    }
                }
            }
            next = Instant::now() + self.cfg.schedule_delay;
            p.flushed = p.flushed.max(ticket);
            if closing {
                p.closed = true;
                self.done.notify_all();
                return;
            }
            self.done.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn queue(cfg: BatchConfig) -> (Arc<SpanQueue>, mpsc::Receiver<Vec<u8>>) {
        let q = Arc::new(SpanQueue::new(cfg));
        let (tx, rx) = mpsc::channel();
        q.spawn(Box::new(move |b: &[u8]| tx.send(b.to_vec()).map_err(|e| e.to_string()))).unwrap();
        (q, rx)
    }

    const SLOW: Duration = Duration::from_secs(3600);

    #[test]
    fn a_full_batch_goes_out_at_once_and_a_flush_sends_the_rest() {
        let (q, rx) = queue(BatchConfig { schedule_delay: SLOW, max_queue: 10, max_batch: 3 });
        for b in [b"a", b"b", b"c"] {
            q.push(|out| out.extend_from_slice(b));
        }
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), b"abc");
        q.push(|out| out.extend_from_slice(b"d"));
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err(), "one span waits for the schedule");
        assert!(q.flush(Duration::from_secs(5)));
        assert_eq!(rx.try_recv().unwrap(), b"d");
        assert_eq!(q.counts(), Counts { exported: 4, dropped: 0, failed: 0, waiting: 0 });
    }

    #[test]
    fn spans_that_arrive_during_a_send_wait_for_a_full_batch() {
        let q = Arc::new(SpanQueue::new(BatchConfig { schedule_delay: SLOW, max_queue: 10, max_batch: 3 }));
        let (gate_tx, gate_rx) = mpsc::channel::<()>();
        let (tx, rx) = mpsc::channel();
        q.spawn(Box::new(move |b: &[u8]| {
            tx.send(b.to_vec()).unwrap();
            gate_rx.recv_timeout(Duration::from_secs(5)).map_err(|e| e.to_string())
        }))
        .unwrap();
        for b in [b"a", b"b", b"c"] {
            q.push(|out| out.extend_from_slice(b));
        }
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), b"abc");
        q.push(|out| out.extend_from_slice(b"d")); // while "abc" is being sent
        gate_tx.send(()).unwrap();
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err(), "one span is not a batch");
        gate_tx.send(()).unwrap();
        assert!(q.flush(Duration::from_secs(5)));
        assert_eq!(rx.try_recv().unwrap(), b"d");
    }

    #[test]
    fn the_schedule_sends_what_waits() {
        let (q, rx) = queue(BatchConfig { schedule_delay: Duration::from_millis(50), max_queue: 10, max_batch: 5 });
        q.push(|out| out.extend_from_slice(b"x"));
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), b"x");
    }

    #[test]
    fn a_full_queue_drops_and_counts_and_close_exports_in_batches() {
        let (q, rx) = queue(BatchConfig { schedule_delay: SLOW, max_queue: 4, max_batch: 4 });
        // The first batch goes out as soon as it is full.
        for i in 0..4u8 {
            q.push(|out| out.push(b'0' + i));
        }
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), b"0123");
        // Spans pushed before the thread runs: 5 wait, the rest are dropped.
        let q2 = Arc::new(SpanQueue::new(BatchConfig { schedule_delay: SLOW, max_queue: 5, max_batch: 2 }));
        for i in 0..7u8 {
            q2.push(|out| out.push(b'a' + i));
        }
        assert_eq!(q2.counts().dropped, 2, "5 wait, 2 beyond the queue");
        let (tx, rx2) = mpsc::channel();
        q2.spawn(Box::new(move |b: &[u8]| tx.send(b.to_vec()).map_err(|e| e.to_string()))).unwrap();
        assert!(q2.close(Duration::from_secs(5)));
        let got: Vec<Vec<u8>> = rx2.try_iter().collect();
        assert_eq!(got, vec![b"ab".to_vec(), b"cd".to_vec(), b"e".to_vec()]);
        q2.push(|out| out.push(b'z'));
        assert_eq!(q2.counts(), Counts { exported: 5, dropped: 3, failed: 0, waiting: 0 });
    }

    #[test]
    fn a_failing_sink_is_counted() {
        let q = Arc::new(SpanQueue::new(BatchConfig { schedule_delay: SLOW, max_queue: 8, max_batch: 8 }));
        q.spawn(Box::new(|_: &[u8]| Err("refused".to_string()))).unwrap();
        q.push(|out| out.push(1));
        assert!(q.close(Duration::from_secs(5)));
        assert_eq!(q.counts().failed, 1);
    }

    #[test]
    fn a_flush_with_nothing_to_send_returns() {
        let (q, _rx) = queue(BatchConfig { schedule_delay: SLOW, ..BatchConfig::default() });
        assert!(q.flush(Duration::from_secs(5)));
    }

    #[test]
    fn settings_come_from_the_sdk_variables() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
        };
        assert_eq!(BatchConfig::from_lookup(env(&[])), BatchConfig::default());
        let got = BatchConfig::from_lookup(env(&[
            ("OTEL_BSP_SCHEDULE_DELAY", "200"),
            ("OTEL_BSP_MAX_QUEUE_SIZE", "100"),
            ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "512"),
        ]));
        assert_eq!(got, BatchConfig { schedule_delay: Duration::from_millis(200), max_queue: 100, max_batch: 100 });
        let bad =
            BatchConfig::from_lookup(env(&[("OTEL_BSP_SCHEDULE_DELAY", "soon"), ("OTEL_BSP_MAX_QUEUE_SIZE", "0")]));
        assert_eq!(bad, BatchConfig::default());
    }
}
