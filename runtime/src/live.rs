//! Live streams: the feed from a cursor as a `Stream`, catching up, then following new commits.

use std::collections::VecDeque;
use std::time::Duration;

use futures_core::stream::BoxStream;

use crate::error::Result;
use crate::event::{FeedCursor, RecordedEvent};
use crate::filter::Filter;
use crate::store::{HELD_BACK_FIRST_PAUSE, Store};

/// Events read per page while a live stream catches up.
const PAGE: usize = 256;

struct Follow {
    store: Store,
    filter: Filter,
    cursor: FeedCursor,
    buffer: VecDeque<RecordedEvent>,
    failed: bool,
}

impl Follow {
    /// The next event, waiting for a commit when the stream is caught up.
    async fn next(&mut self) -> Result<RecordedEvent> {
        let poll = self.store.inner.options.poll_interval;
        let mut held_pause = HELD_BACK_FIRST_PAUSE.min(poll);
        loop {
            if let Some(event) = self.buffer.pop_front() {
                return Ok(event);
            }
            let since = self.store.inner.backend.changes();
            let page = self
                .store
                .read_feed_matching(self.cursor, PAGE, &self.filter)
                .await?;
            self.cursor = page.scanned;
            if !page.is_empty() {
                self.buffer.extend(page.events);
                continue;
            }
            let wait: Duration = if page.held_back.is_some() {
                let pause = held_pause;
                held_pause = held_pause.saturating_mul(2).min(poll);
                pause
            } else {
                poll
            };
            self.store.inner.backend.wait_for_change(since, wait).await;
        }
    }
}

impl Store {
    /// The events after `after` that pass `filter`, as a stream that never ends: it reads what
    /// is stored, then yields each new event as it is committed, in feed order, each once.
    /// Nothing is stored: keep the `cursor` of the last event handled to start again from
    /// there (for a position kept in the store, with retries and sharing between processes,
    /// use a durable subscription).
    ///
    /// It wakes as [`wait_for_events`](Store::wait_for_events) does (at once for commits of
    /// this process, by `LISTEN`/`NOTIFY` or polling for others). A read that fails ends the
    /// stream with that error.
    ///
    /// ```
    /// # use annals::prelude::*;
    /// # use annals::Filter;
    /// use futures_util::StreamExt;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), annals::Error> {
    /// # let store = Store::open("memory:").await?;
    /// let mut events = store.follow(FeedCursor::START, Filter::all());
    /// # let _ = &mut events;
    /// # if false {
    /// while let Some(event) = events.next().await {
    ///     let event = event?;
    ///     println!("{} {}", event.position(), event.event_type);
    /// }
    /// # }
    /// # Ok(()) }
    /// ```
    pub fn follow(
        &self,
        after: FeedCursor,
        filter: Filter,
    ) -> BoxStream<'static, Result<RecordedEvent>> {
        let follow = Follow {
            store: self.clone(),
            filter,
            cursor: after,
            buffer: VecDeque::new(),
            failed: false,
        };
        Box::pin(futures_util::stream::unfold(
            follow,
            |mut follow| async move {
                if follow.failed {
                    return None;
                }
                let next = follow.next().await;
                follow.failed = next.is_err();
                Some((next, follow))
            },
        ))
    }
}
