//! The one send pipeline. Every message kabar sends (SendTemplate, SendOtp, batch
//! items) passes through [`Outbox::send_guarded`], which knows it from start to end:
//!
//! 1. the enabled check (`WHATSAPP_ENABLED=false`, or the runtime setting that overrides it,
//!    refuses every send);
//! 2. idempotency, when the caller gave a key: one call at a time per key, the first answer
//!    replayed, a different request with the same key refused;
//! 3. pacing: the message waits for its slot within Meta's limits (rate, priority, pair interval,
//!    daily limit), or is refused when the slot does not fit its deadline;
//! 4. the guard (a batch item is marked as being sent: from here on it is never sent again);
//! 5. the send through the driver (Meta, or the `log` driver), with its retries; when Meta still
//!    answers with one of its rate limits, pacing learns from it and the message goes back to
//!    step 3 (within the deadline and `KABAR_META_MAX_ATTEMPTS`);
//! 6. the message record, written once Meta has accepted the message, so that its delivery
//!    statuses from the webhook have something to attach to.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use super::{
    error::Error,
    pacing::{Pacer, Priority},
    ports::{Idempotency, IdempotencyStore, MessageStore},
    settings::LiveSettings,
    status::MessageRecord,
    tally::{Outcome, SendTally},
};
use crate::{
    store::{idempotency_key, now_ms},
    templates::Category,
    whatsapp::{Driver, OutboundTemplate, SendError},
};

/// How long an idempotency key remembers its answer.
pub const IDEMPOTENCY_KEEP: Duration = Duration::from_secs(24 * 3600);

/// A message ready to go, with what kabar records about it.
pub struct Outgoing {
    pub message: OutboundTemplate,
    /// Registry key of the template.
    pub template_key: String,
    pub category: Category,
    /// The caller's own id (an invoice number); empty for OTP codes.
    pub reference: String,
    /// The caller's idempotency key, already checked.
    pub idempotency_key: Option<String>,
    /// Its place in the queue when sends must wait for Meta's limits.
    pub priority: Priority,
    /// The batch run it belongs to, as the store knows it ([`BatchId::stored`]: `caller/id` with
    /// keys); empty for single calls.
    ///
    /// [`BatchId::stored`]: super::batch::BatchId::stored
    pub batch_id: String,
}

/// A last check right before a message goes to Meta, after its pacing slot: a batch item is
/// marked as being sent here, so that a replica that dies from now on leaves it `unknown`
/// instead of sending it twice.
#[async_trait::async_trait]
pub trait SendGuard: Send + Sync {
    /// An error stops the send; nothing has gone out.
    async fn before_send(&self) -> Result<(), Error>;
}

/// No check.
pub struct Unguarded;

#[async_trait::async_trait]
impl SendGuard for Unguarded {
    async fn before_send(&self) -> Result<(), Error> {
        Ok(())
    }
}

/// Meta accepted the message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accepted {
    pub message_id: String,
    pub wa_id: String,
    /// The recipient, E.164.
    pub phone: String,
}

pub struct Outbox {
    driver: Driver,
    /// The environment with the runtime settings on top: the switch here, the template names
    /// and languages for whoever prepares a message.
    settings: Arc<LiveSettings>,
    idempotency: Arc<dyn IdempotencyStore>,
    records: Arc<dyn MessageStore>,
    pacer: Arc<Pacer>,
    /// How long a key stays locked by a call in progress: longer than the longest send.
    idempotency_lock: Duration,
    retention: Duration,
    /// Sends by template and outcome.
    tally: Arc<SendTally>,
}

impl Outbox {
    pub fn new(
        driver: Driver,
        enabled: bool,
        idempotency: Arc<dyn IdempotencyStore>,
        records: Arc<dyn MessageStore>,
        pacer: Arc<Pacer>,
        retention: Duration,
    ) -> Self {
        Outbox {
            idempotency_lock: driver.longest_send() + Duration::from_secs(30),
            driver,
            settings: Arc::new(LiveSettings::new(enabled)),
            idempotency,
            records,
            pacer,
            retention,
            tally: Arc::new(SendTally::default()),
        }
    }

