//! Coarse periodic ticks from one ordinary thread, for the executors'
//! housekeeping (idle connections, automatic compaction checks).
//!
//! Why not glommio timers: while any timer is pending, every time an
//! executor goes to sleep glommio arms an io_uring timeout for it and
//! cancels it on waking — two more submissions and an async-cancel scan per
//! request at low load (measured: ~20 % of the server's CPU per GET at one
//! client, one request at a time). A timer that is always pending (a
//! connection's idle timeout, the compaction check) paid that on every
//! request. A tick arriving over a channel from this thread costs one
//! wake-up per period instead, and nothing per request.

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// Shortest period a subscriber may ask for.
const MIN_PERIOD: Duration = Duration::from_millis(10);

struct Subscriber {
    period: Duration,
    next: Instant,
    tx: flume::Sender<()>,
}

/// The tick source; ticks stop when the last handle is dropped.
#[derive(Clone)]
pub struct Ticker {
    subscribers: Arc<Mutex<Vec<Subscriber>>>,
}

impl Ticker {
    /// Starts the ticking thread.
    pub fn start() -> std::io::Result<Ticker> {
        let subscribers = Arc::new(Mutex::new(Vec::new()));
        let weak = Arc::downgrade(&subscribers);
        std::thread::Builder::new()
            .name("ticker".into())
            .spawn(move || tick_until_dropped(weak))?;
        Ok(Ticker { subscribers })
    }

    /// A channel that receives a tick every `period` (at least
    /// [`MIN_PERIOD`]); ticks not yet received are not queued twice.
    pub fn every(&self, period: Duration) -> flume::Receiver<()> {
        let (tx, rx) = flume::bounded(1);
        let period = period.max(MIN_PERIOD);
        self.subscribers
            .lock()
            .expect("ticker lock")
            .push(Subscriber {
                period,
                next: Instant::now() + period,
                tx,
            });
        rx
    }
}

/// The thread: sleeps until the next subscriber is due, ticks every due
/// one, forgets those whose receiver is gone; ends with the last handle.
fn tick_until_dropped(subscribers: Weak<Mutex<Vec<Subscriber>>>) {
    loop {
        let wait = {
            let Some(subs) = subscribers.upgrade() else {
                return;
            };
            let mut subs = subs.lock().expect("ticker lock");
            let now = Instant::now();
            subs.retain_mut(|s| {
                if s.next <= now {
                    s.next = now + s.period;
                    !matches!(s.tx.try_send(()), Err(flume::TrySendError::Disconnected(_)))
                } else {
                    true
                }
            });
            subs.iter()
                .map(|s| s.next.saturating_duration_since(now))
                .min()
                .unwrap_or(Duration::from_millis(100))
        };
        std::thread::sleep(wait.max(Duration::from_millis(1)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_each_subscriber_at_its_period() {
        let t = Ticker::start().unwrap();
        let fast = t.every(Duration::from_millis(20));
        let slow = t.every(Duration::from_secs(60));
        let started = Instant::now();
        for _ in 0..3 {
            fast.recv_timeout(Duration::from_secs(5)).expect("a tick");
        }
        assert!(started.elapsed() >= Duration::from_millis(40));
        assert!(slow.try_recv().is_err(), "not due yet");
    }

    #[test]
    fn a_dropped_receiver_is_forgotten_and_the_thread_ends_with_the_ticker() {
        let t = Ticker::start().unwrap();
        drop(t.every(Duration::from_millis(10)));
        let kept = t.every(Duration::from_millis(10));
        kept.recv_timeout(Duration::from_secs(5)).expect("a tick");
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(t.subscribers.lock().unwrap().len(), 1);
        drop(t);
        // The thread lets go of the subscribers: the channel closes.
        loop {
            match kept.recv_timeout(Duration::from_secs(5)) {
                Ok(()) => continue,
                Err(flume::RecvTimeoutError::Disconnected) => break,
                Err(flume::RecvTimeoutError::Timeout) => panic!("ticks never stopped"),
            }
        }
    }
}
