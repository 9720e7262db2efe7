//! A context bound to the caller's PostgreSQL transaction: it loads, checks and commits over
//! that one connection, so a unit of work holds one server connection, never two.

use std::ops::{Deref, DerefMut};

use sqlx::PgConnection;
use tracing::Instrument;

use crate::aggregate::{Aggregate, AggregateId, Root};
use crate::context::{Committed, Context, commit_span, stored_already_via};
use crate::error::Result;
use crate::store::sql::postgres;
use crate::store::{Store, Via};

/// A [`Context`] bound to the caller's open PostgreSQL transaction, from
/// [`Store::begin_in`]: its loads read over the transaction's connection, its
/// [`commit`](TxContext::commit) writes over it, and a failed commit is diagnosed over it. The
/// unit of work takes no connection from the store's pool, so behind a transaction-mode pooler
/// (pgbouncer) each concurrent unit needs one server connection, and a pool of the application's
/// own is never asked for a second connection while it holds the first.
///
/// Loads see what the transaction wrote itself, committed or not: the caller's own rows, and
/// the events of another context bound to it before. At `REPEATABLE READ` and `SERIALIZABLE`
/// they read the transaction's snapshot, so what the context loads is what the transaction can
/// commit on top of (no [`Error::StaleTransaction`](crate::Error::StaleTransaction)); an
/// aggregate committed by another unit after that snapshot makes the commit fail with
/// [`Error::Conflict`](crate::Error::Conflict), whose `actual` is then the version the
/// snapshot shows.
///
/// It derefs to [`Context`] for everything that does not read: `apply`, `apply_with`,
/// `create`, metadata, `staged_events`. The loaders here have the names and signatures of
/// [`Context`]'s and shadow them; [`connection`](TxContext::connection) lends the connection
/// for the caller's own queries in between.
///
/// [`commit`](TxContext::commit) fails as [`Context::commit`] does:
/// [`Error::Conflict`](crate::Error::Conflict), [`Error::KeyTaken`](crate::Error::KeyTaken),
/// [`Error::IdTaken`](crate::Error::IdTaken), and a key clash on an aggregate from
/// [`load_or_create_by_key`](TxContext::load_or_create_by_key) is a retryable `Conflict`. It runs
/// under a savepoint that it rolls back on failure: the transaction stays usable (what the
/// caller wrote in it before is still there) and holds nothing of the context. A conflict still
/// means re-running the unit, loads included, usually in a new transaction (at `REPEATABLE
/// READ` and above, a new transaction is the only way to see the newer version). Waiters are
/// notified when the transaction commits.
///
/// One write may take a connection from the store's pool: the name of an aggregate or event
/// type that is not in the registry (a hand-written `Aggregate` impl, never a derived one) is
/// written there in autocommit on its first commit, because it must outlive a rollback of the
/// transaction.
///
/// Dropped without committing, it writes nothing; the transaction is the caller's to commit or
/// roll back either way.
///
/// ```no_run
/// use annals::prelude::*;
/// use annals::{IsConflict, sqlx};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Event, Serialize, Deserialize)]
/// struct Reserved { quantity: i64 }
///
/// #[derive(Aggregate, Serialize, Deserialize, Default)]
/// #[aggregate(name = "stock", events(Reserved))]
/// struct Stock { reserved: i64 }
///
/// impl Apply<Reserved> for Stock {
///     fn apply(&mut self, e: &Reserved) { self.reserved += e.quantity }
/// }
///
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// let url = "postgres://app@localhost/shop";
/// let store = Store::open(url).await?;
/// let pool = sqlx::PgPool::connect(url).await?;
///
/// loop {
///     let mut tx = pool.begin().await?;
///     let mut ctx = store.begin_in(&mut tx)?;
///     let mut stock = ctx.load_or_create_by_key::<Stock>("sku-42").await?; // over `tx`
///     ctx.apply(&mut stock, Reserved { quantity: 2 })?;
///     sqlx::query("INSERT INTO reservations (sku, quantity) VALUES ($1, $2)")
///         .bind("sku-42")
///         .bind(2_i64)
///         .execute(ctx.connection())
///         .await?;
///     match ctx.commit().await {
///         Ok(_) => {
///             tx.commit().await?; // the reservation and the stock's event, together
///             break;
///         }
///         Err(e) if e.is_conflict() => tx.rollback().await?, // another unit came first: again
///         Err(e) => return Err(e.into()),
///     }
/// }
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct TxContext<'c> {
    ctx: Context,
    conn: &'c mut PgConnection,
}

