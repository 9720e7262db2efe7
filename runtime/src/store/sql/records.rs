//! Rows to records, written once for both SQL stores. Each store reads its columns into the
//! plain structs here (its driver's types stay in its own files); turning them into the
//! records the API hands out, with every stored integer checked and every type id named, is
//! done here alike for both.

use crate::aggregate::AggregateId;
use crate::error::{Error, Result};
use crate::event::{FeedCursor, RecordedEvent};
use crate::metadata::Metadata;
use crate::store::sql::types::{TypeKind, TypeMap};
use crate::store::{AggregateRow, StoredSnapshot, StreamEvent, from_micros, to_u64};

/// The columns of one event as the history and the feed read them.
#[derive(Debug)]
pub(crate) struct RecordRow<'r> {
    /// The feed epoch (PostgreSQL), or 0.
    pub epoch: i64,
    /// The writing transaction's id (PostgreSQL), or 0.
    pub tx: i64,
    pub position: i64,
    pub aggregate_id: uuid::Uuid,
    pub aggregate_type_id: i64,
    pub version: i64,
    pub event_type_id: i64,
    pub schema_version: i64,
    pub payload: Vec<u8>,
    pub metadata: Option<&'r [u8]>,
    /// Microseconds since the Unix epoch.
    pub recorded_at: i64,
    pub event_id: uuid::Uuid,
    pub key: Option<String>,
}

impl RecordRow<'_> {
    /// The record, with its type ids named from `aggregates` and `events` (which must hold
    /// them: see [`records_need_refresh`]).
    pub fn into_record(self, aggregates: &TypeMap, events: &TypeMap) -> Result<RecordedEvent> {
        let position = to_u64(self.position, "event position")?;
        Ok(RecordedEvent {
            cursor: FeedCursor {
                epoch: epoch(self.epoch)?,
                tx: to_u64(self.tx, "transaction id")?,
                position,
            },
            aggregate_id: self.aggregate_id.into(),
            aggregate_type: aggregates
                .name_of(TypeKind::Aggregate, self.aggregate_type_id)?
                .to_string(),
            key: self.key,
            version: to_u64(self.version, "event version")?,
            event_type: events
                .name_of(TypeKind::Event, self.event_type_id)?
                .to_string(),
            schema_version: schema_version(self.schema_version, position)?,
            payload: self.payload,
            metadata: Metadata::decode(self.metadata)
                .map_err(|e| Error::Corrupt(format!("metadata at position {position}: {e}")))?,
            recorded_at: from_micros(self.recorded_at),
            event_id: self.event_id,
        })
    }
}

