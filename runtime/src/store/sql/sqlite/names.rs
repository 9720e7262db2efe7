//! Type names and their ids on a SQLite connection: reading the two type tables into the
//! store's shared [`TypeCache`], writing names the tables lack, and resolving an id met in a row.
//!
//! Every function here works on the connection its caller already holds, so a miss never waits
//! for a second connection (a store with `pool_size(1)` cannot wait on itself).

use std::sync::Arc;

use rusqlite::Connection;

use super::render::Statements;
use crate::error::Result;
use crate::store::sql::backend_error;
use crate::store::sql::types::{TypeCache, TypeKind, TypeMap, distinct};

/// Re-reads one type table and replaces the cached map with it.
pub(super) fn refresh(
    conn: &Connection,
    sql: &Statements,
    cache: &TypeCache,
    kind: TypeKind,
) -> Result<Arc<TypeMap>> {
    let mut stmt = conn
        .prepare_cached(sql.all_types(kind))
        .map_err(backend_error)?;
    let rows = stmt
        .query_map([], |row| {
            Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?))
        })
        .map_err(backend_error)?
        .collect::<rusqlite::Result<Vec<_>>>()
        .map_err(backend_error)?;
    Ok(cache.set(kind, TypeMap::from_rows(rows)))
}

/// Writes each of `names` its table lacks, then re-reads the table. Runs in whatever
/// transaction the connection is in (none: each name commits on its own, which is harmless).
pub(super) fn write<'a>(
    conn: &Connection,
    sql: &Statements,
    cache: &TypeCache,
    kind: TypeKind,
    names: impl IntoIterator<Item = &'a str>,
) -> Result<Arc<TypeMap>> {
    let mut stmt = conn
        .prepare_cached(sql.insert_type(kind))
        .map_err(backend_error)?;
    for name in names {
        stmt.execute([name]).map_err(backend_error)?;
    }
    drop(stmt);
    refresh(conn, sql, cache, kind)
}

/// The map of `kind` holding every one of `names`, writing the missing ones first.
pub(super) fn ensure<'a>(
    conn: &Connection,
    sql: &Statements,
    cache: &TypeCache,
    kind: TypeKind,
    names: impl Iterator<Item = &'a str>,
) -> Result<Arc<TypeMap>> {
    let map = cache.get(kind);
    let missing = distinct(names.filter(|n| map.id(n).is_none()));
    if missing.is_empty() {
        return Ok(map);
    }
    write(conn, sql, cache, kind, missing)
}

/// Resolves type ids met in rows, re-reading a table once when an id is not in the cache (a
/// name another process wrote since).
pub(super) struct Resolver<'c> {
    conn: &'c Connection,
    sql: &'c Statements,
    cache: &'c TypeCache,
    aggregates: Arc<TypeMap>,
    events: Arc<TypeMap>,
}

impl<'c> Resolver<'c> {
    pub fn new(conn: &'c Connection, sql: &'c Statements, cache: &'c TypeCache) -> Self {
        Resolver {
            conn,
            sql,
            cache,
            aggregates: cache.get(TypeKind::Aggregate),
            events: cache.get(TypeKind::Event),
        }
    }

    fn map(&mut self, kind: TypeKind) -> &mut Arc<TypeMap> {
        match kind {
            TypeKind::Aggregate => &mut self.aggregates,
            TypeKind::Event => &mut self.events,
        }
    }

    /// The map of `kind`, re-read first when it lacks one of `ids`. An id still missing after
    /// the re-read is reported by the caller when it names the row (a corrupt row).
    pub fn map_with(
        &mut self,
        kind: TypeKind,
        ids: impl Iterator<Item = i64>,
    ) -> Result<Arc<TypeMap>> {
        if !self.map(kind).has_ids(ids) {
            let fresh = refresh(self.conn, self.sql, self.cache, kind)?;
            *self.map(kind) = fresh;
        }
        Ok(self.map(kind).clone())
    }

    /// The map of `kind`, re-read first when it lacks one of `names`.
    pub fn map_with_names<'n>(
        &mut self,
        kind: TypeKind,
        mut names: impl Iterator<Item = &'n str>,
    ) -> Result<Arc<TypeMap>> {
        if names.any(|name| self.map(kind).id(name).is_none()) {
            let fresh = refresh(self.conn, self.sql, self.cache, kind)?;
            *self.map(kind) = fresh;
        }
        Ok(self.map(kind).clone())
    }

    /// The id of type `name`, or `None` when the table does not hold it even after a re-read.
    pub fn id(&mut self, kind: TypeKind, name: &str) -> Result<Option<i64>> {
        if let Some(id) = self.map(kind).id(name) {
            return Ok(Some(id));
        }
        let fresh = refresh(self.conn, self.sql, self.cache, kind)?;
        *self.map(kind) = fresh;
        Ok(self.map(kind).id(name))
    }
}
