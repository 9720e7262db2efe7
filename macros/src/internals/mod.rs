//! Parsing and validation shared by both derives: the input model, the attributes, and the
//! error collector.

pub mod ast;
pub mod attr;
pub mod check;
pub mod ctxt;
pub mod symbol;
