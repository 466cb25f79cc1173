//! `last_cache('table')`, as InfluxDB 3 names it: a table of the latest point of every series,
//! from the engine's last-value cache (`buffer::last`), and the rewrite that makes the
//! "last point per series" query use it by itself:
//!
//! `SELECT DISTINCT ON (tags…) … FROM t [WHERE <tags only>] ORDER BY tags…, time DESC`
//!
//! becomes `SELECT … FROM last_cache('t', 'tag', …) [WHERE …] ORDER BY …`, without the
//! `DISTINCT ON`. The answer is the same: the latest row of a group of series (a tag subset) is
//! the latest of their latest rows, and a filter on tags keeps or drops whole series. With tag
//! arguments the function applies the query's filters itself, then keeps the latest row per
//! combination of those tags, which is what `DISTINCT ON` would keep (DataFusion's `DISTINCT
//! ON` costs tens of milliseconds for a thousand rows). Anything else (joins, filters on
//! fields or time, GROUP BY) is left alone.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use datafusion::catalog::{Session, TableFunctionArgs, TableFunctionImpl};
use datafusion::common::{plan_err, DFSchema, ScalarValue};
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::datasource::{TableProvider, TableType};
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::sql::sqlparser::ast::{
    visit_expressions, Distinct, Expr as SqlExpr, GroupByExpr, OrderByKind, Query, SetExpr,
    Statement, TableFactor,
};

use crate::catalog::{Catalog, ColumnKind, TIME_COLUMN};
use crate::engine::Engine;

/// The `last_cache` table function of one database's session.
#[derive(Debug)]
pub struct LastCacheFunction {
    pub engine: Arc<Engine>,
    pub db: String,
}

impl TableFunctionImpl for LastCacheFunction {
    fn call_with_args(&self, args: TableFunctionArgs) -> DfResult<Arc<dyn TableProvider>> {
        let names: Option<Vec<String>> = args
            .exprs()
            .iter()
            .map(|e| match e {
                Expr::Literal(ScalarValue::Utf8(Some(name)), _) => Some(name.clone()),
                _ => None,
            })
            .collect();
        let Some((table, per)) = names.as_ref().and_then(|n| n.split_first()) else {
            return plan_err!("last_cache takes a table name and optionally tags, as in last_cache('cpu') or last_cache('cpu', 'host')");
        };
        let Some(schema) = self.engine.catalog().table(&self.db, table).cloned() else {
            return Err(DataFusionError::External(Box::new(super::Error::UndefinedTable(
                table.to_string(),
            ))));
        };
        if let Some(other) =
            per.iter().find(|t| schema.column(t).is_none_or(|c| c.kind != ColumnKind::Tag))
        {
            return plan_err!("last_cache('{table}', …): \"{other}\" is not a tag of {table}");
        }
        Ok(Arc::new(LastCacheTable {
            engine: self.engine.clone(),
            db: self.db.clone(),
            table: table.clone(),
            per: per.to_vec(),
            schema: schema.arrow_schema().clone(),
        }))
    }
}

#[derive(Debug)]
struct LastCacheTable {
    engine: Arc<Engine>,
    db: String,
    table: String,
    /// Keep the latest row per combination of these tags (after the filters); empty: every
    /// series' row.
    per: Vec<String>,
    schema: SchemaRef,
}

#[async_trait]
impl TableProvider for LastCacheTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Temporary
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> DfResult<Vec<TableProviderFilterPushDown>> {
        // Filters run here, before the rows are reduced to the latest per `per`, as the WHERE
        // of a DISTINCT ON query runs before the DISTINCT ON.
        Ok(vec![TableProviderFilterPushDown::Exact; filters.len()])
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        _limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let batch = self
            .engine
            .last_values(&self.db, &self.table)
            .await
            .map_err(|e| DataFusionError::External(Box::new(e)))?;
        let mut batches = Vec::new();
        if let Some(batch) = batch.filter(|b| b.num_rows() > 0) {
            let mut batch = crate::buffer::adapt(&batch, &self.schema);
            if let Some(predicate) = filters
                .iter()
                .cloned()
                .map(datafusion::logical_expr::expr_rewriter::unnormalize_col)
                .reduce(Expr::and)
            {
                let df_schema = DFSchema::try_from(self.schema.as_ref().clone())?;
                let mask = state
                    .create_physical_expr(predicate, &df_schema)?
                    .evaluate(&batch)?
                    .into_array(batch.num_rows())?;
                let mask = mask.as_boolean_opt().ok_or_else(|| {
                    DataFusionError::Internal("a filter that is not boolean".into())
                })?;
                batch = arrow::compute::filter_record_batch(&batch, mask)?;
            }
            if !self.per.is_empty() {
                batch = latest_per(&batch, &self.per)?;
            }
            batches.push(batch);
        }
        Ok(MemorySourceConfig::try_new_exec(&[batches], self.schema.clone(), projection.cloned())?)
    }
}

