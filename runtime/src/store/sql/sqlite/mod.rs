//! The SQLite store (`sqlite://path`, `sqlite::memory:`): the embedded default, on rusqlite with
//! the bundled SQLite.
//!
//! rusqlite is a blocking API, so the store runs it on threads of its own: one writer thread
//! owns the one read-write connection and runs each commit whole, in `BEGIN IMMEDIATE`, so
//! writers of every process sharing the file queue on SQLite's lock instead of failing on a lock
//! upgrade ([`writer`]); loads and feed reads run on blocking threads over a bounded set of
//! read-only connections that never block the writer (WAL, [`readers`]). Each call crosses
//! threads once, however many statements it runs. Because SQLite runs one write transaction at a
//! time, global positions are assigned in commit order and the feed is read by position.
//!
//! An in-memory database (`sqlite::memory:`) is private to its connection: there, the writer
//! thread's one connection serves every call.

mod commit;
mod connect;
mod feed;
mod load;
mod migrate;
mod names;
mod readers;
mod render;
mod subscriptions;
mod writer;

use std::sync::Arc;
use std::time::Duration;

use self::connect::{Location, open_writer, parse};
use self::readers::Readers;
use self::render::Statements;
use self::writer::Writer;
use crate::aggregate::AggregateId;
use crate::error::{Error, Result};
use crate::event::{FeedCursor, RecordedEvent};
use crate::feed::FeedPage;
use crate::filter::Filter;
use crate::registry::Registry;
use crate::store::sql::types::TypeCache;
use crate::store::{
    AggregateRow, Backend, BoxFuture, CommitBatch, CommitSignal, LoadRequest, LoadedStream, Locate,
    Prune, Store, StoreOptions, StreamRange,
};
use crate::subscription::row::{Claim, Parked, Row, Spec, Write};
use crate::subscription::tx::TxState;

/// What every thread of one store shares: statements, the type-name cache, the commit signal.
#[derive(Debug)]
pub(super) struct Shared {
    sql: Statements,
    subscriptions: subscriptions::Statements,
    types: TypeCache,
    committed: CommitSignal,
    options: StoreOptions,
}

pub(crate) struct SqliteBackend {
    shared: Arc<Shared>,
    writer: Writer,
    /// `None` for an in-memory database, whose one connection is the writer's.
    readers: Option<Readers>,
    read_only: bool,
}

impl SqliteBackend {
    pub(crate) async fn open(url: &str, options: &StoreOptions) -> Result<Self> {
        let target = parse(url, options)?;
        let readers = match &target.location {
            Location::File(path) => Some(Readers::new(path.clone(), options)),
            Location::Memory => None,
        };
        let writer_target = target.clone();
        let writer_options = options.clone();
        // Opening touches the file (and may wait on another process's lock): not on the
        // async thread.
        let conn =
            tokio::task::spawn_blocking(move || open_writer(&writer_target, &writer_options))
                .await
                .map_err(|e| Error::Backend(format!("opening the SQLite store: {e}").into()))??;
        let shared = Arc::new(Shared {
            sql: Statements::new(&options.table_prefix),
            subscriptions: subscriptions::Statements::new(&options.table_prefix),
            types: TypeCache::default(),
            committed: CommitSignal::default(),
            options: options.clone(),
        });
        Ok(SqliteBackend {
            writer: Writer::spawn(conn, shared.clone(), "annals-sqlite-writer")?,
            shared,
            readers,
            read_only: target.read_only,
        })
    }

    /// Runs `work` on a reader connection (the writer's, in memory).
    fn read<T, F>(&self, work: F) -> BoxFuture<'_, Result<T>>
    where
        T: Send + 'static,
        F: FnOnce(&rusqlite::Connection, &Shared) -> Result<T> + Send + 'static,
    {
        let shared = self.shared.clone();
        let work = move |conn: &mut rusqlite::Connection| work(conn, &shared);
        match &self.readers {
            Some(readers) => Box::pin(readers.run(work)),
            None => Box::pin(self.writer.run(work)),
        }
    }

