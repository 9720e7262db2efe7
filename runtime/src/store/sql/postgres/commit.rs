//! Commits: the bind arrays of one commit statement, running it (on the pool in autocommit, or
//! on a caller's connection inside its transaction, under a savepoint for a context bound to
//! it), and turning a failure into the error a caller can act on (which aggregate conflicted,
//! which key was taken), read on the pool or over the bound connection.

use std::collections::HashMap;

use sqlx::AssertSqlSafe;
use sqlx::postgres::{PgConnection, PgExecutor};

use super::render::{Cas, Shape};
use super::size::{MAX_MESSAGE, check_message};
use super::types::type_id_to_sql;
use super::{PostgresBackend, get, query, to_i32};
use crate::aggregate::AggregateId;
use crate::error::{Error, Result};
use crate::event::FeedCursor;
use crate::store::sql::backend_error;
use crate::store::sql::records::epoch;
use crate::store::sql::types::{TypeKind, TypeMap};
use crate::store::{Change, CommitBatch, Locate, Prune, to_i64, to_micros, to_u64};
use crate::subscription::inline::statement_failed;

/// True for a failure of the connection itself, after which the server may have committed
/// what was sent: the socket broke, the protocol lost its footing, or the session was ended by
/// the server (57P: shut down or terminated; 08: connection exception). A statement timeout
/// (57014) is not one: the server rolled the statement back and said so.
fn outcome_unknown(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|code| code.starts_with("57P") || code.starts_with("08")),
        _ => false,
    }
}

/// The savepoint a bound context's commit runs under in the caller's transaction, its release
/// and its rollback.
const SAVEPOINT: &str = "SAVEPOINT annals_commit";
const RELEASE: &str = "RELEASE SAVEPOINT annals_commit";
const ROLLBACK: &str = "ROLLBACK TO SAVEPOINT annals_commit";

/// A conflict inside a caller's transaction where no aggregate moved in the store: the caller's
/// snapshot is what is behind, taken (REPEATABLE READ, SERIALIZABLE) before a version the
/// context loaded from the pool was committed.
fn stale_if_unmoved(conflict: Error) -> Error {
    match conflict {
        Error::Conflict {
            aggregate_type,
            aggregate,
            expected,
            actual,
        } if expected == actual => Error::StaleTransaction {
            aggregate_type,
            aggregate,
            loaded: expected,
        },
        other => other,
    }
}

/// What the commit statement did.
enum Sent {
    /// Every event was inserted; their cursors, in apply order, when the batch asked for them.
    Written(Vec<FeedCursor>),
    /// A version check failed: nothing was written.
    VersionMoved,
    /// The statement failed.
    Failed(sqlx::Error),
    /// Nothing was written: the server started since the feed epoch was last checked (see
    /// `commit_sql`). The store runs the check, then sends the commit again.
    EpochUnchecked,
}

/// True when `e` is the commit statement finding the feed epoch unchecked: its first event had
/// no epoch to take (a NOT NULL violation on the events' `epoch` column).
fn epoch_unchecked(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|db| db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>())
        .is_some_and(|db| db.code() == "23502" && db.column() == Some("epoch"))
}

/// The error for a commit that still finds the feed epoch unchecked after checking it.
fn epoch_stays_unchecked() -> Error {
    Error::Backend(
        "the feed epoch stays unchecked: the server restarted again while committing".into(),
    )
}

impl PostgresBackend {
    /// Commits `batch` on the pool, in autocommit: the statement is the whole transaction.
    /// With inline projections, a transaction holds the statement and theirs.
    pub(super) async fn run_commit(&self, batch: &CommitBatch) -> Result<Vec<FeedCursor>> {
        if !batch.inline.is_empty() || batch.rekeys() || batch.erases() {
            return self.commit_projected(batch).await;
        }
        let mut sent = self.send_checked_out(batch).await?;
        if matches!(sent, Sent::EpochUnchecked) {
            self.check_epoch_on_pool().await?;
            sent = self.send_checked_out(batch).await?;
        }
        match sent {
            Sent::Written(cursors) => {
                self.wake.changed.notify();
                self.wake.commits.notify_one();
                Ok(cursors)
            }
            Sent::EpochUnchecked => Err(epoch_stays_unchecked()),
            Sent::VersionMoved => Err(self.diagnose_on_pool(batch, None).await),
            // Once the statement was sent, a lost connection leaves its outcome unknown.
            Sent::Failed(e) if outcome_unknown(&e) => Err(Error::CommitOutcomeUnknown {
                aggregates: batch
                    .changes
                    .iter()
                    .map(|c| (c.id, c.new_version()))
                    .collect(),
                source: Box::new(e),
            }),
            Sent::Failed(e) => Err(self.diagnose_on_pool(batch, Some(e)).await),
        }
    }

