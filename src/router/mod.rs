//! The router tier: claims spooled messages, resolves their recipients
//! through the account directory and writes the resulting deliveries.

pub mod resolve;
pub mod worker;
