//! What the engine compacts and when (`crate::persist::compact` merges): per table and
//! partition, a run of files consecutive in write order becomes a few files of about the
//! target size, sorted by series and time with each key once, in one manifest commit that
//! replaces the run; the replaced files are deleted after a grace period (queries that started
//! before may still read them). The "compact" job (`jobs`) runs it.
//!
//! Which files: a partition whose files include one marked `overlap` (late or overwritten
//! points) gets its first such file merged with the files before it, up to `inputs_max`, so
//! that (once the run starts at the oldest file) its queries stop merging it whole; otherwise the first run of small files (below half the target) of at least two
//! (a partition no longer written: its time is over and nothing of it is buffered) or at least
//! `files_min` (one still written). Files persisted from another server's WAL (two servers
//! wrongly shared a store) are never merged: their sequence numbers are not comparable.
//!
//! Crash safety: outputs are written before the commit that names them and inputs deleted
//! only after it, so a crash at any point leaves either the inputs or the outputs named, and
//! the others as orphans that the next start removes (`persist::remove_orphans`).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::Engine;
use crate::catalog::ParquetFile;
use crate::persist::compact::{Input, MergeError, Written};
use crate::persist::manifest::Op;

/// How compaction behaves (`--compaction-*` flags).
#[derive(Debug, Clone)]
pub struct CompactionConfig {
    /// How often the job looks for work; zero turns compaction off.
    pub interval: Duration,
    /// Outputs are cut at about this size; files of half of it or more are left alone
    /// unless their partition has overlapping files.
    pub target_bytes: u64,
    /// Small files a partition still being written gathers before they are merged.
    pub files_min: usize,
    /// Files one compaction merges at most (each input holds a decoded batch in memory).
    pub inputs_max: usize,
    /// How long a replaced file stays in the store before it is deleted.
    pub grace: Duration,
}

impl Default for CompactionConfig {
    fn default() -> CompactionConfig {
        CompactionConfig {
            interval: Duration::from_secs(60),
            target_bytes: 128 << 20,
            files_min: 8,
            inputs_max: 32,
            grace: Duration::from_secs(600),
        }
    }
}

/// Recent compactions kept for `system.compactions`.
const RECORDS_MAX: usize = 200;

/// One compaction, as `system.compactions` shows it.
#[derive(Debug, Clone)]
pub struct CompactionRecord {
    pub database: String,
    pub table: String,
    pub partition_ns: i64,
    pub started_ns: i64,
    pub duration: Duration,
    pub input_files: u64,
    pub input_bytes: u64,
    pub input_rows: u64,
    pub output_files: u64,
    pub output_bytes: u64,
    pub output_rows: u64,
    /// Level of the outputs.
    pub level: u32,
    /// `ok`, `failed` or `cancelled`.
    pub status: &'static str,
    pub error: Option<String>,
}

/// The engine's compaction state.
#[derive(Default)]
pub(crate) struct CompactionState {
    records: std::sync::Mutex<VecDeque<CompactionRecord>>,
    /// Replaced files and when they may be deleted.
    replaced: std::sync::Mutex<Vec<(Instant, String)>>,
    /// Files found not sorted: their partitions are not compacted again by this process.
    unsorted: std::sync::Mutex<HashSet<String>>,
    /// Partitions whose compaction failed: failures in a row, and when to try again.
    failures: std::sync::Mutex<HashMap<PartitionKey, (u32, Instant)>>,
}

/// A partition's failed compaction is tried again after the job's interval, doubling with
/// each further failure up to this.
const FAILURE_BACKOFF_MAX: Duration = Duration::from_secs(3600);

/// (database, table, partition start).
type PartitionKey = (String, String, i64);

/// What one compaction merges.
#[derive(Debug, PartialEq)]
pub(crate) struct Plan {
    pub inputs: Vec<Arc<ParquetFile>>,
    /// Whether the outputs may still share keys with older files of the partition.
    pub overlap: bool,
}