    /// [`send_commit`](PostgresBackend::send_commit) in autocommit, on a connection that
    /// serves the next statement when this one completed (written, or refused by a version
    /// check).
    async fn send_checked_out(&self, batch: &CommitBatch) -> Result<Sent> {
        let mut conn = self.warm.checkout(&self.pool).await?;
        let sent = self.send_commit(&mut *conn, batch, false).await?;
        if matches!(sent, Sent::Written(_) | Sent::VersionMoved) {
            conn.done();
        }
        Ok(sent)
    }

    /// Deletes what `prune` names, in one statement; returns how many rows went.
    pub(super) async fn run_prune(&self, prune: Prune) -> Result<u64> {
        let deleted = match prune {
            Prune::Events {
                id,
                snapshot_version,
            } => {
                let row = query(&self.sql.prune_events)
                    .bind(id.as_uuid())
                    .bind(to_i32(snapshot_version, "snapshot version")?)
                    .fetch_one(&self.pool)
                    .await
                    .map_err(backend_error)?;
                get::<i64>(&row, 0)?
            }
            Prune::Snapshots {
                id,
                snapshot_version,
                keep,
            } => {
                let done = query(&self.sql.prune_snapshots)
                    .bind(id.as_uuid())
                    .bind(to_i32(snapshot_version, "snapshot version")?)
                    .bind(to_i64(keep.saturating_sub(1), "snapshots to keep")?)
                    .execute(&self.pool)
                    .await
                    .map_err(backend_error)?;
                i64::try_from(done.rows_affected()).unwrap_or(i64::MAX)
            }
        };
        to_u64(deleted, "deleted rows")
    }

    /// Commits `batch` and runs the inline projections on its events, in one transaction; when
    /// the feed epoch is unchecked, checks it and runs the transaction again.
    async fn commit_projected(&self, batch: &CommitBatch) -> Result<Vec<FeedCursor>> {
        if let Some(cursors) = self.commit_projected_once(batch).await? {
            return Ok(cursors);
        }
        self.check_epoch_on_pool().await?;
        self.commit_projected_once(batch)
            .await?
            .ok_or_else(epoch_stays_unchecked)
    }

    /// One try of [`commit_projected`](PostgresBackend::commit_projected): `None` when the
    /// feed epoch is unchecked, and nothing was written.
    async fn commit_projected_once(&self, batch: &CommitBatch) -> Result<Option<Vec<FeedCursor>>> {
        let mut tx = super::begin(&self.pool).await?;
        let erasing;
        let batch = if batch.erases() {
            erasing = self.erasing_now(&mut tx, batch).await?;
            &erasing
        } else {
            batch
        };
        let cursors = match self.send_commit(&mut *tx, batch, false).await? {
            Sent::Written(cursors) => cursors,
            // Dropping `tx` rolls back; nothing was committed, whatever the failure.
            Sent::VersionMoved => {
                drop(tx);
                return Err(self.diagnose_on_pool(batch, None).await);
            }
            Sent::Failed(e) => {
                drop(tx);
                return Err(self.diagnose_on_pool(batch, Some(e)).await);
            }
            Sent::EpochUnchecked => return Ok(None),
        };
        self.project(&mut tx, batch).await?;
        match tx.commit().await {
            Ok(()) => {
                self.wake.changed.notify();
                self.wake.commits.notify_one();
                Ok(Some(cursors))
            }
            Err(e) if outcome_unknown(&e) => Err(Error::CommitOutcomeUnknown {
                aggregates: batch
                    .changes
                    .iter()
                    .map(|c| (c.id, c.new_version()))
                    .collect(),
                source: Box::new(e),
            }),
            Err(e) => Err(backend_error(e)),
        }
    }