/// Which type tables lack an id that `rows` refer to: those must be re-read before the rows
/// become records.
// SQLite checks row by row: its rows lend their metadata only until the next row is read.
#[cfg_attr(not(feature = "postgres"), allow(dead_code))]
pub(crate) fn records_need_refresh(
    rows: &[RecordRow<'_>],
    aggregates: &TypeMap,
    events: &TypeMap,
) -> (bool, bool) {
    (
        !aggregates.has_ids(rows.iter().map(|r| r.aggregate_type_id)),
        !events.has_ids(rows.iter().map(|r| r.event_type_id)),
    )
}

/// The columns of one event as a load reads them to rebuild an aggregate.
#[derive(Debug)]
pub(crate) struct StreamRow {
    pub version: i64,
    pub position: i64,
    pub event_type_id: i64,
    pub schema_version: i64,
    /// Where the payload lies in the load's payload buffer.
    pub payload: std::ops::Range<usize>,
}

/// The events of a load, named from `events` (which must hold every id: the stores collect the
/// distinct ids while they read the rows), checked to be in version order.
pub(crate) fn stream_events(rows: Vec<StreamRow>, events: &TypeMap) -> Result<Vec<StreamEvent>> {
    let mut out = Vec::with_capacity(rows.len());
    // Runs of one event type are common: name a run once.
    let mut last: Option<(i64, std::sync::Arc<str>)> = None;
    for row in rows {
        let name = match &last {
            Some((id, name)) if *id == row.event_type_id => name.clone(),
            _ => {
                let name = events.name_of(TypeKind::Event, row.event_type_id)?;
                last = Some((row.event_type_id, name.clone()));
                name
            }
        };
        let position = to_u64(row.position, "event position")?;
        out.push(StreamEvent {
            version: to_u64(row.version, "event version")?,
            position,
            name,
            schema_version: schema_version(row.schema_version, position)?,
            payload: row.payload,
        });
    }
    // The statements order by version; this guards the aggregate against a row out of place.
    if !out.windows(2).all(|w| match w {
        [a, b] => a.version < b.version,
        _ => true,
    }) {
        out.sort_by_key(|e| e.version);
    }
    Ok(out)
}

/// An aggregate's row: id, type id, natural key and version.
pub(crate) fn aggregate_row(
    id: uuid::Uuid,
    type_id: i64,
    key: Option<String>,
    version: i64,
    erased: bool,
    aggregates: &TypeMap,
) -> Result<AggregateRow> {
    Ok(AggregateRow {
        id: id.into(),
        aggregate_type: aggregates
            .name_of(TypeKind::Aggregate, type_id)?
            .to_string(),
        key,
        version: to_u64(version, "aggregate version")?,
        erased,
    })
}

/// A stored snapshot's version and payload.
pub(crate) fn snapshot(version: i64, payload: Vec<u8>) -> Result<StoredSnapshot> {
    Ok(StoredSnapshot {
        version: to_u64(version, "snapshot version")?,
        payload,
    })
}

/// A UUID stored as 16 bytes (SQLite keeps ids as blobs).
#[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
pub(crate) fn uuid_from_bytes(bytes: &[u8], what: &str) -> Result<uuid::Uuid> {
    uuid::Uuid::from_slice(bytes).map_err(|e| Error::Corrupt(format!("{what}: {e}")))
}

/// An aggregate id stored as 16 bytes.
#[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
pub(crate) fn aggregate_id(bytes: &[u8]) -> Result<AggregateId> {
    uuid_from_bytes(bytes, "aggregate id").map(AggregateId::from)
}

/// A stored feed epoch, checked to fit.
pub(crate) fn epoch(value: i64) -> Result<u32> {
    u32::try_from(value).map_err(|_| Error::Corrupt(format!("feed epoch {value} is out of range")))
}

/// A stored schema version, checked to fit.
pub(crate) fn schema_version(value: i64, position: u64) -> Result<u32> {
    u32::try_from(value).map_err(|_| {
        Error::Corrupt(format!(
            "schema version {value} at position {position} is out of range"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn types() -> TypeMap {
        TypeMap::from_rows([(7, "opened".to_owned()), (8, "deposited".to_owned())])
    }

    fn row(version: i64, position: i64, event_type_id: i64) -> StreamRow {
        StreamRow {
            version,
            position,
            event_type_id,
            schema_version: 1,
            payload: 0..2,
        }
    }

    #[test]
    fn stream_rows_are_named_and_ordered() {
        let events = stream_events(vec![row(2, 12, 8), row(1, 11, 7)], &types()).unwrap();
        let seen: Vec<(u64, &str)> = events.iter().map(|e| (e.version, &*e.name)).collect();
        assert_eq!(seen, [(1, "opened"), (2, "deposited")]);
    }

    #[test]
    fn bad_rows_are_errors_not_panics() {
        assert!(matches!(
            stream_events(vec![row(1, 11, 99)], &types()),
            Err(Error::Corrupt(m)) if m.contains("event type id 99")
        ));
        assert!(matches!(
            stream_events(vec![row(-1, 11, 7)], &types()),
            Err(Error::Corrupt(m)) if m.contains("negative event version")
        ));
        let mut bad = row(1, 11, 7);
        bad.schema_version = i64::MAX;
        assert!(matches!(
            stream_events(vec![bad], &types()),
            Err(Error::Corrupt(m)) if m.contains("position 11")
        ));
        assert!(aggregate_id(&[1, 2, 3]).is_err());
    }

    #[test]
    fn record_rows_name_their_types() {
        let aggregates = TypeMap::from_rows([(1, "account".to_owned())]);
        let record = RecordRow {
            epoch: 0,
            tx: 0,
            position: 5,
            aggregate_id: uuid::Uuid::nil(),
            aggregate_type_id: 1,
            version: 3,
            event_type_id: 8,
            schema_version: 2,
            payload: b"{}".to_vec(),
            metadata: None,
            recorded_at: 1_000_000,
            event_id: uuid::Uuid::nil(),
            key: Some("k-1".to_owned()),
        };
        assert_eq!(
            records_need_refresh(std::slice::from_ref(&record), &aggregates, &types()),
            (false, false)
        );
        let record = record.into_record(&aggregates, &types()).unwrap();
        assert_eq!(record.event_type, "deposited");
        assert_eq!(record.aggregate_type, "account");
        assert_eq!(record.key.as_deref(), Some("k-1"));
        assert_eq!((record.version, record.schema_version), (3, 2));
        assert_eq!(record.cursor, FeedCursor::at_position(5));
    }
}
