//! Errors raised at the SQL boundary. Each variant carries its SQLSTATE and a hint that says
//! what to do; `#[pg_extern]`s return `Result<T, ErrorReport>` and convert with `?`.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{PgLogLevel, PgSqlErrorCode};
use sync_bridge::snapshot::PAGE_FORMAT;

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("pg_peersync must be loaded via shared_preload_libraries")]
    NotPreloaded,
    #[error("table {0} has no primary key")]
    NoPrimaryKey(String),
    #[error("unknown conflict strategy \"{0}\"")]
    UnknownStrategy(String),
    #[error("column \"{column}\" of table {table} does not exist")]
    UnknownColumn { table: String, column: String },
    #[error("primary key column \"{column}\" of table {table} cannot be excluded from sync")]
    ExcludedKey { table: String, column: String },
    #[error("{0} belongs to the pg_peersync extension and cannot be tracked")]
    OwnTable(String),
    #[error("{0} is not an ordinary table")]
    NotATable(String),
    #[error("{0} is partitioned or part of an inheritance hierarchy, which pg_peersync does not track yet")]
    Partitioned(String),
    #[error("table {0} is not tracked")]
    NotTracked(String),
    #[error("TRUNCATE of tracked table {0} is not replicated")]
    Truncate(String),
    #[error("a transaction that wrote to tracked tables cannot be prepared (two-phase commit)")]
    TwoPhase,
    #[error("{0} needs READ COMMITTED isolation")]
    Isolation(&'static str),
    #[error("invalid have-vector: {0}")]
    BadHaveVector(String),
    #[error("too many backends for pg_peersync's transaction slots ({0})")]
    TooManyBackends(usize),
    #[error("too many databases with pg_peersync in this cluster ({0})")]
    TooManyDatabases(usize),
    #[error("sync_flush() cannot run inside a subtransaction")]
    FlushInSubtransaction,
    #[error("malformed batch: {0}")]
    BadBatch(String),
    #[error("unsupported batch format {0}")]
    BatchFormat(u32),
    #[error("checksum mismatch on event {0}")]
    Checksum(String),
    #[error("event for table {0}, which is not tracked on this node")]
    UntrackedTable(String),
    #[error("strategy custom needs a resolver function for table {0}")]
    NoResolver(String),
    #[error("resolver {0} must take (jsonb, jsonb, jsonb) and return jsonb")]
    BadResolver(String),
    #[error("conflict {0} does not exist")]
    NoSuchConflict(i64),
    #[error("invalid choice for conflict {0}: {1}")]
    BadChoice(i64, String),
    #[error("a local transaction wrote the same rows while they were being applied")]
    ConcurrentLocalWrite,
    #[error("sync_ddl() runs its command on every node: only a superuser may call it")]
    DdlNotAllowed,
    #[error("changes to tracked tables are refused: another node seems to use this node's identity ({0})")]
    IdentityInDoubt(String),
    #[error("sync_new_identity() renumbers this node: only a superuser may call it")]
    IdentityNotAllowed,
    #[error("column \"{column}\" of table {table} cannot be a counter: it is {kind}")]
    BadCounter { table: String, column: String, kind: String },
    #[error("peersync.node_number is not set on this node")]
    NoNodeNumber,
    #[error("no primary-key column of table {0} is fed by a sequence")]
    NoKeySequence(String),
    #[error("peer {0} is not known to this node")]
    UnknownPeer(String),
    #[error("this node is copying its tracked tables from peer {0}; changes are refused until the copy is done")]
    Joining(String),
    #[error("table {table} has no column \"{column}\", which the peer it joins from copies")]
    JoinColumn { table: String, column: String },
    #[error("tables {0} are tracked by the peer this node joins from, not here")]
    JoinUntracked(String),
    #[error("the peer serves snapshot pages in format {0}; this node reads format {PAGE_FORMAT}")]
    JoinFormat(u32),
    #[error("the joining node reads snapshot pages in format {0}; this node serves format {PAGE_FORMAT}")]
    ServeFormat(u32),
    #[error("sync_resync() replaces this node's tracked tables: only a superuser may call it")]
    ResyncNotAllowed,
    #[error("invalid existing_rows \"{0}\"")]
    BadExistingRows(String),
    #[error("peer {0} has no known address")]
    PeerNotFound(String),
    #[error("peer {0} did not answer: {1}")]
    PeerUnreachable(String, String),
    #[error("the registration key cannot be used: {0}")]
    NoKey(String),
    #[error("permission denied to compare table {0}: it needs {1}")]
    NotAllowedOn(String, String),
    #[error("table {0} has counter columns, which sync_repair() cannot write")]
    RepairCounters(String),
    #[error("pg_peersync internal SPI error: {0}")]
    Spi(#[from] pgrx::spi::SpiError),
}

impl SyncError {
    pub fn sqlstate(&self) -> PgSqlErrorCode {
        use PgSqlErrorCode::*;
        match self {
            SyncError::NotPreloaded => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            SyncError::NoNodeNumber => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            SyncError::BadCounter { .. } => ERRCODE_INVALID_PARAMETER_VALUE,
            SyncError::NoKeySequence(_) => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            SyncError::NoPrimaryKey(_) => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            SyncError::UnknownStrategy(_) => ERRCODE_INVALID_PARAMETER_VALUE,
            SyncError::UnknownColumn { .. } => ERRCODE_UNDEFINED_COLUMN,
            SyncError::ExcludedKey { .. } => ERRCODE_INVALID_PARAMETER_VALUE,
            SyncError::OwnTable(_) => ERRCODE_INVALID_PARAMETER_VALUE,
            SyncError::NotATable(_) => ERRCODE_WRONG_OBJECT_TYPE,
            SyncError::Partitioned(_) => ERRCODE_FEATURE_NOT_SUPPORTED,
            SyncError::NotTracked(_) => ERRCODE_UNDEFINED_OBJECT,
            SyncError::Truncate(_) => ERRCODE_FEATURE_NOT_SUPPORTED,
            SyncError::TwoPhase => ERRCODE_FEATURE_NOT_SUPPORTED,
            SyncError::Isolation(_) => ERRCODE_ACTIVE_SQL_TRANSACTION,
            SyncError::BadHaveVector(_) => ERRCODE_INVALID_PARAMETER_VALUE,
            SyncError::TooManyBackends(_) | SyncError::TooManyDatabases(_) => ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
            SyncError::FlushInSubtransaction => ERRCODE_ACTIVE_SQL_TRANSACTION,
            SyncError::BadBatch(_) => ERRCODE_INVALID_PARAMETER_VALUE,
            SyncError::BatchFormat(_) => ERRCODE_FEATURE_NOT_SUPPORTED,
            SyncError::Checksum(_) => ERRCODE_DATA_CORRUPTED,
            SyncError::UntrackedTable(_) => ERRCODE_UNDEFINED_TABLE,
            SyncError::NoResolver(_) | SyncError::BadResolver(_) => ERRCODE_INVALID_PARAMETER_VALUE,
            SyncError::NoSuchConflict(_) => ERRCODE_NO_DATA_FOUND,
            SyncError::BadChoice(..) => ERRCODE_INVALID_PARAMETER_VALUE,
            SyncError::ConcurrentLocalWrite => ERRCODE_T_R_SERIALIZATION_FAILURE,
            SyncError::DdlNotAllowed | SyncError::IdentityNotAllowed => ERRCODE_INSUFFICIENT_PRIVILEGE,
            SyncError::IdentityInDoubt(_) => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            SyncError::UnknownPeer(_) => ERRCODE_UNDEFINED_OBJECT,
            SyncError::Joining(_) => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            SyncError::JoinColumn { .. } => ERRCODE_UNDEFINED_COLUMN,
            SyncError::JoinUntracked(_) => ERRCODE_UNDEFINED_TABLE,
            SyncError::JoinFormat(_) | SyncError::ServeFormat(_) => ERRCODE_FEATURE_NOT_SUPPORTED,
            SyncError::ResyncNotAllowed => ERRCODE_INSUFFICIENT_PRIVILEGE,
            SyncError::BadExistingRows(_) => ERRCODE_INVALID_PARAMETER_VALUE,
            SyncError::PeerNotFound(_) => ERRCODE_CONNECTION_DOES_NOT_EXIST,
            SyncError::PeerUnreachable(..) => ERRCODE_CONNECTION_FAILURE,
            SyncError::NoKey(_) => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            SyncError::NotAllowedOn(..) => ERRCODE_INSUFFICIENT_PRIVILEGE,
            SyncError::RepairCounters(_) => ERRCODE_FEATURE_NOT_SUPPORTED,
            SyncError::Spi(_) => ERRCODE_INTERNAL_ERROR,
        }
    }

    pub fn hint(&self) -> Option<String> {
        Some(match self {
            SyncError::DdlNotAllowed => "Peers run the command as their own apply role; ask a superuser to run \
                 sync_ddl(), or run the DDL on each node yourself."
                .into(),
            SyncError::IdentityNotAllowed | SyncError::ResyncNotAllowed => "Ask a superuser to run it.".into(),
            SyncError::BadExistingRows(_) => {
                "Use 'capture' (the default: the rows are sent to every peer) or 'shared' \
                 (every node already holds these same rows, restored from one dump)."
                    .into()
            }
            SyncError::PeerNotFound(_) => {
                "This node's worker has not found that peer: sync_status() -> 'worker' -> 'peers' \
                 lists the peers it reaches, with their ids. Wait for discovery, or list the peer in peersync.peers."
                    .into()
            }
            SyncError::PeerUnreachable(..) => {
                "sync_status() -> 'worker' -> 'peers' shows the peer's state and last error; \
                 its worker must be running with the same registration key."
                    .into()
            }
            SyncError::NoKey(_) => "Set peersync.registration_key_file (or peersync.registration_key) as on the \
                 other nodes, then SELECT pg_reload_conf()."
                .into(),
            SyncError::NotAllowedOn(_, what) => format!("Ask the table's owner or a superuser to GRANT {what} on it."),
            SyncError::RepairCounters(_) => "A counter's value is the sum of every node's changes, so writing the \
                 peer's value here would count the difference twice; SELECT sync_resync(peer) copies the table \
                 from the peer instead."
                .into(),
            SyncError::Joining(_) => "Wait for the copy to finish: sync_status() -> 'join' shows its progress. \
                 Changes made meanwhile would be overwritten by it."
                .into(),
            SyncError::JoinUntracked(_) => "Create and track them here as on the peer (sync_track_table()); \
                 the worker tries the copy again by itself."
                .into(),
            SyncError::JoinFormat(_) | SyncError::ServeFormat(_) => {
                "Run the same pg_peersync version on both nodes; meanwhile a new node catches up by \
                 replaying the peer's log instead of copying."
                    .into()
            }
            SyncError::JoinColumn { table, column } => format!(
                "Add the column here as the peer has it (ALTER TABLE {table} ADD COLUMN \"{column}\" ...); \
                 the worker tries the copy again by itself."
            ),
            SyncError::UnknownPeer(_) => "sync_status() -> 'log' -> 'peers' lists the peers this node keeps \
                 changes for, by id."
                .into(),
            SyncError::IdentityInDoubt(_) => "If this database is a copy or was restored from a backup, a superuser \
                 runs SELECT sync_new_identity() here; if the other machine is the copy, stop it; if this database \
                 moved here and the old place no longer runs it, SELECT sync_keep_identity(). See \
                 sync_status() -> 'worker' -> 'identity' and the README, Copies and restores."
                .into(),
            SyncError::BadCounter { .. } => "A counter is a smallint, integer, bigint or numeric column outside the \
                 primary key; pick another column, or change its type first."
                .into(),
            SyncError::NoNodeNumber => "Give each node a different number from 1 to 1023: \
                 peersync.node_number = N in postgresql.conf, then SELECT pg_reload_conf()."
                .into(),
            SyncError::NoKeySequence(t) => format!(
                "Node-unique ids are for keys filled by serial, identity or DEFAULT nextval(...) columns; \
                 {t}'s keys come from elsewhere (uuid keys need nothing)."
            ),
            SyncError::NotPreloaded => "Add pg_peersync to shared_preload_libraries in postgresql.conf \
                 (shared_preload_libraries = 'pg_peersync') and restart PostgreSQL."
                .into(),
            SyncError::NoPrimaryKey(t) => format!(
                "Peers identify rows by primary key: ALTER TABLE {t} ADD PRIMARY KEY (...), then track it again."
            ),
            SyncError::UnknownStrategy(_) => {
                format!("Use one of: {}.", sync_bridge::resolve::Strategy::ALL.map(|s| s.name()).join(", "))
            }
            SyncError::UnknownColumn { .. } => "Check the names in exclude_columns.".into(),
            SyncError::ExcludedKey { .. } => {
                "Primary key columns identify the row on every node; remove them from exclude_columns.".into()
            }
            SyncError::OwnTable(_) => "Track your application's tables, not pg_peersync's.".into(),
            SyncError::NotATable(_) => "Only tables can be tracked; track the tables behind views.".into(),
            SyncError::Partitioned(_) => {
                "Writes through a parent and directly to a child would be captured under two names; \
                 use an ordinary table for data to be synced."
                    .into()
            }
            SyncError::NotTracked(_) => "See SELECT * FROM sync_tables for the tracked tables.".into(),
            SyncError::Truncate(t) => format!(
                "Use DELETE FROM {t} so that peers delete the rows too, or call sync_untrack_table('{t}') first."
            ),
            SyncError::TwoPhase => "Commit the transaction directly instead of PREPARE TRANSACTION.".into(),
            SyncError::Isolation(_) => "Call it outside REPEATABLE READ / SERIALIZABLE transactions.".into(),
            SyncError::BadHaveVector(_) => {
                "Pass a JSON object mapping origin node ids (uuid) to sequence numbers, as sync_have() returns.".into()
            }
            SyncError::TooManyBackends(_) => {
                "Lower max_connections, or raise pg_peersync's slot limit and rebuild.".into()
            }
            SyncError::TooManyDatabases(_) => "Use pg_peersync in fewer databases of this cluster.".into(),
            SyncError::FlushInSubtransaction => {
                "Call it outside savepoints and exception blocks; changes are written at commit anyway.".into()
            }
            SyncError::BadBatch(_) => {
                "Pass the JSON document sync_changes() returned, unchanged; nothing was applied.".into()
            }
            SyncError::BatchFormat(_) => format!(
                "This node reads batch formats {} to {}; upgrade pg_peersync on the older node. Nothing was applied.",
                sync_bridge::event::OLDEST_FORMAT,
                sync_bridge::FORMAT_VERSION
            ),
            SyncError::Checksum(_) => {
                "The batch was altered after sync_changes() produced it; fetch it again. Nothing was applied.".into()
            }
            SyncError::UntrackedTable(t) => format!(
                "Create the table and call SELECT sync_track_table('{t}') on this node, then apply the batch again. \
                 Nothing was applied."
            ),
            SyncError::NoResolver(t) => format!(
                "Name the function: SELECT sync_set_strategy('{t}', 'custom', 'my_resolver(jsonb,jsonb,jsonb)')."
            ),
            SyncError::BadResolver(_) => "Declare it as f(local jsonb, remote jsonb, info jsonb) RETURNS jsonb.".into(),
            SyncError::NoSuchConflict(_) => "See SELECT * FROM sync_conflicts WHERE review = 'pending'.".into(),
            SyncError::BadChoice(..) => {
                "Pass 'local', 'remote' (as jsonb strings: '\"local\"') or the full row as a JSON object.".into()
            }
            SyncError::ConcurrentLocalWrite => "sync_apply retries this itself; apply the batch again.".into(),
            SyncError::Spi(_) => return None,
        })
    }

    /// Raise this error as a PostgreSQL ERROR. Does not return.
    pub fn report(self) -> ! {
        ErrorReport::from(self).report(PgLogLevel::ERROR);
        unreachable!("ERROR does not return")
    }
}

impl From<SyncError> for ErrorReport {
    fn from(e: SyncError) -> Self {
        let hint = e.hint();
        let report = ErrorReport::new(e.sqlstate(), e.to_string(), "pg_peersync");
        match hint {
            Some(h) => report.set_hint(h),
            None => report,
        }
    }
}

impl From<sync_bridge::BatchError> for SyncError {
    fn from(e: sync_bridge::BatchError) -> Self {
        use sync_bridge::BatchError;
        match e {
            BatchError::Format(f) => SyncError::BatchFormat(f),
            BatchError::Checksum { origin, seq, idx } => SyncError::Checksum(format!("{origin}/{seq}/{idx}")),
            other => SyncError::BadBatch(other.to_string()),
        }
    }
}

pub type SyncResult<T> = Result<T, ErrorReport>;