    /// Sends so far by template and outcome (for the metrics).
    pub fn tally(&self) -> &Arc<SendTally> {
        &self.tally
    }

    /// Whether WhatsApp sending is on now (`WHATSAPP_ENABLED` or its runtime setting).
    pub fn enabled(&self) -> bool {
        self.settings.whatsapp_enabled()
    }

    /// The settings in force, shared with whoever follows and changes them (`enabled` given to
    /// [`Outbox::new`] is the environment's switch beneath them).
    pub fn settings(&self) -> &Arc<LiveSettings> {
        &self.settings
    }

    /// Sends one message through the whole pipeline, never past `deadline`.
    pub async fn send(&self, out: &Outgoing, deadline: Option<Instant>) -> Result<Accepted, Error> {
        self.send_guarded(out, deadline, &Unguarded).await
    }

    /// [`Outbox::send`], with `guard` asked right before the message goes to Meta.
    pub async fn send_guarded(
        &self,
        out: &Outgoing,
        deadline: Option<Instant>,
        guard: &dyn SendGuard,
    ) -> Result<Accepted, Error> {
        if !self.enabled() {
            return Err(Error::WhatsAppDisabled);
        }
        match &out.idempotency_key {
            None => self.deliver(out, deadline, guard).await,
            Some(key) => self.deliver_once(key, out, deadline, guard).await,
        }
    }

    /// Sends with an idempotency key: at most one call at a time, the first answer replayed.
    async fn deliver_once(
        &self,
        key: &str,
        out: &Outgoing,
        deadline: Option<Instant>,
        guard: &dyn SendGuard,
    ) -> Result<Accepted, Error> {
        let store_key = idempotency_key(key);
        let digest = request_digest(out);
        let mut random = [0u8; 16];
        getrandom::fill(&mut random).expect("the OS random number generator is available");
        let token = hex::encode(random);
        match self
            .idempotency
            .begin(&store_key, &digest, &token, self.idempotency_lock)
            .await?
        {
            Idempotency::Done(bytes) => {
                return serde_json::from_slice(&bytes).map_err(|_| {
                    Error::StoreUnavailable("stored idempotent answer is unreadable".into())
                });
            }
            Idempotency::InFlight => return Err(Error::IdempotencyInFlight),
            Idempotency::Reused => return Err(Error::IdempotencyKeyReused),
            Idempotency::Started => {}
        }
        match self.deliver(out, deadline, guard).await {
            Ok(accepted) => {
                let answer =
                    serde_json::to_vec(&accepted).expect("an answer of strings always serialises");
                if let Err(e) = self
                    .idempotency
                    .finish(&store_key, &digest, &token, &answer, IDEMPOTENCY_KEEP)
                    .await
                {
                    tracing::warn!(error = %e, "could not store the answer for an idempotency key");
                }
                Ok(accepted)
            }
            Err(e) if e.may_have_been_delivered() => {
                // The message may have gone out: the key stays taken until its lock expires, so
                // a retry with it cannot send a second copy right away.
                tracing::warn!(
                    "send with an idempotency key ended without a usable answer from Meta; \
                     the key stays locked"
                );
                Err(e)
            }
            Err(e) => {
                // Nothing was sent: the caller may retry with the same key.
                if let Err(e) = self.idempotency.abort(&store_key, &digest, &token).await {
                    tracing::warn!(error = %e, "could not release an idempotency key");
                }
                Err(e)
            }
        }
    }

    /// Pacing and the send, then the record; counted by template and outcome.
    async fn deliver(
        &self,
        out: &Outgoing,
        deadline: Option<Instant>,
        guard: &dyn SendGuard,
    ) -> Result<Accepted, Error> {
        let result = self.deliver_uncounted(out, deadline, guard).await;
        self.tally.record(&out.template_key, Outcome::of(&result));
        result
    }

