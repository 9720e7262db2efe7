//! The SQL text of the PostgreSQL store, rendered once at open from validated identifiers:
//! pure functions from names to statements, with no connection in sight. The commit statement
//! has one text per [`Shape`]; its parameters are numbered in the order `commit.rs` binds them.

use std::sync::Arc;

use super::names::Names;
use crate::error::{Error, Result};
use crate::filter::FilterShape;
use crate::store::sql::types::TypeKind;

/// How a commit checks the versions of the aggregates it changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Cas {
    /// Only new aggregates.
    None,
    /// One existing aggregate: a plain conditional `UPDATE`.
    One,
    /// Several: locked in id order (so concurrent commits cannot deadlock), checked, then
    /// updated only if every version matches.
    Many,
}

/// The shape of a commit statement; one statement text per shape is rendered at open.
#[derive(Debug, Clone, Copy)]
pub(super) struct Shape {
    pub cas: Cas,
    pub new: bool,
    pub snapshots: bool,
    /// Inside a caller's transaction: events are stamped with a transaction id no older than
    /// the events they follow (see `commit_sql`).
    pub in_caller_tx: bool,
    /// The statement returns the events' cursors (for [`Store::append`](crate::Store::append)).
    pub returning: bool,
}

impl Shape {
    const COUNT: usize = 48;

    fn index(self) -> usize {
        let cas = match self.cas {
            Cas::None => 0,
            Cas::One => 1,
            Cas::Many => 2,
        };
        usize::from(self.returning) * 24
            + cas * 8
            + usize::from(self.new) * 4
            + usize::from(self.snapshots) * 2
            + usize::from(self.in_caller_tx)
    }

    fn all() -> impl Iterator<Item = Shape> {
        [false, true].into_iter().flat_map(|returning| {
            [Cas::None, Cas::One, Cas::Many]
                .into_iter()
                .flat_map(move |cas| {
                    (0..8u8).map(move |bits| Shape {
                        cas,
                        new: bits & 4 != 0,
                        snapshots: bits & 2 != 0,
                        in_caller_tx: bits & 1 != 0,
                        returning,
                    })
                })
        })
    }
}

/// Numbers bind parameters in the order a statement is written.
struct Params(usize);

impl Params {
    fn next(&mut self) -> String {
        self.0 += 1;
        format!("${}", self.0)
    }
}

/// The SQL text of every statement, rendered once at open from validated identifiers.
pub(super) struct Statements {
    commit: Vec<Arc<str>>,
    /// One event to one existing aggregate, on the pool: without and with `RETURNING`.
    pub commit_one: [Arc<str>; 2],
    /// By id without and with snapshots, then by key without and with snapshots.
    pub load: [Arc<str>; 4],
    /// By id, the events after a cached version, to the newest: [`load_after_sql`].
    pub load_after: Arc<str>,
    pub locate_by_id: Arc<str>,
    pub locate_by_key: Arc<str>,
    pub versions: Arc<str>,
    /// Where the events with the given ids are stored.
    pub find_events: Arc<str>,
    /// Sets an aggregate's key (`NULL` releases it).
    pub set_key: Arc<str>,
    /// Deletes an erased aggregate's events up to a version (keeping where they stood) and its
    /// snapshots, and marks its row.
    pub erase: Arc<str>,
    /// Locks the rows of aggregates to erase: their versions and whether they are erased.
    pub lock_erased: Arc<str>,
    /// Deletes an aggregate's events up to its newest snapshot of a shape, keeping where they
    /// stood; returns how many went. The newest event of the store stays: the feed-epoch check
    /// reads it to tell a store moved to a cluster whose transaction ids are behind.
    pub prune_events: Arc<str>,
    /// Deletes an aggregate's snapshots older than the `$3 + 1`-th newest of a shape.
    pub prune_snapshots: Arc<str>,
    pub read_stream: Arc<str>,
    pub read_stream_backward: Arc<str>,
    pub read_feed: Arc<str>,
    /// The records of the events with the given ids, by position (for inline projections).
    pub records_by_id: Arc<str>,
    /// The filtered feed, one statement per [`FilterShape`] index.
    pub read_feed_matching: Vec<Arc<str>>,
    pub schema_version: Arc<str>,
    /// [`CHECK_EPOCH`] at open: the epoch before, and after when it ran.
    pub check_epoch: Arc<str>,
    pub notify: Arc<str>,
    ensure_aggregate_types: Arc<str>,
    ensure_event_types: Arc<str>,
    aggregate_types: Arc<str>,
    event_types: Arc<str>,
}

/// The columns of a [`RecordedEvent`], in the order `record` reads them.
pub(super) const RECORD_COLUMNS: &str = "e.tx_id::text::int8, e.position, e.aggregate_id, a.type_id, \
     e.sequence, e.event_type_id, e.schema_version, e.payload, e.metadata, \
     (EXTRACT(EPOCH FROM e.recorded_at) * 1000000)::int8, e.event_id, e.epoch::int8, a.natural_key";

