//! How event payloads are encoded: serde JSON, and for an enum event only the variant's content,
//! so that the registered name alone says which variant it is.
//!
//! An enum event is stored as its variant's content (`{"by":10}` for `Added { by: 10 }`, `3` for
//! `Reset(3)`, `null` for a unit variant), not in serde's externally tagged form
//! (`{"Added":{"by":10}}`): renaming a variant in Rust while keeping its
//! `#[event(name = "...")]` then leaves stored events readable. Events written in the tagged
//! form by earlier versions of annals still decode, by their registered name too.
//!
//! The content form needs serde's externally tagged representation with one serde variant per
//! Rust variant; for other enums (`#[serde(tag = ...)]`, `untagged`, skipped variants) the whole
//! value is stored, as before, and its variant checked against the registered name.

use serde::Serialize;
use serde::de::{DeserializeOwned, Visitor};
use serde_json::Value;

use crate::error::BoxError;

/// Encodes a payload.
pub fn encode_json<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, BoxError> {
    serde_json::to_vec(value).map_err(Into::into)
}

/// Decodes a payload.
pub fn decode_json<T: DeserializeOwned>(payload: &[u8]) -> Result<T, BoxError> {
    serde_json::from_slice(payload).map_err(Into::into)
}

/// Encodes an enum event with `variants` Rust variants: its variant's content when serde tags
/// it externally, else the whole value.
pub fn encode_enum<T: Serialize + DeserializeOwned>(
    value: &T,
    variants: usize,
) -> Result<Vec<u8>, BoxError> {
    if serde_variants::<T>(variants).is_none() {
        return encode_json(value);
    }
    match serde_json::to_value(value)? {
        Value::Object(map) if map.len() == 1 => match map.into_iter().next() {
            Some((_, content)) => encode_json(&content),
            None => Err("an enum encoded as an empty object".into()),
        },
        Value::String(_) => encode_json(&Value::Null),
        other => encode_json(&other),
    }
}

/// Decodes an enum event stored under `name`, the registered name of Rust variant `index` of
/// `variants`. `encoded_name` gives the registered name of a decoded value, to check the
/// whole-value form.
pub fn decode_enum<T: DeserializeOwned>(
    payload: &[u8],
    name: &str,
    index: usize,
    variants: usize,
    encoded_name: fn(&T) -> &'static str,
) -> Result<T, BoxError> {
    let Some(tag) = serde_variants::<T>(variants).and_then(|tags| tags.get(index).copied()) else {
        let value: T = decode_json(payload)?;
        let decoded = encoded_name(&value);
        return if decoded == name {
            Ok(value)
        } else {
            Err(variant_mismatch(name, decoded))
        };
    };
    let stored: Value = serde_json::from_slice(payload)?;
    let tagged = |content: Value| {
        let mut map = serde_json::Map::new();
        map.insert(tag.to_owned(), content);
        T::deserialize(Value::Object(map))
    };
    let first = match tagged(stored.clone()) {
        Ok(value) => return Ok(value),
        Err(e) => e,
    };
    // The tagged form of earlier versions: `{"OldVariantName": content}` or `"OldVariantName"`.
    let old = match stored {
        Value::Object(map) if map.len() == 1 => match map.into_iter().next() {
            Some((_, content)) => tagged(content),
            None => return Err(first.into()),
        },
        Value::String(_) => T::deserialize(Value::String(tag.to_owned())),
        _ => return Err(first.into()),
    };
    old.map_err(|_| first.into())
}

/// The error for an enum payload that decodes to another variant than the stored name.
pub fn variant_mismatch(stored: &str, decoded: &str) -> BoxError {
    format!("the payload holds variant {decoded:?}, but the event is stored as {stored:?}").into()
}

/// The serde names of `T`'s variants, in order, when `T` deserializes as an externally tagged
/// enum with exactly `variants` of them.
fn serde_variants<T: DeserializeOwned>(variants: usize) -> Option<&'static [&'static str]> {
    let mut found = None;
    let _ = T::deserialize(VariantsProbe(&mut found));
    found.filter(|names| names.len() == variants)
}

/// A deserializer that only records the variant names serde's derive hands to
/// `deserialize_enum`, and fails.
struct VariantsProbe<'a>(&'a mut Option<&'static [&'static str]>);

impl<'de> serde::Deserializer<'de> for VariantsProbe<'_> {
    type Error = serde::de::value::Error;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
        Err(serde::de::Error::custom("not an externally tagged enum"))
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        variants: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, Self::Error> {
        *self.0 = Some(variants);
        Err(serde::de::Error::custom("probed"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map struct identifier
        ignored_any
    }
}
