//! Durable subscriptions, on every store: delivery in order and at least once, checkpoints that
//! commit with the handler's writes, failures that stop instead of skipping, settings checked
//! at open, pause, resume, reset and leases.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use annals::prelude::*;
use annals::subscription::{Handler, Start, SubscriptionState};
use annals::{BoxError, Error, Filter, SqlValue, Transaction};

use super::domain::*;
use super::{open_account, read_feed_to_end};

/// Bounds every wait of these tests: a hang becomes a failure.
const LIMIT: Duration = Duration::from_secs(60);

/// Collects what it is given, in memory; fails on the events `fail_on` names (by amount) while
/// `failing` is set, and on the SQL stores also writes each event once into `table`.
#[derive(Default)]
struct Collect {
    seen: Vec<RecordedEvent>,
    batches: usize,
    fail_on: Option<i64>,
    failing: bool,
    /// Fails the first n attempts, whatever the events.
    flaky: usize,
    table: Option<String>,
    resets: usize,
    /// Panics on a deposit of this amount.
    panic_on: Option<i64>,
}

impl Collect {
    fn deposits(&self) -> Vec<i64> {
        self.seen
            .iter()
            .filter_map(|e| e.decode::<Deposited>().unwrap().map(|d| d.amount))
            .collect()
    }
}

impl Handler for Collect {
    async fn handle(
        &mut self,
        events: &[RecordedEvent],
        tx: &mut Transaction<'_>,
    ) -> Result<(), BoxError> {
        if let Some(table) = &self.table {
            record_effects(tx, table, events).await?;
        }
        if self.flaky > 0 {
            self.flaky -= 1;
            return Err("flaky".into());
        }
        if let Some(bad) = self.panic_on {
            for event in events {
                if event
                    .decode::<Deposited>()?
                    .is_some_and(|d| d.amount == bad)
                {
                    panic!("{bad} is not a number this handler takes");
                }
            }
        }
        if self.failing
            && let Some(bad) = self.fail_on
        {
            for event in events {
                if event
                    .decode::<Deposited>()?
                    .is_some_and(|d| d.amount == bad)
                {
                    return Err(format!("cannot take {bad}").into());
                }
            }
        }
        self.batches += 1;
        self.seen.extend(events.iter().cloned());
        Ok(())
    }

    async fn reset(&mut self, tx: &mut Transaction<'_>) -> Result<(), BoxError> {
        if let Some(table) = &self.table {
            tx.execute(&format!("DELETE FROM {table}"), &[]).await?;
        }
        self.seen.clear();
        self.resets += 1;
        Ok(())
    }
}

/// Writes each event's effect into `table` with a plain INSERT: a second delivery of a
/// committed event fails on the key.
async fn record_effects(
    tx: &mut Transaction<'_>,
    table: &str,
    events: &[RecordedEvent],
) -> Result<(), BoxError> {
    for event in events {
        tx.execute(
            &format!("INSERT INTO {table} (event_id, position) VALUES ($1, $2)"),
            &[
                event.event_id.into(),
                SqlValue::Int(event.position() as i64),
            ],
        )
        .await?;
    }
    Ok(())
}

/// True on the SQL stores (where handlers run SQL): the memory store refuses SQL.
async fn runs_sql(store: &Store) -> bool {
    struct Probe(bool);
    impl Handler for Probe {
        async fn handle(
            &mut self,
            _: &[RecordedEvent],
            _: &mut Transaction<'_>,
        ) -> Result<(), BoxError> {
            Ok(())
        }
        async fn reset(&mut self, tx: &mut Transaction<'_>) -> Result<(), BoxError> {
            self.0 = tx.execute("SELECT 1", &[]).await.is_ok();
            Ok(())
        }
    }
    let mut probe = Probe(false);
    let probe_sub = store.subscription(&format!("probe-{}", uuid::Uuid::now_v7()));
    probe_sub.reset(&mut probe).await.unwrap();
    probe.0
}

/// True on PostgreSQL, whose handler transactions are sqlx connections.
async fn is_postgres(store: &Store) -> bool {
    struct Probe(bool);
    impl Handler for Probe {
        async fn handle(
            &mut self,
            _: &[RecordedEvent],
            _: &mut Transaction<'_>,
        ) -> Result<(), BoxError> {
            Ok(())
        }
        async fn reset(&mut self, tx: &mut Transaction<'_>) -> Result<(), BoxError> {
            #[cfg(feature = "postgres")]
            {
                self.0 = tx.postgres().is_some();
            }
            let _ = tx;
            Ok(())
        }
    }
    let mut probe = Probe(false);
    let probe_sub = store.subscription(&format!("probe-{}", uuid::Uuid::now_v7()));
    probe_sub.reset(&mut probe).await.unwrap();
    probe.0
}

/// A table of effects for `Collect`, created through a subscription's reset (a handler
/// transaction), with a name of its own: tests share the PostgreSQL database.
async fn effects_table(store: &Store) -> Option<String> {
    if !runs_sql(store).await {
        return None;
    }
    struct Create(String);
    impl Handler for Create {
        async fn handle(
            &mut self,
            _: &[RecordedEvent],
            _: &mut Transaction<'_>,
        ) -> Result<(), BoxError> {
            Ok(())
        }
        async fn reset(&mut self, tx: &mut Transaction<'_>) -> Result<(), BoxError> {
            tx.execute(
                &format!(
                    "CREATE TABLE {} (event_id TEXT PRIMARY KEY, position BIGINT NOT NULL)",
                    self.0
                ),
                &[],
            )
            .await?;
            Ok(())
        }
    }
    let table = format!("effects_{}", uuid::Uuid::now_v7().simple());
    let mut create = Create(table.clone());
    store
        .subscription(&format!("create-{table}"))
        .reset(&mut create)
        .await
        .unwrap();
    Some(table)
}

