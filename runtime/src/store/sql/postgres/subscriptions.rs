//! Durable subscriptions on PostgreSQL: their rows, leases and checkpoints. Lease times are the
//! server's (`now()`), so workers on several machines agree on expiry whatever their clocks.
//! A handler transaction is a pool connection in `BEGIN`; the checkpoint is its last statement.

use sqlx::AssertSqlSafe;
use sqlx::postgres::{PgConnection, PgRow};

use super::names::Names;
use super::{PostgresBackend, get, query};
use crate::error::{Error, Result};
use crate::event::FeedCursor;
use crate::store::sql::backend_error;
use crate::store::sql::records::epoch;
use crate::store::{from_micros, to_i64, to_u64};
use crate::subscription::SqlValue;
use crate::subscription::row::{Claim, Lease, Parked, Row, Spec, Write, cursor_text};
use crate::subscription::tx::TxState;

/// The statements of subscriptions, rendered at open.
pub(super) struct Statements {
    insert: std::sync::Arc<str>,
    select_one: std::sync::Arc<str>,
    select_all: std::sync::Arc<str>,
    select_named: std::sync::Arc<str>,
    claim: std::sync::Arc<str>,
    checkpoint: std::sync::Arc<str>,
    fail: std::sync::Arc<str>,
    release: std::sync::Arc<str>,
    state: std::sync::Arc<str>,
    reset: std::sync::Arc<str>,
    heartbeat: std::sync::Arc<str>,
    leave: std::sync::Arc<str>,
    renew: std::sync::Arc<str>,
    park: std::sync::Arc<str>,
    unpark_progress: std::sync::Arc<str>,
    unpark: std::sync::Arc<str>,
    mark_parked: std::sync::Arc<str>,
    select_parked: std::sync::Arc<str>,
}

const COLUMNS: &str = "name, partition, partitions, COALESCE(filter, ''), start_at, cursor_epoch, \
     cursor_tx::text::int8, cursor_position, lease_owner, lease_token, \
     (EXTRACT(EPOCH FROM lease_expires_at) * 1000000)::int8, state, attempts, last_error, \
     error_cursor";

/// The lease condition of a write: `$1` name, `$2` partition, `$3` owner, `$4` token.
const LEASED: &str = "name = $1 AND partition = $2 AND lease_owner = $3 AND lease_token = $4";

/// `$n` seconds from now, as the server tells time.
fn from_now(n: usize) -> String {
    format!("now() + make_interval(secs => ${n}::float8)")
}

