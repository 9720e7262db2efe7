//! The model of a derive's input: what kind of item, its variants, and the raw attributes the
//! `attr` stage reads.

use syn::{Data, DeriveInput, Ident};

use super::ctxt::Ctxt;

pub struct Container<'a> {
    pub ident: &'a Ident,
    pub data: Shape<'a>,
}

pub enum Shape<'a> {
    Struct,
    Enum(Vec<&'a syn::Variant>),
}

impl<'a> Container<'a> {
    /// The model, or `None` (with the error recorded) for an item the derive does not support.
    pub fn from_ast(cx: &mut Ctxt, input: &'a DeriveInput, derive: &str) -> Option<Self> {
        let data = match &input.data {
            Data::Struct(_) => Shape::Struct,
            Data::Enum(e) => Shape::Enum(e.variants.iter().collect()),
            Data::Union(u) => {
                cx.error_spanned_by(
                    u.union_token,
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
