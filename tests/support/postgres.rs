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

    /// Whether the schema exists on the server.
    pub async fn exists(&self) -> bool {
        let raw = self.raw_pool().await;
        let exists = sqlx::query_scalar("SELECT to_regnamespace($1) IS NOT NULL")
            .bind(&self.name)
            .fetch_one(&raw)
            .await
            .expect("look the schema up");
        raw.close().await;
        exists
    }

    /// Creates the caller's own table `orders` (number, total) in this schema, for writes that
    /// commit together with a context's events; returns its qualified name.
    pub async fn orders_table(&self, raw: &sqlx::PgPool) -> String {
        let table = format!("{}.orders", self.name);
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "CREATE TABLE {table} (number text PRIMARY KEY, total bigint NOT NULL)"
        )))
        .execute(raw)
        .await
        .expect("create the orders table");
        table
    }

    /// `"{schema}".annals_{table}`.
    pub fn table(&self, table: &str) -> String {
        format!("\"{}\".annals_{table}", self.name)
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        clean_up(
            &self.url,
            format!(
                "SET lock_timeout = '5s'; DROP SCHEMA IF EXISTS \"{}\" CASCADE",
                self.name
            ),
        );
    }
}

/// Runs `sql` on a connection of its own, from a thread of its own: a `Drop` runs inside the
/// test's runtime, which cannot be blocked on. Failing to clean up never fails the test.
fn clean_up(url: &str, sql: String) {
    let url = url.to_owned();
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

/// A transaction on `raw` at the isolation `level` ("READ COMMITTED", "REPEATABLE READ",
/// "SERIALIZABLE"), before its first statement.
pub async fn begin_at(
    raw: &sqlx::PgPool,
    level: &str,
) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut tx = raw.begin().await.expect("begin a transaction");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SET TRANSACTION ISOLATION LEVEL {level}"
    )))
    .execute(&mut *tx)
    .await
    .expect("set the isolation level");
    tx
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

/// A database of its own, for tests that read database-wide statistics; dropped, with its
/// sessions, when this is dropped.
#[derive(Debug)]
pub struct Database {
    /// The URL of this database.
    pub url: String,
    pub name: String,
    admin_url: String,
}

impl Database {
    /// Creates a fresh database on the server of `admin_url`.
    pub async fn create(admin_url: &str) -> Database {
        use sqlx::Connection;
        let name = format!("annals_t_{}", uuid::Uuid::now_v7().simple());
        let mut conn = sqlx::PgConnection::connect(admin_url)
            .await
            .expect("connect to the server");
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .expect("create a database");
        let _ = conn.close().await;
        Database {
            url: with_database(admin_url, &name),
            name,
            admin_url: admin_url.to_owned(),
        }
    }

    /// The deadlocks PostgreSQL counted in this database. A session reports its counts when it
    /// ends, so this first waits (up to a minute) for every session of the database to end:
    /// close the stores on it before.
    pub async fn deadlocks(&self) -> i64 {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(&self.admin_url)
            .await
            .expect("connect to the server");
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let sessions: i64 =
                sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE datname = $1")
                    .bind(&self.name)
                    .fetch_one(&pool)
                    .await
                    .expect("count sessions");
            if sessions == 0 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{sessions} sessions of {} still open",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let deadlocks: i64 =
            sqlx::query_scalar("SELECT deadlocks FROM pg_stat_database WHERE datname = $1")
                .bind(&self.name)
                .fetch_one(&pool)
                .await
                .expect("read the database's statistics");
        pool.close().await;
        deadlocks
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        clean_up(
            &self.admin_url,
            format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        );
    }
}

/// `url` with its database name replaced by `database`.
fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let host_end = base
        .get(authority_start..)
        .and_then(|rest| rest.find('/'))
        .map_or(base.len(), |i| authority_start + i);
    let mut out = format!("{}/{database}", base.get(..host_end).unwrap_or(base));
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    out
}

/// `url` with its user replaced by `user` (no password: the test server trusts local users).
pub fn with_user(url: &str, user: &str) -> String {
    let scheme_end = url.find("://").map_or(0, |i| i + 3);
    let rest = url.get(scheme_end..).unwrap_or_default();
    let host = rest.split_once('@').map_or(rest, |(_, host)| host);
    format!("{}{user}@{host}", url.get(..scheme_end).unwrap_or_default())
}

/// A TCP proxy in front of the server that cuts one connection at the worst moment: when a
/// client sends bytes containing `marker`, it marks the connection cut, forwards those bytes,
/// waits for the server's answer (so the server has done what it was sent), and closes both
/// sides without passing the answer on. Later connections are forwarded untouched.
pub struct CuttingProxy {
    /// The server's URL, through the proxy.
    pub url: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for CuttingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl CuttingProxy {
    pub async fn start(url: &str, marker: &'static [u8]) -> CuttingProxy {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let (before, after) = url.split_once('@').expect("a URL with a user");
        let (server, path) = after.split_once('/').expect("a URL with a database");
        let server = server.to_owned();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let armed = Arc::new(AtomicBool::new(true));
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(upstream) = tokio::net::TcpStream::connect(&server).await else {
                    continue;
                };
                let armed = armed.clone();
                tokio::spawn(async move {
                    let cut = Arc::new(AtomicBool::new(false));
                    let (mut client_read, mut client_write) = client.into_split();
                    let (mut server_read, mut server_write) = upstream.into_split();
                    let to_server = {
                        let cut = cut.clone();
                        async move {
                            let mut buf = vec![0u8; 64 << 10];
                            loop {
                                let n = match client_read.read(&mut buf).await {
                                    Ok(0) | Err(_) => return,
                                    Ok(n) => n,
                                };
                                let chunk = &buf[..n];
                                let hit = chunk.windows(marker.len()).any(|w| w == marker);
                                if hit && armed.swap(false, Ordering::SeqCst) {
                                    cut.store(true, Ordering::SeqCst);
                                }
                                if server_write.write_all(chunk).await.is_err() {
                                    return;
                                }
                                if cut.load(Ordering::SeqCst) {
                                    // Keep the server side open until its answer came.
                                    std::future::pending::<()>().await;
                                }
                            }
                        }
                    };
                    let to_client = async move {
                        let mut buf = vec![0u8; 64 << 10];
                        loop {
                            let n = match server_read.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            if cut.load(Ordering::SeqCst) {
                                // The server answered: drop everything, answer unsent.
                                return;
                            }
                            if client_write.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    };
                    // Whichever direction ends, the connection ends.
                    tokio::select! {
                        () = to_server => {}
                        () = to_client => {}
                    }
                });
            }
        });
        CuttingProxy {
            url: format!("{before}@127.0.0.1:{port}/{path}"),
            task,
        }
    }
}
