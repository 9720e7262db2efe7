//! The PostgreSQL side of the shared type-name cache ([`crate::store::sql::types`]): writing
//! type names, and re-reading a type table when a row names an id this process has not seen.
//! Re-reads run over the connection the caller already holds, so a load never waits on a
//! second checkout from a pool it may have exhausted itself.

use std::sync::Arc;

use sqlx::AssertSqlSafe;
use sqlx::postgres::PgConnection;

use super::{PostgresBackend, query};
use crate::error::{Error, Result};
use crate::store::sql::backend_error;
use crate::store::sql::types::{TypeKind, TypeMap, distinct};

impl PostgresBackend {
    /// Re-reads the `kind` type table over `conn` and caches it.
    pub(super) async fn refresh_types(
        &self,
        conn: &mut PgConnection,
        kind: TypeKind,
    ) -> Result<Arc<TypeMap>> {
        let rows: Vec<(i32, String)> =
            sqlx::query_as(AssertSqlSafe(self.sql.read_types(kind).clone()))
                .fetch_all(&mut *conn)
                .await
                .map_err(backend_error)?;
        let map = TypeMap::from_rows(rows.into_iter().map(|(id, name)| (i64::from(id), name)));
        Ok(self.types.set(kind, map))
    }

    /// The `kind` map, re-read over `conn` when it lacks one of `ids`: another process may have
    /// added those types.
    pub(super) async fn types_with_ids(
        &self,
        conn: &mut PgConnection,
        kind: TypeKind,
        ids: impl Iterator<Item = i64>,
    ) -> Result<Arc<TypeMap>> {
        let map = self.types.get(kind);
        if map.has_ids(ids) {
            Ok(map)
        } else {
            self.refresh_types(conn, kind).await
        }
    }

    /// Writes the names among `names` that the table lacks, then re-reads it, all over `conn`
    /// in autocommit: a type name is harmless on its own, and must outlive any caller's
    /// transaction that would roll back.
    pub(super) async fn ensure_types(
        &self,
        conn: &mut PgConnection,
        kind: TypeKind,
        names: &[&str],
    ) -> Result<Arc<TypeMap>> {
        let unique = distinct(names.iter().copied());
        if !unique.is_empty() {
            query(self.sql.ensure_types(kind))
                .bind(unique)
                .execute(&mut *conn)
                .await
                .map_err(backend_error)?;
        }
        self.refresh_types(conn, kind).await
    }

    /// The id of a type name if it is in the table, re-read over `conn` on a miss (lookups never
    /// write types).
    pub(super) async fn known_type_id(
        &self,
        conn: &mut PgConnection,
        kind: TypeKind,
        name: &str,
    ) -> Result<Option<i32>> {
        let id = match self.types.get(kind).id(name) {
            Some(id) => Some(id),
            None => self.refresh_types(conn, kind).await?.id(name),
        };
        id.map(type_id_to_sql).transpose()
    }
}

/// A cached type id as the `int4` column holds it.
pub(super) fn type_id_to_sql(id: i64) -> Result<i32> {
    i32::try_from(id).map_err(|_| Error::Corrupt(format!("type id {id} does not fit an int4")))
}
