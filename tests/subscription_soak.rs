//! Durable subscriptions under crashes: writers commit while the workers of one partitioned
//! subscription are started and aborted at random (a dropped future is a worker that died
//! mid-batch). At the end the read model's sums are the writers' sums, and its effects table
//! holds each event exactly once: on SQLite (one file) and PostgreSQL.

mod conformance;
#[cfg(feature = "postgres")]
#[path = "support/postgres.rs"]
mod support;

use std::collections::HashMap;
use std::time::Duration;

use annals::prelude::*;
use annals::subscription::Handler;
use annals::{BoxError, Filter, SqlValue, Transaction};
use conformance::domain::*;

/// Bounds every wait: a hang becomes a failure.
const LIMIT: Duration = Duration::from_secs(300);

/// A pseudo-random number below `max`, different each call, without a random-number crate.
fn jitter(round: u64, max: u64) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::from(d.subsec_nanos()))
        .unwrap_or(0);
    (nanos ^ round.wrapping_mul(0x9E37_79B9_7F4A_7C15)) % max.max(1)
}

/// The read model: each account's sum of deposits, and each event's effect, once.
#[derive(Clone)]
struct Ledger {
    tables: String,
}

impl Handler for Ledger {
    async fn handle(
        &mut self,
        events: &[RecordedEvent],
        tx: &mut Transaction<'_>,
    ) -> Result<(), BoxError> {
        let t = &self.tables;
        for event in events {
            let Some(deposit) = event.decode::<Deposited>()? else {
                continue;
            };
            // A plain insert: an event handled twice fails on the key.
            tx.execute(
                &format!("INSERT INTO {t}_effects (event_id) VALUES ($1)"),
                &[event.event_id.into()],
            )
            .await?;
            tx.execute(
                &format!(
                    "INSERT INTO {t}_sums AS s (account, total) VALUES ($1, $2) \
                     ON CONFLICT (account) DO UPDATE SET total = s.total + excluded.total"
                ),
                &[event.aggregate_id.into(), SqlValue::Int(deposit.amount)],
            )
            .await?;
        }
        Ok(())
    }

    async fn reset(&mut self, tx: &mut Transaction<'_>) -> Result<(), BoxError> {
        let t = &self.tables;
        tx.execute(
            &format!("CREATE TABLE IF NOT EXISTS {t}_effects (event_id TEXT PRIMARY KEY)"),
            &[],
        )
        .await?;
        tx.execute(
            &format!(
                "CREATE TABLE IF NOT EXISTS {t}_sums (account TEXT PRIMARY KEY, total BIGINT NOT NULL)"
            ),
            &[],
        )
        .await?;
        Ok(())
    }
}

/// Reads the model back through a handler transaction: (effects, sums by account).
struct ReadBack {
    tables: String,
    effects: i64,
    sums: HashMap<String, i64>,
}

impl Handler for ReadBack {
    async fn handle(
        &mut self,
        _: &[RecordedEvent],
        _: &mut Transaction<'_>,
    ) -> Result<(), BoxError> {
        Ok(())
    }

    async fn reset(&mut self, tx: &mut Transaction<'_>) -> Result<(), BoxError> {
        let t = &self.tables;
        #[cfg(feature = "postgres")]
        if let Some(conn) = tx.postgres() {
            self.effects = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "SELECT count(*) FROM {t}_effects"
            )))
            .fetch_one(&mut *conn)
            .await?;
            let rows: Vec<(String, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT account, total FROM {t}_sums"
            )))
            .fetch_all(&mut *conn)
            .await?;
            self.sums = rows.into_iter().collect();
            return Ok(());
        }
        let _ = (tx, t);
        Ok(())
    }
}

