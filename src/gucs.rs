//! Every `peersync.*` setting, in one place. Each has a private static, one line of doc, and a
//! tiny accessor.

use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting, pg_sys};
use std::ffi::{CStr, CString};

/// Run background synchronisation (the worker). Capture into `sync_events` happens regardless:
/// a change made while this is off is still sent once it is turned on.
static ENABLED: GucSetting<bool> = GucSetting::<bool>::new(true);

/// Human-readable node name reported to peers and in `sync_status()`; empty means the host name.
static NODE_NAME: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

/// This node's number among its peers (1 to 1023, different on each), for node-unique ids
/// (`sync_global_ids`); 0: not set.
static NODE_NUMBER: GucSetting<i32> = GucSetting::<i32>::new(0);

/// Database the background worker connects to (the one where the extension is created).
static DATABASE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"postgres"));

/// Shared secret of the nodes that may sync with each other; readable only by superusers.
static REGISTRATION_KEY: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

/// A file holding the registration key (first line); takes precedence over the inline key.
/// PostgreSQL logs a changed setting's new value on reload, a file's content it does not.
static REGISTRATION_KEY_FILE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

/// Addresses the worker's HTTP server listens on, separated by commas; they also choose the
/// interfaces announcements go out on.
static LISTEN_ADDRESSES: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"0.0.0.0"));

/// Address announced to peers instead of the interface's own (behind NAT, say).
static ADVERTISE_ADDRESS: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

/// IPv4 multicast group of announcements; empty turns discovery off.
static MULTICAST_GROUP: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"239.255.80.83"));

/// UDP port of announcements.
static MULTICAST_PORT: GucSetting<i32> = GucSetting::<i32>::new(8766);

/// Seconds between announcements.
static ANNOUNCE_INTERVAL: GucSetting<i32> = GucSetting::<i32>::new(5);

/// Seconds of silence after which a peer is shown as down.
static PEER_TIMEOUT: GucSetting<i32> = GucSetting::<i32>::new(120);

/// TCP port of the worker's HTTP server.
static PORT: GucSetting<i32> = GucSetting::<i32>::new(8765);

/// Peers to sync with, as `host:port` separated by commas (for networks without multicast).
static PEERS: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

/// Seconds between anti-entropy pulls from each peer.
static SYNC_INTERVAL: GucSetting<i32> = GucSetting::<i32>::new(30);

/// Events per batch exchanged with peers.
static BATCH_SIZE: GucSetting<i32> = GucSetting::<i32>::new(1000);

/// A new node copies a peer's tables (rather than replaying its log) from this many changes
/// in the peer's log, or when the peer deleted some.
static JOIN_COPY_FROM: GucSetting<i32> = GucSetting::<i32>::new(100_000);

/// Seconds a change stays in the log at least, even once every peer holds it.
static LOG_MIN_AGE: GucSetting<i32> = GucSetting::<i32>::new(600);

/// Seconds a silent peer still holds changes in the log for; past it, the log no longer waits
/// for that peer. 0 keeps every change (no pruning), the default until nodes can join from a
/// copy of a peer: a node that lacks pruned changes cannot catch up from the log.
/// Fourteen days: a laptop away for a week or two comes back by catch-up.
static LOG_RETENTION: GucSetting<i32> = GucSetting::<i32>::new(14 * 24 * 3600);