/// The row with the greatest time per combination of the `per` tags (NULL is a value of its
/// own, as in DISTINCT ON); among rows at the same time, any one.
fn latest_per(
    batch: &RecordBatch,
    per: &[String],
) -> Result<RecordBatch, arrow::error::ArrowError> {
    use std::collections::hash_map::Entry;
    let missing = |name: &str| arrow::error::ArrowError::SchemaError(format!("no column {name}"));
    let times = batch.column_by_name(TIME_COLUMN).ok_or_else(|| missing(TIME_COLUMN))?;
    let times = times
        .as_primitive_opt::<arrow::datatypes::TimestampNanosecondType>()
        .ok_or_else(|| missing(TIME_COLUMN))?;
    let keys: Vec<ArrayRef> = per
        .iter()
        .map(|t| {
            arrow::compute::cast(
                batch.column_by_name(t).ok_or_else(|| missing(t))?,
                &arrow::datatypes::DataType::Utf8,
            )
        })
        .collect::<Result<_, _>>()?;
    let keys: Vec<&arrow::array::StringArray> = keys.iter().map(|k| k.as_string::<i32>()).collect();
    let mut best: HashMap<Vec<Option<&str>>, usize> = HashMap::with_capacity(batch.num_rows());
    for row in 0..batch.num_rows() {
        let key = keys.iter().map(|k| k.is_valid(row).then(|| k.value(row))).collect();
        match best.entry(key) {
            Entry::Vacant(e) => {
                e.insert(row);
            }
            Entry::Occupied(mut e) => {
                if times.value(row) > times.value(*e.get()) {
                    e.insert(row);
                }
            }
        }
    }
    let mut rows: Vec<u32> = best.into_values().map(|r| r as u32).collect();
    rows.sort_unstable();
    arrow::compute::take_record_batch(batch, &arrow::array::UInt32Array::from(rows))
}

fn column_name(expr: &SqlExpr) -> Option<String> {
    match expr {
        SqlExpr::Identifier(ident) if ident.quote_style.is_some() => Some(ident.value.clone()),
        SqlExpr::Identifier(ident) => Some(ident.value.to_ascii_lowercase()),
        _ => None,
    }
}

/// Whether every column `expr` reads is a tag (so the filter keeps or drops whole series).
fn reads_only_tags(expr: &SqlExpr, is_tag: &dyn Fn(&str) -> bool) -> bool {
    let mut only_tags = true;
    let _ = visit_expressions(expr, |e| {
        match e {
            SqlExpr::Identifier(_) => only_tags &= column_name(e).is_some_and(|c| is_tag(&c)),
            SqlExpr::CompoundIdentifier(_)
            | SqlExpr::Subquery(_)
            | SqlExpr::Exists { .. }
            | SqlExpr::InSubquery { .. } => only_tags = false,
            _ => {}
        }
        std::ops::ControlFlow::<()>::Continue(())
    });
    only_tags
}

/// The table a "last point per series" query reads and its DISTINCT ON tags, when `query` is
/// one (see the module docs).
fn lastpoint_table(query: &Query, catalog: &Catalog, db: &str) -> Option<(String, Vec<String>)> {
    if query.with.is_some() {
        return None;
    }
    let SetExpr::Select(select) = query.body.as_ref() else { return None };
    let Some(Distinct::On(on)) = &select.distinct else { return None };
    let [from] = select.from.as_slice() else { return None };
    let TableFactor::Table { name, args: None, .. } = &from.relation else { return None };
    if !from.joins.is_empty()
        || select.having.is_some()
        || !matches!(&select.group_by, GroupByExpr::Expressions(g, _) if g.is_empty())
    {
        return None;
    }
    let [table_name] = name.0.as_slice() else { return None };
    let table_name = table_name.as_ident()?;
    let table_name = if table_name.quote_style.is_some() {
        table_name.value.clone()
    } else {
        table_name.value.to_ascii_lowercase()
    };
    let schema = catalog.table(db, &table_name)?;
    let is_tag = |c: &str| schema.column(c).is_some_and(|col| col.kind == ColumnKind::Tag);
    let keys: Vec<String> = on.iter().map(column_name).collect::<Option<_>>()?;
    if keys.is_empty() || !keys.iter().all(|k| is_tag(k)) {
        return None;
    }
    if select.selection.as_ref().is_some_and(|w| !reads_only_tags(w, &is_tag)) {
        return None;
    }
    let order = query.order_by.as_ref()?;
    let OrderByKind::Expressions(order) = &order.kind else { return None };
    if order.len() <= keys.len() {
        return None;
    }
    let leads_with_keys =
        order.iter().zip(&keys).all(|(o, k)| column_name(&o.expr).as_deref() == Some(k.as_str()));
    let then_latest = column_name(&order[keys.len()].expr).as_deref() == Some(TIME_COLUMN)
        && order[keys.len()].options.asc == Some(false);
    (leads_with_keys && then_latest).then_some((table_name, keys))
}

/// Makes a "last point per series" query read `last_cache('t', keys…)` in place of `t`;
/// whether it was one.
pub fn rewrite(statement: &mut Statement, catalog: &Catalog, db: &str) -> bool {
    rewrite_lastpoint(statement, catalog, db).is_some()
}

