//! Marks the tests that need a server as ignored when none is configured, so such a run
//! reports them as "ignored", not "passed":
//!
//! - `annals_skip_postgres`: no `DATABASE_URL` (and not `ANNALS_REQUIRE_POSTGRES=1`);
//! - `annals_skip_pgbouncer`, `annals_skip_pgbouncer_old`: no `ANNALS_PGBOUNCER`, no
//!   `ANNALS_PGBOUNCER_OLD` (and not `ANNALS_REQUIRE_PGBOUNCER=1`).
//!
//! CI sets the `REQUIRE` variables: there every such test runs, and a missing server fails it.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    skip_unless(
        "annals_skip_postgres",
        "DATABASE_URL",
        "ANNALS_REQUIRE_POSTGRES",
    );
    skip_unless(
        "annals_skip_pgbouncer",
        "ANNALS_PGBOUNCER",
        "ANNALS_REQUIRE_PGBOUNCER",
    );
    skip_unless(
        "annals_skip_pgbouncer_old",
        "ANNALS_PGBOUNCER_OLD",
        "ANNALS_REQUIRE_PGBOUNCER",
    );
}

/// Sets `cfg(name)` when `var` is unset or empty and `require` is not `1`.
fn skip_unless(name: &str, var: &str, require: &str) {
    println!("cargo::rustc-check-cfg=cfg({name})");
    println!("cargo::rerun-if-env-changed={var}");
    println!("cargo::rerun-if-env-changed={require}");
    let configured = std::env::var(var).is_ok_and(|value| !value.is_empty());
    let required = std::env::var(require).as_deref() == Ok("1");
    if !configured && !required {
        println!("cargo::rustc-cfg={name}");
    }
}