pub fn init() {
    GucRegistry::define_string_guc(
        c"peersync.listen_addresses",
        c"Addresses the pg_peersync worker's HTTP server listens on, separated by commas.",
        c"0.0.0.0 for every IPv4 interface. Announcements go out on the interfaces these cover.",
        &LISTEN_ADDRESSES,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"peersync.advertise_address",
        c"Address announced to peers instead of the interface's own.",
        c"Empty: each interface's own address, the one peers on that network reach.",
        &ADVERTISE_ADDRESS,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"peersync.multicast_group",
        c"IPv4 multicast group pg_peersync nodes announce themselves on.",
        c"Empty turns multicast discovery off (use peersync.peers).",
        &MULTICAST_GROUP,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"peersync.multicast_port",
        c"UDP port of pg_peersync's multicast announcements.",
        c"The same on every node.",
        &MULTICAST_PORT,
        1,
        65535,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"peersync.announce_interval",
        c"Seconds between multicast announcements.",
        c"A new node is found within one interval.",
        &ANNOUNCE_INTERVAL,
        1,
        3600,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"peersync.join_copy_from",
        c"Changes in a peer's log from which a new node copies that peer's tables instead of replaying the log.",
        c"A node also copies when the peer deleted changes from its log; 0: a new node always copies.",
        &JOIN_COPY_FROM,
        0,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"peersync.log_min_age",
        c"Seconds a change stays in pg_peersync's log at least, once every peer holds it.",
        c"Then it is deleted (see peersync.log_retention).",
        &LOG_MIN_AGE,
        0,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"peersync.log_retention",
        c"Seconds the log keeps changes for a peer that has not been heard from; 0 keeps all.",
        c"A change every peer heard from within this time holds is deleted after peersync.log_min_age.",
        &LOG_RETENTION,
        0,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"peersync.peer_timeout",
        c"Seconds of silence after which sync_status() shows a peer as down.",
        c"Silence: no announcement and no successful exchange.",
        &PEER_TIMEOUT,
        1,
        86400,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"peersync.port",
        c"TCP port of the pg_peersync worker's HTTP server.",
        c"Every node can use the same port.",
        &PORT,
        1,
        65535,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"peersync.peers",
        c"Peers to sync with, as host:port separated by commas.",
        c"For networks where multicast discovery does not reach.",
        &PEERS,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"peersync.sync_interval",
        c"Seconds between anti-entropy pulls from each peer.",
        c"A node that was offline catches up within one interval of coming back.",
        &SYNC_INTERVAL,
        1,
        86400,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"peersync.node_number",
        c"This node's number among its peers, for node-unique ids (1 to 1023, different on each node).",
        c"sync_global_ids() makes a table's key sequence hand out ids ending in this number (modulo 1024).",
        &NODE_NUMBER,
        0,
        crate::capture::ids::SLOTS as i32 - 1,
        // Per database too (ALTER DATABASE ... SET): each database with the extension is a node.
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"peersync.batch_size",
        c"Events per batch exchanged with peers.",
        c"A transaction is never split, so a batch may hold more.",
        &BATCH_SIZE,
        1,
        1_000_000,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"peersync.database",
        c"Database the pg_peersync worker connects to.",
        c"Create the extension in this database. Changing it needs a restart.",
        &DATABASE,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"peersync.registration_key",
        c"Shared secret of the nodes allowed to sync with each other.",
        c"At least 16 characters, the same on every node; empty means no networking. Never sent over the network.",
        &REGISTRATION_KEY,
        GucContext::Sighup,
        GucFlags::SUPERUSER_ONLY | GucFlags::NO_SHOW_ALL,
    );
    GucRegistry::define_string_guc(
        c"peersync.registration_key_file",
        c"File holding the registration key (its first line); preferred to peersync.registration_key.",
        c"Readable by the postgres user only. PostgreSQL logs an inline key when a reload changes it; a file's content it never logs.",
        &REGISTRATION_KEY_FILE,
        GucContext::Sighup,
        GucFlags::SUPERUSER_ONLY,
    );
    GucRegistry::define_bool_guc(
        c"peersync.enabled",
        c"Run pg_peersync's background synchronisation.",
        c"Capture into sync_events is not affected: changes made while off are sent later.",
        &ENABLED,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"peersync.node_name",
        c"Name of this node as shown to peers and in sync_status().",
        c"Empty means the machine's host name.",
        &NODE_NAME,
        GucContext::Sighup,
        GucFlags::default(),
    );
    unsafe { pgrx::pg_sys::MarkGUCPrefixReserved(c"peersync".as_ptr()) };
}

pub fn enabled() -> bool {
    ENABLED.get()
}

pub fn database() -> String {
    DATABASE
        .get()
        .map(|d| d.to_string_lossy().into_owned())
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| "postgres".into())
}

/// The registration key, for deriving keys only: never log or return it. From
/// `peersync.registration_key_file` when set, else `peersync.registration_key`.
pub fn registration_key() -> Result<String, String> {
    match REGISTRATION_KEY_FILE.get().map(|p| p.to_string_lossy().into_owned()).filter(|p| !p.is_empty()) {
        Some(path) => std::fs::read_to_string(&path)
            .map(|text| text.lines().next().unwrap_or_default().trim().to_string())
            .map_err(|e| format!("peersync.registration_key_file \"{path}\" cannot be read: {e}")),
        None => Ok(REGISTRATION_KEY.get().map(|k| k.to_string_lossy().into_owned()).unwrap_or_default()),
    }
}

/// The configured node name, or the host name when unset.
pub fn node_name() -> String {
    match NODE_NAME.get() {
        Some(name) if !name.as_bytes().is_empty() => name.to_string_lossy().into_owned(),
        _ => host_name(),
    }
}

/// This machine's host name ("unknown" if it cannot be read).
pub fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

fn string(setting: &GucSetting<Option<CString>>) -> String {
    setting.get().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}

