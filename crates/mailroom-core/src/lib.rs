//! Domain types shared by every mailroom crate.
//!
//! Addresses, envelopes, message ids, SMTP replies and the configuration
//! structs live here so that the SMTP server, the store and the binary agree
//! on one vocabulary. This crate does no I/O: anything that touches a socket,
//! a file or the clock's side effects belongs in an outer crate.

pub mod address;
pub mod config;
pub mod decimal;
pub mod duration;
pub mod envelope;
pub mod event;
pub mod intake;
pub mod message;
pub mod reply;
pub mod time;

pub use address::{Address, AddressError};
pub use envelope::{BodyType, Envelope, Notify, Recipient, Ret};
pub use event::{EventKind, MessageEvent};
pub use intake::{AuthAttempt, Intake, IntakeError, Receipt, SessionFacts, SessionPolicy};
pub use message::{IdempotencyRecord, MessageId, MessageMeta, NewMessage, Origin};
pub use reply::Reply;
