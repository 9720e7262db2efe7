//! The web example's service: a bank on annals behind axum. `examples/web.rs` runs it;
//! `tests/web.rs` includes this file and drives it over HTTP.
//!
//! | request | does |
//! | --- | --- |
//! | `POST /accounts` `{"key": "alice", "owner": "Alice"}` | opens an account (409 if the key is taken) |
//! | `POST /accounts/{key}/deposits` `{"amount": 100}` | deposits |
//! | `POST /transfers` `{"from": "alice", "to": "bob", "amount": 30}` | moves money, atomically |
//! | `GET /accounts/{key}` | owner, balance, version |
//! | `GET /accounts/{key}/history` | every event of the account, oldest first |
//!
//! Every handler is a spawned task, so each future here must be `Send`: the helpers take
//! `&Store` and `&str` and call `transact_with_retry` with a closure that borrows them.

use annals::prelude::*;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

#[derive(Event, Serialize, Deserialize, Debug, Clone)]
#[event(name = "web.account.opened")]
pub struct Opened {
    pub owner: String,
}

#[derive(Event, Serialize, Deserialize, Debug, Clone)]
#[event(name = "web.account.deposited")]
pub struct Deposited {
    pub amount: i64,
}

/// Both sides of a transfer carry its id, so each can be matched with the other.
#[derive(Event, Serialize, Deserialize, Debug, Clone)]
pub enum Transferred {
    #[event(name = "web.transfer.sent")]
    Sent {
        transfer: uuid::Uuid,
        to: String,
        amount: i64,
    },
    #[event(name = "web.transfer.received")]
    Received {
        transfer: uuid::Uuid,
        from: String,
        amount: i64,
    },
}

#[derive(Aggregate, Serialize, Deserialize, Default, Debug)]
#[aggregate(
    name = "web.account",
    events(Opened, Deposited, Transferred),
    snapshot_every = 50
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

impl Apply<Transferred> for Account {
    fn apply(&mut self, e: &Transferred) {
        match e {
            Transferred::Sent { amount, .. } => self.balance -= amount,
            Transferred::Received { amount, .. } => self.balance += amount,
        }
    }
}

/// What the service refuses, each with its HTTP status.
#[derive(Debug)]
pub enum BankError {
    /// 422: not enough money.
    Overdrawn { balance: i64, wanted: i64 },
    /// 422: a zero or negative amount, or a transfer to the same account.
    Invalid(&'static str),
    /// 404 or 409 from the store, 500 for the rest.
    Store(annals::Error),
}

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

impl IntoResponse for BankError {
    fn into_response(self) -> Response {
        let (status, message) = match self {
            BankError::Overdrawn { balance, wanted } => (
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("overdrawn: the balance is {balance}, {wanted} was asked"),
            ),
            BankError::Invalid(why) => (StatusCode::UNPROCESSABLE_ENTITY, why.to_owned()),
            BankError::Store(e) => {
                let status = match &e {
                    annals::Error::NotFound { .. } => StatusCode::NOT_FOUND,
                    annals::Error::KeyTaken { .. } | annals::Error::InvalidKey { .. } => {
                        StatusCode::CONFLICT
                    }
                    e if e.is_conflict() => StatusCode::SERVICE_UNAVAILABLE,
                    _ => StatusCode::INTERNAL_SERVER_ERROR,
                };
                (status, e.to_string())
            }
        };
        (status, Json(serde_json::json!({ "error": message }))).into_response()
    }
}

impl Account {
    /// A command: decides, returns the event or a domain error, changes nothing.
    fn send(&self, transfer: uuid::Uuid, to: &str, amount: i64) -> Result<Transferred, BankError> {
        if amount > self.balance {
            return Err(BankError::Overdrawn {
                balance: self.balance,
                wanted: amount,
            });
        }
        Ok(Transferred::Sent {
            transfer,
            to: to.to_owned(),
            amount,
        })
    }
}

/// Retries sized for many clients hitting a few accounts at once.
fn retry() -> Retry {
    Retry::attempts(100)
}

/// Opens the account `key`.
pub async fn open(store: &Store, key: &str, owner: &str) -> Result<AccountView, BankError> {
    store
        .transact(async |ctx| {
            let mut account = ctx.create_with_key::<Account>(key).await?;
            let owner = owner.to_owned();
            ctx.apply(&mut account, Opened { owner })?;
            Ok(AccountView::of(key, &account))
        })
        .await
}

/// Deposits `amount` into `key`.
pub async fn deposit(store: &Store, key: &str, amount: i64) -> Result<AccountView, BankError> {
    if amount <= 0 {
        return Err(BankError::Invalid("the amount must be positive"));
    }
    store
        .transact_with_retry(retry(), async |ctx| {
            let mut account = ctx.load_by_key::<Account>(key).await?;
            ctx.apply(&mut account, Deposited { amount })?;
            Ok(AccountView::of(key, &account))
        })
        .await
}

/// Moves `amount` from `from` to `to`: both events commit together, or neither.
pub async fn transfer(
    store: &Store,
    from: &str,
    to: &str,
    amount: i64,
) -> Result<uuid::Uuid, BankError> {
    if amount <= 0 {
        return Err(BankError::Invalid("the amount must be positive"));
    }
    if from == to {
        return Err(BankError::Invalid("a transfer needs two accounts"));
    }
    let transfer = uuid::Uuid::now_v7();
    store
        .transact_with_retry(retry(), async |ctx| {
            let mut source = ctx.load_by_key::<Account>(from).await?;
            let mut target = ctx.load_by_key::<Account>(to).await?;
            let sent = source.send(transfer, to, amount)?;
            ctx.apply(&mut source, sent)?;
            let from = from.to_owned();
            let received = Transferred::Received {
                transfer,
                from,
                amount,
            };
            ctx.apply(&mut target, received)?;
            Ok(transfer)
        })
        .await
}

/// An account as the service shows it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct AccountView {
    pub key: String,
    pub owner: String,
    pub balance: i64,
    pub version: u64,
}

