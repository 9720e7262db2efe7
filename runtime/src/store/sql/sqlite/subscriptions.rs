//! Durable subscriptions on SQLite: their rows, leases and checkpoints. Writes run on the writer
//! thread; a handler's checkpoint runs there with the handler's queued SQL, in one
//! `BEGIN IMMEDIATE` transaction. Times are microseconds since the Unix epoch, from this
//! machine's clock (every process sharing the file runs on it).

use std::time::{Duration, SystemTime};

use rusqlite::{Connection, OptionalExtension, Row as SqlRow, TransactionBehavior};

use crate::error::{Error, Result};
use crate::event::FeedCursor;
use crate::store::sql::backend_error;
use crate::store::sql::records::uuid_from_bytes;
use crate::store::{from_micros, to_i64, to_micros, to_u64};
use crate::subscription::SqlValue;
use crate::subscription::row::{Claim, Parked, Row, Spec, Write, cursor_text};
use crate::subscription::tx::SqliteWork;

/// The statements of subscriptions, with the table prefix filled in.
#[derive(Debug)]
pub(super) struct Statements {
    insert: String,
    select_one: String,
    select_all: String,
    select_named: String,
    claim: String,
    checkpoint: String,
    fail: String,
    release: String,
    state: String,
    reset: String,
    expire_workers: String,
    heartbeat: String,
    count_workers: String,
    leave: String,
    renew: String,
    park: String,
    unpark_progress: String,
    unpark: String,
    mark_parked: String,
    select_parked: String,
}

const COLUMNS: &str = "name, partition, partitions, filter, start_at, cursor_position, \
     lease_owner, lease_token, lease_expires_at, state, attempts, last_error, error_cursor";

/// The lease condition of a write: `?1` name, `?2` partition, `?3` owner, `?4` token.
const LEASED: &str = "name = ?1 AND partition = ?2 AND lease_owner = ?3 AND lease_token = ?4";

