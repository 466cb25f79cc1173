//! Write-ahead log: segmented local files, one record per accepted write, framed with length,
//! CRC32C and sequence number (byte layout in `storage-format/wal.md`).
//!
//! One writer thread owns the open segment. Requests arrive over a bounded channel; the writer
//! takes everything queued (group commit), writes it, calls `fdatasync` once, then runs each
//! request's `apply` in sequence order (this is where rows become visible in the buffer) and
//! answers it. So a write is visible exactly when it is durable, and rows enter the buffer in
//! sequence order. `no_sync` requests are applied and answered before the sync.
//!
//! The WAL is plain files synced with `sync_data`: `object_store`'s local store never syncs, so
//! nothing durable may rely on it. Replay cuts a torn tail in the last segment and refuses to
//! start on corruption anywhere else. This module knows nothing of line protocol or tables.

#[cfg(test)]
mod tests;

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};

pub const SEGMENT_MAGIC: &[u8; 8] = b"SNDLWAL\0";
pub const FORMAT_VERSION: u16 = 1;
pub const SEGMENT_HEADER_BYTES: usize = 32;
pub const RECORD_HEADER_BYTES: usize = 17;
/// Record kind: a line-protocol write (payload in `storage-format/wal.md`).
pub const KIND_LINE_PROTOCOL: u8 = 1;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("wal i/o on {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("corrupt wal segment {path} at byte {offset}: {reason}; refusing to start because records after it would be lost (move the segment away to start without them)")]
    Corrupt { path: PathBuf, offset: u64, reason: String },
    #[error("wal record of {bytes} bytes exceeds the limit of {bytes_max}")]
    RecordTooLarge { bytes: usize, bytes_max: usize },
    #[error("the wal cannot write: {reason}; writes resume once it can (retried every second)")]
    Unavailable { reason: String },
    #[error("wal is shutting down")]
    ShuttingDown,
}

impl Error {
    pub fn kind(&self) -> crate::ErrorKind {
        match self {
            Error::RecordTooLarge { .. } => crate::ErrorKind::ResourceExhausted,
            Error::Unavailable { .. } | Error::ShuttingDown => crate::ErrorKind::Unavailable,
            Error::Io { .. } | Error::Corrupt { .. } => crate::ErrorKind::Internal,
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.to_path_buf(), source }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub dir: PathBuf,
    /// Rotate to a new segment once the open one is this large.
    pub segment_bytes_max: u64,
    /// Largest record accepted (and believed on replay).
    pub record_bytes_max: usize,
    /// Requests queued for the writer before senders wait.
    pub queue_len_max: usize,
    /// When false, nothing is synced (tests and benchmarks of the CPU path only).
    pub sync: bool,
}

impl Config {
    #[cfg(test)]
    pub fn for_tests(dir: PathBuf) -> Config {
        Config {
            dir,
            segment_bytes_max: 1 << 20,
            record_bytes_max: 16 << 20,
            queue_len_max: 64,
            sync: true,
        }
    }
}

/// Called by the writer thread with the record's sequence number once it is durable.
pub type Apply = Box<dyn FnOnce(u64) + Send>;

struct Request {
    kind: u8,
    payload: Vec<u8>,
    sync: bool,
    apply: Option<Apply>,
    done: oneshot::Sender<Result<u64, Arc<Error>>>,
}

/// Handle to the log: cloneable sender side plus the shared segment list.
#[derive(Clone)]
pub struct Wal {
    tx: mpsc::Sender<Request>,
    segments: Arc<Mutex<Vec<Segment>>>,
    record_bytes_max: usize,
    /// Why the writer cannot write right now (`None`: it can).
    failure: Arc<Mutex<Option<String>>>,
}

#[derive(Debug, Clone)]
struct Segment {
    first_seq: u64,
    path: PathBuf,
}

/// What replay found.
#[derive(Debug)]
pub struct Replayed {
    /// One past the last sequence number in the log (1 for an empty log).
    pub next_seq: u64,
    pub records: u64,
    /// Bytes cut from a torn tail, if any.
    pub truncated_bytes: u64,
}

fn segment_path(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(format!("{first_seq:020}.wal"))
}

fn list_segments(dir: &Path) -> Result<Vec<Segment>, Error> {
    let mut segments = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(stem) = name.strip_suffix(".wal") {
            if let Ok(first_seq) = stem.parse::<u64>() {
                segments.push(Segment { first_seq, path: entry.path() });
            }
        }
    }
    segments.sort_by_key(|s| s.first_seq);
    Ok(segments)
}

fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir))
}

pub fn encode_segment_header(first_seq: u64) -> [u8; SEGMENT_HEADER_BYTES] {
    let mut h = [0u8; SEGMENT_HEADER_BYTES];
    h[0..8].copy_from_slice(SEGMENT_MAGIC);
    h[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    // 10..16 reserved, zero
    h[16..24].copy_from_slice(&first_seq.to_le_bytes());
    let crc = crc32c::crc32c(&h[0..24]);
    h[24..28].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Appends one framed record to `out`.
pub fn encode_record(out: &mut Vec<u8>, seq: u64, kind: u8, payload: &[u8]) {
    let len =
        u32::try_from(payload.len()).expect("record size is checked against record_bytes_max");
    let start = out.len();
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&[0u8; 4]); // crc, filled below
    out.extend_from_slice(&seq.to_le_bytes());
    out.push(kind);
    out.extend_from_slice(payload);
    let mut crc = crc32c::crc32c(&out[start..start + 4]);
    crc = crc32c::crc32c_append(crc, &out[start + 8..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// A record decoded from bytes, or why the bytes at this offset are not one.
enum Decoded<'a> {
    Record { seq: u64, kind: u8, payload: &'a [u8], bytes: usize },
    Bad(String),
}

/// Decodes the record at the start of `bytes`. Any length that fits in `bytes` is read: the
/// limit a server has now may be lower than the one the record was written under.
fn decode_record(bytes: &[u8]) -> Decoded<'_> {
    if bytes.len() < RECORD_HEADER_BYTES {
        return Decoded::Bad(format!(
            "{} bytes left, a record header needs {RECORD_HEADER_BYTES}",
            bytes.len()
        ));
    }
    let len = u32::from_le_bytes(bytes[0..4].try_into().expect("4 bytes")) as usize;
    let total = RECORD_HEADER_BYTES + len;
    if bytes.len() < total {
        return Decoded::Bad(format!("record of {total} bytes but only {} left", bytes.len()));
    }
    let stored_crc = u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes"));
    let mut crc = crc32c::crc32c(&bytes[0..4]);
    crc = crc32c::crc32c_append(crc, &bytes[8..total]);
    if crc != stored_crc {
        return Decoded::Bad("checksum mismatch".to_string());
    }
    let seq = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
    Decoded::Record {
        seq,
        kind: bytes[16],
        payload: &bytes[RECORD_HEADER_BYTES..total],
        bytes: total,
    }
}

/// Whether a valid record with a sequence number of at least `seq_min` starts anywhere in
/// `bytes`: that tells mid-log corruption (fatal) from a torn tail (cut).
fn valid_record_after(bytes: &[u8], seq_min: u64) -> bool {
    (0..bytes.len()).any(|offset| {
        matches!(decode_record(&bytes[offset..]),
            Decoded::Record { seq, .. } if seq >= seq_min && seq < seq_min.saturating_add(1 << 40))
    })
}

/// Replays every record in order, calling `f(seq, kind, payload)`. A torn tail of the last
/// segment is cut off (and the cut synced); anything else that does not decode is an error.
pub fn replay<E: std::fmt::Display>(
    config: &Config,
    mut f: impl FnMut(u64, u8, &[u8]) -> Result<(), E>,
) -> Result<Replayed, Error> {
    fs::create_dir_all(&config.dir).map_err(io_err(&config.dir))?;
    let segments = list_segments(&config.dir)?;
    let mut next_seq: Option<u64> = None;
    let mut records = 0u64;
    let mut truncated_bytes = 0u64;
    for (index, segment) in segments.iter().enumerate() {
        let last = index + 1 == segments.len();
        let path = &segment.path;
        let mut bytes = Vec::new();
        File::open(path).and_then(|mut file| file.read_to_end(&mut bytes)).map_err(io_err(path))?;
        let corrupt = |offset: usize, reason: String| Error::Corrupt {
            path: path.clone(),
            offset: offset as u64,
            reason,
        };
        if bytes.len() < SEGMENT_HEADER_BYTES {
            if last {
                // Crashed while creating the segment: nothing in it was ever acknowledged.
                truncated_bytes += bytes.len() as u64;
                fs::remove_file(path).map_err(io_err(path))?;
                sync_dir(&config.dir)?;
                continue;
            }
            return Err(corrupt(0, "segment shorter than its header".into()));
        }
        let header = &bytes[..SEGMENT_HEADER_BYTES];
        let header_ok = &header[0..8] == SEGMENT_MAGIC
            && u32::from_le_bytes(header[24..28].try_into().expect("4 bytes"))
                == crc32c::crc32c(&header[0..24]);
        if !header_ok {
            return Err(corrupt(0, "bad segment header (magic or checksum)".into()));
        }
        let version = u16::from_le_bytes(header[8..10].try_into().expect("2 bytes"));
        if version != FORMAT_VERSION {
            return Err(corrupt(8, format!("unsupported format version {version}")));
        }
        let first_seq = u64::from_le_bytes(header[16..24].try_into().expect("8 bytes"));
        if first_seq != segment.first_seq {
            return Err(corrupt(
                16,
                format!(
                    "header says first sequence {first_seq}, file name says {}",
                    segment.first_seq
                ),
            ));
        }
        if let Some(expected) = next_seq {
            if first_seq != expected {
                return Err(corrupt(
                    16,
                    format!("sequence gap: expected {expected}, segment starts at {first_seq}"),
                ));
            }
        }
        let mut expected = first_seq;
        let mut offset = SEGMENT_HEADER_BYTES;
        while offset < bytes.len() {
            match decode_record(&bytes[offset..]) {
                Decoded::Record { seq, kind, payload, bytes: used } => {
                    if seq != expected {
                        return Err(corrupt(
                            offset,
                            format!("sequence {seq} where {expected} was expected"),
                        ));
                    }
                    f(seq, kind, payload).map_err(|reason| corrupt(offset, reason.to_string()))?;
                    records += 1;
                    expected += 1;
                    offset += used;
                }
                Decoded::Bad(reason) => {
                    if !last || valid_record_after(&bytes[offset + 1..], expected) {
                        return Err(corrupt(offset, reason));
                    }
                    tracing::warn!(path = %path.display(), offset, %reason, "cutting torn wal tail");
                    let file = OpenOptions::new().write(true).open(path).map_err(io_err(path))?;
                    file.set_len(offset as u64)
                        .and_then(|()| file.sync_all())
                        .map_err(io_err(path))?;
                    truncated_bytes += (bytes.len() - offset) as u64;
                    break;
                }
            }
        }
        next_seq = Some(expected);
    }
    Ok(Replayed { next_seq: next_seq.unwrap_or(1), records, truncated_bytes })
}

impl Wal {
    /// Starts the writer thread with a fresh segment beginning at `next_seq`.
    pub fn start(
        config: Config,
        next_seq: u64,
    ) -> Result<(Wal, std::thread::JoinHandle<()>), Error> {
        fs::create_dir_all(&config.dir).map_err(io_err(&config.dir))?;
        let mut segments = list_segments(&config.dir)?;
        // A segment with nothing after its header is replaced by the new one.
        if let Some(last) = segments.last() {
            if last.first_seq == next_seq {
                fs::remove_file(&last.path).map_err(io_err(&last.path))?;
                segments.pop();
            }
        }
        let (tx, rx) = mpsc::channel(config.queue_len_max);
        let segments = Arc::new(Mutex::new(segments));
        let failure = Arc::new(Mutex::new(None));
        let mut writer = Writer::open(config.clone(), next_seq, segments.clone(), failure.clone());
        let handle = std::thread::Builder::new()
            .name("wal-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(io_err(&config.dir))?;
        Ok((Wal { tx, segments, record_bytes_max: config.record_bytes_max, failure }, handle))
    }

    /// Why the log cannot take writes right now (a full disk, an I/O error), if it cannot.
    pub fn failure(&self) -> Option<String> {
        self.failure.lock().expect("wal failure lock").clone()
    }

    /// Appends a record. Resolves once it is durable (or written, when `sync` is false) and
    /// `apply` has run, with its sequence number.
    pub async fn append(
        &self,
        kind: u8,
        payload: Vec<u8>,
        sync: bool,
        apply: Option<Apply>,
    ) -> Result<u64, Arc<Error>> {
        if payload.len() > self.record_bytes_max {
            return Err(Arc::new(Error::RecordTooLarge {
                bytes: payload.len(),
                bytes_max: self.record_bytes_max,
            }));
        }
        let (done, answer) = oneshot::channel();
        self.tx
            .send(Request { kind, payload, sync, apply, done })
            .await
            .map_err(|_| Arc::new(Error::ShuttingDown))?;
        answer.await.map_err(|_| Arc::new(Error::ShuttingDown))?
    }

    /// Deletes closed segments all of whose records have a sequence below `seq_min`
    /// (everything in them is persisted). The open segment is never deleted.
    pub fn remove_segments_below(&self, seq_min: u64) -> Result<usize, Error> {
        let doomed: Vec<Segment> = {
            let mut segments = self.segments.lock().expect("wal segment list lock");
            let mut doomed = Vec::new();
            // Segment i ends where segment i+1 begins; the last one is open.
            while segments.len() > 1 && segments[1].first_seq <= seq_min {
                doomed.push(segments.remove(0));
            }
            doomed
        };
        for segment in &doomed {
            fs::remove_file(&segment.path).map_err(io_err(&segment.path))?;
        }
        Ok(doomed.len())
    }

    #[cfg(test)]
    pub fn segment_count(&self) -> usize {
        self.segments.lock().expect("wal segment list lock").len()
    }
}

struct Writer {
    config: Config,
    /// The open segment; `None` while creating one fails (a full disk at startup).
    file: Option<File>,
    path: PathBuf,
    file_bytes: u64,
    next_seq: u64,
    segments: Arc<Mutex<Vec<Segment>>>,
    failed: Option<Failed>,
    failure: Arc<Mutex<Option<String>>>,
}

/// The writer after a failed write or sync. What the open segment holds past `good_bytes` is
/// unknown (fsyncgate: a failed fsync may have dropped those pages), so recovery cuts it back
/// to `good_bytes` and writes `rewrite` again: the records already answered (`no_sync`
/// requests applied before the sync failed), so no visible row loses its record.
struct Failed {
    reason: String,
    good_bytes: u64,
    rewrite: Vec<u8>,
    last_try: std::time::Instant,
}

/// What clients are told about a failure: the error, and the segment by file name only (no
/// server path in answers).
fn reason_for_clients(error: &Error) -> String {
    match error {
        Error::Io { path, source } => {
            let name = path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
            format!("{source} (wal segment {name})")
        }
        other => other.to_string(),
    }
}

/// How often a failed writer tries again (on the next request).
const RETRY_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

impl Writer {
    fn open(
        config: Config,
        next_seq: u64,
        segments: Arc<Mutex<Vec<Segment>>>,
        failure: Arc<Mutex<Option<String>>>,
    ) -> Writer {
        let mut writer = Writer {
            config,
            file: None,
            path: PathBuf::new(),
            file_bytes: 0,
            next_seq,
            segments,
            failed: None,
            failure,
        };
        if let Err(error) = writer.new_segment() {
            // Start anyway (queries work); writes wait for the disk.
            writer.fail(Vec::new(), error, 0, Vec::new());
        }
        writer
    }

    /// Creates the segment starting at `next_seq` and makes it the open one.
    fn new_segment(&mut self) -> Result<(), Error> {
        let (file, path) = Self::create_segment(&self.config, self.next_seq)?;
        self.segments
            .lock()
            .expect("wal segment list lock")
            .push(Segment { first_seq: self.next_seq, path: path.clone() });
        self.file = Some(file);
        self.path = path;
        self.file_bytes = SEGMENT_HEADER_BYTES as u64;
        Ok(())
    }

    fn create_segment(config: &Config, first_seq: u64) -> Result<(File, PathBuf), Error> {
        let path = segment_path(&config.dir, first_seq);
        let created = (|| {
            let mut file = OpenOptions::new().create_new(true).append(true).open(&path)?;
            crate::fault("wal_write")?;
            file.write_all(&encode_segment_header(first_seq))?;
            if config.sync {
                file.sync_all()?;
                File::open(&config.dir)?.sync_all()?;
            }
            Ok(file)
        })();
        match created {
            Ok(file) => Ok((file, path)),
            Err(source) => {
                // A segment half made holds nothing: leave no file that replay would misread
                // or that would stand in the way of the next try.
                let _ = fs::remove_file(&path);
                Err(Error::Io { path, source })
            }
        }
    }

    fn run(&mut self, mut rx: mpsc::Receiver<Request>) {
        let mut buf = Vec::with_capacity(1 << 20);
        while let Some(first) = rx.blocking_recv() {
            let mut group = vec![first];
            let mut group_bytes = group[0].payload.len();
            while group_bytes < (8 << 20) {
                match rx.try_recv() {
                    Ok(request) => {
                        group_bytes += request.payload.len();
                        group.push(request);
                    }
                    Err(_) => break,
                }
            }
            self.write_group(group, &mut buf);
        }
        if let Some(failed) = self.failed.as_mut() {
            // A last try at shutdown, so the segment ends with what was answered.
            failed.last_try -= RETRY_EVERY;
            self.recover();
        }
        if self.failed.is_none() && self.config.sync {
            if let Some(Err(e)) = self.file.as_ref().map(File::sync_data) {
                tracing::error!(error = %e, "final wal sync failed");
            }
        }
        tracing::debug!("wal writer stopped");
    }

    /// After a failure: at most once per `RETRY_EVERY`, cuts the open segment back to what is
    /// known to be on disk, writes again what was answered, syncs; or creates the segment that
    /// could not be created. `true` once the writer can write again.
    fn recover(&mut self) -> bool {
        let Some(failed) = &mut self.failed else { return true };
        if failed.last_try.elapsed() < RETRY_EVERY {
            return false;
        }
        failed.last_try = std::time::Instant::now();
        let result = match self.file.is_some() {
            false => self.new_segment(),
            true => {
                let (good_bytes, rewrite) = (failed.good_bytes, failed.rewrite.clone());
                let path = self.path.clone();
                (|| {
                    let file = OpenOptions::new().append(true).open(&path)?;
                    file.set_len(good_bytes)?;
                    let mut file = file;
                    crate::fault("wal_write")?;
                    file.write_all(&rewrite)?;
                    if self.config.sync {
                        file.sync_all()?;
                    }
                    self.file = Some(file);
                    self.file_bytes = good_bytes + rewrite.len() as u64;
                    Ok(())
                })()
                .map_err(|source| Error::Io { path, source })
            }
        };
        match result {
            Ok(()) => {
                tracing::info!("wal writes again");
                self.failed = None;
                *self.failure.lock().expect("wal failure lock") = None;
                true
            }
            Err(error) => {
                let failed = self.failed.as_mut().expect("failed above");
                failed.reason = reason_for_clients(&error);
                *self.failure.lock().expect("wal failure lock") = Some(failed.reason.clone());
                false
            }
        }
    }

    fn write_group(&mut self, group: Vec<Request>, buf: &mut Vec<u8>) {
        if !self.recover() {
            let reason = self.failed.as_ref().map(|f| f.reason.clone()).unwrap_or_default();
            let error = Arc::new(Error::Unavailable { reason });
            for request in group {
                let _ = request.done.send(Err(error.clone()));
            }
            return;
        }
        let Some(file) = self.file.as_mut() else { return };
        buf.clear();
        let first_seq = self.next_seq;
        // Where each record ends in `buf`.
        let mut ends = Vec::with_capacity(group.len());
        for (i, request) in group.iter().enumerate() {
            encode_record(buf, first_seq + i as u64, request.kind, &request.payload);
            ends.push(buf.len());
        }
        let good_bytes = self.file_bytes;
        crate::crash_point("wal_before_write");
        if let Err(source) = crate::fault("wal_write").and_then(|()| file.write_all(buf)) {
            let error = Error::Io { path: self.path.clone(), source };
            self.fail(group, error, good_bytes, Vec::new());
            return;
        }
        // Requests are applied in sequence order: no_sync requests ahead of the first one that
        // waits for the sync are answered after write(2), the rest after the sync.
        let mut requests = group.into_iter().zip(first_seq..).peekable();
        let mut answered = 0;
        while let Some((request, seq)) = requests.next_if(|(r, _)| !r.sync || !self.config.sync) {
            Self::finish(request, seq);
            answered += 1;
        }
        if self.config.sync {
            crate::crash_point("wal_before_sync");
            if let Err(source) = crate::fault("wal_sync").and_then(|()| file.sync_data()) {
                // The answered records keep their sequence numbers (their rows are visible);
                // the others were never applied, so theirs are taken again by later writes.
                let kept = if answered == 0 { 0 } else { ends[answered - 1] };
                self.next_seq = first_seq + answered as u64;
                let error = Error::Io { path: self.path.clone(), source };
                self.fail(
                    requests.map(|(r, _)| r).collect(),
                    error,
                    good_bytes,
                    buf[..kept].to_vec(),
                );
                return;
            }
        }
        crate::crash_point("wal_after_sync");
        self.next_seq = first_seq + ends.len() as u64;
        self.file_bytes += buf.len() as u64;
        for (request, seq) in requests {
            Self::finish(request, seq);
        }
        if self.file_bytes >= self.config.segment_bytes_max {
            self.rotate();
        }
    }

    fn finish(request: Request, seq: u64) {
        if let Some(apply) = request.apply {
            apply(seq);
        }
        let _ = request.done.send(Ok(seq));
    }

    fn fail(&mut self, group: Vec<Request>, error: Error, good_bytes: u64, rewrite: Vec<u8>) {
        // Nothing more is acknowledged until the state of the segment is known again.
        tracing::error!(%error, "wal cannot write; writes are refused until it can");
        let reason = reason_for_clients(&error);
        *self.failure.lock().expect("wal failure lock") = Some(reason.clone());
        let error = Arc::new(Error::Unavailable { reason: reason.clone() });
        // Cut the refused records out of the file now (shrinking works on a full disk), so a
        // restart before the next retry does not replay writes their clients were told failed.
        // The answered ones stay: they are the bytes right after `good_bytes`. The retry still
        // rewrites and syncs them before anything new.
        if let Some(file) = self.file.as_mut() {
            if let Err(error) = file.set_len(good_bytes + rewrite.len() as u64) {
                tracing::warn!(%error, "cutting refused records from the wal failed");
            }
        }
        self.failed =
            Some(Failed { reason, good_bytes, rewrite, last_try: std::time::Instant::now() });
        for request in group {
            let _ = request.done.send(Err(error.clone()));
        }
    }

    /// Closes the open segment and opens the next. If the new one cannot be created, writing
    /// goes on in the old one (rotation is retried after the next write).
    fn rotate(&mut self) {
        let Some(file) = self.file.as_ref() else { return };
        if self.config.sync {
            if let Err(source) = file.sync_all() {
                let error = Error::Io { path: self.path.clone(), source };
                self.fail(Vec::new(), error, self.file_bytes, Vec::new());
                return;
            }
        }
        let old = (self.file.take(), std::mem::take(&mut self.path), self.file_bytes);
        if let Err(error) = self.new_segment() {
            tracing::warn!(%error, "starting a new wal segment failed; writing on in the old one");
            (self.file, self.path, self.file_bytes) = old;
        }
    }
}
