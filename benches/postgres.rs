//! annals on PostgreSQL against the same work written by hand with raw sqlx, in one process.
//!
//! `DATABASE_URL=postgres://… cargo bench --bench postgres --features postgres`
//! (add `ANNALS_BENCH_QUICK=1` for a smoke run of a few seconds).
//!
//! Both sides work in one fresh schema of the same server: annals under the prefix `annals_`,
//! the raw side under `raw_`, its tables created from `annals::migrations`, so the indexes,
//! constraints and column types are the same. Both use a pool of 10 connections with the same
//! settings, commit in autocommit statements with the server's durability
//! (`synchronous_commit` as configured), and do the same work: a compare-and-set of the
//! aggregate's version, events inserted with their type id, schema version, serde JSON payload,
//! JSON metadata (a correlation id), a UUID v7 event id and the commit time; a load reads the
//! aggregate's version, its newest snapshot when it takes them, and the events after it, and
//! decodes every payload into the same Rust struct, folded into the same state. The raw side
//! sends the statements annals sends, written for its one aggregate type (it knows its type ids
//! and snapshot shape statically, and sends no `NOTIFY`).
//!
//! W2 has a second raw baseline, the least SQL a deposit needs when it decides nothing from the
//! aggregate's state: `BEGIN; SELECT max(sequence) …; INSERT …; COMMIT`, no load. annals runs W2
//! twice: as opened by default, and with an aggregate cache (`StoreOptions::aggregate_cache`),
//! which spares each command decoding and applying the aggregate's past events.
//!
//! After the table, W2's CPU per command is split between this process and the server's
//! backends serving the benchmark's connections (read from `/proc`, so only when the server
//! runs on this machine): where a side spends more than the other; and the WAL written per
//! command.
//!
//! - W1: sequential commits, each loading an aggregate (a few events) and appending one event.
//! - W2: 8 concurrent tasks, each running one-event deposit commands (load, apply, commit) on
//!   an aggregate of its own, a fresh one every round.
//! - W3: sequential commits of 100 events, each to an aggregate loaded with one event.
//! - W4: loading one 10,000-event aggregate.
//! - W5: the same with a snapshot every 100 events: the snapshot plus 50 events.

#[path = "harness/mod.rs"]
mod harness;

use std::str::FromStr;
use std::time::Duration;

use annals::prelude::*;
use annals::{Dialect, migrations};
use harness::{Measure, Row, compare, size, timed};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, Connection, Row as _};

use harness::ledger::*;

fn pool_options() -> PgPoolOptions {
    // The settings annals' own pool uses: no ping on every checkout.
    PgPoolOptions::new()
        .max_connections(10)
        .test_before_acquire(false)
}

/// The hand-written side: the annals schema under the prefix `raw_`.
struct Raw {
    pool: PgPool,
    ledger_type: i32,
    snapped_type: i32,
    moved_type: i32,
    load_sql: String,
    load_snapshot_sql: String,
    commit_sql: String,
    /// One event to one aggregate: plain parameters, as annals sends it.
    commit_one_sql: String,
    max_sequence_sql: String,
    insert_event_sql: String,
}

