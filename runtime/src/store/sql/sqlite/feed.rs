//! The global feed and an aggregate's history on SQLite. SQLite runs one write transaction at a
//! time and hands out `AUTOINCREMENT` positions inside it, so positions increase in commit
//! order and the feed is read by position alone.

use rusqlite::{Connection, Row};

use super::Shared;
use super::load::{aggregate_id, schema_version};
use super::names::Resolver;
use super::sqlite_error;
use crate::aggregate::AggregateId;
use crate::error::{Error, Result};
use crate::event::{FeedCursor, RecordedEvent};
use crate::metadata::Metadata;
use crate::store::sql::types::TypeKind;
use crate::store::{from_micros, to_i64, to_u64};

/// Every event of aggregate `id` after `after_version`.
pub(super) fn read_stream(
    conn: &Connection,
    shared: &Shared,
    id: AggregateId,
    after_version: u64,
) -> Result<Vec<RecordedEvent>> {
    let mut stmt = conn
        .prepare_cached(&shared.sql.read_stream)
        .map_err(sqlite_error)?;
    let rows = stmt
        .query((
            id.as_uuid().as_bytes().as_slice(),
            to_i64(after_version, "version")?,
        ))
        .map_err(sqlite_error)?;
    recorded(conn, shared, rows)
}

/// Up to `limit` events after `after`.
pub(super) fn read_feed(
    conn: &Connection,
    shared: &Shared,
    after: FeedCursor,
    limit: usize,
) -> Result<Vec<RecordedEvent>> {
    let mut stmt = conn
        .prepare_cached(&shared.sql.read_feed)
        .map_err(sqlite_error)?;
    let rows = stmt
        .query((
            to_i64(after.position, "position")?,
            i64::try_from(limit).unwrap_or(i64::MAX),
        ))
        .map_err(sqlite_error)?;
    recorded(conn, shared, rows)
}

fn recorded(
    conn: &Connection,
    shared: &Shared,
    mut rows: rusqlite::Rows<'_>,
) -> Result<Vec<RecordedEvent>> {
    let mut types = Resolver::new(conn, &shared.sql, &shared.types);
    let mut out = Vec::new();
    while let Some(row) = rows.next().map_err(sqlite_error)? {
        out.push(event(&mut types, row)?);
    }
    Ok(out)
}

fn event(types: &mut Resolver<'_>, r: &Row<'_>) -> Result<RecordedEvent> {
    let get = |i: usize| r.get_ref(i).map_err(sqlite_error);
    let int = |i: usize| r.get::<_, i64>(i).map_err(sqlite_error);
    let position = to_u64(int(0)?, "position")?;
    let blob = |i: usize| -> Result<&[u8]> {
        get(i)?.as_blob().map_err(|e| {
            Error::Corrupt(format!(
                "column {i} of the event at position {position}: {e}"
            ))
        })
    };
    let metadata = get(7)?
        .as_blob_or_null()
        .map_err(|e| Error::Corrupt(format!("metadata at position {position}: {e}")))?;
    Ok(RecordedEvent {
        cursor: FeedCursor { tx: 0, position },
        aggregate_id: aggregate_id(blob(1)?)?,
        aggregate_type: types.name(TypeKind::Aggregate, int(2)?)?.to_string(),
        version: to_u64(int(3)?, "sequence")?,
        event_type: types.name(TypeKind::Event, int(4)?)?.to_string(),
        schema_version: schema_version(int(5)?)?,
        payload: blob(6)?.to_vec(),
        metadata: Metadata::decode(metadata)
            .map_err(|e| Error::Corrupt(format!("metadata at position {position}: {e}")))?,
        recorded_at: from_micros(int(8)?),
        event_id: uuid::Uuid::from_slice(blob(9)?)
            .map_err(|e| Error::Corrupt(format!("event id at position {position}: {e}")))?,
    })
}
