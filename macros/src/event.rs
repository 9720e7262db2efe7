//! Expansion of `#[derive(Event)]`.

use std::collections::HashSet;

use proc_macro2::{Span, TokenStream};
use quote::{ToTokens, quote, quote_spanned};
use syn::spanned::Spanned;

use crate::internals::ast::{Container, Input, Shape};
use crate::internals::attr::{EventAttrs, UpcastHow, UpcastStep, VariantAttrs, runtime_path};
use crate::internals::check;
use crate::internals::ctxt::Ctxt;

pub fn expand(input: &Input) -> TokenStream {
    let mut cx = Ctxt::new();
    let Some(cont) = Container::from_ast(&mut cx, input, "Event") else {
        return cx.into_compile_errors();
    };
    let attrs = EventAttrs::from_attrs(&mut cx, &input.attrs);
    check::no_generics(&mut cx, &input.generics, "Event");

    let ident = cont.ident;
    let type_name = attrs
        .name
        .as_ref()
        .map_or_else(|| ident.to_string(), |n| n.value.clone());
    // One registered name per struct, or per variant: (variant, name, span of the name, aliases).
    let entries: Vec<Entry<'_>> = match &cont.data {
        Shape::Struct => vec![Entry {
            variant: None,
            name: type_name.clone(),
            span: attrs.name.as_ref().map_or_else(|| ident.span(), |n| n.span),
            aliases: attrs
                .aliases
                .iter()
                .map(|a| (a.value.clone(), a.span))
                .collect(),
        }],
        Shape::Enum(variants) => {
            if let Some(name) = &attrs.name {
                cx.syn_error(syn::Error::new(
                    name.span,
                    "`name` on an event enum is not used: each variant is registered under its \
                     own name; put #[event(name = \"...\")] on the variants",
                ));
            }
            if let Some(alias) = attrs.aliases.first() {
                cx.syn_error(syn::Error::new(
                    alias.span,
                    "`alias` on an event enum is not used: each variant has its own names; put \
                     #[event(alias = \"...\")] on the variants",
                ));
            }
            if variants.is_empty() {
                cx.error_spanned_by(ident, "an event enum needs at least one variant");
            }
            variants
                .iter()
                .map(|v| {
                    let va = VariantAttrs::from_attrs(&mut cx, &v.attrs);
                    let aliases = va
                        .aliases
                        .iter()
                        .map(|a| (a.value.clone(), a.span))
                        .collect();
                    let (name, span) = match va.name {
                        Some(n) => (n.value, n.span),
                        None => (v.ident.to_string(), v.ident.span()),
                    };
                    Entry {
                        variant: Some(&v.ident),
                        name,
                        span,
                        aliases,
                    }
                })
                .collect()
        }
    };
    let within = match cont.data {
        Shape::Struct => "this event",
        Shape::Enum(_) => "this enum",
    };
    check::unique_names(
        &mut cx,
        entries.iter().flat_map(|e| {
            std::iter::once((e.name.as_str(), e.span))
                .chain(e.aliases.iter().map(|(a, s)| (a.as_str(), *s)))
        }),
        within,
    );
    let version = attrs.version.as_ref().map_or(1, |v| v.value);
    let steps = attrs
        .upcast
        .as_ref()
        .map_or(&[][..], |u| u.value.as_slice());
    check_upcast(
        &mut cx,
        &attrs,
        steps,
        version,
        matches!(cont.data, Shape::Enum(_)),
    );

    let krate = runtime_path(attrs.krate.as_ref());
    let private = quote!(#krate::__private);
    // The type's path for messages: a constant, where `type_name` would add a function per type.
    let rust_type = quote!(::core::concat!(
        ::core::module_path!(),
        "::",
        ::core::stringify!(#ident)
    ));

    if !cx.is_ok() {
        return cx.into_errors_with_fallback(
            &input.generics,
            quote! {
                const _: () = {
                    #[automatically_derived]
                    impl #krate::Event for #ident {
                        const REGISTRATION: #private::EventRegistration =
                            #private::EventRegistration::by_hand::<Self>(&[], 1);
                    }
                };
            },
        );
    }

    let upcast = upcast_prelude(&krate, steps, version);
    let methods = match &cont.data {
        // A struct has one name, and its payload is its JSON: the trait's provided `name`,
        // `encode` and `decode` are its own, type-checked once in annals rather than once per
        // event type. Only upcast steps need a `decode` of the type's own.
        Shape::Struct if upcast.is_empty() => TokenStream::new(),
        Shape::Struct => decode_fn(
            &private,
            quote_spanned! {ident.span()=>
                let __name: &'static str = #type_name;
                #upcast
                match #private::serde_json::from_slice::<Self>(__payload) {
                    ::core::result::Result::Ok(__event) => ::core::result::Result::Ok(__event),
                    ::core::result::Result::Err(__error) => {
                        ::core::result::Result::Err(#private::json_error(__error))
                    }
                }
            },
        ),
        Shape::Enum(_) => {
            let count = entries.len();
            let arms = entries.iter().map(|e| {
                let (v, name) = (e.variant, &e.name);
                quote!(Self::#v { .. } => #name,)
            });
            let indices = entries.iter().enumerate().map(|(index, e)| {
                let name = &e.name;
                let aliases = e.aliases.iter().map(|(a, _)| a);
                quote!(#name #(| #aliases)* => (#index, #name),)
            });
            // Only the variant's content is stored; the registered name says which variant.
            let encode = quote_spanned! {ident.span()=>
                #private::encode_enum::<Self>(self, #count)
            };
            let decode = decode_fn(
                &private,
                quote_spanned! {ident.span()=>
                    let (__index, __name): (usize, &'static str) = match __name {
                        #(#indices)*
                        _ => {
                            return ::core::result::Result::Err(#private::unknown_variant(
                                __name,
                                #rust_type,
                            ));
                        }
                    };
                    #upcast
                    #private::decode_enum::<Self>(
                        __payload,
                        __name,
                        __index,
                        #count,
                        <Self as #krate::Event>::name,
                    )
                },
            );
            quote! {
                fn name(&self) -> &'static str {
                    match self { #(#arms)* }
                }

                fn encode(&self) -> ::core::result::Result<::std::vec::Vec<u8>, #private::BoxError> {
                    #encode
                }

                #decode
            }
        }
    };
    let names = entries.iter().map(|e| &e.name);
    let aliases: Vec<_> = entries
        .iter()
        .flat_map(|e| e.aliases.iter().map(move |(a, _)| (a, &e.name)))
        .collect();
    let alias_names = aliases.iter().map(|(a, _)| a);
    let alias_of = aliases.iter().map(|(_, n)| n);
    // Only the fields that are not empty: the others come from `EventRegistration::NONE`.
    let aliases = (!aliases.is_empty()).then(|| {
        quote! {
            aliases: &[#(#alias_names),*],
            alias_of: &[#(#alias_of),*],
        }
    });
    let upcast_regs = steps.iter().map(|step| {
        let from = step.from.value;
        let (typed, path) = match &step.how {
            UpcastHow::Typed(ty) => (true, ty.to_token_stream().to_string()),
            UpcastHow::Json(path) => (false, path.to_token_stream().to_string()),
        };
        quote!(#private::UpcastRegistration { from: #from, typed: #typed, path: #path })
    });
    let upcasts = (!steps.is_empty()).then(|| quote!(upcasts: &[#(#upcast_regs),*],));
    // A struct update that sets nothing would be a lint in the user's crate.
    let rest = (aliases.is_none() || upcasts.is_none())
        .then(|| quote!(..#private::EventRegistration::NONE));

    quote! {
        #[automatically_derived]
        impl #krate::Event for #ident {
            // The one constant: `NAMES`, `ALIASES` and `VERSION` read it.
            const REGISTRATION: #private::EventRegistration = #private::EventRegistration {
                names: &[#(#names),*],
                #aliases
                #upcasts
                version: #version,
                rust_type: #rust_type,
                type_id: #private::TypeId::of::<Self>(),
                #rest
            };

            #methods
        }
    }
}

/// The `decode` method around `body`, which reads `__name`, `__version` and `__payload`.
fn decode_fn(private: &TokenStream, body: TokenStream) -> TokenStream {
    quote! {
        #[allow(unused_variables)]
        fn decode(
            __name: &str,
            __version: u32,
            __payload: &[u8],
        ) -> ::core::result::Result<Self, #private::BoxError> {
            #body
        }
    }
}

/// One registered name of an event type.
struct Entry<'a> {
    /// The enum variant, or `None` for a struct.
    variant: Option<&'a syn::Ident>,
    name: String,
    span: Span,
    aliases: Vec<(String, Span)>,
}

/// Checks the declared upcast steps: each from an older version than the current one, once,
/// typed steps only on structs, and no step on the JSON value after a typed one (a typed step
/// converts into the next typed step's type, up to the current type).
fn check_upcast(
    cx: &mut Ctxt,
    attrs: &EventAttrs,
    steps: &[UpcastStep],
    version: u32,
    is_enum: bool,
) {
    if let (Some(upcast), None) = (&attrs.upcast, &attrs.version) {
        cx.syn_error(syn::Error::new(
            upcast.span,
            "`upcast` needs `version = N`, the current version the steps lead to",
        ));
        return;
    }
    let mut seen = HashSet::new();
    let mut typed_from: Option<u32> = None;
    let mut ordered: Vec<&UpcastStep> = steps.iter().collect();
    ordered.sort_by_key(|s| s.from.value);
    for step in ordered {
        let from = step.from.value;
        if from >= version {
            cx.syn_error(syn::Error::new(
                step.from.span,
                format!(
                    "version {from} is not older than the current version {version}: upcast \
                     steps start from older versions"
                ),
            ));
        }
        if !seen.insert(from) {
            cx.syn_error(syn::Error::new(
                step.from.span,
                format!("version {from} has two upcast steps"),
            ));
            continue;
        }
        match &step.how {
            UpcastHow::Typed(ty) if is_enum => cx.error_spanned_by(
                ty,
                "typed upcast steps are for struct events; on an enum, edit the JSON of each \
                 variant with `json(function)`",
            ),
            UpcastHow::Typed(_) => typed_from = typed_from.or(Some(from)),
            UpcastHow::Json(path) => {
                if let Some(typed) = typed_from {
                    cx.error_spanned_by(
                        path,
                        format!(
                            "a JSON step cannot follow the typed step from version {typed}: a \
                             typed step converts with `From` into the next typed step's type, \
                             up to the current type; make this step typed too"
                        ),
                    );
                }
            }
        }
    }
}

/// The start of `decode` for a type with upcast steps: an older version goes through them.
/// Nothing for a type without steps (a version without a step reads as the next one unchanged).
fn upcast_prelude(krate: &TokenStream, steps: &[UpcastStep], version: u32) -> TokenStream {
    if steps.is_empty() {
        return TokenStream::new();
    }
    let private = quote!(#krate::__private);
    let mut ordered: Vec<&UpcastStep> = steps.iter().collect();
    ordered.sort_by_key(|s| s.from.value);
    let typed: Vec<(u32, &syn::Type)> = ordered
        .iter()
        .filter_map(|s| match &s.how {
            UpcastHow::Typed(ty) => Some((s.from.value, ty)),
            UpcastHow::Json(_) => None,
        })
        .collect();
    let built = ordered.iter().map(|step| {
        let from = step.from.value;
        match &step.how {
            UpcastHow::Json(path) => quote_spanned! {path.span()=>
                #private::Step::Json { from: #from, step: #path }
            },
            UpcastHow::Typed(ty) => {
                // Each conversion is spanned at its source type: a missing `From` is reported
                // at the step that needs it.
                let chain: Vec<&syn::Type> = typed
                    .iter()
                    .filter(|(f, _)| *f >= from)
                    .map(|(_, t)| *t)
                    .collect();
                let converts = chain.windows(2).map(|pair| {
                    let (src, dst) = (pair[0], pair[1]);
                    quote_spanned! {src.span()=>
                        let __value: #dst = ::core::convert::From::from(__value);
                    }
                });
                let last = chain.last().copied().unwrap_or(ty);
                let into_self = quote_spanned! {last.span()=>
                    ::core::result::Result::Ok(<Self as ::core::convert::From<#last>>::from(__value))
                };
                quote_spanned! {ty.span()=>
                    #private::Step::Typed {
                        from: #from,
                        read: |__json| {
                            let __value: #ty = #private::from_json(__json)?;
                            #(#converts)*
                            #into_self
                        },
                    }
                }
            }
        }
    });
    quote! {
        if __version < #version {
            return #private::upcast::<Self>(
                __name,
                __version,
                __payload,
                #version,
                &[#(#built),*],
                |__name, __payload| <Self as #krate::Event>::decode(__name, #version, __payload),
            );
        }
    }
}
