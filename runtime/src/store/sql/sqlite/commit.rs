//! A commit on SQLite: the version checks (compare-and-set, or the insert of a new aggregate's
//! row), the multi-row event inserts, the snapshots, and the diagnosis of a failed check as
//! [`Error::Conflict`] or [`Error::KeyTaken`]. Runs whole on one connection: the writer
//! thread's in its own `BEGIN IMMEDIATE` transaction, or a caller's inside theirs.

use std::sync::Arc;

use rusqlite::{Connection, OptionalExtension, Statement, TransactionBehavior};
use tokio::sync::oneshot;

use super::Shared;
use super::names::{self, Resolver};
use super::render::{EVENT_CHUNK, Statements};
use crate::aggregate::AggregateId;
use crate::error::{Error, Result};
use crate::event::FeedCursor;
use crate::store::sql::backend_error;
use crate::store::sql::types::{TypeKind, TypeMap};
use crate::store::{Change, CommitBatch, Prune, to_i64, to_micros, to_u64};
use crate::subscription::inline::statement_failed;

/// Commits `batch` on the writer's connection in one `BEGIN IMMEDIATE` transaction; the
/// events' cursors when the batch asks for them.
fn commit(conn: &mut Connection, shared: &Shared, batch: &CommitBatch) -> Result<Vec<FeedCursor>> {
    let types = TypeIds::ensure(conn, shared, batch)?;
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(backend_error)?;
    let cursors = write_now(&tx, shared, batch, &types)?;
    // On an error above, dropping `tx` rolls back.
    tx.commit().map_err(backend_error)?;
    Ok(cursors)
}

/// A commit waiting for the writer thread: its batch and where to send the outcome.
pub(super) struct CommitJob {
    pub batch: CommitBatch,
    pub reply: oneshot::Sender<Result<Vec<FeedCursor>>>,
}

impl CommitJob {
    /// Commits this job in a transaction of its own and answers.
    fn run_alone(self, conn: &mut Connection, shared: &Shared) {
        let outcome = commit(conn, shared, &self.batch);
        if outcome.is_ok() {
            shared.committed.notify();
        }
        let _ = self.reply.send(outcome);
    }
}

/// Commits the commits that were waiting together in one transaction, each in a savepoint of
/// its own: one that fails (a conflict, a taken key, a failed projection statement) is rolled
/// back to its savepoint and answered with its error, the others commit together, with one
/// sync of the log for all of them. Each is answered only once the transaction has committed.
///
/// The outcome of each is what it would have been alone, in the order sent: a commit sees the
/// writes of the ones before it in the group, as it would have after their own transactions.
/// Should SQLite roll the whole transaction back (an I/O error, a full disk) or the final
/// `COMMIT` fail, nothing of the group was written, and each commit is run again alone.
pub(super) fn commit_group(conn: &mut Connection, shared: &Shared, jobs: Vec<CommitJob>) {
    // A caller that gave up before its commit started gets nothing written.
    let mut jobs: Vec<CommitJob> = jobs.into_iter().filter(|j| !j.reply.is_closed()).collect();
    if jobs.len() <= 1 {
        if let Some(job) = jobs.pop() {
            job.run_alone(conn, shared);
        }
        return;
    }
    // Type names first seen now are written before the transaction, as alone.
    let mut ready = Vec::with_capacity(jobs.len());
    for job in jobs {
        match TypeIds::ensure(conn, shared, &job.batch) {
            Ok(types) => ready.push((job, types)),
            Err(error) => {
                let _ = job.reply.send(Err(error));
            }
        }
    }
    match write_group(conn, shared, &ready) {
        Some(outcomes) => {
            if outcomes.iter().any(Result::is_ok) {
                shared.committed.notify();
            }
            for ((job, _), outcome) in ready.into_iter().zip(outcomes) {
                let _ = job.reply.send(outcome);
            }
        }
        None => {
            for (job, _) in ready {
                job.run_alone(conn, shared);
            }
        }
    }
}