    /// Writes the key changes of `batch`, then runs its inline projections on its events,
    /// just written over `conn`.
    async fn project(&self, conn: &mut PgConnection, batch: &CommitBatch) -> Result<()> {
        for change in batch.changes.iter().filter(|c| c.erase) {
            query(&self.sql.erase)
                .bind(change.id.as_uuid())
                .bind(to_i64(change.expected, "aggregate version")?)
                .execute(&mut *conn)
                .await
                .map_err(backend_error)?;
        }
        if batch.rekeys() {
            self.rekey(conn, batch).await?;
        }
        if batch.inline.is_empty() {
            return Ok(());
        }
        let ids: Vec<uuid::Uuid> = batch
            .changes
            .iter()
            .flat_map(|c| c.events.iter().map(|e| e.event_id))
            .collect();
        let rows = query(&self.sql.records_by_id)
            .bind(ids)
            .fetch_all(&mut *conn)
            .await
            .map_err(backend_error)?;
        let events = self.records(conn, &rows).await?;
        for (name, statements) in batch.inline.statements(&events)? {
            for (sql, params) in statements {
                super::subscriptions::execute(conn, &sql, &params)
                    .await
                    .map_err(|e| statement_failed(name, e))?;
            }
        }
        Ok(())
    }

    /// `batch` with its erasures at the versions their aggregates have, read under a row lock
    /// held to the end of the transaction (see [`CommitBatch::erasing_at`]).
    async fn erasing_now(
        &self,
        conn: &mut PgConnection,
        batch: &CommitBatch,
    ) -> Result<CommitBatch> {
        let ids: Vec<uuid::Uuid> = batch.erased_ids().iter().map(|id| *id.as_uuid()).collect();
        let rows = query(&self.sql.lock_erased)
            .bind(ids)
            .fetch_all(&mut *conn)
            .await
            .map_err(backend_error)?;
        let mut current = Vec::with_capacity(rows.len());
        for row in &rows {
            let id: uuid::Uuid = get(row, 0)?;
            current.push((
                AggregateId::from(id),
                to_u64(get(row, 1)?, "aggregate version")?,
                get::<bool>(row, 2)?,
            ));
        }
        batch.erasing_at(&current)
    }

    /// Writes the key changes of `batch` over `conn`, after its version checks passed: every
    /// changed key is released first, so that aggregates may trade keys in one commit; a key
    /// another aggregate holds is [`Error::KeyTaken`] (the transaction is then aborted).
    async fn rekey(&self, conn: &mut PgConnection, batch: &CommitBatch) -> Result<()> {
        let rekeyed = || batch.changes.iter().filter(|c| c.rekey.is_some());
        for change in rekeyed() {
            query(&self.sql.set_key)
                .bind(change.id.as_uuid())
                .bind(None::<&str>)
                .execute(&mut *conn)
                .await
                .map_err(backend_error)?;
        }
        let unique = format!("{}aggregates_key_uq", self.names.prefix);
        for change in rekeyed() {
            let Some(Some(key)) = &change.rekey else {
                continue;
            };
            let set = query(&self.sql.set_key)
                .bind(change.id.as_uuid())
                .bind(key.as_str())
                .execute(&mut *conn)
                .await;
            if let Err(e) = set {
                let taken = e.as_database_error().is_some_and(|db| {
                    db.code().as_deref() == Some("23505") && db.constraint() == Some(&unique)
                });
                return Err(if taken {
                    Error::KeyTaken {
                        aggregate_type: change.aggregate_type.to_owned(),
                        key: key.clone(),
                    }
                } else {
                    backend_error(e)
                });
            }
        }
        Ok(())
    }

    /// Commits `batch` on the caller's connection, inside the transaction it has open, and
    /// notifies waiters when that transaction commits; a failure is diagnosed from fresh reads
    /// on the pool (what [`Context::commit_in`](crate::Context::commit_in) documents: a version
    /// the caller's snapshot cannot see is [`Error::StaleTransaction`]). Nothing is committed
    /// yet, so a lost connection is a plain error: the caller's own commit will fail.
    pub(crate) async fn commit_in(
        &self,
        conn: &mut PgConnection,
        batch: &CommitBatch,
    ) -> Result<()> {
        match self.send_commit(&mut *conn, batch, true).await? {
            Sent::Written(_) => {
                self.project(conn, batch).await?;
                self.notify_in(conn).await
            }
            Sent::VersionMoved => Err(stale_if_unmoved(self.diagnose_on_pool(batch, None).await)),
            Sent::Failed(e) => Err(self.diagnose_on_pool(batch, Some(e)).await),
            // The statement of a caller's transaction checks the epoch itself.
            Sent::EpochUnchecked => Err(epoch_stays_unchecked()),
        }
    }