fn rewrite_lastpoint(statement: &mut Statement, catalog: &Catalog, db: &str) -> Option<()> {
    let dialect = datafusion::sql::sqlparser::dialect::PostgreSqlDialect {};
    let query = match statement {
        Statement::Query(query) => query,
        // EXPLAIN [ANALYZE] shows the plan the query itself gets.
        Statement::Explain { statement, .. } => match statement.as_mut() {
            Statement::Query(query) => query,
            _ => return None,
        },
        _ => return None,
    };
    let (table, keys) = lastpoint_table(query, catalog, db)?;
    let SetExpr::Select(select) = query.body.as_mut() else { return None };
    // The table's own name (or alias) stays the alias, so `t.column` references keep working.
    let alias = match &select.from[0].relation {
        // The alias's name only: its Display carries the `AS`, and a column list is not kept.
        TableFactor::Table { alias: Some(alias), .. } if alias.columns.is_empty() => {
            alias.name.to_string()
        }
        TableFactor::Table { alias: Some(_), .. } => return None,
        _ => datafusion::sql::sqlparser::ast::Ident::with_quote('"', table.clone()).to_string(),
    };
    let quote = |s: &str| format!("'{}'", s.replace('\'', "''"));
    let arguments: Vec<String> = std::iter::once(&table).chain(&keys).map(|s| quote(s)).collect();
    let function = format!("SELECT * FROM last_cache({}) AS {alias}", arguments.join(", "));
    let parsed = datafusion::sql::sqlparser::parser::Parser::parse_sql(&dialect, &function).ok()?;
    let [Statement::Query(replacement)] = parsed.as_slice() else { return None };
    let SetExpr::Select(replacement) = replacement.body.as_ref() else { return None };
    select.from[0].relation = replacement.from[0].relation.clone();
    // last_cache(t, keys…) keeps one row per key already.
    select.distinct = None;
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rewritten SQL, or `None` when the query is not a last point per series.
    fn rewrite(sql: &str, catalog: &Catalog, db: &str) -> Option<String> {
        let dialect = datafusion::sql::sqlparser::dialect::PostgreSqlDialect {};
        let mut statements =
            datafusion::sql::sqlparser::parser::Parser::parse_sql(&dialect, sql).ok()?;
        let [statement] = statements.as_mut_slice() else { return None };
        super::rewrite(statement, catalog, db).then(|| statement.to_string())
    }
    use crate::catalog::{Column, FieldType, TableSchema};

    fn catalog() -> Catalog {
        let mut catalog = Catalog::default();
        catalog.put_table(
            "db",
            TableSchema::new(
                "cpu",
                vec![
                    Column { name: "hostname".into(), kind: ColumnKind::Tag },
                    Column { name: "region".into(), kind: ColumnKind::Tag },
                    Column {
                        name: "usage_user".into(),
                        kind: ColumnKind::Field(FieldType::Integer),
                    },
                ],
            ),
        );
        catalog
    }

    #[test]
    fn lastpoint_reads_the_cache_and_nothing_else_does() {
        let c = catalog();
        let rewritten = rewrite(
            "SELECT DISTINCT ON (hostname) * FROM cpu ORDER BY hostname, time DESC",
            &c,
            "db",
        )
        .expect("lastpoint");
        assert_eq!(
            rewritten,
            "SELECT * FROM last_cache('cpu', 'hostname') AS \"cpu\" ORDER BY hostname, time DESC"
        );
        let rewritten = rewrite("select distinct on (Region, hostname) * from CPU c where hostname <> 'x' order by region, hostname, time desc limit 3", &c, "db");
        assert_eq!(rewritten.as_deref(), Some("SELECT * FROM last_cache('cpu', 'region', 'hostname') AS c WHERE hostname <> 'x' ORDER BY region, hostname, time DESC LIMIT 3"));
        let rewritten = rewrite("SELECT DISTINCT ON (hostname) region FROM cpu AS c WHERE region <> 'us' ORDER BY hostname, time DESC", &c, "db");
        assert_eq!(rewritten.as_deref(), Some("SELECT region FROM last_cache('cpu', 'hostname') AS c WHERE region <> 'us' ORDER BY hostname, time DESC"));
        assert!(rewrite("SELECT DISTINCT ON (hostname) * FROM cpu WHERE region = 'eu' ORDER BY hostname, time DESC", &c, "db").is_some());
        for other in [
            "SELECT DISTINCT ON (hostname) * FROM cpu WHERE usage_user > 90 ORDER BY hostname, time DESC",
            "SELECT DISTINCT ON (hostname) * FROM cpu WHERE time < '2020-01-01' ORDER BY hostname, time DESC",
            "SELECT DISTINCT ON (hostname) * FROM cpu ORDER BY hostname, time ASC",
            "SELECT DISTINCT ON (usage_user) * FROM cpu ORDER BY usage_user, time DESC",
            "SELECT DISTINCT ON (hostname) * FROM cpu ORDER BY hostname",
            "SELECT DISTINCT ON (hostname) * FROM nosuch ORDER BY hostname, time DESC",
        ] {
            assert!(rewrite(other, &c, "db").is_none(), "{other}");
        }
    }
}
