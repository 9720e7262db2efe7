//! Reading events back: an aggregate's history and the global feed.
//!
//! The feed is ordered by `(tx_id, position)` and read only below the oldest transaction still
//! running (`pg_snapshot_xmin`), so an event whose transaction commits late is never skipped.
//! Events committed above that horizon are held back; the hold-back policy is here: a read that
//! comes out short because of them waits a little (at most [`FEED_SETTLE`]) for the transaction
//! holding them back to end.

use std::time::Duration;

use sqlx::postgres::{PgConnection, PgRow};

use super::{PostgresBackend, get, query};
use crate::aggregate::AggregateId;
use crate::error::Result;
use crate::event::{FeedCursor, RecordedEvent};
use crate::store::sql::backend_error;
use crate::store::sql::records::{RecordRow, records_need_refresh};
use crate::store::sql::types::TypeKind;
use crate::store::{to_i64, to_u64};

/// How long a feed read waits, at most, for transactions still running below events that are
/// already committed, before it returns a shorter page.
const FEED_SETTLE: Duration = Duration::from_secs(1);

impl PostgresBackend {
    /// Every event of one aggregate after `after_version`, in version order.
    pub(super) async fn stream_records(
        &self,
        id: AggregateId,
        after_version: u64,
    ) -> Result<Vec<RecordedEvent>> {
        let mut conn = self.pool.acquire().await.map_err(backend_error)?;
        let rows = query(&self.sql.read_stream)
            .bind(*id.as_uuid())
            .bind(to_i64(after_version, "aggregate version")?)
            .fetch_all(&mut *conn)
            .await
            .map_err(backend_error)?;
        self.records(&mut conn, &rows).await
    }

    /// Up to `limit` events of the feed after `after`.
    pub(super) async fn feed(&self, after: FeedCursor, limit: usize) -> Result<Vec<RecordedEvent>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let limit_sql = i64::try_from(limit).unwrap_or(i64::MAX);
        let deadline = tokio::time::Instant::now() + FEED_SETTLE;
        let mut pause = Duration::from_millis(1);
        // Committed events past a transaction that is still running are held back; when a
        // page comes out short because of them, wait a little for that transaction to end
        // (commits take milliseconds), so readers see their own and others' recent commits.
        let mut target = None;
        loop {
            let (page, held) = self.feed_page(after, limit_sql).await?;
            if page.len() >= limit {
                return Ok(page);
            }
            // Wait for the events held back at the first look, not for later ones: under a
            // stream of commits there is always a newer one.
            let Some(wanted) = target.or(held) else {
                return Ok(page);
            };
            let done = held.is_none() || page.last().is_some_and(|e| e.cursor >= wanted);
            if done || tokio::time::Instant::now() >= deadline {
                return Ok(page);
            }
            target = Some(wanted);
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    /// One page of the feed after `after`, and the newest event after it that is committed but
    /// not readable yet (a transaction older than its own is still running).
    async fn feed_page(
        &self,
        after: FeedCursor,
        limit: i64,
    ) -> Result<(Vec<RecordedEvent>, Option<FeedCursor>)> {
        let mut conn = self.pool.acquire().await.map_err(backend_error)?;
        let mut rows = query(&self.sql.read_feed)
            .bind(to_i64(after.tx, "feed cursor transaction")?)
            .bind(to_i64(after.position, "feed cursor position")?)
            .bind(limit)
            .fetch_all(&mut *conn)
            .await
            .map_err(backend_error)?;
        let mut held = None;
        if let Some(last) = rows.last()
            && get::<Option<uuid::Uuid>>(last, 2)?.is_none()
        {
            held = Some(FeedCursor {
                tx: to_u64(get(last, 0)?, "transaction id")?,
                position: to_u64(get(last, 1)?, "event position")?,
            });
            rows.pop();
        }
        Ok((self.records(&mut conn, &rows).await?, held))
    }

    /// Turns rows of [`RECORD_COLUMNS`](super::render::RECORD_COLUMNS) into records, re-reading
    /// a type table over `conn` when a row names a type this process has not seen.
    async fn records(&self, conn: &mut PgConnection, rows: &[PgRow]) -> Result<Vec<RecordedEvent>> {
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
    })
}
