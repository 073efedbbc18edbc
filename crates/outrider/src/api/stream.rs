//! Live events over server-sent events: `GET .../events` with
//! `Accept: text/event-stream`.
//!
//! Each event is sent with `id:` = its sequence number, `event:` = its type
//! and `data:` = the same JSON object the paged endpoint returns. The stream
//! ends after `session_end`. A client that reconnects with `Last-Event-ID`
//! resumes after that event.

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures_util::stream::{self, Stream};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Duration;

use super::sessions::event_json;
use crate::domain::{Event, EventKind};
use crate::store::DynStore;

/// How often the store is asked for new events while none arrive.
const POLL: Duration = Duration::from_millis(250);

/// Events read from the store per query.
const READ_AHEAD: u32 = 100;

struct Cursor {
    store: DynStore,
    session_id: String,
    after: i64,
    pending: VecDeque<Event>,
    ended: bool,
}

/// The live stream of a session's events after `after`.
pub fn events(
    store: DynStore,
    session_id: String,
    after: i64,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let cursor = Cursor {
        store,
        session_id,
        after,
        pending: VecDeque::new(),
        ended: false,
    };
    let stream = stream::unfold(cursor, |mut cursor| async move {
        let event = cursor.next().await?;
        Some((Ok(sse_event(&event)), cursor))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

impl Cursor {
    /// The next event, waiting for it if need be; `None` after `session_end`
    /// or when the store fails.
    async fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                self.after = event.seq;
                self.ended = event.kind == EventKind::SessionEnd;
                return Some(event);
            }
            if self.ended {
                return None;
            }
            match self
                .store
                .events(&self.session_id, self.after, READ_AHEAD)
                .await
            {
                Ok(events) if events.is_empty() => tokio::time::sleep(POLL).await,
                Ok(events) => self.pending.extend(events),
                Err(error) => {
                    tracing::warn!(error = %error, "event stream stopped");
                    return None;
                }
            }
        }
    }
}

fn sse_event(event: &Event) -> SseEvent {
    SseEvent::default()
        .id(event.seq.to_string())
        .event(event.kind.as_str())
        .data(event_json(event).to_string())
}
