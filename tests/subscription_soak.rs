//! Durable subscriptions under crashes: writers commit while the workers of one partitioned
//! subscription are started and killed at random: tasks aborted (a dropped future is a worker
//! that died mid-batch), and worker processes killed with SIGKILL. At the end the read model's
//! sums are the writers' sums, and its effects table holds each event exactly once: on SQLite
//! (one file) and PostgreSQL.

mod conformance;
#[path = "support/ledger.rs"]
mod ledger;
#[cfg(feature = "postgres")]
#[path = "support/postgres.rs"]
mod support;

use conformance::domain;
use ledger::{Ledger, soak_subscription};

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use annals::prelude::*;
use annals::subscription::Handler;
use annals::{BoxError, Transaction};
use domain::*;

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

/// Reads the model back through a handler transaction: (effects, sums by account). On SQLite
/// the read runs on the writer thread when the transaction commits, into `read`.
#[derive(Default)]
struct ReadBack {
    tables: String,
    read: Arc<Mutex<(i64, HashMap<String, i64>)>>,
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
        let count = format!("SELECT count(*) FROM {}_effects", self.tables);
        let sums = format!("SELECT account, total FROM {}_sums", self.tables);
        #[cfg(feature = "postgres")]
        if let Some(conn) = tx.postgres() {
            let effects: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(count))
                .fetch_one(&mut *conn)
                .await?;
            let rows: Vec<(String, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(sums))
                .fetch_all(&mut *conn)
                .await?;
            *self.read.lock().unwrap() = (effects, rows.into_iter().collect());
            return Ok(());
        }
        #[cfg(feature = "sqlite")]
        {
            let read = self.read.clone();
            tx.sqlite(move |t| {
                let effects: i64 = t.query_row(&count, [], |r| r.get(0))?;
                let mut stmt = t.prepare(&sums)?;
                let rows = stmt
                    .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<Result<HashMap<String, i64>, _>>()?;
                *read.lock().unwrap() = (effects, rows);
                Ok(())
            })?;
        }
        let _ = tx;
        Ok(())
    }
}

/// The model in `tables`: (effects, sums by account).
async fn model(store: &Store, tables: &str) -> (i64, HashMap<String, i64>) {
    let mut read = ReadBack {
        tables: tables.to_owned(),
        ..ReadBack::default()
    };
    store
        .subscription(&format!("read-{}", uuid::Uuid::now_v7()))
        .reset(&mut read)
        .await
        .unwrap();
    read.read.lock().unwrap().clone()
}

/// How the workers run: as tasks of this process, aborted at random, or as processes
/// (`annals-soak-worker`), killed with SIGKILL at random.
enum Workers {
    Tasks,
    /// The store's URL and PostgreSQL schema (empty for SQLite).
    Processes {
        url: String,
        schema: String,
    },
}

/// A running worker.
enum Worker {
    Task(tokio::task::JoinHandle<()>),
    Process(std::process::Child),
}

impl Workers {
    fn start(&self, store: &Store, ledger: &Ledger) -> Worker {
        match self {
            Workers::Tasks => {
                let worker = soak_subscription(store);
                let mut handler = ledger.clone();
                Worker::Task(tokio::spawn(async move {
                    let result = worker.run(&mut handler, std::future::pending()).await;
                    panic!("a worker returned: {result:?}");
                }))
            }
            Workers::Processes { url, schema } => Worker::Process(
                std::process::Command::new(env!("CARGO_BIN_EXE_annals-soak-worker"))
                    .args([url.as_str(), schema.as_str(), ledger.tables.as_str()])
                    .spawn()
                    .expect("start a worker process"),
            ),
        }
    }
}

impl Worker {
    /// Kills the worker where it stands; panics if it had stopped on its own (a failure).
    async fn kill(self) {
        match self {
            Worker::Task(task) => {
                task.abort();
                if let Err(e) = task.await
                    && !e.is_cancelled()
                {
                    panic!("a worker failed: {e}");
                }
            }
            Worker::Process(mut child) => {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("a worker process stopped by itself: {status}");
                }
                child.kill().expect("SIGKILL");
                child.wait().expect("reap the worker");
            }
        }
    }
}

