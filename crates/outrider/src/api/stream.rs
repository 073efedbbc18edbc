//! Live events over server-sent events: `GET .../events` with
//! `Accept: text/event-stream`.
//!
//! Each event is sent with `id:` = its sequence number, `event:` = its type
//! and `data:` = the same JSON object the paged endpoint returns. The stream
//! ends after `session_end`, at once when a finished session has no events
//! after the cursor, and when the server shuts down. A client that
//! reconnects with `Last-Event-ID` resumes after that event.

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures_util::stream::{self, Stream};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Duration;
use tokio::sync::watch;

use super::sessions::event_json;
use super::AppState;
use crate::domain::{Event, EventKind};
use crate::store::DynStore;

/// How often the store is asked for new events while none arrive.
const POLL: Duration = Duration::from_millis(250);

/// Events read from the store per query.
const READ_AHEAD: u32 = 100;

struct Cursor {
    store: DynStore,
    org_id: String,
    session_id: String,
    after: i64,
    pending: VecDeque<Event>,
    ended: bool,
    stopping: watch::Receiver<bool>,
}

/// The live stream of a session's events after `after`.
pub fn events(
    state: &AppState,
    org_id: String,
    session_id: String,
    after: i64,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let cursor = Cursor {
        store: state.store.clone(),
        org_id,
        session_id,
        after,
        pending: VecDeque::new(),
        ended: false,
        stopping: state.stopping.clone(),
    };
    let stream = stream::unfold(cursor, |mut cursor| async move {
        let event = cursor.next().await?;
        Some((Ok(sse_event(&event)), cursor))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

impl Cursor {
    /// The next event, waiting for it if need be; `None` after `session_end`,
    /// when nothing more can come, at shutdown, or when the store fails.
    async fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                self.after = event.seq;
                self.ended = event.kind == EventKind::SessionEnd;
                return Some(event);
            }
            if self.ended || *self.stopping.borrow() {
                return None;
            }
            match self.read().await {
                Ok(true) => {}
                Ok(false) => {
                    tokio::select! {
                        () = tokio::time::sleep(POLL) => {}
                        Ok(()) = self.stopping.changed() => return None,
                    }
                }
                Err(error) => {
                    tracing::warn!(error = %error, "event stream stopped");
                    return None;
                }
            }
        }
    }

    /// Reads the next events into `pending`; `Ok(false)` when there are none
    /// yet. A session's last event commits with its terminal status, so a
    /// finished session with nothing after the cursor has nothing to come.
    async fn read(&mut self) -> crate::store::Result<bool> {
        let events = self
            .store
            .events(&self.session_id, self.after, READ_AHEAD)
            .await?;
        if !events.is_empty() {
            self.pending.extend(events);
            return Ok(true);
        }
        let finished = self
            .store
            .session(&self.org_id, &self.session_id)
            .await?
            .is_none_or(|session| session.status.is_terminal());
        if finished {
            // Read once more: the session may have ended since the first read.
            let events = self
                .store
                .events(&self.session_id, self.after, READ_AHEAD)
                .await?;
            self.ended = events.is_empty();
            self.pending.extend(events);
            return Ok(true);
        }
        Ok(false)
    }
}

fn sse_event(event: &Event) -> SseEvent {
    SseEvent::default()
        .id(event.seq.to_string())
        .event(event.kind.as_str())
        .data(event_json(event).to_string())
}