impl Statements {
    pub fn new(names: &Names) -> Statements {
        let table = names.table("subscriptions");
        let workers = names.table("subscribers");
        let parked = names.table("parked");
        let s = |text: String| -> std::sync::Arc<str> { text.into() };
        Statements {
            insert: s(format!(
                "INSERT INTO {table} (name, partition, partitions, filter, start_at, cursor_epoch, \
                 cursor_tx, cursor_position, state, updated_at) \
                 SELECT $1, p, $2, $3, $4, $5, $6::int8::text::xid8, $7, 'active', now() \
                 FROM generate_series(0, $2 - 1) AS p \
                 ON CONFLICT DO NOTHING"
            )),
            select_one: s(format!(
                "SELECT {COLUMNS} FROM {table} WHERE name = $1 AND partition = $2"
            )),
            select_all: s(format!(
                "SELECT {COLUMNS} FROM {table} ORDER BY name, partition"
            )),
            select_named: s(format!(
                "SELECT {COLUMNS} FROM {table} WHERE name = $1 ORDER BY partition"
            )),
            claim: s(format!(
                "UPDATE {table} SET \
                 lease_token = CASE WHEN lease_owner IS NOT DISTINCT FROM $3 THEN lease_token \
                                    ELSE lease_token + 1 END, \
                 lease_owner = $3, lease_expires_at = {}, updated_at = now() \
                 WHERE name = $1 AND partition = $2 AND (lease_owner IS NULL OR lease_owner = $3 \
                 OR lease_expires_at IS NULL OR lease_expires_at <= now()) \
                 RETURNING {COLUMNS}",
                from_now(4)
            )),
            checkpoint: s(format!(
                "UPDATE {table} SET cursor_epoch = $5, cursor_tx = $6::int8::text::xid8, \
                 cursor_position = $7, attempts = 0, last_error = NULL, error_cursor = NULL, \
                 lease_expires_at = {}, updated_at = now() WHERE {LEASED} \
                 AND cursor_epoch = $9 AND cursor_tx = $10::int8::text::xid8 \
                 AND cursor_position = $11",
                from_now(8)
            )),
            fail: s(format!(
                "UPDATE {table} SET state = 'failed', attempts = $5, last_error = $6, \
                 error_cursor = $7, updated_at = now() WHERE {LEASED}"
            )),
            release: s(format!(
                "UPDATE {table} SET lease_owner = NULL, lease_expires_at = NULL, \
                 updated_at = now() WHERE {LEASED}"
            )),
            state: s(format!(
                "UPDATE {table} SET state = $2, \
                 attempts = CASE WHEN $2 = 'active' THEN 0 ELSE attempts END, \
                 last_error = CASE WHEN $2 = 'active' THEN NULL ELSE last_error END, \
                 error_cursor = CASE WHEN $2 = 'active' THEN NULL ELSE error_cursor END, \
                 updated_at = now() WHERE name = $1"
            )),
            reset: s(format!(
                "UPDATE {table} SET filter = $2, start_at = $3, cursor_epoch = $4, \
                 cursor_tx = $5::int8::text::xid8, cursor_position = $6, state = 'active', \
                 attempts = 0, last_error = NULL, error_cursor = NULL, lease_owner = NULL, \
                 lease_expires_at = NULL, lease_token = lease_token + 1, updated_at = now() \
                 WHERE name = $1"
            )),
            // The count reads the statement's snapshot: the other live workers, plus this one.
            heartbeat: s(format!(
                "WITH gone AS (DELETE FROM {workers} WHERE name = $1 AND expires_at <= now()), \
                 up AS (INSERT INTO {workers} (name, owner, expires_at) VALUES ($1, $2, {}) \
                        ON CONFLICT (name, owner) DO UPDATE SET expires_at = excluded.expires_at) \
                 SELECT count(*) + 1 FROM {workers} \
                 WHERE name = $1 AND owner <> $2 AND expires_at > now()",
                from_now(3)
            )),
            leave: s(format!(
                "DELETE FROM {workers} WHERE name = $1 AND owner = $2"
            )),
            renew: s(format!(
                "UPDATE {table} SET lease_expires_at = {}, updated_at = now() WHERE {LEASED}",
                from_now(5)
            )),
            park: s(format!(
                "INSERT INTO {parked} (name, aggregate_id, partition, version, event_id, cursor, \
                 error, attempts, state, parked_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, now()) \
                 ON CONFLICT (name, aggregate_id) DO UPDATE SET partition = excluded.partition, \
                 version = excluded.version, event_id = excluded.event_id, \
                 cursor = excluded.cursor, error = excluded.error, attempts = excluded.attempts, \
                 state = excluded.state, parked_at = excluded.parked_at"
            )),
            unpark_progress: s(format!(
                "UPDATE {parked} SET version = $3, state = 'retry' \
                 WHERE name = $1 AND aggregate_id = $2"
            )),
            unpark: s(format!(
                "DELETE FROM {parked} WHERE name = $1 AND aggregate_id = $2"
            )),
            mark_parked: s(format!(
                "UPDATE {parked} SET state = $3 WHERE name = $1 AND event_id = $2"
            )),
            select_parked: s(format!(
                "SELECT name, aggregate_id, partition, version, event_id, cursor, error, \
                 attempts, state, (EXTRACT(EPOCH FROM parked_at) * 1000000)::int8 \
                 FROM {parked} WHERE name = $1 AND ($2::int4 IS NULL OR partition = $2) \
                 ORDER BY parked_at, event_id"
            )),
        }
    }
}

