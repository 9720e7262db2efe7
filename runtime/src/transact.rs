//! Running work in a context: [`Store::transact`] commits what a closure staged, and
//! [`Store::transact_with_retry`] re-runs it on a concurrency conflict.
//!
//! Both return a future that owns what it needs (a clone of the store, the closure) and borrows
//! nothing from the call, so an `async fn` that calls them with borrowed arguments can be passed
//! to `tokio::spawn` or used as a web handler.

use crate::context::Context;
use crate::error::{Error, IsConflict};
use crate::retry::Retry;
use crate::store::Store;

impl Store {
    /// Runs `work` in a new context and commits what it staged when it returns `Ok`; on `Err`,
    /// nothing is written and the error comes back unchanged.
    ///
    /// The error type is the caller's own; store errors convert into it through `From`.
    ///
    /// ```
    /// # use annals::prelude::*;
    /// # use serde::{Deserialize, Serialize};
    /// # #[derive(Event, Serialize, Deserialize)]
    /// # #[event(name = "doc.transact.deposited")]
    /// # struct Deposited { amount: i64 }
    /// # #[derive(Aggregate, Serialize, Deserialize, Default)]
    /// # #[aggregate(name = "doc.transact.account", events(Deposited))]
    /// # struct Account { balance: i64 }
    /// # impl Apply<Deposited> for Account {
    /// #     fn apply(&mut self, e: &Deposited) { self.balance += e.amount }
    /// # }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), annals::Error> {
    /// let store = Store::open("memory:").await?;
    /// let id = store.transact(async |ctx| {
    ///     let mut account = ctx.load_or_create_by_key::<Account>("alice").await?;
    ///     ctx.apply(&mut account, Deposited { amount: 30 })?;
    ///     Ok::<_, annals::Error>(account.id())
    /// }).await?;
    /// assert_eq!(store.begin_read_only().load::<Account>(id).await?.balance, 30);
    /// # Ok(()) }
    /// ```
    // Not an `async fn`: the returned future owns a clone of the store instead of borrowing
    // `self`, which keeps it `Send` where the closure's future is (a borrowed `&Store` held
    // across the closure's await defeats the compiler's `Send` proof).
    pub fn transact<T, E, F>(
        &self,
        work: F,
    ) -> impl Future<Output = std::result::Result<T, E>> + use<T, E, F>
    where
        F: AsyncFnOnce(&mut Context) -> std::result::Result<T, E>,
        E: From<Error>,
    {
        let mut ctx = self.begin();
        async move {
            let out = work(&mut ctx).await?;
            ctx.commit().await?;
            Ok(out)
        }
    }

    /// Like [`transact`](Store::transact), but re-runs the whole of `work` in a fresh context
    /// when it or its commit fails with a concurrency conflict (see [`IsConflict`]), as `retry`
    /// allows. Any other error, or a conflict on the last attempt, comes back to the caller.
    ///
    /// Each attempt calls a fresh clone of `work`, so the closure must be `Clone`: an async
    /// closure is when everything it captures is (references, `Copy` values, clones of owned
    /// values). This is what lets a helper with borrowed arguments run in a spawned task or a
    /// web handler:
    ///
    /// ```
    /// # use annals::prelude::*;
    /// # use serde::{Deserialize, Serialize};
    /// # #[derive(Event, Serialize, Deserialize)]
    /// # #[event(name = "doc.retry.deposited")]
    /// # struct Deposited { amount: i64 }
    /// # #[derive(Aggregate, Serialize, Deserialize, Default)]
    /// # #[aggregate(name = "doc.retry.account", events(Deposited))]
    /// # struct Account { balance: i64 }
    /// # impl Apply<Deposited> for Account {
    /// #     fn apply(&mut self, e: &Deposited) { self.balance += e.amount }
    /// # }
    /// async fn deposit(store: &Store, key: &str, amount: i64) -> Result<(), annals::Error> {
    ///     store
    ///         .transact_with_retry(Retry::default(), async |ctx| {
    ///             let mut account = ctx.load_or_create_by_key::<Account>(key).await?;
    ///             ctx.apply(&mut account, Deposited { amount })?;
    ///             Ok(())
    ///         })
    ///         .await
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let store = Store::open("memory:").await?;
    /// let tasks: Vec<_> = (0..8)
    ///     .map(|_| {
    ///         let store = store.clone();
    ///         tokio::spawn(async move { deposit(&store, "alice", 10).await })
    ///     })
    ///     .collect();
    /// for task in tasks {
    ///     task.await??;
    /// }
    /// let alice = store.begin_read_only().load_by_key::<Account>("alice").await?;
    /// assert_eq!(alice.balance, 80);
    /// # Ok(()) }
    /// ```
    ///
    /// State that must outlive one attempt (a counter of attempts, say) goes in a `Cell` or an
    /// atomic that the closure borrows; a closure that mutates what it captures (`attempts +=
    /// 1`) is not `Clone`:
    ///
    /// ```
    /// # use annals::prelude::*;
    /// # async fn demo(store: &Store) -> Result<(), annals::Error> {
    /// let attempts = std::cell::Cell::new(0);
    /// store.transact_with_retry(Retry::attempts(3), async |_ctx| {
    ///     attempts.set(attempts.get() + 1);
    ///     Ok::<_, annals::Error>(())
    /// }).await?;
    /// # Ok(()) }
    /// ```
    ///
    /// Why not `AsyncFnMut`: rustc (1.95) cannot prove `Send` for the future of an `AsyncFnMut`
    /// closure called through a borrow of itself when that closure captures a reference, and
    /// reports it at the `tokio::spawn` that needs it, far from the cause:
    ///
    /// ```text
    /// error: implementation of `Send` is not general enough
    ///     = note: `Send` would have to be implemented for the type `&annals::Store`
    ///     = note: ...but `Send` is actually implemented for the type `&'0 annals::Store`, for some specific lifetime `'0`
    /// ```
    ///
    /// Calling a clone once per attempt (`AsyncFnOnce`) has no such borrow, and compiles.
    ///
    /// # Sizing the retries
    ///
    /// Every attempt re-reads what it loads, so a conflict costs one attempt's work. With `n`
    /// writers contending for one aggregate, each commit lets one of them through, so the last
    /// one may need about `n` attempts: give `max_attempts` at least the number of concurrent
    /// writers of your hottest aggregate (the default, 10, suits a handful). The jittered waits
    /// (see [`Retry`]) spread the writers out; raise `max_delay` rather than `max_attempts`
    /// when attempts are expensive. A conflict that still reaches the caller means the
    /// aggregate is too hot for optimistic writes: split it, or queue its commands.
    pub fn transact_with_retry<T, E, F>(
        &self,
        retry: Retry,
        work: F,
    ) -> impl Future<Output = std::result::Result<T, E>> + use<T, E, F>
    where
        F: AsyncFnOnce(&mut Context) -> std::result::Result<T, E> + Clone,
        E: From<Error> + IsConflict,
    {
        let store = self.clone();
        async move {
            let mut attempt = 1;
            loop {
                let mut ctx = store.begin();
                let result = match work.clone()(&mut ctx).await {
                    Ok(out) => ctx.commit().await.map(|_| out).map_err(E::from),
                    Err(e) => Err(e),
                };
                match result {
                    Err(e) if e.is_conflict() && attempt < retry.max_attempts => {
                        tracing::debug!(attempt, "conflict, retrying");
                        tokio::time::sleep(retry.delay(attempt)).await;
                        attempt += 1;
                    }
                    other => return other,
                }
            }
        }
    }
}