/// Chooses the files of one partition to compact, if any (see the module's description).
/// `written`: the partition may still receive rows.
pub(crate) fn plan(
    files: &[Arc<ParquetFile>],
    own_wal: &str,
    written: bool,
    config: &CompactionConfig,
) -> Option<Plan> {
    if files.iter().any(|f| f.wal.as_deref().is_some_and(|w| w != own_wal)) {
        return None;
    }
    let mut files = files.to_vec();
    // Outputs of one compaction share a `max_seq`; they share no key either, so their order
    // among themselves does not matter.
    files.sort_by(|a, b| (a.max_seq, &a.path).cmp(&(b.max_seq, &b.path)));
    let inputs_max = config.inputs_max.max(2);
    let run_min = if written { config.files_min.max(2) } else { 2 };
    if let Some(first) = files.iter().position(|f| f.overlap) {
        // A file that may repeat keys of older ones: merged with the older files, up to
        // `inputs_max` of them. A run from the oldest file holds every row any of its keys
        // can repeat, so its outputs need no merging at query time; a run that starts later
        // (the overlapping file is far down the list) still overlaps, but the next run reaches
        // it with fewer files, so a few compactions clear the flag.
        if written && files.len() < run_min {
            return None;
        }
        let start = (first + 1).saturating_sub(inputs_max);
        let end = (start + inputs_max).min(files.len());
        return Some(Plan { inputs: files[start..end].to_vec(), overlap: start > 0 });
    }
    let small = |f: &ParquetFile| f.bytes < config.target_bytes / 2;
    let mut start = 0;
    while start < files.len() {
        let len = files[start..].iter().take_while(|f| small(f)).count();
        if len >= run_min {
            let end = start + len.min(inputs_max);
            return Some(Plan { inputs: files[start..end].to_vec(), overlap: false });
        }
        start += len + 1;
    }
    None
}

impl Engine {
    /// Recent compactions of `db`, newest last.
    pub fn compactions_of(&self, db: &str) -> Vec<CompactionRecord> {
        let records = self.compaction.records.lock().expect("compaction records lock");
        records.iter().filter(|r| r.database == db).cloned().collect()
    }

    /// One run of the "compact" job: deletes replaced files whose grace period is over, then
    /// compacts every partition that needs it, one after the other, until `stop`.
    pub(crate) async fn compact_all(&self, stop: &CancellationToken) {
        self.delete_replaced().await;
        for (db, table, partition_ns, plan) in self.compaction_candidates() {
            if stop.is_cancelled() {
                break;
            }
            let record = self.compact(&db, &table, partition_ns, plan, stop).await;
            if let Some(record) = record {
                let failed = record.status == "failed";
                self.note_outcome((db.clone(), table.clone(), partition_ns), failed);
                if let Some(error) = &record.error {
                    tracing::warn!(db, table, partition_ns, %error, "compaction did not complete");
                } else {
                    tracing::info!(
                        db,
                        table,
                        partition_ns,
                        inputs = record.input_files,
                        outputs = record.output_files,
                        ms = record.duration.as_millis() as u64,
                        "partition compacted"
                    );
                }
                let mut records = self.compaction.records.lock().expect("compaction records lock");
                if records.len() >= RECORDS_MAX {
                    records.pop_front();
                }
                records.push_back(record);
            }
        }
    }

    /// Every partition that needs compacting, with its plan.
    fn compaction_candidates(&self) -> Vec<(String, String, i64, Plan)> {
        let now = self.clock().now_ns();
        let width = self.partition_ns();
        let unsorted = self.compaction.unsorted.lock().expect("unsorted lock").clone();
        let backoff = self.compaction.failures.lock().expect("failures lock").clone();
        let mut out = Vec::new();
        for ((db, table), data) in self.all_tables() {
            // One pass under the table's lock (the WAL thread waits for it to apply writes);
            // the planning happens after.
            let (by_partition, buffered) = {
                let data = data.read().expect("table lock");
                if data.dropped {
                    continue;
                }
                let mut by_partition: BTreeMap<i64, Vec<Arc<ParquetFile>>> = BTreeMap::new();
                for file in &data.files {
                    by_partition.entry(file.partition_ns).or_default().push(file.clone());
                }
                let buffered: HashSet<i64> = data.buffer.partitions.keys().copied().collect();
                (by_partition, buffered)
            };
            for (partition_ns, files) in by_partition {
                if files.iter().any(|f| unsorted.contains(&f.path)) {
                    continue;
                }
                let key = (db.clone(), table.clone(), partition_ns);
                if backoff.get(&key).is_some_and(|(_, until)| *until > Instant::now()) {
                    continue;
                }
                let written =
                    partition_ns.saturating_add(width) > now || buffered.contains(&partition_ns);
                if let Some(plan) = plan(&files, &self.wal_id, written, &self.config.compaction) {
                    out.push((db.clone(), table.clone(), partition_ns, plan));
                }
            }
        }
        out
    }

