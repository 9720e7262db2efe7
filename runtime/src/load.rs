//! Loading and creating aggregates in a context: the roots a [`Context`] hands out, and what it
//! remembers of each.

use tracing::Instrument;

use crate::aggregate::{Aggregate, AggregateId, Root};
use crate::context::{Context, Origin, Tracked};
use crate::error::{Error, Result, Target};
use crate::event::StoredPayload;
use crate::rebuild::rebuild;
use crate::store::{LoadRequest, Locate, Via};

impl Context {
    /// A new aggregate with a fresh id and no natural key. It exists in the store once this
    /// context commits an event for it.
    pub fn create<A: Aggregate>(&mut self) -> Result<Root<A>> {
        self.writable()?;
        Ok(self.track_new::<A>(AggregateId::new(), None, Origin::Plain))
    }

    /// A new aggregate under an id the caller chose (an id from another system, say: an
    /// [`AggregateId`] or a `uuid::Uuid`), with no natural key. It exists in the store once this context commits an event for it.
    ///
    /// Fails with [`Error::IdTaken`] when an aggregate (of any type) already has this id, in
    /// the store or in this context; a concurrent context that commits the same id first makes
    /// this context's commit fail with `IdTaken` too, writing nothing.
    ///
    /// ```
    /// # use annals::prelude::*;
    /// # use serde::{Deserialize, Serialize};
    /// # #[derive(Event, Serialize, Deserialize)]
    /// # #[event(name = "doc.with_id.imported")]
    /// # struct Imported;
    /// # #[derive(Aggregate, Default)]
    /// # #[aggregate(name = "doc.with_id.order", events(Imported))]
    /// # struct Order;
    /// # impl Apply<Imported> for Order { fn apply(&mut self, _: &Imported) {} }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), annals::Error> {
    /// let store = Store::open("memory:").await?;
    /// let id = uuid::Uuid::now_v7(); // from another system
    /// let mut ctx = store.begin();
    /// let mut order = ctx.create_with_id::<Order>(id).await?;
    /// assert_eq!(order.id(), AggregateId::from(id));
    /// ctx.apply(&mut order, Imported)?;
    /// ctx.commit().await?;
    ///
    /// let again = store.begin().create_with_id::<Order>(id).await;
    /// assert!(matches!(again, Err(annals::Error::IdTaken { .. })));
    /// # Ok(()) }
    /// ```
    pub async fn create_with_id<A: Aggregate>(
        &mut self,
        id: impl Into<AggregateId>,
    ) -> Result<Root<A>> {
        self.create_with_id_via(&mut Via::Store, id.into()).await
    }

    /// [`create_with_id`](Context::create_with_id), reading `via`.
    pub(crate) async fn create_with_id_via<A: Aggregate>(
        &mut self,
        via: &mut Via<'_>,
        id: AggregateId,
    ) -> Result<Root<A>> {
        self.writable()?;
        let found = match self.by_id.get(&id).and_then(|&i| self.tracked.get(i)) {
            Some(t) => Some(t.aggregate_type.to_owned()),
            None => self
                .store
                .locate_via(via, Locate::Id(id))
                .await?
                .map(|row| row.aggregate_type),
        };
        if let Some(found) = found {
            return Err(Error::IdTaken {
                aggregate: id,
                found_type: found,
            });
        }
        Ok(self.track_new::<A>(id, None, Origin::ChosenId))
    }

    /// A new aggregate with the natural key `key`, unique among aggregates of type `A`.
    ///
    /// Fails with [`Error::KeyTaken`] when the key is already committed or created in this
    /// context; a concurrent context that commits the same key first makes this context's
    /// commit fail with `KeyTaken`.
    pub async fn create_with_key<A: Aggregate>(&mut self, key: &str) -> Result<Root<A>> {
        self.create_with_key_via(&mut Via::Store, key).await
    }

