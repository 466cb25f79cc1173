//! Sorting buffered rows in the background: runs of unsorted batches (at least
//! `Config::sort_rows_min` rows) are rewritten as one batch sorted by series (`buffer::sort`)
//! and swapped in under the table lock, only if they are still where they were.

use super::{Engine, Error};

impl Engine {
    /// Sorts runs of buffered batches by series (see `buffer::sort`), one run at a time on a
    /// blocking thread, so queries for a few series find their rows by binary search. A run
    /// that a persist or a merge moved meanwhile is left as it was. Returns the runs sorted.
    pub async fn sort_buffers(&self) -> Result<usize, Error> {
        let tables = self.all_tables();
        let mut sorted_runs = 0;
        for ((db, table), data) in tables {
            loop {
                let Some((partition, start, run)) =
                    data.read().expect("table lock").buffer.unsorted_run(self.config.sort_rows_min)
                else {
                    break;
                };
                let Some(schema) =
                    self.catalog().table(&db, &table).map(|t| t.arrow_schema_with_seq().clone())
                else {
                    break;
                };
                let inputs = run.clone();
                let sorted = tokio::task::spawn_blocking(move || {
                    crate::buffer::sort::sort_by_series(&inputs, &schema)
                })
                .await
                .map_err(|e| Error::Internal(format!("sorting task: {e}")))?
                .map_err(|e| Error::Internal(format!("sorting buffered rows: {e}")))?;
                let mut guard = data.write().expect("table lock");
                if guard.dropped {
                    break;
                }
                let before = guard.buffer.bytes();
                if !guard.buffer.replace_run(partition, start, &run, sorted) {
                    break;
                }
                let after = guard.buffer.bytes();
                drop(guard);
                self.buffer_resized(before, after);
                sorted_runs += 1;
            }
        }
        Ok(sorted_runs)
    }
}
