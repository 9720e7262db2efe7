//! Reading events back: an aggregate's history and the global feed.
//!
//! The feed is ordered by `(tx_id, position)` and read only below the oldest transaction still
//! running (`pg_snapshot_xmin`), so an event whose transaction commits late is never skipped.
//! Events committed above that horizon are held back: a read never waits for them, it says who
//! holds them back (see `render::feed_sql` for the horizon), and a hold-back that lasts is
//! logged.

use std::time::Duration;

use sqlx::postgres::{PgConnection, PgRow};

use super::{PostgresBackend, get, no_statement, query};
use crate::aggregate::AggregateId;
use crate::error::{Error, Result};
use crate::event::{FeedCursor, RecordedEvent};
use crate::feed::{FeedPage, HeldBack};
use crate::filter::Filter;
use crate::store::sql::backend_error;
use crate::store::sql::records::{RecordRow, epoch, records_need_refresh};
use crate::store::sql::types::TypeKind;
use crate::store::{StreamRange, to_i64, to_u64};

/// The shortest time between two warnings of a long hold-back from one store.
const WARN_EVERY: Duration = Duration::from_secs(60);

impl PostgresBackend {
    /// The events of one aggregate in `range`.
    pub(super) async fn stream_records(
        &self,
        id: AggregateId,
        range: StreamRange,
    ) -> Result<Vec<RecordedEvent>> {
        let mut conn = self.warm.checkout(&self.pool).await?;
        let records = self.stream_records_on(&mut conn, id, range).await?;
        conn.done();
        Ok(records)
    }

    /// [`stream_records`](PostgresBackend::stream_records) over `conn`.
    pub(crate) async fn stream_records_on(
        &self,
        conn: &mut PgConnection,
        id: AggregateId,
        range: StreamRange,
    ) -> Result<Vec<RecordedEvent>> {
        let sql = if range.backward {
            &self.sql.read_stream_backward
        } else {
            &self.sql.read_stream
        };
        let (from, to, limit) = range.to_sql();
        let rows = query(sql)
            .bind(*id.as_uuid())
            .bind(from)
            .bind(to)
            .bind(limit)
            .fetch_all(&mut *conn)
            .await
            .map_err(backend_error)?;
        self.records(conn, &rows).await
    }

    /// Where the events with `ids` are stored, read over `conn`: `(event id, aggregate,
    /// version)` for each one found.
    pub(crate) async fn find_events_on(
        &self,
        conn: &mut PgConnection,
        ids: &[uuid::Uuid],
    ) -> Result<Vec<(uuid::Uuid, AggregateId, u64)>> {
        let rows = query(&self.sql.find_events)
            .bind(ids)
            .fetch_all(&mut *conn)
            .await
            .map_err(backend_error)?;
        rows.iter()
            .map(|row| {
                let event: uuid::Uuid = get(row, 0)?;
                let aggregate: uuid::Uuid = get(row, 1)?;
                let version: i64 = get(row, 2)?;
                Ok((event, aggregate.into(), to_u64(version, "event version")?))
            })
            .collect()
    }

    /// Up to `limit` events of the feed after `after`, and who holds back the events after
    /// them, if anyone does. One statement; it never waits.
    pub(super) async fn feed(&self, after: FeedCursor, limit: usize) -> Result<FeedPage> {
        self.feed_page(after, limit, None).await
    }

    /// [`feed`](Self::feed) of the events that pass `filter`; the page says how far it looked.
    pub(super) async fn feed_matching(
        &self,
        after: FeedCursor,
        limit: usize,
        filter: &Filter,
    ) -> Result<FeedPage> {
        filter.check()?;
        self.feed_page(after, limit, Some(filter)).await
    }

