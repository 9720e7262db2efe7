//! What a clash at commit means for the aggregates a context created: a key clash on an
//! aggregate from `load_or_create_by_key` is a retryable conflict, an id clash on one from
//! `create_with_id` is `IdTaken`. Decided here, from what the context knows, so every store gives
//! the same answer whatever its own error said.

use crate::aggregate::AggregateId;
use crate::error::Error;
use crate::store::{Locate, Store, Via};

/// The aggregates of a commit whose clashes the context reports in its own terms, whatever the
/// backend said: the same outcome on every store.
#[derive(Debug, Default)]
pub(crate) struct ClashRules {
    /// Created by `load_or_create_by_key`: a key clash is a retryable conflict.
    load_or_create: Vec<(AggregateId, &'static str, String)>,
    /// Created by `create_with_id`, with the id of their first staged event: an id clash is
    /// `IdTaken`.
    chosen_ids: Vec<(AggregateId, Option<uuid::Uuid>)>,
}

impl ClashRules {
    /// `id` was created by `load_or_create_by_key` under `key`.
    pub(crate) fn load_or_create(
        &mut self,
        id: AggregateId,
        aggregate_type: &'static str,
        key: &str,
    ) {
        self.load_or_create
            .push((id, aggregate_type, key.to_owned()));
    }

    /// `id` was chosen with `create_with_id`; `first_event` is the id of its first staged event.
    pub(crate) fn chosen_id(&mut self, id: AggregateId, first_event: Option<uuid::Uuid>) {
        self.chosen_ids.push((id, first_event));
    }

    /// Turns a commit error into the one the context documents, reading the store `via` the
    /// connections the context reads through.
    pub(crate) async fn classify(&self, store: &Store, via: &mut Via<'_>, error: Error) -> Error {
        match error {
            Error::KeyTaken {
                aggregate_type,
                key,
            } => {
                let ours = self
                    .load_or_create
                    .iter()
                    .find(|(_, t, k)| *t == aggregate_type.as_str() && *k == key);
                let Some((id, _, _)) = ours else {
                    return Error::KeyTaken {
                        aggregate_type,
                        key,
                    };
                };
                // The version the winner committed, for the message; a failed read is no reason
                // to hide the conflict.
                let locate = Locate::Key {
                    aggregate_type: &aggregate_type,
                    key: &key,
                };
                let actual = match store.locate_via(via, locate).await {
                    Ok(Some(row)) => row.version,
                    _ => 0,
                };
                Error::Conflict {
                    aggregate_type,
                    aggregate: *id,
                    expected: 0,
                    actual,
                }
            }
            other => self.chosen_id_taken(store, via).await.unwrap_or(other),
        }
    }

    /// [`classify`](ClashRules::classify) for a commit that cannot read the store (the
    /// synchronous `commit_in_sqlite`): a key clash on an aggregate from
    /// `load_or_create_by_key` is a conflict whose `actual` version is not known (0); an id
    /// clash is left as the store reported it.
    #[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
    pub(crate) fn classify_without_store(&self, error: Error) -> Error {
        match error {
            Error::KeyTaken {
                aggregate_type,
                key,
            } => match self
                .load_or_create
                .iter()
                .find(|(_, t, k)| *t == aggregate_type.as_str() && *k == key)
            {
                Some((id, _, _)) => Error::Conflict {
                    aggregate_type,
                    aggregate: *id,
                    expected: 0,
                    actual: 0,
                },
                None => Error::KeyTaken {
                    aggregate_type,
                    key,
                },
            },
            other => other,
        }
    }

    /// After a failed commit: `IdTaken` when an id chosen with `create_with_id` is held in the
    /// store by an aggregate this commit did not write. Backends report such a clash in
    /// different ways (a conflict, a unique violation), so the context asks the store.
    async fn chosen_id_taken(&self, store: &Store, via: &mut Via<'_>) -> Option<Error> {
        for (id, first_event) in &self.chosen_ids {
            let Ok(Some(row)) = store.locate_via(via, Locate::Id(*id)).await else {
                continue;
            };
            // A commit reported as failed may still have landed (a connection lost after the
            // database committed): then the aggregate is this context's own.
            let ours = match store
                .read_stream_via(via, *id, crate::store::StreamRange::after(0))
                .await
            {
                Ok(events) => events.first().map(|e| e.event_id) == *first_event,
                Err(_) => false,
            };
            if !ours {
                return Some(Error::IdTaken {
                    aggregate: *id,
                    found_type: row.aggregate_type,
                });
            }
        }
        None
    }
}