    /// [`create_with_key`](Context::create_with_key), reading `via`.
    pub(crate) async fn create_with_key_via<A: Aggregate>(
        &mut self,
        via: &mut Via<'_>,
        key: &str,
    ) -> Result<Root<A>> {
        self.writable()?;
        check_key(key, self.store.inner.options.max_key_bytes)?;
        let taken = self.by_key.contains_key(&(A::NAME, key.to_owned()))
            || self
                .store
                .locate_via(
                    via,
                    Locate::Key {
                        aggregate_type: A::NAME,
                        key,
                    },
                )
                .await?
                .is_some();
        if taken {
            return Err(Error::KeyTaken {
                aggregate_type: A::NAME.to_owned(),
                key: key.to_owned(),
            });
        }
        Ok(self.track_new::<A>(AggregateId::new(), Some(key.to_owned()), Origin::Plain))
    }

    /// Loads the aggregate `id`: the newest snapshot of the current shape, if any, then the
    /// events after it. [`Error::NotFound`] when there is none, [`Error::WrongAggregateType`]
    /// when `id` is an aggregate of another type.
    ///
    /// ```
    /// # use annals::prelude::*;
    /// # use serde::{Deserialize, Serialize};
    /// # #[derive(Event, Serialize, Deserialize)]
    /// # #[event(name = "doc.load.opened")]
    /// # struct Opened { owner: String }
    /// # #[derive(Aggregate, Default)]
    /// # #[aggregate(name = "doc.load.account", events(Opened))]
    /// # struct Account { owner: String }
    /// # impl Apply<Opened> for Account {
    /// #     fn apply(&mut self, e: &Opened) { self.owner = e.owner.clone() }
    /// # }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), annals::Error> {
    /// # let store = Store::open("memory:").await?;
    /// let mut ctx = store.begin();
    /// let mut account = ctx.create::<Account>()?;
    /// ctx.apply(&mut account, Opened { owner: "Ann".into() })?;
    /// let id = account.id(); // keep it: it is how you find this aggregate again
    /// ctx.commit().await?;
    ///
    /// let account = store.begin_read_only().load::<Account>(id).await?;
    /// assert_eq!((account.owner.as_str(), account.version()), ("Ann", 1));
    /// # Ok(()) }
    /// ```
    pub async fn load<A: Aggregate>(&mut self, id: AggregateId) -> Result<Root<A>> {
        self.load_via(&mut Via::Store, id).await
    }

    /// [`load`](Context::load), reading `via`.
    pub(crate) async fn load_via<A: Aggregate>(
        &mut self,
        via: &mut Via<'_>,
        id: AggregateId,
    ) -> Result<Root<A>> {
        if let Some(&index) = self.by_id.get(&id) {
            return self.reload::<A>(via, index).await;
        }
        match self.fetch::<A>(via, Locate::Id(id), None).await? {
            Some(loaded) => self.track_loaded(loaded),
            None => Err(Error::NotFound {
                aggregate_type: A::NAME.to_owned(),
                target: Target::Id(id),
            }),
        }
    }

    /// Loads the aggregate of type `A` with the natural key `key`; [`Error::NotFound`] when
    /// there is none.
    ///
    /// ```
    /// # use annals::prelude::*;
    /// # use serde::{Deserialize, Serialize};
    /// # #[derive(Event, Serialize, Deserialize)]
    /// # #[event(name = "doc.load_by_key.opened")]
    /// # struct Opened { owner: String }
    /// # #[derive(Aggregate, Default)]
    /// # #[aggregate(name = "doc.load_by_key.account", events(Opened))]
    /// # struct Account { owner: String }
    /// # impl Apply<Opened> for Account {
    /// #     fn apply(&mut self, e: &Opened) { self.owner = e.owner.clone() }
    /// # }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), annals::Error> {
    /// # let store = Store::open("memory:").await?;
    /// store.transact(async |ctx| {
    ///     let mut ann = ctx.create_with_key::<Account>("ann@example.com").await?;
    ///     ctx.apply(&mut ann, Opened { owner: "Ann".into() })?;
    ///     Ok::<_, annals::Error>(())
    /// }).await?;
    ///
    /// let mut ctx = store.begin_read_only();
    /// let ann = ctx.load_by_key::<Account>("ann@example.com").await?;
    /// assert_eq!(ann.key(), Some("ann@example.com"));
    /// assert!(matches!(
    ///     ctx.load_by_key::<Account>("bob@example.com").await,
    ///     Err(annals::Error::NotFound { .. })
    /// ));
    /// # Ok(()) }
    /// ```
    pub async fn load_by_key<A: Aggregate>(&mut self, key: &str) -> Result<Root<A>> {
        self.load_by_key_via(&mut Via::Store, key).await
    }

