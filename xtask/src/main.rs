//! Repository tasks, run as `cargo xtask <task>`.
//!
//! `cargo xtask build-cost [--smoke] [--runs N] [--aggregates N] [--events N]` measures what the
//! derives cost users at compile time. It generates one domain (N aggregates with M events
//! each, one module file per aggregate and its events) three times over, in a workspace of its
//! own under `target/build-cost/`:
//!
//! - **A**, with annals: `#[derive(Event)]`, `#[derive(Aggregate)]` and `Apply` impls;
//! - **B**, the same types with serde's derives only and the same apply methods;
//! - **C**, B plus the code a user would write by hand without annals: JSON encoding per
//!   event, a dispatch from a stored name to its apply method per aggregate, and the snapshot
//!   codec.
//!
//! It builds the three alternately, `--runs` times (5 by default), timing a clean build of
//! the domain crate, a rebuild after one event gains or loses a field, a rebuild after one
//! file is touched, and a clean `cargo check` (what an IDE runs); then it counts the functions
//! in each rlib, and prints the medians with A's ratio to C. Its dependencies are built once,
//! before the runs, and never timed. `--smoke` is a quick check that the whole thing works (a
//! domain of 2 × 2, one run): it fails when a build fails, never on a time.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant, SystemTime};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("build-cost") => build_cost(&args[1..]),
        _ => Err(
            "usage: cargo xtask build-cost [--smoke] [--runs N] [--aggregates N] \
                  [--events N]"
                .into(),
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The size of the generated domain, and how many times each variant is measured.
#[derive(Debug, Clone, Copy)]
struct Settings {
    aggregates: usize,
    events: usize,
    runs: usize,
}

fn parse(args: &[String]) -> Result<Settings> {
    let mut settings = Settings {
        aggregates: 50,
        events: 10,
        runs: 5,
    };
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut number = |what: &str| -> Result<usize> {
            let value = args.next().ok_or(format!("{what} takes a number"))?;
            let n: usize = value.parse().map_err(|_| format!("{what} {value:?}"))?;
            if n == 0 {
                return Err(format!("{what} must be at least 1").into());
            }
            Ok(n)
        };
        match arg.as_str() {
            "--smoke" => {
                settings = Settings {
                    aggregates: 2,
                    events: 2,
                    runs: 1,
                }
            }
            "--runs" => settings.runs = number("--runs")?,
            "--aggregates" => settings.aggregates = number("--aggregates")?,
            "--events" => settings.events = number("--events")?,
            other => return Err(format!("unknown argument {other:?}").into()),
        }
    }
    Ok(settings)
}

/// The three builds of the domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    Annals,
    Serde,
    HandWritten,
}

const VARIANTS: [Variant; 3] = [Variant::Annals, Variant::Serde, Variant::HandWritten];

impl Variant {
    fn package(self) -> &'static str {
        match self {
            Variant::Annals => "domain-a",
            Variant::Serde => "domain-b",
            Variant::HandWritten => "domain-c",
        }
    }

    fn dir(self) -> &'static str {
        match self {
            Variant::Annals => "a",
            Variant::Serde => "b",
            Variant::HandWritten => "c",
        }
    }

    fn title(self) -> &'static str {
        match self {
            Variant::Annals => "annals (A)",
            Variant::Serde => "serde only (B)",
            Variant::HandWritten => "hand-written (C)",
        }
    }
}

/// What is measured, in the order printed.
const STEPS: [&str; 4] = [
    "clean build of the domain crate",
    "rebuild after changing one event's field",
    "rebuild after touching one file",
    "clean `cargo check` (what an IDE runs)",
];

