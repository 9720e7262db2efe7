//! The web example, started on 127.0.0.1 on an ephemeral port and driven over HTTP: 200
//! concurrent transfers from 16 client tasks, then every balance and every history checked.

#![cfg(feature = "sqlite")]

#[path = "../examples/web/app.rs"]
mod app;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

type HttpClient = Client<HttpConnector, Full<Bytes>>;

const ACCOUNTS: usize = 8;
const CLIENTS: usize = 16;
const TRANSFERS: usize = 200;
const OPENING: i64 = 1_000;

/// Sends one request and reads the JSON answer.
async fn call(
    client: &HttpClient,
    addr: SocketAddr,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let body = body.map_or_else(Bytes::new, |b| Bytes::from(b.to_string()));
    let request = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/json")
        .body(Full::new(body))
        .expect("a valid request");
    let response = client.request(request).await.expect("the service answers");
    let status = response.status();
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("a whole body")
        .to_bytes();
    let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, value)
}

/// The account keys and the transfer `i` of the run: from, to, amount.
fn plan(i: usize) -> (usize, usize, i64) {
    let from = i % ACCOUNTS;
    let to = (from + 1 + (i / ACCOUNTS) % (ACCOUNTS - 1)) % ACCOUNTS;
    (from, to, 1 + (i % 10) as i64)
}

fn key(account: usize) -> String {
    format!("acct-{account}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_concurrent_transfers_over_http() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("web.db").display());
    let store = annals::Store::open(&url).await.expect("open the store");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind an ephemeral port");
    let addr = listener.local_addr().expect("the bound address");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        axum::serve(listener, app::router(store.clone()))
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .into_future(),
    );
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();

    for account in 0..ACCOUNTS {
        let (status, body) = call(
            &client,
            addr,
            Method::POST,
            "/accounts",
            Some(json!({ "key": key(account), "owner": format!("Owner {account}") })),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let path = format!("/accounts/{}/deposits", key(account));
        let (status, body) = call(
            &client,
            addr,
            Method::POST,
            &path,
            Some(json!({ "amount": OPENING })),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["balance"], OPENING);
    }
    let (status, _) = call(
        &client,
        addr,
        Method::POST,
        "/accounts",
        Some(json!({ "key": key(0), "owner": "Again" })),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "a key is opened once");

    // 16 client tasks share the 200 transfers.
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let client = client.clone();
            tokio::spawn(async move {
                let mut done = Vec::new();
                for i in (c..TRANSFERS).step_by(CLIENTS) {
                    let (from, to, amount) = plan(i);
                    let request = json!({ "from": key(from), "to": key(to), "amount": amount });
                    let (status, body) =
                        call(&client, addr, Method::POST, "/transfers", Some(request)).await;
                    assert_eq!(status, StatusCode::OK, "transfer {i}: {body}");
                    let id: uuid::Uuid = serde_json::from_value(body["transfer"].clone())
                        .expect("the transfer's id");
                    done.push((id, from, to, amount));
                }
                done
            })
        })
        .collect();
    let mut transfers = Vec::new();
    for task in tasks {
        let done = tokio::time::timeout(Duration::from_secs(300), task)
            .await
            .expect("the clients finish in time")
            .expect("no client panicked");
        transfers.extend(done);
    }
    assert_eq!(transfers.len(), TRANSFERS);

    // An overdraft is refused and leaves nothing behind.
    let (status, body) = call(
        &client,
        addr,
        Method::POST,
        "/transfers",
        Some(json!({ "from": key(0), "to": key(1), "amount": 1_000_000 })),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");

    // Balances add up, and each matches what its account sent and received.
    let mut expected: Vec<i64> = vec![OPENING; ACCOUNTS];
    let mut moves: Vec<usize> = vec![0; ACCOUNTS];
    for (_, from, to, amount) in &transfers {
        expected[*from] -= amount;
        expected[*to] += amount;
        moves[*from] += 1;
        moves[*to] += 1;
    }
    let mut total = 0;
    for account in 0..ACCOUNTS {
        let path = format!("/accounts/{}", key(account));
        let (status, body) = call(&client, addr, Method::GET, &path, None).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let view: app::AccountView = serde_json::from_value(body).expect("an account");
        assert_eq!(
            view.balance,
            expected[account],
            "balance of {}",
            key(account)
        );
        assert_eq!(view.version, 2 + moves[account] as u64);
        total += view.balance;
    }
    assert_eq!(
        total,
        OPENING * ACCOUNTS as i64,
        "money is neither made nor lost"
    );

    // Every history is complete: versions without a gap, and each transfer once on each side.
    let mut seen: HashMap<uuid::Uuid, Vec<(usize, String)>> = HashMap::new();
    for (account, moved) in moves.iter().enumerate() {
        let path = format!("/accounts/{}/history", key(account));
        let (status, body) = call(&client, addr, Method::GET, &path, None).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let history: Vec<app::HistoryEntry> = serde_json::from_value(body).expect("a history");
        let versions: Vec<u64> = history.iter().map(|e| e.version).collect();
        let want: Vec<u64> = (1..=2 + *moved as u64).collect();
        assert_eq!(versions, want, "history of {}", key(account));
        assert_eq!(history[0].event_type, "web.account.opened");
        assert_eq!(history[1].event_type, "web.account.deposited");
        for entry in &history[2..] {
            let transfer = entry.transfer.expect("a transfer event");
            seen.entry(transfer)
                .or_default()
                .push((account, entry.event_type.clone()));
        }
    }
    assert_eq!(seen.len(), TRANSFERS, "no other transfer was written");
    for (id, from, to, _) in &transfers {
        let mut sides = seen.remove(id).expect("the transfer is in the histories");
        sides.sort();
        let mut want = vec![
            (*from, "web.transfer.sent".to_owned()),
            (*to, "web.transfer.received".to_owned()),
        ];
        want.sort();
        assert_eq!(sides, want, "transfer {id}");
    }

    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(60), server)
        .await
        .expect("the server stops in time")
        .expect("the server task did not panic")
        .expect("the server ran without error");
    store.close().await;
}