impl Raw {
    async fn open(url: &str, schema: &str) -> Raw {
        let pool = pool_options()
            .connect_with(PgConnectOptions::from_str(url).unwrap())
            .await
            .unwrap();
        let options = StoreOptions::new().schema(schema).table_prefix("raw_");
        for m in migrations(Dialect::Postgres, &options).unwrap() {
            sqlx::raw_sql(AssertSqlSafe(m.sql))
                .execute(&pool)
                .await
                .unwrap();
        }
        let type_id = async |table: &str, name: &str| -> i32 {
            sqlx::query_scalar(AssertSqlSafe(format!(
                "INSERT INTO {schema}.raw_{table} (name) VALUES ($1) RETURNING id"
            )))
            .bind(name)
            .fetch_one(&pool)
            .await
            .unwrap()
        };
        let load = |snapshots: bool| {
            let snapshot = if snapshots {
                format!(
                    "SELECT s.version, s.payload FROM {schema}.raw_snapshots s, a \
                     WHERE s.aggregate_id = $1 AND s.snapshot_version = 1 AND s.version <= a.version \
                     ORDER BY s.version DESC LIMIT 1"
                )
            } else {
                "SELECT NULL::int8 AS version, NULL::bytea AS payload WHERE false".to_owned()
            };
            format!(
                "WITH a AS (SELECT version FROM {schema}.raw_aggregates WHERE id = $1), \
                      s AS ({snapshot}) \
                 SELECT NULL::int8 AS sequence, a.version AS number, s.version AS snap, s.payload \
                 FROM a LEFT JOIN s ON true \
                 UNION ALL \
                 (SELECT e.sequence, e.event_type_id::int8, NULL, e.payload \
                  FROM {schema}.raw_events e, a \
                  WHERE e.aggregate_id = $1 AND e.sequence > COALESCE((SELECT version FROM s), 0) \
                    AND e.sequence <= a.version \
                  ORDER BY e.sequence)"
            )
        };
        Raw {
            ledger_type: type_id("aggregate_types", "bench.ledger").await,
            snapped_type: type_id("aggregate_types", "bench.snapped_ledger").await,
            moved_type: type_id("event_types", "bench.moved").await,
            load_sql: load(false),
            load_snapshot_sql: load(true),
            commit_sql: format!(
                "WITH cas AS (UPDATE {schema}.raw_aggregates SET version = $3 \
                              WHERE id = $1 AND version = $2 RETURNING id) \
                 INSERT INTO {schema}.raw_events (aggregate_id, sequence, event_type_id, \
                     schema_version, payload, metadata, recorded_at, event_id) \
                 SELECT e.aggregate_id, e.sequence, e.type_id, e.schema_version, e.payload, \
                        e.metadata, TIMESTAMPTZ 'epoch' + $11::int8 * INTERVAL '1 microsecond', \
                        e.event_id \
                 FROM UNNEST($4::uuid[], $5::int8[], $6::int4[], $7::int4[], $8::bytea[], \
                             $9::bytea[], $10::uuid[]) WITH ORDINALITY \
                      AS e (aggregate_id, sequence, type_id, schema_version, payload, metadata, \
                            event_id, ord), cas \
                 ORDER BY e.ord",
            ),
            commit_one_sql: format!(
                "WITH cas AS (UPDATE {schema}.raw_aggregates SET version = $3 \
                              WHERE id = $1 AND version = $2 RETURNING id) \
                 INSERT INTO {schema}.raw_events (aggregate_id, sequence, event_type_id, \
                     schema_version, payload, metadata, recorded_at, event_id) \
                 SELECT cas.id, $3, $4, 1, $5, $6, \
                        TIMESTAMPTZ 'epoch' + $7::int8 * INTERVAL '1 microsecond', $8 \
                 FROM cas",
            ),
            max_sequence_sql: format!(
                "SELECT max(sequence) FROM {schema}.raw_events WHERE aggregate_id = $1"
            ),
            insert_event_sql: format!(
                "INSERT INTO {schema}.raw_events (aggregate_id, sequence, event_type_id, \
                     schema_version, payload, metadata, recorded_at, event_id) \
                 VALUES ($1, $2, $3, 1, $4, $5, \
                         TIMESTAMPTZ 'epoch' + $6::int8 * INTERVAL '1 microsecond', $7)"
            ),
            pool,
        }
    }