/// Writers and crashing workers; then one worker catches up, and the model is checked.
/// `qualifier` goes before the read model's table names (a PostgreSQL schema and a dot).
async fn soak(
    store: &Store,
    workers_run: Workers,
    qualifier: &str,
    writers: u64,
    commits: u64,
    per_commit: i64,
) -> (String, HashMap<String, i64>, u64) {
    let tables = format!("{qualifier}soak_{}", uuid::Uuid::now_v7().simple());
    let ledger = Ledger {
        tables: tables.clone(),
        delay: Duration::ZERO,
    };
    soak_subscription(store)
        .reset(&mut ledger.clone())
        .await
        .unwrap();

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

    // Three workers at a time, each killed after a random while and started again.
    let mut workers: Vec<Worker> = Vec::new();
    let mut round = 0u64;
    let mut crashes = 0u64;
    while writer_tasks.iter().any(|t| !t.is_finished()) {
        while workers.len() < 3 {
            workers.push(workers_run.start(store, &ledger));
        }
        tokio::time::sleep(Duration::from_millis(20 + jitter(round, 200))).await;
        let victim = jitter(round + 1, workers.len() as u64) as usize;
        workers.swap_remove(victim).kill().await;
        crashes += 1;
        round += 2;
    }
    for task in writer_tasks {
        for (account, sum) in task.await.unwrap() {
            *expected.entry(account).or_default() += sum;
        }
    }
    for worker in workers {
        worker.kill().await;
    }
    // The killed workers did work between their deaths, not the last one alone.
    let moved = store
        .subscriptions()
        .status("soak")
        .await
        .unwrap()
        .iter()
        .filter(|s| s.cursor != FeedCursor::START)
        .count();
    assert!(moved > 0, "no worker moved a cursor before the last one");
    // One last worker catches up on all four partitions (once the dead workers' leases end).
    let last = soak_subscription(store);
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
async fn soak_sqlite(processes: bool) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("soak.db");
    let url = format!("sqlite://{}", path.display());
    let options = StoreOptions::new().synchronous(annals::Synchronous::Normal);
    let store = Store::open_with(&url, options).await.unwrap();
    let workers = if processes {
        Workers::Processes {
            url: url.clone(),
            schema: String::new(),
        }
    } else {
        Workers::Tasks
    };
    let (tables, expected, crashes) = soak(&store, workers, "", 4, 250, 20).await;
    assert!(crashes > 0, "workers were killed");
    let (effects, sums) = model(&store, &tables).await;
    assert_eq!(effects, 4 * 250 * 20, "each event once");
    assert_eq!(sums, expected, "the read model's sums are the writers'");
    store.close().await;
}

#[cfg(feature = "sqlite")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crashing_worker_tasks_apply_each_event_once_on_sqlite() {
    soak_sqlite(false).await;
}

#[cfg(feature = "sqlite")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_worker_processes_apply_each_event_once_on_sqlite() {
    soak_sqlite(true).await;
}

#[cfg(feature = "postgres")]
async fn soak_postgres(processes: bool) {
    let Some((store, schema)) = support::open_fresh().await else {
        return;
    };
    let workers = if processes {
        Workers::Processes {
            url: schema.url.clone(),
            schema: schema.name.clone(),
        }
    } else {
        Workers::Tasks
    };
    // In the store's schema, dropped with it.
    let qualifier = format!("\"{}\".", schema.name);
    let (tables, expected, crashes) = soak(&store, workers, &qualifier, 4, 250, 20).await;
    assert!(crashes > 0, "workers were killed");
    let (effects, sums) = model(&store, &tables).await;
    assert_eq!(effects, 4 * 250 * 20, "each event once");
    assert_eq!(sums, expected, "the read model's sums are the writers'");
    store.close().await;
}

#[cfg(feature = "postgres")]
#[cfg_attr(annals_skip_postgres, ignore = "DATABASE_URL is not set")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crashing_worker_tasks_apply_each_event_once_on_postgres() {
    soak_postgres(false).await;
}

