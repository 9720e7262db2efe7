//! Opening a SQLite store's schema: the version check, the pending migrations in one
//! `BEGIN IMMEDIATE` transaction, the refusal of foreign tables, and the warm-up that writes
//! every registered type name. A read-only store only checks.

use rusqlite::{Connection, OptionalExtension, TransactionBehavior};

use super::Shared;
use super::names as type_names;
use super::render::{annals_tables, migrations_table};
use crate::error::{Error, Result};
use crate::registry::Registry;
use crate::store::StoreOptions;
use crate::store::sql::backend_error;
use crate::store::sql::migrate::{Dialect, check_read_only, plan_migrations};
use crate::store::sql::types::TypeKind;

/// Brings the schema to this library's version, or refuses: a schema newer than this library
/// ([`Error::SchemaTooNew`]), tables of another application under annals' names
/// ([`Error::ForeignTable`]), an outdated schema with migrations off or on a read-only store
/// ([`Error::Config`]). Nothing is written when it refuses.
pub(super) fn migrate(
    conn: &mut Connection,
    options: &StoreOptions,
    read_only: bool,
) -> Result<()> {
    let prefix = &options.table_prefix;
    let table = migrations_table(prefix);
    if read_only {
        let current = current_version(conn, &table)?;
        return check_read_only(Dialect::Sqlite, current, &table);
    }
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(backend_error)?;
    let current = current_version(&tx, &table)?;
    let pending = plan_migrations(Dialect::Sqlite, current, options, &table)?;
    if pending.is_empty() {
        return Ok(());
    }
    // Each migration records its own version.
    for migration in pending {
        tx.execute_batch(&migration.sql).map_err(backend_error)?;
        tracing::info!(version = migration.version, "applied SQLite migration");
    }
    tx.commit().map_err(backend_error)
}

/// The schema version recorded in `table`; 0 when there is no such table, after checking that
/// none of annals' tables exists without it (they would belong to another application).
fn current_version(conn: &Connection, table: &str) -> Result<i64> {
    if !table_exists(conn, table)? {
        let prefix = table.strip_suffix("schema_migrations").unwrap_or_default();
        for name in annals_tables(prefix).filter(|name| name != table) {
            if name_taken(conn, &name)? {
                return Err(Error::ForeignTable { table: name });
            }
        }
        return Ok(0);
    }
    conn.query_row(
        &format!("SELECT COALESCE(MAX(version), 0) FROM {table}"),
        [],
        |row| row.get(0),
    )
    .map_err(backend_error)
}

fn table_exists(conn: &Connection, name: &str) -> Result<bool> {
    named(
        conn,
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1",
        name,
    )
}

/// True when anything (table, index, view, trigger) has this name.
fn name_taken(conn: &Connection, name: &str) -> Result<bool> {
    named(conn, "SELECT 1 FROM sqlite_master WHERE name = ?1", name)
}

fn named(conn: &Connection, sql: &str, name: &str) -> Result<bool> {
    conn.prepare_cached(sql)
        .map_err(backend_error)?
        .query_row([name], |_| Ok(()))
        .optional()
        .map(|found| found.is_some())
        .map_err(backend_error)
}

/// The registered type names, to write at open.
#[derive(Debug)]
pub(super) struct TypeNames {
    aggregates: Vec<&'static str>,
    events: Vec<&'static str>,
}

impl TypeNames {
    pub fn of(registry: &Registry) -> TypeNames {
        TypeNames {
            aggregates: registry.aggregates().iter().map(|a| a.name).collect(),
            events: registry.events().iter().map(|e| e.name).collect(),
        }
    }
}

/// Writes every registered type name (unless read-only) and caches both type tables.
pub(super) fn warm_up(
    conn: &mut Connection,
    shared: &Shared,
    names: &TypeNames,
    read_only: bool,
) -> Result<()> {
    let (sql, cache) = (&shared.sql, &shared.types);
    if read_only {
        type_names::refresh(conn, sql, cache, TypeKind::Aggregate)?;
        type_names::refresh(conn, sql, cache, TypeKind::Event)?;
        return Ok(());
    }
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(backend_error)?;
    type_names::write(
        &tx,
        sql,
        cache,
        TypeKind::Aggregate,
        names.aggregates.iter().copied(),
    )?;
    type_names::write(
        &tx,
        sql,
        cache,
        TypeKind::Event,
        names.events.iter().copied(),
    )?;
    tx.commit().map_err(backend_error)
}
