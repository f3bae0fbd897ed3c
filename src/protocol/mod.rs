//! The RCP wire protocol: binary frames and the JSON envelope.

pub mod envelope;
pub mod frame;
