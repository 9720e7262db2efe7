//! Loads: the rows of aggregates, and the one statement that reads an aggregate with its newest
//! usable snapshot and the events after it (see `render::load_sql`). Each load holds one
//! connection, and re-reads the type tables over it when a row names a type this process has not
//! seen.

use sqlx::postgres::{PgConnection, PgRow};

use super::{PostgresBackend, get, no_statement, query, to_i32};
use crate::error::{Error, Result};
use crate::store::sql::backend_error;
use crate::store::sql::records::{StreamRow, aggregate_row, snapshot, stream_events};
use crate::store::sql::types::TypeKind;
use crate::store::{AggregateRow, LoadRequest, LoadedStream, Locate, to_i64};

impl PostgresBackend {
    /// The row of one aggregate.
    pub(super) async fn locate_row(&self, locate: Locate<'_>) -> Result<Option<AggregateRow>> {
        let mut conn = self.warm.checkout(&self.pool).await?;
        let row = self.locate_on(&mut conn, locate).await?;
        conn.done();
        Ok(row)
    }

    /// The row of one aggregate, read over `conn`.
    pub(crate) async fn locate_on(
        &self,
        conn: &mut PgConnection,
        locate: Locate<'_>,
    ) -> Result<Option<AggregateRow>> {
        let row = match locate {
            Locate::Id(id) => query(&self.sql.locate_by_id)
                .bind(*id.as_uuid())
                .fetch_optional(&mut *conn)
                .await
                .map_err(backend_error)?,
            Locate::Key {
                aggregate_type,
                key,
            } => {
                let Some(type_id) = self
                    .known_type_id(conn, TypeKind::Aggregate, aggregate_type)
                    .await?
                else {
                    // A type never written has no aggregates.
                    return Ok(None);
                };
                query(&self.sql.locate_by_key)
                    .bind(type_id)
                    .bind(key)
                    .fetch_optional(&mut *conn)
                    .await
                    .map_err(backend_error)?
            }
        };
        match row {
            Some(row) => self.header(conn, &row, [0, 1, 2, 3, 4]).await.map(Some),
            None => Ok(None),
        }
    }

    /// An aggregate's row from the columns at `at`: id, type id, key, version, erased.
    async fn header(
        &self,
        conn: &mut PgConnection,
        row: &PgRow,
        at: [usize; 5],
    ) -> Result<AggregateRow> {
        let [id, type_id, key, version, erased] = at;
        let type_id = i64::from(get::<i32>(row, type_id)?);
        let types = self
            .types_with_ids(conn, TypeKind::Aggregate, std::iter::once(type_id))
            .await?;
        aggregate_row(
            get(row, id)?,
            type_id,
            get(row, key)?,
            get(row, version)?,
            get(row, erased)?,
            &types,
        )
    }

    /// The rebuild material of one aggregate, in one statement on a connection of the pool.
    pub(super) async fn load_stream(
        &self,
        request: LoadRequest<'_>,
    ) -> Result<Option<LoadedStream>> {
        let mut conn = self.warm.checkout(&self.pool).await?;
        let loaded = self.load_stream_on(&mut conn, request).await?;
        conn.done();
        Ok(loaded)
    }

    /// The rebuild material of one aggregate, in one statement over `conn`.
    pub(crate) async fn load_stream_on(
        &self,
        conn: &mut PgConnection,
        request: LoadRequest<'_>,
    ) -> Result<Option<LoadedStream>> {
        let snapshot_version = request
            .snapshot_version
            .map(|v| to_i32(v, "snapshot version"))
            .transpose()?;
        let up_to = request
            .up_to
            .map(|v| to_i64(v, "aggregate version"))
            .transpose()?;
        let after = request
            .after
            .map(|v| to_i64(v, "aggregate version"))
            .transpose()?;
        // A load after a cached version reads no snapshot: only the events above that version.
        let snapshot_version = snapshot_version.filter(|_| after.is_none());
        let with_snapshots = usize::from(snapshot_version.is_some());
        let rows = match request.locate {
            // After a cached version, to the newest: the lean statement (`load_after_sql`).
            Locate::Id(id) if up_to.is_none() && after.is_some() => query(&self.sql.load_after)
                .bind(*id.as_uuid())
                .bind(after)
                .fetch_all(&mut *conn)
                .await
                .map_err(backend_error)?,
            Locate::Id(id) => {
                let sql = self.sql.load.get(with_snapshots).ok_or_else(no_statement)?;
                let mut q = query(sql).bind(*id.as_uuid()).bind(up_to);
                q = match snapshot_version {
                    Some(shape) => q.bind(shape),
                    None => q.bind(after.unwrap_or(0)),
                };
                q.fetch_all(&mut *conn).await.map_err(backend_error)?
            }
            Locate::Key {
                aggregate_type,
                key,
            } => {
                let Some(type_id) = self
                    .known_type_id(conn, TypeKind::Aggregate, aggregate_type)
                    .await?
                else {
                    return Ok(None);
                };
                let sql = self
                    .sql
                    .load
                    .get(2 + with_snapshots)
                    .ok_or_else(no_statement)?;
                let mut q = query(sql).bind(type_id).bind(key).bind(up_to);
                q = match snapshot_version {
                    Some(shape) => q.bind(shape),
                    None => q.bind(after.unwrap_or(0)),
                };
                q.fetch_all(&mut *conn).await.map_err(backend_error)?
            }
        };
        // The header row (no position) holds the aggregate and its snapshot; the others are
        // events.
        let mut header = None;
        let mut events = Vec::with_capacity(rows.len().saturating_sub(1));
        let mut payloads = Vec::new();
        // The distinct type ids, to check against the cache once each: runs of one type are
        // common.
        let mut type_ids: Vec<i64> = Vec::new();
        for row in &rows {
            let Some(position) = get::<Option<i64>>(row, 0)? else {
                header = Some(row);
                continue;
            };
            let event_type_id = i64::from(get::<i32>(row, 2)?);
            if type_ids.last() != Some(&event_type_id) && !type_ids.contains(&event_type_id) {
                type_ids.push(event_type_id);
            }
            let start = payloads.len();
            payloads.extend_from_slice(get::<&[u8]>(row, 4)?);
            events.push(StreamRow {
                version: get(row, 1)?,
                position,
                event_type_id,
                schema_version: get(row, 3)?,
                payload: start..payloads.len(),
            });
        }
        let Some(header) = header else {
            return if events.is_empty() {
                Ok(None)
            } else {
                Err(Error::Corrupt(
                    "events were read for an aggregate without its row".to_owned(),
                ))
            };
        };
        let event_types = self
            .types_with_ids(conn, TypeKind::Event, type_ids.into_iter())
            .await?;
        let events = stream_events(events, &event_types)?;
        let row = self.header(conn, header, [6, 2, 5, 1, 7]).await?;
        let snapshot = match get::<Option<i64>>(header, 3)? {
            Some(version) => Some(snapshot(version, get(header, 4)?)?),
            None => None,
        };
        Ok(Some(LoadedStream {
            row,
            snapshot,
            events,
            payloads,
        }))
    }
}