fn build_cost(args: &[String]) -> Result<()> {
    let settings = parse(args)?;
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or("xtask is not inside the repository")?
        .to_path_buf();
    let name = format!("{}x{}", settings.aggregates, settings.events);
    let root = repo.join("target").join("build-cost").join(name);
    generate(&root, &repo, settings)?;
    println!(
        "build cost: {} aggregates x {} events, {} run(s), dev profile, in {}",
        settings.aggregates,
        settings.events,
        settings.runs,
        root.display()
    );

    // Dependencies once, untimed.
    for variant in VARIANTS {
        cargo(&root, &["build", "--package", variant.package()])?;
        cargo(&root, &["check", "--package", variant.package()])?;
    }

    // times[variant][step][run]
    let mut times = vec![vec![Vec::new(); STEPS.len()]; VARIANTS.len()];
    // Whether each variant's first event has its extra field now: each rebuild flips it.
    let mut fields = [false; VARIANTS.len()];
    for run in 0..settings.runs {
        // Alternate the order, so that no variant always runs first on a cold cache.
        let mut order = VARIANTS;
        order.rotate_left(run % VARIANTS.len());
        for variant in order {
            let index = VARIANTS
                .iter()
                .position(|v| *v == variant)
                .unwrap_or_default();
            let package = variant.package();
            let slot = &mut times[index];

            cargo(&root, &["clean", "--package", package])?;
            slot[0].push(timed(&root, &["build", "--package", package])?);

            let field = &mut fields[index];
            *field = !*field;
            write_module(&root, variant, 0, settings.events, *field)?;
            slot[1].push(timed(&root, &["build", "--package", package])?);

            let touched = module_path(&root, variant, settings.aggregates.min(2) - 1);
            std::fs::File::options()
                .write(true)
                .open(&touched)?
                .set_modified(SystemTime::now())?;
            slot[2].push(timed(&root, &["build", "--package", package])?);

            cargo(&root, &["clean", "--package", package])?;
            slot[3].push(timed(&root, &["check", "--package", package])?);
        }
    }
    for variant in VARIANTS {
        cargo(&root, &["build", "--package", variant.package()])?;
    }
    let functions: Vec<Option<usize>> = VARIANTS
        .iter()
        .map(|v| count_functions(&root, *v))
        .collect();
    print!("{}", report(&times, &functions));
    Ok(())
}

fn report(times: &[Vec<Vec<Duration>>], functions: &[Option<usize>]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n{:<44}{:>14}{:>16}{:>18}{:>9}{:>10}",
        "medians",
        VARIANTS[0].title(),
        VARIANTS[1].title(),
        VARIANTS[2].title(),
        "A/C",
        "A-C"
    );
    for (step, title) in STEPS.iter().enumerate() {
        let medians: Vec<f64> = times
            .iter()
            .map(|v| median(&v[step]).as_secs_f64())
            .collect();
        let (a, b, c) = (medians[0], medians[1], medians[2]);
        let _ = writeln!(
            out,
            "{title:<44}{a:>12.2} s{b:>14.2} s{c:>16.2} s{:>8.2}x{:>+8.2} s",
            a / c,
            a - c
        );
    }
    let shown: Vec<String> = functions
        .iter()
        .map(|f| f.map_or_else(|| "n/a".to_owned(), |n| n.to_string()))
        .collect();
    let _ = writeln!(
        out,
        "{:<44}{:>14}{:>16}{:>18}",
        "functions in the rlib", shown[0], shown[1], shown[2]
    );
    let _ = writeln!(
        out,
        "\ngoals: A/C <= 1.10 on the clean build and on `cargo check`; the rebuild after one \
         event's field changes at most C + 0.5 s"
    );
    out
}

fn median(samples: &[Duration]) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    sorted.get(sorted.len() / 2).copied().unwrap_or_default()
}

/// Runs cargo in the generated workspace; a failure is an error with cargo's output.
fn cargo(root: &Path, args: &[&str]) -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = Command::new(cargo)
        .args(args)
        .arg("--quiet")
        .current_dir(root)
        .env("CARGO_TARGET_DIR", root.join("target"))
        .env_remove("RUSTC_WRAPPER")
        .output()?;
    if !output.status.success() {
        return Err(format!(
            "cargo {} failed in {}:\n{}",
            args.join(" "),
            root.display(),
            String::from_utf8_lossy(&output.stderr)
        )
        .into());
    }
    Ok(())
}

