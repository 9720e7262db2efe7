//! Where a context reads: the store's own connections, or the connection of a caller's
//! transaction that the context is bound to (see `Store::begin_in`). The loaders of
//! `load.rs` and the clash rules take a [`Via`], so one code path serves both.

use crate::aggregate::AggregateId;
use crate::error::Result;
use crate::event::RecordedEvent;
use crate::store::{AggregateRow, LoadRequest, LoadedStream, Locate, Store, StreamRange};

/// The connection of a caller's transaction: PostgreSQL's, the only store a context can be
/// bound to. Without the `postgres` feature it has no values, so [`Via::Caller`] cannot occur.
#[cfg(feature = "postgres")]
pub(crate) type CallerConnection = sqlx::PgConnection;
#[cfg(not(feature = "postgres"))]
#[derive(Debug)]
pub(crate) enum CallerConnection {}

/// Where a context reads.
#[derive(Debug)]
pub(crate) enum Via<'a> {
    /// The store's own connections: committed state, each read on its own.
    Store,
    /// A caller's transaction: reads see its own uncommitted writes, through its snapshot.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    Caller(&'a mut CallerConnection),
}

impl Via<'_> {
    /// True for the store's own connections: what they read is committed, so the aggregate
    /// cache may serve and keep it. A caller's transaction may see its own uncommitted writes.
    pub(crate) fn reads_committed(&self) -> bool {
        matches!(self, Via::Store)
    }
}

impl Store {
    /// The row of one aggregate, read `via`.
    pub(crate) async fn locate_via(
        &self,
        via: &mut Via<'_>,
        locate: Locate<'_>,
    ) -> Result<Option<AggregateRow>> {
        match via {
            Via::Store => self.inner.backend.locate(locate).await,
            #[cfg(feature = "postgres")]
            Via::Caller(conn) => {
                crate::store::sql::postgres::of(self)?
                    .locate_on(conn, locate)
                    .await
            }
            #[cfg(not(feature = "postgres"))]
            Via::Caller(conn) => match **conn {},
        }
    }

    /// The rebuild material of one aggregate, read `via`.
    pub(crate) async fn load_via(
        &self,
        via: &mut Via<'_>,
        request: LoadRequest<'_>,
    ) -> Result<Option<LoadedStream>> {
        match via {
            Via::Store => self.inner.backend.load(request).await,
            #[cfg(feature = "postgres")]
            Via::Caller(conn) => {
                crate::store::sql::postgres::of(self)?
                    .load_stream_on(conn, request)
                    .await
            }
            #[cfg(not(feature = "postgres"))]
            Via::Caller(conn) => match **conn {},
        }
    }

    /// Where the events with these ids are stored, read `via`.
    pub(crate) async fn find_events_via(
        &self,
        via: &mut Via<'_>,
        ids: &[uuid::Uuid],
    ) -> Result<Vec<(uuid::Uuid, AggregateId, u64)>> {
        match via {
            Via::Store => self.inner.backend.find_events(ids).await,
            #[cfg(feature = "postgres")]
            Via::Caller(conn) => {
                crate::store::sql::postgres::of(self)?
                    .find_events_on(conn, ids)
                    .await
            }
            #[cfg(not(feature = "postgres"))]
            Via::Caller(conn) => match **conn {},
        }
    }

    /// The events of one aggregate in `range`, read `via`.
    pub(crate) async fn read_stream_via(
        &self,
        via: &mut Via<'_>,
        id: AggregateId,
        range: StreamRange,
    ) -> Result<Vec<RecordedEvent>> {
        match via {
            Via::Store => self.inner.backend.read_stream(id, range).await,
            #[cfg(feature = "postgres")]
            Via::Caller(conn) => {
                crate::store::sql::postgres::of(self)?
                    .stream_records_on(conn, id, range)
                    .await
            }
            #[cfg(not(feature = "postgres"))]
            Via::Caller(conn) => match **conn {},
        }
    }
}
