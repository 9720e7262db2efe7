//! What the benchmarks share: rounds of timed runs, alternating annals and the raw baseline so
//! both see the same machine state, and a table of ratios. Nothing here asserts on a time.

#![allow(dead_code)]

pub mod ledger;

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

/// True under `ANNALS_BENCH_QUICK=1`: tiny sizes, a smoke run of every code path.
pub fn quick() -> bool {
    std::env::var("ANNALS_BENCH_QUICK").is_ok_and(|v| v == "1")
}

/// `full` normally, `small` in a quick run.
pub fn size(full: usize, small: usize) -> usize {
    if quick() { small } else { full }
}

/// Whether a higher or a lower figure is better.
#[derive(Clone, Copy)]
pub enum Measure {
    /// Operations per second: the ratio is annals / raw, higher is better.
    Throughput { ops: usize },
    /// Time per run: the ratio is annals / raw, lower is better.
    Time,
}

pub struct Row {
    pub name: &'static str,
    pub what: String,
    pub measure: Measure,
    pub raw: Duration,
    pub annals: Duration,
    pub goal: &'static str,
}

impl Row {
    pub fn ratio(&self) -> f64 {
        let (raw, annals) = (self.raw.as_secs_f64(), self.annals.as_secs_f64());
        match self.measure {
            Measure::Throughput { .. } => raw / annals,
            Measure::Time => annals / raw,
        }
    }

    fn figure(&self, d: Duration) -> String {
        match self.measure {
            Measure::Throughput { ops } => format!("{:>10.0} ops/s", ops as f64 / d.as_secs_f64()),
            Measure::Time => format!("{:>10.2} ms   ", d.as_secs_f64() * 1e3),
        }
    }
}

/// Runs `raw` and `annals` alternately for `rounds` rounds and keeps each side's median time.
/// Each closure does one whole run of the workload and returns its own elapsed time, so set-up
/// work can stay outside the measurement.
pub async fn compare<R, A, RF, AF>(rounds: usize, mut raw: R, mut annals: A) -> (Duration, Duration)
where
    R: FnMut(usize) -> RF,
    A: FnMut(usize) -> AF,
    RF: Future<Output = Duration>,
    AF: Future<Output = Duration>,
{
    let mut raw_times = Vec::with_capacity(rounds);
    let mut annals_times = Vec::with_capacity(rounds);
    for round in 0..rounds {
        // Alternate which side goes first, so neither always runs on a warmer cache.
        if round % 2 == 0 {
            raw_times.push(raw(round).await);
            annals_times.push(annals(round).await);
        } else {
            annals_times.push(annals(round).await);
            raw_times.push(raw(round).await);
        }
    }
    (median(&mut raw_times), median(&mut annals_times))
}

/// A boxed run of one side, for [`compare_all`].
pub type Run<'a> = Box<dyn FnMut(usize) -> Pin<Box<dyn Future<Output = Duration> + 'a>> + 'a>;

/// [`compare`] for any number of sides: each round runs every side once, the first side of
/// the round rotating, and each side's median time is returned, in the order given.
pub async fn compare_all(rounds: usize, mut sides: Vec<Run<'_>>) -> Vec<Duration> {
    let n = sides.len();
    let mut times: Vec<Vec<Duration>> = vec![Vec::with_capacity(rounds); n];
    for round in 0..rounds {
        for turn in 0..n {
            let side = (round + turn) % n;
            times[side].push(sides[side](round).await);
        }
    }
    times.iter_mut().map(|t| median(t)).collect()
}

fn median(times: &mut [Duration]) -> Duration {
    times.sort();
    times.get(times.len() / 2).copied().unwrap_or_default()
}

/// Times one future.
pub async fn timed<F: Future<Output = ()>>(f: F) -> Duration {
    let start = Instant::now();
    f.await;
    start.elapsed()
}

pub fn print_table(title: &str, rows: &[Row]) {
    println!("\n{title}");
    println!(
        "{:<4} {:<44} {:>18} {:>18} {:>8}  goal",
        "", "workload", "raw sqlx", "annals", "ratio"
    );
    for row in rows {
        println!(
            "{:<4} {:<44} {:>18} {:>18} {:>7.2}x  {}",
            row.name,
            row.what,
            row.figure(row.raw),
            row.figure(row.annals),
            row.ratio(),
            row.goal
        );
    }
    println!(
        "\nratio: throughput annals/raw for commits and loads per second (higher is better), \
         time annals/raw for W5 (lower is better); medians of alternating rounds."
    );
}
