//! What the registry tests that refuse to open share: each is a test binary of its own, whose
//! registry holds two types under one name.

use annals::{Error, Store};

/// Opens an in-memory store and expects it refused: `kind` name `name` is used by a type whose
/// path ends with `first` and by one whose path ends with `second`.
pub async fn refused_to_open(kind: &str, name: &str, first: &str, second: &str) {
    match Store::open("memory:").await {
        Err(Error::TypeNameCollision {
            kind: refused_kind,
            name: refused_name,
            first: first_type,
            second: second_type,
        }) => {
            assert_eq!((refused_kind, refused_name.as_str()), (kind, name));
            assert!(first_type.ends_with(first), "{first_type}");
            assert!(second_type.ends_with(second), "{second_type}");
        }
        other => panic!("expected TypeNameCollision, got {other:?}"),
    }
}