/// The rows of an effects table: (event id, position), by position, read in a handler
/// transaction (through sqlx on PostgreSQL, a closure on SQLite's writer thread).
async fn effects(store: &Store, table: &str) -> Vec<(String, i64)> {
    type Rows = Arc<std::sync::Mutex<Vec<(String, i64)>>>;
    struct Read(String, Rows);
    impl Handler for Read {
        async fn handle(
            &mut self,
            _: &[RecordedEvent],
            _: &mut Transaction<'_>,
        ) -> Result<(), BoxError> {
            Ok(())
        }
        async fn reset(&mut self, tx: &mut Transaction<'_>) -> Result<(), BoxError> {
            let sql = format!(
                "SELECT event_id, position FROM {} ORDER BY position",
                self.0
            );
            #[cfg(feature = "postgres")]
            if let Some(conn) = tx.postgres() {
                let rows: Vec<(String, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
                    .fetch_all(conn)
                    .await?;
                *self.1.lock().unwrap() = rows;
                return Ok(());
            }
            #[cfg(feature = "sqlite")]
            {
                // Runs at commit, on the writer thread: the rows are there once reset returns.
                let out = self.1.clone();
                tx.sqlite(move |t| {
                    let mut stmt = t.prepare(&sql)?;
                    let read = stmt
                        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                        .collect::<Result<Vec<(String, i64)>, _>>()?;
                    *out.lock().unwrap() = read;
                    Ok(())
                })?;
            }
            let _ = tx;
            Ok(())
        }
    }
    let rows = Rows::default();
    let mut read = Read(table.to_owned(), rows.clone());
    store
        .subscription(&format!("read-{}", uuid::Uuid::now_v7()))
        .reset(&mut read)
        .await
        .unwrap();
    rows.lock().unwrap().clone()
}

async fn deposit(store: &Store, id: AggregateId, amount: i64) {
    store
        .transact(async |ctx| {
            let mut a = ctx.load::<Account>(id).await?;
            ctx.apply(&mut a, Deposited { amount })?;
            Ok::<_, Error>(())
        })
        .await
        .unwrap();
}

async fn catch_up(sub: &annals::Subscription, handler: &mut Collect) -> Result<u64, Error> {
    tokio::time::timeout(LIMIT, sub.catch_up(handler))
        .await
        .expect("catch_up returns in time")
}

/// Every matching event once, in feed order, across runs; the cursor stored.
pub async fn subscription_delivers_each_event_once_in_order(store: &Store) {
    let alice = open_account(store, "alice", "Alice", 1).await;
    let bob = open_account(store, "bob", "Bob", 2).await;
    for amount in 3..=7 {
        deposit(store, if amount % 2 == 0 { bob } else { alice }, amount).await;
    }
    let filter = Filter::all().event::<Deposited>();
    let sub = store.subscription("deposits").filter(filter).batch_size(2);
    let mut handler = Collect::default();
    assert_eq!(catch_up(&sub, &mut handler).await.unwrap(), 7);
    assert_eq!(handler.deposits(), [1, 2, 3, 4, 5, 6, 7]);
    assert_eq!(handler.batches, 4, "batches of two");
    // Nothing twice: a second worker of the same subscription has nothing to do.
    let mut again = Collect::default();
    assert_eq!(catch_up(&sub, &mut again).await.unwrap(), 0);
    deposit(store, alice, 8).await;
    assert_eq!(catch_up(&sub, &mut again).await.unwrap(), 1);
    assert_eq!(again.deposits(), [8]);

    let head = read_feed_to_end(store, FeedCursor::START, 100)
        .await
        .last()
        .unwrap()
        .cursor;
    let status = store.subscriptions().status("deposits").await.unwrap();
    assert_eq!(status.len(), 1);
    let status = &status[0];
    assert_eq!(status.state, SubscriptionState::Active);
    assert_eq!(status.cursor, head, "the cursor is the last event handled");
    assert_eq!(status.lag.events, 0);
    assert!(status.owner.is_none(), "catch_up releases its lease");
    assert_eq!(status.filter, Filter::all().event::<Deposited>());
    // A subscription of another filter sees only its own events.
    let mut opened = Collect::default();
    let opens = store
        .subscription("opened")
        .filter(Filter::all().event::<Opened>());
    assert_eq!(catch_up(&opens, &mut opened).await.unwrap(), 2);
    let lagging = store.subscriptions().list().await.unwrap();
    assert_eq!(
        lagging.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
        ["deposits", "opened"]
    );
    deposit(store, bob, 9).await;
    // One deposit to go (once no transaction of another test holds the feed back).
    let lag = tokio::time::timeout(LIMIT, async {
        loop {
            let status = store.subscriptions().status("deposits").await.unwrap();
            if status[0].lag.held_back.is_none() {
                return status[0].lag.clone();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the hold-back ends");
    assert_eq!((lag.events, lag.more), (1, false), "one deposit to go");
    assert!(lag.behind.is_some());
    assert!(matches!(
        store.subscriptions().status("nobody").await,
        Err(Error::SubscriptionNotFound { .. })
    ));
}

/// A failed attempt writes nothing: its SQL rolls back with the checkpoint, and the batch is
/// delivered again; each event's effect is in the table exactly once.
pub async fn subscription_effects_commit_with_the_cursor(store: &Store) {
    let alice = open_account(store, "alice", "Alice", 1).await;
    for amount in 2..=6 {
        deposit(store, alice, amount).await;
    }
    let table = effects_table(store).await;
    let sub = store
        .subscription("effects")
        .filter(Filter::all().event::<Deposited>())
        .batch_size(4)
        .retries(5, Duration::from_millis(1));
    let mut handler = Collect {
        flaky: 2,
        table: table.clone(),
        ..Collect::default()
    };
    assert_eq!(catch_up(&sub, &mut handler).await.unwrap(), 6);
    assert_eq!(handler.deposits(), [1, 2, 3, 4, 5, 6]);
    if let Some(table) = &table {
        let rows = effects(store, table).await;
        let ids: HashSet<&String> = rows.iter().map(|(id, _)| id).collect();
        assert_eq!(rows.len(), 6, "each event's effect once: {rows:?}");
        assert_eq!(ids.len(), 6);
    }
}

/// A handler that keeps failing on one event: the events before it are checkpointed, the
/// subscription stops on it with the error stored, and resuming tries it again.
pub async fn subscription_stops_on_a_poison_event(store: &Store) {
    let alice = open_account(store, "alice", "Alice", 1).await;
    for amount in 2..=6 {
        deposit(store, alice, amount).await;
    }
    let table = effects_table(store).await;
    let sub = store
        .subscription("poison")
        .filter(Filter::all().event::<Deposited>())
        .batch_size(10)
        .retries(2, Duration::from_millis(1));
    let mut handler = Collect {
        fail_on: Some(4),
        failing: true,
        table: table.clone(),
        ..Collect::default()
    };
    let stopped = catch_up(&sub, &mut handler).await;
    let Err(Error::SubscriptionFailed {
        name,
        cursor,
        message,
        ..
    }) = stopped
    else {
        panic!("expected the subscription to stop, got {stopped:?}");
    };
    assert_eq!(name, "poison");
    assert!(message.contains("cannot take 4"), "{message}");
    assert_eq!(
        handler.deposits(),
        [1, 2, 3],
        "the events before it, and not it"
    );
    let poison = read_feed_to_end(store, FeedCursor::START, 100)
        .await
        .into_iter()
        .find(|e| {
            e.decode::<Deposited>()
                .unwrap()
                .is_some_and(|d| d.amount == 4)
        })
        .unwrap();
    assert_eq!(cursor, poison.cursor);
    let status = &store.subscriptions().status("poison").await.unwrap()[0];
    assert_eq!(status.state, SubscriptionState::Failed);
    assert_eq!(status.error_cursor, Some(poison.cursor));
    assert!(
        status
            .last_error
            .as_deref()
            .unwrap()
            .contains("cannot take 4")
    );
    assert!(status.cursor < poison.cursor, "the cursor stays before it");
    // Stopped is stopped: another run returns the same failure, delivering nothing.
    assert!(matches!(
        catch_up(&sub, &mut handler).await,
        Err(Error::SubscriptionFailed { .. })
    ));
    assert_eq!(handler.deposits(), [1, 2, 3]);
    // Fixed and resumed, it goes on from the poison event.
    handler.failing = false;
    store.subscriptions().resume("poison").await.unwrap();
    assert_eq!(catch_up(&sub, &mut handler).await.unwrap(), 3);
    assert_eq!(handler.deposits(), [1, 2, 3, 4, 5, 6]);
    assert_eq!(
        store.subscriptions().status("poison").await.unwrap()[0].state,
        SubscriptionState::Active
    );
    if let Some(table) = &table {
        assert_eq!(effects(store, table).await.len(), 6, "each effect once");
    }
}

/// The filter and start are kept from the first open; other settings are refused until a
/// reset, which clears the handler's model and starts over in one transaction.
pub async fn subscription_settings_are_checked_and_reset(store: &Store) {
    let alice = open_account(store, "alice", "Alice", 1).await;
    deposit(store, alice, 2).await;
    let deposits = store
        .subscription("model")
        .filter(Filter::all().event::<Deposited>());
    let mut handler = Collect::default();
    assert_eq!(catch_up(&deposits, &mut handler).await.unwrap(), 2);

    let everything = store.subscription("model");
    match everything.open().await {
        Err(Error::SubscriptionMismatch {
            name,
            setting,
            stored,
            given,
        }) => {
            assert_eq!((name.as_str(), setting), ("model", "filter"));
            assert!(stored.contains("account.deposited"), "{stored}");
            assert_eq!(given, "{}");
        }
        other => panic!("expected a mismatch, got {other:?}"),
    }
    let late = store
        .subscription("model")
        .filter(Filter::all().event::<Deposited>())
        .start(Start::End);
    assert!(matches!(
        late.open().await,
        Err(Error::SubscriptionMismatch {
            setting: "start",
            ..
        })
    ));
    // Reset to the new filter: the model is cleared and rebuilt from the start.
    everything.reset(&mut handler).await.unwrap();
    assert_eq!(handler.resets, 1);
    assert!(handler.seen.is_empty());
    assert_eq!(catch_up(&everything, &mut handler).await.unwrap(), 3);
    assert_eq!(handler.seen.len(), 3, "opened and both deposits");
    assert!(matches!(
        deposits.open().await,
        Err(Error::SubscriptionMismatch { .. })
    ));
    // A filter by key needs its aggregate type.
    let bad = store.subscription("bad").filter(
        Filter::all()
            .key::<Account>("alice")
            .aggregate_type::<Counter>(),
    );
    assert!(matches!(bad.open().await, Err(Error::Config(_))));
}

/// `Start::End` takes only later events; `Start::After` the events after a cursor.
pub async fn subscription_starts_where_asked(store: &Store) {
    let alice = open_account(store, "alice", "Alice", 1).await;
    let end = store.subscription("from-end").start(Start::End);
    end.open().await.unwrap();
    let middle = read_feed_to_end(store, FeedCursor::START, 100)
        .await
        .first()
        .unwrap()
        .cursor;
    let after = store.subscription("after").start(Start::After(middle));
    deposit(store, alice, 5).await;
    let mut late = Collect::default();
    catch_up(&end, &mut late).await.unwrap();
    // The end as the feed could be read at open: on PostgreSQL a transaction of another test
    // still open then may hold it back, and the events before come too (never fewer).
    if !is_postgres(store).await {
        assert_eq!(late.seen.len(), 1, "only the later deposit");
    }
    assert_eq!(late.deposits().last(), Some(&5));
    let mut rest = Collect::default();
    assert_eq!(catch_up(&after, &mut rest).await.unwrap(), 2);
    assert_eq!(rest.deposits(), [1, 5]);
    // From a time: the events recorded at or after it.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let noon = std::time::SystemTime::now();
    tokio::time::sleep(Duration::from_millis(5)).await;
    deposit(store, alice, 6).await;
    let since = store
        .subscription("since-noon")
        .filter(Filter::all().event::<Deposited>())
        .start(Start::At(noon));
    let mut later = Collect::default();
    assert_eq!(catch_up(&since, &mut later).await.unwrap(), 1);
    assert_eq!(later.deposits(), [6]);
    let status = &store.subscriptions().status("since-noon").await.unwrap()[0];
    assert_eq!(status.start, Start::At(noon_micros(noon)));
}

/// Paused, a subscription delivers nothing until it is resumed.
pub async fn subscription_pauses_and_resumes(store: &Store) {
    let alice = open_account(store, "alice", "Alice", 1).await;
    let sub = store.subscription("pausing");
    sub.open().await.unwrap();
    store.subscriptions().pause("pausing").await.unwrap();
    let mut handler = Collect::default();
    assert_eq!(catch_up(&sub, &mut handler).await.unwrap(), 0);
    assert_eq!(
        store.subscriptions().status("pausing").await.unwrap()[0].state,
        SubscriptionState::Paused
    );
    store.subscriptions().resume("pausing").await.unwrap();
    deposit(store, alice, 2).await;
    assert_eq!(catch_up(&sub, &mut handler).await.unwrap(), 3);
    assert!(matches!(
        store.subscriptions().pause("nobody").await,
        Err(Error::SubscriptionNotFound { .. })
    ));
}

/// One worker at a time: a running worker holds the lease, a second one waits; on shutdown the
/// first releases it and the second takes over at once, from the stored cursor.
pub async fn subscription_workers_share_by_lease(store: &Store) {
    let alice = open_account(store, "alice", "Alice", 1).await;
    let sub = store
        .subscription("shared")
        .filter(Filter::all().event::<Deposited>())
        .poll_interval(Duration::from_millis(20));
    sub.open().await.unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let first = {
        let sub = sub.clone();
        tokio::spawn(async move {
            let mut handler = Collect::default();
            let shutdown = async {
                let _ = stop_rx.await;
            };
            sub.run(&mut handler, shutdown).await.map(|()| handler)
        })
    };
    // The running worker delivers new commits as they come.
    deposit(store, alice, 2).await;
    let owner = tokio::time::timeout(LIMIT, async {
        loop {
            let status = store.subscriptions().status("shared").await.unwrap();
            if status[0].lag.events == 0 && status[0].owner.is_some() {
                return status[0].owner.clone();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the running worker catches up");
    assert!(owner.is_some());
    // A second worker (another owner) gets no lease while the first holds it.
    let second = store
        .subscription("shared")
        .filter(Filter::all().event::<Deposited>());
    let mut waiting = Collect::default();
    deposit(store, alice, 3).await;
    assert_eq!(catch_up(&second, &mut waiting).await.unwrap(), 0);
    stop_tx.send(()).unwrap();
    let handler = tokio::time::timeout(LIMIT, first)
        .await
        .expect("the worker stops on shutdown")
        .unwrap()
        .unwrap();
    let first_got = handler.deposits();
    assert!(first_got.starts_with(&[1, 2]), "{first_got:?}");
    assert!(
        store.subscriptions().status("shared").await.unwrap()[0]
            .owner
            .is_none(),
        "released on shutdown"
    );
    // The second takes over at once and delivers what the first did not.
    catch_up(&second, &mut waiting).await.unwrap();
    let mut all = first_got.clone();
    all.extend(waiting.deposits());
    assert_eq!(all, [1, 2, 3], "every deposit once, in order");
}

/// Holds up its first batch until released, then writes its effects: a worker that stalls.
struct Stall {
    inner: Collect,
    gate: Option<tokio::sync::oneshot::Receiver<()>>,
    stalled: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Handler for Stall {
    async fn handle(
        &mut self,
        events: &[RecordedEvent],
        tx: &mut Transaction<'_>,
    ) -> Result<(), BoxError> {
        if let Some(gate) = self.gate.take() {
            if let Some(stalled) = self.stalled.take() {
                let _ = stalled.send(());
            }
            let _ = gate.await;
        }
        self.inner.handle(events, tx).await
    }
}

/// A worker whose lease is taken while it works (here by a reset, which bumps the fencing
/// token) cannot write its batch: its background renewal finds the lease gone, the batch is
/// rolled back, and the worker claims again and goes on from the new cursor. Each event's
/// effect is stored once.
pub async fn subscription_stale_worker_cannot_checkpoint(store: &Store) {
    let alice = open_account(store, "alice", "Alice", 1).await;
    deposit(store, alice, 2).await;
    let table = effects_table(store).await;
    let filter = Filter::all().event::<Deposited>();
    let stale = store
        .subscription("fenced")
        .filter(filter.clone())
        .lease(Duration::from_millis(300))
        .poll_interval(Duration::from_millis(20));
    stale.open().await.unwrap();
    let (release, gate) = tokio::sync::oneshot::channel();
    let (stalled_tx, stalled_rx) = tokio::sync::oneshot::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut stalling = Stall {
        inner: Collect {
            table: table.clone(),
            ..Collect::default()
        },
        gate: Some(gate),
        stalled: Some(stalled_tx),
    };
    let first = {
        let stale = stale.clone();
        tokio::spawn(async move {
            let shutdown = async {
                let _ = stop_rx.await;
            };
            let result = stale.run(&mut stalling, shutdown).await;
            (result, stalling.inner)
        })
    };
    tokio::time::timeout(LIMIT, stalled_rx)
        .await
        .expect("the worker takes the batch")
        .unwrap();
    let token_before = store.subscriptions().status("fenced").await.unwrap()[0].lease_token;
    // The lease is taken from under it: a reset bumps the fencing token.
    stale.reset(&mut Collect::default()).await.unwrap();
    let token_after = store.subscriptions().status("fenced").await.unwrap()[0].lease_token;
    assert!(
        token_after > token_before,
        "the reset bumped the fencing token"
    );
    deposit(store, alice, 3).await;
    // The worker, fenced off, claims again and delivers everything from the start once.
    tokio::time::timeout(LIMIT, async {
        loop {
            let status = store.subscriptions().status("fenced").await.unwrap();
            if status[0].lag.events == 0
                && status[0].lag.held_back.is_none()
                && status[0].owner.is_some()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the worker claims again and catches up");
    let _ = release.send(());
    stop_tx.send(()).unwrap();
    let (result, handler) = tokio::time::timeout(LIMIT, first).await.unwrap().unwrap();
    result.unwrap();
    assert_eq!(
        handler.deposits(),
        [1, 2, 3],
        "the stalled batch was not kept"
    );
    if let Some(table) = &table {
        let rows = effects(store, table).await;
        assert_eq!(
            rows.len(),
            3,
            "each effect once: the fenced batch rolled back: {rows:?}"
        );
    }
}

/// Two workers with one owner (clones of one `Subscription`, run at once) hold the same lease:
/// the cursor itself is checked at each checkpoint, so a batch both handled is stored once.
pub async fn subscription_clones_never_store_a_batch_twice(store: &Store) {
    let alice = open_account(store, "alice", "Alice", 1).await;
    for amount in 2..=40 {
        deposit(store, alice, amount).await;
    }
    let table = effects_table(store).await;
    let sub = store
        .subscription("twins")
        .filter(Filter::all().event::<Deposited>())
        .batch_size(3);
    sub.open().await.unwrap();
    let run = |sub: annals::Subscription, table: Option<String>| async move {
        let mut handler = Collect {
            table,
            ..Collect::default()
        };
        catch_up(&sub, &mut handler).await.unwrap();
        handler
    };
    let (a, b) = tokio::join!(
        tokio::spawn(run(sub.clone(), table.clone())),
        tokio::spawn(run(sub.clone(), table.clone()))
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    let mut delivered: Vec<i64> = a.deposits();
    delivered.extend(b.deposits());
    delivered.sort_unstable();
    delivered.dedup();
    assert_eq!(
        delivered,
        (1..=40).collect::<Vec<_>>(),
        "every deposit delivered"
    );
    if let Some(table) = &table {
        let rows = effects(store, table).await;
        assert_eq!(rows.len(), 40, "each effect stored once");
    }
    let status = &store.subscriptions().status("twins").await.unwrap()[0];
    assert_eq!(status.lag.events, 0);
}

/// Records every event it is given into a list shared with the test, and (on the SQL stores)
/// each event's effect into `table`, once.
#[derive(Clone, Default)]
struct Record {
    seen: Arc<std::sync::Mutex<Vec<RecordedEvent>>>,
    table: Option<String>,
}

impl Handler for Record {
    async fn handle(
        &mut self,
        events: &[RecordedEvent],
        tx: &mut Transaction<'_>,
    ) -> Result<(), BoxError> {
        if let Some(table) = &self.table {
            record_effects(tx, table, events).await?;
        }
        self.seen.lock().unwrap().extend(events.iter().cloned());
        Ok(())
    }
}

/// The owners of the partitions of `name`, by partition (`None`: free).
async fn owners(store: &Store, name: &str) -> Vec<Option<String>> {
    store
        .subscriptions()
        .status(name)
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.owner)
        .collect()
}

/// Waits until `check` holds for the owners of `name`'s partitions.
async fn until_owners(
    store: &Store,
    name: &str,
    what: &str,
    check: impl Fn(&[Option<String>]) -> bool,
) {
    tokio::time::timeout(LIMIT, async {
        loop {
            if check(&owners(store, name).await) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what}: the owners of {name}'s partitions never matched"));
}

/// Partitions split the events by aggregate: every event once, each aggregate's in order.
pub async fn subscription_partitions_keep_each_aggregate_in_order(store: &Store) {
    let mut accounts = Vec::new();
    for i in 0..12 {
        accounts.push(open_account(store, &format!("a{i}"), "A", 1).await);
    }
    for round in 2..=4 {
        for &id in &accounts {
            deposit(store, id, round).await;
        }
    }
    let sub = store
        .subscription("split")
        .filter(Filter::all().event::<Deposited>())
        .partitions(4)
        .batch_size(5);
    let mut handler = Record::default();
    // Each account's opening deposit, then three more.
    assert_eq!(catch_up(&sub, &mut Collect::default()).await.unwrap(), 48);
    sub.reset(&mut handler).await.unwrap();
    tokio::time::timeout(LIMIT, sub.catch_up(&mut handler))
        .await
        .unwrap()
        .unwrap();
    let seen = handler.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 48, "every deposit once");
    let ids: HashSet<uuid::Uuid> = seen.iter().map(|e| e.event_id).collect();
    assert_eq!(ids.len(), 48);
    for &id in &accounts {
        let versions: Vec<u64> = seen
            .iter()
            .filter(|e| e.aggregate_id == id)
            .map(|e| e.version)
            .collect();
        assert_eq!(versions, [2, 3, 4, 5], "each aggregate's events in order");
    }
    let status = store.subscriptions().status("split").await.unwrap();
    assert_eq!(
        status.iter().map(|s| s.partition).collect::<Vec<_>>(),
        [0, 1, 2, 3]
    );
    // The partitions are part of the subscription: another count is refused.
    let other = store
        .subscription("split")
        .filter(Filter::all().event::<Deposited>())
        .partitions(2);
    assert!(matches!(
        other.open().await,
        Err(Error::SubscriptionMismatch {
            setting: "partitions",
            ..
        })
    ));
    assert!(matches!(
        store.subscription("huge").partitions(257).open().await,
        Err(Error::Config(_))
    ));
}

/// One worker runs all four partitions; a second joins and they end up with two each, every
/// event delivered once between them; the second leaves and the first takes all four back.
pub async fn subscription_workers_rebalance_partitions(store: &Store) {
    let mut accounts = Vec::new();
    for i in 0..16 {
        accounts.push(open_account(store, &format!("r{i}"), "R", 1).await);
    }
    let table = effects_table(store).await;
    let sub = || {
        store
            .subscription("balanced")
            .filter(Filter::all().event::<Deposited>())
            .partitions(4)
            .lease(Duration::from_secs(1))
            .poll_interval(Duration::from_millis(20))
    };
    sub().open().await.unwrap();
    let start = |handler: Record| {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let worker = sub();
        let task = tokio::spawn(async move {
            let mut handler = handler;
            worker
                .run(&mut handler, async {
                    let _ = stopped.await;
                })
                .await
        });
        (stop, task)
    };
    let first = Record {
        table: table.clone(),
        ..Record::default()
    };
    let second = Record {
        table: table.clone(),
        ..Record::default()
    };
    let (stop_first, first_task) = start(first.clone());
    until_owners(store, "balanced", "one worker takes all four", |o| {
        o.iter().all(Option::is_some) && o.iter().collect::<HashSet<_>>().len() == 1
    })
    .await;
    let (stop_second, second_task) = start(second.clone());
    until_owners(store, "balanced", "two workers share evenly", |o| {
        let mut counts: std::collections::HashMap<&Option<String>, usize> =
            std::collections::HashMap::new();
        for owner in o {
            *counts.entry(owner).or_default() += 1;
        }
        o.iter().all(Option::is_some) && counts.len() == 2 && counts.values().all(|&n| n == 2)
    })
    .await;
    for round in 2..=3 {
        for &id in &accounts {
            deposit(store, id, round).await;
        }
    }
    // Both deliver the deposits of their partitions before the second one leaves.
    super::until_caught_up(store, "balanced", "the two workers catch up").await;
    assert!(
        !second.seen.lock().unwrap().is_empty(),
        "the second worker did work"
    );
    stop_second.send(()).unwrap();
    tokio::time::timeout(LIMIT, second_task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    until_owners(store, "balanced", "the first takes all four back", |o| {
        o.iter().all(Option::is_some) && o.iter().collect::<HashSet<_>>().len() == 1
    })
    .await;
    deposit(store, accounts[0], 4).await;
    // The opening deposits, two rounds, and one more.
    let all = 16 * 3 + 1;
    tokio::time::timeout(LIMIT, async {
        loop {
            let got = first.seen.lock().unwrap().len() + second.seen.lock().unwrap().len();
            if got >= all {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("every deposit is delivered");
    stop_first.send(()).unwrap();
    tokio::time::timeout(LIMIT, first_task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let mut seen = first.seen.lock().unwrap().clone();
    seen.extend(second.seen.lock().unwrap().iter().cloned());
    let ids: HashSet<uuid::Uuid> = seen.iter().map(|e| e.event_id).collect();
    assert_eq!(ids.len(), all, "every deposit delivered");
    assert!(
        !second.seen.lock().unwrap().is_empty(),
        "the second worker did work"
    );
    for &id in &accounts {
        for worker in [&first, &second] {
            let versions: Vec<u64> = worker
                .seen
                .lock()
                .unwrap()
                .iter()
                .filter(|e| e.aggregate_id == id)
                .map(|e| e.version)
                .collect();
            assert!(
                versions.windows(2).all(|w| w[0] < w[1]),
                "in order: {versions:?}"
            );
        }
    }
    if let Some(table) = &table {
        assert_eq!(effects(store, table).await.len(), all, "each effect once");
    }
}

/// Under the park policy a poison event is parked and the subscription goes on; the later
/// events of its aggregate wait behind it until it is retried (then delivered in order) or
/// skipped (then never delivered); other aggregates never wait. A panicking handler parks too.
pub async fn subscription_parks_a_poison_event_and_goes_on(store: &Store) {
    use annals::subscription::OnFailure;
    let alice = open_account(store, "alice", "Alice", 1).await;
    let bob = open_account(store, "bob", "Bob", 10).await;
    for (id, amount) in [
        (alice, 2),
        (bob, 11),
        (alice, 3),
        (bob, 12),
        (alice, 4),
        (alice, 5),
    ] {
        deposit(store, id, amount).await;
    }
    let table = effects_table(store).await;
    let sub = store
        .subscription("parking")
        .filter(Filter::all().event::<Deposited>())
        .on_failure(OnFailure::Park)
        .retries(2, Duration::from_millis(1));
    let mut handler = Collect {
        fail_on: Some(3),
        failing: true,
        table: table.clone(),
        ..Collect::default()
    };
    catch_up(&sub, &mut handler).await.unwrap();
    assert_eq!(
        handler.deposits(),
        [1, 10, 2, 11, 12],
        "alice waits behind 3"
    );
    let parked = store.subscriptions().parked("parking").await.unwrap();
    assert_eq!(parked.len(), 1);
    let poison = &parked[0];
    assert_eq!(poison.aggregate_id, alice);
    assert_eq!(poison.next_version, 4, "opened, 1, 2, then 3 at version 4");
    assert!(poison.error.contains("cannot take 3"), "{}", poison.error);
    assert!(poison.requested.is_none());
    let status = &store.subscriptions().status("parking").await.unwrap()[0];
    assert_eq!(
        status.state,
        SubscriptionState::Active,
        "parking does not stop it"
    );

    // New events: bob's are delivered, alice's wait.
    deposit(store, alice, 6).await;
    deposit(store, bob, 13).await;
    catch_up(&sub, &mut handler).await.unwrap();
    assert_eq!(handler.deposits(), [1, 10, 2, 11, 12, 13]);
    // A retry that fails again parks it again, delivering nothing.
    store
        .subscriptions()
        .retry_parked("parking", poison.event_id)
        .await
        .unwrap();
    assert_eq!(
        store.subscriptions().parked("parking").await.unwrap()[0].requested,
        Some(annals::subscription::ParkedRequest::Retry)
    );
    catch_up(&sub, &mut handler).await.unwrap();
    assert_eq!(handler.deposits(), [1, 10, 2, 11, 12, 13]);
    let again = store.subscriptions().parked("parking").await.unwrap();
    assert_eq!((again.len(), again[0].requested), (1, None));
    // Fixed and retried: 3 and everything of alice's behind it, in order.
    handler.failing = false;
    store
        .subscriptions()
        .retry_parked("parking", poison.event_id)
        .await
        .unwrap();
    catch_up(&sub, &mut handler).await.unwrap();
    assert_eq!(handler.deposits(), [1, 10, 2, 11, 12, 13, 3, 4, 5, 6]);
    assert!(
        store
            .subscriptions()
            .parked("parking")
            .await
            .unwrap()
            .is_empty()
    );
    deposit(store, alice, 7).await;
    catch_up(&sub, &mut handler).await.unwrap();
    assert_eq!(
        handler.deposits().last(),
        Some(&7),
        "alice is not held back any more"
    );

    // A panic parks as well; skipped, the event is never delivered, the ones after it are.
    handler.panic_on = Some(8);
    deposit(store, bob, 8).await;
    deposit(store, bob, 9).await;
    catch_up(&sub, &mut handler).await.unwrap();
    let parked = store.subscriptions().parked("parking").await.unwrap();
    assert_eq!(parked.len(), 1);
    assert!(parked[0].error.contains("panicked"), "{}", parked[0].error);
    handler.panic_on = None;
    store
        .subscriptions()
        .skip_parked("parking", parked[0].event_id)
        .await
        .unwrap();
    catch_up(&sub, &mut handler).await.unwrap();
    let got = handler.deposits();
    assert_eq!(&got[got.len() - 1..], [9], "9 delivered, 8 skipped");
    assert!(!got.contains(&8));
    assert!(matches!(
        store
            .subscriptions()
            .retry_parked("parking", uuid::Uuid::now_v7())
            .await,
        Err(Error::ParkedEventNotFound { .. })
    ));
    if let Some(table) = &table {
        assert_eq!(
            effects(store, table).await.len(),
            got.len(),
            "each effect once"
        );
    }
}

/// `time` as the store keeps a start time: to the microsecond.
fn noon_micros(time: std::time::SystemTime) -> std::time::SystemTime {
    let micros = time
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros();
    std::time::UNIX_EPOCH + Duration::from_micros(micros as u64)
}

/// A typed projection: deposits and counter events, each with its envelope.
#[derive(annals::Projection, Default)]
#[projection(name = "typed", events(Deposited, CounterEvent), reset = clear)]
struct Typed {
    deposits: Vec<(AggregateId, i64, u64)>,
    counters: Vec<String>,
    resets: usize,
    fail_on: Option<i64>,
}

impl annals::subscription::On<Deposited> for Typed {
    async fn on(
        &mut self,
        event: Deposited,
        envelope: &annals::subscription::Envelope,
        _: &mut Transaction<'_>,
    ) -> Result<(), BoxError> {
        if self.fail_on == Some(event.amount) {
            return Err(format!("cannot take {}", event.amount).into());
        }
        assert_eq!(envelope.event_type, "account.deposited");
        self.deposits
            .push((envelope.aggregate_id, event.amount, envelope.version));
        Ok(())
    }
}

impl annals::subscription::On<CounterEvent> for Typed {
    async fn on(
        &mut self,
        event: CounterEvent,
        envelope: &annals::subscription::Envelope,
        _: &mut Transaction<'_>,
    ) -> Result<(), BoxError> {
        let expected = match event {
            CounterEvent::Incremented => "counter.incremented",
            CounterEvent::Added { .. } => "counter.added",
            CounterEvent::Reset(_) => "Reset",
        };
        assert_eq!(
            envelope.event_type, expected,
            "each variant by its own name"
        );
        self.counters.push(envelope.event_type.clone());
        Ok(())
    }
}

impl Typed {
    async fn clear(&mut self, _: &mut Transaction<'_>) -> Result<(), BoxError> {
        self.deposits.clear();
        self.counters.clear();
        self.resets += 1;
        Ok(())
    }
}

/// A typed projection gets exactly the events it lists, decoded, each with its envelope; an
/// enum event by each variant; its reset hook runs on a reset; a failure stops it as any
/// handler's does.
pub async fn typed_projection_takes_its_events(store: &Store) {
    use annals::subscription::Projection;
    let alice = open_account(store, "alice", "Alice", 1).await;
    deposit(store, alice, 2).await;
    let counter = store
        .transact(async |ctx| {
            let mut c = ctx.create::<Counter>()?;
            ctx.apply(&mut c, CounterEvent::Incremented)?;
            ctx.apply(&mut c, CounterEvent::Added { by: 2 })?;
            ctx.apply(&mut c, CounterEvent::Reset(0))?;
            let mut a = ctx.load::<Account>(alice).await?;
            ctx.apply(&mut a, Withdrawn { amount: 1 })?;
            Ok::<_, Error>(c.id())
        })
        .await
        .unwrap();
    let _ = counter;
    assert_eq!(
        Typed::filter(),
        Filter::all().event::<Deposited>().event::<CounterEvent>()
    );
    let sub = store
        .projection::<Typed>()
        .retries(1, Duration::from_millis(1));
    assert_eq!(sub.name(), "typed");
    let mut typed = Typed::default();
    // Only its events leave the database: opened and withdrawn are not among them.
    assert_eq!(sub.catch_up(&mut typed).await.unwrap(), 5);
    assert_eq!(typed.deposits, [(alice, 1, 2), (alice, 2, 3)]);
    assert_eq!(
        typed.counters,
        ["counter.incremented", "counter.added", "Reset"]
    );
    sub.reset(&mut typed).await.unwrap();
    assert_eq!((typed.resets, typed.deposits.len()), (1, 0));
    typed.fail_on = Some(2);
    assert!(matches!(
        sub.catch_up(&mut typed).await,
        Err(Error::SubscriptionFailed { .. })
    ));
    // Stopped at the failing deposit (a model in memory sees a failed batch's first events
    // again when it is retried: SQL models roll them back).
    assert!(
        typed.deposits.iter().all(|d| d.1 == 1),
        "{:?}",
        typed.deposits
    );
    assert!(!typed.deposits.is_empty());
}

pub async fn subscription_goes_on_past_erased_events(store: &Store) {
    let bob = open_account(store, "bob", "Bob", 2).await;
    let eve = open_account(store, "eve", "Eve", 3).await;
    let sub = store.subscription("erasures").batch_size(3);
    let mut handler = Collect::default();
    assert_eq!(catch_up(&sub, &mut handler).await.unwrap(), 4);
    // The subscription's cursor is Eve's last event, which goes now; so does one it has not
    // read yet.
    deposit(store, eve, 4).await;
    store.erase(eve, Metadata::new()).await.unwrap();
    deposit(store, bob, 5).await;
    let mut after = Collect::default();
    assert_eq!(catch_up(&sub, &mut after).await.unwrap(), 2);
    assert!(after.seen[0].decode::<annals::Erased>().unwrap().is_some());
    assert_eq!(after.seen[0].aggregate_id, eve);
    assert_eq!(after.deposits(), [5]);
    let status = store.subscriptions().status("erasures").await.unwrap();
    assert_eq!(status[0].lag.events, 0);
}