impl Statements {
    pub fn new(names: &Names) -> Statements {
        let aggregates = names.table("aggregates");
        let events = names.table("events");
        let aggregate_types = names.table("aggregate_types");
        let event_types = names.table("event_types");
        let snapshots = names.table("snapshots");
        let deleted_events = names.table("deleted_events");
        let mut commit = vec![Arc::<str>::from(""); Shape::COUNT];
        for shape in Shape::all() {
            if let Some(slot) = commit.get_mut(shape.index()) {
                *slot = commit_sql(names, shape).into();
            }
        }
        let types = |table: &str| -> Arc<str> { format!("SELECT id, name FROM {table}").into() };
        let ensure = |table: &str| -> Arc<str> {
            format!(
                "INSERT INTO {table} (name) \
                 SELECT n FROM UNNEST($1::text[]) AS n \
                 WHERE NOT EXISTS (SELECT 1 FROM {table} t WHERE t.name = n) \
                 ON CONFLICT DO NOTHING"
            )
            .into()
        };
        Statements {
            commit,
            load: [
                load_sql(names, false, false).into(),
                load_sql(names, false, true).into(),
                load_sql(names, true, false).into(),
                load_sql(names, true, true).into(),
            ],
            load_after: load_after_sql(names).into(),
            locate_by_id: format!(
                "SELECT id, type_id, natural_key, version, erased FROM {aggregates} \
                 WHERE id = $1::uuid"
            )
            .into(),
            locate_by_key: format!(
                "SELECT id, type_id, natural_key, version, erased FROM {aggregates} \
                 WHERE type_id = $1::int4 AND natural_key = $2::text"
            )
            .into(),
            versions: format!("SELECT id, version FROM {aggregates} WHERE id = ANY($1::uuid[])")
                .into(),
            find_events: format!(
                "SELECT event_id, aggregate_id, sequence FROM {events} \
                 WHERE event_id = ANY($1::uuid[])"
            )
            .into(),
            erase: format!(
                "WITH gone AS (DELETE FROM {events} e \
                     WHERE e.aggregate_id = $1::uuid AND e.sequence <= $2::int8 \
                     RETURNING e.position, e.epoch, e.tx_id), \
                 kept AS (INSERT INTO {deleted_events} (position, epoch, tx_id) \
                     SELECT position, epoch, tx_id FROM gone), \
                 snaps AS (DELETE FROM {snapshots} WHERE aggregate_id = $1::uuid), \
                 marked AS (UPDATE {aggregates} SET erased = true WHERE id = $1::uuid) \
                 SELECT count(*) FROM gone"
            )
            .into(),
            lock_erased: format!(
                "SELECT id, version, erased FROM {aggregates} WHERE id = ANY($1::uuid[]) \
                 ORDER BY id FOR NO KEY UPDATE"
            )
            .into(),
            prune_events: format!(
                "WITH s AS (SELECT max(version) AS v FROM {snapshots} \
                     WHERE aggregate_id = $1::uuid AND snapshot_version = $2::int4), \
                 gone AS (DELETE FROM {events} e \
                     WHERE e.aggregate_id = $1::uuid AND e.sequence <= (SELECT v FROM s) \
                       AND (e.epoch, e.tx_id, e.position) < \
                           (SELECT n.epoch, n.tx_id, n.position FROM {events} n \
                            ORDER BY n.epoch DESC, n.tx_id DESC, n.position DESC LIMIT 1) \
                     RETURNING e.position, e.epoch, e.tx_id), \
                 kept AS (INSERT INTO {deleted_events} (position, epoch, tx_id) \
                     SELECT position, epoch, tx_id FROM gone) \
                 SELECT count(*) FROM gone"
            )
            .into(),
            prune_snapshots: format!(
                "DELETE FROM {snapshots} WHERE aggregate_id = $1::uuid AND version < \
                 (SELECT version FROM {snapshots} \
                  WHERE aggregate_id = $1::uuid AND snapshot_version = $2::int4 \
                  ORDER BY version DESC LIMIT 1 OFFSET $3::int8)"
            )
            .into(),
            set_key: format!("UPDATE {aggregates} SET natural_key = $2::text WHERE id = $1::uuid")
                .into(),
            read_stream: format!(
                "SELECT {RECORD_COLUMNS} FROM {events} e JOIN {aggregates} a ON a.id = e.aggregate_id \
                 WHERE e.aggregate_id = $1::uuid AND e.sequence BETWEEN $2::int8 AND $3::int8 \
                 ORDER BY e.sequence LIMIT $4::int8"
            )
            .into(),
            read_stream_backward: format!(
                "SELECT {RECORD_COLUMNS} FROM {events} e JOIN {aggregates} a ON a.id = e.aggregate_id \
                 WHERE e.aggregate_id = $1::uuid AND e.sequence BETWEEN $2::int8 AND $3::int8 \
                 ORDER BY e.sequence DESC LIMIT $4::int8"
            )
            .into(),
            commit_one: [false, true].map(|returning| commit_one_sql(names, returning).into()),
            read_feed: feed_sql(names, None).into(),
            records_by_id: format!(
                "SELECT {RECORD_COLUMNS} FROM {events} e JOIN {aggregates} a ON a.id = e.aggregate_id \
                 WHERE e.event_id = ANY($1::uuid[]) ORDER BY e.position"
            )
            .into(),
            read_feed_matching: (0..FilterShape::COUNT)
                .map(|index| feed_sql(names, Some(FilterShape::from_index(index))).into())
                .collect(),
            check_epoch: format!(
                "WITH before AS (SELECT epoch FROM {feed_epoch} WHERE id = 1), \
                 checked AS ({check}) \
                 SELECT (SELECT epoch FROM before), (SELECT epoch FROM checked)",
                feed_epoch = names.table("feed_epoch"),
                check = check_epoch(names),
            )
            .into(),
            schema_version: format!(
                "SELECT COALESCE(MAX(version), 0) FROM {}",
                names.table("schema_migrations")
            )
            .into(),
            // The notification needs no durability: its transaction commits without waiting for
            // the WAL flush.
            notify: "SELECT set_config('synchronous_commit', 'off', true), pg_notify($1::text, '')"
                .into(),
            ensure_aggregate_types: ensure(&aggregate_types),
            ensure_event_types: ensure(&event_types),
            aggregate_types: types(&aggregate_types),
            event_types: types(&event_types),
        }
    }

    /// The statement that writes missing names to the `kind` type table.
    pub fn ensure_types(&self, kind: TypeKind) -> &Arc<str> {
        match kind {
            TypeKind::Aggregate => &self.ensure_aggregate_types,
            TypeKind::Event => &self.ensure_event_types,
        }
    }

    /// The statement that reads the `kind` type table.
    pub fn read_types(&self, kind: TypeKind) -> &Arc<str> {
        match kind {
            TypeKind::Aggregate => &self.aggregate_types,
            TypeKind::Event => &self.event_types,
        }
    }

    pub fn commit(&self, shape: Shape) -> Result<Arc<str>> {
        self.commit
            .get(shape.index())
            .cloned()
            .ok_or_else(|| Error::Corrupt(format!("no commit statement for {shape:?}")))
    }
}

