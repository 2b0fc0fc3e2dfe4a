//! Shared helpers for integration tests: a downstream sink, throwaway
//! databases, a DNS server on loopback, an in-process wsmtp and a raw SMTP
//! client.

pub mod admin;
pub mod db;
pub mod directory;
pub mod dns;
pub mod harness;
pub mod logs;
pub mod routed;
pub mod sink;
pub mod tls;
