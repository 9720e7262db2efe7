//! Connections handed from one statement to the next. sqlx takes a connection back into its
//! pool with a round trip to the server (a `Sync`, in a task of its own) to check it is still
//! usable; a command's load and commit, each a statement of its own on the pool, paid it twice.
//! Here a connection whose statement completed is parked for the next load, locate, commit,
//! feed read or stream read, which takes it without that round trip.
//!
//! What keeps it safe:
//! - only a connection whose statement returned `Ok` is parked: one whose statement failed or
//!   whose future was dropped goes back to sqlx, which checks it;
//! - a statement that waits for sqlx's pool is counted, and while any waits, connections go
//!   back to sqlx instead of being parked: no statement waits while a connection is parked;
//! - at most half the pool is parked, so the store's other work (transactions, subscriptions)
//!   always finds the rest;
//! - a connection parked longer than [`MAX_PARKED`] goes back to sqlx (whose checks then apply:
//!   the ping after a long idle, the idle timeout, the maximum lifetime);
//! - closing the store gives every parked connection back before the pool closes;
//! - only a pool the store opened itself parks connections: an application's own pool never
//!   has its connections held.

use std::ops::{Deref, DerefMut};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use sqlx::Postgres;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnection, PgPool};

use crate::error::Result;
use crate::store::sql::backend_error;

/// How long a connection stays parked: a hot one is reused at once, one left longer goes back
/// to sqlx.
const MAX_PARKED: Duration = Duration::from_secs(1);

/// The parked connections of one store.
#[derive(Debug)]
pub(super) struct Warm {
    /// At most this many parked; 0 parks none.
    capacity: usize,
    /// Whether sqlx spawns nothing when a detached connection drops (its pool keeps no
    /// minimum of connections).
    detach_spawns_nothing: bool,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Oldest first.
    parked: Vec<(PoolConnection<Postgres>, Instant)>,
    /// Statements waiting for sqlx's pool.
    waiting: usize,
    closed: bool,
}

impl Warm {
    /// Parks up to half of `pool`'s connections, or none when `enabled` is false.
    pub fn new(pool: &PgPool, enabled: bool) -> Self {
        let options = pool.options();
        let capacity = if enabled {
            options.get_max_connections() as usize / 2
        } else {
            0
        };
        Warm {
            capacity,
            detach_spawns_nothing: options.get_min_connections() == 0,
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every change is one push, pop or count: a panic elsewhere leaves nothing half-done.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A connection for one statement: the most recently parked, or one from `pool`.
    pub async fn checkout<'a>(&'a self, pool: &PgPool) -> Result<Checkout<'a>> {
        let stale = {
            let mut state = self.lock();
            let mut stale = Vec::new();
            while let Some((conn, parked)) = state.parked.pop() {
                if parked.elapsed() < MAX_PARKED {
                    return Ok(Checkout { conn, warm: self });
                }
                stale.push(conn);
            }
            state.waiting += 1;
            stale
        };
        let waiting = Waiting(self);
        drop(stale);
        let conn = pool.acquire().await.map_err(backend_error)?;
        drop(waiting);
        Ok(Checkout { conn, warm: self })
    }

    /// Keeps `conn`, whose statement completed, for the next checkout; or gives it back to
    /// sqlx when the store is closing, a statement waits for the pool, or enough are parked.
    fn park(&self, conn: PoolConnection<Postgres>) {
        let mut state = self.lock();
        if state.closed || state.waiting > 0 || state.parked.len() >= self.capacity {
            drop(state);
            drop(conn);
            return;
        }
        // The oldest goes back to sqlx when it has been parked too long.
        let stale = match state.parked.first() {
            Some((_, parked)) if parked.elapsed() >= MAX_PARKED => Some(state.parked.remove(0).0),
            _ => None,
        };
        state.parked.push((conn, Instant::now()));
        drop(state);
        drop(stale);
    }

    /// Gives every parked connection back to sqlx, and parks none from now on.
    pub fn close(&self) {
        let parked = {
            let mut state = self.lock();
            state.closed = true;
            std::mem::take(&mut state.parked)
        };
        drop(parked);
    }
}

impl Drop for Warm {
    fn drop(&mut self) {
        let state = self.state.get_mut().unwrap_or_else(PoisonError::into_inner);
        let parked = std::mem::take(&mut state.parked);
        // sqlx gives a connection back to its pool in a task, which needs a runtime. Without
        // one (a store dropped after its runtime), a connection is detached and closed here;
        // where even that would spawn (a pool keeping a minimum of connections), it is left
        // open until the process ends rather than panicking.
        if tokio::runtime::Handle::try_current().is_ok() {
            drop(parked);
            return;
        }
        for (conn, _) in parked {
            if self.detach_spawns_nothing {
                drop(conn.detach());
            } else {
                std::mem::forget(conn);
            }
        }
    }
}

/// Decrements the count of statements waiting for the pool, when the wait ends or is dropped.
struct Waiting<'a>(&'a Warm);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.lock().waiting -= 1;
    }
}

/// One connection checked out for a statement. Call [`done`](Checkout::done) once the
/// statement returned `Ok`; dropped without it, the connection goes back to sqlx, which checks
/// it.
pub(super) struct Checkout<'a> {
    conn: PoolConnection<Postgres>,
    warm: &'a Warm,
}

impl Checkout<'_> {
    /// The statement completed: the connection may serve the next one.
    pub fn done(self) {
        let Checkout { conn, warm } = self;
        warm.park(conn);
    }
}

impl Deref for Checkout<'_> {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        &self.conn
    }
}

impl DerefMut for Checkout<'_> {
    fn deref_mut(&mut self) -> &mut PgConnection {
        &mut self.conn
    }
}
