//! What only the SQLite store promises: contention through one writer, crash safety, typed
//! errors for bad rows, payload limits, migrations and options.

#![cfg(feature = "sqlite")]

mod conformance;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use annals::prelude::*;
use annals::{Dialect, Synchronous, migrations};
use conformance::domain::*;
use sqlx::{Connection, SqliteConnection};

fn url(path: &Path) -> String {
    format!("sqlite://{}", path.display())
}

async fn raw(path: &Path) -> SqliteConnection {
    SqliteConnection::connect(&url(path))
        .await
        .expect("raw connection")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contention_8_tasks_200_increments() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&url(&dir.path().join("c.db"))).await.unwrap();
    conformance::contended_increments(&store, 8, 200).await;
}

/// A pseudo-random delay, different each round, without a random-number crate.
fn jitter_ms(round: u64, min: u64, max: u64) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0);
    min + (nanos ^ round.wrapping_mul(0x9E37_79B9_7F4A_7C15)) % (max - min)
}

/// Starts `annals-crash-writer` on the database file `db`, with `args`; returns it and its
/// output.
fn start_writer(db: &Path, args: &[&str]) -> (std::process::Child, std::process::ChildStdout) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_annals-crash-writer"))
        .arg(url(db))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the writer");
    let stdout = child.stdout.take().expect("piped stdout");
    (child, stdout)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_commits_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("crash.db");
    let mut acknowledged = 0u64;
    for round in 0..6u64 {
        let (mut child, stdout) = start_writer(&db, &[]);
        // Read acknowledgements on a thread; the pipe drains to EOF after the kill.
        let reader = std::thread::spawn(move || {
            let mut acks = Vec::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(v) = line
                    .strip_prefix("ACK ")
                    .and_then(|v| v.parse::<u64>().ok())
                {
                    acks.push(v);
                }
            }
            acks
        });
        std::thread::sleep(Duration::from_millis(jitter_ms(round, 150, 900)));
        child.kill().expect("SIGKILL the writer");
        let status = child.wait().expect("reap the writer");
        assert!(!status.success(), "the writer was killed, not finished");
        let acks = reader.join().expect("reader thread");
        if let Some(&last) = acks.last() {
            assert!(last > acknowledged, "round {round} made progress");
            acknowledged = last;
        }

        let mut conn = raw(&db).await;
        let check: String = sqlx::query_scalar("PRAGMA integrity_check")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(check, "ok", "round {round}");
        conn.close().await.unwrap();

        let store = Store::open(&url(&db)).await.unwrap();
        if acknowledged > 0 {
            let counter = store
                .begin_read_only()
                .load_by_key::<Counter>("crash")
                .await
                .unwrap();
            assert!(
                counter.version() >= acknowledged,
                "round {round}: acknowledged version {acknowledged}, store has {}",
                counter.version()
            );
            assert_eq!(counter.value, counter.version());
            assert_eq!(
                conformance::versions(&store, counter.id()).await,
                (1..=counter.version()).collect::<Vec<_>>()
            );
            acknowledged = counter.version();
        }
        store.close().await;
    }
    assert!(acknowledged > 0, "the writer acknowledged commits");
}

mod crash_writer {
    use crate::conformance::domain::{Counter, CounterEvent};
    include!("support/crash_commands.rs");
}

/// A writer killed with SIGKILL in the middle of its commits, whose last command's outcome it
/// never told: every command run again with its idempotency key is applied exactly once, the
/// ones that were committed reported as already committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_writers_commands_run_again_apply_once() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("idempotent.db");
    let (mut child, stdout) = start_writer(&db, &["--idempotent"]);
    let reader = std::thread::spawn(move || {
        let (mut sent, mut acked) = (None, 0usize);
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(round) = line
                .strip_prefix("SENT ")
                .and_then(|r| r.parse::<u64>().ok())
            {
                sent = Some(round);
            } else if line.starts_with("ACK ") {
                acked += 1;
            }
        }
        (sent, acked)
    });
    // Wait for a few acknowledged rounds, then kill at a random moment.
    std::thread::sleep(Duration::from_millis(jitter_ms(7, 300, 900)));
    child.kill().expect("SIGKILL the writer");
    child.wait().expect("reap the writer");
    let (sent, acked) = reader.join().expect("reader thread");
    let last = sent.expect("the writer started a round");
    assert!(acked > 0, "the writer acknowledged rounds");

    // Every round the writer started, run again with its key.
    let store = Store::open(&url(&db)).await.unwrap();
    let mut already = 0usize;
    for round in 0..=last {
        let key = crash_writer::round_key(round);
        let (_, committed) = crash_writer::increment(&store, round, Some(key))
            .await
            .unwrap();
        if committed.already_committed() {
            already += 1;
        }
    }
    assert!(
        already >= acked,
        "{already} of {acked} acknowledged rounds recognised"
    );
    assert!(
        already >= last as usize,
        "only the last round can be missing"
    );
    let expected: u64 = (0..=last).map(|round| round % 3 + 1).sum();
    let counter = store
        .begin_read_only()
        .load_by_key::<Counter>("crash")
        .await
        .unwrap();
    assert_eq!(
        (counter.version(), counter.value),
        (expected, expected),
        "each round applied exactly once"
    );
    store.close().await;
}

