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
    /// A capture worker crashed, timed out or could not be started.
    #[error("the worker failed: {0}")]
    Worker(String),
}

/// Takes accepted transactions and answers once they are durable.
pub trait Intake: Send + Sync + 'static {
    /// Resolves `Ok(())` only after the message is on disk.
    fn submit(&self, message: NewMessage) -> impl Future<Output = Result<(), IntakeError>> + Send;

    /// Like [`Intake::submit`], with what the front door saw of the
    /// session beyond the message, and a receipt that can end the session.
    /// The default is `submit` and carry on, which is all a queue needs;
    /// capture mode overrides it to hand AUTH attempts to workers and to let
    /// a worker close the session.
    fn accept(
        &self,
        message: NewMessage,
        session: SessionFacts,
    ) -> impl Future<Output = Result<Receipt, IntakeError>> + Send {
        let _ = session;
        async move { self.submit(message).await.map(|()| Receipt::Continue) }
    }
}

/// An AUTH exchange as the client sent it. Only capture mode keeps these
/// (it accepts every login without checking it); a real server never
/// stores a password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthAttempt {
    /// `PLAIN`, `LOGIN` or `CRAM-MD5`.
    pub mechanism: String,
    pub username: String,
    /// The password; for CRAM-MD5, the client's hex digest.
    pub password: String,
}

/// What the front door knows about the session a message came in on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionFacts {
    /// The client's address and port.
    pub remote_addr: Option<std::net::SocketAddr>,
    /// The last AUTH attempt of the session (capture mode only).
    pub auth_attempt: Option<AuthAttempt>,
}

/// What the session does after a message is accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Receipt {
    /// Answer `250` and read the next command.
    Continue,
    /// Answer `250`, then `221` and close the connection.
    Close,
}

/// Per-login rules a session applies to authenticated clients: which
/// senders they may use and how much they may send. Called synchronously
/// from the session state machine, so implementations must answer from
/// memory (no I/O). `Err` is the reply the client gets.
pub trait SessionPolicy: Send + Sync + std::fmt::Debug {
    /// `MAIL FROM` by `user`.
    fn mail(&self, user: &str, reverse_path: Option<&crate::Address>) -> Result<(), crate::Reply>;
    /// Each `RCPT TO` by `user` that passed every other check.
    fn rcpt(&self, user: &str) -> Result<(), crate::Reply>;
    /// The content at the end of `DATA` or `BDAT LAST`: header checks.
    fn content(&self, user: &str, content: &[u8]) -> Result<(), crate::Reply>;
}
