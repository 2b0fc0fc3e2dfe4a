//! The SMTP protocol: replies, command-line and message-data readers, the
//! server session state machine and the client used for downstream servers.
//! Nothing here knows of PostgreSQL or of routing policy.

pub mod client;
pub mod connection;
pub mod data;
pub mod envelope;
pub mod message;
pub mod reply;
pub mod sasl;
pub mod session;