    /// Commits `batch` on the connection of the caller's transaction that a context is bound to,
    /// and diagnoses a failure over the same connection: the store's pool is not used (but to
    /// write a type name outside the registry, see `commit_args`). The statement runs under a
    /// savepoint, rolled back on any failure, so the transaction stays usable and holds nothing
    /// of the context.
    pub(crate) async fn commit_bound(
        &self,
        conn: &mut PgConnection,
        batch: &CommitBatch,
    ) -> Result<()> {
        if let Err(e) = sqlx::query(SAVEPOINT).execute(&mut *conn).await {
            return Err(match e.as_database_error().and_then(|db| db.code()) {
                Some(code) if code == "25P01" => Error::Config(
                    "a context from begin_in commits inside the caller's transaction: begin one \
                     on the connection before"
                        .to_owned(),
                ),
                _ => backend_error(e),
            });
        }
        // What failed: the statement (`Some`), a version check (`None`), or another step.
        let failed = match self.send_commit(&mut *conn, batch, true).await {
            Ok(Sent::Written(_)) => match self.project_and_notify(conn, batch).await {
                Ok(()) => {
                    return sqlx::query(RELEASE)
                        .execute(&mut *conn)
                        .await
                        .map(drop)
                        .map_err(backend_error);
                }
                Err(e) => Err(e),
            },
            Ok(Sent::VersionMoved) => Ok(None),
            Ok(Sent::Failed(e)) => Ok(Some(e)),
            Ok(Sent::EpochUnchecked) => Err(epoch_stays_unchecked()),
            Err(e) => Err(e),
        };
        // Undo the statement (and what a failure aborted) before reading over the connection.
        if let Err(rollback) = sqlx::query(ROLLBACK).execute(&mut *conn).await {
            // The connection is gone, most likely: the first failure says the most.
            return Err(match failed {
                Ok(Some(e)) => backend_error(e),
                Ok(None) => backend_error(rollback),
                Err(e) => e,
            });
        }
        match failed {
            Ok(failed) => Err(self.diagnose(conn, batch, failed).await),
            Err(e) => Err(e),
        }
    }

    /// Runs the inline projections, then [`notify_in`](PostgresBackend::notify_in).
    async fn project_and_notify(&self, conn: &mut PgConnection, batch: &CommitBatch) -> Result<()> {
        self.project(conn, batch).await?;
        self.notify_in(conn).await
    }

    /// Tells waiters of every process, when the caller's transaction commits, that there are new
    /// events.
    async fn notify_in(&self, conn: &mut PgConnection) -> Result<()> {
        sqlx::query("SELECT pg_notify($1::text, '')")
            .bind(self.names.channel.as_str())
            .execute(&mut *conn)
            .await
            .map(drop)
            .map_err(backend_error)
    }

    /// The error a caller can act on for a commit that failed (`failed`: the statement's own
    /// error; `None`: a version check), read over `conn`.
    async fn diagnose(
        &self,
        conn: &mut PgConnection,
        batch: &CommitBatch,
        failed: Option<sqlx::Error>,
    ) -> Error {
        match failed {
            Some(e) => self.commit_error(conn, batch, e).await,
            None => self.conflict(conn, batch, None).await,
        }
    }

    /// [`diagnose`](PostgresBackend::diagnose), read on a connection of the pool.
    async fn diagnose_on_pool(&self, batch: &CommitBatch, failed: Option<sqlx::Error>) -> Error {
        match self.pool.acquire().await {
            Ok(mut conn) => self.diagnose(&mut conn, batch, failed).await,
            Err(e) => backend_error(e),
        }
    }

