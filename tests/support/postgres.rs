//! What the PostgreSQL tests share: the server from `DATABASE_URL`, and a fresh schema per test,
//! dropped when the test ends.

#![allow(dead_code)]

use std::time::Duration;

use annals::{Store, StoreOptions};

/// The server's URL, or `None` (with a notice) when `DATABASE_URL` is not set. With
/// `ANNALS_REQUIRE_POSTGRES=1`, a missing `DATABASE_URL` fails the test instead.
pub fn database_url() -> Option<String> {
    match std::env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            if std::env::var("ANNALS_REQUIRE_POSTGRES").as_deref() == Ok("1") {
                panic!("ANNALS_REQUIRE_POSTGRES=1 but DATABASE_URL is not set");
            }
            eprintln!("DATABASE_URL is not set: skipping this PostgreSQL test");
            None
        }
    }
}

/// A schema of its own for one test; dropped, with everything in it, when this is dropped.
#[derive(Debug)]
pub struct Schema {
    pub url: String,
    pub name: String,
}

impl Schema {
    pub fn new(url: &str) -> Schema {
        Schema {
            url: url.to_owned(),
            name: format!("t_{}", uuid::Uuid::now_v7().simple()),
        }
    }

    /// A schema with a short name (10 bytes), for tests of name lengths.
    pub fn short(url: &str) -> Schema {
        let id = uuid::Uuid::now_v7().simple().to_string();
        Schema {
            url: url.to_owned(),
            name: format!("t_{}", id.get(24..).unwrap_or(&id)),
        }
    }

    /// The options every test store starts from: this schema and a small pool, so ~25 tests
    /// in parallel stay well under the server's `max_connections`.
    pub fn options(&self) -> StoreOptions {
        StoreOptions::new().schema(&self.name).pool_size(4)
    }

    /// A store on this schema.
    pub async fn open(&self) -> Store {
        self.open_with(self.options()).await
    }

    pub async fn open_with(&self, options: StoreOptions) -> Store {
        Store::open_with(&self.url, options)
            .await
            .expect("open the PostgreSQL store")
    }

    /// A plain sqlx pool on the same database, for raw transactions and row checks.
    pub async fn raw_pool(&self) -> sqlx::PgPool {
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(3)
            .connect(&self.url)
            .await
            .expect("connect a raw pool")
    }

    /// `{schema}.annals_{table}`.
    pub fn table(&self, table: &str) -> String {
        format!("{}.annals_{table}", self.name)
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        let url = self.url.clone();
        let sql = format!(
            "SET lock_timeout = '5s'; DROP SCHEMA IF EXISTS {} CASCADE",
            self.name
        );
        // Drop runs inside the test's runtime, which cannot be blocked on: a thread of its own
        // does the clean-up. Failing to clean up never fails the test.
        let cleanup = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async move {
                use sqlx::Connection;
                let work = async {
                    let mut conn = sqlx::PgConnection::connect(&url).await?;
                    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                        .execute(&mut conn)
                        .await?;
                    conn.close().await
                };
                let _ = tokio::time::timeout(Duration::from_secs(15), work).await;
            });
        });
        let _ = cleanup.join();
    }
}

/// A fresh store on a schema of its own, or `None` when no server is configured.
pub async fn open_fresh() -> Option<(Store, Schema)> {
    let url = database_url()?;
    let schema = Schema::new(&url);
    let store = schema.open().await;
    Some((store, schema))
}

/// A fresh schema (not yet opened), or `None` when no server is configured.
pub fn fresh_schema() -> Option<Schema> {
    database_url().map(|url| Schema::new(&url))
}
