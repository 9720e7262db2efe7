//! Options a store is opened with.

use std::time::Duration;

use crate::error::{Error, Result};
use crate::subscription::InlineProjection;
use crate::subscription::inline::Inline;

/// SQLite's `synchronous` setting for the store file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Synchronous {
    /// Every commit is flushed to disk before it is acknowledged: an acknowledged commit
    /// survives a power loss. The default.
    #[default]
    Full,
    /// Faster commits; in WAL mode the database stays consistent, but the last commits before
    /// a power loss or OS crash may be lost even though they were acknowledged. A crash of the
    /// process alone loses nothing.
    Normal,
}

/// Where a PostgreSQL store listens for the commits of other processes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Listen {
    /// On a connection of its own, made with the store's connection settings. The default.
    #[default]
    Store,
    /// On a connection to this URL: the server itself or a session-mode pool, when the store
    /// connects through a transaction-mode pooler (pgbouncer, RDS Proxy, Supavisor), where a
    /// `LISTEN` would stay on a server connection that other clients' queries then use.
    Url(String),
    /// Not at all: waiters poll every [`StoreOptions::poll_interval`].
    Off,
}

/// How a store is opened. Every field has a default; set the ones you need.
///
/// ```
/// use annals::StoreOptions;
/// let options = StoreOptions::new().table_prefix("bank_").max_payload_bytes(1 << 20);
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct StoreOptions {
    /// Prepended to every table name; must match `[a-z_][a-z0-9_]{0,40}`. Default `annals_`.
    pub table_prefix: String,
    /// The largest encoded event, snapshot or metadata accepted; larger ones are refused with
    /// [`Error::PayloadTooLarge`] before anything is written. Default 16 MiB.
    pub max_payload_bytes: usize,
    /// The largest commit accepted: the payloads, metadata, snapshots and keys of all its
    /// events together. A larger one is refused with [`Error::CommitTooLarge`] before anything
    /// is sent. Default 960 MiB, under PostgreSQL's limit of 1 GiB on one message (which the
    /// PostgreSQL store also checks, counting its per-event overhead).
    pub max_commit_bytes: usize,
    /// SQLite: durability of commits. Default [`Synchronous::Full`].
    pub synchronous: Synchronous,
    /// SQLite: how long a connection waits for a lock held by another process. Default 5 s.
    pub busy_timeout: Duration,
    /// SQL stores: the most connections the store opens. Default 10 (SQLite: readers, besides
    /// its one writer).
    pub pool_size: u32,
    /// PostgreSQL: the schema the tables live in (created when missing). Default `public`.
    /// It must match `[a-z_][a-z0-9_]{0,40}` and not begin with `pg_`; it is always quoted, so
    /// reserved words such as `user` or `order` work.
    pub schema: Option<String>,
    /// SQL stores: connections the pool keeps open even when idle. Default 0.
    pub min_connections: u32,
    /// SQL stores: how long an operation waits for a free connection before it fails. Default
    /// 30 s.
    pub acquire_timeout: Duration,
    /// PostgreSQL: where to `LISTEN` for other processes' commits. Default [`Listen::Store`].
    pub listen: Listen,
    /// How often [`Store::wait_for_events`](crate::Store::wait_for_events) polls when no wake-up
    /// arrives. Default 500 ms.
    pub poll_interval: Duration,
    /// PostgreSQL: a feed held back longer than this by one open transaction is logged as a
    /// warning (at most once a minute). Default 30 s.
    pub hold_back_warning: Duration,
    /// Open the store to read only: loads, histories and the feed work, nothing is written (no
    /// migration, no type names), and every context is read-only ([`Error::ReadOnly`] on
    /// `apply`). For a role with only `SELECT` rights, or a PostgreSQL hot standby. Default
    /// false.
    pub read_only: bool,
    /// Apply migrations at open. When false, a store whose schema is not current is refused;
    /// apply [`migrations`](crate::migrations) yourself. Default true.
    pub migrate: bool,
    /// The longest natural key accepted, in bytes (UTF-8). Longer keys are refused with
    /// [`Error::InvalidKey`] before anything is read or written. Default 255; at most 2,048
    /// (PostgreSQL indexes keys, and an index entry has a size limit).
    pub max_key_bytes: usize,
    /// How many aggregates the store handle keeps in its aggregate cache; 0, the default,
    /// turns the cache off. See [`aggregate_cache`](StoreOptions::aggregate_cache).
    pub aggregate_cache: usize,
    /// The inline projections (see [`inline_projection`](StoreOptions::inline_projection)).
    pub(crate) inline: Inline,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            table_prefix: "annals_".to_owned(),
            max_payload_bytes: 16 << 20,
            max_commit_bytes: 960 << 20,
            synchronous: Synchronous::Full,
            busy_timeout: Duration::from_secs(5),
            pool_size: 10,
            schema: None,
            min_connections: 0,
            acquire_timeout: Duration::from_secs(30),
            listen: Listen::Store,
            poll_interval: Duration::from_millis(500),
            hold_back_warning: Duration::from_secs(30),
            migrate: true,
            read_only: false,
            max_key_bytes: 255,
            aggregate_cache: 0,
            inline: Inline::default(),
        }
    }
}