/// A row of [`COLUMNS`].
fn row(r: &PgRow) -> Result<Row> {
    let name: String = get(r, 0)?;
    let small = |v: i32, what: &str| {
        u32::try_from(v).map_err(|_| {
            Error::Corrupt(format!("subscription {name:?}: {what} {v} is out of range"))
        })
    };
    Ok(Row {
        partition: small(get(r, 1)?, "partition")?,
        partitions: small(get(r, 2)?, "partitions")?,
        filter: get(r, 3)?,
        start: get(r, 4)?,
        cursor: FeedCursor {
            epoch: epoch(i64::from(get::<i32>(r, 5)?))?,
            tx: to_u64(get(r, 6)?, "subscription cursor")?,
            position: to_u64(get(r, 7)?, "subscription cursor")?,
        },
        owner: get(r, 8)?,
        token: to_u64(get(r, 9)?, "lease token")?,
        lease_expires_at: get::<Option<i64>>(r, 10)?.map(from_micros),
        state: get(r, 11)?,
        attempts: small(get(r, 12)?, "attempts")?,
        last_error: get(r, 13)?,
        error_cursor: get(r, 14)?,
        name,
    })
}

fn cursor_params(cursor: FeedCursor) -> Result<(i32, i64, i64)> {
    Ok((
        i32::try_from(cursor.epoch)
            .map_err(|_| Error::Config(format!("cursor {cursor:?} is out of range")))?,
        to_i64(cursor.tx, "cursor transaction")?,
        to_i64(cursor.position, "cursor position")?,
    ))
}

fn lease_params(lease: &Lease) -> Result<(&str, i32, &str, i64)> {
    Ok((
        lease.name.as_str(),
        i32::try_from(lease.partition)
            .map_err(|_| Error::Config(format!("partition {} is out of range", lease.partition)))?,
        lease.owner.as_str(),
        to_i64(lease.token, "lease token")?,
    ))
}

impl PostgresBackend {
    fn writable(&self) -> Result<()> {
        if self.options.read_only {
            Err(Error::ReadOnly)
        } else {
            Ok(())
        }
    }

    pub(super) async fn subscription_open(&self, spec: &Spec) -> Result<Row> {
        self.writable()?;
        let partitions = i32::try_from(spec.partitions.max(1))
            .map_err(|_| Error::Config("too many partitions".to_owned()))?;
        let (e, t, p) = cursor_params(spec.initial)?;
        query(&self.subs.insert)
            .bind(spec.name.as_str())
            .bind(partitions)
            .bind(spec.filter.as_str())
            .bind(spec.start.as_str())
            .bind(e)
            .bind(t)
            .bind(p)
            .execute(&self.pool)
            .await
            .map_err(backend_error)?;
        let found = query(&self.subs.select_one)
            .bind(spec.name.as_str())
            .bind(0_i32)
            .fetch_one(&self.pool)
            .await
            .map_err(backend_error)?;
        row(&found)
    }

    pub(super) async fn subscription_claim(&self, claim: &Claim) -> Result<Option<Row>> {
        self.writable()?;
        let partition = i32::try_from(claim.partition)
            .map_err(|_| Error::Config(format!("partition {} is out of range", claim.partition)))?;
        let claimed = query(&self.subs.claim)
            .bind(claim.name.as_str())
            .bind(partition)
            .bind(claim.owner.as_str())
            .bind(claim.lease.as_secs_f64())
            .fetch_optional(&self.pool)
            .await
            .map_err(backend_error)?;
        if let Some(claimed) = claimed {
            return row(&claimed).map(Some);
        }
        let exists = query(&self.subs.select_one)
            .bind(claim.name.as_str())
            .bind(partition)
            .fetch_optional(&self.pool)
            .await
            .map_err(backend_error)?;
        match exists {
            Some(_) => Ok(None),
            None => Err(Error::SubscriptionNotFound {
                name: claim.name.clone(),
            }),
        }
    }

