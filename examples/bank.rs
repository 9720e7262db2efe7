//! A small bank on annals: accounts opened by key, deposits, a transfer between two accounts in
//! one atomic commit, an overdraft refused by the domain with nothing committed, each account's
//! history, and a read model (each owner's balance, in a SQL table) kept by a projection, with
//! its lag.
//!
//! ```text
//! cargo run --example bank                                   # SQLite file bank.db, here
//! cargo run --example bank -- --store memory:
//! cargo run --example bank --features postgres -- --store postgres://postgres@127.0.0.1/test
//! ```
//!
//! The store URL can also come from `ANNALS_STORE`.

use annals::prelude::*;
use annals::{BoxError, Transaction};
use serde::{Deserialize, Serialize};

#[derive(Event, Serialize, Deserialize, Debug, Clone)]
#[event(name = "account.opened")]
pub struct Opened {
    pub owner: String,
}

#[derive(Event, Serialize, Deserialize, Debug, Clone)]
#[event(name = "account.deposited")]
pub struct Deposited {
    pub amount: i64,
}

#[derive(Event, Serialize, Deserialize, Debug, Clone)]
#[event(name = "account.withdrawn")]
pub struct Withdrawn {
    pub amount: i64,
}

#[derive(Aggregate, Serialize, Deserialize, Default, Debug)]
#[aggregate(
    name = "account",
    events(Opened, Deposited, Withdrawn),
    snapshot_every = 100
)]
pub struct Account {
    owner: String,
    balance: i64,
}

impl Apply<Opened> for Account {
    fn apply(&mut self, e: &Opened) {
        self.owner = e.owner.clone();
    }
}

impl Apply<Deposited> for Account {
    fn apply(&mut self, e: &Deposited) {
        self.balance += e.amount;
    }
}

impl Apply<Withdrawn> for Account {
    fn apply(&mut self, e: &Withdrawn) {
        self.balance -= e.amount;
    }
}

/// The bank's own errors; store errors pass through `From`.
#[derive(Debug)]
pub enum BankError {
    Overdrawn {
        owner: String,
        balance: i64,
        wanted: i64,
    },
    Store(annals::Error),
}

impl std::fmt::Display for BankError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BankError::Overdrawn {
                owner,
                balance,
                wanted,
            } => write!(f, "{owner} has {balance} and cannot pay {wanted}"),
            BankError::Store(e) => write!(f, "store: {e}"),
        }
    }
}

impl std::error::Error for BankError {}

impl From<annals::Error> for BankError {
    fn from(e: annals::Error) -> Self {
        BankError::Store(e)
    }
}

impl IsConflict for BankError {
    fn is_conflict(&self) -> bool {
        matches!(self, BankError::Store(e) if e.is_conflict())
    }
}

impl Account {
    /// A command: decides, returns the event or a domain error, changes nothing.
    pub fn withdraw(&self, amount: i64) -> Result<Withdrawn, BankError> {
        if amount > self.balance {
            return Err(BankError::Overdrawn {
                owner: self.owner.clone(),
                balance: self.balance,
                wanted: amount,
            });
        }
        Ok(Withdrawn { amount })
    }
}

/// Opens the account `key` unless it exists, and deposits `amount`.
async fn open_and_deposit(
    store: &Store,
    key: &str,
    owner: &str,
    amount: i64,
) -> Result<(), BankError> {
    store
        .transact(async |ctx| {
            let mut account = ctx.load_or_create_by_key::<Account>(key).await?;
            if account.version() == 0 {
                ctx.apply(
                    &mut account,
                    Opened {
                        owner: owner.to_owned(),
                    },
                )?;
            }
            ctx.apply(&mut account, Deposited { amount })?;
            Ok(())
        })
        .await
}

/// Moves `amount` from one account to another: both events commit together, or neither.
async fn transfer(store: &Store, from: &str, to: &str, amount: i64) -> Result<(), BankError> {
    store
        .transact_with_retry(Retry::default(), async |ctx| {
            let mut from = ctx.load_by_key::<Account>(from).await?;
            let mut to = ctx.load_by_key::<Account>(to).await?;
            let withdrawn = from.withdraw(amount)?;
            ctx.apply(&mut from, withdrawn)?;
            ctx.apply(&mut to, Deposited { amount })?;
            Ok(())
        })
        .await
}

async fn print_account(store: &Store, key: &str) -> Result<(), BankError> {
    let account = store.begin_read_only().load_by_key::<Account>(key).await?;
    println!(
        "\n{key}: {} has {} (version {})",
        account.owner,
        account.balance,
        account.version()
    );
    for event in store.history(account.id()).await? {
        println!(
            "  v{:<3} {:<18} schema v{}  {}",
            event.version,
            event.event_type,
            event.schema_version,
            event.payload_json()?
        );
    }
    Ok(())
}

/// The read model: each owner's balance, in the table `bank_balances`, kept by the projection
/// "balances". Its rows and the subscription's cursor commit in one transaction, so a balance
/// never counts an event twice, whatever stops the program. The SQL reads the same on SQLite and
/// PostgreSQL.
#[derive(Projection)]
#[projection(name = "balances", events(Opened, Deposited, Withdrawn), reset = setup)]
struct Balances;

impl On<Opened> for Balances {
    async fn on(
        &mut self,
        e: Opened,
        env: &Envelope,
        tx: &mut Transaction<'_>,
    ) -> Result<(), BoxError> {
        tx.execute(
            "INSERT INTO bank_owners (account, owner) VALUES ($1, $2)",
            &[env.aggregate_id.into(), e.owner.into()],
        )
        .await?;
        Ok(())
    }
}

