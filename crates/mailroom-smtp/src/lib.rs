//! mailroom's SMTP server (RFC 5321 and its ESMTP extensions).
//!
//! [`session`] is the protocol as a pure state machine: bytes in, replies
//! and [`session::Event`]s out. [`server`] is the tokio driver around it:
//! listeners, limits, timeouts, TLS and shutdown. [`auth`] checks AUTH
//! credentials, [`tls`] loads or generates certificates, [`received`]
//! writes the trace header. The server hands each accepted transaction to
//! a [`mailroom_core::Intake`] and answers `250` only when that succeeds.

pub mod auth;
pub mod received;
pub mod server;
pub mod session;
pub mod tls;

pub use auth::Credentials;
pub use server::{ServerSettings, ShutdownHandle, SmtpServer};
pub use session::{Event, Session, SessionConfig, TlsInfo};
