//! The limit: the same work by hand on rusqlite, reached from async code the cheapest way a
//! program can (rusqlite blocks): one writer thread fed by a channel, each commit one message
//! answered on a oneshot, and loads in `block_in_place` over idle read-only connections (as the
//! store reads on a multi-threaded runtime; `spawn_blocking` costs more, see the store's
//! `readers.rs`). Same
//! schema (`raw_` prefix, from `annals::migrations`, its own file), same pragmas, same SQL text
//! as the store, cached prepared statements. A load reads every column its statements select
//! and checks that versions follow each other, then decodes each payload in place (borrowed
//! from the row, with no copy): the least a correct loader does.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};

use annals::prelude::*;
use annals::rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior};
use annals::{Dialect, Synchronous, migrations};

use crate::harness::ledger::*;

type Job = Box<dyn FnOnce(&mut Connection) + Send>;

pub struct RawRusqlite {
    writer: mpsc::Sender<Job>,
    idle: Arc<Mutex<Vec<Connection>>>,
    path: PathBuf,
    pub ledger_type: i64,
    pub snapped_type: i64,
    pub moved_type: i64,
}

fn set_up(conn: &Connection) {
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .unwrap();
    conn.pragma_update(None, "foreign_keys", "ON").unwrap();
    conn.set_prepared_statement_cache_capacity(64);
}

impl RawRusqlite {
    pub async fn open(path: &Path, synchronous: Synchronous) -> RawRusqlite {
        let conn = Connection::open(path).unwrap();
        set_up(&conn);
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let sync = match synchronous {
            Synchronous::Full => "FULL",
            Synchronous::Normal => "NORMAL",
        };
        conn.pragma_update(None, "synchronous", sync).unwrap();
        for m in migrations(Dialect::Sqlite, &StoreOptions::new().table_prefix("raw_")).unwrap() {
            conn.execute_batch(&m.sql).unwrap();
        }
        let type_id = |table: &str, name: &str| -> i64 {
            conn.execute(
                &format!("INSERT INTO raw_{table} (name) VALUES (?1)"),
                [name],
            )
            .unwrap();
            conn.last_insert_rowid()
        };
        let ledger_type = type_id("aggregate_types", "bench.ledger");
        let snapped_type = type_id("aggregate_types", "bench.snapped_ledger");
        let moved_type = type_id("event_types", "bench.moved");
        let (writer, jobs) = mpsc::channel::<Job>();
        std::thread::spawn(move || {
            let mut conn = conn;
            while let Ok(job) = jobs.recv() {
                job(&mut conn);
            }
        });
        RawRusqlite {
            writer,
            idle: Arc::new(Mutex::new(Vec::new())),
            path: path.to_owned(),
            ledger_type,
            snapped_type,
            moved_type,
        }
    }

