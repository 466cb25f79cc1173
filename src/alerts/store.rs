//! The alert state file, `{data-dir}/alerts/state.json` (`storage-format/alerts.md`): rules,
//! instance states, the outbox and recent events, replaced whole and atomically (write a
//! temporary file, fsync, rename, fsync the directory).

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::notify::Outgoing;
use super::rule::Rule;
use super::state::Instance;
use super::Event;

pub const FORMAT: u32 = 1;
/// Events kept in the file (the newest); more are kept in memory.
pub const EVENTS_SAVED: usize = 1000;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SavedRule {
    pub id: u64,
    pub rule: Rule,
    pub instances: Vec<Instance>,
    pub last_evaluation_ns: Option<i64>,
    pub last_error: Option<String>,
    pub last_alertmanager_send_ns: Option<i64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Saved {
    pub format: u32,
    pub next_id: u64,
    pub rules: Vec<SavedRule>,
    pub outbox: Vec<Outgoing>,
    pub events: Vec<Event>,
}

pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join("alerts").join("state.json")
}

/// Reads the state file; an absent file is an empty state.
pub fn load(path: &Path) -> Result<Saved, String> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Saved { format: FORMAT, next_id: 1, ..Saved::default() })
        }
        Err(e) => return Err(format!("reading alerts/state.json: {e}")),
    };
    let saved: Saved = serde_json::from_slice(&bytes).map_err(|e| {
        format!(
            "alerts/state.json is not a valid alert state ({e}); move it away to start without \
             the alert rules it holds"
        )
    })?;
    if saved.format != FORMAT {
        return Err(format!(
            "alerts/state.json has format {}, this server reads format {FORMAT}",
            saved.format
        ));
    }
    Ok(saved)
}

/// Replaces the state file with `bytes`, durably.
pub fn save(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    if !dir.exists() {
        std::fs::create_dir_all(dir)?;
        // The new directory's entry is in its parent (the data directory).
        if let Some(parent) = dir.parent() {
            std::fs::File::open(parent)?.sync_all()?;
        }
    }
    let tmp = path.with_extension("json.tmp");
    {
        use std::os::unix::fs::OpenOptionsExt;
        // Rules may hold SMTP passwords and webhook credentials.
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}