/// Writers and crashing workers; then one worker catches up, and the model is checked.
/// `qualifier` goes before the read model's table names (a PostgreSQL schema and a dot).
async fn soak(
    store: &Store,
    qualifier: &str,
    writers: u64,
    commits: u64,
    per_commit: i64,
) -> (String, HashMap<String, i64>, u64) {
    let tables = format!("{qualifier}soak_{}", uuid::Uuid::now_v7().simple());
    let ledger = Ledger {
        tables: tables.clone(),
    };
    let sub = || {
        store
            .subscription("soak")
            .filter(Filter::all().event::<Deposited>())
            .partitions(4)
            .batch_size(50)
            .lease(Duration::from_millis(300))
            .poll_interval(Duration::from_millis(20))
    };
    sub().reset(&mut ledger.clone()).await.unwrap();

    let mut accounts = Vec::new();
    for i in 0..(writers * 5) {
        accounts.push(conformance::open_account(store, &format!("s{i}"), "S", 0).await);
    }
    let mut expected: HashMap<String, i64> = HashMap::new();
    let mut writer_tasks = Vec::new();
    for w in 0..writers {
        let store = store.clone();
        let mine: Vec<AggregateId> = accounts[(w * 5) as usize..((w + 1) * 5) as usize].to_vec();
        writer_tasks.push(tokio::spawn(async move {
            let mut sums: HashMap<String, i64> = HashMap::new();
            for c in 0..commits {
                let id = mine[(c % 5) as usize];
                let amounts: Vec<i64> = (0..per_commit)
                    .map(|k| 1 + ((c as i64 * 7 + k) % 13))
                    .collect();
                store
                    .transact_with_retry(Retry::attempts(50), async |ctx| {
                        let mut a = ctx.load::<Account>(id).await?;
                        for &amount in &amounts {
                            ctx.apply(&mut a, Deposited { amount })?;
                        }
                        Ok::<_, annals::Error>(())
                    })
                    .await
                    .unwrap();
                *sums.entry(id.to_string()).or_default() += amounts.iter().sum::<i64>();
            }
            sums
        }));
    }

    // Three workers at a time, each aborted after a random while and started again.
    let mut workers: Vec<tokio::task::JoinHandle<()>> = Vec::new();
    let mut round = 0u64;
    let mut crashes = 0u64;
    while writer_tasks.iter().any(|t| !t.is_finished()) {
        while workers.len() < 3 {
            let worker = sub();
            let mut handler = ledger.clone();
            workers.push(tokio::spawn(async move {
                let result = worker.run(&mut handler, std::future::pending()).await;
                panic!("a worker returned: {result:?}");
            }));
        }
        tokio::time::sleep(Duration::from_millis(20 + jitter(round, 200))).await;
        let victim = jitter(round + 1, workers.len() as u64) as usize;
        let task = workers.swap_remove(victim);
        task.abort();
        if let Err(e) = task.await
            && !e.is_cancelled()
        {
            panic!("a worker failed: {e}");
        }
        crashes += 1;
        round += 2;
    }
    for task in writer_tasks {
        for (account, sum) in task.await.unwrap() {
            *expected.entry(account).or_default() += sum;
        }
    }
    for task in workers {
        task.abort();
        let _ = task.await;
    }
    // One last worker catches up on all four partitions (once the dead workers' leases end).
    let last = sub();
    let mut handler = ledger.clone();
    tokio::time::timeout(LIMIT, async {
        loop {
            last.catch_up(&mut handler).await.unwrap();
            let status = store.subscriptions().status("soak").await.unwrap();
            if status
                .iter()
                .all(|s| s.lag.events == 0 && s.lag.held_back.is_none())
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the last worker catches up");
    (tables, expected, crashes)
}

#[cfg(feature = "sqlite")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crashing_workers_apply_each_event_once_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("soak.db");
    let url = format!("sqlite://{}", path.display());
    let options = StoreOptions::new().synchronous(annals::Synchronous::Normal);
    let store = Store::open_with(&url, options).await.unwrap();
    let (tables, expected, crashes) = soak(&store, "", 4, 250, 20).await;
    assert!(crashes > 0, "workers were aborted");
    let conn = annals::rusqlite::Connection::open(&path).unwrap();
    let effects: i64 = conn
        .query_row(&format!("SELECT count(*) FROM {tables}_effects"), [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(effects, 4 * 250 * 20, "each event once");
    let mut stmt = conn
        .prepare(&format!("SELECT account, total FROM {tables}_sums"))
        .unwrap();
    let sums: HashMap<String, i64> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(sums, expected, "the read model's sums are the writers'");
    store.close().await;
}

#[cfg(feature = "postgres")]
#[cfg_attr(annals_skip_postgres, ignore = "DATABASE_URL is not set")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crashing_workers_apply_each_event_once_on_postgres() {
    let Some((store, schema)) = support::open_fresh().await else {
        return;
    };
    // In the store's schema, dropped with it.
    let qualifier = format!("\"{}\".", schema.name);
    let (tables, expected, crashes) = soak(&store, &qualifier, 4, 250, 20).await;
    assert!(crashes > 0, "workers were aborted");
    let mut read = ReadBack {
        tables: tables.clone(),
        effects: 0,
        sums: HashMap::new(),
    };
    store
        .subscription("read-back")
        .reset(&mut read)
        .await
        .unwrap();
    assert_eq!(read.effects, 4 * 250 * 20, "each event once");
    assert_eq!(
        read.sums, expected,
        "the read model's sums are the writers'"
    );
    store.close().await;
}
