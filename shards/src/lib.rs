pub mod definition;
pub mod guard;