    pub(super) async fn subscription_heartbeat(&self, claim: &Claim) -> Result<u32> {
        self.writable()?;
        let live: i64 = sqlx::query_scalar(AssertSqlSafe(self.subs.heartbeat.to_string()))
            .bind(claim.name.as_str())
            .bind(claim.owner.as_str())
            .bind(claim.lease.as_secs_f64())
            .fetch_one(&self.pool)
            .await
            .map_err(backend_error)?;
        Ok(u32::try_from(live).unwrap_or(u32::MAX))
    }

    pub(super) async fn subscription_rows(&self, name: Option<&str>) -> Result<Vec<Row>> {
        let rows = match name {
            Some(name) => {
                query(&self.subs.select_named)
                    .bind(name)
                    .fetch_all(&self.pool)
                    .await
            }
            None => query(&self.subs.select_all).fetch_all(&self.pool).await,
        }
        .map_err(backend_error)?;
        rows.iter().map(row).collect()
    }

    pub(super) async fn begin_tx(&self) -> Result<TxState> {
        self.writable()?;
        let tx = super::begin(&self.pool).await?;
        Ok(TxState::Postgres(tx))
    }

    pub(super) async fn commit_tx(&self, tx: TxState, writes: Vec<Write>) -> Result<()> {
        let TxState::Postgres(mut tx) = tx else {
            return Err(Error::Corrupt(
                "a PostgreSQL store was given another store's transaction".to_owned(),
            ));
        };
        for write in &writes {
            let changed = self.write(&mut tx, write).await?;
            if changed == 0
                && let Some(error) = write.missed()
            {
                // Dropping `tx` rolls the handler's writes back.
                return Err(error);
            }
        }
        tx.commit().await.map_err(backend_error)
    }

    pub(super) async fn parked(&self, name: &str, partition: Option<u32>) -> Result<Vec<Parked>> {
        let partition = partition
            .map(|p| {
                i32::try_from(p)
                    .map_err(|_| Error::Config(format!("partition {p} is out of range")))
            })
            .transpose()?;
        let rows = query(&self.subs.select_parked)
            .bind(name)
            .bind(partition)
            .fetch_all(&self.pool)
            .await
            .map_err(backend_error)?;
        rows.iter()
            .map(|r| {
                let name: String = get(r, 0)?;
                let small = |v: i32, what: &str| {
                    u32::try_from(v).map_err(|_| {
                        Error::Corrupt(format!(
                            "parked event of {name:?}: {what} {v} is out of range"
                        ))
                    })
                };
                Ok(Parked {
                    aggregate: get::<uuid::Uuid>(r, 1)?.into(),
                    partition: small(get(r, 2)?, "partition")?,
                    version: to_u64(get(r, 3)?, "parked version")?,
                    event_id: get(r, 4)?,
                    cursor: get(r, 5)?,
                    error: get(r, 6)?,
                    attempts: small(get(r, 7)?, "attempts")?,
                    state: get(r, 8)?,
                    parked_at: from_micros(get(r, 9)?),
                    name,
                })
            })
            .collect()
    }