/// The horizon of the feed, as CTEs: the oldest transaction still running that could write to
/// this database, or the snapshot's `xmax` when none runs.
///
/// `pg_snapshot_xmin` would do, but it is the oldest transaction of the whole cluster: one left
/// open in another database would hold this feed back. A transaction is left out only when
/// `pg_stat_activity` (or `pg_prepared_xacts`) shows it in another database, since a session
/// never changes database and cannot write to this one. Any other running transaction counts,
/// including one that ended between the snapshot and the look at `pg_stat_activity`, or one
/// this role may not see: the horizon can only be too early, never too late, so nothing is
/// skipped. Transaction ids in those views are 32-bit; they are compared by their low 32 bits,
/// which no two running transactions share.
const FEED_HORIZON: &str = "\
    snap AS MATERIALIZED (SELECT pg_current_snapshot() AS s), \
    other_databases AS MATERIALIZED ( \
        SELECT backend_xid::text::int8 AS x FROM pg_stat_activity \
        WHERE backend_xid IS NOT NULL \
          AND datid IS DISTINCT FROM \
              (SELECT oid FROM pg_database WHERE datname = current_database()) \
        UNION ALL \
        SELECT transaction::text::int8 FROM pg_prepared_xacts \
        WHERE database <> current_database()), \
    h AS MATERIALIZED ( \
        SELECT COALESCE( \
            (SELECT min(x) FROM snap, pg_snapshot_xip(snap.s) AS x \
             WHERE (x::text::int8 & 4294967295) NOT IN (SELECT x FROM other_databases)), \
            (SELECT pg_snapshot_xmax(s) FROM snap)) AS horizon)";

/// The check of the feed epoch after a server start: when the server is not the one that last
/// checked (`pg_postmaster_start_time`), the first commit (or open) records it, and starts the
/// next epoch when the newest event of the current one has a transaction id ahead of this
/// cluster's next one: the store was moved (restored, failed over, switched over) to a cluster
/// whose counter is behind. Every other time it matches no row: no lock, no look at the events.
/// Returns the epoch and the one before it when it ran. Concurrent first commits check once:
/// the others wait on the row, then find it checked. A commit on the pool runs it as a
/// statement of its own, when its commit statement found the epoch unchecked (see
/// `commit_sql`); a commit in a caller's transaction, inside its commit statement.
pub(super) const CHECK_EPOCH: &str = "\
    UPDATE {feed_epoch} f \
    SET server_started = pg_postmaster_start_time(), \
        epoch = f.epoch + CASE \
            WHEN (SELECT e.tx_id FROM {events} e WHERE e.epoch = f.epoch \
                  ORDER BY e.tx_id DESC LIMIT 1) >= pg_snapshot_xmax(pg_current_snapshot()) \
            THEN 1 ELSE 0 END \
    WHERE f.id = 1 AND f.server_started IS DISTINCT FROM pg_postmaster_start_time() \
    RETURNING f.epoch";

/// [`CHECK_EPOCH`] on this store's tables.
fn check_epoch(names: &Names) -> String {
    CHECK_EPOCH
        .replace("{feed_epoch}", &names.table("feed_epoch"))
        .replace("{events}", &names.table("events"))
}

/// What a commit statement returns when its batch asks for the events' cursors.
const RETURNING_CURSORS: &str = " RETURNING epoch::int8, tx_id::text::int8, position";

/// The feed's open epoch, as CTEs after [`FEED_HORIZON`]: the store's current one, or the next
/// when the newest event's transaction id is ahead of the cluster's next one (`xmax`): the store
/// was moved from another cluster and no commit has checked it yet; every stored epoch is then
/// complete, and the first commit after the move writes into the next. Events of epochs before the open
/// one are read without waiting: no commit writes to them any more.
const FEED_EPOCH: &str = "\
    head AS MATERIALIZED (SELECT epoch, tx_id FROM {events} \
                          ORDER BY epoch DESC, tx_id DESC LIMIT 1), \
    g AS MATERIALIZED ( \
        SELECT GREATEST( \
            (SELECT epoch FROM {feed_epoch} WHERE id = 1), \
            COALESCE((SELECT epoch FROM head), 0) \
              + CASE WHEN (SELECT tx_id FROM head) >= (SELECT pg_snapshot_xmax(s) FROM snap) \
                     THEN 1 ELSE 0 END) AS open_epoch)";

