//! The writer thread: one thread owns the store's one read-write connection and runs whole
//! units of work on it, one at a time, in the order they were sent.
//!
//! A commit is one message: the thread runs every statement of it (`BEGIN IMMEDIATE` to
//! `COMMIT`) without going back to async code, and answers on a oneshot channel. The async side
//! only awaits that answer, so dropping its future can never leave the connection inside a
//! transaction: work that has not started when its caller gives up is skipped, work that has
//! started runs to its end (commit or rollback), and the next message finds the connection idle.
//!
//! Commits that wait while the thread is busy are taken together: the thread commits them in
//! one transaction, each in a savepoint of its own, so that concurrent writers share one sync
//! of the log (see [`commit_group`]).

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use rusqlite::Connection;
use tokio::sync::oneshot;

use super::Shared;
use super::commit::{CommitJob, commit_group};
use crate::error::{Error, Result};
use crate::event::FeedCursor;
use crate::store::CommitBatch;

/// The most commits taken into one transaction.
const GROUP: usize = 64;

enum Job {
    /// Work that runs alone.
    Alone(Box<dyn FnOnce(&mut Connection) + Send>),
    /// A commit, which runs together with the commits waiting behind it.
    Commit(CommitJob),
}

/// The handle to the writer thread. Dropping it (or [`close`](Writer::close)) lets the thread
/// finish the work already sent, close the connection and end.
#[derive(Debug)]
pub(super) struct Writer {
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Writer {
    /// Starts the thread that owns `conn`, and commits with what the store's handles share.
    pub fn spawn(conn: Connection, shared: Arc<Shared>, name: &str) -> Result<Writer> {
        let (jobs, queue) = mpsc::channel::<Job>();
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || serve(conn, &shared, &queue))
            .map_err(|e| Error::Backend(Box::new(e)))?;
        Ok(Writer {
            jobs: Mutex::new(Some(jobs)),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Runs `work` on the writer's connection and returns what it returns. If the returned
    /// future is dropped before the thread picks the work up, the work is skipped.
    pub fn run<T, F>(&self, work: F) -> impl Future<Output = Result<T>> + Send + use<T, F>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job = Job::Alone(Box::new(move |conn| {
            if reply.is_closed() {
                return;
            }
            let _ = reply.send(work(conn));
        }));
        self.send(job, answer)
    }

    /// Commits `batch`, together with the commits queued beside it; the events' cursors when
    /// the batch asks for them.
    pub fn commit(
        &self,
        batch: CommitBatch,
    ) -> impl Future<Output = Result<Vec<FeedCursor>>> + Send + use<> {
        let (reply, answer) = oneshot::channel();
        self.send(Job::Commit(CommitJob { batch, reply }), answer)
    }

    fn send<T: Send + 'static>(
        &self,
        job: Job,
        answer: oneshot::Receiver<Result<T>>,
    ) -> impl Future<Output = Result<T>> + Send + use<T> {
        let sent = match &*self.jobs.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(jobs) => jobs.send(job).is_ok(),
            None => false,
        };
        async move {
            if !sent {
                return Err(closed());
            }
            answer.await.unwrap_or_else(|_| Err(closed()))
        }
    }

    /// Stops taking work, lets the thread finish what was sent, and waits for it to close the
    /// connection.
    pub async fn close(&self) {
        drop(self.jobs.lock().unwrap_or_else(|e| e.into_inner()).take());
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(thread) = thread {
            // Joining blocks: do it where blocking is allowed.
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

/// The thread's loop, until every sender is gone: one job at a time, except that a commit is
/// taken with the commits queued right behind it (up to [`GROUP`]).
fn serve(mut conn: Connection, shared: &Shared, queue: &mpsc::Receiver<Job>) {
    let mut next = None;
    while let Some(job) = next.take().or_else(|| queue.recv().ok()) {
        let work = || match job {
            Job::Alone(work) => work(&mut conn),
            Job::Commit(first) => {
                let mut group = vec![first];
                while group.len() < GROUP {
                    match queue.try_recv() {
                        Ok(Job::Commit(commit)) => group.push(commit),
                        Ok(other) => {
                            next = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                commit_group(&mut conn, shared, group);
            }
        };
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work));
        if outcome.is_err() {
            tracing::error!("a SQLite writer job panicked; its transaction was rolled back");
        }
        if !conn.is_autocommit() {
            // Work never leaves a transaction open; make sure of it, so the next commit can
            // begin its own.
            let _ = conn.execute_batch("ROLLBACK");
        }
    }
}

/// The error for work sent to a closed store.
pub(super) fn closed() -> Error {
    Error::Backend("the SQLite store is closed".into())
}
