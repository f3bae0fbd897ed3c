//! The network side: listeners and the one-server-per-address check
//! ([`listen`]), the accept loop ([`server`]), each connection's loop
//! ([`connection`]), idle connections ([`idle`]).

pub mod connection;
pub mod forward;
pub mod idle;
pub mod listen;
pub mod peer;
pub mod peer_stream;
pub mod server;
