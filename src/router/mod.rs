//! The router tier: claims spooled messages, resolves their recipients
//! through the account directory, writes the resulting deliveries and
//! generates auto-replies.

pub mod autoreply;
pub mod resolve;
pub mod worker;
