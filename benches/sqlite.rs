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
//! - W3: sequential commits, each creating an aggregate with 100 events.
//! - W4: loading one 10,000-event aggregate (rows read, payloads decoded, state folded).
//! - W5: the same aggregate with a snapshot every 100 events: snapshot plus 50 events.

#[path = "harness/mod.rs"]
mod harness;
#[path = "sqlite_raw/rusqlite.rs"]
mod raw_rusqlite;
#[path = "sqlite_raw/sqlx.rs"]
mod raw_sqlx;

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
    sqlx: Duration,
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
        sqlx,
    }
}

async fn run(synchronous: Synchronous) -> Vec<Line> {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_with(
        &format!("sqlite://{}", dir.path().join("annals.db").display()),
        StoreOptions::new().synchronous(synchronous),
    )
    .await
    .unwrap();
    let sides = Sides {
        store,
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
    lines
}

fn print(synchronous: Synchronous, lines: &[Line]) {
    println!("\nannals on SQLite, synchronous={synchronous:?} (same process, schema and pragmas)");
    println!(
        "{:<4} {:<40} {:>16} {:>16} {:>7}  {:<8} {:>16} {:>9}",
        "", "workload", "raw rusqlite", "annals", "ratio", "goal", "raw sqlx", "vs sqlx"
    );
    for Line { row, sqlx } in lines {
        let old = Row {
            name: row.name,
            what: String::new(),
            measure: row.measure,
            raw: *sqlx,
            annals: row.annals,
            goal: "",
        };
        println!(
            "{:<4} {:<40} {:>16} {:>16} {:>6.2}x  {:<8} {:>16} {:>8.2}x",
            row.name,
            row.what,
            figure(row.measure, row.raw),
            figure(row.measure, row.annals),
            row.ratio(),
            row.goal,
            figure(row.measure, *sqlx),
            // annals against sqlx, in the direction where higher is better.
            match row.measure {
                Measure::Throughput { .. } => old.ratio(),
                Measure::Time => 1.0 / old.ratio(),
            },
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