fn timed(root: &Path, args: &[&str]) -> Result<Duration> {
    let start = Instant::now();
    cargo(root, args)?;
    Ok(start.elapsed())
}

/// The functions defined in a variant's rlib, counted with `nm`; `None` without `nm`.
fn count_functions(root: &Path, variant: Variant) -> Option<usize> {
    let rlib = root
        .join("target")
        .join("debug")
        .join(format!("lib{}.rlib", variant.package().replace('-', "_")));
    let output = Command::new("nm")
        .arg("--defined-only")
        .arg(&rlib)
        .output()
        .ok()?;
    if !output.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&output.stdout);
    Some(
        text.lines()
            .filter(|l| matches!(l.split_whitespace().nth(1), Some("T" | "t")))
            .count(),
    )
}

/// Writes the generated workspace (the three crates), keeping a lock file already there.
fn generate(root: &Path, repo: &Path, settings: Settings) -> Result<()> {
    std::fs::create_dir_all(root)?;
    let runtime = repo.join("runtime");
    write_if_changed(
        &root.join("Cargo.toml"),
        &format!(
            "[workspace]\nmembers = [\"a\", \"b\", \"c\"]\nresolver = \"3\"\n\n\
             [workspace.dependencies]\n\
             annals = {{ path = {:?}, default-features = false, features = [\"memory\"] }}\n\
             serde = {{ version = \"1.0\", features = [\"derive\"] }}\n\
             serde_json = \"1.0\"\n",
            runtime.display().to_string()
        ),
    )?;
    let lock = root.join("Cargo.lock");
    if !lock.exists() {
        // The repository's versions, so that the measurement needs no resolution of its own.
        std::fs::copy(repo.join("Cargo.lock"), &lock)?;
    }
    for variant in VARIANTS {
        let dir = root.join(variant.dir());
        std::fs::create_dir_all(dir.join("src"))?;
        let annals = if variant == Variant::Annals {
            "annals = { workspace = true }\n"
        } else {
            ""
        };
        let json = if variant == Variant::HandWritten {
            "serde_json = { workspace = true }\n"
        } else {
            ""
        };
        write_if_changed(
            &dir.join("Cargo.toml"),
            &format!(
                "[package]\nname = \"{}\"\nversion = \"0.0.0\"\nedition = \"2024\"\n\
                 publish = false\n\n[dependencies]\n{annals}serde = {{ workspace = true }}\n\
                 {json}",
                variant.package()
            ),
        )?;
        let mut lib = String::from("//! A generated domain (see xtask/src/main.rs).\n\n");
        if variant == Variant::HandWritten {
            lib.push_str(HAND_WRITTEN_ERROR);
        }
        for a in 0..settings.aggregates {
            let _ = writeln!(lib, "pub mod agg_{a:03};");
        }
        write_if_changed(&dir.join("src").join("lib.rs"), &lib)?;
        for a in 0..settings.aggregates {
            write_module(root, variant, a, settings.events, false)?;
        }
    }
    Ok(())
}

/// The hand-written variant's error for a stored event it cannot apply.
const HAND_WRITTEN_ERROR: &str = "\
#[derive(Debug)]
pub enum StoredError {
    Unknown(String),
    Json(serde_json::Error),
}

impl From<serde_json::Error> for StoredError {
    fn from(e: serde_json::Error) -> Self {
        StoredError::Json(e)
    }
}

";

fn module_path(root: &Path, variant: Variant, aggregate: usize) -> PathBuf {
    root.join(variant.dir())
        .join("src")
        .join(format!("agg_{aggregate:03}.rs"))
}

