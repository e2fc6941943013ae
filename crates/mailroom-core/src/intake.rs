//! The seam between a front door (SMTP, later HTTP) and the queue.
//!
//! A front door builds a [`NewMessage`] and awaits [`Intake::submit`]; only
//! when it resolves `Ok` may the client be told the message is accepted.
//! The front door never learns which store sits behind it.

use std::future::Future;

use crate::NewMessage;

/// Why intake could not take a message. The text is for logs; clients get a
/// generic temporary failure and never the inner detail.
#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    #[error("the store is shutting down")]
    ShuttingDown,
    #[error("the store failed: {0}")]
    Store(String),
}

/// Takes accepted transactions and answers once they are durable.
pub trait Intake: Send + Sync + 'static {
    /// Resolves `Ok(())` only after the message is on disk.
    fn submit(&self, message: NewMessage) -> impl Future<Output = Result<(), IntakeError>> + Send;
}
