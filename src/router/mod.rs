//! Routing of spooled messages: resolves each queued recipient through the
//! account directory into deliveries, and generates auto-replies.

pub mod autoreply;
