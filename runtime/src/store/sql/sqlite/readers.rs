//! The readers: a bounded set of read-only connections, each used by one caller at a time. A
//! load or feed read is one call: it takes a connection, runs every statement it needs where
//! blocking is allowed (in place on a multi-threaded tokio runtime, on a blocking thread on a
//! current-thread one), and puts the connection back.
//!
//! In WAL mode a reader sees the last committed state and never blocks the writer. Connections
//! are opened on first need, up to [`StoreOptions::pool_size`](crate::StoreOptions::pool_size).
//! A caller that drops its future while waiting for a connection holds nothing; the work itself
//! is never left half done: in place it cannot be interrupted, and on a blocking thread it runs
//! to its end and the connection returns to the set then.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use rusqlite::Connection;
use tokio::runtime::RuntimeFlavor;
use tokio::sync::Semaphore;

use super::connect::open_reader;
use super::writer::closed;
use crate::error::{Error, Result};
use crate::store::StoreOptions;

#[derive(Debug)]
struct Shared {
    path: PathBuf,
    options: StoreOptions,
    idle: Mutex<Vec<Connection>>,
    closed: AtomicBool,
}

/// The set of reader connections of one store.
#[derive(Debug, Clone)]
pub(super) struct Readers {
    shared: Arc<Shared>,
    permits: Arc<Semaphore>,
}

impl Readers {
    /// Readers of the file at `path`, at most `options.pool_size` at once.
    pub fn new(path: PathBuf, options: &StoreOptions) -> Readers {
        let size = usize::try_from(options.pool_size).unwrap_or(1).max(1);
        Readers {
            shared: Arc::new(Shared {
                path,
                options: options.clone(),
                idle: Mutex::new(Vec::with_capacity(size)),
                closed: AtomicBool::new(false),
            }),
            permits: Arc::new(Semaphore::new(size)),
        }
    }

    /// Runs `work` on a reader connection, on a blocking thread.
    pub async fn run<T, F>(&self, work: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| closed())?;
        let shared = self.shared.clone();
        let job = move || {
            let _permit = permit;
            if shared.closed.load(Ordering::Acquire) {
                return Err(closed());
            }
            let idle = shared.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
            let mut conn = match idle {
                Some(conn) => conn,
                None => open_reader(&shared.path, &shared.options)?,
            };
            let out = work(&mut conn);
            if !shared.closed.load(Ordering::Acquire) {
                shared
                    .idle
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(conn);
            }
            out
        };
        match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            // On a multi-threaded runtime the read runs right here, and tokio hands this
            // worker's other tasks to another thread meanwhile: the rows are built and used on
            // one thread, which halves the cost of a large load against a hop to a blocking
            // thread and back (measured: benches/sqlite.rs, W4 and W5).
            Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(job),
            // A current-thread runtime cannot give its thread away: a blocking thread reads.
            Ok(_) => tokio::task::spawn_blocking(job)
                .await
                .map_err(|e| Error::Backend(format!("a SQLite reader task failed: {e}").into()))?,
            // Outside tokio (another executor), block in place: there is no pool to hand to.
            Err(_) => job(),
        }
    }

    /// Closes the idle connections and refuses later work; connections in use close when their
    /// work ends.
    pub fn close(&self) {
        self.shared.closed.store(true, Ordering::Release);
        self.permits.close();
        let idle = std::mem::take(&mut *self.shared.idle.lock().unwrap_or_else(|e| e.into_inner()));
        drop(idle);
    }
}