/// Writes each job in a savepoint of one `BEGIN IMMEDIATE` transaction and commits it: the
/// outcome of each, or `None` when the transaction wrote nothing (it could not begin, SQLite
/// rolled it back, or its `COMMIT` failed).
fn write_group(
    conn: &mut Connection,
    shared: &Shared,
    jobs: &[(CommitJob, TypeIds)],
) -> Option<Vec<Result<Vec<FeedCursor>>>> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .ok()?;
    let mut outcomes = Vec::with_capacity(jobs.len());
    for (job, types) in jobs {
        let savepoint = |statement: &str| {
            tx.prepare_cached(statement)
                .and_then(|mut stmt| stmt.execute(()))
                .map(drop)
        };
        savepoint("SAVEPOINT annals_commit").ok()?;
        let outcome = write_now(&tx, shared, &job.batch, types);
        if tx.is_autocommit() {
            // SQLite rolled the whole transaction back.
            return None;
        }
        if outcome.is_err() {
            savepoint("ROLLBACK TO annals_commit").ok()?;
        }
        savepoint("RELEASE annals_commit").ok()?;
        outcomes.push(outcome);
    }
    tx.commit().ok()?;
    Some(outcomes)
}

/// The type ids of a batch's aggregate and event types, written first if new.
struct TypeIds {
    aggregates: Arc<TypeMap>,
    events: Arc<TypeMap>,
}

impl TypeIds {
    /// Looks the batch's type names up, and writes the ones first seen now, outside any
    /// transaction: a type name is harmless on its own, and the commit transaction stays short.
    fn ensure(conn: &Connection, shared: &Shared, batch: &CommitBatch) -> Result<TypeIds> {
        let (sql, cache) = (&shared.sql, &shared.types);
        Ok(TypeIds {
            aggregates: names::ensure(
                conn,
                sql,
                cache,
                TypeKind::Aggregate,
                aggregate_names(batch),
            )?,
            events: names::ensure(conn, sql, cache, TypeKind::Event, event_names(batch))?,
        })
    }
}

/// Writes `batch` inside the writer's transaction, taking its erasures at their aggregates'
/// versions now.
fn write_now(
    conn: &Connection,
    shared: &Shared,
    batch: &CommitBatch,
    types: &TypeIds,
) -> Result<Vec<FeedCursor>> {
    let erasing;
    let batch = if batch.erases() {
        erasing = erasing_now(conn, &shared.sql, batch)?;
        &erasing
    } else {
        batch
    };
    write(conn, shared, batch, &types.aggregates, &types.events)
}

/// Writes `batch` on a caller's connection, inside the transaction it is in. Writes no type
/// name (the store wrote every registered one at open): a name missing from the cache is
/// looked up again on this connection.
pub(super) fn commit_in(conn: &Connection, shared: &Shared, batch: &CommitBatch) -> Result<()> {
    let mut types = Resolver::new(conn, &shared.sql, &shared.types);
    let aggregates = types.map_with_names(TypeKind::Aggregate, aggregate_names(batch))?;
    let events = types.map_with_names(TypeKind::Event, event_names(batch))?;
    write(conn, shared, batch, &aggregates, &events).map(drop)
}

fn aggregate_names(batch: &CommitBatch) -> impl Iterator<Item = &str> {
    batch.changes.iter().map(|c| c.aggregate_type)
}

fn event_names(batch: &CommitBatch) -> impl Iterator<Item = &str> {
    batch
        .changes
        .iter()
        .flat_map(|c| c.events.iter().map(|e| e.name))
}

