//! The conformance suite on the in-memory store.

mod conformance;

conformance_suite!(async { (annals::Store::open("memory:").await.unwrap(), ()) });