    /// Counts a failed compaction of a partition, which then waits before it is tried again
    /// (the job's interval, doubling to an hour); a success forgets the failures.
    fn note_outcome(&self, key: PartitionKey, failed: bool) {
        let mut failures = self.compaction.failures.lock().expect("failures lock");
        if !failed {
            failures.remove(&key);
            return;
        }
        let entry = failures.entry(key).or_insert((0, Instant::now()));
        let first = self.config.compaction.interval.max(Duration::from_secs(1));
        let wait = first.saturating_mul(1 << entry.0.min(12)).min(FAILURE_BACKOFF_MAX);
        *entry = (entry.0.saturating_add(1), Instant::now() + wait);
    }

    /// Compacts one partition's planned files; `None` if there was nothing to do after all
    /// (the table went away).
    async fn compact(
        &self,
        db: &str,
        table: &str,
        partition_ns: i64,
        plan: Plan,
        stop: &CancellationToken,
    ) -> Option<CompactionRecord> {
        let started = Instant::now();
        let data = self.table_data(db, table)?;
        let schema = self.catalog().table(db, table).cloned()?;
        let ids = {
            let manifest = self.manifest.lock().await;
            if manifest.check_fenced().is_err() {
                return None;
            }
            manifest.state().table_id(db, table)?
        };
        let (inputs, overlap) = (plan.inputs, plan.overlap);
        let mut record = CompactionRecord {
            database: db.to_string(),
            table: table.to_string(),
            partition_ns,
            started_ns: self.clock().now_ns(),
            duration: Duration::ZERO,
            input_files: inputs.len() as u64,
            input_bytes: inputs.iter().map(|f| f.bytes).sum(),
            input_rows: inputs.iter().map(|f| f.rows).sum(),
            output_files: 0,
            output_bytes: 0,
            output_rows: 0,
            level: inputs.iter().map(|f| f.level).max().unwrap_or(0).saturating_add(1),
            status: "ok",
            error: None,
        };
        let max_seq = inputs.iter().map(|f| f.max_seq).max().unwrap_or(0);
        // Files of this server's WAL count for its replay; files of no recorded WAL (older
        // stores) for every WAL: the output keeps what its inputs said.
        let wal = inputs.iter().any(|f| f.wal.is_some()).then(|| self.wal_id.clone());
        let merged = self
            .merge_files(&schema, ids, partition_ns, max_seq, wal.as_deref(), &inputs, stop)
            .await;
        let written = match merged {
            Ok(written) => written,
            Err((error, written)) => {
                self.delete_files(written.iter().map(|w| w.path.to_string()).collect()).await;
                if let MergeError::Unsorted { path } = &error {
                    self.compaction.unsorted.lock().expect("unsorted lock").insert(path.clone());
                }
                record.status =
                    if matches!(error, MergeError::Cancelled) { "cancelled" } else { "failed" };
                record.error = Some(error.to_string());
                record.duration = started.elapsed();
                return Some(record);
            }
        };
        crate::crash_point("compact_after_output_write");
        let added: Vec<ParquetFile> = written
            .iter()
            .map(|w| ParquetFile {
                path: w.path.to_string(),
                partition_ns,
                min_time_ns: w.min_time_ns,
                max_time_ns: w.max_time_ns,
                rows: w.rows,
                bytes: w.bytes,
                max_seq,
                overlap,
                wal: wal.clone(),
                level: record.level,
            })
            .collect();
        let removed: Vec<String> = inputs.iter().map(|f| f.path.clone()).collect();
        let committed = {
            let mut manifest = self.manifest.lock().await;
            // Under the manifest lock, as a drop commits: the table is still the one whose
            // files were merged, and they are all still its files.
            let current = self.table_data(db, table).filter(|live| Arc::ptr_eq(live, &data));
            let intact = current.as_ref().is_some_and(|d| {
                let d = d.read().expect("table lock");
                removed.iter().all(|p| d.files.iter().any(|f| &f.path == p))
            });
            if !intact {
                Err(None)
            } else {
                let op = Op::ReplaceFiles {
                    database: db.into(),
                    table: table.into(),
                    removed: removed.clone(),
                    added: added.clone(),
                };
                manifest.commit(vec![op]).await.map_err(Some)
            }
        };
        match committed {
            Ok(()) => {}
            Err(None) => {
                // Dropped, or its files changed meanwhile: nothing names the outputs.
                self.delete_files(added.iter().map(|f| f.path.clone()).collect()).await;
                return None;
            }
            Err(Some(error)) => {
                // The commit may still have landed (a lost response): the outputs stay, and
                // whichever of inputs and outputs the manifest does not name is an orphan
                // that the next start removes.
                record.status = "failed";
                record.error = Some(error.to_string());
                record.duration = started.elapsed();
                return Some(record);
            }
        }
        crate::crash_point("compact_after_commit");
        {
            let mut guard = data.write().expect("table lock");
            guard.files.retain(|f| !removed.contains(&f.path));
            guard.files.extend(added.iter().cloned().map(Arc::new));
        }
        self.defer_delete(removed, Instant::now() + self.config.compaction.grace);
        record.output_files = added.len() as u64;
        record.output_bytes = added.iter().map(|f| f.bytes).sum();
        record.output_rows = added.iter().map(|f| f.rows).sum();
        record.duration = started.elapsed();
        Some(record)
    }