    /// Runs the commit statement of `batch` on `executor`: the pool (autocommit) or a caller's
    /// connection inside its transaction.
    async fn send_commit<'e>(
        &self,
        executor: impl PgExecutor<'e>,
        batch: &CommitBatch,
        in_caller_tx: bool,
    ) -> Result<Sent> {
        check_message(batch, MAX_MESSAGE)?;
        let args = self.commit_args(batch).await?;
        let shape = Shape {
            cas: match args.cas_ids.len() {
                0 => Cas::None,
                1 => Cas::One,
                _ => Cas::Many,
            },
            new: !args.new_ids.is_empty(),
            snapshots: !args.snap_ids.is_empty(),
            in_caller_tx,
            returning: batch.cursors,
        };
        let event_count = args.ev_ids.len() as u64;
        let q = match args.one_event() {
            // A command's usual commit, in its own statement (see `commit_one_sql`).
            Some(one) if !in_caller_tx => query(&self.sql.commit_one[usize::from(shape.returning)])
                .bind(one.id)
                .bind(one.expected)
                .bind(one.new_version)
                .bind(one.sequence)
                .bind(one.type_id)
                .bind(one.schema_version)
                .bind(one.payload)
                .bind(one.metadata)
                .bind(to_micros(batch.recorded_at))
                .bind(one.event_id),
            _ => self.bind_commit(shape, args, batch)?,
        };
        if !shape.returning {
            return Ok(match q.execute(executor).await {
                Ok(done) if done.rows_affected() == event_count => Sent::Written(Vec::new()),
                Ok(_) => Sent::VersionMoved,
                Err(e) if !in_caller_tx && epoch_unchecked(&e) => Sent::EpochUnchecked,
                Err(e) => Sent::Failed(e),
            });
        }
        let rows = match q.fetch_all(executor).await {
            Ok(rows) if rows.len() as u64 == event_count => rows,
            Ok(_) => return Ok(Sent::VersionMoved),
            Err(e) if !in_caller_tx && epoch_unchecked(&e) => return Ok(Sent::EpochUnchecked),
            Err(e) => return Ok(Sent::Failed(e)),
        };
        let mut cursors = rows
            .iter()
            .map(|row| {
                Ok(FeedCursor {
                    epoch: epoch(get(row, 0)?)?,
                    tx: to_u64(get(row, 1)?, "transaction id")?,
                    position: to_u64(get(row, 2)?, "event position")?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        // Positions follow the order the events were applied in.
        cursors.sort_by_key(|c| c.position);
        Ok(Sent::Written(cursors))
    }

    /// The commit statement of `shape` with `args` bound, in the order `commit_sql` numbers them.
    fn bind_commit<'a>(
        &self,
        shape: Shape,
        args: CommitArgs<'a>,
        batch: &CommitBatch,
    ) -> Result<sqlx::query::Query<'a, sqlx::Postgres, sqlx::postgres::PgArguments>> {
        let mut q = query(&self.sql.commit(shape)?);
        match shape.cas {
            Cas::None => {}
            Cas::One => {
                if let (Some(id), Some(expected), Some(new_version)) = (
                    args.cas_ids.first(),
                    args.cas_expected.first(),
                    args.cas_new.first(),
                ) {
                    q = q.bind(*id).bind(*expected).bind(*new_version);
                }
            }
            Cas::Many => {
                q = q
                    .bind(args.cas_ids)
                    .bind(args.cas_expected)
                    .bind(args.cas_new);
            }
        }
        if shape.new {
            q = q
                .bind(args.new_ids)
                .bind(args.new_types)
                .bind(args.new_keys)
                .bind(args.new_versions);
        }
        q = q
            .bind(args.ev_aggregates)
            .bind(args.ev_sequences)
            .bind(args.ev_types)
            .bind(args.ev_schema_versions)
            .bind(args.ev_payloads)
            .bind(args.ev_metadata)
            .bind(args.ev_ids)
            .bind(to_micros(batch.recorded_at));
        if shape.snapshots {
            q = q
                .bind(args.snap_ids)
                .bind(args.snap_shapes)
                .bind(args.snap_versions)
                .bind(args.snap_payloads);
        }
        if shape.in_caller_tx {
            let (ids, versions): (Vec<uuid::Uuid>, Vec<i64>) = batch
                .loaded
                .iter()
                .map(|(id, version)| Ok((*id.as_uuid(), to_i64(*version, "aggregate version")?)))
                .collect::<Result<Vec<_>>>()?
                .into_iter()
                .unzip();
            q = q.bind(ids).bind(versions);
        }
        Ok(q)
    }

    /// The bind arrays of a commit, with type names turned into ids.
    async fn commit_args<'a>(&self, batch: &'a CommitBatch) -> Result<CommitArgs<'a>> {
        let mut events_map = self.types.get(TypeKind::Event);
        let mut aggregates_map = self.types.get(TypeKind::Aggregate);
        // Types outside the registry (hand-written aggregates) are written on first use, in
        // autocommit: a type name must outlive a caller's transaction that rolls back.
        let new_aggregate_types: Vec<&str> = batch
            .changes
            .iter()
            .filter(|c| c.is_new && aggregates_map.id(c.aggregate_type).is_none())
            .map(|c| c.aggregate_type)
            .collect();
        let new_event_types: Vec<&str> = batch
            .changes
            .iter()
            .flat_map(|c| c.events.iter().map(|e| e.name))
            .filter(|name| events_map.id(name).is_none())
            .collect();
        if !new_aggregate_types.is_empty() || !new_event_types.is_empty() {
            let mut conn = self.pool.acquire().await.map_err(backend_error)?;
            if !new_aggregate_types.is_empty() {
                aggregates_map = self
                    .ensure_types(&mut conn, TypeKind::Aggregate, &new_aggregate_types)
                    .await?;
            }
            if !new_event_types.is_empty() {
                events_map = self
                    .ensure_types(&mut conn, TypeKind::Event, &new_event_types)
                    .await?;
            }
        }
        let lookup = |map: &TypeMap, name: &str| map.id_of(name).and_then(type_id_to_sql);
        let count = batch.event_count();
        let mut args = CommitArgs::with_capacity(count);
        // New aggregates are inserted in one canonical order (type, key, id): two commits that
        // create the same keys then wait on the first key they share instead of each holding
        // one key the other needs (a deadlock on the key index).
        let mut new: Vec<(i32, &Change)> = Vec::new();
        for change in batch.changes.iter().filter(|c| c.is_new) {
            new.push((lookup(&aggregates_map, change.aggregate_type)?, change));
        }
        new.sort_by(|(ta, a), (tb, b)| (ta, &a.key, a.id).cmp(&(tb, &b.key, b.id)));
        for (type_id, change) in new {
            args.new_ids.push(*change.id.as_uuid());
            args.new_types.push(type_id);
            args.new_keys.push(change.key.as_deref());
            args.new_versions
                .push(to_i64(change.new_version(), "aggregate version")?);
        }
        for change in &batch.changes {
            let id = *change.id.as_uuid();
            if !change.is_new {
                args.cas_ids.push(id);
                args.cas_expected
                    .push(to_i64(change.expected, "aggregate version")?);
                args.cas_new
                    .push(to_i64(change.new_version(), "aggregate version")?);
            }
            if let Some(snapshot) = &change.snapshot {
                args.snap_ids.push(id);
                args.snap_shapes
                    .push(to_i32(snapshot.snapshot_version, "snapshot version")?);
                args.snap_versions
                    .push(to_i64(snapshot.version, "snapshot version")?);
                args.snap_payloads.push(&snapshot.payload);
            }
        }
        // In the order the context applied them, across aggregates: the order of the feed.
        for (change, event) in batch.events_in_order() {
            args.ev_aggregates.push(*change.id.as_uuid());
            args.ev_sequences
                .push(to_i64(event.version, "event version")?);
            args.ev_types.push(lookup(&events_map, event.name)?);
            args.ev_schema_versions
                .push(to_i32(event.schema_version, "schema version")?);
            args.ev_payloads.push(&event.payload);
            args.ev_metadata.push(event.metadata.as_deref());
            args.ev_ids.push(event.event_id);
        }
        Ok(args)
    }

    /// The conflict behind a failed version check: the first changed aggregate whose version is
    /// not the one expected (`hint`: the aggregate the database named, if any), as read over
    /// `conn`.
    async fn conflict(
        &self,
        conn: &mut PgConnection,
        batch: &CommitBatch,
        hint: Option<AggregateId>,
    ) -> Error {
        let ids: Vec<uuid::Uuid> = batch.changes.iter().map(|c| *c.id.as_uuid()).collect();
        let rows: Vec<(uuid::Uuid, i64)> =
            match sqlx::query_as(AssertSqlSafe(self.sql.versions.clone()))
                .bind(ids)
                .fetch_all(&mut *conn)
                .await
            {
                Ok(rows) => rows,
                Err(e) => return backend_error(e),
            };
        let actual: HashMap<uuid::Uuid, i64> = rows.into_iter().collect();
        let version_of = |id: &AggregateId| {
            actual
                .get(id.as_uuid())
                .map_or(0, |v| u64::try_from(*v).unwrap_or(0))
        };
        let moved = batch.changes.iter().find(|c| {
            hint.is_none_or(|h| h == c.id)
                && (if c.is_new {
                    actual.contains_key(c.id.as_uuid())
                } else {
                    version_of(&c.id) != c.expected
                })
        });
        // A serialization failure or deadlock can be reported before the version moved; the
        // first existing aggregate is then named, with the version as it stands.
        let change = moved
            .or_else(|| batch.changes.iter().find(|c| !c.is_new))
            .or_else(|| batch.changes.first());
        match change {
            Some(c) => {
                tracing::debug!(aggregate = %c.id, expected = c.expected, "commit conflict");
                Error::Conflict {
                    aggregate_type: c.aggregate_type.to_owned(),
                    aggregate: c.id,
                    expected: c.expected,
                    actual: version_of(&c.id),
                }
            }
            None => Error::Corrupt("a commit of no aggregate conflicted".to_owned()),
        }
    }

    /// Maps a failed commit statement to the error a caller can act on, reading over `conn`.
    async fn commit_error(
        &self,
        conn: &mut PgConnection,
        batch: &CommitBatch,
        e: sqlx::Error,
    ) -> Error {
        let (code, constraint) = match e.as_database_error() {
            Some(db) => (
                db.code().map(|c| c.into_owned()),
                db.constraint().map(str::to_owned),
            ),
            None => (None, None),
        };
        let prefix = &self.names.prefix;
        match (code.as_deref(), constraint.as_deref()) {
            (Some("23505"), Some(c)) if c == format!("{prefix}aggregates_key_uq") => {
                self.key_taken(conn, batch).await
            }
            (Some("23505"), Some(c)) if c == format!("{prefix}aggregates_pk") => {
                let new = batch.changes.iter().find(|c| c.is_new).map(|c| c.id);
                self.conflict(conn, batch, new).await
            }
            (Some("23505"), Some(c)) if c == format!("{prefix}events_event_id_uq") => {
                Error::Corrupt(format!("an event id of this commit is already stored: {e}"))
            }
            // A new aggregate whose id is taken: the events' insert can meet the taken id's
            // events before the aggregates' insert meets its row.
            (Some("23505"), Some(c))
                if c == format!("{prefix}events_stream_uq")
                    && batch.changes.iter().any(|c| c.is_new) =>
            {
                self.conflict(conn, batch, None).await
            }
            (Some("23505"), Some(c)) if c == format!("{prefix}events_stream_uq") => {
                Error::Corrupt(format!(
                    "an aggregate's row is behind its events (the version check passed, the \
                     event sequence is taken): {e}"
                ))
            }
            // A serialization failure (an aggregate changed since a caller's REPEATABLE READ or
            // SERIALIZABLE snapshot) or a deadlock: re-running the work resolves both, so both
            // are the retryable conflict; a key another commit took meanwhile is named as such.
            (Some("40001" | "40P01"), _) => {
                if batch.changes.iter().all(|c| c.is_new)
                    && let Some(taken) = self.taken_key(conn, batch).await
                {
                    return taken;
                }
                self.conflict(conn, batch, None).await
            }
            _ => backend_error(e),
        }
    }

    /// [`Error::KeyTaken`] for the first key of `batch`'s new aggregates that is committed
    /// now, if any.
    async fn taken_key(&self, conn: &mut PgConnection, batch: &CommitBatch) -> Option<Error> {
        for change in batch.changes.iter().filter(|c| c.is_new) {
            let Some(key) = change.key.as_deref() else {
                continue;
            };
            let locate = Locate::Key {
                aggregate_type: change.aggregate_type,
                key,
            };
            if let Ok(Some(_)) = self.locate_on(conn, locate).await {
                return Some(Error::KeyTaken {
                    aggregate_type: change.aggregate_type.to_owned(),
                    key: key.to_owned(),
                });
            }
        }
        None
    }

    /// The key error of a commit whose new aggregate's key was taken meanwhile.
    async fn key_taken(&self, conn: &mut PgConnection, batch: &CommitBatch) -> Error {
        let keyed: Vec<(&'static str, &str)> = batch
            .changes
            .iter()
            .filter(|c| c.is_new)
            .filter_map(|c| c.key.as_deref().map(|k| (c.aggregate_type, k)))
            .collect();
        let mut taken = keyed.first().copied();
        if keyed.len() > 1 {
            for &(aggregate_type, key) in &keyed {
                let locate = Locate::Key {
                    aggregate_type,
                    key,
                };
                if let Ok(Some(_)) = self.locate_on(conn, locate).await {
                    taken = Some((aggregate_type, key));
                    break;
                }
            }
        }
        match taken {
            Some((aggregate_type, key)) => Error::KeyTaken {
                aggregate_type: aggregate_type.to_owned(),
                key: key.to_owned(),
            },
            None => Error::Corrupt("a key clash without a keyed aggregate".to_owned()),
        }
    }
}

