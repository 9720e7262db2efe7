//! annals on SQLite against the same work written by hand, in one process: with raw rusqlite
//! (the limit: the driver annals runs on, through the cheapest async bridge) and with raw sqlx
//! (the level of the store before it moved to rusqlite).
//!
//! `cargo bench --bench sqlite` (add `ANNALS_BENCH_QUICK=1` for a smoke run).
//!
//! All three use the same schema (the raw sides create it from `annals::migrations` with the
//! prefix `raw_`, each in its own file), the same pragmas (WAL, `synchronous` FULL, then the
//! whole run again with NORMAL), one writer connection in `BEGIN IMMEDIATE` transactions and
//! read-only connections for loads, the same payloads (serde JSON), type ids, event ids and
//! timestamps.
//!
//! - W1: sequential commits, each creating an aggregate with one event.
//! - W2: 8 concurrent tasks, each running one-event deposit commands (load, apply, commit) on
//!   an aggregate of its own, a fresh one every round; the raw side runs the least SQL a
//!   deposit that decides nothing from the state needs (`BEGIN IMMEDIATE; SELECT max(sequence)
//!   …; INSERT …; COMMIT`, no load), annals runs as opened by default and with an aggregate
//!   cache (`StoreOptions::aggregate_cache`). No sqlx side.
//! - W3: sequential commits, each creating an aggregate with 100 events.
//! - W4: loading one 10,000-event aggregate (rows read, payloads decoded, state folded).
//! - W5: the same aggregate with a snapshot every 100 events: snapshot plus 50 events.

#[path = "harness/mod.rs"]
mod harness;
#[path = "sqlite_raw/rusqlite.rs"]
mod raw_rusqlite;
#[path = "sqlite_raw/sqlx.rs"]
mod raw_sqlx;

use std::cell::Cell;
use std::future::Future;
use std::time::Duration;

use annals::Synchronous;
use annals::prelude::*;
use harness::{Measure, Row, size, timed};
use raw_rusqlite::RawRusqlite;
use raw_sqlx::RawSqlx;

use harness::ledger::*;

/// One workload's medians on the three sides.
struct Line {
    row: Row,
    sqlx: Option<Duration>,
}

