use annals::prelude::*;

#[derive(Aggregate, Default)]
#[aggregate(name = "empty")]
struct Empty;

fn main() {}