    /// Creates aggregates with the given events each, in one transaction (set-up, not timed).
    async fn create(
        &self,
        schema: &str,
        type_id: i32,
        count: usize,
        events: &[Moved],
        snapshot_every: Option<usize>,
    ) -> Vec<uuid::Uuid> {
        let ids: Vec<uuid::Uuid> = (0..count).map(|_| uuid::Uuid::now_v7()).collect();
        let mut tx = self.pool.begin().await.unwrap();
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {schema}.raw_aggregates (id, type_id, natural_key, version) \
             SELECT id, $2, NULL, $3 FROM UNNEST($1::uuid[]) AS id"
        )))
        .bind(&ids)
        .bind(type_id)
        .bind(events.len() as i64)
        .execute(&mut *tx)
        .await
        .unwrap();
        let payloads: Vec<Vec<u8>> = events
            .iter()
            .map(|e| serde_json::to_vec(e).unwrap())
            .collect();
        for id in &ids {
            let n = events.len();
            sqlx::query(AssertSqlSafe(format!(
                "INSERT INTO {schema}.raw_events (aggregate_id, sequence, event_type_id, \
                     schema_version, payload, recorded_at, event_id) \
                 SELECT $1, s, $2, 1, p, now(), e \
                 FROM UNNEST($3::int8[], $4::bytea[], $5::uuid[]) AS t (s, p, e)"
            )))
            .bind(id)
            .bind(self.moved_type)
            .bind((1..=n as i64).collect::<Vec<i64>>())
            .bind(&payloads)
            .bind((0..n).map(|_| uuid::Uuid::now_v7()).collect::<Vec<_>>())
            .execute(&mut *tx)
            .await
            .unwrap();
            if let Some(every) = snapshot_every {
                let at = n / every * every;
                if at > 0 {
                    let mut state = Totals::default();
                    for e in &events[..at] {
                        state.fold(e);
                    }
                    sqlx::query(AssertSqlSafe(format!(
                        "INSERT INTO {schema}.raw_snapshots (aggregate_id, snapshot_version, \
                             version, payload, recorded_at) VALUES ($1, 1, $2, $3, now())"
                    )))
                    .bind(id)
                    .bind(at as i64)
                    .bind(serde_json::to_vec(&state).unwrap())
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                }
            }
        }
        tx.commit().await.unwrap();
        ids
    }

    /// One load by hand: the version, the newest snapshot (if asked), the events after it,
    /// every payload decoded and folded.
    async fn load(&self, id: uuid::Uuid, snapshots: bool) -> (Totals, i64) {
        let sql = if snapshots {
            &self.load_snapshot_sql
        } else {
            &self.load_sql
        };
        let rows = sqlx::query(AssertSqlSafe(sql.as_str()))
            .bind(id)
            .fetch_all(&self.pool)
            .await
            .unwrap();
        let mut state = Totals::default();
        let mut version = 0;
        let mut last = 0;
        for row in &rows {
            match row.get::<Option<i64>, _>(0) {
                None => {
                    version = row.get::<i64, _>(1);
                    if let Some(at) = row.get::<Option<i64>, _>(2) {
                        state = serde_json::from_slice(row.get::<&[u8], _>(3)).unwrap();
                        last = at;
                    }
                }
                Some(sequence) => {
                    assert_eq!(row.get::<i64, _>(1), i64::from(self.moved_type));
                    let event: Moved = serde_json::from_slice(row.get::<&[u8], _>(3)).unwrap();
                    state.fold(&event);
                    last = sequence;
                }
            }
        }
        assert_eq!(last, version);
        (state, version)
    }

    /// One commit by hand: `events` appended to `id` at `expected`; false on a conflict. One
    /// event goes in a statement of plain parameters, several in one of arrays.
    async fn append(&self, id: uuid::Uuid, expected: i64, events: &[Moved]) -> bool {
        let n = events.len();
        let metadata =
            serde_json::to_vec(&Metadata::new().correlation_id(uuid::Uuid::now_v7())).unwrap();
        if let [event] = events {
            let done = sqlx::query(AssertSqlSafe(self.commit_one_sql.as_str()))
                .bind(id)
                .bind(expected)
                .bind(expected + 1)
                .bind(self.moved_type)
                .bind(serde_json::to_vec(event).unwrap())
                .bind(Some(metadata.as_slice()))
                .bind(micros_now())
                .bind(uuid::Uuid::now_v7())
                .execute(&self.pool)
                .await
                .unwrap();
            return done.rows_affected() == 1;
        }
        let payloads: Vec<Vec<u8>> = events
            .iter()
            .map(|e| serde_json::to_vec(e).unwrap())
            .collect();
        let done = sqlx::query(AssertSqlSafe(self.commit_sql.as_str()))
            .bind(id)
            .bind(expected)
            .bind(expected + n as i64)
            .bind(vec![id; n])
            .bind((1..=n as i64).map(|i| expected + i).collect::<Vec<i64>>())
            .bind(vec![self.moved_type; n])
            .bind(vec![1i32; n])
            .bind(payloads)
            .bind(vec![Some(metadata.as_slice()); n])
            .bind((0..n).map(|_| uuid::Uuid::now_v7()).collect::<Vec<_>>())
            .bind(micros_now())
            .execute(&self.pool)
            .await
            .unwrap();
        done.rows_affected() == n as u64
    }

    /// The least SQL for one deposit, deciding nothing from the aggregate's state: the next
    /// sequence read in the transaction that inserts the event (the unique key on aggregate and
    /// sequence refuses a duplicate).
    async fn deposit(&self, id: uuid::Uuid, event: &Moved) {
        let payload = serde_json::to_vec(event).unwrap();
        let metadata =
            serde_json::to_vec(&Metadata::new().correlation_id(uuid::Uuid::now_v7())).unwrap();
        let mut tx = self.pool.begin().await.unwrap();
        let last: Option<i64> = sqlx::query_scalar(AssertSqlSafe(self.max_sequence_sql.as_str()))
            .bind(id)
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        sqlx::query(AssertSqlSafe(self.insert_event_sql.as_str()))
            .bind(id)
            .bind(last.unwrap_or(0) + 1)
            .bind(self.moved_type)
            .bind(payload)
            .bind(metadata)
            .bind(micros_now())
            .bind(uuid::Uuid::now_v7())
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }

    /// Load, decide, commit: the hand-written form of one annals `transact`.
    async fn load_and_append(&self, id: uuid::Uuid, events: &[Moved]) {
        let (state, version) = self.load(id, false).await;
        std::hint::black_box(&state);
        assert!(self.append(id, version, events).await, "no conflict here");
    }
}