    /// [`load_by_key`](Context::load_by_key), reading `via`.
    pub(crate) async fn load_by_key_via<A: Aggregate>(
        &mut self,
        via: &mut Via<'_>,
        key: &str,
    ) -> Result<Root<A>> {
        match self.find_by_key_via::<A>(via, key).await? {
            Some(root) => Ok(root),
            None => Err(Error::NotFound {
                aggregate_type: A::NAME.to_owned(),
                target: Target::Key(key.to_owned()),
            }),
        }
    }

    /// Loads the aggregate of type `A` with the natural key `key`, or `None` when there is none.
    ///
    /// ```
    /// # use annals::prelude::*;
    /// # use serde::{Deserialize, Serialize};
    /// # #[derive(Event, Serialize, Deserialize)]
    /// # #[event(name = "doc.find_by_key.opened")]
    /// # struct Opened { owner: String }
    /// # #[derive(Aggregate, Default)]
    /// # #[aggregate(name = "doc.find_by_key.account", events(Opened))]
    /// # struct Account { owner: String }
    /// # impl Apply<Opened> for Account {
    /// #     fn apply(&mut self, e: &Opened) { self.owner = e.owner.clone() }
    /// # }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), annals::Error> {
    /// # let store = Store::open("memory:").await?;
    /// let mut ctx = store.begin_read_only();
    /// assert!(ctx.find_by_key::<Account>("nobody").await?.is_none());
    /// # Ok(()) }
    /// ```
    pub async fn find_by_key<A: Aggregate>(&mut self, key: &str) -> Result<Option<Root<A>>> {
        self.find_by_key_via(&mut Via::Store, key).await
    }

    /// [`find_by_key`](Context::find_by_key), reading `via`.
    pub(crate) async fn find_by_key_via<A: Aggregate>(
        &mut self,
        via: &mut Via<'_>,
        key: &str,
    ) -> Result<Option<Root<A>>> {
        check_key(key, self.store.inner.options.max_key_bytes)?;
        if let Some(&index) = self.by_key.get(&(A::NAME, key.to_owned())) {
            return self.reload::<A>(via, index).await.map(Some);
        }
        let locate = Locate::Key {
            aggregate_type: A::NAME,
            key,
        };
        match self.fetch::<A>(via, locate, None).await? {
            Some(loaded) => match self.by_id.get(&loaded.id) {
                // This context changed or released its key: the key no longer names it here.
                Some(&index)
                    if self
                        .tracked
                        .get(index)
                        .is_some_and(|t| t.key.as_deref() != Some(key)) =>
                {
                    Ok(None)
                }
                // Loaded by id earlier in this context: keep that view.
                Some(&index) => self.reload::<A>(via, index).await.map(Some),
                None => self.track_loaded(loaded).map(Some),
            },
            None => Ok(None),
        }
    }