/// The bind arrays of one commit.
#[derive(Default)]
struct CommitArgs<'a> {
    cas_ids: Vec<uuid::Uuid>,
    cas_expected: Vec<i64>,
    cas_new: Vec<i64>,
    new_ids: Vec<uuid::Uuid>,
    new_types: Vec<i32>,
    new_keys: Vec<Option<&'a str>>,
    new_versions: Vec<i64>,
    ev_aggregates: Vec<uuid::Uuid>,
    ev_sequences: Vec<i64>,
    ev_types: Vec<i32>,
    ev_schema_versions: Vec<i32>,
    ev_payloads: Vec<&'a [u8]>,
    ev_metadata: Vec<Option<&'a [u8]>>,
    ev_ids: Vec<uuid::Uuid>,
    snap_ids: Vec<uuid::Uuid>,
    snap_shapes: Vec<i32>,
    snap_versions: Vec<i64>,
    snap_payloads: Vec<&'a [u8]>,
}

/// The parameters of a commit of one event to one existing aggregate.
struct OneEvent<'a> {
    id: uuid::Uuid,
    expected: i64,
    new_version: i64,
    sequence: i64,
    type_id: i32,
    schema_version: i32,
    payload: &'a [u8],
    metadata: Option<&'a [u8]>,
    event_id: uuid::Uuid,
}