#[cfg(feature = "postgres")]
#[cfg_attr(annals_skip_postgres, ignore = "DATABASE_URL is not set")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_worker_processes_apply_each_event_once_on_postgres() {
    soak_postgres(true).await;
}

/// Sends `signal` (`STOP`, `CONT`) to a worker process.
fn signal(child: &std::process::Child, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([&format!("-{signal}"), &child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal}");
}

/// A worker process paused (SIGSTOP) in the middle of its batches: its leases expire, another
/// worker takes its partitions over and delivers what it held; resumed (SIGCONT), the paused one
/// finds its leases gone and writes nothing it had in hand. The model holds each event once.
async fn paused_worker_is_taken_over(store: &Store, url: &str, schema: &str, qualifier: &str) {
    let tables = format!("{qualifier}paused_{}", uuid::Uuid::now_v7().simple());
    let mut ledger = Ledger {
        tables: tables.clone(),
        delay: Duration::ZERO,
    };
    soak_subscription(store).reset(&mut ledger).await.unwrap();
    let mut accounts = Vec::new();
    for i in 0..8 {
        accounts.push(conformance::open_account(store, &format!("p{i}"), "P", 0).await);
    }
    let deposit_round = |round: i64| {
        let accounts = accounts.clone();
        async move {
            for &id in &accounts {
                store
                    .transact_with_retry(Retry::attempts(100), async |ctx| {
                        let mut a = ctx.load::<Account>(id).await?;
                        ctx.apply(&mut a, Deposited { amount: round })?;
                        Ok::<_, annals::Error>(())
                    })
                    .await
                    .unwrap();
            }
        }
    };
    for round in 1..=10 {
        deposit_round(round).await;
    }
    // A slow worker process: each batch of 50 takes it 200 ms.
    let mut paused = std::process::Command::new(env!("CARGO_BIN_EXE_annals-soak-worker"))
        .args([url, schema, tables.as_str(), "200"])
        .spawn()
        .expect("start a worker process");
    tokio::time::timeout(LIMIT, async {
        loop {
            let status = store.subscriptions().status("soak").await.unwrap();
            if status.iter().all(|s| s.owner.is_some())
                && status.iter().any(|s| s.cursor != FeedCursor::START)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the worker process claims every partition and works");
    signal(&paused, "STOP");
    for round in 11..=12 {
        deposit_round(round).await;
    }
    // Its leases expire (300 ms); a worker here takes over and delivers everything.
    let mut taker = ledger.clone();
    let taking = soak_subscription(store);
    tokio::time::timeout(LIMIT, async {
        loop {
            taking.catch_up(&mut taker).await.unwrap();
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
    .expect("the paused worker's partitions are taken over");
    // Resumed, the paused worker finishes the batch it had in hand and cannot store it.
    signal(&paused, "CONT");
    deposit_round(13).await;
    conformance::until_caught_up(store, "soak", "the resumed worker goes on").await;
    assert!(
        paused.try_wait().unwrap().is_none(),
        "the resumed worker runs on: its subscription did not fail"
    );
    paused.kill().unwrap();
    paused.wait().unwrap();
    let (effects, sums) = model(store, &tables).await;
    assert_eq!(effects, 13 * 8, "each event once");
    assert_eq!(sums.len(), 8);
    assert!(
        sums.values().all(|&total| total == (1..=13).sum::<i64>()),
        "every account has every deposit once: {sums:?}"
    );
}

#[cfg(feature = "sqlite")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_worker_process_is_taken_over_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("paused.db").display());
    let store = Store::open(&url).await.unwrap();
    paused_worker_is_taken_over(&store, &url, "", "").await;
    store.close().await;
}

#[cfg(feature = "postgres")]
#[cfg_attr(annals_skip_postgres, ignore = "DATABASE_URL is not set")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_worker_process_is_taken_over_on_postgres() {
    let Some((store, schema)) = support::open_fresh().await else {
        return;
    };
    let qualifier = format!("\"{}\".", schema.name);
    paused_worker_is_taken_over(&store, &schema.url, &schema.name, &qualifier).await;
    store.close().await;
}
