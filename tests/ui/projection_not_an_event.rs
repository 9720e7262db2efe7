use annals::prelude::*;

struct Plain;

#[derive(Projection)]
#[projection(events(Plain))]
struct Model;

fn main() {}