impl<'a> CommitArgs<'a> {
    /// The commit's one event, when it writes one event to one existing aggregate and no
    /// snapshot.
    fn one_event(&self) -> Option<OneEvent<'a>> {
        if !self.new_ids.is_empty() || !self.snap_ids.is_empty() {
            return None;
        }
        match (&self.cas_ids[..], &self.ev_aggregates[..], &self.ev_ids[..]) {
            ([id], [aggregate], [event_id]) if id == aggregate => Some(OneEvent {
                id: *id,
                expected: *self.cas_expected.first()?,
                new_version: *self.cas_new.first()?,
                sequence: *self.ev_sequences.first()?,
                type_id: *self.ev_types.first()?,
                schema_version: *self.ev_schema_versions.first()?,
                payload: self.ev_payloads.first()?,
                metadata: *self.ev_metadata.first()?,
                event_id: *event_id,
            }),
            _ => None,
        }
    }
}

impl CommitArgs<'_> {
    fn with_capacity(events: usize) -> Self {
        CommitArgs {
            ev_aggregates: Vec::with_capacity(events),
            ev_sequences: Vec::with_capacity(events),
            ev_types: Vec::with_capacity(events),
            ev_schema_versions: Vec::with_capacity(events),
            ev_payloads: Vec::with_capacity(events),
            ev_metadata: Vec::with_capacity(events),
            ev_ids: Vec::with_capacity(events),
            ..CommitArgs::default()
        }
    }
}
