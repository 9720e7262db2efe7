//! Pages of the global feed, and what a page says about events it could not return yet.

use std::time::Duration;

use crate::event::{FeedCursor, RecordedEvent};

/// A page of the global feed: the events after the cursor asked for, in commit order, and
/// whether later events are held back.
///
/// It derefs to a slice of its events, so `page.len()`, `page.iter()` and `page.last()` work as
/// on a `Vec`; [`into_events`](FeedPage::into_events) or iterating by value takes them out.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct FeedPage {
    /// The events, each once, in commit order.
    pub events: Vec<RecordedEvent>,
    /// Set when committed events after this page could not be returned yet, because a
    /// transaction that began before they committed is still running (PostgreSQL only; see
    /// [`Store::read_feed`](crate::Store::read_feed)). A short page with this set is not
    /// "caught up": read again once that transaction ends.
    pub held_back: Option<HeldBack>,
    /// How far the read looked: every event after the cursor asked for, up to and including
    /// this one, is in the page or did not match the filter. Read on after it. For an
    /// unfiltered read it is the last event's cursor (or the cursor asked for, on an empty
    /// page); a filtered read that found nothing still moves it past the events it passed over.
    pub scanned: FeedCursor,
}

impl FeedPage {
    pub(crate) fn new(
        events: Vec<RecordedEvent>,
        held_back: Option<HeldBack>,
        after: FeedCursor,
    ) -> FeedPage {
        let scanned = events.last().map_or(after, |e| e.cursor);
        FeedPage {
            events,
            held_back,
            scanned,
        }
    }

    /// A page of a filtered read that looked as far as `scanned`.
    #[cfg_attr(
        not(any(feature = "memory", feature = "sqlite", feature = "postgres")),
        allow(dead_code)
    )]
    pub(crate) fn scanned_to(mut self, scanned: FeedCursor) -> FeedPage {
        self.scanned = self.scanned.max(scanned);
        self
    }

    /// The events, taken out of the page.
    pub fn into_events(self) -> Vec<RecordedEvent> {
        self.events
    }

    /// The cursor of the last event of the page, or `after` when it is empty: where the next
    /// read starts.
    pub fn cursor_or(&self, after: FeedCursor) -> FeedCursor {
        self.events.last().map_or(after, |e| e.cursor)
    }
}

impl std::ops::Deref for FeedPage {
    type Target = [RecordedEvent];

    fn deref(&self) -> &[RecordedEvent] {
        &self.events
    }
}

impl IntoIterator for FeedPage {
    type Item = RecordedEvent;
    type IntoIter = std::vec::IntoIter<RecordedEvent>;

    fn into_iter(self) -> Self::IntoIter {
        self.events.into_iter()
    }
}

impl<'a> IntoIterator for &'a FeedPage {
    type Item = &'a RecordedEvent;
    type IntoIter = std::slice::Iter<'a, RecordedEvent>;

    fn into_iter(self) -> Self::IntoIter {
        self.events.iter()
    }
}

/// Who holds the feed back: the oldest transaction still running that could have written to the
/// store, which committed events after the page wait for (PostgreSQL). Everything but `xid` is
/// read from `pg_stat_activity` or `pg_prepared_xacts`, and is `None` when the transaction ended
/// in between or the server does not show it to this role.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct HeldBack {
    /// The transaction's id (64-bit, as `pg_current_xact_id()` gives it).
    pub xid: u64,
    /// Its server process id (`pg_stat_activity.pid`); `None` for a prepared transaction.
    pub pid: Option<i32>,
    /// The database it runs in.
    pub database: Option<String>,
    /// How long it has been open.
    pub age: Option<Duration>,
    /// True for a prepared (two-phase) transaction, which holds the feed back until it is
    /// committed or rolled back with `COMMIT PREPARED`/`ROLLBACK PREPARED`.
    pub prepared: bool,
    /// The newest event already committed that waits for it.
    pub newest_waiting: FeedCursor,
}

impl std::fmt::Display for HeldBack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.prepared {
            write!(f, "held back by prepared transaction {}", self.xid)?;
        } else {
            write!(f, "held back by transaction {}", self.xid)?;
        }
        if let Some(pid) = self.pid {
            write!(f, " (pid {pid})")?;
        }
        if let Some(database) = &self.database {
            write!(f, " in database {database:?}")?;
        }
        if let Some(age) = self.age {
            write!(f, ", open for {:.1} s", age.as_secs_f64())?;
        }
        Ok(())
    }
}