impl Statements {
    pub fn new(prefix: &str) -> Statements {
        let table = format!("{prefix}subscriptions");
        let workers = format!("{prefix}subscribers");
        let parked = format!("{prefix}parked");
        Statements {
            insert: format!(
                "INSERT OR IGNORE INTO {table} (name, partition, partitions, filter, start_at, \
                 cursor_tx, cursor_position, state, updated_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, 0, ?6, 'active', ?7)"
            ),
            select_one: format!("SELECT {COLUMNS} FROM {table} WHERE name = ?1 AND partition = ?2"),
            select_all: format!("SELECT {COLUMNS} FROM {table} ORDER BY name, partition"),
            select_named: format!(
                "SELECT {COLUMNS} FROM {table} WHERE name = ?1 ORDER BY partition"
            ),
            claim: format!(
                "UPDATE {table} SET \
                 lease_token = CASE WHEN lease_owner IS ?3 THEN lease_token ELSE lease_token + 1 END, \
                 lease_owner = ?3, lease_expires_at = ?4 + ?5, updated_at = ?4 \
                 WHERE name = ?1 AND partition = ?2 AND (lease_owner IS NULL OR lease_owner = ?3 \
                 OR lease_expires_at IS NULL OR lease_expires_at <= ?4) \
                 RETURNING {COLUMNS}"
            ),
            checkpoint: format!(
                "UPDATE {table} SET cursor_position = ?5, attempts = 0, last_error = NULL, \
                 error_cursor = NULL, lease_expires_at = ?6 + ?7, updated_at = ?6 \
                 WHERE {LEASED} AND cursor_position = ?8"
            ),
            fail: format!(
                "UPDATE {table} SET state = 'failed', attempts = ?5, last_error = ?6, \
                 error_cursor = ?7, updated_at = ?8 WHERE {LEASED}"
            ),
            release: format!(
                "UPDATE {table} SET lease_owner = NULL, lease_expires_at = NULL, updated_at = ?5 \
                 WHERE {LEASED}"
            ),
            state: format!(
                "UPDATE {table} SET state = ?2, \
                 attempts = CASE WHEN ?2 = 'active' THEN 0 ELSE attempts END, \
                 last_error = CASE WHEN ?2 = 'active' THEN NULL ELSE last_error END, \
                 error_cursor = CASE WHEN ?2 = 'active' THEN NULL ELSE error_cursor END, \
                 updated_at = ?3 WHERE name = ?1"
            ),
            reset: format!(
                "UPDATE {table} SET filter = ?2, start_at = ?3, cursor_tx = 0, cursor_position = ?4, \
                 state = 'active', attempts = 0, last_error = NULL, error_cursor = NULL, \
                 lease_owner = NULL, lease_expires_at = NULL, lease_token = lease_token + 1, \
                 updated_at = ?5 WHERE name = ?1"
            ),
            expire_workers: format!("DELETE FROM {workers} WHERE name = ?1 AND expires_at <= ?2"),
            heartbeat: format!(
                "INSERT INTO {workers} (name, owner, expires_at) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (name, owner) DO UPDATE SET expires_at = excluded.expires_at"
            ),
            count_workers: format!("SELECT count(*) FROM {workers} WHERE name = ?1"),
            leave: format!("DELETE FROM {workers} WHERE name = ?1 AND owner = ?2"),
            renew: format!(
                "UPDATE {table} SET lease_expires_at = ?5 + ?6, updated_at = ?5 WHERE {LEASED}"
            ),
            park: format!(
                "INSERT INTO {parked} (name, aggregate_id, partition, version, event_id, cursor, \
                 error, attempts, state, parked_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) \
                 ON CONFLICT (name, aggregate_id) DO UPDATE SET partition = excluded.partition, \
                 version = excluded.version, event_id = excluded.event_id, \
                 cursor = excluded.cursor, error = excluded.error, attempts = excluded.attempts, \
                 state = excluded.state, parked_at = excluded.parked_at"
            ),
            unpark_progress: format!(
                "UPDATE {parked} SET version = ?3, state = 'retry' \
                 WHERE name = ?1 AND aggregate_id = ?2"
            ),
            unpark: format!("DELETE FROM {parked} WHERE name = ?1 AND aggregate_id = ?2"),
            mark_parked: format!(
                "UPDATE {parked} SET state = ?3 WHERE name = ?1 AND event_id = ?2"
            ),
            select_parked: format!(
                "SELECT name, aggregate_id, partition, version, event_id, cursor, error, \
                 attempts, state, parked_at FROM {parked} \
                 WHERE name = ?1 AND (?2 IS NULL OR partition = ?2) ORDER BY parked_at, event_id"
            ),
        }
    }
}

