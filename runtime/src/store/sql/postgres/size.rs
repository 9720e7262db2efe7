//! The size of a commit as PostgreSQL receives it: one protocol message, which the server caps
//! at 1 GiB. A commit that would pass it is refused before anything is sent.

use crate::error::Result;
use crate::store::{CommitBatch, refuse_over};

/// PostgreSQL refuses a protocol message of 1 GiB or more (`MaxAllocSize`); a commit is one
/// message, with a margin left for the statement text and the message's own framing.
pub(super) const MAX_MESSAGE: usize = (1 << 30) - (1 << 16);

/// The bytes the bind parameters of `batch` take in the message, counted as PostgreSQL's
/// binary format lays them out: a length word per value, fixed-size ids and numbers, and the
/// payloads, metadata, snapshots and keys themselves.
fn message_size(batch: &CommitBatch) -> usize {
    // Per event: aggregate id and event id (4 + 16 each), sequence (4 + 8), type and schema
    // version (4 + 4 each), and the length words of payload and metadata.
    const PER_EVENT: usize = 2 * 20 + 12 + 2 * 8 + 2 * 4;
    // Per changed aggregate: id, type, key length word, versions; per snapshot: id, shape,
    // version and the payload's length word.
    const PER_CHANGE: usize = 20 + 8 + 4 + 2 * 12;
    const PER_SNAPSHOT: usize = 20 + 8 + 12 + 4;
    batch
        .changes
        .iter()
        .map(|c| {
            PER_CHANGE
                + c.events.len() * PER_EVENT
                + c.snapshot.as_ref().map_or(0, |_| PER_SNAPSHOT)
        })
        .fold(batch.encoded_size(), usize::saturating_add)
}

/// Refuses a batch whose message would pass `max` bytes, before anything is sent.
pub(super) fn check_message(batch: &CommitBatch, max: usize) -> Result<()> {
    refuse_over(message_size(batch), max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::AggregateId;
    use crate::error::Error;
    use crate::store::{Change, StagedEvent};

    fn batch(events: usize, payload: usize) -> CommitBatch {
        CommitBatch {
            changes: vec![Change {
                id: AggregateId::new(),
                aggregate_type: "account",
                key: Some("k".to_owned()),
                is_new: true,
                expected: 0,
                events: (0..events)
                    .map(|i| StagedEvent {
                        seq: i as u64,
                        version: i as u64 + 1,
                        name: "deposited",
                        schema_version: 1,
                        payload: vec![b'x'; payload],
                        metadata: None,
                        event_id: uuid::Uuid::now_v7(),
                    })
                    .collect(),
                snapshot: None,
                rekey: None,
                erase: false,
            }],
            loaded: Vec::new(),
            recorded_at: std::time::SystemTime::now(),
            inline: Default::default(),
            cursors: false,
        }
    }

    #[test]
    fn many_small_events_count_their_overhead() {
        // 1,000 events of 10 bytes: 10 kB of payload, but every event carries its ids,
        // numbers and length words in the message too.
        let many = batch(1_000, 10);
        assert_eq!(many.encoded_size(), 10_001);
        let size = message_size(&many);
        assert!(size > 70_000, "{size}");
        assert!(check_message(&many, size).is_ok());
        match check_message(&many, size - 1) {
            Err(Error::CommitTooLarge { size: s, max }) => assert_eq!((s, max), (size, size - 1)),
            other => panic!("expected CommitTooLarge, got {other:?}"),
        }
    }
}
