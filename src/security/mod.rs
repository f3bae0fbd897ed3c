//! Who may talk to the server: bearer tokens ([`auth`]) and TLS/mTLS
//! ([`tls`]).

pub mod auth;
pub mod tls;