async fn open_account(store: &Store, key: &str, deposits: i64) -> AggregateId {
    store
        .transact(async |ctx| {
            let mut a = ctx.create_with_key::<Account>(key).await?;
            ctx.apply(
                &mut a,
                Opened {
                    owner: key.to_owned(),
                },
            )?;
            for amount in 1..=deposits {
                ctx.apply(&mut a, Deposited { amount })?;
            }
            Ok::<_, Error>(a.id())
        })
        .await
        .unwrap()
}

#[tokio::test]
async fn bad_rows_give_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("bad.db");
    let store = Store::open(&url(&db)).await.unwrap();
    let broken = open_account(&store, "broken", 2).await;
    let strange = open_account(&store, "strange", 2).await;
    let healthy = open_account(&store, "healthy", 2).await;
    let position_of = |id: AggregateId, version: u64| {
        let store = store.clone();
        async move {
            store
                .history(id)
                .await
                .unwrap()
                .into_iter()
                .find(|e| e.version == version)
                .unwrap()
                .position()
        }
    };
    let bad_payload = position_of(broken, 2).await;
    let unknown = position_of(strange, 3).await;

    let mut conn = raw(&db).await;
    sqlx::query("UPDATE annals_events SET payload = ?1 WHERE position = ?2")
        .bind(&b"{\"amount\": \"not a number\"}"[..])
        .bind(bad_payload as i64)
        .execute(&mut conn)
        .await
        .unwrap();
    sqlx::query("INSERT INTO annals_event_types (name) VALUES ('account.frozen')")
        .execute(&mut conn)
        .await
        .unwrap();
    sqlx::query(
        "UPDATE annals_events SET event_type_id = \
         (SELECT id FROM annals_event_types WHERE name = 'account.frozen') WHERE position = ?1",
    )
    .bind(unknown as i64)
    .execute(&mut conn)
    .await
    .unwrap();
    conn.close().await.unwrap();

    let mut ctx = store.begin_read_only();
    match ctx.load::<Account>(broken).await {
        Err(Error::Decode {
            what,
            event_type,
            schema_version,
            position,
            ..
        }) => {
            assert_eq!((what, event_type.as_str()), ("event", "account.deposited"));
            assert_eq!((schema_version, position), (2, bad_payload));
        }
        other => panic!("expected Decode, got {other:?}"),
    }
    match ctx.load::<Account>(strange).await {
        Err(Error::UnknownEventType {
            event_type,
            position,
            aggregate_type,
        }) => {
            assert_eq!(event_type, "account.frozen");
            assert_eq!(position, unknown);
            assert_eq!(aggregate_type.as_deref(), Some("account"));
        }
        other => panic!("expected UnknownEventType, got {other:?}"),
    }
    let fine = ctx.load::<Account>(healthy).await.unwrap();
    assert_eq!((fine.balance, fine.version()), (3, 3));

    // The feed still reads every row; decoding the bad one is a typed error.
    let feed = store.read_feed(FeedCursor::START, 100).await.unwrap();
    assert_eq!(feed.len(), 9);
    let bad = feed.iter().find(|e| e.position() == bad_payload).unwrap();
    assert!(
        matches!(bad.decode::<Deposited>(), Err(Error::Decode { position, .. }) if position == bad_payload)
    );
    let message = ctx.load::<Account>(broken).await.unwrap_err().to_string();
    assert!(
        message.contains(&format!("position {bad_payload}")),
        "{message}"
    );
}

