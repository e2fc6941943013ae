//! The capture intake: what happens to a message the SMTP session accepted.
//! Parse it, build the event, hand it to a worker (waiting for one when
//! all are busy), keep it in the inbox (committed before the answer), queue
//! it for the webhook, and tell the session whether to go on or close.

use std::sync::Arc;

use mailroom_core::{Intake, IntakeError, NewMessage, Receipt, SessionFacts};
use tracing::debug;

use crate::attachments::AttachmentStore;
use crate::inbox::{Inbox, InboxError, NewEntry};
use crate::pool::WorkerPool;
use crate::webhook::Webhook;
use crate::{event, mime};

pub struct CaptureIntake {
    pub(crate) inbox: Arc<Inbox>,
    pub(crate) attachments: Arc<AttachmentStore>,
    pub(crate) pool: Option<WorkerPool>,
    pub(crate) webhook: Option<Webhook>,
    pub(crate) include_raw: bool,
}

impl Intake for CaptureIntake {
    async fn submit(&self, message: NewMessage) -> Result<(), IntakeError> {
        self.accept(message, SessionFacts::default())
            .await
            .map(|_| ())
    }

    async fn accept(
        &self,
        message: NewMessage,
        facts: SessionFacts,
    ) -> Result<Receipt, IntakeError> {
        let attachments = self.attachments.clone();
        let include_raw = self.include_raw;
        // MIME decoding and tempfile writes are CPU and disk work; they run
        // on the blocking pool so a 10 MB message cannot stall other
        // sessions.
        let built = tokio::task::spawn_blocking(move || {
            let mime = mime::parse(&message.content);
            let event = event::build(&message, &facts, &mime, include_raw, &attachments)?;
            let json = serde_json::to_vec(&event).map_err(std::io::Error::other)?;
            Ok::<_, std::io::Error>((message, mime, event, json))
        })
        .await
        .map_err(|e| IntakeError::Store(format!("capture task failed: {e}")))?;
        let (message, mime, event, json) =
            built.map_err(|e| IntakeError::Store(format!("cannot build the event: {e}")))?;

        let receipt = match &self.pool {
            Some(pool) => match pool.handle(&json).await {
                Ok(receipt) => receipt,
                Err(err) => {
                    let attachments = self.attachments.clone();
                    let uuid = event.uuid.clone();
                    let _ = tokio::task::spawn_blocking(move || attachments.remove_message(&uuid))
                        .await;
                    return Err(IntakeError::Worker(err.to_string()));
                }
            },
            None => Receipt::Continue,
        };
        let uuid = event.uuid;
        // Kept before the answer: `250` means the message is in the inbox.
        self.inbox
            .insert(NewEntry {
                id: message.id,
                received_at: message.received_at,
                envelope_from: event.envelope.from,
                envelope_to: event.envelope.to,
                helo: event.envelope.helo,
                remote_addr: event.remote_addr,
                authentication: event.authentication,
                mime: &mime,
                raw: message.content,
            })
            .await
            .map_err(|e| match e {
                InboxError::Closed => IntakeError::ShuttingDown,
                e => IntakeError::Store(e.to_string()),
            })?;
        debug!(%uuid, ?receipt, "captured");
        if let Some(webhook) = &self.webhook {
            webhook.send(uuid, json);
        }
        Ok(receipt)
    }
}