    async fn on_writer<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Connection) -> T + Send + 'static,
    ) -> T {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.writer
            .send(Box::new(move |conn| {
                let _ = reply.send(work(conn));
            }))
            .unwrap();
        answer.await.unwrap()
    }

    async fn on_reader<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Connection) -> T + Send + 'static,
    ) -> T {
        let idle = self.idle.clone();
        let path = self.path.clone();
        tokio::task::block_in_place(move || {
            let conn = idle.lock().unwrap().pop().unwrap_or_else(|| {
                let conn = Connection::open_with_flags(
                    &path,
                    OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )
                .unwrap();
                set_up(&conn);
                conn
            });
            let out = work(&conn);
            idle.lock().unwrap().push(conn);
            out
        })
    }

    /// One commit: a new aggregate with `events`, by hand.
    pub async fn create(
        &self,
        type_id: i64,
        events: &[Moved],
        snapshot_every: Option<usize>,
    ) -> uuid::Uuid {
        let id = uuid::Uuid::now_v7();
        // Encoded before the commit, as a context encodes at `apply`.
        let rows: Vec<(Vec<u8>, uuid::Uuid)> = events
            .iter()
            .map(|e| (serde_json::to_vec(e).unwrap(), uuid::Uuid::now_v7()))
            .collect();
        let snapshot = snapshot_every.and_then(|every| {
            let at = events.len() / every * every;
            (at > 0).then(|| {
                let mut state = Totals::default();
                for e in &events[..at] {
                    state.fold(e);
                }
                (at as i64, serde_json::to_vec(&state).unwrap())
            })
        });
        let moved_type = self.moved_type;
        self.on_writer(move |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .unwrap();
            tx.prepare_cached("INSERT INTO raw_aggregates (id, type_id, natural_key, version) VALUES (?1, ?2, ?3, ?4) ON CONFLICT DO NOTHING")
                .unwrap()
                .execute((id.as_bytes().as_slice(), type_id, None::<&str>, rows.len() as i64))
                .unwrap();
            let recorded_at = micros_now();
            for (chunk_index, chunk) in rows.chunks(500).enumerate() {
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
                        b + 1, b + 2, b + 3, b + 4, b + 5, b + 6, b + 7, b + 8
                    ));
                }
                let mut stmt = tx.prepare_cached(&sql).unwrap();
                for (i, (payload, event_id)) in chunk.iter().enumerate() {
                    let b = i * 8;
                    let sequence = (chunk_index * 500 + i + 1) as i64;
                    stmt.raw_bind_parameter(b + 1, id.as_bytes().as_slice()).unwrap();
                    stmt.raw_bind_parameter(b + 2, sequence).unwrap();
                    stmt.raw_bind_parameter(b + 3, moved_type).unwrap();
                    stmt.raw_bind_parameter(b + 4, 1i64).unwrap();
                    stmt.raw_bind_parameter(b + 5, payload.as_slice()).unwrap();
                    stmt.raw_bind_parameter(b + 6, None::<&[u8]>).unwrap();
                    stmt.raw_bind_parameter(b + 7, recorded_at).unwrap();
                    stmt.raw_bind_parameter(b + 8, event_id.as_bytes().as_slice()).unwrap();
                }
                stmt.raw_execute().unwrap();
            }
            if let Some((at, payload)) = snapshot {
                tx.prepare_cached("INSERT OR REPLACE INTO raw_snapshots (aggregate_id, snapshot_version, version, payload, recorded_at) VALUES (?1, ?2, ?3, ?4, ?5)")
                    .unwrap()
                    .execute((id.as_bytes().as_slice(), 1i64, at, payload.as_slice(), recorded_at))
                    .unwrap();
            }
            tx.commit().unwrap();
        })
        .await;
        id
    }

    /// The least SQL for one deposit, deciding nothing from the aggregate's state: the next
    /// sequence read in the write transaction that inserts the event.
    pub async fn deposit(&self, id: uuid::Uuid, event: &Moved) {
        let payload = serde_json::to_vec(event).unwrap();
        let event_id = uuid::Uuid::now_v7();
        let moved_type = self.moved_type;
        self.on_writer(move |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .unwrap();
            let id = id.as_bytes().as_slice();
            let last: Option<i64> = tx
                .prepare_cached("SELECT max(sequence) FROM raw_events WHERE aggregate_id = ?1")
                .unwrap()
                .query_row([id], |r| r.get(0))
                .unwrap();
            tx.prepare_cached("INSERT INTO raw_events (aggregate_id, sequence, event_type_id, schema_version, payload, metadata, recorded_at, event_id) VALUES (?1, ?2, ?3, 1, ?4, NULL, ?5, ?6)")
                .unwrap()
                .execute((
                    id,
                    last.unwrap_or(0) + 1,
                    moved_type,
                    payload.as_slice(),
                    micros_now(),
                    event_id.as_bytes().as_slice(),
                ))
                .unwrap();
            tx.commit().unwrap();
        })
        .await
    }

    /// One load by hand: the row, the newest snapshot (if asked), the events after it, decoded
    /// and folded on the reader thread.
    pub async fn load<S>(&self, id: uuid::Uuid, with_snapshot: bool) -> (S, i64)
    where
        S: Default + Apply<Moved> + serde::de::DeserializeOwned + Send + 'static,
    {
        let moved_type = self.moved_type;
        self.on_reader(move |conn| {
            let id = id.as_bytes().as_slice();
            let version: i64 = conn
                .prepare_cached("SELECT a.id, a.type_id, a.natural_key, a.version FROM raw_aggregates a WHERE a.id = ?1")
                .unwrap()
                .query_row([id], |r| r.get(3))
                .unwrap();
            let (mut state, from) = if with_snapshot {
                let found = conn
                    .prepare_cached("SELECT version, payload FROM raw_snapshots WHERE aggregate_id = ?1 AND snapshot_version = ?2 AND version <= ?3 ORDER BY version DESC LIMIT 1")
                    .unwrap()
                    .query_row((id, 1i64, version), |r| {
                        Ok((r.get::<_, i64>(0)?, serde_json::from_slice::<S>(r.get_ref(1)?.as_blob()?).unwrap()))
                    })
                    .optional()
                    .unwrap();
                match found {
                    Some((at, state)) => (state, at),
                    None => (S::default(), 0),
                }
            } else {
                (S::default(), 0)
            };
            let mut stmt = conn
                .prepare_cached("SELECT sequence, position, event_type_id, schema_version, payload FROM raw_events WHERE aggregate_id = ?1 AND sequence > ?2 AND sequence <= ?3 ORDER BY sequence")
                .unwrap();
            let mut rows = stmt.query((id, from, version)).unwrap();
            let mut at = from;
            while let Some(row) = rows.next().unwrap() {
                // Every column it selects is read, as a loader that reports positions, checks
                // that versions follow each other and picks an upcaster by schema version must.
                let sequence: i64 = row.get(0).unwrap();
                let position: i64 = row.get(1).unwrap();
                let type_id: i64 = row.get(2).unwrap();
                let schema_version: i64 = row.get(3).unwrap();
                assert_eq!(sequence, at + 1, "gap before position {position}");
                assert_eq!((type_id, schema_version), (moved_type, 1));
                let event: Moved =
                    serde_json::from_slice(row.get_ref(4).unwrap().as_blob().unwrap()).unwrap();
                state.apply(&event);
                at = sequence;
            }
            (state, version)
        })
        .await
    }
}
