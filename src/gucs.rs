//! Every `peersync.*` setting, in one place. Each has a private static, one line of doc, and a
//! tiny accessor. Settings for features that are not built yet are not declared.

use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};
use std::ffi::CString;

/// Run background synchronisation (the worker). Capture into `sync_events` happens regardless:
/// a change made while this is off is still sent once it is turned on.
static ENABLED: GucSetting<bool> = GucSetting::<bool>::new(true);

/// Human-readable node name reported to peers and in `sync_status()`; empty means the host name.
static NODE_NAME: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

pub fn init() {
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

/// The configured node name, or the host name when unset.
pub fn node_name() -> String {
    match NODE_NAME.get() {
        Some(name) if !name.as_bytes().is_empty() => name.to_string_lossy().into_owned(),
        _ => host_name(),
    }
}

fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}
