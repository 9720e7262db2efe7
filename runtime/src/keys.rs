//! Natural keys that change: a context sets or releases an aggregate's key, and the commit
//! writes the change with the aggregate's events, or nothing.

use crate::aggregate::{Aggregate, Root};
use crate::context::Context;
use crate::error::{Error, Result};
use crate::load::check_key;

impl Context {
    /// Gives the aggregate `root` the natural key `key`, in place of the one it has (if any).
    /// The change is written by [`commit`](Context::commit) with the aggregate's events, under
    /// the same version check, or not at all; at commit a key another aggregate of the type
    /// holds is [`Error::KeyTaken`], and nothing of the context is written.
    ///
    /// Keys are compared byte for byte (`"Ann"` and `"ann"` are two keys) and are at most
    /// [`StoreOptions::max_key_bytes`](crate::StoreOptions::max_key_bytes) long. The old key is
    /// free once the commit is written. Within this context, `load_by_key` finds the aggregate
    /// by its new key and no longer by its old one.
    ///
    /// ```
    /// # use annals::prelude::*;
    /// # use serde::{Deserialize, Serialize};
    /// # #[derive(Event, Serialize, Deserialize)]
    /// # #[event(name = "doc.rekey.renamed")]
    /// # struct Renamed { to: String }
    /// # #[derive(Aggregate, Default)]
    /// # #[aggregate(name = "doc.rekey.user", events(Renamed))]
    /// # struct User { email: String }
    /// # impl Apply<Renamed> for User { fn apply(&mut self, e: &Renamed) { self.email = e.to.clone() } }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), annals::Error> {
    /// # let store = Store::open("memory:").await?;
    /// # store.transact(async |ctx| {
    /// #     let mut u = ctx.create_with_key::<User>("ann@old.example").await?;
    /// #     ctx.apply(&mut u, Renamed { to: "ann@old.example".into() })?;
    /// #     Ok::<_, annals::Error>(())
    /// # }).await?;
    /// let mut ctx = store.begin();
    /// let mut user = ctx.load_by_key::<User>("ann@old.example").await?;
    /// ctx.apply(&mut user, Renamed { to: "ann@new.example".into() })?;
    /// ctx.change_key(&mut user, "ann@new.example")?;
    /// ctx.commit().await?;
    ///
    /// let mut ctx = store.begin_read_only();
    /// assert!(ctx.find_by_key::<User>("ann@old.example").await?.is_none());
    /// assert_eq!(ctx.load_by_key::<User>("ann@new.example").await?.email, "ann@new.example");
    /// # Ok(()) }
    /// ```
    pub fn change_key<A: Aggregate>(&mut self, root: &mut Root<A>, key: &str) -> Result<()> {
        check_key(key, self.store.inner.options.max_key_bytes)?;
        let index = self.staging_index(root)?;
        if let Some(&other) = self.by_key.get(&(A::NAME, key.to_owned()))
            && other != index
        {
            return Err(Error::KeyTaken {
                aggregate_type: A::NAME.to_owned(),
                key: key.to_owned(),
            });
        }
        self.rekey(index, Some(key.to_owned()));
        root.key = Some(key.to_owned());
        Ok(())
    }

    /// Releases the natural key of `root`: the aggregate lives on without one (it loads by
    /// id), and the key is free for another aggregate once the commit is written. Written by
    /// [`commit`](Context::commit) with the aggregate's events, or not at all.
    pub fn release_key<A: Aggregate>(&mut self, root: &mut Root<A>) -> Result<()> {
        let index = self.staging_index(root)?;
        self.rekey(index, None);
        root.key = None;
        Ok(())
    }

    /// Records the key change of the tracked aggregate `index` and moves it in the key index.
    fn rekey(&mut self, index: usize, key: Option<String>) {
        let Some(tracked) = self.tracked.get_mut(index) else {
            return;
        };
        if let Some(old) = tracked.key.take() {
            let slot = (tracked.aggregate_type, old);
            if self.by_key.get(&slot) == Some(&index) {
                self.by_key.remove(&slot);
            }
        }
        if let Some(new) = &key {
            self.by_key
                .insert((tracked.aggregate_type, new.clone()), index);
        }
        tracked.key = key.clone();
        // A new aggregate is inserted with whatever key it has at commit.
        if !tracked.is_new {
            tracked.rekey = Some(key);
        }
    }
}