fn now() -> i64 {
    to_micros(SystemTime::now())
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// A row of [`COLUMNS`].
fn row(r: &SqlRow<'_>) -> rusqlite::Result<RawRow> {
    Ok(RawRow {
        name: r.get(0)?,
        partition: r.get(1)?,
        partitions: r.get(2)?,
        filter: r.get::<_, Option<String>>(3)?.unwrap_or_default(),
        start: r.get(4)?,
        position: r.get(5)?,
        owner: r.get(6)?,
        token: r.get(7)?,
        expires: r.get(8)?,
        state: r.get(9)?,
        attempts: r.get(10)?,
        last_error: r.get(11)?,
        error_cursor: r.get(12)?,
    })
}

/// A row as SQLite gives it, checked into a [`Row`] by [`RawRow::checked`].
struct RawRow {
    name: String,
    partition: i64,
    partitions: i64,
    filter: String,
    start: String,
    position: i64,
    owner: Option<String>,
    token: i64,
    expires: Option<i64>,
    state: String,
    attempts: i64,
    last_error: Option<String>,
    error_cursor: Option<String>,
}

impl RawRow {
    fn checked(self) -> Result<Row> {
        let small = |v: i64, what: &str| {
            u32::try_from(v).map_err(|_| {
                Error::Corrupt(format!(
                    "subscription {:?}: {what} {v} is out of range",
                    self.name
                ))
            })
        };
        Ok(Row {
            partition: small(self.partition, "partition")?,
            partitions: small(self.partitions, "partitions")?,
            cursor: FeedCursor::at_position(to_u64(self.position, "subscription cursor")?),
            token: to_u64(self.token, "lease token")?,
            lease_expires_at: self.expires.map(from_micros),
            attempts: small(self.attempts, "attempts")?,
            name: self.name,
            filter: self.filter,
            start: self.start,
            owner: self.owner,
            state: self.state,
            last_error: self.last_error,
            error_cursor: self.error_cursor,
        })
    }
}

/// Creates the rows of `spec` if missing; partition 0 as stored.
pub(super) fn open(conn: &mut Connection, sql: &Statements, spec: &Spec) -> Result<Row> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(backend_error)?;
    {
        let mut insert = tx.prepare_cached(&sql.insert).map_err(backend_error)?;
        for partition in 0..spec.partitions.max(1) {
            insert
                .execute((
                    &spec.name,
                    partition,
                    spec.partitions.max(1),
                    &spec.filter,
                    &spec.start,
                    to_i64(spec.initial.position, "cursor")?,
                    now(),
                ))
                .map_err(backend_error)?;
        }
    }
    let row = tx
        .prepare_cached(&sql.select_one)
        .and_then(|mut s| s.query_row((&spec.name, 0), row))
        .map_err(backend_error)?;
    tx.commit().map_err(backend_error)?;
    row.checked()
}

/// Grants or renews the lease of `claim`.
pub(super) fn claim(conn: &Connection, sql: &Statements, claim: &Claim) -> Result<Option<Row>> {
    let found = conn
        .prepare_cached(&sql.claim)
        .and_then(|mut s| {
            s.query_row(
                (
                    &claim.name,
                    claim.partition,
                    &claim.owner,
                    now(),
                    micros(claim.lease),
                ),
                row,
            )
            .optional()
        })
        .map_err(backend_error)?;
    match found {
        Some(row) => row.checked().map(Some),
        None => {
            let exists = conn
                .prepare_cached(&sql.select_one)
                .and_then(|mut s| {
                    s.query_row((&claim.name, claim.partition), |_| Ok(()))
                        .optional()
                })
                .map_err(backend_error)?;
            match exists {
                Some(()) => Ok(None),
                None => Err(Error::SubscriptionNotFound {
                    name: claim.name.clone(),
                }),
            }
        }
    }
}

/// Renews the heartbeat of `claim.owner`; how many workers run `claim.name` now.
pub(super) fn heartbeat(conn: &mut Connection, sql: &Statements, claim: &Claim) -> Result<u32> {
    let now = now();
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(backend_error)?;
    let live: i64 = (|| {
        tx.prepare_cached(&sql.expire_workers)?
            .execute((&claim.name, now))?;
        tx.prepare_cached(&sql.heartbeat)?.execute((
            &claim.name,
            &claim.owner,
            now.saturating_add(micros(claim.lease)),
        ))?;
        tx.prepare_cached(&sql.count_workers)?
            .query_row([&claim.name], |r| r.get(0))
    })()
    .map_err(backend_error)?;
    tx.commit().map_err(backend_error)?;
    Ok(u32::try_from(live).unwrap_or(u32::MAX))
}

/// The rows of `name`, or of every subscription.
pub(super) fn rows(conn: &Connection, sql: &Statements, name: Option<&str>) -> Result<Vec<Row>> {
    let raw: Vec<RawRow> = match name {
        Some(name) => conn
            .prepare_cached(&sql.select_named)
            .and_then(|mut s| s.query_map([name], row)?.collect()),
        None => conn
            .prepare_cached(&sql.select_all)
            .and_then(|mut s| s.query_map([], row)?.collect()),
    }
    .map_err(backend_error)?;
    raw.into_iter().map(RawRow::checked).collect()
}

