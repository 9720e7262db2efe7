//! Opening a PostgreSQL store's schema: migrations (under an advisory lock, so instances that
//! start together migrate once) and the warm-up that writes every registered type name.

use sqlx::AssertSqlSafe;
use sqlx::postgres::PgConnection;

use super::PostgresBackend;
use crate::error::Error;
use crate::error::Result;
use crate::registry::Registry;
use crate::store::sql::backend_error;
use crate::store::sql::migrate::{Dialect, check_read_only, plan_migrations};
use crate::store::sql::types::TypeKind;

impl PostgresBackend {
    /// Brings the schema to the current version, in one transaction under an advisory lock, so
    /// several instances starting at once migrate exactly once. A schema newer than this
    /// library is refused before anything is written. Each migration records its own version.
    pub(super) async fn migrate(&self) -> Result<()> {
        let mut tx = super::begin(&self.pool).await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1::text, 0))")
            .bind(&self.names.lock_key)
            .execute(&mut *tx)
            .await
            .map_err(backend_error)?;
        let (table, current) = self.schema_version(&mut tx).await?;
        if current == 0 {
            self.refuse_foreign_relations(&mut tx).await?;
        }
        let pending = plan_migrations(Dialect::Postgres, current, &self.options, &table)?;
        if pending.is_empty() {
            return Ok(());
        }
        for migration in pending {
            sqlx::raw_sql(AssertSqlSafe(migration.sql))
                .execute(&mut *tx)
                .await
                .map_err(backend_error)?;
            tracing::info!(
                version = migration.version,
                schema = %self.names.schema,
                prefix = %self.names.prefix,
                "applied PostgreSQL migration"
            );
        }
        tx.commit().await.map_err(backend_error)
    }

    /// Runs the feed-epoch check (`CHECK_EPOCH`): after a server start, records the server and
    /// starts the next epoch when the store was moved to a cluster whose transaction ids are
    /// behind; else changes nothing.
    pub(super) async fn check_epoch(&self, conn: &mut PgConnection) -> Result<()> {
        let (before, after): (Option<i32>, Option<i32>) =
            sqlx::query_as(AssertSqlSafe(self.sql.check_epoch.clone()))
                .fetch_one(&mut *conn)
                .await
                .map_err(backend_error)?;
        if let (Some(before), Some(after)) = (before, after)
            && after > before
        {
            tracing::warn!(
                schema = %self.names.schema,
                prefix = %self.names.prefix,
                epoch = after,
                "the stored transaction ids are ahead of this cluster's (a restore or a move to \
                 another cluster): new events go to a new feed epoch, after every stored event; \
                 saved feed cursors keep working"
            );
        }
        Ok(())
    }

    /// [`check_epoch`](PostgresBackend::check_epoch) on a connection of the pool.
    pub(super) async fn check_epoch_on_pool(&self) -> Result<()> {
        let mut conn = self.pool.acquire().await.map_err(backend_error)?;
        self.check_epoch(&mut conn).await
    }

    /// Writes every registered type name and caches the ids.
    pub(super) async fn warm_up(&self, registry: &Registry) -> Result<()> {
        let aggregates: Vec<&str> = registry.aggregates().iter().map(|a| a.name).collect();
        let events: Vec<&str> = registry.events().iter().map(|e| e.name).collect();
        let mut conn = self.pool.acquire().await.map_err(backend_error)?;
        self.check_epoch(&mut conn).await?;
        self.ensure_types(&mut conn, TypeKind::Aggregate, &aggregates)
            .await?;
        self.ensure_types(&mut conn, TypeKind::Event, &events)
            .await
            .map(drop)
    }

    /// What a read-only open does instead of migrating and warming up: reads the schema's
    /// version and both type tables, and writes nothing (no advisory lock either: a hot
    /// standby refuses exclusive locks).
    pub(super) async fn open_read_only(&self) -> Result<()> {
        let mut conn = self.pool.acquire().await.map_err(backend_error)?;
        let (table, current) = self.schema_version(&mut conn).await?;
        check_read_only(Dialect::Postgres, current, &table)?;
        self.refresh_types(&mut conn, TypeKind::Aggregate).await?;
        self.refresh_types(&mut conn, TypeKind::Event).await?;
        Ok(())
    }

    /// The migrations table's name, and the highest version it records (0 without the table).
    async fn schema_version(&self, conn: &mut PgConnection) -> Result<(String, i64)> {
        let table = self.names.table("schema_migrations");
        let exists: bool = sqlx::query_scalar("SELECT to_regclass($1::text) IS NOT NULL")
            .bind(&table)
            .fetch_one(&mut *conn)
            .await
            .map_err(backend_error)?;
        let current: i64 = if exists {
            sqlx::query_scalar(AssertSqlSafe(self.sql.schema_version.clone()))
                .fetch_one(&mut *conn)
                .await
                .map_err(backend_error)?
        } else {
            0
        };
        Ok((table, current))
    }

    /// Refuses a schema without annals' migrations table that already holds a relation under
    /// one of annals' names: another application's table is never adopted.
    async fn refuse_foreign_relations(&self, conn: &mut PgConnection) -> Result<()> {
        let found: Option<String> = sqlx::query_scalar(
            "SELECT c.relname::text FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = ANY($2::text[]) \
             ORDER BY c.relname LIMIT 1",
        )
        .bind(&self.names.schema)
        .bind(self.names.relations())
        .fetch_optional(&mut *conn)
        .await
        .map_err(backend_error)?;
        match found {
            Some(name) => Err(Error::ForeignTable {
                table: format!("{}.{name}", self.names.schema),
            }),
            None => Ok(()),
        }
    }
}