/// The feed statement. Parameters: the cursor's epoch, transaction id and position, and the
/// page's size. It returns the page, events in `(epoch, tx_id, position)` order that nothing
/// holds back; then one status row, whose aggregate id is NULL, with (in the columns of a
/// record, by index) 0, 1: the newest event held back (transaction id and position, NULL when
/// none is), 3: the pid of the transaction holding it back, 4: the horizon, 5: 1 for a prepared
/// holder (NULL when the holder is gone), 6: 1 when the cursor's own event exists (or the cursor
/// is the start), 7: the holder's database's name, 9: its age in microseconds, 11: the open
/// epoch.
///
/// With a filter `shape`, the page holds only the events that pass it (parameters from 5 on,
/// see [`filter_conditions`]), and every row has three more columns: NULL for events, and in
/// the status row the newest event the read could see (epoch, transaction id, position), NULL
/// when there is none after the cursor: how far a page that is not full looked.
fn feed_sql(names: &Names, filter: Option<FilterShape>) -> String {
    let events = &names.table("events");
    let aggregates = &names.table("aggregates");
    let feed_epoch = &names.table("feed_epoch");
    let deleted_events = &names.table("deleted_events");
    let conditions = filter.map_or_else(String::new, |shape| filter_conditions(names, shape));
    let (event_extra, status_extra, scanned) = match filter {
        None => ("", "", ""),
        Some(_) => (
            ", NULL::int4, NULL::int8, NULL::int8",
            ", s.epoch, s.tx_id::text::int8, s.position",
            " LEFT JOIN LATERAL ( \
              SELECT e.epoch, e.tx_id, e.position FROM {events} e \
              WHERE {after} AND (e.epoch < {open} OR e.tx_id < {horizon}) \
              ORDER BY e.epoch DESC, e.tx_id DESC, e.position DESC LIMIT 1) s ON true",
        ),
    };
    let after = "(e.epoch, e.tx_id, e.position) > ($1::int4, $2::int8::text::xid8, $3::int8)";
    let horizon = "(SELECT horizon FROM h)";
    let open = "(SELECT open_epoch FROM g)";
    let low32 = "((SELECT horizon FROM h)::text::int8 & 4294967295)";
    let epoch = FEED_EPOCH
        .replace("{events}", events)
        .replace("{feed_epoch}", feed_epoch);
    let scanned = scanned
        .replace("{events}", events)
        .replace("{after}", after)
        .replace("{open}", open)
        .replace("{horizon}", horizon);
    format!(
        "WITH {FEED_HORIZON}, {epoch} \
         (SELECT {RECORD_COLUMNS}{event_extra} \
          FROM {events} e JOIN {aggregates} a ON a.id = e.aggregate_id \
          WHERE {after} AND (e.epoch < {open} OR e.tx_id < {horizon}){conditions} \
          ORDER BY e.epoch, e.tx_id, e.position LIMIT $4::int8) \
         UNION ALL \
         (SELECT w.tx_id::text::int8, w.position, NULL::uuid, hb.pid, \
                 {horizon}::text::int8, hb.prepared::int4, \
                 CASE WHEN $3::int8 = 0 OR EXISTS ( \
                     SELECT 1 FROM {events} c WHERE c.position = $3::int8 \
                       AND c.epoch = $1::int4 AND c.tx_id = $2::int8::text::xid8) \
                   OR EXISTS ( \
                     SELECT 1 FROM {deleted_events} c WHERE c.position = $3::int8 \
                       AND c.epoch = $1::int4 AND c.tx_id = $2::int8::text::xid8) \
                 THEN 1 ELSE 0 END, \
                 convert_to(hb.datname, 'UTF8'), NULL::bytea, hb.age, NULL::uuid, \
                 {open}::int8, NULL::text{status_extra} \
          FROM (SELECT 1) AS one{scanned} \
          LEFT JOIN LATERAL ( \
              SELECT e.tx_id, e.position FROM {events} e \
              WHERE {after} AND e.epoch = {open} AND e.tx_id >= {horizon} \
              ORDER BY e.tx_id DESC, e.position DESC LIMIT 1) w ON true \
          LEFT JOIN LATERAL ( \
              SELECT a.pid, a.datname::text AS datname, false AS prepared, \
                     (EXTRACT(EPOCH FROM now() - a.xact_start) * 1000000)::int8 AS age \
              FROM pg_stat_activity a \
              WHERE w.tx_id IS NOT NULL AND a.backend_xid::text::int8 = {low32} \
              UNION ALL \
              SELECT NULL::int4, p.database::text, true, \
                     (EXTRACT(EPOCH FROM now() - p.prepared) * 1000000)::int8 \
              FROM pg_prepared_xacts p \
              WHERE w.tx_id IS NOT NULL AND p.transaction::text::int8 = {low32} \
              LIMIT 1) hb ON true)"
    )
}

/// The conditions of a filtered feed read, on the events `e` and their aggregates `a`, with
/// parameters from 5 on, one per condition present, in this order: the event type names and the
/// aggregate type names (`text[]`, turned into ids inside the statement, so that a type another
/// process wrote meanwhile is not missed), the aggregate id, the natural key, the partition and
/// the number of partitions.
fn filter_conditions(names: &Names, shape: FilterShape) -> String {
    let mut params = Params(4);
    let mut conditions = String::new();
    if shape.event_types {
        conditions.push_str(&format!(
            " AND e.event_type_id = ANY(ARRAY(SELECT id FROM {} WHERE name = ANY({}::text[])))",
            names.table("event_types"),
            params.next()
        ));
    }
    if shape.aggregate_types {
        conditions.push_str(&format!(
            " AND a.type_id = ANY(ARRAY(SELECT id FROM {} WHERE name = ANY({}::text[])))",
            names.table("aggregate_types"),
            params.next()
        ));
    }
    if shape.aggregate {
        conditions.push_str(&format!(" AND e.aggregate_id = {}::uuid", params.next()));
    }
    if shape.key {
        conditions.push_str(&format!(" AND a.natural_key = {}::text", params.next()));
    }
    if shape.partition {
        // The last byte of the id: the same partition in every store (see `Filter`).
        let (partition, partitions) = (params.next(), params.next());
        conditions.push_str(&format!(
            " AND get_byte(uuid_send(e.aggregate_id), 15) % {partitions}::int4 = {partition}::int4"
        ));
    }
    conditions
}

