//! Loading on SQLite: an aggregate's row by id or natural key, its newest usable snapshot and
//! the events after it, read in one call on one reader connection.

use rusqlite::{Connection, OptionalExtension};

use super::Shared;
use super::names::Resolver;
use crate::aggregate::AggregateId;
use crate::error::Result;
use crate::store::sql::backend_error;
use crate::store::sql::records::{self, StreamRow};
use crate::store::sql::types::TypeKind;
use crate::store::{AggregateRow, LoadRequest, LoadedStream, Locate, to_i64};

/// [`Locate`] with owned text, to travel to a reader thread.
#[derive(Debug, Clone)]
pub(super) enum Target {
    Id(AggregateId),
    Key { aggregate_type: String, key: String },
}

impl From<Locate<'_>> for Target {
    fn from(locate: Locate<'_>) -> Self {
        match locate {
            Locate::Id(id) => Target::Id(id),
            Locate::Key {
                aggregate_type,
                key,
            } => Target::Key {
                aggregate_type: aggregate_type.to_owned(),
                key: key.to_owned(),
            },
        }
    }
}

/// [`LoadRequest`] with owned text.
#[derive(Debug, Clone)]
pub(super) struct Request {
    target: Target,
    snapshot_version: Option<u32>,
    up_to: Option<u64>,
    after: Option<u64>,
}

impl From<LoadRequest<'_>> for Request {
    fn from(request: LoadRequest<'_>) -> Self {
        Request {
            target: request.locate.into(),
            snapshot_version: request.snapshot_version,
            up_to: request.up_to,
            after: request.after,
        }
    }
}

/// The row of one aggregate, or `None`.
pub(super) fn locate(
    conn: &Connection,
    shared: &Shared,
    target: &Target,
) -> Result<Option<AggregateRow>> {
    let mut types = Resolver::new(conn, &shared.sql, &shared.types);
    fetch_row(conn, shared, &mut types, target)
}

fn fetch_row(
    conn: &Connection,
    shared: &Shared,
    types: &mut Resolver<'_>,
    target: &Target,
) -> Result<Option<AggregateRow>> {
    let sql = &shared.sql;
    type Columns = (Vec<u8>, i64, Option<String>, i64, bool);
    let read = |row: &rusqlite::Row<'_>| -> rusqlite::Result<Columns> {
        Ok((
            row.get(0)?,
            row.get(1)?,
            row.get(2)?,
            row.get(3)?,
            row.get(4)?,
        ))
    };
    let found = match target {
        Target::Id(id) => conn
            .prepare_cached(&sql.row_by_id)
            .map_err(backend_error)?
            .query_row([id.as_uuid().as_bytes().as_slice()], read)
            .optional(),
        Target::Key {
            aggregate_type,
            key,
        } => {
            // A type never written has no aggregates.
            let Some(type_id) = types.id(TypeKind::Aggregate, aggregate_type)? else {
                return Ok(None);
            };
            conn.prepare_cached(&sql.row_by_key)
                .map_err(backend_error)?
                .query_row((type_id, key.as_str()), read)
                .optional()
        }
    }
    .map_err(backend_error)?;
    let Some((id, type_id, key, version, erased)) = found else {
        return Ok(None);
    };
    let aggregates = types.map_with(TypeKind::Aggregate, [type_id].into_iter())?;
    records::aggregate_row(
        *records::aggregate_id(&id)?.as_uuid(),
        type_id,
        key,
        version,
        erased,
        &aggregates,
    )
    .map(Some)
}

/// The rebuild material of one aggregate: its row, the newest usable snapshot and the events
/// after it, read on one connection in one read transaction, so that events pruned meanwhile
/// cannot leave a gap between the snapshot and the events read.
pub(super) fn load(
    conn: &Connection,
    shared: &Shared,
    request: &Request,
) -> Result<Option<LoadedStream>> {
    let tx = conn.unchecked_transaction().map_err(backend_error)?;
    let loaded = load_in(&tx, shared, request)?;
    tx.commit().map_err(backend_error)?;
    Ok(loaded)
}

fn load_in(conn: &Connection, shared: &Shared, request: &Request) -> Result<Option<LoadedStream>> {
    let sql = &shared.sql;
    let mut types = Resolver::new(conn, sql, &shared.types);
    let Some(row) = fetch_row(conn, shared, &mut types, &request.target)? else {
        return Ok(None);
    };
    let up_to = request.up_to.map_or(row.version, |v| v.min(row.version));
    let id = row.id.as_uuid().as_bytes().as_slice();
    let up_to_i64 = to_i64(up_to, "version")?;
    let shape = request.snapshot_version.filter(|_| request.after.is_none());
    let snapshot = match shape {
        Some(shape) => conn
            .prepare_cached(&sql.snapshot)
            .map_err(backend_error)?
            .query_row((id, i64::from(shape), up_to_i64), |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?))
            })
            .optional()
            .map_err(backend_error)?
            .map(|(version, payload)| records::snapshot(version, payload))
            .transpose()?,
        None => None,
    };
    let from = request
        .after
        .unwrap_or_else(|| snapshot.as_ref().map_or(0, |s| s.version));
    let mut stmt = conn.prepare_cached(&sql.stream).map_err(backend_error)?;
    let mut rows = stmt
        .query((id, to_i64(from, "version")?, up_to_i64))
        .map_err(backend_error)?;
    let expected = usize::try_from(up_to.saturating_sub(from)).unwrap_or(0);
    let mut stream = Vec::with_capacity(expected.min(1 << 16));
    // The distinct type ids, to check against the cache once each: runs of one type are common.
    let mut type_ids: Vec<i64> = Vec::new();
    let mut payloads = Vec::new();
    while let Some(r) = rows.next().map_err(backend_error)? {
        let event_type_id = r.get(2).map_err(backend_error)?;
        if type_ids.last() != Some(&event_type_id) && !type_ids.contains(&event_type_id) {
            type_ids.push(event_type_id);
        }
        let start = payloads.len();
        let payload = r.get_ref(4).map_err(backend_error)?;
        payloads.extend_from_slice(payload.as_blob().map_err(backend_error)?);
        stream.push(StreamRow {
            version: r.get(0).map_err(backend_error)?,
            position: r.get(1).map_err(backend_error)?,
            event_type_id,
            schema_version: r.get(3).map_err(backend_error)?,
            payload: start..payloads.len(),
        });
    }
    let events = types.map_with(TypeKind::Event, type_ids.into_iter())?;
    Ok(Some(LoadedStream {
        row,
        snapshot,
        events: records::stream_events(stream, &events)?,
        payloads,
    }))
}
