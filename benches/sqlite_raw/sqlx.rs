//! The old baseline: the same work by hand on sqlx's SQLite driver (what the SQLite store ran on
//! before rusqlite), with one writer connection in `BEGIN IMMEDIATE` transactions and a pool of
//! read-only connections, the annals schema under the prefix `raw_`, in its own file.

use std::str::FromStr;
use std::time::Duration;

use annals::prelude::*;
use annals::{Dialect, Synchronous, migrations};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{AssertSqlSafe, Connection, Row as _};

use crate::harness::ledger::*;

pub struct RawSqlx {
    writer: SqlitePool,
    readers: SqlitePool,
    pub ledger_type: i64,
    pub snapped_type: i64,
    pub moved_type: i64,
}

impl RawSqlx {
    pub async fn open(path: &std::path::Path, synchronous: Synchronous) -> RawSqlx {
        let connect = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))
            .unwrap()
            .create_if_missing(true)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5))
            .synchronous(match synchronous {
                Synchronous::Full => SqliteSynchronous::Full,
                Synchronous::Normal => SqliteSynchronous::Normal,
            })
            .journal_mode(SqliteJournalMode::Wal);
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(connect.clone())
            .await
            .unwrap();
        let readers = SqlitePoolOptions::new()
            .max_connections(10)
            .connect_with(connect.read_only(true))
            .await
            .unwrap();
        let options = StoreOptions::new().table_prefix("raw_");
        for m in migrations(Dialect::Sqlite, &options).unwrap() {
            sqlx::raw_sql(AssertSqlSafe(m.sql))
                .execute(&writer)
                .await
                .unwrap();
        }
        let type_id = async |table: &str, name: &str| -> i64 {
            sqlx::query(AssertSqlSafe(format!(
                "INSERT INTO raw_{table} (name) VALUES (?1)"
            )))
            .bind(name)
            .execute(&writer)
            .await
            .unwrap()
            .last_insert_rowid()
        };
        RawSqlx {
            ledger_type: type_id("aggregate_types", "bench.ledger").await,
            snapped_type: type_id("aggregate_types", "bench.snapped_ledger").await,
            moved_type: type_id("event_types", "bench.moved").await,
            writer,
            readers,
        }
    }

    /// One commit: a new aggregate with `events`, by hand.
    pub async fn create(
        &self,
        type_id: i64,
        events: &[Moved],
        snapshot_every: Option<usize>,
    ) -> uuid::Uuid {
        let id = uuid::Uuid::now_v7();
        let mut conn = self.writer.acquire().await.unwrap();
        let mut tx = conn.begin_with("BEGIN IMMEDIATE").await.unwrap();
        sqlx::query("INSERT INTO raw_aggregates (id, type_id, natural_key, version) VALUES (?1, ?2, NULL, ?3)")
            .bind(id.as_bytes().as_slice())
            .bind(type_id)
            .bind(events.len() as i64)
            .execute(&mut *tx)
            .await
            .unwrap();
        let recorded_at = micros_now();
        for (chunk_index, chunk) in events.chunks(500).enumerate() {
            let mut sql = String::from(
                "INSERT INTO raw_events (aggregate_id, sequence, event_type_id, schema_version, payload, metadata, recorded_at, event_id) VALUES ",
            );
            for row in 0..chunk.len() {
                let b = row * 8;
                if row > 0 {
                    sql.push(',');
                }
                sql.push_str(&format!(
                    "(?{},?{},?{},?{},?{},?{},?{},?{})",
                    b + 1,
                    b + 2,
                    b + 3,
                    b + 4,
                    b + 5,
                    b + 6,
                    b + 7,
                    b + 8
                ));
            }
            let mut query = sqlx::query(AssertSqlSafe(sql));
            for (i, event) in chunk.iter().enumerate() {
                let sequence = (chunk_index * 500 + i + 1) as i64;
                query = query
                    .bind(id.as_bytes().as_slice())
                    .bind(sequence)
                    .bind(self.moved_type)
                    .bind(1i64)
                    .bind(serde_json::to_vec(event).unwrap())
                    .bind(None::<Vec<u8>>)
                    .bind(recorded_at)
                    .bind(uuid::Uuid::now_v7().as_bytes().to_vec());
            }
            query.execute(&mut *tx).await.unwrap();
        }
        if let Some(every) = snapshot_every {
            let at = events.len() / every * every;
            if at > 0 {
                let mut state = Totals::default();
                for e in &events[..at] {
                    state.fold(e);
                }
                sqlx::query("INSERT OR REPLACE INTO raw_snapshots (aggregate_id, snapshot_version, version, payload, recorded_at) VALUES (?1, 1, ?2, ?3, ?4)")
                    .bind(id.as_bytes().as_slice())
                    .bind(at as i64)
                    .bind(serde_json::to_vec(&state).unwrap())
                    .bind(recorded_at)
                    .execute(&mut *tx)
                    .await
                    .unwrap();
            }
        }
        tx.commit().await.unwrap();
        id
    }

    /// One load by hand: the row, the newest snapshot (if asked), the events after it.
    pub async fn load<S: Default + Apply<Moved> + serde::de::DeserializeOwned>(
        &self,
        id: uuid::Uuid,
        with_snapshot: bool,
    ) -> (S, i64) {
        let mut conn = self.readers.acquire().await.unwrap();
        let version: i64 = sqlx::query_scalar("SELECT version FROM raw_aggregates WHERE id = ?1")
            .bind(id.as_bytes().as_slice())
            .fetch_one(&mut *conn)
            .await
            .unwrap();
        let (mut state, from) = if with_snapshot {
            let row = sqlx::query("SELECT version, payload FROM raw_snapshots WHERE aggregate_id = ?1 AND snapshot_version = 1 AND version <= ?2 ORDER BY version DESC LIMIT 1")
                .bind(id.as_bytes().as_slice())
                .bind(version)
                .fetch_optional(&mut *conn)
                .await
                .unwrap();
            match row {
                Some(row) => {
                    let payload: Vec<u8> = row.get(1);
                    (
                        serde_json::from_slice(&payload).unwrap(),
                        row.get::<i64, _>(0),
                    )
                }
                None => (S::default(), 0),
            }
        } else {
            (S::default(), 0)
        };
        let rows = sqlx::query("SELECT sequence, position, event_type_id, schema_version, payload FROM raw_events WHERE aggregate_id = ?1 AND sequence > ?2 AND sequence <= ?3 ORDER BY sequence")
            .bind(id.as_bytes().as_slice())
            .bind(from)
            .bind(version)
            .fetch_all(&mut *conn)
            .await
            .unwrap();
        for row in rows {
            let type_id: i64 = row.get(2);
            assert_eq!(type_id, self.moved_type);
            let payload: Vec<u8> = row.get(4);
            let event: Moved = serde_json::from_slice(&payload).unwrap();
            state.apply(&event);
        }
        (state, version)
    }
}