async fn annals_create<A: Aggregate + annals::Handles<Moved> + Apply<Moved>>(
    store: &Store,
    count: usize,
    events: &[Moved],
) -> Vec<AggregateId> {
    let mut ids = Vec::with_capacity(count);
    for chunk in 0..count.div_ceil(100) {
        let n = (count - chunk * 100).min(100);
        let created = store
            .transact(async |ctx| {
                let mut ids = Vec::new();
                for _ in 0..n {
                    let mut root = ctx.create::<A>()?;
                    for e in events {
                        ctx.apply(&mut root, e.clone())?;
                    }
                    ids.push(root.id());
                }
                Ok::<_, Error>(ids)
            })
            .await
            .unwrap();
        ids.extend(created);
    }
    ids
}

/// Load, decide, commit through annals.
async fn annals_append(store: &Store, id: AggregateId, events: &[Moved]) {
    store
        .transact(async |ctx| {
            ctx.set_metadata(Metadata::new().correlation_id(uuid::Uuid::now_v7()));
            let mut ledger = ctx.load::<Ledger>(id).await?;
            for e in events {
                ctx.apply(&mut ledger, e.clone())?;
            }
            Ok::<_, Error>(())
        })
        .await
        .unwrap();
}

/// Runs one task per id, all at once, each running `command(id)` `commands` times in turn; the
/// time until the last one is done.
async fn concurrently<T, F, Fut>(ids: &[T], commands: usize, command: F) -> Duration
where
    T: Copy + Send + 'static,
    F: Fn(T) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let tasks: Vec<_> = ids
        .iter()
        .map(|&id| {
            let command = command.clone();
            async move {
                for _ in 0..commands {
                    command(id).await;
                }
            }
        })
        .collect();
    timed(async move {
        let handles: Vec<_> = tasks.into_iter().map(tokio::spawn).collect();
        for h in handles {
            h.await.unwrap();
        }
    })
    .await
}