#[tokio::test]
async fn large_payloads_and_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let db = url(&dir.path().join("big.db"));
    let store = Store::open(&db).await.unwrap();
    let mib: String = "0123456789abcdef".repeat(65_536); // 1 MiB
    let id = store
        .transact(async |ctx| {
            let mut blob = ctx.create::<Blob>()?;
            ctx.apply(&mut blob, BlobWritten { data: mib.clone() })?;
            Ok::<_, Error>(blob.id())
        })
        .await
        .unwrap();
    let blob = store.begin_read_only().load::<Blob>(id).await.unwrap();
    assert_eq!(blob.data, mib);
    store.close().await;

    let limited = Store::open_with(&db, StoreOptions::new().max_payload_bytes(1000))
        .await
        .unwrap();
    let result = limited
        .transact(async |ctx| {
            let mut blob = ctx.load::<Blob>(id).await?;
            ctx.apply(
                &mut blob,
                BlobWritten {
                    data: "y".repeat(2000),
                },
            )?;
            Ok::<_, Error>(())
        })
        .await;
    match result {
        Err(Error::PayloadTooLarge { size, max, .. }) => assert_eq!((size, max), (2011, 1000)),
        other => panic!("expected PayloadTooLarge, got {other:?}"),
    }
    assert_eq!(
        limited
            .read_feed(FeedCursor::START, 10)
            .await
            .unwrap()
            .len(),
        1
    );
    let blob = limited.begin_read_only().load::<Blob>(id).await.unwrap();
    assert_eq!((blob.version(), blob.data.len()), (1, mib.len()));
}

#[tokio::test]
async fn migrations_by_hand_and_schema_versions() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("manual.db");
    let options = StoreOptions::new().table_prefix("bank_").migrate(false);

    // Not migrated and not allowed to: refused with a message that says what to do.
    match Store::open_with(&url(&path), options.clone()).await {
        Err(Error::Config(message)) => assert!(message.contains("annals::migrations"), "{message}"),
        other => panic!("expected Config, got {other:?}"),
    }

    // Apply the migrations by hand, as a user with their own tooling would.
    let sql = migrations(Dialect::Sqlite, &options).unwrap();
    assert_eq!(sql.len(), 3);
    assert!(
        sql[0]
            .sql
            .contains("CREATE TABLE IF NOT EXISTS bank_events")
    );
    assert!(!sql[0].sql.contains("{prefix}"));
    let mut conn = raw(&path).await;
    for m in &sql {
        sqlx::raw_sql(sqlx::AssertSqlSafe(m.sql.clone()))
            .execute(&mut conn)
            .await
            .unwrap();
    }
    // Exactly the SQL `migrations` returned, nothing else: the migration records its own version.
    let recorded: Vec<i64> = sqlx::query_scalar("SELECT version FROM bank_schema_migrations")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    assert_eq!(recorded, [1, 2, 3]);

    let store = Store::open_with(&url(&path), options.clone())
        .await
        .unwrap();
    open_account(&store, "alice", 1).await;
    store.close().await;

    // A schema from a newer annals is refused and left untouched.
    sqlx::query("INSERT INTO bank_schema_migrations VALUES (99, 'from the future', 0)")
        .execute(&mut conn)
        .await
        .unwrap();
    let tables_before: Vec<String> =
        sqlx::query_scalar("SELECT name FROM sqlite_master ORDER BY name")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    for migrate in [false, true] {
        match Store::open_with(&url(&path), options.clone().migrate(migrate)).await {
            Err(Error::SchemaTooNew { found, supported }) => {
                assert_eq!((found, supported), (99, 3))
            }
            other => panic!("expected SchemaTooNew, got {other:?}"),
        }
    }
    let tables_after: Vec<String> =
        sqlx::query_scalar("SELECT name FROM sqlite_master ORDER BY name")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    assert_eq!(tables_before, tables_after);
    let events: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM bank_events")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(events, 2);
}

