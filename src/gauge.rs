//! A count that the shutdown can await down to zero (open connections, requests in flight):
//! the last one to end wakes the waiter, so a drain ends the moment it is done instead of at the
//! next tick of a polling loop.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

#[derive(Debug, Default)]
pub struct Gauge {
    count: AtomicUsize,
    zero: Notify,
}

impl Gauge {
    pub fn get(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    /// Adds one; returns the new count.
    pub fn inc(&self) -> usize {
        self.count.fetch_add(1, Ordering::SeqCst) + 1
    }

    pub fn dec(&self) {
        if self.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.zero.notify_waiters();
        }
    }

    /// Waits until the count is zero or `bound` passes; returns the count then.
    pub async fn wait_zero(&self, bound: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + bound;
        loop {
            // Registered before the check, so a decrement in between still wakes us.
            let notified = self.zero.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let n = self.get();
            if n == 0 {
                return 0;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.get();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn wakes_at_zero_and_gives_up_at_the_bound() {
        let g = Arc::new(Gauge::default());
        g.inc();
        g.inc();
        assert_eq!(g.wait_zero(Duration::from_millis(50)).await, 2, "bounded wait reports what is left");
        let g2 = g.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            g2.dec();
            tokio::time::sleep(Duration::from_millis(10)).await;
            g2.dec();
        });
        let started = tokio::time::Instant::now();
        assert_eq!(g.wait_zero(Duration::from_secs(5)).await, 0);
        assert_eq!(started.elapsed(), Duration::from_millis(20), "woken by the last decrement, not a tick");
    }
}
