//! Schema migrations of both SQL stores: plain `.sql` files, one per version and dialect,
//! embedded in the binary.
//!
//! Every migration's SQL records its own version in `{prefix}schema_migrations` (it creates that
//! table if needed and inserts its row), so SQL applied by hand, from
//! [`migrations`], counts exactly as SQL applied at open: a store's code only reads the highest
//! version recorded and runs the files above it.

use crate::error::{Error, Result};
use crate::store::StoreOptions;

/// A SQL database annals can store events in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Dialect {
    /// SQLite 3.
    Sqlite,
    /// PostgreSQL 13 or newer.
    Postgres,
}

/// One schema migration, as SQL text ready to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migration {
    /// The schema version this migration brings the store to.
    pub version: i64,
    /// A short description.
    pub name: &'static str,
    /// The statements, with the table prefix (and PostgreSQL schema) filled in.
    pub sql: String,
}

struct MigrationSource {
    version: i64,
    name: &'static str,
    sql: &'static str,
}

const SQLITE_MIGRATIONS: &[MigrationSource] = &[
    MigrationSource {
        version: 1,
        name: "initial schema",
        sql: include_str!("../../migrations/sqlite/0001_initial.sql"),
    },
    MigrationSource {
        version: 2,
        name: "durable subscriptions",
        sql: include_str!("../../migrations/sqlite/0002_subscriptions.sql"),
    },
    MigrationSource {
        version: 3,
        name: "pruning and erasure",
        sql: include_str!("../../migrations/sqlite/0003_erasure.sql"),
    },
];

const POSTGRES_MIGRATIONS: &[MigrationSource] = &[
    MigrationSource {
        version: 1,
        name: "initial schema",
        sql: include_str!("../../migrations/postgres/0001_initial.sql"),
    },
    MigrationSource {
        version: 2,
        name: "feed epochs",
        sql: include_str!("../../migrations/postgres/0002_feed_epochs.sql"),
    },
    MigrationSource {
        version: 3,
        name: "durable subscriptions",
        sql: include_str!("../../migrations/postgres/0003_subscriptions.sql"),
    },
    MigrationSource {
        version: 4,
        name: "pruning and erasure",
        sql: include_str!("../../migrations/postgres/0004_erasure.sql"),
    },
];

/// Every migration for `dialect`, oldest first, rendered for `options` (table prefix, schema):
/// for users who apply migrations by hand and open the store with
/// [`StoreOptions::migrate`]`(false)`.
///
/// ```
/// use annals::{migrations, Dialect, StoreOptions};
/// let sql = migrations(Dialect::Sqlite, &StoreOptions::new().table_prefix("bank_")).unwrap();
/// assert!(sql[0].sql.contains("CREATE TABLE IF NOT EXISTS bank_events"));
/// ```
pub fn migrations(dialect: Dialect, options: &StoreOptions) -> Result<Vec<Migration>> {
    options.validate()?;
    // Quoted: a valid identifier may still be a reserved word (`user`, `order`).
    let schema = format!("\"{}\"", options.schema.as_deref().unwrap_or("public"));
    Ok(sources(dialect)
        .iter()
        .map(|m| Migration {
            version: m.version,
            name: m.name,
            sql: render(m.sql, &options.table_prefix, &schema),
        })
        .collect())
}

fn sources(dialect: Dialect) -> &'static [MigrationSource] {
    match dialect {
        Dialect::Sqlite => SQLITE_MIGRATIONS,
        Dialect::Postgres => POSTGRES_MIGRATIONS,
    }
}

/// The migration templates of `dialect`, with `{prefix}` and `{schema}` still in them: a store
/// scans them for the names it will create.
pub(crate) fn templates(dialect: Dialect) -> impl Iterator<Item = &'static str> {
    sources(dialect).iter().map(|m| m.sql)
}

/// The newest schema version this library knows for `dialect`.
pub(crate) fn latest_version(dialect: Dialect) -> i64 {
    sources(dialect)
        .iter()
        .map(|m| m.version)
        .max()
        .unwrap_or(0)
}

/// The migrations to apply to a store whose schema is at version `current` (`location` names
/// its tables in messages): none when it is current, the newer ones when `options.migrate` is
/// on. A schema newer than this library, or an outdated one with migrations off, is refused
/// before anything is written.
pub(crate) fn plan_migrations(
    dialect: Dialect,
    current: i64,
    options: &StoreOptions,
    location: &str,
) -> Result<Vec<Migration>> {
    let latest = latest_version(dialect);
    if current > latest {
        return Err(Error::SchemaTooNew {
            found: current,
            supported: latest,
        });
    }
    if current == latest {
        return Ok(Vec::new());
    }
    if !options.migrate {
        return Err(Error::Config(format!(
            "the store's schema ({location}) is at version {current}, this annals needs \
             {latest}, and migrations at open are off: apply \
             annals::migrations(Dialect::{dialect:?}, &options)"
        )));
    }
    Ok(migrations(dialect, options)?
        .into_iter()
        .filter(|m| m.version > current)
        .collect())
}

/// Checks that a store opened read-only is at the schema version this library needs: it
/// cannot migrate. `location` names its migrations table in messages.
pub(crate) fn check_read_only(dialect: Dialect, current: i64, location: &str) -> Result<()> {
    let latest = latest_version(dialect);
    if current > latest {
        return Err(Error::SchemaTooNew {
            found: current,
            supported: latest,
        });
    }
    if current < latest {
        return Err(Error::Config(format!(
            "the store's schema ({location}) is at version {current}, this annals needs \
             {latest}, and a read-only store cannot migrate it: open it read-write once, or \
             apply annals::migrations(Dialect::{dialect:?}, &options)"
        )));
    }
    Ok(())
}

/// Fills `{prefix}` and `{schema}` into SQL text. Both are validated identifiers
/// ([`StoreOptions::validate`]); values are always bound as parameters, never rendered.
pub(crate) fn render(sql: &str, prefix: &str, schema: &str) -> String {
    sql.replace("{prefix}", prefix).replace("{schema}", schema)
}
