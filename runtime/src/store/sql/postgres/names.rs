//! Identifier names of one PostgreSQL store: its schema, table prefix, notification channel and
//! migration lock key, derived from validated options and checked against PostgreSQL's limit on
//! identifier length before anything is created.

use crate::error::{Error, Result};
use crate::store::StoreOptions;
use crate::store::sql::migrate::{Dialect, templates};

/// PostgreSQL cuts identifiers at 63 bytes (NAMEDATALEN - 1), and so channel names.
const MAX_IDENTIFIER: usize = 63;

/// Names derived from the options, all validated identifiers.
#[derive(Debug, Clone)]
pub(super) struct Names {
    pub schema: String,
    pub prefix: String,
    /// The `NOTIFY` channel of this schema and prefix.
    pub channel: String,
    /// What the migration advisory lock key is hashed from.
    pub lock_key: String,
}

impl Names {
    pub fn new(options: &StoreOptions) -> Result<Names> {
        let schema = options
            .schema
            .clone()
            .unwrap_or_else(|| "public".to_owned());
        let prefix = options.table_prefix.clone();
        let channel = format!("{schema}.{prefix}events");
        for template in templates(Dialect::Postgres) {
            for suffix in prefixed_names(template) {
                let name = format!("{prefix}{suffix}");
                if name.len() > MAX_IDENTIFIER {
                    return Err(Error::Config(format!(
                        "table prefix {prefix:?} is too long for PostgreSQL: the name {name:?} \
                         would be {} bytes, over the limit of {MAX_IDENTIFIER}",
                        name.len()
                    )));
                }
            }
        }
        if channel.len() > MAX_IDENTIFIER {
            return Err(Error::Config(format!(
                "schema {schema:?} and table prefix {prefix:?} are too long together for \
                 PostgreSQL: the notification channel {channel:?} would be {} bytes, over the \
                 limit of {MAX_IDENTIFIER}",
                channel.len()
            )));
        }
        let lock_key = format!("annals.migrate:{schema}.{prefix}");
        Ok(Names {
            schema,
            prefix,
            channel,
            lock_key,
        })
    }

    /// Every relation the migrations create (tables, indexes, sequences), without the schema.
    pub fn relations(&self) -> Vec<String> {
        let mut names: Vec<String> = templates(Dialect::Postgres)
            .flat_map(prefixed_names)
            .map(|suffix| format!("{}{suffix}", self.prefix))
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// `"{schema}".{prefix}{table}`: the schema is quoted, since a valid identifier may be a
    /// reserved word; the prefixed table names never are.
    pub fn table(&self, table: &str) -> String {
        format!("\"{}\".{}{}", self.schema, self.prefix, table)
    }
}

/// Every name a template creates with the table prefix, as the part after `{prefix}`.
fn prefixed_names(template: &str) -> impl Iterator<Item = &str> {
    template.split("{prefix}").skip(1).map(|rest| {
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        rest.get(..end).unwrap_or_default()
    })
}