    /// Runs the merge on a thread of its own at low priority (it must not take the cores from
    /// ingest and queries), driving the store's I/O on this runtime.
    #[allow(clippy::too_many_arguments)]
    async fn merge_files(
        &self,
        schema: &Arc<crate::catalog::TableSchema>,
        ids: (u64, u64),
        partition_ns: i64,
        max_seq: u64,
        wal: Option<&str>,
        inputs: &[Arc<ParquetFile>],
        stop: &CancellationToken,
    ) -> Result<Vec<Written>, (MergeError, Vec<Written>)> {
        let handle = tokio::runtime::Handle::current();
        let store = self.store.clone();
        let schema = schema.clone();
        let inputs: Vec<Input> = inputs
            .iter()
            .map(|f| Input { path: crate::persist::location(f), bytes: f.bytes })
            .collect();
        let target = self.config.compaction.target_bytes;
        let stop = stop.clone();
        let nonce = hex::encode(crate::random_bytes::<4>());
        let wal = wal.unwrap_or("none").to_string();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let spawned = std::thread::Builder::new().name("sundial-compact".into()).spawn(move || {
            lower_priority();
            let mut n = 0u32;
            let next_path = || {
                n += 1;
                crate::persist::compacted_file_path(ids, partition_ns, max_seq, &nonce, n, &wal)
            };
            let mut written = Vec::new();
            let result = crate::persist::compact::merge(
                &handle,
                &store,
                &schema,
                &inputs,
                target,
                next_path,
                &mut written,
                &stop,
            );
            let _ = tx.send((result, written));
        });
        if let Err(error) = spawned {
            return Err((MergeError::Thread(error.to_string()), Vec::new()));
        }
        match rx.await {
            Ok((Ok(()), written)) => Ok(written),
            Ok((Err(error), written)) => Err((error, written)),
            // What it wrote before is an orphan, removed at the next start.
            Err(_) => Err((MergeError::Thread("it panicked".into()), Vec::new())),
        }
    }

    /// Deletes files that no commit names any more (replaced by a compaction, expired by
    /// retention) at `due`, once queries that started before are done with them.
    pub(super) fn defer_delete(&self, paths: Vec<String>, due: Instant) {
        let mut replaced = self.compaction.replaced.lock().expect("replaced lock");
        replaced.extend(paths.into_iter().map(|p| (due, p)));
    }

    /// Deletes replaced files whose grace period is over.
    pub(super) async fn delete_replaced(&self) {
        let now = Instant::now();
        let due: Vec<String> = {
            let mut replaced = self.compaction.replaced.lock().expect("replaced lock");
            let (due, keep) =
                std::mem::take(&mut *replaced).into_iter().partition(|(at, _)| *at <= now);
            *replaced = keep;
            due.into_iter().map(|(_, p)| p).collect()
        };
        self.delete_files(due).await;
    }