/// The largest [`StoreOptions::max_key_bytes`].
const MAX_KEY_BYTES: usize = 2048;

impl StoreOptions {
    /// The defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an inline projection: a read model updated in every commit's own transaction (see
    /// [`InlineProjection`]). A store without one commits as it always does.
    pub fn inline_projection(mut self, projection: impl InlineProjection) -> Self {
        self.inline = self.inline.with(std::sync::Arc::new(projection));
        self
    }

    /// Sets the table prefix.
    pub fn table_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.table_prefix = prefix.into();
        self
    }

    /// Sets the longest natural key accepted, in bytes (see
    /// [`max_key_bytes`](StoreOptions::max_key_bytes)).
    pub fn max_key_bytes(mut self, bytes: usize) -> Self {
        self.max_key_bytes = bytes;
        self
    }

    /// Sets the largest payload accepted.
    pub fn max_payload_bytes(mut self, max: usize) -> Self {
        self.max_payload_bytes = max;
        self
    }

    /// Sets the largest commit accepted.
    pub fn max_commit_bytes(mut self, max: usize) -> Self {
        self.max_commit_bytes = max;
        self
    }

    /// Sets SQLite's `synchronous` mode.
    pub fn synchronous(mut self, mode: Synchronous) -> Self {
        self.synchronous = mode;
        self
    }

    /// Sets SQLite's busy timeout.
    pub fn busy_timeout(mut self, timeout: Duration) -> Self {
        self.busy_timeout = timeout;
        self
    }

    /// Sets the connection pool's size. On PostgreSQL, up to half of it may stay checked out
    /// for a second between two loads, commits or reads, handed from one to the next (see the
    /// README, "Connections handed from one statement to the next").
    pub fn pool_size(mut self, size: u32) -> Self {
        self.pool_size = size;
        self
    }

    /// Sets the PostgreSQL schema.
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = Some(schema.into());
        self
    }

    /// Sets how many connections the pool keeps open when idle.
    pub fn min_connections(mut self, min: u32) -> Self {
        self.min_connections = min;
        self
    }

    /// Sets how long an operation waits for a free connection.
    pub fn acquire_timeout(mut self, timeout: Duration) -> Self {
        self.acquire_timeout = timeout;
        self
    }

    /// Sets where a PostgreSQL store listens for other processes' commits.
    pub fn listen(mut self, listen: Listen) -> Self {
        self.listen = listen;
        self
    }

    /// Sets the fallback poll interval of [`Store::wait_for_events`](crate::Store::wait_for_events).
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// Sets how long a hold-back of the feed lasts before it is logged.
    pub fn hold_back_warning(mut self, after: Duration) -> Self {
        self.hold_back_warning = after;
        self
    }

    /// Opens the store to read only.
    pub fn read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    /// Turns migrations at open on or off.
    pub fn migrate(mut self, migrate: bool) -> Self {
        self.migrate = migrate;
        self
    }

    /// Keeps the state of up to `entries` recently used aggregates in memory, so that loading
    /// one of them reads and applies only the events committed after the version it holds
    /// (still one round trip to the store, as a load without the cache). 0 turns it off (the
    /// default).
    ///
    /// **When to turn it on.** When the same aggregates are loaded again and again and have
    /// more than a few events: a command handler that loads an account, applies an event and
    /// commits spends most of its load decoding and applying the account's past events, unless
    /// snapshots keep that short. With the cache such a load decodes nothing it has seen. It
    /// does not help loads of aggregates seen once, and costs a copy of the state per load and
    /// per commit.
    ///
    /// **What it holds.** Aggregates whose state is `Clone` (`#[derive(Clone)]` beside
    /// `#[derive(Aggregate)]`; a hand-written `Clone` must make an equal copy): the cache hands
    /// every load a clone and keeps a clone of what a commit wrote. Cloning a state is cheaper
    /// than encoding and decoding it, and needs no serde. Other aggregates are loaded in full,
    /// as without the cache. The cache
    /// belongs to the store handle and is shared by its clones; two handles (two
    /// [`Store::open`](crate::Store::open) calls, two processes) have one each.
    ///
    /// **Memory.** At most `entries` states, each the size of the aggregate's state with what
    /// it owns on the heap, plus about 200 bytes of bookkeeping and its natural key. When full,
    /// the least recently used entries are evicted (CLOCK order).
    ///
    /// **Why it never returns stale state.** An entry is the state after exactly the first `n`
    /// committed events of an aggregate, and committed events never change: it comes from a
    /// full load, or from a commit the store acknowledged (the state the context loaded, with
    /// the events it committed applied). A load reads the aggregate's row and the events after
    /// `n` in one statement, so it sees everything committed before it, by this handle or any
    /// other. Commits still check versions in the store: a conflict fails as without the cache
    /// and evicts the aggregate, and a commit that fails or whose outcome is unknown never
    /// updates it, nor does a commit inside the caller's own transaction (`commit_in`,
    /// `commit_in_sqlite`), which the caller may still roll back. When the store holds fewer
    /// events than the entry (a database restored from a backup), the entry is evicted and the
    /// aggregate loaded in full. After restoring a backup over a store that other processes
    /// keep writing to, call [`Store::clear_aggregate_cache`](crate::Store::clear_aggregate_cache)
    /// (or restart): a restored history that has grown past an entry's version again cannot be
    /// told from the one the entry was built from.
    ///
    /// ```
    /// use annals::StoreOptions;
    /// let options = StoreOptions::new().aggregate_cache(10_000);
    /// ```
    pub fn aggregate_cache(mut self, entries: usize) -> Self {
        self.aggregate_cache = entries;
        self
    }

    pub(crate) fn validate(&self) -> Result<()> {
        check_identifier("table prefix", &self.table_prefix)?;
        if let Some(schema) = &self.schema {
            check_identifier("schema", schema)?;
            if schema.starts_with("pg_") {
                return Err(Error::Config(format!(
                    "invalid schema {schema:?}: PostgreSQL reserves schema names that begin \
                     with pg_"
                )));
            }
        }
        if self.pool_size == 0 {
            return Err(Error::Config("pool size must be at least 1".to_owned()));
        }
        // SQLite takes its busy timeout in milliseconds as an i32.
        if self.busy_timeout.as_millis() > i32::MAX as u128 {
            return Err(Error::Config(format!(
                "busy timeout {:?} is too long: at most {} ms (about 24 days)",
                self.busy_timeout,
                i32::MAX
            )));
        }
        // sqlx adds the acquire timeout to an Instant, which panics past what one can hold.
        if self.acquire_timeout > MAX_ACQUIRE_TIMEOUT {
            return Err(Error::Config(format!(
                "acquire timeout {:?} is too long: at most {:?} (one year)",
                self.acquire_timeout, MAX_ACQUIRE_TIMEOUT
            )));
        }
        if self.poll_interval.is_zero() {
            return Err(Error::Config(
                "poll interval must be longer than zero".to_owned(),
            ));
        }
        if self.min_connections > self.pool_size {
            return Err(Error::Config(format!(
                "min connections ({}) must not exceed the pool size ({})",
                self.min_connections, self.pool_size
            )));
        }
        if self.max_key_bytes == 0 || self.max_key_bytes > MAX_KEY_BYTES {
            return Err(Error::Config(format!(
                "max key bytes {} is out of range: 1 to {MAX_KEY_BYTES}",
                self.max_key_bytes
            )));
        }
        if self.max_commit_bytes == 0 {
            return Err(Error::Config(
                "max commit size must be at least 1 byte".to_owned(),
            ));
        }
        if self.max_payload_bytes == 0 {
            return Err(Error::Config(
                "max payload size must be at least 1 byte".to_owned(),
            ));
        }
        Ok(())
    }
}

/// The longest acquire timeout accepted: far below what an `Instant` can add.
const MAX_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// Checks an identifier against `[a-z_][a-z0-9_]{0,40}`: it is spliced into SQL text.
pub(crate) fn check_identifier(what: &str, ident: &str) -> Result<()> {
    let mut chars = ident.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
    let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if first_ok && rest_ok && ident.len() <= 41 {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "invalid {what} {ident:?}: it must match [a-z_][a-z0-9_]{{0,40}}"
        )))
    }
}