#[tokio::test]
async fn options_prefixes_and_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("opts.db");

    for bad in ["", "Bank", "1bank", "bank-", "bank;drop", &"p".repeat(42)] {
        match Store::open_with(&url(&path), StoreOptions::new().table_prefix(bad)).await {
            Err(Error::Config(message)) => assert!(message.contains("table prefix"), "{message}"),
            other => panic!("prefix {bad:?}: expected Config, got {other:?}"),
        }
    }
    let missing_dir = dir.path().join("no/such/dir/x.db");
    assert!(matches!(
        Store::open(&url(&missing_dir)).await,
        Err(Error::Backend(_))
    ));
    assert!(matches!(
        Store::open("mysql://x").await,
        Err(Error::Config(_))
    ));

    // Two prefixes in one file are two independent stores.
    let a = Store::open_with(&url(&path), StoreOptions::new().table_prefix("a_"))
        .await
        .unwrap();
    let b = Store::open_with(
        &url(&path),
        StoreOptions::new()
            .table_prefix("b_")
            .synchronous(Synchronous::Normal),
    )
    .await
    .unwrap();
    let id = open_account(&a, "alice", 2).await;
    assert!(
        b.begin_read_only()
            .find_by_key::<Account>("alice")
            .await
            .unwrap()
            .is_none()
    );
    open_account(&b, "alice", 5).await;
    a.close().await;
    b.close().await;

    // Everything is there after reopening.
    let a = Store::open_with(&url(&path), StoreOptions::new().table_prefix("a_"))
        .await
        .unwrap();
    let alice = a.begin_read_only().load::<Account>(id).await.unwrap();
    assert_eq!((alice.balance, alice.version()), (3, 3));
    let mut conn = raw(&path).await;
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(mode, "wal");
}

#[tokio::test]
async fn in_memory_sqlite() {
    let store = Store::open("sqlite::memory:").await.unwrap();
    let id = open_account(&store, "alice", 3).await;
    let alice = store.begin_read_only().load::<Account>(id).await.unwrap();
    assert_eq!((alice.balance, alice.version()), (6, 4));
    assert_eq!(
        store.read_feed(FeedCursor::START, 10).await.unwrap().len(),
        4
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_wake_on_commit() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_with(
        &url(&dir.path().join("w.db")),
        StoreOptions::new().poll_interval(Duration::from_secs(3600)),
    )
    .await
    .unwrap();
    assert!(
        !store
            .wait_for_events(FeedCursor::START, Duration::from_millis(50))
            .await
            .unwrap()
    );
    let waiter = {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .wait_for_events(FeedCursor::START, Duration::from_secs(120))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    open_account(&store, "alice", 0).await;
    let woke = tokio::time::timeout(Duration::from_secs(120), waiter)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(woke);
}

#[tokio::test]
async fn one_commit_larger_than_an_insert_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&url(&dir.path().join("chunks.db")))
        .await
        .unwrap();
    let (a, b) = store
        .transact(async |ctx| {
            let mut a = ctx.create::<Account>()?;
            let mut b = ctx.create::<Counter>()?;
            ctx.apply(&mut a, Opened { owner: "A".into() })?;
            for i in 0..1_200 {
                ctx.apply(&mut a, Deposited { amount: 1 })?;
                if i % 2 == 0 {
                    ctx.apply(&mut b, CounterEvent::Incremented)?;
                }
            }
            Ok::<_, Error>((a.id(), b.id()))
        })
        .await
        .unwrap();
    let mut ctx = store.begin_read_only();
    let a = ctx.load::<Account>(a).await.unwrap();
    let b = ctx.load::<Counter>(b).await.unwrap();
    assert_eq!((a.balance, a.version()), (1_200, 1_201));
    assert_eq!((b.value, b.version()), (600, 600));
    let feed = store.read_feed(FeedCursor::START, 5_000).await.unwrap();
    assert_eq!(feed.len(), 1_801);
    // Within one commit, events keep the order they were applied in.
    assert_eq!(feed[0].event_type, "account.opened");
    assert_eq!(
        (feed[1].event_type.as_str(), feed[2].event_type.as_str()),
        ("account.deposited", "counter.incremented")
    );
}

