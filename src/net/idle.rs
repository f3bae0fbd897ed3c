//! Closing connections idle for `network.idle_timeout_secs` (D18), without
//! a timer per connection: one sweeper per frontend, woken by the
//! [`crate::ticker`] thread, kicks the connections whose last activity is
//! older than the timeout, and each decides for itself (one that watches is
//! never idle). See `ticker` for why no glommio timer is used.

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
    last_active: Rc<Cell<Instant>>,
    kick: flume::Sender<()>,
}

/// One connection's registration; dropping it unregisters.
pub struct Idle {
    watch: Rc<IdleWatch>,
    key: u64,
    last_active: Rc<Cell<Instant>>,
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
        let last_active = Rc::new(Cell::new(Instant::now()));
        let (kick, kicked) = flume::bounded(1);
        self.conns.borrow_mut().insert(
            key,
            Entry {
                last_active: last_active.clone(),
                kick,
            },
        );
        Idle {
            watch: self.clone(),
            key,
            last_active,
            kicked,
        }
    }

    /// Kicks every connection quiet for the timeout, at each tick, until
    /// the ticks stop.
    pub async fn sweep(self: Rc<Self>, ticks: flume::Receiver<()>) {
        while ticks.recv_async().await.is_ok() {
            let now = Instant::now();
            for e in self.conns.borrow().values() {
                if now.duration_since(e.last_active.get()) >= self.timeout {
                    let _ = e.kick.try_send(());
                }
            }
        }
    }
}

impl Idle {
    /// Notes activity now.
    pub fn touch(&self) {
        self.last_active.set(Instant::now());
    }

    /// Whether the connection has been quiet for the whole timeout.
    pub fn expired(&self) -> bool {
        self.last_active.get().elapsed() >= self.watch.timeout
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
