//! Collects every error a derive finds, so the user sees all of them at once.

use proc_macro2::TokenStream;
use quote::ToTokens;
use std::fmt::Display;

#[derive(Default)]
pub struct Ctxt {
    errors: Vec<syn::Error>,
}

impl Ctxt {
    pub fn new() -> Self {
        Ctxt::default()
    }

    /// Records an error at the span of `tokens`.
    pub fn error_spanned_by<T: ToTokens>(&mut self, tokens: T, message: impl Display) {
        self.errors.push(syn::Error::new_spanned(tokens, message));
    }

    /// Records a `syn` error as it is.
    pub fn syn_error(&mut self, error: syn::Error) {
        self.errors.push(error);
    }

    /// True when nothing went wrong.
    pub fn is_ok(&self) -> bool {
        self.errors.is_empty()
    }

    /// The errors, followed by `fallback` (a minimal impl that spares the user follow-on
    /// errors) unless the type is generic, where no such impl can be written.
    pub fn into_errors_with_fallback(
        self,
        generics: &syn::Generics,
        fallback: TokenStream,
    ) -> TokenStream {
        let errors = self.into_compile_errors();
        if generics.params.is_empty() {
            quote::quote!(#errors #fallback)
        } else {
            errors
        }
    }

    /// Every error as `compile_error!` invocations.
    pub fn into_compile_errors(self) -> TokenStream {
        self.errors
            .into_iter()
            .map(syn::Error::into_compile_error)
            .collect()
    }
}
