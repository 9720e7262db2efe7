//! The global feed and an aggregate's history on SQLite. SQLite runs one write transaction at a
//! time and hands out `AUTOINCREMENT` positions inside it, so positions increase in commit
//! order and the feed is read by position alone.

use rusqlite::{Connection, Row};

use super::Shared;
use super::names::Resolver;
use crate::aggregate::AggregateId;
use crate::error::{Error, Result};
use crate::event::{FeedCursor, RecordedEvent};
use crate::feed::FeedPage;
use crate::filter::Filter;
use crate::store::sql::backend_error;
use crate::store::sql::records::{RecordRow, uuid_from_bytes};
use crate::store::sql::types::TypeKind;
use crate::store::{StreamRange, to_i64, to_u64};

/// The events of aggregate `id` in `range`.
pub(super) fn read_stream(
    conn: &Connection,
    shared: &Shared,
    id: AggregateId,
    range: StreamRange,
) -> Result<Vec<RecordedEvent>> {
    let sql = if range.backward {
        &shared.sql.read_stream_backward
    } else {
        &shared.sql.read_stream
    };
    let mut stmt = conn.prepare_cached(sql).map_err(backend_error)?;
    let (from, to, limit) = range.to_sql();
    let rows = stmt
        .query((id.as_uuid().as_bytes().as_slice(), from, to, limit))
        .map_err(backend_error)?;
    recorded(conn, shared, rows)
}

/// Where the events with `ids` are stored: `(event id, aggregate, version)` for each one found.
pub(super) fn find_events(
    conn: &Connection,
    shared: &Shared,
    ids: &[uuid::Uuid],
) -> Result<Vec<(uuid::Uuid, AggregateId, u64)>> {
    let mut stmt = conn
        .prepare_cached(&shared.sql.find_event)
        .map_err(backend_error)?;
    let mut found = Vec::new();
    for id in ids {
        let mut rows = stmt
            .query([id.as_bytes().as_slice()])
            .map_err(backend_error)?;
        if let Some(row) = rows.next().map_err(backend_error)? {
            let aggregate: Vec<u8> = row.get(0).map_err(backend_error)?;
            let version: i64 = row.get(1).map_err(backend_error)?;
            found.push((
                *id,
                crate::store::sql::records::aggregate_id(&aggregate)?,
                to_u64(version, "event version")?,
            ));
        }
    }
    Ok(found)
}

/// Up to `limit` events after `after`. Nothing ever holds the SQLite feed back.
pub(super) fn read_feed(
    conn: &Connection,
    shared: &Shared,
    after: FeedCursor,
    limit: usize,
) -> Result<FeedPage> {
    let mut stmt = conn
        .prepare_cached(&shared.sql.read_feed)
        .map_err(backend_error)?;
    let rows = stmt
        .query((
            to_i64(after.position, "position")?,
            i64::try_from(limit).unwrap_or(i64::MAX),
        ))
        .map_err(backend_error)?;
    Ok(FeedPage::new(recorded(conn, shared, rows)?, None, after))
}

/// Up to `limit` events after `after` that pass `filter`, and the end of the feed as it stood
/// (read in the same transaction) as how far the read looked when the page is not full.
pub(super) fn read_feed_matching(
    conn: &Connection,
    shared: &Shared,
    after: FeedCursor,
    limit: usize,
    filter: &Filter,
) -> Result<FeedPage> {
    filter.check()?;
    let json = |names: &[String]| serde_json::to_string(names).unwrap_or_default();
    let mut params: Vec<Box<dyn rusqlite::ToSql>> = vec![
        Box::new(to_i64(after.position, "position")?),
        Box::new(i64::try_from(limit).unwrap_or(i64::MAX)),
    ];
    if !filter.event_types().is_empty() {
        params.push(Box::new(json(filter.event_types())));
    }
    if !filter.aggregate_types().is_empty() {
        params.push(Box::new(json(filter.aggregate_types())));
    }
    if let Some(id) = filter.aggregate_id() {
        params.push(Box::new(id.as_uuid().as_bytes().to_vec()));
    }
    if let Some(key) = filter.aggregate_key() {
        params.push(Box::new(key.to_owned()));
    }
    if let Some((partition, partitions)) = filter.partition() {
        params.push(Box::new(partition));
        params.push(Box::new(partitions));
    }
    let sql = shared
        .sql
        .read_feed_matching
        .get(filter.shape().index())
        .ok_or_else(|| Error::Corrupt("no statement for this filter".to_owned()))?;
    // One read transaction: the page and the end of the feed from one snapshot.
    let tx = conn.unchecked_transaction().map_err(backend_error)?;
    let events = {
        let mut stmt = tx.prepare_cached(sql).map_err(backend_error)?;
        let rows = stmt
            .query(rusqlite::params_from_iter(params.iter()))
            .map_err(backend_error)?;
        recorded(&tx, shared, rows)?
    };
    let page = FeedPage::new(events, None, after);
    if page.len() == limit {
        return Ok(page);
    }
    let end: Option<i64> = tx
        .prepare_cached(&shared.sql.feed_end)
        .and_then(|mut stmt| stmt.query_row((), |row| row.get(0)))
        .map_err(backend_error)?;
    let end = u64::try_from(end.unwrap_or(0)).unwrap_or(0);
    Ok(page.scanned_to(FeedCursor::at_position(end)))
}

fn recorded(
    conn: &Connection,
    shared: &Shared,
    mut rows: rusqlite::Rows<'_>,
) -> Result<Vec<RecordedEvent>> {
    let mut types = Resolver::new(conn, &shared.sql, &shared.types);
    let mut out = Vec::new();
    while let Some(row) = rows.next().map_err(backend_error)? {
        let row = record_row(row)?;
        let aggregates =
            types.map_with(TypeKind::Aggregate, [row.aggregate_type_id].into_iter())?;
        let events = types.map_with(TypeKind::Event, [row.event_type_id].into_iter())?;
        out.push(row.into_record(&aggregates, &events)?);
    }
    Ok(out)
}

/// The columns of a feed row; the metadata stays borrowed from the row until it is decoded.
fn record_row<'r>(r: &'r Row<'_>) -> Result<RecordRow<'r>> {
    let int = |i: usize| r.get::<_, i64>(i).map_err(backend_error);
    let position = int(0)?;
    let blob = |i: usize| -> Result<&'r [u8]> {
        r.get_ref(i)
            .and_then(|v| v.as_blob().map_err(Into::into))
            .map_err(|e| {
                Error::Corrupt(format!(
                    "column {i} of the event at position {position}: {e}"
                ))
            })
    };
    Ok(RecordRow {
        epoch: 0,
        tx: 0,
        position,
        aggregate_id: uuid_from_bytes(blob(1)?, "aggregate id")?,
        aggregate_type_id: int(2)?,
        version: int(3)?,
        event_type_id: int(4)?,
        schema_version: int(5)?,
        payload: blob(6)?.to_vec(),
        metadata: r
            .get_ref(7)
            .and_then(|v| v.as_blob_or_null().map_err(Into::into))
            .map_err(|e| Error::Corrupt(format!("metadata at position {position}: {e}")))?,
        recorded_at: int(8)?,
        event_id: uuid_from_bytes(blob(9)?, &format!("event id at position {position}"))?,
        key: r.get(10).map_err(backend_error)?,
    })
}
