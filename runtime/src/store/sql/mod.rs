//! What the SQL stores share: the type-name cache ([`types`]), rows to records ([`records`]),
//! migrations and their bookkeeping ([`migrate`]), and driver errors. Each store lives in its
//! own folder beside them.

pub(crate) mod migrate;
#[cfg(feature = "postgres")]
pub(crate) mod postgres;
pub(crate) mod records;
#[cfg(feature = "sqlite")]
pub(crate) mod sqlite;
pub(crate) mod types;

pub use migrate::{Dialect, Migration, migrations};

use crate::error::Error;

/// Wraps a driver error, keeping it as the source.
pub(crate) fn backend_error(e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::Backend(Box::new(e))
}