    async fn delete_files(&self, paths: Vec<String>) {
        for (i, path) in paths.into_iter().enumerate() {
            if i == 1 {
                crate::crash_point("compact_during_delete");
            }
            let location = object_store::path::Path::parse(&path)
                .unwrap_or_else(|_| object_store::path::Path::from(path.as_str()));
            if let Err(error) = crate::persist::delete_file(&self.store, &location).await {
                // Left for the next start's orphan removal.
                tracing::warn!(%error, path, "deleting a compacted file failed");
            }
        }
    }
}

/// Lowers the calling thread's scheduling priority (nice 10): compaction gets the cores only
/// when ingest and queries leave them idle.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: setpriority takes plain integers and touches no memory of this process; on
    // Linux, `who` 0 with PRIO_PROCESS names the calling thread.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, 10);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, max_seq: u64, bytes: u64, overlap: bool) -> Arc<ParquetFile> {
        Arc::new(ParquetFile {
            path: path.into(),
            partition_ns: 0,
            min_time_ns: 0,
            max_time_ns: 0,
            rows: 1,
            bytes,
            max_seq,
            overlap,
            wal: Some("w".into()),
            level: 0,
        })
    }

    fn paths(plan: Option<Plan>) -> Vec<String> {
        plan.map(|p| p.inputs.iter().map(|f| f.path.clone()).collect()).unwrap_or_default()
    }

    #[test]
    fn plans_consecutive_small_files_and_overlapping_prefixes() {
        let config = CompactionConfig {
            target_bytes: 100,
            files_min: 3,
            inputs_max: 4,
            ..Default::default()
        };
        // Sorted by max_seq; a big file (b) splits the runs of small ones.
        let files = vec![
            file("c", 3, 10, false),
            file("a", 1, 10, false),
            file("b", 2, 80, false),
            file("d", 4, 10, false),
        ];
        assert_eq!(paths(plan(&files, "w", false, &config)), ["c", "d"]);
        assert_eq!(
            paths(plan(&files, "w", true, &config)),
            Vec::<String>::new(),
            "a written partition waits for files_min"
        );
        let more: Vec<_> = files.iter().cloned().chain([file("e", 5, 10, false)]).collect();
        assert_eq!(paths(plan(&more, "w", true, &config)), ["c", "d", "e"]);
        // Overlap: the overlapping file with the files before it, big ones too, at most
        // inputs_max; from the oldest the outputs no longer overlap.
        let late = file("f", 6, 10, true);
        let overlapping: Vec<_> = more.iter().cloned().chain([late.clone()]).collect();
        let far = plan(&overlapping, "w", false, &config).expect("a plan");
        assert!(far.overlap, "a run not from the oldest file still overlaps");
        assert_eq!(paths(Some(far)), ["c", "d", "e", "f"]);
        let mut merged = (*file("out", 6, 40, true)).clone();
        merged.level = 1;
        let next = [file("a", 1, 10, false), file("b", 2, 80, false), Arc::new(merged)];
        let near = plan(&next, "w", false, &config).expect("a plan");
        assert!(!near.overlap, "a run from the oldest file clears the flag");
        assert_eq!(paths(Some(near)), ["a", "b", "out"]);
        // An overlapping file among the oldest: the prefix up to inputs_max.
        let early: Vec<_> = more.iter().cloned().chain([file("g", 0, 10, true)]).collect();
        assert_eq!(paths(plan(&early, "w", false, &config)), ["g", "a", "b", "c"]);
        // One file alone is merged only when it overlaps (to clear the flag).
        assert_eq!(
            paths(plan(&[file("a", 1, 10, false)], "w", false, &config)),
            Vec::<String>::new()
        );
        assert_eq!(paths(plan(&[file("a", 1, 10, true)], "w", false, &config)), ["a"]);
        // Another server's file: the partition is left alone.
        let mut foreign = (*file("x", 9, 10, false)).clone();
        foreign.wal = Some("other".into());
        let mixed: Vec<_> = more.iter().cloned().chain([Arc::new(foreign)]).collect();
        assert_eq!(paths(plan(&mixed, "w", false, &config)), Vec::<String>::new());
    }
}