impl On<Deposited> for Balances {
    async fn on(
        &mut self,
        e: Deposited,
        env: &Envelope,
        tx: &mut Transaction<'_>,
    ) -> Result<(), BoxError> {
        add(tx, env, e.amount).await
    }
}

impl On<Withdrawn> for Balances {
    async fn on(
        &mut self,
        e: Withdrawn,
        env: &Envelope,
        tx: &mut Transaction<'_>,
    ) -> Result<(), BoxError> {
        add(tx, env, -e.amount).await
    }
}

/// Adds `change` to the balance of the owner of `env`'s account.
async fn add(tx: &mut Transaction<'_>, env: &Envelope, change: i64) -> Result<(), BoxError> {
    tx.execute(
        "INSERT INTO bank_balances (owner, balance) \
         SELECT owner, $2 FROM bank_owners WHERE account = $1 \
         ON CONFLICT (owner) DO UPDATE SET balance = bank_balances.balance + excluded.balance",
        &[env.aggregate_id.into(), change.into()],
    )
    .await?;
    Ok(())
}

impl Balances {
    /// Creates the tables on the first run, and empties them on a rebuild.
    async fn setup(&mut self, tx: &mut Transaction<'_>) -> Result<(), BoxError> {
        for sql in [
            "CREATE TABLE IF NOT EXISTS bank_owners (account TEXT PRIMARY KEY, owner TEXT NOT NULL)",
            "CREATE TABLE IF NOT EXISTS bank_balances (owner TEXT PRIMARY KEY, balance BIGINT NOT NULL)",
            "DELETE FROM bank_owners",
            "DELETE FROM bank_balances",
        ] {
            tx.execute(sql, &[]).await?;
        }
        Ok(())
    }
}

/// Rebuilds the read model from the first event, brings it up to date, and prints it.
async fn balances(store: &Store, url: &str) -> Result<(), Box<dyn std::error::Error>> {
    if url.starts_with("memory:") {
        println!("\nthe balances read model lives in SQL: run on SQLite or PostgreSQL to see it");
        return Ok(());
    }
    let subscription = Balances::subscription(store);
    // A rebuild from the first event every run, to show one; a service would `run` it.
    subscription.reset(&mut Balances).await?;
    let handled = subscription.catch_up(&mut Balances).await?;
    println!("\nbalances read model: {handled} events handled");
    for status in store.subscriptions().status("balances").await? {
        println!(
            "  subscription {:?}: {:?}, {} events behind",
            status.name, status.state, status.lag.events
        );
    }
    let rows = read_balances(url).await?;
    for (owner, balance) in rows {
        println!("  {owner:<6} {balance}");
    }
    Ok(())
}

/// The read model's rows, read as any program would: with the database's own driver.
async fn read_balances(url: &str) -> Result<Vec<(String, i64)>, Box<dyn std::error::Error>> {
    const SELECT: &str = "SELECT owner, balance FROM bank_balances ORDER BY owner";
    #[cfg(feature = "sqlite")]
    if let Some(path) = url.strip_prefix("sqlite://") {
        let conn = annals::rusqlite::Connection::open(path)?;
        let mut stmt = conn.prepare(SELECT)?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        return Ok(rows.collect::<Result<_, _>>()?);
    }
    #[cfg(feature = "postgres")]
    if url.starts_with("postgres") {
        use annals::sqlx::Connection;
        let mut conn = annals::sqlx::PgConnection::connect(url).await?;
        return Ok(annals::sqlx::query_as(SELECT).fetch_all(&mut conn).await?);
    }
    Ok(Vec::new())
}

fn store_url() -> String {
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--store" {
            if let Some(url) = args.next() {
                return url;
            }
        } else if let Some(url) = arg.strip_prefix("--store=") {
            return url.to_owned();
        }
    }
    std::env::var("ANNALS_STORE").unwrap_or_else(|_| "sqlite://bank.db".to_owned())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = store_url();
    let store = Store::open(&url).await?;
    println!("store: {url}");

    open_and_deposit(&store, "alice", "Alice", 100).await?;
    open_and_deposit(&store, "bob", "Bob", 20).await?;

    transfer(&store, "alice", "bob", 30).await?;
    println!("transferred 30 from alice to bob");

    let before = store
        .begin_read_only()
        .load_by_key::<Account>("bob")
        .await?;
    match transfer(&store, "bob", "alice", before.balance + 1_000).await {
        Err(BankError::Overdrawn { .. }) => {
            let after = store
                .begin_read_only()
                .load_by_key::<Account>("bob")
                .await?;
            assert_eq!(after.version(), before.version(), "nothing was committed");
            println!("refused an overdraft of bob's account; nothing was committed");
        }
        Ok(()) => return Err("the overdraft was accepted".into()),
        Err(e) => return Err(e.into()),
    }

    print_account(&store, "alice").await?;
    print_account(&store, "bob").await?;
    balances(&store, &url).await?;
    store.close().await;
    Ok(())
}

/// The bank's commands tested without a store: given past events, when a command runs, then
/// these events or this error (`cargo test --example bank`).
#[cfg(test)]
mod tests {
    use super::*;
    use annals::testing::given;

    #[test]
    fn withdraw_takes_what_there_is() {
        given::<Account>()
            .event(Opened {
                owner: "alice".into(),
            })
            .event(Deposited { amount: 100 })
            .when(|account| account.withdraw(30))
            .then(Withdrawn { amount: 30 })
            .state(|account| assert_eq!(account.balance, 70));
    }

    #[test]
    fn withdraw_refuses_an_overdraft() {
        given::<Account>()
            .event(Deposited { amount: 10 })
            .when(|account| account.withdraw(30))
            .then_error_matches(|e| matches!(e, BankError::Overdrawn { balance: 10, .. }));
    }
}
