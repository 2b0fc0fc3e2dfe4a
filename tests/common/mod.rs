//! Shared helpers for integration tests: a downstream sink, throwaway
//! databases, an in-process wsmtp and a raw SMTP client.

pub mod db;
pub mod directory;
pub mod harness;
pub mod routed;
pub mod sink;
