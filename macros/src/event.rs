//! Expansion of `#[derive(Event)]`.

use proc_macro2::{Span, TokenStream};
use quote::{quote, quote_spanned};
use syn::DeriveInput;

use crate::internals::ast::{Container, Shape};
use crate::internals::attr::{EventAttrs, VariantAttrs, runtime_path};
use crate::internals::check;
use crate::internals::ctxt::Ctxt;

pub fn expand(input: &DeriveInput) -> TokenStream {
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
    // (variant, stored name, span of the name)
    let variants: Vec<(&syn::Ident, String, Span)> = match &cont.data {
        Shape::Struct => Vec::new(),
        Shape::Enum(variants) => {
            if let Some(name) = &attrs.name {
                cx.syn_error(syn::Error::new(
                    name.span,
                    "`name` on an event enum is not used: each variant is registered under its \
                     own name; put #[event(name = \"...\")] on the variants",
                ));
            }
            if variants.is_empty() {
                cx.error_spanned_by(ident, "an event enum needs at least one variant");
            }
            variants
                .iter()
                .map(|v| {
                    let va = VariantAttrs::from_attrs(&mut cx, &v.attrs);
                    match va.name {
                        Some(n) => (&v.ident, n.value, n.span),
                        None => (&v.ident, v.ident.to_string(), v.ident.span()),
                    }
                })
                .collect()
        }
    };
    check::unique_names(&mut cx, variants.iter().map(|(_, n, s)| (n.as_str(), *s)));

    let krate = runtime_path(attrs.krate.as_ref());
    let private = quote!(#krate::__private);
    let version = attrs.version.as_ref().map_or(1, |v| v.value);

    if !cx.is_ok() {
        return cx.into_errors_with_fallback(&input.generics, quote! {
            const _: () = {
                #[automatically_derived]
                impl #krate::Event for #ident {
                    const NAMES: &'static [&'static str] = &[];
                    const VERSION: u32 = 1;
                    fn name(&self) -> &'static str { "" }
                    fn encode(&self) -> ::core::result::Result<::std::vec::Vec<u8>, #private::BoxError> {
                        ::core::result::Result::Err(::core::convert::From::from("invalid event"))
                    }
                    fn decode(_: &str, _: u32, _: &[u8]) -> ::core::result::Result<Self, #private::BoxError> {
                        ::core::result::Result::Err(::core::convert::From::from("invalid event"))
                    }
                }
            };
        });
    }

    let (names, name_body, encode_body, decode_body) = match &cont.data {
        Shape::Struct => (
            vec![type_name.clone()],
            quote!(#type_name),
            quote_spanned!(ident.span()=> #private::encode_json(self)),
            quote_spanned!(ident.span()=> #private::decode_json::<Self>(__payload)),
        ),
        Shape::Enum(_) => {
            let count = variants.len();
            let arms = variants
                .iter()
                .map(|(v, name, _)| quote!(Self::#v { .. } => #name,));
            let indices = variants
                .iter()
                .enumerate()
                .map(|(index, (_, name, _))| quote!(#name => #index,));
            // Only the variant's content is stored; the registered name says which variant.
            let encode = quote_spanned! {ident.span()=>
                #private::encode_enum::<Self>(self, #count)
            };
            let decode = quote_spanned! {ident.span()=>
                let __index: usize = match __name {
                    #(#indices)*
                    _ => {
                        return ::core::result::Result::Err(#private::unknown_variant(
                            __name,
                            #private::type_name::<Self>(),
                        ));
                    }
                };
                #private::decode_enum::<Self>(
                    __payload,
                    __name,
                    __index,
                    #count,
                    <Self as #krate::Event>::name,
                )
            };
            (
                variants.iter().map(|(_, n, _)| n.clone()).collect(),
                quote!(match self { #(#arms)* }),
                encode,
                decode,
            )
        }
    };

    quote! {
        const _: () = {
            #[automatically_derived]
            impl #krate::Event for #ident {
                const NAMES: &'static [&'static str] = &[#(#names),*];
                const VERSION: u32 = #version;

                fn name(&self) -> &'static str {
                    #name_body
                }

                fn encode(&self) -> ::core::result::Result<::std::vec::Vec<u8>, #private::BoxError> {
                    #encode_body
                }

                #[allow(unused_variables)]
                fn decode(
                    __name: &str,
                    __version: u32,
                    __payload: &[u8],
                ) -> ::core::result::Result<Self, #private::BoxError> {
                    #decode_body
                }
            }

            #private::inventory::submit! {
                #private::EventRegistration {
                    names: <#ident as #krate::Event>::NAMES,
                    version: #version,
                    rust_type: #private::type_name::<#ident>,
                }
            }
        };
    }
}