/// Writes one aggregate of `events` events on both sides, checks that both rebuild the same
/// state, then times `loads` loads of it per round on each side.
async fn compare_loads<L: LedgerAggregate>(
    raw: &Raw,
    store: &Store,
    schema: &str,
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
    let raw_id = raw.create(schema, type_id, 1, &all, snapshots).await[0];
    let annals_id = annals_create::<L>(store, 1, &all).await[0];
    let (state, version) = raw.load(raw_id, snapshots.is_some()).await;
    let loaded = store.begin_read_only().load::<L>(annals_id).await.unwrap();
    assert_eq!(loaded.totals(), &state);
    assert_eq!((loaded.version(), version), (events as u64, events as i64));
    compare(
        rounds,
        |_| {
            timed(async {
                for _ in 0..loads {
                    std::hint::black_box(raw.load(raw_id, snapshots.is_some()).await);
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

/// The `application_name` of every connection the benchmark times.
const BENCH_APP: &str = "annals-bench";

/// CPU time spent by each side of a comparison: in this process, and in the server's backends
/// serving the benchmark's connections. Sides run one at a time, so what those backends spend
/// during a side's run is that side's. Read from `/proc` in clock ticks (Linux; the server's
/// share only when it runs on this machine).
struct Meter {
    /// A connection of its own, under another name: the one that lists the backends.
    conn: tokio::sync::Mutex<sqlx::PgConnection>,
    /// The sides, in the order of the runs [`wrap`](Meter::wrap) is given.
    names: &'static [&'static str],
    /// Per side: (this process, the server's backends), in ticks, and the WAL written, in
    /// bytes (by every database of the server: the runs are the only writers of this one).
    ticks: std::sync::Mutex<Vec<(u64, Option<u64>, u64)>>,
}

/// The unit of `/proc`'s CPU times: `USER_HZ`, 100 on Linux whatever the kernel's own tick.
const TICKS_PER_SECOND: f64 = 100.0;

/// Clock ticks (user + system) a process has spent, from `/proc/<pid>/stat`.
fn process_ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

impl Meter {
    async fn new(server: &str, names: &'static [&'static str]) -> std::sync::Arc<Meter> {
        std::sync::Arc::new(Meter {
            conn: tokio::sync::Mutex::new(sqlx::PgConnection::connect(server).await.unwrap()),
            names,
            ticks: std::sync::Mutex::new(vec![(0, Some(0), 0); names.len()]),
        })
    }

    /// This process's ticks, the benchmark's backends' (`None` when one is not visible), and
    /// the server's WAL position in bytes.
    async fn sample(&self) -> (u64, Option<u64>, u64) {
        let mut conn = self.conn.lock().await;
        let pids: Vec<i32> =
            sqlx::query_scalar("SELECT pid FROM pg_stat_activity WHERE application_name = $1")
                .bind(BENCH_APP)
                .fetch_all(&mut *conn)
                .await
                .unwrap();
        let wal: i64 =
            sqlx::query_scalar("SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')::int8")
                .fetch_one(&mut *conn)
                .await
                .unwrap();
        let server = pids
            .iter()
            .map(|pid| process_ticks(&pid.to_string()))
            .sum::<Option<u64>>();
        (
            process_ticks("self").unwrap_or(0),
            server,
            u64::try_from(wal).unwrap_or(0),
        )
    }

    /// `run`, with its ticks added to `side`'s.
    fn wrap<'a>(
        self: &std::sync::Arc<Self>,
        side: usize,
        mut run: harness::Run<'a>,
    ) -> harness::Run<'a> {
        let meter = self.clone();
        Box::new(move |round| {
            let (meter, timed) = (meter.clone(), run(round));
            Box::pin(async move {
                let before = meter.sample().await;
                let time = timed.await;
                let after = meter.sample().await;
                let mut ticks = meter.ticks.lock().unwrap();
                let total = &mut ticks[side];
                total.0 += after.0.saturating_sub(before.0);
                total.1 = match (total.1, before.1, after.1) {
                    (Some(sum), Some(b), Some(a)) => Some(sum + a.saturating_sub(b)),
                    _ => None,
                };
                total.2 += after.2.saturating_sub(before.2);
                time
            })
        })
    }

    /// CPU per operation of each side, `ops` operations per side in all.
    fn report(&self, ops: usize) -> String {
        let ticks = self.ticks.lock().unwrap();
        let micros = |t: u64| t as f64 / TICKS_PER_SECOND * 1e6 / ops.max(1) as f64;
        let mut out = String::from(
            "W2 per command: CPU of this process + of the server's backends; WAL written:",
        );
        for (name, (client, server, wal)) in self.names.iter().zip(ticks.iter()) {
            let server =
                server.map_or("not visible".to_owned(), |s| format!("{:.0} us", micros(s)));
            out.push_str(&format!(
                "\n  {name:<14} {:>5.0} us + {server}; {:.0} bytes",
                micros(*client),
                *wal as f64 / ops.max(1) as f64,
            ));
        }
        out
    }
}

/// `ANNALS_BENCH_ONLY=W4,W5` runs only those workloads (for profiling one of them).
fn enabled(name: &str) -> bool {
    std::env::var("ANNALS_BENCH_ONLY")
        .map_or(true, |only| only.split(',').any(|w| w.trim() == name))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let Ok(server) = std::env::var("DATABASE_URL") else {
        eprintln!("DATABASE_URL is not set: the PostgreSQL benchmark needs a server");
        return;
    };
    // Every connection of both sides carries this name, so that the server's backends serving
    // them can be told apart from the rest of the server.
    let separator = if server.contains('?') { '&' } else { '?' };
    let url = format!("{server}{separator}application_name={BENCH_APP}");
    let schema = format!("bench_{}", uuid::Uuid::now_v7().simple());
    let store = Store::open_with(&url, StoreOptions::new().schema(&schema).pool_size(10))
        .await
        .unwrap();
    let raw = std::sync::Arc::new(Raw::open(&url, &schema).await);
    // Many short rounds, alternating sides, and the median: the machine may be busy.
    let rounds = size(9, 1);
    let load_rounds = size(15, 1);
    let mut rows = Vec::new();
    let mut cpu = None;
    let one = [moved(1)];

    // W1: sequential load-and-append commits, over aggregates of a few events.
    if enabled("W1") {
        let commits = size(500, 10);
        let raw_ids = raw
            .create(&schema, raw.ledger_type, commits, &one, None)
            .await;
        let annals_ids = annals_create::<Ledger>(&store, commits, &one).await;
        let (r, a) = compare(
            rounds,
            |_| {
                timed(async {
                    for id in &raw_ids {
                        raw.load_and_append(*id, &one).await;
                    }
                })
            },
            |_| {
                timed(async {
                    for id in &annals_ids {
                        annals_append(&store, *id, &one).await;
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
    }

    // W2: 8 concurrent tasks, each running deposit commands on an aggregate of its own.
    if enabled("W2") {
        const TASKS: usize = 8;
        let commands = size(250, 5);
        let cached = Store::open_with(
            &url,
            StoreOptions::new()
                .schema(&schema)
                .pool_size(10)
                .aggregate_cache(10_000),
        )
        .await
        .unwrap();
        // Fresh aggregates every round, so that every round runs the same histories.
        let fresh = TASKS * rounds;
        let mirror_ids = raw
            .create(&schema, raw.ledger_type, fresh, &one, None)
            .await;
        let least_ids = raw
            .create(&schema, raw.ledger_type, fresh, &one, None)
            .await;
        let annals_ids = annals_create::<Ledger>(&store, fresh, &one).await;
        let cached_ids = annals_create::<Ledger>(&cached, fresh, &one).await;
        let deposit = moved(2);
        let meter = Meter::new(
            &server,
            &["raw mirror", "raw least SQL", "annals", "annals cache"],
        )
        .await;
        let sides: Vec<harness::Run> = vec![
            Box::new(|round| {
                let raw = raw.clone();
                Box::pin(concurrently(
                    &mirror_ids[round * TASKS..][..TASKS],
                    commands,
                    move |id| {
                        let raw = raw.clone();
                        async move { raw.load_and_append(id, &[moved(2)]).await }
                    },
                ))
            }),
            Box::new(|round| {
                let (raw, deposit) = (raw.clone(), deposit.clone());
                Box::pin(concurrently(
                    &least_ids[round * TASKS..][..TASKS],
                    commands,
                    move |id| {
                        let (raw, deposit) = (raw.clone(), deposit.clone());
                        async move { raw.deposit(id, &deposit).await }
                    },
                ))
            }),
            Box::new(|round| {
                let store = store.clone();
                Box::pin(concurrently(
                    &annals_ids[round * TASKS..][..TASKS],
                    commands,
                    move |id| {
                        let store = store.clone();
                        async move { annals_append(&store, id, &[moved(2)]).await }
                    },
                ))
            }),
            Box::new(|round| {
                let store = cached.clone();
                Box::pin(concurrently(
                    &cached_ids[round * TASKS..][..TASKS],
                    commands,
                    move |id| {
                        let store = store.clone();
                        async move { annals_append(&store, id, &[moved(2)]).await }
                    },
                ))
            }),
        ];
        let sides = sides
            .into_iter()
            .enumerate()
            .map(|(side, run)| meter.wrap(side, run))
            .collect();
        let times = harness::compare_all(rounds, sides).await;
        let [mirror, least, plain, with_cache] = times[..] else {
            unreachable!("four sides")
        };
        cpu = Some(meter.report(rounds * TASKS * commands));
        let ops = Measure::Throughput {
            ops: TASKS * commands,
        };
        let what = format!("{TASKS} tasks x {commands} deposits,");
        rows.push(Row {
            name: "W2",
            what: format!("{what} raw mirrors annals"),
            measure: ops,
            raw: mirror,
            annals: plain,
            goal: ">= 0.9x",
        });
        rows.push(Row {
            name: "W2",
            what: format!("{what} least-SQL raw"),
            measure: ops,
            raw: least,
            annals: plain,
            goal: "",
        });
        rows.push(Row {
            name: "W2c",
            what: format!("{what} cache, least-SQL raw"),
            measure: ops,
            raw: least,
            annals: with_cache,
            goal: ">= 0.95x",
        });
        cached.close().await;
    }

    // W3: commits of 100 events, each to a fresh aggregate of one event.
    if enabled("W3") {
        let commits = size(60, 3);
        let hundred: Vec<Moved> = (0..100).map(moved).collect();
        let raw_ids = raw
            .create(&schema, raw.ledger_type, commits * rounds, &one, None)
            .await;
        let annals_ids = annals_create::<Ledger>(&store, commits * rounds, &one).await;
        let (r, a) = compare(
            rounds,
            |round| {
                let ids = raw_ids[round * commits..(round + 1) * commits].to_vec();
                let (raw, hundred) = (raw.clone(), hundred.clone());
                timed(async move {
                    for id in ids {
                        raw.load_and_append(id, &hundred).await;
                    }
                })
            },
            |round| {
                let ids = annals_ids[round * commits..(round + 1) * commits].to_vec();
                let (store, hundred) = (store.clone(), hundred.clone());
                timed(async move {
                    for id in ids {
                        annals_append(&store, id, &hundred).await;
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
    }

    // W4: loading a 10,000-event aggregate.
    if enabled("W4") {
        let events = size(10_000, 300);
        let loads = size(10, 2);
        let (r, a) =
            compare_loads::<Ledger>(&raw, &store, &schema, events, loads, load_rounds).await;
        rows.push(Row {
            name: "W4",
            what: format!("load a {events}-event aggregate"),
            measure: Measure::Throughput { ops: loads },
            raw: r,
            annals: a,
            goal: ">= 0.8x",
        });
    }

    // W5: the same with a snapshot every 100 events; 50 events after the newest snapshot.
    if enabled("W5") {
        let events = size(10_050, 350);
        let loads = size(500, 5);
        let (r, a) =
            compare_loads::<SnappedLedger>(&raw, &store, &schema, events, loads, rounds).await;
        rows.push(Row {
            name: "W5",
            what: format!("load {events} events, snapshot every 100"),
            measure: Measure::Time,
            raw: r / loads as u32,
            annals: a / loads as u32,
            goal: "<= 1.2x",
        });
    }

    harness::print_table(
        "annals on PostgreSQL against raw sqlx (same process, server, schema and pool settings)",
        &rows,
    );
    if let Some(cpu) = cpu {
        println!("{cpu}");
    }
    store.close().await;
    raw.pool.close().await;
    let mut conn = sqlx::PgConnection::connect(&server).await.unwrap();
    sqlx::raw_sql(AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
        .execute(&mut conn)
        .await
        .unwrap();
}