impl AccountView {
    fn of(key: &str, account: &Root<Account>) -> Self {
        AccountView {
            key: key.to_owned(),
            owner: account.owner.clone(),
            balance: account.balance,
            version: account.version(),
        }
    }
}

/// One event of an account's history.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct HistoryEntry {
    pub version: u64,
    pub event_type: String,
    /// The transfer an event belongs to, for both sides of a transfer.
    pub transfer: Option<uuid::Uuid>,
    pub payload: serde_json::Value,
}

#[derive(Deserialize)]
struct OpenRequest {
    key: String,
    owner: String,
}

#[derive(Deserialize)]
struct DepositRequest {
    amount: i64,
}

/// A transfer as the client asks for it.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct TransferRequest {
    pub from: String,
    pub to: String,
    pub amount: i64,
}

/// The answer to a transfer.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct TransferDone {
    pub transfer: uuid::Uuid,
}

async fn open_handler(
    State(store): State<Store>,
    Json(request): Json<OpenRequest>,
) -> Result<(StatusCode, Json<AccountView>), BankError> {
    let view = open(&store, &request.key, &request.owner).await?;
    Ok((StatusCode::CREATED, Json(view)))
}

async fn deposit_handler(
    State(store): State<Store>,
    Path(key): Path<String>,
    Json(request): Json<DepositRequest>,
) -> Result<Json<AccountView>, BankError> {
    deposit(&store, &key, request.amount).await.map(Json)
}

async fn transfer_handler(
    State(store): State<Store>,
    Json(request): Json<TransferRequest>,
) -> Result<Json<TransferDone>, BankError> {
    let transfer = transfer(&store, &request.from, &request.to, request.amount).await?;
    Ok(Json(TransferDone { transfer }))
}

async fn account_handler(
    State(store): State<Store>,
    Path(key): Path<String>,
) -> Result<Json<AccountView>, BankError> {
    let account = store.begin_read_only().load_by_key::<Account>(&key).await?;
    Ok(Json(AccountView::of(&key, &account)))
}

async fn history_handler(
    State(store): State<Store>,
    Path(key): Path<String>,
) -> Result<Json<Vec<HistoryEntry>>, BankError> {
    let account = store.begin_read_only().load_by_key::<Account>(&key).await?;
    let mut entries = Vec::new();
    for event in store.history(account.id()).await? {
        let transfer = match event.decode::<Transferred>()? {
            Some(Transferred::Sent { transfer, .. } | Transferred::Received { transfer, .. }) => {
                Some(transfer)
            }
            None => None,
        };
        entries.push(HistoryEntry {
            version: event.version,
            transfer,
            payload: event.payload_json()?,
            event_type: event.event_type,
        });
    }
    Ok(Json(entries))
}

/// The service's routes on `store`.
pub fn router(store: Store) -> Router {
    Router::new()
        .route("/accounts", post(open_handler))
        .route("/accounts/{key}", get(account_handler))
        .route("/accounts/{key}/deposits", post(deposit_handler))
        .route("/accounts/{key}/history", get(history_handler))
        .route("/transfers", post(transfer_handler))
        .with_state(store)
}