/// The statement that loads an aggregate. The first row holds the aggregate and its newest
/// usable snapshot (`position` is NULL); the others are the events after that snapshot, up to
/// the version asked for. Parameters: the id (or the type id and key), the version to read up to
/// (NULL: the latest), then the snapshot shape, or for the variants without snapshots the
/// version to read after (0, or the version an aggregate cache holds). The variants without
/// snapshots leave the snapshot table out altogether: a smaller plan is a cheaper one to start
/// on every execution. Bounding the events on both sides makes the plan an ordered scan of the
/// (aggregate, sequence) index: with an upper bound alone PostgreSQL 15 chose a bitmap scan and a
/// sort, twice the server time for a 10,000-event load.
fn load_sql(names: &Names, by_key: bool, snapshots: bool) -> String {
    let aggregates = names.table("aggregates");
    let events = names.table("events");
    let snapshots_table = names.table("snapshots");
    // The aggregate's id and bound are compared as scalars (InitPlans), never joined to `a`:
    // the snapshot and event lookups are then index conditions whatever the planner estimates.
    let (filter, up_to, id) = if by_key {
        (
            "type_id = $1::int4 AND natural_key = $2::text",
            "$3",
            "(SELECT id FROM a)",
        )
    } else {
        ("id = $1::uuid", "$2", "$1::uuid")
    };
    let a = format!(
        "a AS (SELECT id, type_id, natural_key, version, erased, \
                      LEAST(version, COALESCE({up_to}::int8, version)) AS up_to \
               FROM {aggregates} WHERE {filter})"
    );
    let events_branch = |after: &str| {
        format!(
            "(SELECT {LOAD_EVENT_COLUMNS} \
              FROM {events} e \
              WHERE e.aggregate_id = {id}{after} AND e.sequence <= (SELECT up_to FROM a) \
              ORDER BY e.sequence)"
        )
    };
    if snapshots {
        let shape = if by_key { "$4" } else { "$3" };
        format!(
            "WITH {a}, \
             s AS (SELECT s.version, s.payload FROM {snapshots_table} s \
                   WHERE s.aggregate_id = {id} AND s.snapshot_version = {shape}::int4 \
                     AND s.version <= (SELECT up_to FROM a) \
                   ORDER BY s.version DESC LIMIT 1) \
             SELECT NULL::int8 AS position, a.version AS sequence, a.type_id, s.version AS extra, \
                    s.payload, a.natural_key, a.id, a.erased \
             FROM a LEFT JOIN s ON true \
             UNION ALL {}",
            events_branch(" AND e.sequence > COALESCE((SELECT version FROM s), 0)")
        )
    } else {
        let after = if by_key { "$4" } else { "$3" };
        format!(
            "WITH {a} \
             SELECT {LOAD_ROW_COLUMNS} \
             FROM a \
             UNION ALL {}",
            events_branch(&format!(" AND e.sequence > {after}::int8"))
        )
    }
}

/// The load of an aggregate by id after a cached version, to its newest: the row and the events
/// above the version, as [`load_sql`] returns them, each read by its key with no bound taken
/// from the row. The events and the row's version are written by one statement, so a
/// statement's snapshot sees the events up to the version and none beyond; the caller checks
/// that the events it folds end at the version. Parameters: the id and the cached version.
fn load_after_sql(names: &Names) -> String {
    let aggregates = names.table("aggregates");
    let events = names.table("events");
    format!(
        "SELECT {LOAD_ROW_COLUMNS} \
         FROM {aggregates} a WHERE a.id = $1::uuid \
         UNION ALL \
         (SELECT {LOAD_EVENT_COLUMNS} \
          FROM {events} e WHERE e.aggregate_id = $1::uuid AND e.sequence > $2::int8 \
          ORDER BY e.sequence)"
    )
}

/// The columns of a load's row of the aggregate (`a`) without a snapshot, in the order
/// `load_stream_on` reads them: no position (which marks the row), version, type id, no
/// snapshot version or payload, key, id, erased.
const LOAD_ROW_COLUMNS: &str = "NULL::int8 AS position, a.version AS sequence, a.type_id, \
     NULL::int8 AS extra, NULL::bytea AS payload, a.natural_key, a.id, a.erased";

/// The columns of a load's rows of events (`e`), in the order `load_stream_on` reads them.
const LOAD_EVENT_COLUMNS: &str = "e.position, e.sequence, e.event_type_id, \
     e.schema_version::int8, e.payload, NULL, NULL, NULL";

