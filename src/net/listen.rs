//! The client listeners, and the start-up check that no other server
//! listens on our addresses.
//!
//! Every frontend executor listens on the client address with
//! `SO_REUSEPORT`, so the kernel spreads connections over them. Port reuse
//! would also let a second server on the same address start and silently
//! split the connections with us, so start-up first checks the address with
//! a bind that has address reuse but not port reuse ([`check_free`]): the
//! kernel refuses it while any socket listens there.
//!
//! Connections the previous process left behind (TIME_WAIT after a crash or
//! a stop) must not make that check fail, or a restart on the same address
//! (systemd's `Restart=`) fails for a minute. The kernel lets an
//! address-reuse bind pass a lingering connection only when that
//! connection's socket had address reuse too; accepted sockets inherit
//! their listener's options, so our listeners set `SO_REUSEADDR` as well as
//! `SO_REUSEPORT` ([`listener`]). Connections left by a server that did not
//! (an older build) are recognised by the kernel's socket table instead: the
//! address is taken only if a socket there is in the listening state.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::time::{Duration, Instant};

use socket2::{Domain, Socket, Type};

/// Pending connections the kernel queues per listener.
const BACKLOG: i32 = 1024;

/// Why an address cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AddressError {
    /// Another socket listens there.
    #[error("cannot listen on {addr} ({what}): another process is listening there (is another server running?)")]
    Taken {
        addr: SocketAddr,
        what: &'static str,
    },
    /// The bind failed for another reason (permissions, no such address).
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        addr: SocketAddr,
        what: &'static str,
        source: io::Error,
    },
}

/// How long a listener found on our address may take to go away before
/// the start is refused: a server killed a moment ago still listens for a
/// few milliseconds after its process is gone (its io_uring, which holds
/// the listening socket through a pending accept, is torn down
/// asynchronously; 10-20 ms measured here).
const LISTENER_GRACE: Duration = Duration::from_secs(3);
/// How often the address is checked again within the grace period.
const RECHECK_EVERY: Duration = Duration::from_millis(20);

/// Fails when a socket listens on `addr` and keeps listening for
/// [`LISTENER_GRACE`] (port 0 always passes). `what` names the setting in
/// the error.
pub fn check_free(addr: SocketAddr, what: &'static str) -> Result<(), AddressError> {
    if addr.port() == 0 {
        return Ok(());
    }
    let deadline = Instant::now() + LISTENER_GRACE;
    loop {
        match listener_there(addr) {
            Ok(false) => return Ok(()),
            Ok(true) if Instant::now() < deadline => std::thread::sleep(RECHECK_EVERY),
            Ok(true) => return Err(AddressError::Taken { addr, what }),
            Err(source) => return Err(AddressError::Bind { addr, what, source }),
        }
    }
}

/// Whether a socket listens on `addr`. Binds without listening and closes
/// the socket at once: a listener, even for an instant, could accept a
/// client's connection and drop it. Errors other than "in use" (no such
/// address, no permission) are returned.
fn listener_there(addr: SocketAddr) -> io::Result<bool> {
    match probe_bind(addr) {
        Ok(()) => Ok(false),
        // Only connections of a previous server may linger there.
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            Ok(listening_on(addr.port()).unwrap_or(true))
        }
        Err(e) => Err(e),
    }
}

/// Binds a socket to `addr` with address reuse and without port reuse, then
/// closes it.
fn probe_bind(addr: SocketAddr) -> io::Result<()> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.bind(&addr.into())
}

/// Whether the kernel's TCP socket tables (this network namespace, IPv4
/// and IPv6) hold a socket listening on `port`, at any address. `None`
/// when the tables cannot be read.
fn listening_on(port: u16) -> Option<bool> {
    let mut read_any = false;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        read_any = true;
        if text.lines().skip(1).any(|l| is_listener_on(l, port)) {
            return Some(true);
        }
    }
    read_any.then_some(false)
}

/// One line of `/proc/net/tcp{,6}`: `sl local_address rem_address st …`,
/// the local address as `HEXADDR:HEXPORT` and the state in hex (0A is
/// LISTEN).
fn is_listener_on(line: &str, port: u16) -> bool {
    let mut fields = line.split_whitespace();
    let (Some(_), Some(local), Some(_), Some(state)) =
        (fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return false;
    };
    let local_port = local
        .rsplit_once(':')
        .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
    state == "0A" && local_port == Some(port)
}

/// A client listener on `addr` for the current glommio executor: address
/// and port reuse (see the module docs). Must run inside an executor.
pub fn listener(addr: SocketAddr) -> io::Result<glommio::net::TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.bind(&addr.into())?;
    s.listen(BACKLOG)?;
    // SAFETY: the descriptor is a bound, listening TCP socket whose
    // ownership moves to the listener (into_raw_fd gives it up here).
    Ok(unsafe { glommio::net::TcpListener::from_raw_fd(s.into_raw_fd()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_listeners_from_the_socket_table() {
        let head = "  0: 0100007F:1CE9 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1";
        assert!(is_listener_on(head, 7401));
        assert!(!is_listener_on(head, 7402));
        let time_wait = "  1: 0100007F:1CE9 0100007F:D2F0 06 00000000:00000000 03:00000A1B 00000000     0        0 0 3";
        assert!(!is_listener_on(time_wait, 7401));
        let v6 =
            "  0: 00000000000000000000000001000000:1CE9 00000000000000000000000000000000:0000 0A 0";
        assert!(is_listener_on(v6, 7401));
        assert!(!is_listener_on("garbage", 7401));
    }

    #[test]
    fn a_live_listener_is_found_and_refused() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        assert_eq!(listening_on(addr.port()), Some(true));
        let err = check_free(addr, "network.bind_addr").unwrap_err();
        assert!(matches!(err, AddressError::Taken { .. }), "{err}");
        assert!(err.to_string().contains(&addr.to_string()), "{err}");
        drop(l);
        check_free(addr, "network.bind_addr").unwrap();
    }

    #[test]
    fn a_listener_that_goes_away_within_the_grace_period_is_no_obstacle() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let closer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            drop(l);
        });
        check_free(addr, "network.bind_addr").unwrap();
        closer.join().unwrap();
    }
}
