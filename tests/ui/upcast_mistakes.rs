use annals::{Event, JsonEvent};
use serde::{Deserialize, Serialize};

fn fix(_: &mut JsonEvent) {}

#[derive(Deserialize)]
struct OldOpened {}

#[derive(Event, Serialize, Deserialize)]
#[event(upcast(1 => json(fix)))]
struct NoVersion {}

#[derive(Event, Serialize, Deserialize)]
#[event(version = 2, upcast(2 => json(fix), 1 => json(fix), 1 => OldOpened))]
struct NotOlder {}

#[derive(Event, Serialize, Deserialize)]
#[event(version = 3, upcast(1 => OldOpened, 2 => json(fix)))]
struct JsonAfterTyped {}

#[derive(Event, Serialize, Deserialize)]
#[event(version = 2, upcast(1 => OldOpened))]
enum TypedOnEnum {
    A,
}

#[derive(Event, Serialize, Deserialize)]
#[event(alias = "old.b")]
enum AliasOnEnum {
    #[event(name = "b", alias = "a")]
    B,
    #[event(name = "a")]
    A,
}

#[derive(Event, Serialize, Deserialize)]
#[event(name = "same", alias = "same")]
struct AliasIsItsName {}

#[derive(Event, Serialize, Deserialize)]
#[event(version = 2, upcast(one => OldOpened))]
struct BadSyntax {}

fn main() {}