/// Writes one aggregate's module; `extra_field` gives its first event one more field.
fn write_module(
    root: &Path,
    variant: Variant,
    aggregate: usize,
    events: usize,
    extra_field: bool,
) -> Result<()> {
    let a = aggregate;
    let mut out = String::new();
    out.push_str("use serde::{Deserialize, Serialize};\n");
    if variant == Variant::Annals {
        out.push_str("use annals::prelude::*;\n");
    }
    let event_names: Vec<String> = (0..events).map(|e| format!("E{a}x{e}")).collect();
    for (e, ty) in event_names.iter().enumerate() {
        out.push('\n');
        if variant == Variant::Annals {
            let _ = writeln!(
                out,
                "#[derive(Event, Serialize, Deserialize, Debug, Clone)]\n\
                 #[event(name = \"agg_{a}.event_{e}\")]"
            );
        } else {
            out.push_str("#[derive(Serialize, Deserialize, Debug, Clone)]\n");
        }
        let extra = if extra_field && e == 0 {
            "    pub flag: bool,\n"
        } else {
            ""
        };
        let _ = writeln!(
            out,
            "pub struct {ty} {{\n    pub id: u64,\n    pub note: String,\n    pub amount: i64,\n{extra}}}"
        );
        if variant == Variant::HandWritten {
            let _ = writeln!(
                out,
                "\nimpl {ty} {{\n    pub const NAME: &'static str = \"agg_{a}.event_{e}\";\n\n\
                 \x20   pub fn encode(&self) -> Result<Vec<u8>, serde_json::Error> {{\n\
                 \x20       serde_json::to_vec(self)\n    }}\n}}"
            );
        }
    }
    let state = format!("Agg{a}");
    out.push('\n');
    if variant == Variant::Annals {
        let _ = writeln!(
            out,
            "#[derive(Aggregate, Serialize, Deserialize, Default, Debug)]\n\
             #[aggregate(name = \"agg_{a}\", events({}), snapshot_every = 100)]",
            event_names.join(", ")
        );
    } else {
        out.push_str("#[derive(Serialize, Deserialize, Default, Debug)]\n");
    }
    let _ = writeln!(
        out,
        "pub struct {state} {{\n    pub count: u64,\n    pub total: i64,\n    pub last: String,\n}}"
    );
    for (e, ty) in event_names.iter().enumerate() {
        let body = format!(
            "        self.count += 1;\n        self.total += event.amount * {};\n        \
             self.last = event.note.clone();",
            e + 1
        );
        if variant == Variant::Annals {
            let _ = writeln!(
                out,
                "\nimpl Apply<{ty}> for {state} {{\n    fn apply(&mut self, event: &{ty}) {{\n\
                 {body}\n    }}\n}}"
            );
        } else {
            let _ = writeln!(
                out,
                "\nimpl {state} {{\n    pub fn apply_{}(&mut self, event: &{ty}) {{\n{body}\n    }}\n}}",
                ty.to_lowercase()
            );
        }
    }
    if variant == Variant::HandWritten {
        let arms: String = event_names
            .iter()
            .map(|ty| {
                format!(
                    "            {ty}::NAME => {{\n                let event: {ty} = \
                     serde_json::from_slice(payload)?;\n                self.apply_{}(&event);\n\
                     \x20           }}\n",
                    ty.to_lowercase()
                )
            })
            .collect();
        let _ = writeln!(
            out,
            "\nimpl {state} {{\n\
             \x20   pub fn apply_stored(&mut self, name: &str, payload: &[u8]) -> Result<(), crate::StoredError> {{\n\
             \x20       match name {{\n{arms}\
             \x20           other => return Err(crate::StoredError::Unknown(other.to_owned())),\n\
             \x20       }}\n        Ok(())\n    }}\n\n\
             \x20   pub fn encode_snapshot(&self) -> Result<Vec<u8>, serde_json::Error> {{\n\
             \x20       serde_json::to_vec(self)\n    }}\n\n\
             \x20   pub fn decode_snapshot(payload: &[u8]) -> Result<Self, serde_json::Error> {{\n\
             \x20       serde_json::from_slice(payload)\n    }}\n}}"
        );
    }
    write_if_changed(&module_path(root, variant, aggregate), &out)
}

/// Writes `text` to `path` unless the file holds it already (so a rerun rebuilds nothing).
fn write_if_changed(path: &Path, text: &str) -> Result<()> {
    if std::fs::read_to_string(path).is_ok_and(|old| old == text) {
        return Ok(());
    }
    std::fs::write(path, text)?;
    Ok(())
}
