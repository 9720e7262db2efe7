//! The transaction a subscription's handler writes in: the batch's checkpoint commits in it, so
//! the handler's own writes and the cursor commit together, or neither does.

#[cfg(feature = "sqlite")]
use crate::error::BoxError;
use crate::error::{Error, Result};

/// A value bound to a statement run through [`Transaction::execute`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum SqlValue {
    /// SQL `NULL`.
    Null,
    /// A 64-bit integer (`bigint`, SQLite `INTEGER`).
    Int(i64),
    /// A double (`double precision`, SQLite `REAL`).
    Float(f64),
    /// Text.
    Text(String),
    /// Bytes (`bytea`, SQLite `BLOB`).
    Bytes(Vec<u8>),
    /// A boolean (SQLite stores it as 0 or 1).
    Bool(bool),
}

macro_rules! sql_value_from {
    ($($t:ty => $variant:ident $(as $cast:ty)?),* $(,)?) => {
        $(
            impl From<$t> for SqlValue {
                fn from(value: $t) -> SqlValue {
                    SqlValue::$variant(value $(as $cast)?)
                }
            }
        )*
    };
}

sql_value_from!(
    i64 => Int,
    i32 => Int as i64,
    u32 => Int as i64,
    i16 => Int as i64,
    f64 => Float,
    bool => Bool,
    String => Text,
    Vec<u8> => Bytes,
);

impl From<&str> for SqlValue {
    fn from(value: &str) -> SqlValue {
        SqlValue::Text(value.to_owned())
    }
}

impl From<&String> for SqlValue {
    fn from(value: &String) -> SqlValue {
        SqlValue::Text(value.clone())
    }
}

impl From<&[u8]> for SqlValue {
    fn from(value: &[u8]) -> SqlValue {
        SqlValue::Bytes(value.to_vec())
    }
}

impl From<uuid::Uuid> for SqlValue {
    /// A UUID as its hyphenated text, which both SQL stores compare and cast from.
    fn from(value: uuid::Uuid) -> SqlValue {
        SqlValue::Text(value.to_string())
    }
}

impl From<crate::AggregateId> for SqlValue {
    /// An aggregate id as its hyphenated UUID text.
    fn from(value: crate::AggregateId) -> SqlValue {
        SqlValue::Text(value.to_string())
    }
}

impl<T: Into<SqlValue>> From<Option<T>> for SqlValue {
    fn from(value: Option<T>) -> SqlValue {
        value.map_or(SqlValue::Null, Into::into)
    }
}

/// Work on a SQLite handler transaction, run on the store's writer thread at checkpoint time.
#[cfg(feature = "sqlite")]
pub(crate) type SqliteWork =
    Box<dyn FnOnce(&rusqlite::Transaction<'_>) -> std::result::Result<(), BoxError> + Send>;

/// What a handler transaction holds on each store.
pub(crate) enum TxState {
    /// The memory store: no SQL, the checkpoint is written when the handler succeeds.
    #[cfg_attr(not(feature = "memory"), allow(dead_code))]
    Memory,
    /// An open PostgreSQL transaction on a connection of the store's pool.
    #[cfg(feature = "postgres")]
    Postgres(sqlx::Transaction<'static, sqlx::Postgres>),
    /// The SQLite writes the handler asked for, run with the checkpoint in one transaction on
    /// the writer thread.
    #[cfg(feature = "sqlite")]
    Sqlite(Vec<SqliteWork>),
}

/// The transaction a subscription's handler writes its read model in. The batch's checkpoint
/// is written in the same transaction when the handler returns `Ok`: the handler's writes and
/// the subscription's cursor commit together, or neither does (a failed handler, a lost lease,
/// a crash), so each event's effects are applied exactly once.
///
/// [`execute`](Transaction::execute) reads the same on both SQL stores: number parameters
/// `$1`, `$2`, … in order (SQLite reads them as positional parameters too) and write SQL both
/// understand (`INSERT … ON CONFLICT … DO UPDATE`). On PostgreSQL the statement runs at once;
/// on SQLite, whose transaction lives on the store's writer thread, it runs there with the
/// checkpoint once the handler returns, and an error it meets then fails the batch as the
/// handler's own error would. For everything else, [`postgres`](Transaction::postgres) gives
/// the sqlx connection and [`sqlite`](Transaction::sqlite) runs a closure on the rusqlite
/// transaction. On the memory store there is no SQL: keep the read model in the handler and
/// change it only once nothing can fail any more.
pub struct Transaction<'t> {
    pub(crate) state: &'t mut TxState,
}

impl std::fmt::Debug for Transaction<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let store = match self.state {
            TxState::Memory => "memory",
            #[cfg(feature = "postgres")]
            TxState::Postgres(_) => "postgres",
            #[cfg(feature = "sqlite")]
            TxState::Sqlite(_) => "sqlite",
        };
        f.debug_struct("Transaction")
            .field("store", &store)
            .finish()
    }
}

impl Transaction<'_> {
    /// Runs one statement with `params` bound to `$1`, `$2`, … in this transaction.
    ///
    /// ```
    /// # async fn demo(tx: &mut annals::Transaction<'_>) -> Result<(), annals::Error> {
    /// tx.execute(
    ///     "INSERT INTO balances (owner, cents) VALUES ($1, $2) \
    ///      ON CONFLICT (owner) DO UPDATE SET cents = balances.cents + excluded.cents",
    ///     &["alice".into(), 250_i64.into()],
    /// )
    /// .await?;
    /// # Ok(()) }
    /// ```
    ///
    /// Fails with [`Error::Config`] on the memory store, and with the database's error as
    /// [`Error::Backend`] (on SQLite: when the batch is checkpointed).
    pub async fn execute(&mut self, sql: &str, params: &[SqlValue]) -> Result<()> {
        match &mut *self.state {
            TxState::Memory => Err(Error::Config(format!(
                "the memory store runs no SQL ({} with {} parameters): keep a memory \
                 projection's state in its handler",
                sql,
                params.len()
            ))),
            #[cfg(feature = "postgres")]
            TxState::Postgres(tx) => {
                crate::store::sql::postgres::execute(&mut *tx, sql, params).await
            }
            #[cfg(feature = "sqlite")]
            TxState::Sqlite(work) => {
                let sql = sql.to_owned();
                let params = params.to_vec();
                work.push(Box::new(move |tx| {
                    crate::store::sql::sqlite::execute(tx, &sql, &params).map_err(Into::into)
                }));
                Ok(())
            }
        }
    }

    /// The PostgreSQL connection of this transaction, or `None` on another store.
    #[cfg(feature = "postgres")]
    pub fn postgres(&mut self) -> Option<&mut sqlx::PgConnection> {
        match &mut *self.state {
            TxState::Postgres(tx) => Some(&mut *tx),
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }

    /// Runs `work` on the SQLite transaction the checkpoint commits in, on the store's writer
    /// thread, once the handler returns `Ok` (closures run in the order given). An error from
    /// `work` rolls the batch back and fails it. [`Error::Config`] on another store.
    #[cfg(feature = "sqlite")]
    pub fn sqlite(
        &mut self,
        work: impl FnOnce(&rusqlite::Transaction<'_>) -> std::result::Result<(), BoxError>
        + Send
        + 'static,
    ) -> Result<()> {
        match &mut *self.state {
            TxState::Sqlite(queue) => {
                queue.push(Box::new(work));
                Ok(())
            }
            #[allow(unreachable_patterns)]
            _ => Err(Error::Config(
                "Transaction::sqlite needs a SQLite store".to_owned(),
            )),
        }
    }
}
