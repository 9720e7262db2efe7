//! Expansion of `#[derive(Aggregate)]`.

use std::collections::HashSet;

use proc_macro2::TokenStream;
use quote::{ToTokens, quote, quote_spanned};
use syn::Path;
use syn::spanned::Spanned;

use crate::internals::ast::{Container, Input};
use crate::internals::attr::{AggregateAttrs, runtime_path};
use crate::internals::check;
use crate::internals::ctxt::Ctxt;

pub fn expand(input: &Input) -> TokenStream {
    let mut cx = Ctxt::new();
    if Container::from_ast(&mut cx, input, "Aggregate").is_none() {
        return cx.into_compile_errors();
    }
    let attrs = AggregateAttrs::from_attrs(&mut cx, &input.attrs);
    check::no_generics(&mut cx, &input.generics, "Aggregate");

    let ident = &input.ident;
    let events: Vec<Path> = match &attrs.events {
        Some(list) => {
            check::events_list(&mut cx, &list.value, list.span, "this aggregate applies");
            list.value.clone()
        }
        None => {
            cx.error_spanned_by(
                ident,
                "missing `events(...)`: add #[aggregate(events(...))] listing the events this \
                 aggregate applies",
            );
            Vec::new()
        }
    };
    let krate = runtime_path(attrs.krate.as_ref());
    let private = quote!(#krate::__private);
    let name = attrs
        .name
        .as_ref()
        .map_or_else(|| ident.to_string(), |n| n.value.clone());
    let snapshot_version = attrs.snapshot_version.as_ref().map_or(1, |v| v.value);
    if let (Some(v), None) = (&attrs.snapshot_version, &attrs.snapshot_every) {
        cx.syn_error(syn::Error::new(
            v.span,
            "`snapshot_version` has no effect without `snapshot_every`",
        ));
    }

    // One `Handles` impl per listed type, at the span of the type in the user's list: it
    // needs `Apply` of that type, so a missing `Apply` impl is reported there, once. A marker,
    // with no code of its own.
    let mut seen = HashSet::new();
    let handles: Vec<TokenStream> = events
        .iter()
        .filter(|path| seen.insert(path.to_token_stream().to_string()))
        .map(|path| {
            let krate = respan(&krate, path.span());
            let ty = respan(&ident.to_token_stream(), path.span());
            quote_spanned! {path.span()=>
                #[automatically_derived]
                impl #krate::Handles<#path> for #ty {}
            }
        })
        .collect();

    if !cx.is_ok() {
        return cx.into_errors_with_fallback(&input.generics, quote! {
            const _: () = {
                #[automatically_derived]
                impl #krate::Aggregate for #ident {
                    const NAME: &'static str = #name;
                    const SNAPSHOT_EVERY: ::core::option::Option<u64> = ::core::option::Option::None;
                    const SNAPSHOT_VERSION: u32 = 1;
                    fn handler(_: &str) -> ::core::option::Option<#private::Handler<Self>> {
                        ::core::option::Option::None
                    }
                    fn encode_snapshot(&self) -> ::core::option::Option<#private::Result<::std::vec::Vec<u8>>> {
                        ::core::option::Option::None
                    }
                    fn decode_snapshot(_: &[u8], __version: u64) -> #private::Result<Self> {
                        #private::no_snapshots(#name, __version)
                    }
                }
                #(#handles)*
            };
        });
    }

    // Each listed event gets a handler, which a load looks up once per event type and calls
    // for every event of that type: the runtime's one generic `apply_stored`, whose decoding
    // part is the event's alone (shared by every aggregate listing it). It is named at the
    // span of the type in the user's list, as the `Handles` impl that checks `Apply` is.
    let dispatch = events.iter().map(|path| {
        let krate = respan(&krate, path.span());
        let ty = respan(&ident.to_token_stream(), path.span());
        quote_spanned! {path.span()=>
            if #krate::__private::accepts(&<#path as #krate::Event>::REGISTRATION, __name) {
                return ::core::option::Option::Some(#krate::__private::apply_stored::<#ty, #path>);
            }
        }
    });
    let (snapshot_every, encode_snapshot, decode_snapshot) = match &attrs.snapshot_every {
        Some(every) => {
            let every = every.value;
            (
                quote!(::core::option::Option::Some(#every)),
                quote_spanned! {ident.span()=>
                    ::core::option::Option::Some(#private::encode_snapshot(self, #name))
                },
                quote_spanned! {ident.span()=>
                    #private::decode_snapshot::<Self>(__payload, __version, #name, #snapshot_version)
                },
            )
        }
        None => (
            quote!(::core::option::Option::None),
            quote!(::core::option::Option::None),
            quote!(#private::no_snapshots(#name, __version)),
        ),
    };
    let listed = listed_events(&krate, &events);

    quote! {
        #[automatically_derived]
        impl #krate::Aggregate for #ident {
            const NAME: &'static str = #name;
            const SNAPSHOT_EVERY: ::core::option::Option<u64> = #snapshot_every;
            const SNAPSHOT_VERSION: u32 = #snapshot_version;

            fn handler(
                __name: &str,
            ) -> ::core::option::Option<#private::Handler<Self>> {
                #(#dispatch)*
                ::core::option::Option::None
            }

            fn clone_for_cache(&self) -> ::core::option::Option<Self> {
                #[allow(unused_imports)]
                use #private::{CloneByClone as _, CloneNone as _};
                (&#private::CloneProbe::<Self>::NEW).clone_for_cache(self)
            }

            fn encode_snapshot(
                &self,
            ) -> ::core::option::Option<#private::Result<::std::vec::Vec<u8>>> {
                #encode_snapshot
            }

            #[allow(unused_variables)]
            fn decode_snapshot(__payload: &[u8], __version: u64) -> #private::Result<Self> {
                #decode_snapshot
            }
        }

        #(#handles)*

        #private::inventory::submit! {
            #private::AggregateRegistration {
                name: #name,
                rust_type: ::core::concat!(::core::module_path!(), "::", ::core::stringify!(#ident)),
                snapshot_every: #snapshot_every,
                snapshot_version: #snapshot_version,
                events: #listed,
            }
        }
    }
}

/// The registrations of the listed event types, as an aggregate's or a projection's
/// registration carries them: the registry learns of an event type through the types that list
/// it. Each entry is spanned at the type in the user's list.
pub(crate) fn listed_events<'a>(
    krate: &TokenStream,
    events: impl IntoIterator<Item = &'a Path>,
) -> TokenStream {
    let listed = events.into_iter().map(|path| {
        let krate = respan(krate, path.span());
        quote_spanned! {path.span()=>
            #krate::__private::ListedEvent {
                registration: &<#path as #krate::Event>::REGISTRATION,
                rust_type: ::core::stringify!(#path),
            }
        }
    });
    quote!(&[#(#listed),*])
}

/// `tokens` with every span set to `span`: the runtime path in code generated for one listed
/// event, so that an error about that event points at the user's token, not at the derive.
pub(crate) fn respan(tokens: &TokenStream, span: proc_macro2::Span) -> TokenStream {
    tokens
        .clone()
        .into_iter()
        .map(|mut tree| {
            if let proc_macro2::TokenTree::Group(group) = &tree {
                let mut inner =
                    proc_macro2::Group::new(group.delimiter(), respan(&group.stream(), span));
                inner.set_span(span);
                tree = proc_macro2::TokenTree::Group(inner);
            } else {
                tree.set_span(span);
            }
            tree
        })
        .collect()
}
