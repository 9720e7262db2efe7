//! Wake-ups across processes: the `LISTEN` task that wakes this process's waiters when another
//! process commits, and the `NOTIFY` task that announces this process's commits to the others.
//!
//! PostgreSQL serializes the commits of all transactions that `NOTIFY` (a database-wide lock
//! held through the commit's WAL flush), which halved the throughput of concurrent commits in
//! our benchmark: so a commit made through the pool does not notify itself; the task here sends
//! one `NOTIFY` after it, coalescing the commits made while one is on its way.

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgListener, PgPool};

use super::{PostgresBackend, query};
use crate::store::CommitSignal;

/// The shortest interval between two notifications of commits made through one store: a
/// commit after a quiet spell is announced at once, one in a stream at most this much later.
const NOTIFY_WINDOW: Duration = Duration::from_millis(5);

/// The longest pause between two attempts to restore the `LISTEN` connection.
const MAX_LISTEN_BACKOFF: Duration = Duration::from_secs(10);

/// What the background tasks share with waiters and committers.
#[derive(Debug, Default)]
pub(super) struct Wake {
    /// Fired on every notification, after each (re)connection of the listener, and after every
    /// commit made through this store.
    pub changed: CommitSignal,
    /// Asks the notifier task for a `NOTIFY`; a permit left while one is on its way makes one
    /// more, so every commit is followed by a notification.
    pub commits: tokio::sync::Notify,
}

/// The background tasks of one store, stopped when it closes or drops.
#[derive(Debug, Default)]
pub(super) struct Tasks {
    pub listener: Option<tokio::task::JoinHandle<()>>,
    pub notifier: Option<tokio::task::JoinHandle<()>>,
    pub closed: bool,
}

impl PostgresBackend {
    /// Starts the `LISTEN` task unless it runs or the store is closed.
    pub(super) fn start_listener(&self) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        if tasks.closed || tasks.listener.as_ref().is_some_and(|t| !t.is_finished()) {
            return;
        }
        // Notifications off: waiters poll.
        let Some(listener_pool) = &self.listener_pool else {
            return;
        };
        tasks.listener = Some(tokio::spawn(listen(
            listener_pool.clone(),
            self.names.channel.clone(),
            self.wake.clone(),
        )));
    }
}

/// Keeps one connection listening on `channel` and wakes waiters on every notification. While
/// it is down, waiters wait out their poll interval; after every reconnection they are woken,
/// since commits made meanwhile sent notifications nobody received.
async fn listen(pool: PgPool, channel: String, wake: Arc<Wake>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match subscribe(&pool, &channel).await {
            Ok(mut listener) => {
                tracing::debug!(%channel, "listening for commits");
                wake.changed.notify();
                backoff = Duration::from_millis(100);
                loop {
                    match listener.try_recv().await {
                        Ok(Some(_)) => wake.changed.notify(),
                        Ok(None) => {
                            tracing::warn!(%channel, "lost the LISTEN connection; polling until it is back");
                            break;
                        }
                        Err(error) => {
                            tracing::warn!(%channel, %error, "LISTEN failed; polling until it is back");
                            break;
                        }
                    }
                }
            }
            Err(error) => {
                tracing::warn!(%channel, %error, "cannot LISTEN; polling until it can");
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_LISTEN_BACKOFF);
    }
}

/// Sends a `NOTIFY` after commits made through this store, one for all the commits made while
/// the previous one was on its way. A lost notification only delays other processes' readers
/// until their next poll.
pub(super) async fn notify_commits(pool: PgPool, sql: Arc<str>, channel: String, wake: Arc<Wake>) {
    loop {
        wake.commits.notified().await;
        if let Err(error) = query(&sql).bind(channel.as_str()).execute(&pool).await {
            tracing::debug!(%channel, %error, "NOTIFY failed; other processes will poll");
        }
        // Under a stream of commits, one notification per window: a NOTIFY is a transaction of
        // its own, and the commits it would announce are already covered by the next one.
        tokio::time::sleep(NOTIFY_WINDOW).await;
    }
}

async fn subscribe(pool: &PgPool, channel: &str) -> sqlx::Result<PgListener> {
    let mut listener = PgListener::connect_with(pool).await?;
    // Reconnection is this task's own loop, which also wakes waiters after it.
    listener.eager_reconnect(false);
    listener.listen(channel).await?;
    Ok(listener)
}