/// Runs the handler's queued `work`, then `writes`, in one transaction.
pub(super) fn commit(
    conn: &mut Connection,
    sql: &Statements,
    work: Vec<SqliteWork>,
    writes: &[Write],
) -> Result<()> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(backend_error)?;
    for job in work {
        job(&tx).map_err(Error::Backend)?;
    }
    for write in writes {
        // Dropping `tx` on an error rolls the handler's writes back.
        one_write(&tx, sql, write)?;
    }
    tx.commit().map_err(backend_error)
}

/// Makes one write in `tx`.
fn one_write(tx: &rusqlite::Transaction<'_>, sql: &Statements, write: &Write) -> Result<()> {
    let now = now();
    let leased = |l: &crate::subscription::row::Lease| -> Result<(String, u32, String, i64)> {
        Ok((
            l.name.clone(),
            l.partition,
            l.owner.clone(),
            to_i64(l.token, "lease token")?,
        ))
    };
    let changed = match write {
        Write::Checkpoint {
            lease,
            from,
            cursor,
        } => {
            let (n, p, o, t) = leased(lease)?;
            let position = to_i64(cursor.position, "cursor")?;
            let from = to_i64(from.position, "cursor")?;
            tx.prepare_cached(&sql.checkpoint).and_then(|mut s| {
                s.execute((n, p, o, t, position, now, micros(lease.duration), from))
            })
        }
        Write::Fail {
            lease,
            at,
            attempts,
            error,
        } => {
            let (n, p, o, t) = leased(lease)?;
            tx.prepare_cached(&sql.fail)
                .and_then(|mut s| s.execute((n, p, o, t, attempts, error, cursor_text(*at), now)))
        }
        Write::Release { lease } => {
            let (n, p, o, t) = leased(lease)?;
            tx.prepare_cached(&sql.release)
                .and_then(|mut s| s.execute((n, p, o, t, now)))
        }
        Write::Renew { lease } => {
            let (n, p, o, t) = leased(lease)?;
            tx.prepare_cached(&sql.renew)
                .and_then(|mut s| s.execute((n, p, o, t, now, micros(lease.duration))))
        }
        Write::Park { parked } => {
            let p = parked;
            tx.prepare_cached(&sql.park).and_then(|mut s| {
                s.execute(rusqlite::params![
                    p.name,
                    p.aggregate.as_uuid().as_bytes().as_slice(),
                    p.partition,
                    i64::try_from(p.version).unwrap_or(i64::MAX),
                    p.event_id.as_bytes().as_slice(),
                    p.cursor,
                    p.error,
                    p.attempts,
                    p.state,
                    to_micros(p.parked_at),
                ])
            })
        }
        Write::Unpark {
            name,
            aggregate,
            next,
        } => {
            let id = aggregate.as_uuid().as_bytes().as_slice();
            match next {
                Some(next) => tx.prepare_cached(&sql.unpark_progress).and_then(|mut s| {
                    s.execute((name, id, i64::try_from(*next).unwrap_or(i64::MAX)))
                }),
                None => tx
                    .prepare_cached(&sql.unpark)
                    .and_then(|mut s| s.execute((name, id))),
            }
        }
        Write::MarkParked {
            name,
            event_id,
            state,
        } => tx
            .prepare_cached(&sql.mark_parked)
            .and_then(|mut s| s.execute((name, event_id.as_bytes().as_slice(), state))),
        Write::Leave { name, owner } => tx
            .prepare_cached(&sql.leave)
            .and_then(|mut s| s.execute((name, owner))),
        Write::State { name, state } => tx
            .prepare_cached(&sql.state)
            .and_then(|mut s| s.execute((name, state, now))),
        Write::Reset {
            name,
            filter,
            start,
            cursor,
        } => {
            let position = to_i64(cursor.position, "cursor")?;
            tx.prepare_cached(&sql.reset)
                .and_then(|mut s| s.execute((name, filter, start, position, now)))
        }
    }
    .map_err(backend_error)?;
    match write.missed() {
        Some(error) if changed == 0 => Err(error),
        _ => Ok(()),
    }
}

