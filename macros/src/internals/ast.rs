//! The model of a derive's input: what kind of item, its variants, and the raw attributes the
//! `attr` stage reads.

use proc_macro2::TokenTree;
use syn::parse::{Parse, ParseStream};
use syn::{Attribute, Generics, Ident, Token, Visibility, WhereClause, braced};

use super::ctxt::Ctxt;

/// A derive's input, as far as the derives read it: the attributes, the name, the generics and,
/// for an enum, each variant's attributes and name. Fields and discriminants are skipped
/// unparsed: no derive reads them, and parsing their types is most of what a full
/// `syn::DeriveInput` costs, paid for every derived type on every build.
pub struct Input {
    pub attrs: Vec<Attribute>,
    pub ident: Ident,
    pub generics: Generics,
    pub data: Data,
}

pub enum Data {
    Struct,
    Enum(Vec<Variant>),
    Union(Token![union]),
}

/// An enum variant: its attributes and name.
pub struct Variant {
    pub attrs: Vec<Attribute>,
    pub ident: Ident,
}

impl Parse for Input {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        let attrs = input.call(Attribute::parse_outer)?;
        let _: Visibility = input.parse()?;
        let lookahead = input.lookahead1();
        let data = if lookahead.peek(Token![struct]) {
            input.parse::<Token![struct]>()?;
            None
        } else if lookahead.peek(Token![enum]) {
            input.parse::<Token![enum]>()?;
            Some(Vec::new())
        } else if lookahead.peek(Token![union]) {
            let union = input.parse::<Token![union]>()?;
            let ident = input.parse()?;
            let generics = input.parse()?;
            skip_rest(input)?;
            return Ok(Input {
                attrs,
                ident,
                generics,
                data: Data::Union(union),
            });
        } else {
            return Err(lookahead.error());
        };
        let ident: Ident = input.parse()?;
        let generics: Generics = input.parse()?;
        let Some(mut variants) = data else {
            // A struct: its fields, where clause and `;` are not read.
            skip_rest(input)?;
            return Ok(Input {
                attrs,
                ident,
                generics,
                data: Data::Struct,
            });
        };
        let _: Option<WhereClause> = input.parse()?;
        let body;
        braced!(body in input);
        while !body.is_empty() {
            let attrs = body.call(Attribute::parse_outer)?;
            let ident = body.parse()?;
            // The fields (one group) and a discriminant, up to the comma.
            while !body.is_empty() && !body.peek(Token![,]) {
                body.parse::<TokenTree>()?;
            }
            if !body.is_empty() {
                body.parse::<Token![,]>()?;
            }
            variants.push(Variant { attrs, ident });
        }
        Ok(Input {
            attrs,
            ident,
            generics,
            data: Data::Enum(variants),
        })
    }
}

/// Consumes the rest of the input without parsing it.
fn skip_rest(input: ParseStream<'_>) -> syn::Result<()> {
    input.step(|cursor| {
        let mut rest = *cursor;
        while let Some((_, next)) = rest.token_tree() {
            rest = next;
        }
        Ok(((), rest))
    })
}

pub struct Container<'a> {
    pub ident: &'a Ident,
    pub data: Shape<'a>,
}

pub enum Shape<'a> {
    Struct,
    Enum(Vec<&'a Variant>),
}

impl<'a> Container<'a> {
    /// The model, or `None` (with the error recorded) for an item the derive does not support.
    pub fn from_ast(cx: &mut Ctxt, input: &'a Input, derive: &str) -> Option<Self> {
        let data = match &input.data {
            Data::Struct => Shape::Struct,
            Data::Enum(variants) => Shape::Enum(variants.iter().collect()),
            Data::Union(union) => {
                cx.error_spanned_by(
                    union,
                    format!("#[derive({derive})] does not support unions; use a struct or an enum"),
                );
                return None;
            }
        };
        Some(Container {
            ident: &input.ident,
            data,
        })
    }
}