impl Store {
    /// A new read-write context bound to the caller's open transaction on `conn` (`&mut tx`
    /// for a `sqlx::Transaction<'_, Postgres>`): it loads and commits over that connection and
    /// takes none from the store's pool. See [`TxContext`].
    ///
    /// `conn` must be to the store's database, inside a transaction (the commit fails with
    /// [`Error::Config`](crate::Error::Config) otherwise). On a store opened with
    /// [`StoreOptions::read_only`](crate::StoreOptions::read_only), the context is read-only.
    /// Fails with [`Error::Config`](crate::Error::Config) on a store that is not PostgreSQL.
    pub fn begin_in<'c>(&self, conn: &'c mut PgConnection) -> Result<TxContext<'c>> {
        postgres::of(self)?;
        Ok(TxContext {
            ctx: self.begin(),
            conn,
        })
    }
}

impl<'c> TxContext<'c> {
    /// The transaction's connection, for the caller's own queries between loads and the commit.
    pub fn connection(&mut self) -> &mut PgConnection {
        self.conn
    }

    /// [`Context::load`], read over the transaction's connection.
    pub async fn load<A: Aggregate>(&mut self, id: AggregateId) -> Result<Root<A>> {
        let via = &mut Via::Caller(&mut *self.conn);
        self.ctx.load_via(via, id).await
    }

    /// [`Context::load_by_key`], read over the transaction's connection.
    pub async fn load_by_key<A: Aggregate>(&mut self, key: &str) -> Result<Root<A>> {
        let via = &mut Via::Caller(&mut *self.conn);
        self.ctx.load_by_key_via(via, key).await
    }

    /// [`Context::find_by_key`], read over the transaction's connection.
    pub async fn find_by_key<A: Aggregate>(&mut self, key: &str) -> Result<Option<Root<A>>> {
        let via = &mut Via::Caller(&mut *self.conn);
        self.ctx.find_by_key_via(via, key).await
    }

    /// [`Context::load_or_create_by_key`], read over the transaction's connection.
    pub async fn load_or_create_by_key<A: Aggregate>(&mut self, key: &str) -> Result<Root<A>> {
        let via = &mut Via::Caller(&mut *self.conn);
        self.ctx.load_or_create_by_key_via(via, key).await
    }

    /// [`Context::create_with_key`], checked over the transaction's connection.
    pub async fn create_with_key<A: Aggregate>(&mut self, key: &str) -> Result<Root<A>> {
        let via = &mut Via::Caller(&mut *self.conn);
        self.ctx.create_with_key_via(via, key).await
    }

    /// [`Context::create_with_id`], checked over the transaction's connection.
    pub async fn create_with_id<A: Aggregate>(
        &mut self,
        id: impl Into<AggregateId>,
    ) -> Result<Root<A>> {
        let via = &mut Via::Caller(&mut *self.conn);
        self.ctx.create_with_id_via(via, id.into()).await
    }

    /// Writes every staged event and snapshot into the caller's transaction: visible to others,
    /// and to waiters, when the caller commits it; gone if it rolls back. Fails as
    /// [`Context::commit`] does, leaving the transaction usable and without anything of this
    /// context (see [`TxContext`]). A context with nothing staged sends nothing.
    ///
    /// With ids chosen by the caller ([`set_idempotency_key`](Context::set_idempotency_key)), a
    /// unit of work whose events were committed before is
    /// [already committed](Committed::already_committed), looked up over the transaction's
    /// connection: nothing of this context was written; roll the transaction back, since the
    /// first run's own writes committed with its events.
    pub async fn commit(self) -> Result<Committed> {
        let TxContext { mut ctx, conn } = self;
        let cached = ctx.take_cached();
        let chosen_ids = ctx.chosen_ids;
        let Some((clashes, store, batch)) = ctx.into_commit()? else {
            return Ok(Committed::fresh());
        };
        let span = commit_span(&batch, true);
        let result = postgres::of(&store)?
            .commit_bound(conn, &batch)
            .instrument(span)
            .await;
        // The caller may still roll the transaction back: the cache forgets these aggregates.
        if let Some(cached) = cached {
            cached.discarded(&store);
        }
        match result {
            Ok(()) => Ok(Committed::fresh()),
            Err(e) => {
                let via = &mut Via::Caller(conn);
                if chosen_ids && let Some(outcome) = stored_already_via(&store, via, &batch).await {
                    return outcome;
                }
                Err(clashes.classify(&store, via, e).await)
            }
        }
    }
}

impl Deref for TxContext<'_> {
    type Target = Context;

    fn deref(&self) -> &Context {
        &self.ctx
    }
}

impl DerefMut for TxContext<'_> {
    fn deref_mut(&mut self) -> &mut Context {
        &mut self.ctx
    }
}