    async fn deliver_uncounted(
        &self,
        out: &Outgoing,
        deadline: Option<Instant>,
        guard: &dyn SendGuard,
    ) -> Result<Accepted, Error> {
        let phone = out.message.to.e164();
        self.pacer.admit(phone, out.priority, deadline).await?;
        guard.before_send().await?;
        // One budget of requests for the message, shared by the driver's own retries and the
        // retries through pacing.
        let mut attempts = self.driver.max_attempts();
        let sent = loop {
            match self
                .driver
                .send(&out.message, deadline, &mut attempts)
                .await
            {
                Err(SendError::Meta(failure)) => {
                    // Meta throttled despite pacing (another sender on the number, a lower
                    // limit than configured): pacing learns from every such answer, and the
                    // slowed-down schedule decides when to retry. When no slot fits the
                    // deadline, Meta's own answer is the more useful one.
                    let retry = self.pacer.meta_refused(&failure, phone).await;
                    if !retry
                        || attempts == 0
                        || self
                            .pacer
                            .admit(phone, out.priority, deadline)
                            .await
                            .is_err()
                    {
                        return Err(SendError::Meta(failure).into());
                    }
                }
                other => break other?,
            }
        };
        let accepted = Accepted {
            message_id: sent.message_id,
            wa_id: sent.wa_id,
            phone: out.message.to.e164().to_owned(),
        };
        let mut record = MessageRecord::accepted(
            accepted.message_id.clone(),
            accepted.phone.clone(),
            out.template_key.clone(),
            out.reference.clone(),
            category_name(out.category).to_owned(),
            now_ms(),
        );
        record.batch_id.clone_from(&out.batch_id);
        // The message has gone out: a record that cannot be written costs its statuses (they
        // are acknowledged as unknown), never the caller's answer. A slow store must not hold
        // the answer past the deadline either: the write then finishes on its own.
        let records = self.records.clone();
        let retention = self.retention;
        let mut write = tokio::spawn(async move {
            if let Err(e) = records.put_record(&record, retention).await {
                tracing::warn!(
                    error = %e,
                    message_id = %record.message_id,
                    "could not store the message record; its delivery statuses will not be tracked"
                );
            }
        });
        if let Some(deadline) = deadline {
            let _ = tokio::time::timeout_at(deadline.into(), &mut write).await;
        } else {
            let _ = write.await;
        }
        Ok(accepted)
    }
}

/// Meta's spelling of a category.
pub fn category_name(category: Category) -> &'static str {
    match category {
        Category::Utility => "UTILITY",
        Category::Authentication => "AUTHENTICATION",
        Category::Marketing => "MARKETING",
    }
}

/// What makes two sends the same request, as 64 hex characters: the registry key, the normalised
/// recipient, the language, every parameter value in order, and the reference. Each part is
/// length-prefixed, so that no two different requests share a digest by shifting text from one
/// part to the next.
pub fn request_digest(out: &Outgoing) -> String {
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    let mut part = |bytes: &[u8]| {
        hash.update((bytes.len() as u64).to_be_bytes());
        hash.update(bytes);
    };
    part(out.template_key.as_bytes());
    part(out.message.to.e164().as_bytes());
    part(out.message.language.as_bytes());
    part(out.reference.as_bytes());
    for value in &out.message.body_params {
        part(value.as_bytes());
    }
    hex::encode(hash.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outgoing(reference: &str, params: &[&str]) -> Outgoing {
        Outgoing {
            message: OutboundTemplate {
                to: crate::phone::normalize("081234567890").unwrap(),
                template: "invoice".into(),
                language: "id".into(),
                body_params: params.iter().map(|p| (*p).to_owned()).collect(),
                button_param: None,
                sensitive: false,
            },
            template_key: "invoice_notification".into(),
            category: Category::Utility,
            reference: reference.into(),
            idempotency_key: None,
            priority: Priority::Single,
            batch_id: String::new(),
        }
    }

    #[test]
    fn the_digest_tells_requests_apart_and_is_stable() {
        let a = request_digest(&outgoing("INV-1", &["ab", "c"]));
        assert_eq!(a.len(), 64);
        assert_eq!(a, request_digest(&outgoing("INV-1", &["ab", "c"])));
        assert_ne!(a, request_digest(&outgoing("INV-1", &["a", "bc"])));
        assert_ne!(a, request_digest(&outgoing("INV-2", &["ab", "c"])));
        assert_ne!(a, request_digest(&outgoing("INV-1ab", &["c"])));
    }
}
