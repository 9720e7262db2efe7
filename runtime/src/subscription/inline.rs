//! Inline projections: read models updated inside each commit's own transaction, so that they
//! and the events commit together, or neither does.

use std::sync::Arc;

use super::tx::SqlValue;
use crate::error::{BoxError, Error, Result};
use crate::event::RecordedEvent;

/// A projection updated inside the transaction of every commit (on SQLite and PostgreSQL): its
/// read model and the events commit together, and a projection that fails fails the commit,
/// with nothing written ([`Error::InlineProjection`]). Register it with
/// [`StoreOptions::inline_projection`](crate::StoreOptions::inline_projection).
///
/// `project` is given the events of one commit, in the order they were applied, as they were
/// stored (with their cursors), and adds the SQL statements that bring the read model up to
/// date to `sql`; the store runs them in the commit's transaction, right after the events. The
/// SQL reads the same on both stores: parameters `$1`, `$2`, … and `INSERT … ON CONFLICT`.
/// It runs in the middle of every commit: keep it quick, and leave slow or remote work to
/// durable subscriptions. On the memory store `project` runs, and its error fails the commit,
/// but there is no SQL to run.
///
/// ```
/// use annals::subscription::{InlineProjection, SqlBatch};
/// use annals::{BoxError, RecordedEvent};
///
/// /// How many events each aggregate has, kept in step with every commit.
/// struct EventCounts;
///
/// impl InlineProjection for EventCounts {
///     fn name(&self) -> &str {
///         "event_counts"
///     }
///
///     fn project(&self, events: &[RecordedEvent], sql: &mut SqlBatch) -> Result<(), BoxError> {
///         for event in events {
///             sql.execute(
///                 "INSERT INTO event_counts (aggregate, n) VALUES ($1, 1) \
///                  ON CONFLICT (aggregate) DO UPDATE SET n = event_counts.n + 1",
///                 &[event.aggregate_id.into()],
///             );
///         }
///         Ok(())
///     }
/// }
/// ```
pub trait InlineProjection: Send + Sync + 'static {
    /// The projection's name, for errors.
    fn name(&self) -> &str;

    /// Adds to `sql` what `events` (one commit's) change in the read model.
    fn project(
        &self,
        events: &[RecordedEvent],
        sql: &mut SqlBatch,
    ) -> std::result::Result<(), BoxError>;
}

/// The statements an [`InlineProjection`] asks the store to run in a commit's transaction.
#[derive(Debug, Default, Clone)]
pub struct SqlBatch {
    pub(crate) statements: Statements,
}

impl SqlBatch {
    /// Runs `sql` with `params` bound to `$1`, `$2`, … in the commit's transaction, after the
    /// statements added before it.
    pub fn execute(&mut self, sql: impl Into<String>, params: &[SqlValue]) {
        self.statements.push((sql.into(), params.to_vec()));
    }
}

/// SQL statements with their parameters, in order.
pub(crate) type Statements = Vec<(String, Vec<SqlValue>)>;

/// The inline projections of a store.
#[derive(Clone, Default)]
pub(crate) struct Inline(pub(crate) Arc<[Arc<dyn InlineProjection>]>);

impl std::fmt::Debug for Inline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|p| p.name()))
            .finish()
    }
}

impl Inline {
    /// True when there are none: commits run as they do without inline projections.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Adds `projection`.
    pub fn with(&self, projection: Arc<dyn InlineProjection>) -> Inline {
        let mut all: Vec<Arc<dyn InlineProjection>> = self.0.iter().cloned().collect();
        all.push(projection);
        Inline(all.into())
    }

    /// Each projection's statements for `events`, in the order the projections were
    /// registered, with the name of the projection each comes from.
    pub fn statements<'a>(
        &'a self,
        events: &[RecordedEvent],
    ) -> Result<Vec<(&'a str, Statements)>> {
        self.0
            .iter()
            .map(|projection| {
                let mut sql = SqlBatch::default();
                projection
                    .project(events, &mut sql)
                    .map_err(|source| Error::InlineProjection {
                        name: projection.name().to_owned(),
                        source,
                    })?;
                Ok((projection.name(), sql.statements))
            })
            .collect()
    }
}

/// The error of an inline projection whose statement failed.
#[cfg_attr(not(any(feature = "sqlite", feature = "postgres")), allow(dead_code))]
pub(crate) fn statement_failed(name: &str, error: Error) -> Error {
    Error::InlineProjection {
        name: name.to_owned(),
        source: Box::new(error),
    }
}
