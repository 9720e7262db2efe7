//! Expansion of `#[derive(Projection)]`: the `Projection` impl (its name and filter) and the
//! `Handler` impl that decodes each listed event and calls its `On` impl.

use std::collections::HashSet;

use proc_macro2::TokenStream;
use quote::{ToTokens, quote, quote_spanned};
use syn::Path;
use syn::spanned::Spanned;

use crate::aggregate::{listed_events, respan};
use crate::internals::ast::{Container, Input};
use crate::internals::attr::{ProjectionAttrs, runtime_path};
use crate::internals::check;
use crate::internals::ctxt::Ctxt;

pub fn expand(input: &Input) -> TokenStream {
    let mut cx = Ctxt::new();
    if Container::from_ast(&mut cx, input, "Projection").is_none() {
        return cx.into_compile_errors();
    }
    let attrs = ProjectionAttrs::from_attrs(&mut cx, &input.attrs);
    check::no_generics(&mut cx, &input.generics, "Projection");

    let ident = &input.ident;
    let events: Vec<Path> = match &attrs.events {
        Some(list) => {
            check::events_list(&mut cx, &list.value, list.span, "this projection handles");
            list.value.clone()
        }
        None => {
            cx.error_spanned_by(
                ident,
                "missing `events(...)`: add #[projection(events(...))] listing the events this \
                 projection handles",
            );
            Vec::new()
        }
    };
    let krate = runtime_path(attrs.krate.as_ref());
    let name = attrs
        .name
        .as_ref()
        .map_or_else(|| ident.to_string(), |n| n.value.clone());
    let mut seen = HashSet::new();
    let events: Vec<&Path> = events
        .iter()
        .filter(|path| seen.insert(path.to_token_stream().to_string()))
        .collect();

    // Each call is spanned at the type in the user's list: a missing `On` impl, or a type that
    // is not an event, is reported there.
    let dispatch = events.iter().map(|path| {
        let krate = respan(&krate, path.span());
        quote_spanned! {path.span()=>
            if #krate::__private::accepts(&<#path as #krate::Event>::REGISTRATION, &__event.event_type) {
                if let ::core::option::Option::Some(__decoded) = __event.decode::<#path>()? {
                    <Self as #krate::subscription::On<#path>>::on(
                        self,
                        __decoded,
                        &#krate::subscription::Envelope::from(__event),
                        __tx,
                    )
                    .await?;
                }
                continue;
            }
        }
    });
    let filter = events
        .iter()
        .map(|path| quote_spanned! {path.span()=> .event::<#path>() });
    let reset = attrs.reset.as_ref().map(|method| {
        let method = &method.value;
        quote_spanned! {method.span()=>
            async fn reset(
                &mut self,
                __tx: &mut #krate::Transaction<'_>,
            ) -> ::core::result::Result<(), #krate::BoxError> {
                self.#method(__tx).await
            }
        }
    });
    let projection = quote! {
        #[automatically_derived]
        impl #krate::subscription::Projection for #ident {
            const NAME: &'static str = #name;

            fn filter() -> #krate::Filter {
                #krate::Filter::all() #(#filter)*
            }
        }
    };
    // Without errors, the dispatch and the reset hook; with errors, a stand-in that compiles,
    // so that only the errors reported above show.
    let (body, reset, registration) = if cx.is_ok() {
        let listed = listed_events(&krate, events.iter().copied());
        (
            quote! {
                for __event in __events {
                    #(#dispatch)*
                }
            },
            reset,
            Some(quote! {
                #krate::__private::inventory::submit! {
                    #krate::__private::ProjectionRegistration {
                        name: #name,
                        rust_type: ::core::concat!(::core::module_path!(), "::", ::core::stringify!(#ident)),
                        events: #listed,
                    }
                }
            }),
        )
    } else {
        (quote! { let _ = (__events, __tx); }, None, None)
    };
    let expanded = quote! {
        const _: () = {
            #projection

            #[automatically_derived]
            impl #krate::subscription::Handler for #ident {
                async fn handle(
                    &mut self,
                    __events: &[#krate::RecordedEvent],
                    __tx: &mut #krate::Transaction<'_>,
                ) -> ::core::result::Result<(), #krate::BoxError> {
                    #body
                    ::core::result::Result::Ok(())
                }

                #reset
            }

            #registration
        };
    };
    if cx.is_ok() {
        expanded
    } else {
        cx.into_errors_with_fallback(&input.generics, expanded)
    }
}
