//! Loading on SQLite: an aggregate's row by id or natural key, its newest usable snapshot and
//! the events after it, read in one call on one reader connection.

use std::sync::Arc;

use rusqlite::{Connection, OptionalExtension};

use super::Shared;
use super::names::Resolver;
use super::sqlite_error;
use crate::aggregate::AggregateId;
use crate::error::{Error, Result};
use crate::store::sql::types::TypeKind;
use crate::store::{
    AggregateRow, LoadRequest, LoadedStream, Locate, StoredSnapshot, StreamEvent, to_i64, to_u64,
};

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
}

impl From<LoadRequest<'_>> for Request {
    fn from(request: LoadRequest<'_>) -> Self {
        Request {
            target: request.locate.into(),
            snapshot_version: request.snapshot_version,
            up_to: request.up_to,
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
    let read = |row: &rusqlite::Row<'_>| -> rusqlite::Result<(Vec<u8>, i64, Option<String>, i64)> {
        Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
    };
    let found = match target {
        Target::Id(id) => conn
            .prepare_cached(&sql.row_by_id)
            .map_err(sqlite_error)?
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
                .map_err(sqlite_error)?
                .query_row((type_id, key.as_str()), read)
                .optional()
        }
    }
    .map_err(sqlite_error)?;
    let Some((id, type_id, key, version)) = found else {
        return Ok(None);
    };
    Ok(Some(AggregateRow {
        id: aggregate_id(&id)?,
        aggregate_type: types.name(TypeKind::Aggregate, type_id)?.to_string(),
        key,
        version: to_u64(version, "version")?,
    }))
}

/// The rebuild material of one aggregate.
pub(super) fn load(
    conn: &Connection,
    shared: &Shared,
    request: &Request,
) -> Result<Option<LoadedStream>> {
    let sql = &shared.sql;
    let mut types = Resolver::new(conn, sql, &shared.types);
    let Some(row) = fetch_row(conn, shared, &mut types, &request.target)? else {
        return Ok(None);
    };
    let up_to = request.up_to.map_or(row.version, |v| v.min(row.version));
    let id = row.id.as_uuid().as_bytes().as_slice();
    let up_to_i64 = to_i64(up_to, "version")?;
    let snapshot = match request.snapshot_version {
        Some(shape) => conn
            .prepare_cached(&sql.snapshot)
            .map_err(sqlite_error)?
            .query_row((id, i64::from(shape), up_to_i64), |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?))
            })
            .optional()
            .map_err(sqlite_error)?
            .map(|(version, payload)| {
                Ok::<_, Error>(StoredSnapshot {
                    version: to_u64(version, "snapshot version")?,
                    payload,
                })
            })
            .transpose()?,
        None => None,
    };
    let from = snapshot.as_ref().map_or(0, |s| s.version);
    let mut stmt = conn.prepare_cached(&sql.stream).map_err(sqlite_error)?;
    let mut rows = stmt
        .query((id, to_i64(from, "version")?, up_to_i64))
        .map_err(sqlite_error)?;
    let expected = usize::try_from(up_to.saturating_sub(from)).unwrap_or(0);
    let mut events = Vec::with_capacity(expected.min(1 << 16));
    // Runs of one event type are common: look a name up once per run.
    let mut last: Option<(i64, Arc<str>)> = None;
    while let Some(r) = rows.next().map_err(sqlite_error)? {
        let type_id: i64 = r.get(2).map_err(sqlite_error)?;
        let name = match &last {
            Some((id, name)) if *id == type_id => name.clone(),
            _ => {
                let name = types.name(TypeKind::Event, type_id)?;
                last = Some((type_id, name.clone()));
                name
            }
        };
        events.push(StreamEvent {
            version: to_u64(r.get(0).map_err(sqlite_error)?, "sequence")?,
            position: to_u64(r.get(1).map_err(sqlite_error)?, "position")?,
            name,
            schema_version: schema_version(r.get(3).map_err(sqlite_error)?)?,
            payload: r.get(4).map_err(sqlite_error)?,
        });
    }
    Ok(Some(LoadedStream {
        row,
        snapshot,
        events,
    }))
}

/// An aggregate id from its stored 16 bytes.
pub(super) fn aggregate_id(bytes: &[u8]) -> Result<AggregateId> {
    uuid::Uuid::from_slice(bytes)
        .map(AggregateId::from)
        .map_err(|e| Error::Corrupt(format!("aggregate id: {e}")))
}

/// A stored schema version.
pub(super) fn schema_version(value: i64) -> Result<u32> {
    u32::try_from(value).map_err(|_| Error::Corrupt(format!("schema version {value} out of range")))
}
