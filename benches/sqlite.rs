//! annals on SQLite against the same work written by hand with raw sqlx, in one process.
//!
//! `cargo bench --bench sqlite` (add `ANNALS_BENCH_QUICK=1` for a smoke run).
//!
//! Both sides use the same schema (the raw side creates it from `annals::migrations` with its
//! own table prefix, in its own file), the same pragmas (WAL, `synchronous=FULL`), one writer
//! connection in `BEGIN IMMEDIATE` transactions and a pool of readers, the same payloads
//! (serde JSON), the same type ids, event ids and timestamps.
//!
//! - W1: sequential commits, each creating an aggregate with one event.
//! - W3: sequential commits, each creating an aggregate with 100 events.
//! - W4: loading one 10,000-event aggregate (rows read, payloads decoded, state folded).
//! - W5: the same aggregate with a snapshot every 100 events: snapshot plus 50 events.

#[path = "harness/mod.rs"]
mod harness;

use std::str::FromStr;
use std::time::Duration;

use annals::prelude::*;
use annals::{Dialect, migrations};
use harness::{Measure, Row, compare, size, timed};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{AssertSqlSafe, Connection, Row as _};

use harness::ledger::*;

/// The hand-written side: the annals schema under the prefix `raw_`, its own file.
struct Raw {
    writer: SqlitePool,
    readers: SqlitePool,
    ledger_type: i64,
    snapped_type: i64,
    moved_type: i64,
}

impl Raw {
    async fn open(path: &std::path::Path) -> Raw {
        let connect = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))
            .unwrap()
            .create_if_missing(true)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5))
            .synchronous(SqliteSynchronous::Full)
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
        Raw {
            ledger_type: type_id("aggregate_types", "bench.ledger").await,
            snapped_type: type_id("aggregate_types", "bench.snapped_ledger").await,
            moved_type: type_id("event_types", "bench.moved").await,
            writer,
            readers,
        }
    }

    /// One commit: a new aggregate with `events`, by hand.
    async fn create(
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
    async fn load<S: Default + Apply<Moved> + serde::de::DeserializeOwned>(
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

/// Writes one aggregate of `events` events on both sides, checks that both rebuild the same
/// state, then times `loads` loads of it per round on each side.
async fn compare_loads<L: LedgerAggregate>(
    raw: &Raw,
    store: &Store,
    events: usize,
    loads: usize,
    rounds: usize,
) -> (Duration, Duration) {
    let snapshots = L::SNAPSHOT_EVERY.map(|n| n as usize);
    let type_id = if snapshots.is_some() {
        raw.snapped_type
    } else {
        raw.ledger_type
    };
    let all: Vec<Moved> = (0..events).map(moved).collect();
    let raw_id = raw.create(type_id, &all, snapshots).await;
    let annals_id = annals_create::<L>(store, &all).await;
    let (state, version) = raw.load::<L>(raw_id, snapshots.is_some()).await;
    let loaded = store.begin_read_only().load::<L>(annals_id).await.unwrap();
    assert_eq!(loaded.totals(), state.totals());
    assert_eq!((loaded.version(), version), (events as u64, events as i64));
    compare(
        rounds,
        |_| {
            timed(async {
                for _ in 0..loads {
                    std::hint::black_box(raw.load::<L>(raw_id, snapshots.is_some()).await);
                }
            })
        },
        |_| {
            timed(async {
                for _ in 0..loads {
                    std::hint::black_box(
                        store.begin_read_only().load::<L>(annals_id).await.unwrap(),
                    );
                }
            })
        },
    )
    .await
}

async fn annals_create<A: Aggregate + annals::Handles<Moved> + Apply<Moved>>(
    store: &Store,
    events: &[Moved],
) -> AggregateId {
    store
        .transact(async |ctx| {
            let mut root = ctx.create::<A>()?;
            for e in events {
                ctx.apply(&mut root, e.clone())?;
            }
            Ok::<_, Error>(root.id())
        })
        .await
        .unwrap()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&format!(
        "sqlite://{}",
        dir.path().join("annals.db").display()
    ))
    .await
    .unwrap();
    let raw = Raw::open(&dir.path().join("raw.db")).await;
    let rounds = size(9, 1);
    let mut rows = Vec::new();

    // W1: sequential one-event commits.
    let commits = size(400, 5);
    let one = [moved(1)];
    let (r, a) = compare(
        rounds,
        |_| {
            timed(async {
                for _ in 0..commits {
                    raw.create(raw.ledger_type, &one, None).await;
                }
            })
        },
        |_| {
            timed(async {
                for _ in 0..commits {
                    annals_create::<Ledger>(&store, &one).await;
                }
            })
        },
    )
    .await;
    rows.push(Row {
        name: "W1",
        what: "one-event commits, sequential".into(),
        measure: Measure::Throughput { ops: commits },
        raw: r,
        annals: a,
        goal: ">= 0.9x",
    });

    // W3: commits of 100 events.
    let commits = size(100, 3);
    let hundred: Vec<Moved> = (0..100).map(moved).collect();
    let (r, a) = compare(
        rounds,
        |_| {
            timed(async {
                for _ in 0..commits {
                    raw.create(raw.ledger_type, &hundred, None).await;
                }
            })
        },
        |_| {
            timed(async {
                for _ in 0..commits {
                    annals_create::<Ledger>(&store, &hundred).await;
                }
            })
        },
    )
    .await;
    rows.push(Row {
        name: "W3",
        what: "100-event commits, sequential".into(),
        measure: Measure::Throughput { ops: commits },
        raw: r,
        annals: a,
        goal: ">= 0.8x",
    });

    // W4: loading a 10,000-event aggregate.
    let events = size(10_000, 300);
    let loads = size(30, 2);
    let (r, a) = compare_loads::<Ledger>(&raw, &store, events, loads, rounds).await;
    rows.push(Row {
        name: "W4",
        what: format!("load a {events}-event aggregate"),
        measure: Measure::Throughput { ops: loads },
        raw: r,
        annals: a,
        goal: ">= 0.9x",
    });

    // W5: the same with a snapshot every 100 events; 50 events after the newest snapshot.
    let events = size(10_050, 350);
    let loads = size(2000, 5);
    let (r, a) = compare_loads::<SnappedLedger>(&raw, &store, events, loads, rounds).await;
    rows.push(Row {
        name: "W5",
        what: format!("load {events} events, snapshot every 100"),
        measure: Measure::Time,
        raw: r / loads as u32,
        annals: a / loads as u32,
        goal: "<= 1.2x",
    });

    harness::print_table(
        "annals on SQLite against raw sqlx (same process, same schema and pragmas)",
        &rows,
    );
    store.close().await;
}
