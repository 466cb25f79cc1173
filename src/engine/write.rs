//! The write path: lines are checked against a catalog snapshot and built into Arrow rows on the
//! request's task (`prepare`), the catalog grows under a short lock (`grow_catalog`), the record
//! goes to the WAL, and the WAL writer thread applies the rows to the buffer once they are
//! durable, in sequence order, and hands them to subscribers (`Engine::apply`). Startup replay
//! (`open`) reuses `prepare` and `grow_catalog`.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::record::LpRecord;
use super::{in_flight_kib_max, CommittedWrite, Engine, Error, RejectedLine, Rejections};
use super::{WriteOptions, WriteOutcome};
use crate::buffer::{PendingBatch, RowsBuilder};
use crate::catalog::{self, Catalog, Column, TableSchema};
use crate::line_protocol::{self, Line, Precision};
use crate::wal;

/// Why one line of a write is rejected; its message is the line's `error_message`.
#[derive(Debug, thiserror::Error)]
pub(super) enum LineError {
    #[error(transparent)]
    Parse(#[from] line_protocol::ParseError),
    #[error(transparent)]
    Catalog(#[from] catalog::Error),
    #[error("timestamp {timestamp} is out of range for precision {precision:?}")]
    TimestampRange { timestamp: i64, precision: Precision },
    #[error("database would exceed {} tables", catalog::TABLES_PER_DATABASE_MAX)]
    TooManyTables,
    #[error("\"{0}\" is a materialized view: it cannot be written to")]
    IsView(String),
    #[error("point time {} is outside the retention period of table \"{table}\": rows before {} are not kept", rfc3339(*.time_ns), rfc3339(*.cutoff_ns))]
    Expired { table: String, time_ns: i64, cutoff_ns: i64 },
}

/// A time for messages: RFC 3339 in UTC, or the number of nanoseconds if it has no date.
pub(crate) fn rfc3339(ns: i64) -> String {
    chrono::DateTime::from_timestamp_nanos(ns).to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

/// Lines checked against a catalog and turned into rows.
pub(super) struct Prepared {
    pub(super) wal_lines: Vec<u8>,
    pub(super) rejected: Rejections,
    /// New columns (and tables) these lines need, per table.
    pub(super) additions: BTreeMap<String, Vec<Column>>,
    pub(super) rows: RowsBuilder,
}

const ORIGINAL_LINE_BYTES_MAX: usize = 1024;

/// Checks and builds the lines of `body`; lines of tables for which `skip` says so are left
/// out silently (replay skips the rows of dropped tables that way). Replay reads lines with
/// `Strictness::Replay`: what an earlier version accepted is read back, not refused. A point
/// older than its table's retention cutoff at `now_ns` is refused; on replay, one below the
/// table's expired-before mark is left out (its rows were expired for good).
#[allow(clippy::too_many_arguments)]
pub(super) fn prepare(
    catalog: &Catalog,
    db: &str,
    body: &[u8],
    precision: Precision,
    default_time_ns: i64,
    partition_ns: i64,
    skip: &dyn Fn(&str) -> bool,
    strictness: line_protocol::Strictness,
    now_ns: i64,
) -> Prepared {
    let mut prepared = Prepared {
        wal_lines: Vec::with_capacity(body.len()),
        rejected: Rejections::default(),
        additions: BTreeMap::new(),
        rows: RowsBuilder::new(partition_ns),
    };
    let mut line = Line::default();
    let empty_tables: &mut HashMap<String, TableSchema> = &mut HashMap::new();
    let mut new_tables = 0usize;
    for (number, bytes) in line_protocol::lines(body) {
        let parsed = line_protocol::parse_line_as(number, bytes, &mut line, strictness)
            .map_err(LineError::from);
        if parsed.is_ok() && skip(line.measurement.as_ref()) {
            continue;
        }
        let outcome = parsed.and_then(|()| {
            let name = line.measurement.as_ref();
            catalog::check_object_name("table", name)?;
            if catalog.view(db, name).is_some() {
                return Err(LineError::IsView(name.to_string()));
            }
            let schema = match catalog.table(db, name) {
                Some(schema) => schema.as_ref(),
                None => &*empty_tables
                    .entry(name.to_string())
                    .or_insert_with(|| TableSchema::new(name, Vec::new())),
            };
            let pending = prepared.additions.get(name).map_or(&[][..], |v| v.as_slice());
            let added = schema.check_line(&line, pending)?;
            let time_ns = match line.timestamp {
                None => default_time_ns,
                Some(t) => precision
                    .to_nanos(t)
                    .ok_or(LineError::TimestampRange { timestamp: t, precision })?,
            };
            // Writes: refused before the cutoff. Replay: rows below the table's expired-before
            // mark are gone for good and left out; rows merely past the retention now are
            // kept (the scan hides them; a longer retention later shows them, as it does
            // their persisted neighbours).
            let cutoff = match strictness {
                line_protocol::Strictness::Write => catalog.cutoff(db, name, now_ns),
                line_protocol::Strictness::Replay => catalog.expired_before(db, name),
            };
            let kept = cutoff.is_none_or(|cutoff| time_ns >= cutoff);
            if let (false, line_protocol::Strictness::Write, Some(cutoff_ns)) =
                (kept, strictness, cutoff)
            {
                return Err(LineError::Expired { table: name.to_string(), time_ns, cutoff_ns });
            }
            if catalog.table(db, name).is_none() && !prepared.additions.contains_key(name) {
                if catalog.table_count(db) + new_tables >= catalog::TABLES_PER_DATABASE_MAX {
                    return Err(LineError::TooManyTables);
                }
                new_tables += 1;
            }
            Ok((added, time_ns, kept))
        });
        match outcome {
            Ok((added, time_ns, kept)) => {
                if !added.is_empty() {
                    match prepared.additions.get_mut(line.measurement.as_ref()) {
                        Some(columns) => columns.extend(added),
                        None => {
                            prepared.additions.insert(line.measurement.to_string(), added);
                        }
                    }
                }
                if kept {
                    prepared.rows.push(&line, time_ns);
                    prepared.wal_lines.extend_from_slice(bytes);
                    prepared.wal_lines.push(b'\n');
                }
            }
            Err(error) => prepared.rejected.push(|| {
                let mut original = String::from_utf8_lossy(bytes).into_owned();
                if original.len() > ORIGINAL_LINE_BYTES_MAX {
                    let mut cut = ORIGINAL_LINE_BYTES_MAX;
                    while !original.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    original.truncate(cut);
                }
                RejectedLine {
                    line_number: number,
                    original_line: original,
                    error_message: error.to_string(),
                }
            }),
        }
    }
    prepared
}

/// Applies a batch's additions to `catalog`; `false` if one conflicts (another write won a race).
pub(super) fn grow_catalog(
    catalog: &mut Catalog,
    db: &str,
    additions: &BTreeMap<String, Vec<Column>>,
) -> bool {
    for (table, columns) in additions {
        if let Some(existing) = catalog.table(db, table) {
            if existing.conflicts_with(columns) {
                return false;
            }
        }
        if catalog.view(db, table).is_some() {
            return false;
        }
    }
    catalog.create_database(db);
    for (table, columns) in additions {
        let next = match catalog.table(db, table) {
            Some(existing) if columns.iter().all(|c| existing.column(&c.name).is_some()) => {
                continue
            }
            Some(existing) => existing.with_columns(columns),
            None => TableSchema::new(table.clone(), columns.clone()),
        };
        catalog.put_table(db, next);
    }
    true
}

impl Engine {
    /// Stores the lines of a line-protocol body. Returns once they are durable (or written,
    /// with `no_sync`), and visible to queries.
    pub async fn write_lp(
        self: &Arc<Self>,
        db: &str,
        body: &[u8],
        options: WriteOptions,
    ) -> Result<WriteOutcome, Error> {
        catalog::check_object_name("database", db).map_err(|reason| Error::InvalidName {
            what: "database",
            name: db.into(),
            reason,
        })?;
        if self.buffered_bytes() > self.config.buffer_bytes_max {
            self.persist_wakeup.notify_one();
            return Err(Error::BufferFull { bytes_max: self.config.buffer_bytes_max });
        }
        // Waits while other writes hold the budget; a body larger than all of it takes all of it.
        let kib = u32::try_from((body.len() >> 10) + 1)
            .unwrap_or(u32::MAX)
            .min(in_flight_kib_max(self.config.buffer_bytes_max) as u32);
        let permit = self
            .in_flight_kib
            .clone()
            .acquire_many_owned(kib)
            .await
            .map_err(|_| Error::ShuttingDown)?;
        let partition_ns = self.partition_ns();
        let gate = self.write_gate.clone().read_owned().await;
        let now_ns = self.clock().now_ns();
        let mut prepared = prepare(
            &self.catalog(),
            db,
            body,
            options.precision,
            options.default_time_ns,
            partition_ns,
            &|_| false,
            line_protocol::Strictness::Write,
            now_ns,
        );
        let needs_growth = !self.catalog().has_database(db)
            || prepared.additions.values().any(|c| !c.is_empty())
            || prepared.additions.keys().any(|t| self.catalog().table(db, t).is_none());
        if needs_growth && !prepared.wal_lines.is_empty() {
            let _guard = self.schema_lock.lock().expect("schema lock");
            let mut catalog = self.catalog().as_ref().clone();
            if !grow_catalog(&mut catalog, db, &prepared.additions) {
                // Another write added a conflicting column meanwhile: check again, under the lock.
                prepared = prepare(
                    &catalog,
                    db,
                    body,
                    options.precision,
                    options.default_time_ns,
                    partition_ns,
                    &|_| false,
                    line_protocol::Strictness::Write,
                    now_ns,
                );
                let grown = grow_catalog(&mut catalog, db, &prepared.additions);
                debug_assert!(grown, "lines checked under the schema lock cannot conflict");
            }
            if !prepared.rejected.is_empty() && !options.accept_partial {
                return Err(Error::Rejected(prepared.rejected));
            }
            let mut tables = self.tables.write().expect("tables lock");
            for table in prepared.additions.keys() {
                tables.entry((db.to_string(), table.clone())).or_default();
            }
            *self.catalog.write().expect("catalog lock") = Arc::new(catalog);
        }
        let Prepared { wal_lines, rejected, rows, .. } = prepared;
        if !rejected.is_empty() && !options.accept_partial {
            return Err(Error::Rejected(rejected));
        }
        if wal_lines.is_empty() {
            return if rejected.is_empty() {
                Ok(WriteOutcome::default())
            } else {
                Err(Error::Rejected(rejected))
            };
        }
        let lines_stored = rows.rows();
        let pending = rows.finish();
        let payload = LpRecord {
            precision: options.precision,
            default_time_ns: options.default_time_ns,
            database: db,
            lines: &wal_lines,
        }
        .encode();
        drop(wal_lines);
        let engine = self.clone();
        let database = db.to_string();
        let apply: wal::Apply = Box::new(move |seq| engine.apply(&database, seq, pending));
        let wal = self.wal()?;
        // Once the record is on its way the write finishes, even if the caller stops waiting
        // (a client gone, a timeout): the task holds the write gate until the record is
        // applied, so a drop never runs between the two and replay skips what it must.
        let append = tokio::spawn(async move {
            let appended =
                wal.append(wal::KIND_LINE_PROTOCOL, payload, !options.no_sync, Some(apply)).await;
            // The body's share of the in-flight budget too: its rows live until applied.
            drop((gate, permit));
            appended
        });
        append
            .await
            .map_err(|e| Error::Internal(format!("wal append task failed: {e}")))?
            .map_err(Error::Wal)?;
        Ok(WriteOutcome { lines_stored, rejected })
    }

    /// A table's buffer went from `before` to `after` bytes.
    pub(super) fn buffer_resized(&self, before: usize, after: usize) {
        if after >= before {
            self.buffered_bytes.fetch_add(after - before, Ordering::Relaxed);
        } else {
            self.buffered_bytes.fetch_sub(before - after, Ordering::Relaxed);
        }
    }

    /// Runs on the WAL writer thread, in sequence order, once the record is durable.
    fn apply(&self, db: &str, seq: u64, pending: Vec<PendingBatch>) {
        let catalog = self.catalog();
        let mut appended = Vec::with_capacity(pending.len());
        for p in &pending {
            let Some(table) = self.table_data(db, &p.table) else {
                tracing::error!(db, table = %p.table, "table vanished before its rows were applied");
                continue;
            };
            let Some(table_schema) = catalog.table(db, &p.table) else {
                tracing::error!(db, table = %p.table, "table left the catalog before its rows were applied");
                continue;
            };
            let schema = table_schema.arrow_schema_with_seq().clone();
            let mut data = table.write().expect("table lock");
            let before = data.buffer.bytes();
            let stored = data.buffer.append(p, seq, &schema);
            if let Some(cache) = data.last.as_mut() {
                cache.values.fold(table_schema, &stored);
            }
            let after = data.buffer.bytes();
            drop(data);
            self.buffer_resized(before, after);
            appended.push((p.table.as_str(), stored));
        }
        self.applied_seq.store(seq, Ordering::Release);
        let subscribers = self.subscribers.read().expect("subscribers lock");
        if !subscribers.is_empty() {
            let committed = CommittedWrite {
                database: db,
                seq,
                tables: appended.iter().map(|(t, b)| (*t, b)).collect(),
                dropped: Vec::new(),
            };
            for subscriber in subscribers.iter() {
                subscriber(&committed);
            }
        }
        if self.buffered_bytes() > self.config.buffer_bytes_max / 4 {
            self.persist_wakeup.notify_one();
        }
    }
}
