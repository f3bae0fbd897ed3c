//! The RCP wire protocol: binary frames, the JSON envelope and the
//! operation names.

pub mod envelope;
pub mod frame;
pub mod names;
