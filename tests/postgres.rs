//! The conformance suite on PostgreSQL (`DATABASE_URL`), each test in a schema of its own.

#![cfg(feature = "postgres")]

mod conformance;
#[path = "support/postgres.rs"]
mod support;

conformance_suite!(
    attributes = [#[cfg_attr(annals_skip_postgres, ignore = "DATABASE_URL is not set")]],
    support::open_fresh()
);

/// The whole suite again on a store with an aggregate cache.
mod with_cache {
    use super::support;

    crate::conformance_suite!(
        attributes = [#[cfg_attr(annals_skip_postgres, ignore = "DATABASE_URL is not set")]],
        async {
            let schema = support::fresh_schema()?;
            let store = schema
                .open_with(schema.options().aggregate_cache(1_000))
                .await;
            Some((store, schema))
        }
    );
}

/// Two handles on one schema, the first with an aggregate cache.
mod cache {
    use super::support;

    crate::cache_suite!(
        attributes = [#[cfg_attr(annals_skip_postgres, ignore = "DATABASE_URL is not set")]],
        async {
            let schema = support::fresh_schema()?;
            let options = schema
                .options()
                .aggregate_cache(crate::conformance::cache::CAPACITY);
            let cached = schema.open_with(options).await;
            let other = schema.open().await;
            Some((cached, other, schema))
        }
    );
}

#[cfg_attr(annals_skip_postgres, ignore = "DATABASE_URL is not set")]
#[tokio::test]
async fn commit_too_large_is_refused() {
    let Some(schema) = support::fresh_schema() else {
        return;
    };
    let store = schema
        .open_with(schema.options().max_commit_bytes(16 << 10))
        .await;
    conformance::commit_too_large_is_refused(&store).await;
    store.close().await;
}

/// Every PostgreSQL test carries the `cfg_attr(annals_skip_postgres, ignore = ...)` line, so
/// that without a server it is reported as ignored, not as passed.
#[test]
fn every_postgres_test_is_ignored_without_a_server() {
    let files = [
        ("tests/postgres.rs", include_str!("postgres.rs")),
        ("tests/postgres_feed.rs", include_str!("postgres_feed.rs")),
        ("tests/postgres_store.rs", include_str!("postgres_store.rs")),
        ("tests/pgbouncer.rs", include_str!("pgbouncer.rs")),
        (
            "tests/aggregate_cache.rs",
            include_str!("aggregate_cache.rs"),
        ),
        ("tests/postgres_bound.rs", include_str!("postgres_bound.rs")),
    ];
    for (file, source) in files {
        let lines: Vec<&str> = source.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            if line.starts_with("#[tokio::test") {
                // The attributes above the test, up to the blank line or item before them.
                let above: Vec<&str> = lines[..i]
                    .iter()
                    .rev()
                    .take_while(|l| !l.trim().is_empty() && !l.starts_with('}'))
                    .copied()
                    .collect();
                let above = above.concat();
                assert!(
                    above.contains("annals_skip_postgres") && above.contains("ignore = "),
                    "{file}:{}: add #[cfg_attr(annals_skip_postgres, ignore = \"DATABASE_URL is \
                     not set\")] above this test",
                    i + 1
                );
            }
        }
    }
}
