//! Closing connections idle for `network.idle_timeout_secs` (D18), without
//! a timer per connection: one sweeper per frontend, woken by the
//! [`crate::ticker`] thread, kicks the connections whose last activity is
//! older than the timeout, and each decides for itself (one that watches is
//! never idle). See `ticker` for why no glommio timer is used. A read only
//! raises a flag (no clock read per request); the sweeper turns the flag
//! into a time at its next pass, so a connection closes between the
//! timeout and the timeout plus one sweep period after its last activity.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::{Duration, Instant};

/// The connections of one frontend that can go idle.
pub struct IdleWatch {
    timeout: Duration,
    next_key: Cell<u64>,
    conns: RefCell<hashbrown::HashMap<u64, Entry>>,
}

struct Entry {
    activity: Rc<Activity>,
    kick: flume::Sender<()>,
}

/// A connection's activity as the sweeper sees it.
struct Activity {
    /// Set by every read; cleared by the sweeper.
    active: Cell<bool>,
    /// When the sweeper last found the flag set (or the registration).
    last_seen: Cell<Instant>,
}

/// One connection's registration; dropping it unregisters.
pub struct Idle {
    watch: Rc<IdleWatch>,
    key: u64,
    activity: Rc<Activity>,
    /// Receives a kick once the connection has been quiet for the timeout.
    pub kicked: flume::Receiver<()>,
}

impl IdleWatch {
    /// A watch closing connections quiet for `timeout`.
    pub fn new(timeout: Duration) -> Rc<IdleWatch> {
        Rc::new(IdleWatch {
            timeout,
            next_key: Cell::new(0),
            conns: RefCell::new(hashbrown::HashMap::new()),
        })
    }

    /// How often the sweeper should look: a quarter of the timeout (so a
    /// connection closes at most 25 % late), between 10 ms and 1 s.
    pub fn sweep_every(&self) -> Duration {
        (self.timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1))
    }

    /// Registers a connection, active now.
    pub fn register(self: &Rc<Self>) -> Idle {
        let key = self.next_key.get();
        self.next_key.set(key + 1);
        let activity = Rc::new(Activity {
            active: Cell::new(false),
            last_seen: Cell::new(Instant::now()),
        });
        let (kick, kicked) = flume::bounded(1);
        self.conns.borrow_mut().insert(
            key,
            Entry {
                activity: activity.clone(),
                kick,
            },
        );
        Idle {
            watch: self.clone(),
            key,
            activity,
            kicked,
        }
    }

    /// Kicks every connection quiet for the timeout, at each tick, until
    /// the ticks stop.
    pub async fn sweep(self: Rc<Self>, ticks: flume::Receiver<()>) {
        while ticks.recv_async().await.is_ok() {
            let now = Instant::now();
            for e in self.conns.borrow().values() {
                let a = &e.activity;
                if a.active.replace(false) {
                    a.last_seen.set(now);
                } else if now.duration_since(a.last_seen.get()) >= self.timeout {
                    let _ = e.kick.try_send(());
                }
            }
        }
    }
}

impl Idle {
    /// Notes activity (the sweeper dates it).
    pub fn touch(&self) {
        self.activity.active.set(true);
    }

    /// Whether the connection has been quiet for the whole timeout.
    pub fn expired(&self) -> bool {
        let a = &self.activity;
        !a.active.get() && a.last_seen.get().elapsed() >= self.watch.timeout
    }
}

impl Drop for Idle {
    fn drop(&mut self) {
        self.watch.conns.borrow_mut().remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kicks_only_quiet_connections_and_forgets_closed_ones() {
        glommio::LocalExecutor::default().run(async {
            let watch = IdleWatch::new(Duration::from_millis(30));
            let quiet = watch.register();
            let busy = watch.register();
            let gone = watch.register();
            drop(gone);
            assert_eq!(watch.conns.borrow().len(), 2);
            let (tick, ticks) = flume::bounded(1);
            glommio::spawn_local(watch.clone().sweep(ticks)).detach();
            glommio::timer::sleep(Duration::from_millis(40)).await;
            busy.touch();
            tick.send_async(()).await.unwrap();
            quiet.kicked.recv_async().await.unwrap();
            assert!(quiet.expired());
            assert!(
                busy.kicked.try_recv().is_err(),
                "an active one is not kicked"
            );
            assert!(!busy.expired());
        });
    }
}
