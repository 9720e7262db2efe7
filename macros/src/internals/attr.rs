//! Parses `#[event(...)]`, `#[aggregate(...)]` and `#[projection(...)]` into typed values. Every mistake is recorded
//! in the context with its span; parsing goes on, so all mistakes are reported together.

use proc_macro2::Span;
use syn::meta::ParseNestedMeta;
use syn::spanned::Spanned as _;
use syn::{Attribute, Expr, ExprLit, Lit, LitStr, Path};

use super::ctxt::Ctxt;
use super::symbol::*;

/// A value with the span the user wrote it at.
pub struct Spanned<T> {
    pub value: T,
    pub span: Span,
}

/// The path generated code names the runtime by: `crate = "..."`, or `::annals`.
pub fn runtime_path(krate: Option<&Spanned<Path>>) -> proc_macro2::TokenStream {
    match krate {
        Some(k) => {
            let path = &k.value;
            quote::quote!(#path)
        }
        None => quote::quote!(::annals),
    }
}

/// `#[event(...)]` on an event type.
#[derive(Default)]
pub struct EventAttrs {
    pub name: Option<Spanned<String>>,
    pub aliases: Vec<Spanned<String>>,
    pub version: Option<Spanned<u32>>,
    pub upcast: Option<Spanned<Vec<UpcastStep>>>,
    pub krate: Option<Spanned<Path>>,
}

/// One step of `upcast(...)`: how version `from` becomes the next one.
pub struct UpcastStep {
    pub from: Spanned<u32>,
    pub how: UpcastHow,
}

/// A typed step (`1 => OpenedV1`) or a step on the JSON value (`1 => json(function)`).
pub enum UpcastHow {
    Typed(syn::Type),
    Json(Path),
}

/// `#[event(...)]` on an enum variant.
#[derive(Default)]
pub struct VariantAttrs {
    pub name: Option<Spanned<String>>,
    pub aliases: Vec<Spanned<String>>,
}

/// `#[aggregate(...)]`.
#[derive(Default)]
pub struct AggregateAttrs {
    pub name: Option<Spanned<String>>,
    pub events: Option<Spanned<Vec<Path>>>,
    pub snapshot_every: Option<Spanned<u64>>,
    pub snapshot_version: Option<Spanned<u32>>,
    pub krate: Option<Spanned<Path>>,
}

/// `#[projection(...)]`.
#[derive(Default)]
pub struct ProjectionAttrs {
    pub name: Option<Spanned<String>>,
    pub events: Option<Spanned<Vec<Path>>>,
    pub reset: Option<Spanned<syn::Ident>>,
    pub krate: Option<Spanned<Path>>,
}

impl ProjectionAttrs {
    pub fn from_attrs(cx: &mut Ctxt, attrs: &[Attribute]) -> Self {
        let mut out = ProjectionAttrs::default();
        for_each_key(
            cx,
            attrs,
            PROJECTION,
            PROJECTION_KEYS,
            |cx, key, meta| match key {
                NAME => set(cx, meta, &mut out.name, parse_name(meta)),
                EVENTS => set(cx, meta, &mut out.events, parse_events(meta)),
                RESET => set(cx, meta, &mut out.reset, parse_method(meta)),
                CRATE => set(cx, meta, &mut out.krate, parse_crate(meta)),
                _ => {}
            },
        );
        out
    }
}

/// `reset = method`: the name of a method of the type.
fn parse_method(meta: &ParseNestedMeta<'_>) -> syn::Result<Spanned<syn::Ident>> {
    let value = meta.value()?;
    let ident: syn::Ident = value.parse().map_err(|e| {
        syn::Error::new(
            e.span(),
            "expected `reset = method_name`, the name of an async method of this type",
        )
    })?;
    Ok(Spanned {
        span: ident.span(),
        value: ident,
    })
}

impl EventAttrs {
    pub fn from_attrs(cx: &mut Ctxt, attrs: &[Attribute]) -> Self {
        let mut out = EventAttrs::default();
        for_each_key(cx, attrs, EVENT, EVENT_KEYS, |cx, key, meta| match key {
            NAME => set(cx, meta, &mut out.name, parse_name(meta)),
            ALIAS => push(cx, &mut out.aliases, parse_name(meta)),
            VERSION => set(cx, meta, &mut out.version, parse_int(meta, key, 1)),
            UPCAST => set(cx, meta, &mut out.upcast, parse_upcast(meta)),
            CRATE => set(cx, meta, &mut out.krate, parse_crate(meta)),
            _ => {}
        });
        out
    }
}

/// Stores one more value of a key that may be given several times.
fn push<T>(cx: &mut Ctxt, slot: &mut Vec<Spanned<T>>, parsed: syn::Result<Spanned<T>>) {
    match parsed {
        Ok(value) => slot.push(value),
        Err(e) => cx.syn_error(e),
    }
}

/// `upcast(1 => OpenedV1, 2 => json(function), ...)`.
fn parse_upcast(meta: &ParseNestedMeta<'_>) -> syn::Result<Spanned<Vec<UpcastStep>>> {
    const EXPECTED: &str = "expected steps from older versions, as in \
                            upcast(1 => OpenedV1, 2 => json(rename_owner))";
    if !meta.input.peek(syn::token::Paren) {
        return Err(meta.error(EXPECTED));
    }
    let content;
    syn::parenthesized!(content in meta.input);
    let steps = parse_steps(&content, EXPECTED);
    // The rest of a list with a mistake is skipped: its error is the one reported.
    while !content.is_empty() {
        content.parse::<proc_macro2::TokenTree>()?;
    }
    Ok(Spanned {
        value: steps?,
        span: meta.path.span(),
    })
}

/// The steps inside `upcast(...)`.
fn parse_steps(
    content: syn::parse::ParseStream<'_>,
    expected: &str,
) -> syn::Result<Vec<UpcastStep>> {
    let mut steps = Vec::new();
    while !content.is_empty() {
        let int: syn::LitInt = content
            .parse()
            .map_err(|e| syn::Error::new(e.span(), expected))?;
        let from: u32 = int.base10_parse()?;
        if from < 1 {
            return Err(syn::Error::new_spanned(int, "versions start at 1"));
        }
        content
            .parse::<syn::Token![=>]>()
            .map_err(|e| syn::Error::new(e.span(), expected))?;
        let how = if content.peek(syn::Ident) && content.peek2(syn::token::Paren) && {
            let fork = content.fork();
            fork.parse::<syn::Ident>().is_ok_and(|i| i == "json")
        } {
            content.parse::<syn::Ident>()?;
            let inner;
            syn::parenthesized!(inner in content);
            let path: Path = inner.parse()?;
            if !inner.is_empty() {
                return Err(inner.error("expected one function, as in json(rename_owner)"));
            }
            UpcastHow::Json(path)
        } else {
            UpcastHow::Typed(content.parse()?)
        };
        steps.push(UpcastStep {
            from: Spanned {
                value: from,
                span: int.span(),
            },
            how,
        });
        if content.is_empty() {
            break;
        }
        content.parse::<syn::Token![,]>()?;
    }
    Ok(steps)
}

impl VariantAttrs {
    pub fn from_attrs(cx: &mut Ctxt, attrs: &[Attribute]) -> Self {
        let mut out = VariantAttrs::default();
        for_each_key(cx, attrs, EVENT, VARIANT_KEYS, |cx, key, meta| match key {
            NAME => set(cx, meta, &mut out.name, parse_name(meta)),
            ALIAS => push(cx, &mut out.aliases, parse_name(meta)),
            _ => {}
        });
        out
    }
}

impl AggregateAttrs {
    pub fn from_attrs(cx: &mut Ctxt, attrs: &[Attribute]) -> Self {
        let mut out = AggregateAttrs::default();
        for_each_key(
            cx,
            attrs,
            AGGREGATE,
            AGGREGATE_KEYS,
            |cx, key, meta| match key {
                NAME => set(cx, meta, &mut out.name, parse_name(meta)),
                EVENTS => set(cx, meta, &mut out.events, parse_events(meta)),
                SNAPSHOT_EVERY => set(cx, meta, &mut out.snapshot_every, parse_int(meta, key, 1)),
                SNAPSHOT_VERSION => {
                    set(cx, meta, &mut out.snapshot_version, parse_int(meta, key, 1))
                }
                CRATE => set(cx, meta, &mut out.krate, parse_crate(meta)),
                _ => {}
            },
        );
        out
    }
}

/// Calls `f` for every `key = ...` (or `key(...)`) inside every `#[attr_name(...)]`; an
/// unknown key is an error listing the accepted ones. After a key whose value was bad, parsing
/// resumes at the next comma, so one mistake does not hide the others.
fn for_each_key(
    cx: &mut Ctxt,
    attrs: &[Attribute],
    attr_name: &str,
    known: &'static [&'static str],
    mut f: impl FnMut(&mut Ctxt, &'static str, &ParseNestedMeta<'_>),
) {
    for attr in attrs.iter().filter(|a| a.path().is_ident(attr_name)) {
        let result = attr.parse_nested_meta(|meta| {
            let key = meta.path.get_ident().map(ToString::to_string);
            match known.iter().find(|k| Some(**k) == key.as_deref()) {
                Some(key) => f(cx, key, &meta),
                None => {
                    let shown = key.unwrap_or_else(|| {
                        let path = &meta.path;
                        quote::quote!(#path).to_string()
                    });
                    cx.syn_error(meta.error(format!(
                        "unknown {attr_name} attribute `{shown}`; expected one of: {}",
                        known.join(", ")
                    )));
                }
            }
            while !meta.input.is_empty() && !meta.input.peek(syn::Token![,]) {
                meta.input.parse::<proc_macro2::TokenTree>()?;
            }
            Ok(())
        });
        if let Err(e) = result {
            cx.syn_error(e);
        }
    }
}

/// Stores a parsed value, reporting a key given twice.
fn set<T>(
    cx: &mut Ctxt,
    meta: &ParseNestedMeta<'_>,
    slot: &mut Option<Spanned<T>>,
    parsed: syn::Result<Spanned<T>>,
) {
    match parsed {
        Ok(value) if slot.is_some() => {
            let key = meta
                .path
                .get_ident()
                .map(ToString::to_string)
                .unwrap_or_default();
            cx.syn_error(syn::Error::new(value.span, format!("duplicate `{key}`")));
        }
        Ok(value) => *slot = Some(value),
        Err(e) => cx.syn_error(e),
    }
}

/// The literal after `key =`, or an error saying which kind of value `key` takes.
fn literal(meta: &ParseNestedMeta<'_>, expected: &str) -> syn::Result<Lit> {
    let key = meta
        .path
        .get_ident()
        .map(ToString::to_string)
        .unwrap_or_default();
    let value = meta
        .value()
        .map_err(|_| meta.error(format!("`{key}` takes a value: {key} = {expected}")))?;
    let expr: Expr = value.parse()?;
    match expr {
        Expr::Lit(ExprLit { lit, .. }) => Ok(lit),
        other => Err(syn::Error::new_spanned(
            other,
            format!("expected {expected} for `{key}`"),
        )),
    }
}

fn parse_string(meta: &ParseNestedMeta<'_>, expected: &str) -> syn::Result<LitStr> {
    match literal(meta, expected)? {
        Lit::Str(s) => Ok(s),
        other => {
            let key = meta
                .path
                .get_ident()
                .map(ToString::to_string)
                .unwrap_or_default();
            Err(syn::Error::new_spanned(
                other,
                format!("expected {expected} for `{key}`"),
            ))
        }
    }
}

fn parse_name(meta: &ParseNestedMeta<'_>) -> syn::Result<Spanned<String>> {
    let lit = parse_string(meta, "a string, as in name = \"account.opened\"")?;
    let value = lit.value();
    if value.is_empty() {
        return Err(syn::Error::new_spanned(lit, "the name must not be empty"));
    }
    if value.len() > 200 || value.chars().any(char::is_control) {
        return Err(syn::Error::new_spanned(
            lit,
            "the name must be at most 200 bytes, with no control characters",
        ));
    }
    Ok(Spanned {
        value,
        span: lit.span(),
    })
}

fn parse_int<T>(meta: &ParseNestedMeta<'_>, key: &str, min: T) -> syn::Result<Spanned<T>>
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display,
    T::Err: std::fmt::Display,
{
    let expected = format!("an integer, as in {key} = {min}");
    match literal(meta, &expected)? {
        Lit::Int(int) => {
            let value: T = int.base10_parse()?;
            if value < min {
                return Err(syn::Error::new_spanned(
                    int,
                    format!("`{key}` must be at least {min}"),
                ));
            }
            Ok(Spanned {
                value,
                span: int.span(),
            })
        }
        other => Err(syn::Error::new_spanned(
            other,
            format!("expected {expected}"),
        )),
    }
}

fn parse_crate(meta: &ParseNestedMeta<'_>) -> syn::Result<Spanned<Path>> {
    let lit = parse_string(meta, "a string path, as in crate = \"::annals\"")?;
    Ok(Spanned {
        value: lit.parse()?,
        span: lit.span(),
    })
}

fn parse_events(meta: &ParseNestedMeta<'_>) -> syn::Result<Spanned<Vec<Path>>> {
    let mut events = Vec::new();
    if meta.input.peek(syn::Token![=]) {
        return Err(meta.error("expected a list of event types, as in events(Opened, Deposited)"));
    }
    meta.parse_nested_meta(|inner| {
        if !inner.input.is_empty() && !inner.input.peek(syn::Token![,]) {
            return Err(inner.error("expected an event type, as in events(Opened, Deposited)"));
        }
        events.push(inner.path);
        Ok(())
    })?;
    Ok(Spanned {
        value: events,
        span: meta.path.span(),
    })
}