/// The listen addresses, as written.
pub fn listen_addresses() -> Vec<String> {
    list(&LISTEN_ADDRESSES)
}

pub fn advertise_address() -> String {
    string(&ADVERTISE_ADDRESS).trim().to_string()
}

pub fn multicast_group() -> String {
    string(&MULTICAST_GROUP).trim().to_string()
}

pub fn multicast_port() -> u16 {
    MULTICAST_PORT.get() as u16
}

pub fn announce_interval() -> std::time::Duration {
    std::time::Duration::from_secs(ANNOUNCE_INTERVAL.get().max(1) as u64)
}

pub fn peer_timeout() -> std::time::Duration {
    std::time::Duration::from_secs(PEER_TIMEOUT.get().max(1) as u64)
}

pub fn port() -> u16 {
    PORT.get() as u16
}

/// The static peers, as written (`host:port`).
pub fn peers() -> Vec<String> {
    list(&PEERS)
}

fn list(setting: &GucSetting<Option<CString>>) -> Vec<String> {
    string(setting).split(',').map(str::trim).filter(|p| !p.is_empty()).map(str::to_owned).collect()
}

pub fn sync_interval() -> std::time::Duration {
    std::time::Duration::from_secs(SYNC_INTERVAL.get().max(1) as u64)
}

/// This node's number for node-unique ids, if set.
pub fn node_number() -> Option<i64> {
    Some(NODE_NUMBER.get() as i64).filter(|n| *n > 0)
}

pub fn batch_size() -> i32 {
    BATCH_SIZE.get()
}

/// Changes in a peer's log from which a new node copies its tables (`snapshot`).
pub fn join_copy_from() -> i64 {
    JOIN_COPY_FROM.get() as i64
}

/// Seconds a change stays in the log at least.
pub fn log_min_age() -> i32 {
    LOG_MIN_AGE.get()
}

/// Seconds a silent peer still counts for the log.
pub fn log_retention() -> i32 {
    LOG_RETENTION.get()
}

/// Run `f` under PostgreSQL settings `settings` (name, value), as a function's `SET` clauses
/// would: they are back as they were when it returns.
fn with_settings<T>(settings: &[(&CStr, &CStr)], f: impl FnOnce() -> T) -> T {
    // SAFETY: as fmgr_security_definer does for SET clauses; an ERROR in `f` aborts the
    // (sub)transaction, which pops the nest level.
    let level = unsafe {
        let level = pg_sys::NewGUCNestLevel();
        for (name, value) in settings {
            pg_sys::set_config_option(
                name.as_ptr(),
                value.as_ptr(),
                pg_sys::GucContext::PGC_USERSET,
                pg_sys::GucSource::PGC_S_SESSION,
                pg_sys::GucAction::GUC_ACTION_SAVE,
                true,
                0,
                false,
            );
        }
        level
    };
    let out = f();
    unsafe { pg_sys::AtEOXact_GUC(true, level) };
    out
}

/// Run `f` with PostgreSQL's JIT off: pg_peersync's own queries are small, but one whose
/// estimate passes `jit_above_cost` (a join over the log, a table without statistics) spends
/// some 200 ms compiling before it runs for 5.
pub fn without_jit<T>(f: impl FnOnce() -> T) -> T {
    with_settings(&[(c"jit", c"off")], f)
}

/// Run `f` with values printing alike on every node, whatever the session or server says (as
/// pg_dump sets them): row text that one node hashes or copies, and another compares or reads.
pub fn printing_alike<T>(f: impl FnOnce() -> T) -> T {
    with_settings(
        &[
            (c"datestyle", c"ISO, YMD"),
            (c"intervalstyle", c"postgres"),
            (c"bytea_output", c"hex"),
            (c"extra_float_digits", c"1"),
        ],
        f,
    )
}

/// Run `f` with floats printed exactly (`extra_float_digits` at least 1, PostgreSQL's default),
/// for row images that other nodes store: a session that lowered it would hand its peers
/// rounded values. Costs nothing when the session has not.
pub fn floats_exact<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: a plain read of a GUC variable in this backend.
    if unsafe { pg_sys::extra_float_digits } >= 1 {
        return f();
    }
    with_settings(&[(c"extra_float_digits", c"1")], f)
}

/// Turn JIT off for this whole session (the worker's: every query it runs is pg_peersync's).
pub fn jit_off_for_session() {
    // SAFETY: a plain setting change in a connected backend.
    unsafe {
        pg_sys::SetConfigOption(
            c"jit".as_ptr(),
            c"off".as_ptr(),
            pg_sys::GucContext::PGC_SUSET,
            pg_sys::GucSource::PGC_S_OVERRIDE,
        );
    }
}