/// Commits that queue while the writer is busy are committed together, in one transaction with
/// a savepoint each: the ones that fail (a lost race for a version, a key taken by another
/// commit of the same group) write nothing, and every other one lands, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_queued_together_fail_or_land_each_on_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("group.db");
    let store = Store::open(&url(&path)).await.unwrap();
    let contested = open_account(&store, "contested", 0).await;

    // Contexts made ready before any of them commits.
    // Two deposits on the same loaded version, each with a new account of its own written
    // first: one of them must lose, and its new account with it.
    let mut rivals = Vec::new();
    for amount in [100, 200] {
        let mut ctx = store.begin();
        let key = format!("side-{amount}");
        let mut side = ctx.create_with_key::<Account>(&key).await.unwrap();
        ctx.apply(&mut side, Opened { owner: key }).unwrap();
        let mut account = ctx.load::<Account>(contested).await.unwrap();
        ctx.apply(&mut account, Deposited { amount }).unwrap();
        rivals.push((amount, ctx));
    }
    // Two creations with the same key: one of them must find it taken.
    let mut twins = Vec::new();
    for owner in ["twin-a", "twin-b"] {
        let mut ctx = store.begin();
        let mut account = ctx.create_with_key::<Account>("twin").await.unwrap();
        let owner = owner.to_owned();
        ctx.apply(&mut account, Opened { owner }).unwrap();
        twins.push(ctx);
    }
    // Plain creations, each with two events: all of them land.
    let mut plain = Vec::new();
    for i in 0..6 {
        let mut ctx = store.begin();
        let key = format!("plain-{i}");
        let mut account = ctx.create_with_key::<Account>(&key).await.unwrap();
        ctx.apply(&mut account, Opened { owner: key.clone() })
            .unwrap();
        ctx.apply(&mut account, Deposited { amount: i + 1 })
            .unwrap();
        plain.push((key, ctx));
    }

    // Another connection holds the write lock, so the store's writer waits inside the first
    // commit while the others queue behind it; they are taken together once it is released.
    let lock = annals::rusqlite::Connection::open(&path).unwrap();
    lock.execute_batch("BEGIN IMMEDIATE").unwrap();
    let first = tokio::spawn({
        let store = store.clone();
        async move { open_account(&store, "first", 1).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let rival_tasks: Vec<_> = rivals
        .into_iter()
        .map(|(amount, ctx)| tokio::spawn(async move { (amount, ctx.commit().await) }))
        .collect();
    let twin_tasks: Vec<_> = twins
        .into_iter()
        .map(|ctx| tokio::spawn(async move { ctx.commit().await }))
        .collect();
    let plain_tasks: Vec<_> = plain
        .into_iter()
        .map(|(key, ctx)| tokio::spawn(async move { (key, ctx.commit().await) }))
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    lock.execute_batch("COMMIT").unwrap();

    first.await.unwrap();
    let mut winners = Vec::new();
    for task in rival_tasks {
        match task.await.unwrap() {
            (amount, Ok(_)) => winners.push(amount),
            (_, Err(Error::Conflict { .. })) => {}
            (_, Err(other)) => panic!("a rival failed with {other:?}"),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one of two rivals commits");
    let mut twins_landed = 0;
    for task in twin_tasks {
        match task.await.unwrap() {
            Ok(_) => twins_landed += 1,
            Err(Error::KeyTaken { .. }) => {}
            Err(other) => panic!("a twin failed with {other:?}"),
        }
    }
    assert_eq!(twins_landed, 1, "exactly one of two twins takes the key");
    for task in plain_tasks {
        let (key, outcome) = task.await.unwrap();
        outcome.unwrap_or_else(|e| panic!("{key}: {e:?}"));
    }

    // The state: each landed commit once, nothing of a failed one.
    let mut ctx = store.begin();
    let account = ctx.load::<Account>(contested).await.unwrap();
    assert_eq!(account.balance, winners[0]);
    assert_eq!(account.version(), 1 + 1);
    for i in 0..6 {
        let account = ctx
            .load_by_key::<Account>(&format!("plain-{i}"))
            .await
            .unwrap();
        assert_eq!((account.balance, account.version()), (i + 1, 2));
    }
    for amount in [100, 200] {
        let side = ctx.find_by_key::<Account>(&format!("side-{amount}")).await;
        assert_eq!(side.unwrap().is_some(), amount == winners[0]);
    }
    let twin = ctx.load_by_key::<Account>("twin").await.unwrap();
    assert!(twin.owner == "twin-a" || twin.owner == "twin-b");
    // contested: 1 + 1; the winner's side account: 1; first: 2; the twin: 1; plain: 6 × 2.
    let feed = conformance::read_feed_to_end(&store, FeedCursor::START, 100).await;
    assert_eq!(feed.len(), 2 + 1 + 2 + 1 + 12);
    assert!(
        feed.windows(2).all(|w| w[0].cursor < w[1].cursor),
        "positions strictly increase"
    );
    store.close().await;

    // Reopened, the file holds the same.
    let store = Store::open(&url(&path)).await.unwrap();
    let again = conformance::read_feed_to_end(&store, FeedCursor::START, 100).await;
    assert_eq!(again.len(), feed.len());
    store.close().await;
}