/// The one statement of a commit: the events' `INSERT`, with the version checks, the new
/// aggregates and the snapshots as CTEs before it. Every insert joins the version check (`cas`:
/// one row when the one version matched; `ok`: when all did), so a conflict writes nothing and
/// inserts no event: the commit went through when as many rows were inserted as it has events.
/// Parameters are numbered in this order: the version checks, the new aggregates, the events and
/// the time, the snapshots, and in a caller's transaction the aggregates loaded (ids and
/// versions); `run_commit` binds them in the same order.
fn commit_sql(names: &Names, shape: Shape) -> String {
    let aggregates = names.table("aggregates");
    let events = names.table("events");
    let snapshots = names.table("snapshots");
    let mut p = Params(0);
    let mut ctes: Vec<String> = Vec::new();
    let gate = match shape.cas {
        Cas::None => "",
        Cas::One => {
            let (id, expected, new_version) = (p.next(), p.next(), p.next());
            ctes.push(format!(
                "cas AS (UPDATE {aggregates} SET version = {new_version}::int8 \
                 WHERE id = {id}::uuid AND version = {expected}::int8 RETURNING id)"
            ));
            ", cas"
        }
        Cas::Many => {
            let (ids, expected, new_versions) = (p.next(), p.next(), p.next());
            ctes.push(format!(
                "c AS (SELECT * FROM UNNEST({ids}::uuid[], {expected}::int8[], \
                 {new_versions}::int8[]) AS c (id, expected, new_version))"
            ));
            // Locks are taken in id order before any row changes (so concurrent commits cannot
            // deadlock); the UPDATE then only runs when every version matched, so a conflict
            // leaves every row as it was.
            ctes.push(format!(
                "locked AS (SELECT a.id, a.version FROM {aggregates} a \
                 WHERE a.id = ANY({ids}::uuid[]) ORDER BY a.id FOR NO KEY UPDATE)"
            ));
            ctes.push(
                "ok AS (SELECT true AS ok FROM locked \
                 JOIN c ON c.id = locked.id AND c.expected = locked.version \
                 HAVING count(*) = (SELECT count(*) FROM c))"
                    .to_owned(),
            );
            ctes.push(format!(
                "cas AS (UPDATE {aggregates} a SET version = c.new_version FROM c, ok \
                 WHERE a.id = c.id)"
            ));
            ", ok"
        }
    };
    if shape.new {
        let (ids, types, keys, versions) = (p.next(), p.next(), p.next(), p.next());
        ctes.push(format!(
            "new_aggregates AS (INSERT INTO {aggregates} (id, type_id, natural_key, version) \
             SELECT n.id, n.type_id, n.natural_key, n.version \
             FROM UNNEST({ids}::uuid[], {types}::int4[], {keys}::text[], {versions}::int8[]) \
                  AS n (id, type_id, natural_key, version){gate})"
        ));
    }
    let (aggregate_ids, sequences, types, schema_versions, payloads, metadata, event_ids) = (
        p.next(),
        p.next(),
        p.next(),
        p.next(),
        p.next(),
        p.next(),
        p.next(),
    );
    let recorded_at = p.next();
    let recorded = format!("TIMESTAMPTZ 'epoch' + {recorded_at}::int8 * INTERVAL '1 microsecond'");
    if shape.snapshots {
        let (ids, shapes, versions, payloads) = (p.next(), p.next(), p.next(), p.next());
        ctes.push(format!(
            "snap AS (INSERT INTO {snapshots} \
                 (aggregate_id, snapshot_version, version, payload, recorded_at) \
             SELECT s.aggregate_id, s.snapshot_version, s.version, s.payload, {recorded} \
             FROM UNNEST({ids}::uuid[], {shapes}::int4[], {versions}::int8[], \
                         {payloads}::bytea[]) AS s (aggregate_id, snapshot_version, version, payload)\
                  {gate} \
             ON CONFLICT DO NOTHING)"
        ));
    }
    // The epoch: the store's current one, read by key. After a server start, the epoch is
    // checked for a move to another cluster (`CHECK_EPOCH`) before any commit, so new events
    // sort after every old one. On the pool, the statement reads the epoch only when the
    // server that last checked is this one: else it reads none, its first event breaks the
    // column's NOT NULL and the whole statement rolls back, and the store runs the check and
    // sends the commit again (`commit.rs`). A statement whose version check fails writes
    // nothing, checked or not. In a caller's transaction, the statement checks itself: a
    // failed statement there would abort the caller's transaction.
    let feed_epoch = names.table("feed_epoch");
    if shape.in_caller_tx {
        let check = check_epoch(names);
        ctes.push(format!(
            "checked AS ({check}), \
             ep AS (SELECT COALESCE((SELECT epoch FROM checked), \
                                    (SELECT epoch FROM {feed_epoch} WHERE id = 1)) AS epoch)"
        ));
    } else {
        ctes.push(guarded_epoch(names));
    }
    // In a caller's transaction the transaction id may be older than a commit this context
    // loaded from (the caller's transaction can have written before this context loaded):
    // events are then stamped with the newest id among the events the context loaded (the last
    // event of every aggregate it read or changed), so the feed, ordered by transaction id,
    // lists them after their causes, and each aggregate's events in version order.
    let floor = shape.in_caller_tx.then(|| {
        let (ids, versions) = (p.next(), p.next());
        format!(
            "floor AS (SELECT max(e.tx_id) AS tx_id FROM {events} e \
             JOIN UNNEST({ids}::uuid[], {versions}::int8[]) AS r (id, version) \
               ON e.aggregate_id = r.id AND e.sequence = r.version \
             WHERE e.epoch = (SELECT epoch FROM ep))"
        )
    });
    let (tx_column, tx_value) = match floor {
        Some(floor) => {
            ctes.push(floor);
            (
                "tx_id, ",
                "GREATEST(pg_current_xact_id(), (SELECT tx_id FROM floor)), ",
            )
        }
        None => ("", ""),
    };
    let with = format!("WITH {} ", ctes.join(", "));
    let returning = if shape.returning {
        RETURNING_CURSORS
    } else {
        ""
    };
    // WITH ORDINALITY and ORDER BY: positions follow the order the events were applied in.
    format!(
        "{with}INSERT INTO {events} (epoch, {tx_column}aggregate_id, sequence, event_type_id, \
             schema_version, payload, metadata, recorded_at, event_id) \
         SELECT (SELECT epoch FROM ep), {tx_value}e.aggregate_id, e.sequence, e.type_id, e.schema_version, e.payload, \
                e.metadata, {recorded}, e.event_id \
         FROM UNNEST({aggregate_ids}::uuid[], {sequences}::int8[], {types}::int4[], \
                     {schema_versions}::int4[], {payloads}::bytea[], {metadata}::bytea[], \
                     {event_ids}::uuid[]) WITH ORDINALITY \
              AS e (aggregate_id, sequence, type_id, schema_version, payload, metadata, \
                    event_id, ord){gate} \
         ORDER BY e.ord{returning}"
    )
}

/// The epoch a commit on the pool writes into, as the CTE `ep`: the store's current one, read
/// by key, when the server that last checked it is this one; else none (see `commit_sql`).
fn guarded_epoch(names: &Names) -> String {
    format!(
        "ep AS (SELECT epoch FROM {} \
                WHERE id = 1 AND server_started = pg_postmaster_start_time())",
        names.table("feed_epoch")
    )
}

