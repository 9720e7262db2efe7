//! Checks that go beyond one attribute: generics, variants, the events list.

use std::collections::HashSet;

use quote::ToTokens;
use syn::{Generics, Path};

use super::ctxt::Ctxt;

/// Registered types have one fixed name, so they cannot be generic.
pub fn no_generics(cx: &mut Ctxt, generics: &Generics, derive: &str) {
    if !generics.params.is_empty() {
        cx.error_spanned_by(
            generics,
            format!(
                "#[derive({derive})] does not support generic types: each type is registered \
                 under one name"
            ),
        );
    }
}

/// Every name and alias appears once; a repeat is an error at its second use.
pub fn unique_names<'a>(
    cx: &mut Ctxt,
    names: impl IntoIterator<Item = (&'a str, proc_macro2::Span)>,
    within: &str,
) {
    let mut seen = HashSet::new();
    for (name, span) in names {
        if !seen.insert(name) {
            cx.syn_error(syn::Error::new(
                span,
                format!("event name {name:?} is used twice in {within}"),
            ));
        }
    }
}

/// The events list is not empty and names each type once.
pub fn events_list(cx: &mut Ctxt, events: &[Path], list_span: proc_macro2::Span, what: &str) {
    if events.is_empty() {
        cx.syn_error(syn::Error::new(
            list_span,
            format!("`events(...)` is empty: list the events {what}"),
        ));
    }
    let mut seen = HashSet::new();
    for path in events {
        let text = path.to_token_stream().to_string();
        if !seen.insert(text.clone()) {
            cx.error_spanned_by(path, format!("event `{text}` is listed twice"));
        }
    }
}