    /// Loads the aggregate of type `A` with the natural key `key`, or creates it when there is
    /// none.
    ///
    /// When another context creates the same key between this load and this context's commit,
    /// the commit fails with [`Error::Conflict`] (not [`Error::KeyTaken`]), writing nothing: a
    /// retry ([`Store::transact_with_retry`](crate::Store::transact_with_retry)) then loads the
    /// aggregate the other context created. So many tasks signing up one key at once all
    /// succeed through the retry helper.
    ///
    /// ```
    /// # use annals::prelude::*;
    /// # use serde::{Deserialize, Serialize};
    /// # #[derive(Event, Serialize, Deserialize)]
    /// # #[event(name = "doc.load_or_create.opened")]
    /// # struct Opened { owner: String }
    /// # #[derive(Aggregate, Default)]
    /// # #[aggregate(name = "doc.load_or_create.account", events(Opened))]
    /// # struct Account { owner: String }
    /// # impl Apply<Opened> for Account {
    /// #     fn apply(&mut self, e: &Opened) { self.owner = e.owner.clone() }
    /// # }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), annals::Error> {
    /// # let store = Store::open("memory:").await?;
    /// for _ in 0..2 {
    ///     store.transact_with_retry(Retry::default(), async |ctx| {
    ///         let mut ann = ctx.load_or_create_by_key::<Account>("ann").await?;
    ///         if ann.version() == 0 {
    ///             ctx.apply(&mut ann, Opened { owner: "Ann".into() })?; // only the first time
    ///         }
    ///         Ok::<_, annals::Error>(())
    ///     }).await?;
    /// }
    /// let ann = store.begin_read_only().load_by_key::<Account>("ann").await?;
    /// assert_eq!(ann.version(), 1);
    /// # Ok(()) }
    /// ```
    pub async fn load_or_create_by_key<A: Aggregate>(&mut self, key: &str) -> Result<Root<A>> {
        self.load_or_create_by_key_via(&mut Via::Store, key).await
    }

    /// [`load_or_create_by_key`](Context::load_or_create_by_key), reading `via`.
    pub(crate) async fn load_or_create_by_key_via<A: Aggregate>(
        &mut self,
        via: &mut Via<'_>,
        key: &str,
    ) -> Result<Root<A>> {
        match self.find_by_key_via::<A>(via, key).await? {
            Some(root) => Ok(root),
            None => {
                self.writable()?;
                Ok(self.track_new::<A>(
                    AggregateId::new(),
                    Some(key.to_owned()),
                    Origin::LoadOrCreate,
                ))
            }
        }
    }

    pub(crate) fn track_new<A: Aggregate>(
        &mut self,
        id: AggregateId,
        key: Option<String>,
        origin: Origin,
    ) -> Root<A> {
        let index = self.tracked.len();
        if let Some(key) = &key {
            self.by_key.insert((A::NAME, key.clone()), index);
        }
        self.by_id.insert(id, index);
        self.tracked.push(Tracked {
            id,
            aggregate_type: A::NAME,
            key: key.clone(),
            is_new: true,
            origin,
            base: 0,
            events: Vec::new(),
            snapshot: None,
            rekey: None,
            cached: None,
        });
        Root {
            id,
            key,
            version: 0,
            state: A::default(),
        }
    }

    fn track_loaded<A: Aggregate>(&mut self, root: Root<A>) -> Result<Root<A>> {
        let index = self.tracked.len();
        if let Some(key) = &root.key {
            self.by_key.insert((A::NAME, key.clone()), index);
        }
        self.by_id.insert(root.id, index);
        self.tracked.push(Tracked {
            id: root.id,
            aggregate_type: A::NAME,
            key: root.key.clone(),
            is_new: false,
            origin: Origin::Plain,
            base: root.version,
            events: Vec::new(),
            snapshot: None,
            rekey: None,
            cached: None,
        });
        Ok(root)
    }

