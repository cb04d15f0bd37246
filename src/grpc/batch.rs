//! `kabar.v1.BatchService`: decode, call the batch runs of the domain, encode. Every call names
//! its batch as the caller's own ([`batch_id`]): another caller's batch of the same id is another
//! batch, and is not found.

use std::{sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::{answer, auth::caller_of, call, calls::CallDetail, messages::timestamp};
use crate::{
    domain::batch::{BatchId, BatchView, Batches, Item, rules::BatchState, rules::ItemState},
    notify::NotificationRequest,
    pb::{self, batch, batch_item},
};

pub struct BatchGrpc {
    batches: Arc<Batches>,
    /// Cancelled when kabar stops accepting calls: open progress streams end.
    drain: CancellationToken,
}

impl BatchGrpc {
    pub fn new(batches: Arc<Batches>, drain: CancellationToken) -> Self {
        BatchGrpc { batches, drain }
    }
}

/// How often WatchBatch looks for progress.
const WATCH_POLL: Duration = Duration::from_millis(500);

type BatchStream =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<pb::Batch, Status>> + Send>>;

fn state(s: BatchState) -> i32 {
    (match s {
        BatchState::Open => batch::State::Open,
        BatchState::Running => batch::State::Running,
        BatchState::Done => batch::State::Done,
        BatchState::Cancelled => batch::State::Cancelled,
        BatchState::Paused => batch::State::Paused,
    }) as i32
}

fn item_state(s: ItemState) -> i32 {
    (match s {
        ItemState::Queued => batch_item::State::Queued,
        ItemState::Sending => batch_item::State::Sending,
        ItemState::Unknown => batch_item::State::Unknown,
        ItemState::Accepted => batch_item::State::Accepted,
        ItemState::Delivered => batch_item::State::Delivered,
        ItemState::Read => batch_item::State::Read,
        ItemState::Failed => batch_item::State::Failed,
    }) as i32
}

fn batch_message(view: BatchView) -> pb::Batch {
    let BatchView {
        info,
        eta_seconds,
        held_reason,
    } = view;
    pb::Batch {
        batch_id: info.batch_id,
        state: state(info.state),
        pause_reason: info.pause_reason,
        total: info.counts.total,
        queued: info.counts.queued,
        accepted: info.counts.accepted,
        failed: info.counts.failed,
        unknown: info.counts.unknown,
        delivered: info.counts.delivered,
        read: info.counts.read,
        created_at: timestamp(info.created_at_ms),
        eta_seconds,
        closed: info.closed,
        held_reason,
    }
}

fn item_message(item: Item) -> pb::BatchItem {
    pb::BatchItem {
        reference: item.data.reference,
        phone: item.data.phone,
        message_id: item.message_id,
        state: item_state(item.state),
        error: item.error.map(super::messages::meta_error),
        template: item.data.template,
    }
}

/// The batch a call names: the caller's own (`batch_id` as sent, owned by the caller when kabar
/// checks keys).
fn batch_id<T>(request: &Request<T>, id: &str) -> BatchId {
    BatchId::of(caller_of(request).map(|c| c.name.as_str()), id)
}

/// The call's log line names the batch by the caller's own id; the caller is a field of its own.
fn detail(outcome: &'static str, batch_id: &BatchId) -> CallDetail {
    CallDetail {
        outcome: Some(outcome),
        // Checked: A-Z a-z 0-9 . _ : - only, safe in a log line.
        batch_id: Some(batch_id.own().to_owned()),
        ..CallDetail::default()
    }
}

/// The batch now and on every change, until it is done or cancelled, or kabar drains.
fn watch(batches: Arc<Batches>, batch_id: BatchId, drain: CancellationToken) -> BatchStream {
    let stream = futures_util::stream::unfold(
        (batches, batch_id, drain, None::<BatchView>, false),
        |(batches, batch_id, drain, last, ended)| async move {
            if ended {
                return None;
            }
            loop {
                match batches.get(&batch_id).await {
                    Ok(view) if last.as_ref() != Some(&view) => {
                        let end = view.info.state.is_final();
                        let message = batch_message(view.clone());
                        return Some((Ok(message), (batches, batch_id, drain, Some(view), end)));
                    }
                    Ok(_) => {}
                    Err(e) => {
                        return Some((
                            Err(Status::from(e)),
                            (batches, batch_id, drain, last, true),
                        ));
                    }
                }
                tokio::select! {
                    () = tokio::time::sleep(WATCH_POLL) => {}
                    () = drain.cancelled() => return None,
                }
            }
        },
    );
    Box::pin(stream)
}

#[tonic::async_trait]
impl pb::batch_service_server::BatchService for BatchGrpc {
    type WatchBatchStream = BatchStream;

    async fn submit_batch(
        &self,
        request: Request<pb::SubmitBatchRequest>,
    ) -> Result<Response<pb::Batch>, Status> {
        let id = batch_id(&request, &request.get_ref().batch_id);
        let r = request.into_inner();
        let messages: Vec<NotificationRequest<'_>> = r
            .messages
            .iter()
            .map(|m| NotificationRequest {
                phone: &m.phone,
                template: &m.template,
                params: &m.params,
                positional_params: &m.positional_params,
                language: &m.language,
                reference: &m.reference,
                idempotency_key: &m.idempotency_key,
                // Batch items use no idempotency key (it is refused): the batch is the key.
                caller: "",
            })
            .collect();
        let view = call(self.batches.submit(&id, &messages, r.last)).await?;
        Ok(answer(batch_message(view), detail("submitted", &id)))
    }

    async fn get_batch(
        &self,
        request: Request<pb::GetBatchRequest>,
    ) -> Result<Response<pb::Batch>, Status> {
        let id = batch_id(&request, &request.get_ref().batch_id);
        let view = call(self.batches.get(&id)).await?;
        Ok(answer(batch_message(view), detail("found", &id)))
    }

    async fn watch_batch(
        &self,
        request: Request<pb::GetBatchRequest>,
    ) -> Result<Response<Self::WatchBatchStream>, Status> {
        let id = batch_id(&request, &request.get_ref().batch_id);
        // Unknown or malformed ids are refused before the stream opens.
        call(self.batches.get(&id)).await?;
        let stream = watch(self.batches.clone(), id.clone(), self.drain.clone());
        Ok(answer(stream, detail("watch opened", &id)))
    }

    async fn cancel_batch(
        &self,
        request: Request<pb::GetBatchRequest>,
    ) -> Result<Response<pb::Batch>, Status> {
        let id = batch_id(&request, &request.get_ref().batch_id);
        let view = call(self.batches.cancel(&id)).await?;
        Ok(answer(batch_message(view), detail("cancelled", &id)))
    }

    async fn resume_batch(
        &self,
        request: Request<pb::GetBatchRequest>,
    ) -> Result<Response<pb::Batch>, Status> {
        let id = batch_id(&request, &request.get_ref().batch_id);
        let view = call(self.batches.resume(&id)).await?;
        Ok(answer(batch_message(view), detail("resumed", &id)))
    }

    async fn list_batch_items(
        &self,
        request: Request<pb::ListBatchItemsRequest>,
    ) -> Result<Response<pb::ListBatchItemsResponse>, Status> {
        let id = batch_id(&request, &request.get_ref().batch_id);
        let r = request.into_inner();
        let page = call(
            self.batches
                .list(&id, &r.filter, r.page_size, &r.page_token),
        )
        .await?;
        Ok(answer(
            pb::ListBatchItemsResponse {
                items: page.items.into_iter().map(item_message).collect(),
                next_page_token: page.next_page_token,
            },
            detail("listed", &id),
        ))
    }
}