    /// Runs `work` on the writer thread with the subscription statements; [`Error::ReadOnly`]
    /// on a read-only store.
    fn write_subscriptions<T, F>(&self, work: F) -> BoxFuture<'_, Result<T>>
    where
        T: Send + 'static,
        F: FnOnce(&mut rusqlite::Connection, &subscriptions::Statements) -> Result<T>
            + Send
            + 'static,
    {
        if self.read_only {
            return Box::pin(std::future::ready(Err(Error::ReadOnly)));
        }
        let shared = self.shared.clone();
        Box::pin(
            self.writer
                .run(move |conn| work(conn, &shared.subscriptions)),
        )
    }

    /// Commits `batch` inside the caller's transaction `conn` (see `Context::commit_in_sqlite`).
    pub(crate) fn commit_in(&self, conn: &rusqlite::Connection, batch: &CommitBatch) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        commit::commit_in(conn, &self.shared, batch)?;
        // Spurious: the caller commits later. Waiters read the feed and wait again.
        self.shared.committed.notify();
        Ok(())
    }
}

pub(crate) use self::subscriptions::execute;

/// Commits a context's batch inside the caller's own rusqlite transaction; the body of
/// `Context::commit_in_sqlite`.
pub(crate) fn commit_in(
    store: &Store,
    conn: &rusqlite::Connection,
    batch: &CommitBatch,
) -> Result<()> {
    of(store)?.commit_in(conn, batch)
}

/// Where the events with `ids` are stored, read over the caller's connection (after a failed
/// `Context::commit_in_sqlite`).
pub(crate) fn find_events_in(
    store: &Store,
    conn: &rusqlite::Connection,
    ids: &[uuid::Uuid],
) -> Result<Vec<(uuid::Uuid, AggregateId, u64)>> {
    feed::find_events(conn, &of(store)?.shared, ids)
}

/// The SQLite backend of `store`; [`Error::Config`] for another store.
fn of(store: &Store) -> Result<&SqliteBackend> {
    store
        .inner
        .backend
        .as_any()
        .downcast_ref::<SqliteBackend>()
        .ok_or_else(|| {
            Error::Config("commit_in_sqlite needs a SQLite store (sqlite://…)".to_owned())
        })
}

impl Backend for SqliteBackend {
    fn prepare<'a>(&'a self, registry: &'a Registry) -> BoxFuture<'a, Result<()>> {
        let shared = self.shared.clone();
        let read_only = self.read_only;
        let names = migrate::TypeNames::of(registry);
        Box::pin(self.writer.run(move |conn| {
            migrate::migrate(conn, &shared.options, read_only)?;
            migrate::warm_up(conn, &shared, &names, read_only)
        }))
    }

    fn load<'a>(&'a self, request: LoadRequest<'a>) -> BoxFuture<'a, Result<Option<LoadedStream>>> {
        let request = load::Request::from(request);
        self.read(move |conn, shared| load::load(conn, shared, &request))
    }

    fn locate<'a>(&'a self, locate: Locate<'a>) -> BoxFuture<'a, Result<Option<AggregateRow>>> {
        let target = load::Target::from(locate);
        self.read(move |conn, shared| load::locate(conn, shared, &target))
    }

    fn commit<'a>(&'a self, batch: &'a CommitBatch) -> BoxFuture<'a, Result<Vec<FeedCursor>>> {
        if self.read_only {
            return Box::pin(std::future::ready(Err(Error::ReadOnly)));
        }
        // The writer thread signals the commit: waiters wake even if the caller gave up.
        Box::pin(self.writer.commit(batch.clone()))
    }