/// Runs `sql` with `params` bound to `?1`/`$1`, … in order, on `tx`.
pub(crate) fn execute(tx: &Connection, sql: &str, params: &[SqlValue]) -> Result<()> {
    use rusqlite::types::Value;
    let values = params.iter().map(|p| match p {
        SqlValue::Null => Value::Null,
        SqlValue::Int(v) => Value::Integer(*v),
        SqlValue::Float(v) => Value::Real(*v),
        SqlValue::Text(v) => Value::Text(v.clone()),
        SqlValue::Bytes(v) => Value::Blob(v.clone()),
        SqlValue::Bool(v) => Value::Integer(i64::from(*v)),
    });
    // Stepped through rather than `execute`d: a statement that returns rows (a `SELECT`, an
    // `UPDATE … RETURNING`) runs too, as it does on PostgreSQL.
    tx.prepare_cached(&numbered(sql))
        .and_then(|mut s| {
            let mut rows = s.query(rusqlite::params_from_iter(values))?;
            while rows.next()?.is_some() {}
            Ok(())
        })
        .map_err(backend_error)
}

/// `sql` with PostgreSQL's `$1`, `$2`, … written as SQLite's `?1`, `?2`, …, outside quoted text
/// and identifiers: SQLite reads `$1` as a named parameter numbered by where it first appears,
/// so `$2` written before `$1` would take the first value.
fn numbered(sql: &str) -> std::borrow::Cow<'_, str> {
    if !sql.contains('$') {
        return std::borrow::Cow::Borrowed(sql);
    }
    let mut out = String::with_capacity(sql.len());
    let mut quote: Option<char> = None;
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '\'' || c == '"' => quote = Some(c),
            None if c == '$' && chars.peek().is_some_and(char::is_ascii_digit) => {
                out.push('?');
                continue;
            }
            None => {}
        }
        out.push(c);
    }
    std::borrow::Cow::Owned(out)
}

/// The events `name` parked (in `partition`, or in all), oldest first.
pub(super) fn parked(
    conn: &Connection,
    sql: &Statements,
    name: &str,
    partition: Option<u32>,
) -> Result<Vec<Parked>> {
    type Raw = (
        String,
        Vec<u8>,
        i64,
        i64,
        Vec<u8>,
        String,
        String,
        i64,
        String,
        i64,
    );
    let rows: Vec<Raw> = conn
        .prepare_cached(&sql.select_parked)
        .and_then(|mut s| {
            s.query_map((name, partition), |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                    r.get(7)?,
                    r.get(8)?,
                    r.get(9)?,
                ))
            })?
            .collect()
        })
        .map_err(backend_error)?;
    rows.into_iter()
        .map(
            |(
                name,
                aggregate,
                partition,
                version,
                event_id,
                cursor,
                error,
                attempts,
                state,
                at,
            )| {
                let small = |v: i64, what: &str| {
                    u32::try_from(v).map_err(|_| {
                        Error::Corrupt(format!(
                            "parked event of {name:?}: {what} {v} is out of range"
                        ))
                    })
                };
                Ok(Parked {
                    aggregate: uuid_from_bytes(&aggregate, "parked aggregate id")?.into(),
                    partition: small(partition, "partition")?,
                    version: to_u64(version, "parked version")?,
                    event_id: uuid_from_bytes(&event_id, "parked event id")?,
                    cursor,
                    error,
                    attempts: small(attempts, "attempts")?,
                    state,
                    parked_at: from_micros(at),
                    name,
                })
            },
        )
        .collect()
}

#[cfg(test)]
mod tests {
    use super::numbered;

    #[test]
    fn dollar_parameters_become_numbered() {
        assert_eq!(
            numbered("SELECT $2, '$1', \"$3\" FROM t WHERE a = $1 AND b = $10"),
            "SELECT ?2, '$1', \"$3\" FROM t WHERE a = ?1 AND b = ?10"
        );
        assert_eq!(numbered("SELECT 1"), "SELECT 1");
        assert_eq!(numbered("SELECT '$' || $1"), "SELECT '$' || ?1");
    }
}
