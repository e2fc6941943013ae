//! Outbound delivery: turning queued recipients into delivered mail or a
//! bounce the sender can read.
//!
//! [`dns`] finds where a domain's mail goes (MX, implicit MX, null MX) with
//! a TTL-respecting cache; [`client`] is the SMTP client conversation as a
//! sans-I/O state machine and [`connection`] its tokio driver (TLS policy,
//! AUTH, pipelining); [`pool`] keeps idle connections for reuse; [`dsn`]
//! writes RFC 3464 delivery status notifications; [`scheduler`] knows what
//! is due for which destination, [`retry`] when to try again, and
//! [`engine`] runs deliveries and records their outcomes.

pub mod client;
pub mod connection;
pub mod dns;
pub mod dsn;
pub mod engine;
pub mod http;
pub mod pool;
pub mod providers;
pub mod retry;
pub mod scheduler;