/// Writes `batch` on `conn`, inside the transaction the connection is in, with type ids from
/// `aggregates` and `events`; returns the events' cursors when the batch asks for them.
fn write(
    conn: &Connection,
    shared: &Shared,
    batch: &CommitBatch,
    aggregates: &TypeMap,
    events: &TypeMap,
) -> Result<Vec<FeedCursor>> {
    let sql = &shared.sql;
    let recorded_at = to_micros(batch.recorded_at);
    // Where this commit's events will start, for the inline projections.
    let before = if batch.inline.is_empty() {
        0
    } else {
        let end: Option<i64> = conn
            .prepare_cached(&sql.feed_end)
            .and_then(|mut stmt| stmt.query_row((), |row| row.get(0)))
            .map_err(backend_error)?;
        to_u64(end.unwrap_or(0), "position")?
    };
    for change in &batch.changes {
        claim(
            conn,
            shared,
            change,
            aggregates.id_of(change.aggregate_type)?,
        )?;
        if change.erase {
            erase(conn, sql, change)?;
        }
    }
    if batch.rekeys() {
        rekey(conn, shared, batch)?;
    }
    // All events of the batch, in apply order, in multi-row INSERTs.
    let in_order = batch.events_in_order();
    let mut cursors = Vec::new();
    for chunk in in_order.chunks(EVENT_CHUNK) {
        let mut stmt = conn
            .prepare_cached(&sql.insert_events(chunk.len()))
            .map_err(backend_error)?;
        let mut index = 0;
        for (change, event) in chunk {
            bind(
                &mut stmt,
                &mut index,
                change.id.as_uuid().as_bytes().as_slice(),
            )?;
            bind(&mut stmt, &mut index, to_i64(event.version, "version")?)?;
            bind(&mut stmt, &mut index, events.id_of(event.name)?)?;
            bind(&mut stmt, &mut index, i64::from(event.schema_version))?;
            bind(&mut stmt, &mut index, event.payload.as_slice())?;
            bind(&mut stmt, &mut index, event.metadata.as_deref())?;
            bind(&mut stmt, &mut index, recorded_at)?;
            bind(&mut stmt, &mut index, event.event_id.as_bytes().as_slice())?;
        }
        stmt.raw_execute().map_err(backend_error)?;
        if batch.cursors {
            // One writer at a time: a statement's rows take consecutive positions.
            let last = to_u64(conn.last_insert_rowid(), "position")?;
            let first = (last + 1).saturating_sub(chunk.len() as u64);
            cursors.extend((first..=last).map(FeedCursor::at_position));
        }
    }
    for change in &batch.changes {
        if let Some(snapshot) = &change.snapshot {
            conn.prepare_cached(&sql.insert_snapshot)
                .map_err(backend_error)?
                .execute((
                    change.id.as_uuid().as_bytes().as_slice(),
                    i64::from(snapshot.snapshot_version),
                    to_i64(snapshot.version, "version")?,
                    snapshot.payload.as_slice(),
                    recorded_at,
                ))
                .map_err(backend_error)?;
        }
    }
    if !batch.inline.is_empty() {
        project(conn, shared, batch, before)?;
    }
    Ok(cursors)
}

