//! The derives work in a module that shadows the prelude's names: generated code names
//! everything by absolute path.

#![allow(dead_code, non_camel_case_types, non_upper_case_globals)]

mod shadowing {
    use annals::{Aggregate, Apply, Event};
    use serde::{Deserialize, Serialize};

    pub struct Result;
    pub struct Ok;
    pub struct Err;
    pub struct Option;
    pub struct Some;
    pub struct None;
    pub struct Vec;
    pub struct String;
    pub struct Box;
    pub struct inventory;
    pub struct serde_json;
    pub mod core {}
    pub mod std {}

    // Constants named like the locals and parameters of generated code: a plain `payload` in
    // a pattern position would match against these instead of binding.
    pub const payload: u8 = 0;
    pub const name: u8 = 0;
    pub const version: u8 = 0;
    pub const stored: u8 = 0;
    pub const event: u8 = 0;
    pub const value: u8 = 0;
    pub const decoded: u8 = 0;
    pub const index: u8 = 0;
    pub const state: u8 = 0;
    pub const n: u8 = 0;

    #[derive(Event, Serialize, Deserialize, Debug, PartialEq)]
    #[event(name = "hygiene.noted", version = 3)]
    pub struct Noted {
        pub text: ::std::string::String,
    }

    #[derive(Event, Serialize, Deserialize, Debug, PartialEq)]
    pub enum Toggled {
        On,
        Off { reason: ::std::string::String },
    }

    #[derive(Aggregate, Serialize, Deserialize, Default, Debug)]
    #[aggregate(
        name = "hygiene.note",
        events(Noted, Toggled),
        snapshot_every = 2,
        snapshot_version = 4
    )]
    pub struct Note {
        pub texts: ::std::vec::Vec<::std::string::String>,
        pub on: bool,
    }

    impl Apply<Noted> for Note {
        fn apply(&mut self, e: &Noted) {
            self.texts.push(e.text.clone());
        }
    }

    impl Apply<Toggled> for Note {
        fn apply(&mut self, e: &Toggled) {
            self.on = matches!(e, Toggled::On);
        }
    }
}

#[tokio::test]
async fn derives_ignore_shadowed_names() {
    use annals::{Error, Event, Store};
    use shadowing::{Note, Noted, Toggled};

    assert_eq!(<Noted as Event>::NAMES, ["hygiene.noted"]);
    assert_eq!(<Noted as Event>::VERSION, 3);
    assert_eq!(<Toggled as Event>::NAMES, ["On", "Off"]);

    let store = Store::open("memory:").await.unwrap();
    let id = store
        .transact(async |ctx| {
            let mut note = ctx.create::<Note>()?;
            ctx.apply(&mut note, Noted { text: "a".into() })?;
            ctx.apply(&mut note, Toggled::On)?;
            ctx.apply(&mut note, Noted { text: "b".into() })?;
            Ok::<_, Error>(note.id())
        })
        .await
        .unwrap();
    let note = store.begin_read_only().load::<Note>(id).await.unwrap();
    assert_eq!(
        (note.texts.clone(), note.on, note.version()),
        (vec!["a".to_owned(), "b".to_owned()], true, 3)
    );
}

/// `crate = "..."` makes the generated code name annals by another path, for users who rename
/// the dependency.
mod renamed {
    use annals as events_lib;
    use events_lib::{Aggregate, Apply, Event};
    use serde::{Deserialize, Serialize};

    #[derive(Event, Serialize, Deserialize)]
    #[event(crate = "events_lib", name = "renamed.rang")]
    pub struct Rang;

    #[derive(Aggregate, Default)]
    #[aggregate(crate = "events_lib", name = "renamed.bell", events(Rang))]
    pub struct Bell {
        pub rings: u32,
    }

    impl Apply<Rang> for Bell {
        fn apply(&mut self, _: &Rang) {
            self.rings += 1;
        }
    }
}

#[test]
fn crate_attribute_renames_the_runtime_path() {
    use annals::{Aggregate, Event};
    assert_eq!(<renamed::Rang as Event>::NAMES, ["renamed.rang"]);
    assert_eq!(<renamed::Bell as Aggregate>::NAME, "renamed.bell");
    assert!(annals::registry().aggregate("renamed.bell").is_some());
}
