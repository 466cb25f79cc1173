//! The `system` schema of each database: `system.views` (`views::system`) and the alert tables
//! (`alerts::system`), built live when a query names them, read-only.

use std::sync::Arc;

use async_trait::async_trait;
use datafusion::catalog::SchemaProvider;
use datafusion::datasource::{MemTable, TableProvider};
use datafusion::error::{DataFusionError, Result as DfResult};

/// The `system` schema of a database.
#[derive(Debug)]
pub struct SystemSchema {
    pub views: Arc<crate::views::Views>,
    pub alerts: Arc<crate::alerts::Alerts>,
    pub db: String,
}

/// A system table: read-only, and listed by catalog queries as a view (relkind `v`), not as
/// one of the user's tables (`\dt`, SQLAlchemy's `get_table_names` list only those).
#[derive(Debug)]
struct SystemTable(MemTable);

#[async_trait]
impl TableProvider for SystemTable {
    fn schema(&self) -> arrow::datatypes::SchemaRef {
        self.0.schema()
    }

    fn table_type(&self) -> datafusion::datasource::TableType {
        datafusion::datasource::TableType::View
    }

    async fn scan(
        &self,
        state: &dyn datafusion::catalog::Session,
        projection: Option<&Vec<usize>>,
        filters: &[datafusion::logical_expr::Expr],
        limit: Option<usize>,
    ) -> DfResult<Arc<dyn datafusion::physical_plan::ExecutionPlan>> {
        self.0.scan(state, projection, filters, limit).await
    }
}

#[async_trait]
impl SchemaProvider for SystemSchema {
    fn table_names(&self) -> Vec<String> {
        let mut names = vec!["views".to_string()];
        names.extend(crate::alerts::system::TABLES.iter().map(|t| t.to_string()));
        names
    }

    async fn table(&self, name: &str) -> DfResult<Option<Arc<dyn TableProvider>>> {
        let batch = if name == "views" {
            crate::views::system::views_table(&self.views, &self.db)?
        } else {
            match crate::alerts::system::table(&self.alerts, &self.db, name) {
                Some(batch) => batch.map_err(|e| DataFusionError::ArrowError(Box::new(e), None))?,
                None => return Ok(None),
            }
        };
        let table = MemTable::try_new(batch.schema(), vec![vec![batch]])?;
        Ok(Some(Arc::new(SystemTable(table))))
    }

    fn table_exist(&self, name: &str) -> bool {
        name == "views" || crate::alerts::system::TABLES.contains(&name)
    }
}