    fn prune<'a>(&'a self, prune: Prune) -> BoxFuture<'a, Result<u64>> {
        if self.read_only {
            return Box::pin(std::future::ready(Err(Error::ReadOnly)));
        }
        let shared = self.shared.clone();
        Box::pin(
            self.writer
                .run(move |conn| commit::prune(conn, &shared.sql, prune)),
        )
    }

    fn read_stream<'a>(
        &'a self,
        id: AggregateId,
        range: StreamRange,
    ) -> BoxFuture<'a, Result<Vec<RecordedEvent>>> {
        self.read(move |conn, shared| feed::read_stream(conn, shared, id, range))
    }

    fn find_events<'a>(
        &'a self,
        ids: &'a [uuid::Uuid],
    ) -> BoxFuture<'a, Result<Vec<(uuid::Uuid, AggregateId, u64)>>> {
        let ids = ids.to_vec();
        self.read(move |conn, shared| feed::find_events(conn, shared, &ids))
    }

    fn read_feed<'a>(&'a self, after: FeedCursor, limit: usize) -> BoxFuture<'a, Result<FeedPage>> {
        self.read(move |conn, shared| feed::read_feed(conn, shared, after, limit))
    }

    fn read_feed_matching<'a>(
        &'a self,
        after: FeedCursor,
        limit: usize,
        filter: &'a Filter,
    ) -> BoxFuture<'a, Result<FeedPage>> {
        let filter = filter.clone();
        self.read(move |conn, shared| feed::read_feed_matching(conn, shared, after, limit, &filter))
    }

    fn subscription_open<'a>(&'a self, spec: &'a Spec) -> BoxFuture<'a, Result<Row>> {
        let spec = spec.clone();
        self.write_subscriptions(move |conn, sql| subscriptions::open(conn, sql, &spec))
    }

    fn subscription_claim<'a>(&'a self, claim: &'a Claim) -> BoxFuture<'a, Result<Option<Row>>> {
        let claim = claim.clone();
        self.write_subscriptions(move |conn, sql| subscriptions::claim(conn, sql, &claim))
    }

    fn subscription_heartbeat<'a>(&'a self, claim: &'a Claim) -> BoxFuture<'a, Result<u32>> {
        let claim = claim.clone();
        self.write_subscriptions(move |conn, sql| subscriptions::heartbeat(conn, sql, &claim))
    }

    fn subscription_rows<'a>(&'a self, name: Option<&'a str>) -> BoxFuture<'a, Result<Vec<Row>>> {
        let name = name.map(str::to_owned);
        self.read(move |conn, shared| {
            subscriptions::rows(conn, &shared.subscriptions, name.as_deref())
        })
    }

    fn begin_tx(&self) -> BoxFuture<'_, Result<TxState>> {
        let state = if self.read_only {
            Err(Error::ReadOnly)
        } else {
            Ok(TxState::Sqlite(Vec::new()))
        };
        Box::pin(std::future::ready(state))
    }

    fn parked<'a>(
        &'a self,
        name: &'a str,
        partition: Option<u32>,
    ) -> BoxFuture<'a, Result<Vec<Parked>>> {
        let name = name.to_owned();
        self.read(move |conn, shared| {
            subscriptions::parked(conn, &shared.subscriptions, &name, partition)
        })
    }

    fn commit_tx(&self, tx: TxState, writes: Vec<Write>) -> BoxFuture<'_, Result<()>> {
        let TxState::Sqlite(work) = tx else {
            return Box::pin(std::future::ready(Err(Error::Corrupt(
                "a SQLite store was given another store's transaction".to_owned(),
            ))));
        };
        let shared = self.shared.clone();
        Box::pin(
            self.writer
                .run(move |conn| subscriptions::commit(conn, &shared.subscriptions, work, &writes)),
        )
    }

    fn changes(&self) -> u64 {
        self.shared.committed.count()
    }

    fn wait_for_change(&self, since: u64, max_wait: Duration) -> BoxFuture<'_, ()> {
        Box::pin(self.shared.committed.wait(since, max_wait))
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if let Some(readers) = &self.readers {
                readers.close();
            }
            self.writer.close().await;
        })
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}
