//! Capture mode (`mailroom capture`): the SMTP server as a developer's mail
//! catcher, in the spirit of Mailpit, MailHog and Buggregator.
//!
//! Every message is accepted and every AUTH recorded without checking it
//! (the session's capture mode in `mailroom-smtp`). [`mime`] decodes the
//! message, [`event`] turns it into the JSON event, [`attachments`] decides
//! where attachment bytes go, [`pool`] hands the event to worker processes
//! ([`goridge`] is RoadRunner's frame format), [`webhook`] POSTs it,
//! [`inbox`] keeps it for the web UI and JSON API in [`http`]. [`Capture`]
//! wires them together. It must never face the internet.

pub mod attachments;
pub mod event;
pub mod goridge;
pub mod http;
pub mod inbox;
mod intake;
pub mod mime;
pub mod pool;
mod server;
pub mod webhook;

pub use event::CaptureEvent;
pub use server::{Capture, CaptureError};
