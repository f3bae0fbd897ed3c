//! A connection between cluster peers: plain TCP, or TLS as the side that
//! connected or the side that accepted (`replication.tls_enabled`). One
//! type, so the Raft transport, tunnels and the frontend that serves them
//! do not care which.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;

/// A peer connection.
pub enum PeerStream {
    Plain(TcpStream),
    Connected(Box<futures_rustls::client::TlsStream<TcpStream>>),
    Accepted(Box<futures_rustls::server::TlsStream<TcpStream>>),
}

impl PeerStream {
    /// The TCP connection underneath.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            PeerStream::Plain(s) => s,
            PeerStream::Connected(t) => t.get_ref().0,
            PeerStream::Accepted(t) => t.get_ref().0,
        }
    }
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            PeerStream::Plain($s) => {
                let $s = Pin::new($s);
                $e
            }
            PeerStream::Connected($s) => {
                let $s = Pin::new(&mut **$s);
                $e
            }
            PeerStream::Accepted($s) => {
                let $s = Pin::new(&mut **$s);
                $e
            }
        }
    };
}

impl AsyncRead for PeerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_flush(cx))
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_close(cx))
    }
}
