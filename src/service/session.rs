//! Per-connection session state.

/// How the server writes to this client (PROTOCOL.md §3): client→server is
/// always binary frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WireMode {
    /// Binary frames (default).
    #[default]
    Binary,
    /// One compact JSON document per line.
    Jsonl,
}

impl WireMode {
    /// The name HELLO reports.
    pub fn name(self) -> &'static str {
        match self {
            WireMode::Binary => "binary_json",
            WireMode::Jsonl => "jsonl",
        }
    }
}

/// What a connection remembers between requests.
#[derive(Debug, Default)]
pub struct Session {
    /// Output mode chosen by the latest HELLO.
    pub wire_mode: WireMode,
    /// A successful AUTH was seen (never reset: there is no de-authentication).
    pub authenticated: bool,
    /// This connection's subscriptions (dropped with the connection).
    pub subscriptions: Vec<crate::service::subscriptions::Subscription>,
}