    async fn feed_page(
        &self,
        after: FeedCursor,
        limit: usize,
        filter: Option<&Filter>,
    ) -> Result<FeedPage> {
        let sql = match filter {
            None => &self.sql.read_feed,
            Some(filter) => self
                .sql
                .read_feed_matching
                .get(filter.shape().index())
                .ok_or_else(no_statement)?,
        };
        let mut q = query(sql)
            .bind(i32::try_from(after.epoch).map_err(|_| cursor_out_of_range(after))?)
            .bind(to_i64(after.tx, "feed cursor transaction")?)
            .bind(to_i64(after.position, "feed cursor position")?)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX));
        if let Some(filter) = filter {
            if !filter.event_types().is_empty() {
                q = q.bind(filter.event_types().to_vec());
            }
            if !filter.aggregate_types().is_empty() {
                q = q.bind(filter.aggregate_types().to_vec());
            }
            if let Some(id) = filter.aggregate_id() {
                q = q.bind(*id.as_uuid());
            }
            if let Some(key) = filter.aggregate_key() {
                q = q.bind(key.to_owned());
            }
            if let Some((partition, partitions)) = filter.partition() {
                q = q
                    .bind(i32::try_from(partition).unwrap_or(i32::MAX))
                    .bind(i32::try_from(partitions).unwrap_or(i32::MAX));
            }
        }
        let mut conn = self.warm.checkout(&self.pool).await?;
        let mut rows = q.fetch_all(&mut *conn).await.map_err(backend_error)?;
        // The last row is the status row (see `render::feed_sql`).
        let status = match rows.pop() {
            Some(row) if get::<Option<uuid::Uuid>>(&row, 2)?.is_none() => row,
            _ => {
                return Err(Error::Corrupt(
                    "the feed statement returned no status row".to_owned(),
                ));
            }
        };
        if get::<i32>(&status, 6)? != 1 {
            return Err(Error::CursorNotFound { cursor: after });
        }
        let held_back = held_back_from(&status)?;
        let events = self.records(&mut conn, &rows).await?;
        conn.done();
        if let Some(held) = &held_back {
            self.warn_if_held_long(held);
        }
        let page = FeedPage::new(events, held_back, after);
        if filter.is_none() || page.len() == limit {
            return Ok(page);
        }
        // Not full: every event the read could see was looked at.
        match (
            get::<Option<i32>>(&status, 13)?,
            get::<Option<i64>>(&status, 14)?,
            get::<Option<i64>>(&status, 15)?,
        ) {
            (Some(epoch_id), Some(tx), Some(position)) => Ok(page.scanned_to(FeedCursor {
                epoch: epoch(i64::from(epoch_id))?,
                tx: to_u64(tx, "transaction id")?,
                position: to_u64(position, "event position")?,
            })),
            _ => Ok(page),
        }
    }

    /// Logs a hold-back older than [`StoreOptions::hold_back_warning`], at most once a minute.
    ///
    /// [`StoreOptions::hold_back_warning`]: crate::StoreOptions::hold_back_warning
    fn warn_if_held_long(&self, held: &HeldBack) {
        let threshold = self.options.hold_back_warning;
        if held.age.is_none_or(|age| age < threshold) {
            return;
        }
        let now = std::time::Instant::now();
        let mut last = self
            .last_hold_back_warning
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if last.is_some_and(|at| now.saturating_duration_since(at) < WARN_EVERY) {
            return;
        }
        *last = Some(now);
        tracing::warn!(
            schema = %self.names.schema,
            prefix = %self.names.prefix,
            xid = held.xid,
            pid = held.pid,
            database = held.database.as_deref(),
            age_s = held.age.map(|a| a.as_secs()),
            prepared = held.prepared,
            "the feed is {held}: events committed after it began stay unread until it ends \
             (idle_in_transaction_session_timeout ends forgotten sessions)"
        );
    }

    /// Turns rows of [`RECORD_COLUMNS`](super::render::RECORD_COLUMNS) into records, re-reading
    /// a type table over `conn` when a row names a type this process has not seen.
    pub(super) async fn records(
        &self,
        conn: &mut PgConnection,
        rows: &[PgRow],
    ) -> Result<Vec<RecordedEvent>> {
        let rows = rows.iter().map(record_row).collect::<Result<Vec<_>>>()?;
        let mut aggregates = self.types.get(TypeKind::Aggregate);
        let mut events = self.types.get(TypeKind::Event);
        let (stale_aggregates, stale_events) = records_need_refresh(&rows, &aggregates, &events);
        if stale_aggregates {
            aggregates = self.refresh_types(conn, TypeKind::Aggregate).await?;
        }
        if stale_events {
            events = self.refresh_types(conn, TypeKind::Event).await?;
        }
        rows.into_iter()
            .map(|row| row.into_record(&aggregates, &events))
            .collect()
    }
}

/// The columns of [`RECORD_COLUMNS`](super::render::RECORD_COLUMNS), in their order.
fn record_row(row: &PgRow) -> Result<RecordRow<'_>> {
    Ok(RecordRow {
        tx: get(row, 0)?,
        position: get(row, 1)?,
        aggregate_id: get(row, 2)?,
        aggregate_type_id: i64::from(get::<i32>(row, 3)?),
        version: get(row, 4)?,
        event_type_id: i64::from(get::<i32>(row, 5)?),
        schema_version: i64::from(get::<i32>(row, 6)?),
        payload: get(row, 7)?,
        metadata: get(row, 8)?,
        recorded_at: get(row, 9)?,
        event_id: get(row, 10)?,
        epoch: get(row, 11)?,
        key: get(row, 12)?,
    })
}

/// What the status row of the feed statement says is held back, if anything (see
/// `render::feed_sql` for its columns).
fn held_back_from(row: &PgRow) -> Result<Option<HeldBack>> {
    let (Some(tx), Some(position)) = (get::<Option<i64>>(row, 0)?, get::<Option<i64>>(row, 1)?)
    else {
        return Ok(None);
    };
    let database: Option<Vec<u8>> = get(row, 7)?;
    let age: Option<i64> = get(row, 9)?;
    Ok(Some(HeldBack {
        xid: to_u64(get(row, 4)?, "transaction id")?,
        pid: get(row, 3)?,
        database: database.map(|d| String::from_utf8_lossy(&d).into_owned()),
        age: age.map(|micros| Duration::from_micros(micros.unsigned_abs())),
        prepared: get::<Option<i32>>(row, 5)? == Some(1),
        newest_waiting: FeedCursor {
            epoch: epoch(get(row, 11)?)?,
            tx: to_u64(tx, "transaction id")?,
            position: to_u64(position, "event position")?,
        },
    }))
}

fn cursor_out_of_range(cursor: FeedCursor) -> Error {
    Error::Config(format!("feed cursor {cursor:?} has an epoch out of range"))
}
