//! Store URLs and connections: what `sqlite://path`, `sqlite::memory:` and their query
//! parameters mean, and how a writer or reader connection is opened and set up (WAL,
//! `synchronous`, `busy_timeout`, foreign keys, the statement cache).

use std::path::PathBuf;

use rusqlite::{Connection, OpenFlags};

use crate::error::{Error, Result};
use crate::store::sql::backend_error;
use crate::store::{StoreOptions, Synchronous};

/// Prepared statements kept per connection: the fixed statements plus the event INSERT shapes
/// of recent commits (one per distinct chunk length).
const STATEMENT_CACHE: usize = 64;

/// Where a store's database lives, parsed from its URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Location {
    /// A file, created when missing unless the store is read-only.
    File(PathBuf),
    /// A private in-memory database: one connection serves every call.
    Memory,
}

/// A parsed store URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Target {
    pub location: Location,
    /// `?mode=ro`, or [`StoreOptions::read_only`]: open without writing anything.
    pub read_only: bool,
}

/// Parses `sqlite://path`, `sqlite:path`, `sqlite::memory:` and an optional `?mode=` (`ro`,
/// `rw`, `rwc` or `memory`). Any other parameter is refused, so a typo is not ignored.
pub(super) fn parse(url: &str, options: &StoreOptions) -> Result<Target> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .ok_or_else(|| Error::Config(format!("invalid SQLite URL {url:?}: expected sqlite://…")))?;
    let (path, query) = match rest.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (rest, None),
    };
    let mut memory = path == ":memory:";
    let mut read_only = options.read_only;
    for pair in query.into_iter().flat_map(|q| q.split('&')) {
        match pair.split_once('=') {
            Some(("mode", "ro")) => read_only = true,
            Some(("mode", "rw" | "rwc")) => {}
            Some(("mode", "memory")) => memory = true,
            _ => {
                return Err(Error::Config(format!(
                    "invalid SQLite URL {url:?}: unknown parameter {pair:?} (known: mode=ro|rw|rwc|memory)"
                )));
            }
        }
    }
    if memory {
        return Ok(Target {
            location: Location::Memory,
            read_only,
        });
    }
    if path.is_empty() {
        return Err(Error::Config(format!(
            "invalid SQLite URL {url:?}: no file path"
        )));
    }
    Ok(Target {
        location: Location::File(PathBuf::from(path)),
        read_only,
    })
}

/// The connection commits run on; for an in-memory store, the only connection. A read-only
/// store's "writer" is a read-only connection that serves the open checks and nothing else.
pub(super) fn open_writer(target: &Target, options: &StoreOptions) -> Result<Connection> {
    let conn = match &target.location {
        Location::Memory => Connection::open_in_memory(),
        Location::File(path) if target.read_only => Connection::open_with_flags(path, read_flags()),
        Location::File(path) => Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        ),
    }
    .map_err(backend_error)?;
    set_up(&conn, options)?;
    if matches!(target.location, Location::File(_)) && !target.read_only {
        // WAL: readers never block the writer, and the writer never blocks readers.
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
            .map_err(backend_error)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(Error::Config(format!(
                "the SQLite file would not switch to WAL (journal mode {mode:?})"
            )));
        }
    }
    let synchronous = match options.synchronous {
        Synchronous::Full => "FULL",
        Synchronous::Normal => "NORMAL",
    };
    conn.pragma_update(None, "synchronous", synchronous)
        .map_err(backend_error)?;
    Ok(conn)
}

/// A read-only connection for loads and feed reads.
pub(super) fn open_reader(path: &std::path::Path, options: &StoreOptions) -> Result<Connection> {
    let conn = Connection::open_with_flags(path, read_flags()).map_err(backend_error)?;
    set_up(&conn, options)?;
    Ok(conn)
}

fn read_flags() -> OpenFlags {
    OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX
}

fn set_up(conn: &Connection, options: &StoreOptions) -> Result<()> {
    conn.busy_timeout(options.busy_timeout)
        .map_err(backend_error)?;
    conn.pragma_update(None, "foreign_keys", "ON")
        .map_err(backend_error)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let options = StoreOptions::new();
        let file = |p: &str| Location::File(PathBuf::from(p));
        let parsed = |url: &str| parse(url, &options).map(|t| (t.location, t.read_only));
        let ok = |url: &str| parsed(url).ok();
        assert_eq!(ok("sqlite://bank.db"), Some((file("bank.db"), false)));
        assert_eq!(ok("sqlite:///tmp/x.db"), Some((file("/tmp/x.db"), false)));
        assert_eq!(ok("sqlite:bank.db"), Some((file("bank.db"), false)));
        assert_eq!(ok("sqlite::memory:"), Some((Location::Memory, false)));
        assert_eq!(ok("sqlite://x.db?mode=ro"), Some((file("x.db"), true)));
        assert_eq!(ok("sqlite://x.db?mode=rwc"), Some((file("x.db"), false)));
        assert!(matches!(
            parsed("sqlite://x.db?cache=shared"),
            Err(Error::Config(_))
        ));
        assert!(matches!(parsed("sqlite://"), Err(Error::Config(_))));
        let read_only = StoreOptions::new().read_only(true);
        assert!(parse("sqlite://x.db", &read_only).is_ok_and(|t| t.read_only));
    }
}
