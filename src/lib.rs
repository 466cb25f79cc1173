//! Sundial: an embedded columnar time-series database server. Line protocol in over HTTP, a
//! write-ahead log for durability, Arrow buffers in memory, Parquet on object storage, SQL out
//! through DataFusion. `ARCHITECTURE.md` has the map; each module's header says what it owns.
//!
//! The crate's API is what `main.rs` needs (`config`, `server`); every other module is
//! `pub(crate)`, so the compiler reports what nothing uses.

pub(crate) mod alerts;
pub(crate) mod auth;
pub(crate) mod buffer;
pub(crate) mod catalog;
pub(crate) mod clock;
pub mod config;
pub(crate) mod engine;
mod error;
pub(crate) mod http;
pub(crate) mod line_protocol;
pub(crate) mod persist;
pub(crate) mod pg;
pub(crate) mod query;
pub mod server;
pub(crate) mod statement;
pub(crate) mod tls;
pub(crate) mod views;
pub(crate) mod wal;

pub(crate) use error::ErrorKind;

/// Named crash points for recovery tests: when `SUNDIAL_CRASH_POINT` names this point, the
/// process aborts here, as a power cut or kill -9 would stop it.
pub fn crash_point(name: &str) {
    static ARMED: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    if ARMED.get_or_init(|| std::env::var("SUNDIAL_CRASH_POINT").ok()).as_deref() == Some(name) {
        eprintln!("crash point {name} reached; aborting");
        std::process::abort();
    }
}

/// `N` random bytes from the system's source, for ids that must differ between processes
/// (WAL ids, manifest writer ids, probe names) and jitter. Should the source fail, the time,
/// the process id and a counter are mixed instead: still distinct, never zero.
pub(crate) fn random_bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut out).is_err() {
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let seed = format!("{nanos}-{}-{n}", std::process::id());
        let digest = ring::digest::digest(&ring::digest::SHA256, seed.as_bytes());
        for (o, d) in out.iter_mut().zip(digest.as_ref().iter().cycle()) {
            *o = *d;
        }
    }
    out
}

/// Injected I/O faults for recovery tests: while `SUNDIAL_FAULT_DIR` is set and holds a file
/// named after this point, the operation there fails as a full disk would make it fail.
pub(crate) fn fault(name: &str) -> std::io::Result<()> {
    static DIR: std::sync::OnceLock<Option<std::path::PathBuf>> = std::sync::OnceLock::new();
    match DIR.get_or_init(|| std::env::var_os("SUNDIAL_FAULT_DIR").map(Into::into)) {
        Some(dir) if dir.join(name).exists() => Err(std::io::Error::from_raw_os_error(28)),
        _ => Ok(()),
    }
}