/// The commit of one event to one existing aggregate on the pool, a command's usual commit:
/// the statement [`commit_sql`] writes for that shape, with plain parameters where it binds
/// one-element arrays (no `UNNEST`, no sort). Parameters: the aggregate's id, its expected
/// version, its new version; the event's sequence, type id, schema version, payload, metadata,
/// recorded-at (microseconds since the Unix epoch) and id.
fn commit_one_sql(names: &Names, returning: bool) -> String {
    let aggregates = names.table("aggregates");
    let events = names.table("events");
    let ep = guarded_epoch(names);
    let returning = if returning { RETURNING_CURSORS } else { "" };
    format!(
        "WITH cas AS (UPDATE {aggregates} SET version = $3::int8 \
                      WHERE id = $1::uuid AND version = $2::int8 RETURNING id), \
              {ep} \
         INSERT INTO {events} (epoch, aggregate_id, sequence, event_type_id, schema_version, \
             payload, metadata, recorded_at, event_id) \
         SELECT (SELECT epoch FROM ep), cas.id, $4::int8, $5::int4, $6::int4, $7::bytea, \
                $8::bytea, TIMESTAMPTZ 'epoch' + $9::int8 * INTERVAL '1 microsecond', $10::uuid \
         FROM cas{returning}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreOptions;

    fn names() -> Names {
        Names::new(&StoreOptions::new().schema("shop").table_prefix("es_")).unwrap()
    }

    #[test]
    fn filter_conditions_bind_from_five_in_order() {
        let every = FilterShape::from_index(FilterShape::COUNT - 1);
        assert_eq!(
            filter_conditions(&names(), every),
            " AND e.event_type_id = ANY(ARRAY(SELECT id FROM \"shop\".es_event_types WHERE name = ANY($5::text[]))) \
             AND a.type_id = ANY(ARRAY(SELECT id FROM \"shop\".es_aggregate_types WHERE name = ANY($6::text[]))) \
             AND e.aggregate_id = $7::uuid AND a.natural_key = $8::text \
             AND get_byte(uuid_send(e.aggregate_id), 15) % $10::int4 = $9::int4"
        );
        let key_only = FilterShape {
            event_types: false,
            aggregate_types: true,
            aggregate: false,
            key: true,
            partition: false,
        };
        assert!(filter_conditions(&names(), key_only).ends_with("AND a.natural_key = $6::text"));
        // The filtered feed adds the scanned columns; the plain one stays as it was.
        let sql = Statements::new(&names());
        assert!(
            sql.read_feed_matching[every.index()].contains("ORDER BY e.epoch DESC, e.tx_id DESC")
        );
        assert!(
            !sql.read_feed
                .contains("ORDER BY e.epoch DESC, e.tx_id DESC")
        );
    }

    fn shape(cas: Cas, new: bool, snapshots: bool, in_caller_tx: bool) -> String {
        commit_sql(
            &names(),
            Shape {
                cas,
                new,
                snapshots,
                in_caller_tx,
                returning: false,
            },
        )
    }

    /// Collapses runs of whitespace, so the pinned text below can be laid out for reading.
    fn flat(sql: &str) -> String {
        sql.split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .replace("( ", "(")
    }

    #[test]
    fn one_event_to_one_aggregate_binds_plain_values() {
        let expected = "
            WITH cas AS (UPDATE \"shop\".es_aggregates SET version = $3::int8
                         WHERE id = $1::uuid AND version = $2::int8 RETURNING id),
                 ep AS (SELECT epoch FROM \"shop\".es_feed_epoch
                        WHERE id = 1 AND server_started = pg_postmaster_start_time())
            INSERT INTO \"shop\".es_events (epoch, aggregate_id, sequence, event_type_id,
                schema_version, payload, metadata, recorded_at, event_id)
            SELECT (SELECT epoch FROM ep), cas.id, $4::int8, $5::int4, $6::int4, $7::bytea,
                   $8::bytea, TIMESTAMPTZ 'epoch' + $9::int8 * INTERVAL '1 microsecond', $10::uuid
            FROM cas";
        assert_eq!(flat(&commit_one_sql(&names(), false)), flat(expected));
        assert_eq!(
            flat(&commit_one_sql(&names(), true)),
            flat(&format!(
                "{expected} RETURNING epoch::int8, tx_id::text::int8, position"
            ))
        );
    }

    #[test]
    fn one_existing_aggregate_is_a_conditional_update_gating_the_insert() {
        let expected = "
            WITH cas AS (UPDATE \"shop\".es_aggregates SET version = $3::int8
                         WHERE id = $1::uuid AND version = $2::int8 RETURNING id),
            ep AS (SELECT epoch FROM \"shop\".es_feed_epoch
                   WHERE id = 1 AND server_started = pg_postmaster_start_time())
            INSERT INTO \"shop\".es_events (epoch, aggregate_id, sequence, event_type_id,
                                        schema_version, payload, metadata, recorded_at, event_id)
            SELECT (SELECT epoch FROM ep), e.aggregate_id, e.sequence, e.type_id, e.schema_version, e.payload, e.metadata,
                   TIMESTAMPTZ 'epoch' + $11::int8 * INTERVAL '1 microsecond', e.event_id
            FROM UNNEST($4::uuid[], $5::int8[], $6::int4[], $7::int4[], $8::bytea[], $9::bytea[],
                        $10::uuid[]) WITH ORDINALITY
                 AS e (aggregate_id, sequence, type_id, schema_version, payload, metadata,
                       event_id, ord), cas
            ORDER BY e.ord";
        assert_eq!(shape(Cas::One, false, false, false), flat(expected));
    }

    #[test]
    fn new_aggregates_only_need_no_version_check() {
        let expected = "
            WITH new_aggregates AS (
                INSERT INTO \"shop\".es_aggregates (id, type_id, natural_key, version)
                SELECT n.id, n.type_id, n.natural_key, n.version
                FROM UNNEST($1::uuid[], $2::int4[], $3::text[], $4::int8[])
                     AS n (id, type_id, natural_key, version)),
            ep AS (SELECT epoch FROM \"shop\".es_feed_epoch
                   WHERE id = 1 AND server_started = pg_postmaster_start_time())
            INSERT INTO \"shop\".es_events (epoch, aggregate_id, sequence, event_type_id,
                                        schema_version, payload, metadata, recorded_at, event_id)
            SELECT (SELECT epoch FROM ep), e.aggregate_id, e.sequence, e.type_id, e.schema_version, e.payload, e.metadata,
                   TIMESTAMPTZ 'epoch' + $12::int8 * INTERVAL '1 microsecond', e.event_id
            FROM UNNEST($5::uuid[], $6::int8[], $7::int4[], $8::int4[], $9::bytea[], $10::bytea[],
                        $11::uuid[]) WITH ORDINALITY
                 AS e (aggregate_id, sequence, type_id, schema_version, payload, metadata,
                       event_id, ord)
            ORDER BY e.ord";
        assert_eq!(shape(Cas::None, true, false, false), flat(expected));
    }

    #[test]
    fn several_aggregates_lock_in_id_order_and_write_only_when_all_match() {
        let expected = "
            WITH c AS (SELECT * FROM UNNEST($1::uuid[], $2::int8[], $3::int8[])
                       AS c (id, expected, new_version)),
            locked AS (SELECT a.id, a.version FROM \"shop\".es_aggregates a
                       WHERE a.id = ANY($1::uuid[]) ORDER BY a.id FOR NO KEY UPDATE),
            ok AS (SELECT true AS ok FROM locked
                   JOIN c ON c.id = locked.id AND c.expected = locked.version
                   HAVING count(*) = (SELECT count(*) FROM c)),
            cas AS (UPDATE \"shop\".es_aggregates a SET version = c.new_version FROM c, ok
                    WHERE a.id = c.id),
            new_aggregates AS (
                INSERT INTO \"shop\".es_aggregates (id, type_id, natural_key, version)
                SELECT n.id, n.type_id, n.natural_key, n.version
                FROM UNNEST($4::uuid[], $5::int4[], $6::text[], $7::int8[])
                     AS n (id, type_id, natural_key, version), ok),
            snap AS (
                INSERT INTO \"shop\".es_snapshots
                    (aggregate_id, snapshot_version, version, payload, recorded_at)
                SELECT s.aggregate_id, s.snapshot_version, s.version, s.payload,
                       TIMESTAMPTZ 'epoch' + $15::int8 * INTERVAL '1 microsecond'
                FROM UNNEST($16::uuid[], $17::int4[], $18::int8[], $19::bytea[])
                     AS s (aggregate_id, snapshot_version, version, payload), ok
                ON CONFLICT DO NOTHING),
            checked AS (
                UPDATE \"shop\".es_feed_epoch f
                SET server_started = pg_postmaster_start_time(),
                    epoch = f.epoch + CASE
                        WHEN (SELECT e.tx_id FROM \"shop\".es_events e WHERE e.epoch = f.epoch
                              ORDER BY e.tx_id DESC LIMIT 1)
                             >= pg_snapshot_xmax(pg_current_snapshot())
                        THEN 1 ELSE 0 END
                WHERE f.id = 1 AND f.server_started IS DISTINCT FROM pg_postmaster_start_time()
                RETURNING f.epoch),
            ep AS (SELECT COALESCE((SELECT epoch FROM checked),
                                   (SELECT epoch FROM \"shop\".es_feed_epoch WHERE id = 1))
                   AS epoch),
            floor AS (SELECT max(e.tx_id) AS tx_id FROM \"shop\".es_events e
                      JOIN UNNEST($20::uuid[], $21::int8[]) AS r (id, version)
                        ON e.aggregate_id = r.id AND e.sequence = r.version
                      WHERE e.epoch = (SELECT epoch FROM ep))
            INSERT INTO \"shop\".es_events (epoch, tx_id, aggregate_id, sequence, event_type_id,
                                        schema_version, payload, metadata, recorded_at, event_id)
            SELECT (SELECT epoch FROM ep), GREATEST(pg_current_xact_id(), (SELECT tx_id FROM floor)),
                   e.aggregate_id, e.sequence, e.type_id, e.schema_version, e.payload, e.metadata,
                   TIMESTAMPTZ 'epoch' + $15::int8 * INTERVAL '1 microsecond', e.event_id
            FROM UNNEST($8::uuid[], $9::int8[], $10::int4[], $11::int4[], $12::bytea[],
                        $13::bytea[], $14::uuid[]) WITH ORDINALITY
                 AS e (aggregate_id, sequence, type_id, schema_version, payload, metadata,
                       event_id, ord), ok
            ORDER BY e.ord";
        assert_eq!(shape(Cas::Many, true, true, true), flat(expected));
    }

    #[test]
    fn every_shape_has_its_own_text() {
        let statements = Statements::new(&names());
        let texts: std::collections::HashSet<Arc<str>> = Shape::all()
            .map(|s| statements.commit(s).unwrap())
            .collect();
        assert_eq!(texts.len(), Shape::COUNT);
        assert!(
            texts
                .iter()
                .all(|t| t.starts_with("WITH") || t.starts_with("INSERT"))
        );
    }

    #[test]
    fn loads_read_the_row_and_events_in_one_statement() {
        let by_id = "
            WITH a AS (SELECT id, type_id, natural_key, version, erased,
                              LEAST(version, COALESCE($2::int8, version)) AS up_to
                       FROM \"shop\".es_aggregates WHERE id = $1::uuid)
            SELECT NULL::int8 AS position, a.version AS sequence, a.type_id, NULL::int8 AS extra,
                   NULL::bytea AS payload, a.natural_key, a.id, a.erased
            FROM a
            UNION ALL
            (SELECT e.position, e.sequence, e.event_type_id, e.schema_version::int8, e.payload,
                    NULL, NULL, NULL
             FROM \"shop\".es_events e
             WHERE e.aggregate_id = $1::uuid AND e.sequence > $3::int8
               AND e.sequence <= (SELECT up_to FROM a)
             ORDER BY e.sequence)";
        assert_eq!(load_sql(&names(), false, false), flat(by_id));
        let by_key_with_snapshot = "
            WITH a AS (SELECT id, type_id, natural_key, version, erased,
                              LEAST(version, COALESCE($3::int8, version)) AS up_to
                       FROM \"shop\".es_aggregates WHERE type_id = $1::int4 AND natural_key = $2::text),
            s AS (SELECT s.version, s.payload FROM \"shop\".es_snapshots s
                  WHERE s.aggregate_id = (SELECT id FROM a) AND s.snapshot_version = $4::int4
                    AND s.version <= (SELECT up_to FROM a)
                  ORDER BY s.version DESC LIMIT 1)
            SELECT NULL::int8 AS position, a.version AS sequence, a.type_id, s.version AS extra,
                   s.payload, a.natural_key, a.id, a.erased
            FROM a LEFT JOIN s ON true
            UNION ALL
            (SELECT e.position, e.sequence, e.event_type_id, e.schema_version::int8, e.payload,
                    NULL, NULL, NULL
             FROM \"shop\".es_events e
             WHERE e.aggregate_id = (SELECT id FROM a)
               AND e.sequence > COALESCE((SELECT version FROM s), 0)
               AND e.sequence <= (SELECT up_to FROM a)
             ORDER BY e.sequence)";
        assert_eq!(load_sql(&names(), true, true), flat(by_key_with_snapshot));
    }
}