/// Runs the three sides in turn for `rounds` rounds, rotating which goes first, and keeps each
/// side's median time: (rusqlite, annals, sqlx).
async fn compare3<R, A, S, RF, AF, SF>(
    rounds: usize,
    mut rusqlite: R,
    mut annals: A,
    mut sqlx: S,
) -> (Duration, Duration, Duration)
where
    R: FnMut() -> RF,
    A: FnMut() -> AF,
    S: FnMut() -> SF,
    RF: Future<Output = Duration>,
    AF: Future<Output = Duration>,
    SF: Future<Output = Duration>,
{
    let mut times = [Vec::new(), Vec::new(), Vec::new()];
    for round in 0..rounds {
        for turn in 0..3 {
            match (round + turn) % 3 {
                0 => times[0].push(rusqlite().await),
                1 => times[1].push(annals().await),
                _ => times[2].push(sqlx().await),
            }
        }
    }
    let [r, a, s] = times.map(|mut t| {
        t.sort();
        t.get(t.len() / 2).copied().unwrap_or_default()
    });
    (r, a, s)
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

struct Sides {
    store: Store,
    /// A second handle on the annals file, with an aggregate cache.
    cached: Store,
    rusqlite: RawRusqlite,
    sqlx: RawSqlx,
}

/// `commits` sequential commits of `events` on each side.
async fn commits(sides: &Sides, rounds: usize, commits: usize, events: &[Moved]) -> [Duration; 3] {
    let (r, a, s) = compare3(
        rounds,
        || {
            timed(async {
                for _ in 0..commits {
                    let t = sides.rusqlite.ledger_type;
                    sides.rusqlite.create(t, events, None).await;
                }
            })
        },
        || {
            timed(async {
                for _ in 0..commits {
                    annals_create::<Ledger>(&sides.store, events).await;
                }
            })
        },
        || {
            timed(async {
                for _ in 0..commits {
                    sides
                        .sqlx
                        .create(sides.sqlx.ledger_type, events, None)
                        .await;
                }
            })
        },
    )
    .await;
    [r, a, s]
}

/// W2: `TASKS` tasks at once, each running `commands` deposits on an aggregate of its own, on
/// raw rusqlite (least SQL), annals and annals with its cache: (rusqlite, annals, cached).
async fn deposits(sides: &Sides, rounds: usize, commands: usize) -> [Duration; 3] {
    const TASKS: usize = 8;
    let one = [moved(1)];
    let mut raw_ids = Vec::new();
    let mut annals_ids = Vec::new();
    let mut cached_ids = Vec::new();
    for _ in 0..TASKS * rounds {
        let t = sides.rusqlite.ledger_type;
        raw_ids.push(sides.rusqlite.create(t, &one, None).await);
        annals_ids.push(annals_create::<Ledger>(&sides.store, &one).await);
        cached_ids.push(annals_create::<Ledger>(&sides.cached, &one).await);
    }
    let round = [const { Cell::new(0usize) }; 3];
    let (r, a, c) = compare3(
        rounds,
        || {
            let ids = &raw_ids[round[0].get() * TASKS..][..TASKS];
            round[0].set(round[0].get() + 1);
            let raw = &sides.rusqlite;
            timed(async move {
                let tasks = ids.iter().map(|&id| async move {
                    for _ in 0..commands {
                        raw.deposit(id, &moved(2)).await;
                    }
                });
                futures_join_all(tasks).await;
            })
        },
        || {
            let ids = &annals_ids[round[1].get() * TASKS..][..TASKS];
            round[1].set(round[1].get() + 1);
            let store = &sides.store;
            timed(async move {
                futures_join_all(ids.iter().map(|&id| deposit_commands(store, id, commands))).await;
            })
        },
        || {
            let ids = &cached_ids[round[2].get() * TASKS..][..TASKS];
            round[2].set(round[2].get() + 1);
            let store = &sides.cached;
            timed(async move {
                futures_join_all(ids.iter().map(|&id| deposit_commands(store, id, commands))).await;
            })
        },
    )
    .await;
    [r, a, c]
}

/// `commands` deposit commands on `id` through annals: load, apply, commit.
async fn deposit_commands(store: &Store, id: AggregateId, commands: usize) {
    for _ in 0..commands {
        store
            .transact(async |ctx| {
                let mut ledger = ctx.load::<Ledger>(id).await?;
                ctx.apply(&mut ledger, moved(2))?;
                Ok::<_, Error>(())
            })
            .await
            .unwrap();
    }
}

/// Runs the futures concurrently on this task, and waits for all of them.
async fn futures_join_all<F: Future<Output = ()>>(futures: impl IntoIterator<Item = F>) {
    let mut set: Vec<std::pin::Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    std::future::poll_fn(|cx| {
        set.retain_mut(|f| f.as_mut().poll(cx).is_pending());
        if set.is_empty() {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await
}

/// Writes one aggregate of `events` events on each side, checks that all rebuild the same
/// state, then times `loads` loads of it per round on each side.
async fn loads<L: LedgerAggregate + Send + 'static>(
    sides: &Sides,
    rounds: usize,
    events: usize,
    loads: usize,
) -> [Duration; 3] {
    let snapshots = L::SNAPSHOT_EVERY.map(|n| n as usize);
    let with_snapshot = snapshots.is_some();
    let (rusqlite_type, sqlx_type) = if with_snapshot {
        (sides.rusqlite.snapped_type, sides.sqlx.snapped_type)
    } else {
        (sides.rusqlite.ledger_type, sides.sqlx.ledger_type)
    };
    let all: Vec<Moved> = (0..events).map(moved).collect();
    let rusqlite_id = sides.rusqlite.create(rusqlite_type, &all, snapshots).await;
    let sqlx_id = sides.sqlx.create(sqlx_type, &all, snapshots).await;
    let annals_id = annals_create::<L>(&sides.store, &all).await;
    let (by_rusqlite, v1) = sides.rusqlite.load::<L>(rusqlite_id, with_snapshot).await;
    let (by_sqlx, v2) = sides.sqlx.load::<L>(sqlx_id, with_snapshot).await;
    let loaded = sides
        .store
        .begin_read_only()
        .load::<L>(annals_id)
        .await
        .unwrap();
    assert_eq!(loaded.totals(), by_rusqlite.totals());
    assert_eq!(loaded.totals(), by_sqlx.totals());
    assert_eq!(
        (loaded.version(), v1, v2),
        (events as u64, events as i64, events as i64)
    );
    let (r, a, s) = compare3(
        rounds,
        || {
            timed(async {
                for _ in 0..loads {
                    std::hint::black_box(
                        sides.rusqlite.load::<L>(rusqlite_id, with_snapshot).await,
                    );
                }
            })
        },
        || {
            timed(async {
                for _ in 0..loads {
                    std::hint::black_box(
                        sides
                            .store
                            .begin_read_only()
                            .load::<L>(annals_id)
                            .await
                            .unwrap(),
                    );
                }
            })
        },
        || {
            timed(async {
                for _ in 0..loads {
                    std::hint::black_box(sides.sqlx.load::<L>(sqlx_id, with_snapshot).await);
                }
            })
        },
    )
    .await;
    [r, a, s]
}

fn line(
    name: &'static str,
    what: String,
    measure: Measure,
    [raw, annals, sqlx]: [Duration; 3],
    goal: &'static str,
) -> Line {
    Line {
        row: Row {
            name,
            what,
            measure,
            raw,
            annals,
            goal,
        },
        sqlx: Some(sqlx),
    }
}

async fn run(synchronous: Synchronous) -> Vec<Line> {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("annals.db").display());
    let options = StoreOptions::new().synchronous(synchronous);
    let store = Store::open_with(&url, options.clone()).await.unwrap();
    let cached = Store::open_with(&url, options.aggregate_cache(10_000))
        .await
        .unwrap();
    let sides = Sides {
        store,
        cached,
        rusqlite: RawRusqlite::open(&dir.path().join("rusqlite.db"), synchronous).await,
        sqlx: RawSqlx::open(&dir.path().join("sqlx.db"), synchronous).await,
    };
    let rounds = size(9, 1);
    let mut lines = Vec::new();

    let n = size(400, 5);
    let times = commits(&sides, rounds, n, &[moved(1)]).await;
    let measure = Measure::Throughput { ops: n };
    lines.push(line(
        "W1",
        "one-event commits, sequential".into(),
        measure,
        times,
        ">= 0.9x",
    ));

    let n = size(250, 5);
    let [raw, plain, with_cache] = deposits(&sides, rounds, n).await;
    let measure = Measure::Throughput { ops: 8 * n };
    for (name, what, annals, goal) in [
        ("W2", "", plain, ""),
        ("W2c", ", cache", with_cache, ">= 0.95x"),
    ] {
        lines.push(Line {
            row: Row {
                name,
                what: format!("8 tasks x {n} deposits{what}, least SQL"),
                measure,
                raw,
                annals,
                goal,
            },
            sqlx: None,
        });
    }

    let n = size(100, 3);
    let hundred: Vec<Moved> = (0..100).map(moved).collect();
    let times = commits(&sides, rounds, n, &hundred).await;
    let measure = Measure::Throughput { ops: n };
    lines.push(line(
        "W3",
        "100-event commits, sequential".into(),
        measure,
        times,
        ">= 0.9x",
    ));

    let events = size(10_000, 300);
    let n = size(30, 2);
    let times = loads::<Ledger>(&sides, rounds, events, n).await;
    let what = format!("load a {events}-event aggregate");
    lines.push(line(
        "W4",
        what,
        Measure::Throughput { ops: n },
        times,
        ">= 0.9x",
    ));

    let events = size(10_050, 350);
    let n = size(2000, 5);
    let times = loads::<SnappedLedger>(&sides, rounds, events, n).await;
    let per_load = times.map(|t| t / n as u32);
    let what = format!("load {events} events, snapshot every 100");
    lines.push(line("W5", what, Measure::Time, per_load, "<= 1.1x"));

    sides.store.close().await;
    sides.cached.close().await;
    lines
}

fn print(synchronous: Synchronous, lines: &[Line]) {
    println!("\nannals on SQLite, synchronous={synchronous:?} (same process, schema and pragmas)");
    println!(
        "{:<4} {:<40} {:>16} {:>16} {:>7}  {:<8} {:>16} {:>9}",
        "", "workload", "raw rusqlite", "annals", "ratio", "goal", "raw sqlx", "vs sqlx"
    );
    for Line { row, sqlx } in lines {
        let (sqlx_figure, vs_sqlx) = match sqlx {
            Some(sqlx) => {
                let old = Row {
                    name: row.name,
                    what: String::new(),
                    measure: row.measure,
                    raw: *sqlx,
                    annals: row.annals,
                    goal: "",
                };
                // annals against sqlx, in the direction where higher is better.
                let ratio = match row.measure {
                    Measure::Throughput { .. } => old.ratio(),
                    Measure::Time => 1.0 / old.ratio(),
                };
                (figure(row.measure, *sqlx), format!("{ratio:>8.2}x"))
            }
            None => ("-".to_owned(), "-".to_owned()),
        };
        println!(
            "{:<4} {:<40} {:>16} {:>16} {:>6.2}x  {:<8} {:>16} {:>9}",
            row.name,
            row.what,
            figure(row.measure, row.raw),
            figure(row.measure, row.annals),
            row.ratio(),
            row.goal,
            sqlx_figure,
            vs_sqlx,
        );
    }
}

fn figure(measure: Measure, d: Duration) -> String {
    match measure {
        Measure::Throughput { ops } => format!("{:>9.0} ops/s", ops as f64 / d.as_secs_f64()),
        Measure::Time => format!("{:>9.3} ms   ", d.as_secs_f64() * 1e3),
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut all = Vec::new();
    for synchronous in [Synchronous::Full, Synchronous::Normal] {
        all.push((synchronous, run(synchronous).await));
    }
    for (synchronous, lines) in &all {
        print(*synchronous, lines);
    }
    println!(
        "\nratio: annals against raw rusqlite, throughput annals/raw for commits and loads \
         (higher is better), time annals/raw for W5 (lower is better); vs sqlx: annals' \
         speed-up over the same work on raw sqlx (the old store's level). Medians of rotating \
         rounds."
    );
}
