//! Delivery of spooled mail to remote hosts.

pub mod mx;
