//! What a query reads of a table: a consistent snapshot of its schema, its Parquet files and
//! its buffered partitions, limited to a time range.

use super::{Engine, PartitionSnapshot, TableSnapshot};

impl Engine {
    /// A consistent view of one table, limited to partitions that may hold rows in
    /// `[min_time_ns, max_time_ns]`.
    pub fn snapshot(
        &self,
        db: &str,
        table: &str,
        min_time_ns: i64,
        max_time_ns: i64,
    ) -> Option<TableSnapshot> {
        self.catalog().table(db, table)?;
        let data = self.table_data(db, table)?;
        let data = data.read().expect("table lock");
        let partition_ns = self.partition_ns();
        let lowest = crate::buffer::partition_of(min_time_ns, partition_ns);
        // A reversed range (`BETWEEN later AND earlier`) selects nothing; BTreeMap::range
        // would panic on it.
        let partitions = if lowest > max_time_ns {
            Vec::new()
        } else {
            data.buffer
                .partitions
                .range(lowest..=max_time_ns)
                .map(|(&partition_ns, p)| PartitionSnapshot {
                    partition_ns,
                    batches: p.persisting.iter().chain(p.batches.iter()).cloned().collect(),
                    overlap: p.overlap || p.persisting_overlap,
                })
                .collect()
        };
        let files = data
            .files
            .iter()
            .filter(|f| f.max_time_ns >= min_time_ns && f.min_time_ns <= max_time_ns)
            .cloned()
            .collect();
        Some(TableSnapshot { files, partitions })
    }
}