    /// Makes `write` over `conn`; the rows it changed.
    async fn write(&self, conn: &mut PgConnection, write: &Write) -> Result<u64> {
        let q = match write {
            Write::Checkpoint {
                lease,
                from,
                cursor,
            } => {
                let (n, p, o, t) = lease_params(lease)?;
                let (e, x, pos) = cursor_params(*cursor)?;
                let (from_e, from_x, from_pos) = cursor_params(*from)?;
                query(&self.subs.checkpoint)
                    .bind(n)
                    .bind(p)
                    .bind(o)
                    .bind(t)
                    .bind(e)
                    .bind(x)
                    .bind(pos)
                    .bind(lease.duration.as_secs_f64())
                    .bind(from_e)
                    .bind(from_x)
                    .bind(from_pos)
            }
            Write::Fail {
                lease,
                at,
                attempts,
                error,
            } => {
                let (n, p, o, t) = lease_params(lease)?;
                query(&self.subs.fail)
                    .bind(n)
                    .bind(p)
                    .bind(o)
                    .bind(t)
                    .bind(i32::try_from(*attempts).unwrap_or(i32::MAX))
                    .bind(error.as_str())
                    .bind(cursor_text(*at))
            }
            Write::Release { lease } => {
                let (n, p, o, t) = lease_params(lease)?;
                query(&self.subs.release).bind(n).bind(p).bind(o).bind(t)
            }
            Write::Renew { lease } => {
                let (n, p, o, t) = lease_params(lease)?;
                query(&self.subs.renew)
                    .bind(n)
                    .bind(p)
                    .bind(o)
                    .bind(t)
                    .bind(lease.duration.as_secs_f64())
            }
            Write::Park { parked: p } => query(&self.subs.park)
                .bind(p.name.as_str())
                .bind(*p.aggregate.as_uuid())
                .bind(i32::try_from(p.partition).unwrap_or(i32::MAX))
                .bind(to_i64(p.version, "parked version")?)
                .bind(p.event_id)
                .bind(p.cursor.as_str())
                .bind(p.error.as_str())
                .bind(i32::try_from(p.attempts).unwrap_or(i32::MAX))
                .bind(p.state.as_str()),
            Write::Unpark {
                name,
                aggregate,
                next: Some(next),
            } => query(&self.subs.unpark_progress)
                .bind(name.as_str())
                .bind(*aggregate.as_uuid())
                .bind(to_i64(*next, "parked version")?),
            Write::Unpark {
                name,
                aggregate,
                next: None,
            } => query(&self.subs.unpark)
                .bind(name.as_str())
                .bind(*aggregate.as_uuid()),
            Write::MarkParked {
                name,
                event_id,
                state,
            } => query(&self.subs.mark_parked)
                .bind(name.as_str())
                .bind(*event_id)
                .bind(*state),
            Write::Leave { name, owner } => query(&self.subs.leave)
                .bind(name.as_str())
                .bind(owner.as_str()),
            Write::State { name, state } => {
                query(&self.subs.state).bind(name.as_str()).bind(*state)
            }
            Write::Reset {
                name,
                filter,
                start,
                cursor,
            } => {
                let (e, x, pos) = cursor_params(*cursor)?;
                query(&self.subs.reset)
                    .bind(name.as_str())
                    .bind(filter.as_str())
                    .bind(start.as_str())
                    .bind(e)
                    .bind(x)
                    .bind(pos)
            }
        };
        q.execute(&mut *conn)
            .await
            .map(|done| done.rows_affected())
            .map_err(backend_error)
    }
}

/// Runs `sql` with `params` bound to `$1`, `$2`, … over `conn`.
pub(crate) async fn execute(conn: &mut PgConnection, sql: &str, params: &[SqlValue]) -> Result<()> {
    let mut q = sqlx::query(AssertSqlSafe(sql.to_owned()));
    for param in params {
        q = match param {
            SqlValue::Null => q.bind(None::<String>),
            SqlValue::Int(v) => q.bind(*v),
            SqlValue::Float(v) => q.bind(*v),
            SqlValue::Text(v) => q.bind(v.clone()),
            SqlValue::Bytes(v) => q.bind(v.clone()),
            SqlValue::Bool(v) => q.bind(*v),
        };
    }
    q.execute(conn).await.map(|_| ()).map_err(backend_error)
}