/// `batch` with its erasures at the versions their aggregates have inside the write
/// transaction (see [`CommitBatch::erasing_at`]).
fn erasing_now(conn: &Connection, sql: &Statements, batch: &CommitBatch) -> Result<CommitBatch> {
    let mut current = Vec::new();
    let mut stmt = conn
        .prepare_cached(&sql.erase_state)
        .map_err(backend_error)?;
    for id in batch.erased_ids() {
        let row: Option<(i64, bool)> = stmt
            .query_row([id.as_uuid().as_bytes().as_slice()], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()
            .map_err(backend_error)?;
        if let Some((version, erased)) = row {
            current.push((id, to_u64(version, "version")?, erased));
        }
    }
    batch.erasing_at(&current)
}

/// Deletes an erased aggregate's events (up to the version the erasure checked) and snapshots,
/// and marks its row.
fn erase(conn: &Connection, sql: &Statements, change: &Change) -> Result<()> {
    let id = change.id.as_uuid().as_bytes().as_slice();
    let run = |statement: &str, params: &[&dyn rusqlite::ToSql]| {
        conn.prepare_cached(statement)
            .and_then(|mut stmt| stmt.execute(params))
            .map_err(backend_error)
    };
    run(
        &sql.erase_events,
        &[&id, &to_i64(change.expected, "version")?],
    )?;
    run(&sql.erase_snapshots, &[&id])?;
    run(&sql.mark_erased, &[&id])?;
    Ok(())
}

/// Deletes what `prune` names, in one statement; returns how many rows went.
pub(super) fn prune(conn: &Connection, sql: &Statements, prune: Prune) -> Result<u64> {
    let deleted = match prune {
        Prune::Events {
            id,
            snapshot_version,
        } => conn.prepare_cached(&sql.prune_events).and_then(|mut stmt| {
            stmt.execute((
                id.as_uuid().as_bytes().as_slice(),
                i64::from(snapshot_version),
            ))
        }),
        Prune::Snapshots {
            id,
            snapshot_version,
            keep,
        } => conn
            .prepare_cached(&sql.prune_snapshots)
            .and_then(|mut stmt| {
                stmt.execute((
                    id.as_uuid().as_bytes().as_slice(),
                    i64::from(snapshot_version),
                    i64::try_from(keep.saturating_sub(1)).unwrap_or(i64::MAX),
                ))
            }),
    }
    .map_err(backend_error)?;
    Ok(deleted as u64)
}

/// Runs the inline projections on the events this commit wrote (after position `before`), in
/// its transaction.
fn project(conn: &Connection, shared: &Shared, batch: &CommitBatch, before: u64) -> Result<()> {
    let events = super::feed::read_feed(
        conn,
        shared,
        FeedCursor::at_position(before),
        batch.event_count(),
    )?
    .into_events();
    for (name, statements) in batch.inline.statements(&events)? {
        for (sql, params) in statements {
            super::subscriptions::execute(conn, &sql, &params)
                .map_err(|e| statement_failed(name, e))?;
        }
    }
    Ok(())
}

fn bind(stmt: &mut Statement<'_>, index: &mut usize, value: impl rusqlite::ToSql) -> Result<()> {
    *index += 1;
    stmt.raw_bind_parameter(*index, value)
        .map_err(backend_error)
}

/// Writes the batch's key changes: every changed key is released first, so that aggregates may
/// trade keys in one commit; a key another aggregate holds is [`Error::KeyTaken`].
fn rekey(conn: &Connection, shared: &Shared, batch: &CommitBatch) -> Result<()> {
    let mut stmt = conn
        .prepare_cached(&shared.sql.set_key)
        .map_err(backend_error)?;
    let rekeyed = || batch.changes.iter().filter(|c| c.rekey.is_some());
    for change in rekeyed() {
        stmt.execute((change.id.as_uuid().as_bytes().as_slice(), None::<&str>))
            .map_err(backend_error)?;
    }
    for change in rekeyed() {
        let Some(Some(key)) = &change.rekey else {
            continue;
        };
        let set = stmt
            .execute((change.id.as_uuid().as_bytes().as_slice(), key.as_str()))
            .map_err(backend_error)?;
        if set != 1 {
            return Err(Error::KeyTaken {
                aggregate_type: change.aggregate_type.to_owned(),
                key: key.clone(),
            });
        }
    }
    Ok(())
}

/// Inserts a new aggregate's row, or moves an existing one's version from the expected one:
/// the optimistic check.
fn claim(conn: &Connection, shared: &Shared, change: &Change, type_id: i64) -> Result<()> {
    let sql = &shared.sql;
    let id = change.id.as_uuid().as_bytes().as_slice();
    let new_version = to_i64(change.new_version(), "version")?;
    if change.is_new {
        let inserted = conn
            .prepare_cached(&sql.insert_aggregate)
            .map_err(backend_error)?
            .execute((id, type_id, change.key.as_deref(), new_version))
            .map_err(backend_error)?;
        if inserted == 1 {
            return Ok(());
        }
        return Err(match &change.key {
            Some(key) => Error::KeyTaken {
                aggregate_type: change.aggregate_type.to_owned(),
                key: key.clone(),
            },
            None => Error::Conflict {
                aggregate_type: change.aggregate_type.to_owned(),
                aggregate: change.id,
                expected: 0,
                actual: current_version(conn, shared, change.id)?,
            },
        });
    }
    let updated = conn
        .prepare_cached(&sql.cas_version)
        .map_err(backend_error)?
        .execute((new_version, id, to_i64(change.expected, "version")?))
        .map_err(backend_error)?;
    if updated == 1 {
        Ok(())
    } else {
        Err(Error::Conflict {
            aggregate_type: change.aggregate_type.to_owned(),
            aggregate: change.id,
            expected: change.expected,
            actual: current_version(conn, shared, change.id)?,
        })
    }
}

fn current_version(conn: &Connection, shared: &Shared, id: AggregateId) -> Result<u64> {
    let mut stmt = conn
        .prepare_cached(&shared.sql.current_version)
        .map_err(backend_error)?;
    let mut rows = stmt
        .query([id.as_uuid().as_bytes().as_slice()])
        .map_err(backend_error)?;
    match rows.next().map_err(backend_error)? {
        Some(row) => to_u64(row.get(0).map_err(backend_error)?, "version"),
        None => Ok(0),
    }
}