    /// A fresh root for an aggregate this context already tracks: the committed state it
    /// started from, plus the events it staged since.
    async fn reload<A: Aggregate>(&mut self, via: &mut Via<'_>, index: usize) -> Result<Root<A>> {
        let (id, aggregate_type, is_new, base) = match self.tracked.get(index) {
            Some(t) => (t.id, t.aggregate_type, t.is_new, t.base),
            None => return Err(Error::Corrupt("context index out of range".to_owned())),
        };
        if aggregate_type != A::NAME {
            return Err(Error::WrongAggregateType {
                aggregate: id,
                expected: A::NAME.to_owned(),
                found: aggregate_type.to_owned(),
            });
        }
        let mut root = if is_new {
            Root {
                id,
                key: self.tracked.get(index).and_then(|t| t.key.clone()),
                version: 0,
                state: A::default(),
            }
        } else {
            match self.fetch::<A>(via, Locate::Id(id), Some(base)).await? {
                Some(root) => root,
                None => {
                    return Err(Error::NotFound {
                        aggregate_type: A::NAME.to_owned(),
                        target: Target::Id(id),
                    });
                }
            }
        };
        if let Some(tracked) = self.tracked.get(index) {
            for staged in &tracked.events {
                root.state.apply_stored(&StoredPayload {
                    name: staged.name,
                    schema_version: staged.schema_version,
                    payload: &staged.payload,
                    position: 0,
                })?;
                root.version = staged.version;
            }
        }
        Ok(root)
    }

    /// Reads and rebuilds one aggregate from the store, `via` the context's connections.
    async fn fetch<A: Aggregate>(
        &self,
        via: &mut Via<'_>,
        locate: Locate<'_>,
        up_to: Option<u64>,
    ) -> Result<Option<Root<A>>> {
        // The cache holds committed states only: a caller's transaction reads past it.
        let cache = via.reads_committed();
        if cache && let Some(found) = self.fetch_cached::<A>(locate, up_to).await? {
            return Ok(found);
        }
        let span = tracing::debug_span!(
            "annals.load",
            aggregate_type = A::NAME,
            aggregate = tracing::field::Empty,
            version = tracing::field::Empty,
            events = tracing::field::Empty,
        );
        async {
            let request = LoadRequest {
                locate,
                snapshot_version: A::SNAPSHOT_EVERY.map(|_| A::SNAPSHOT_VERSION),
                up_to,
                after: None,
            };
            let Some(stream) = self.store.load_via(via, request).await? else {
                return Ok(None);
            };
            // An erased aggregate is gone: only its tombstone is left.
            if stream.row.erased {
                return Ok(None);
            }
            let span = tracing::Span::current();
            span.record("aggregate", tracing::field::display(stream.row.id));
            match rebuild::<A>(&stream) {
                Ok(root) => {
                    span.record("version", root.version);
                    span.record("events", stream.events.len());
                    Ok(Some(root))
                }
                Err(Error::Decode {
                    what: "snapshot",
                    source,
                    ..
                }) => {
                    tracing::warn!(
                        aggregate = %stream.row.id,
                        error = %source,
                        "snapshot does not decode; rebuilding from events"
                    );
                    let request = LoadRequest {
                        snapshot_version: None,
                        ..request
                    };
                    match self.store.load_via(via, request).await? {
                        Some(stream) => rebuild::<A>(&stream).map(Some),
                        None => Ok(None),
                    }
                }
                Err(e) => Err(e),
            }
        }
        .instrument(span)
        .await
        .inspect(|loaded| {
            if cache {
                self.remember(loaded);
            }
        })
    }
}

/// Natural keys are non-empty text of at most `max` bytes without NUL, on every store; they
/// are compared byte for byte.
pub(crate) fn check_key(key: &str, max: usize) -> Result<()> {
    let reason = if key.is_empty() {
        "it is empty".to_owned()
    } else if key.len() > max {
        format!(
            "it is {} bytes long, over the limit of {max} bytes",
            key.len()
        )
    } else if key.contains('\0') {
        "it contains a NUL character".to_owned()
    } else {
        return Ok(());
    };
    Err(Error::InvalidKey {
        key: key.to_owned(),
        reason,
    })
}
