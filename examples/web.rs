//! A small bank as a web service: axum handlers that call annals, each in a task of its own.
//!
//! ```text
//! cargo run --example web                                    # SQLite file web.db, port 3000
//! cargo run --example web -- --store memory: --listen 127.0.0.1:8080
//! cargo run --example web --features postgres -- --store postgres://postgres@127.0.0.1/test
//!
//! curl -X POST localhost:3000/accounts -H 'content-type: application/json' -d '{"key":"alice","owner":"Alice"}'
//! curl -X POST localhost:3000/accounts/alice/deposits -H 'content-type: application/json' -d '{"amount":100}'
//! curl -X POST localhost:3000/accounts -H 'content-type: application/json' -d '{"key":"bob","owner":"Bob"}'
//! curl -X POST localhost:3000/transfers -H 'content-type: application/json' -d '{"from":"alice","to":"bob","amount":30}'
//! curl localhost:3000/accounts/bob/history
//! ```
//!
//! The store URL can also come from `ANNALS_STORE`, the address from `ANNALS_LISTEN`. The
//! service is in `web/app.rs`; `tests/web.rs` starts the same router and sends it 200
//! concurrent transfers.

#[path = "web/app.rs"]
mod app;

/// The value of `--name VALUE` or `--name=VALUE`, else the environment variable, else `default`.
fn arg(name: &str, env: &str, default: &str) -> String {
    let flag = format!("--{name}");
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == flag {
            if let Some(value) = args.next() {
                return value;
            }
        } else if let Some(value) = arg.strip_prefix(&format!("{flag}=")) {
            return value.to_owned();
        }
    }
    std::env::var(env).unwrap_or_else(|_| default.to_owned())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = arg("store", "ANNALS_STORE", "sqlite://web.db");
    let listen = arg("listen", "ANNALS_LISTEN", "127.0.0.1:3000");
    let store = annals::Store::open(&url).await?;
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    println!("store: {url}");
    println!(
        "listening on http://{} (Ctrl-C stops)",
        listener.local_addr()?
    );
    axum::serve(listener, app::router(store.clone()))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    store.close().await;
    Ok(())
}
