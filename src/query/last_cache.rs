//! `last_cache('table')`, as InfluxDB 3 names it: a table of the latest point of every series,
//! from the engine's last-value cache (`buffer::last`), and the rewrite that makes the
//! "last point per series" query use it by itself:
//!
//! `SELECT DISTINCT ON (tags…) … FROM t [WHERE <tags only>] ORDER BY tags…, time DESC`
//!
//! reads `last_cache('t')` instead of `t`. The answer is the same: the latest row of a group of
//! series (a tag subset) is the latest of their latest rows, and a filter on tags keeps or drops
//! whole series. Anything else (joins, filters on fields or time, GROUP BY) is left alone.

use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use datafusion::catalog::{Session, TableFunctionArgs, TableFunctionImpl};
use datafusion::common::{plan_err, ScalarValue};
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::datasource::{TableProvider, TableType};
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::logical_expr::Expr;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::sql::sqlparser::ast::{
    visit_expressions, Distinct, Expr as SqlExpr, GroupByExpr, OrderByKind, Query, SetExpr, Statement, TableFactor,
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
        let table = match args.exprs() {
            [Expr::Literal(ScalarValue::Utf8(Some(name)), _)] => name.clone(),
            _ => return plan_err!("last_cache takes a table name, as in last_cache('cpu')"),
        };
        let Some(schema) = self.engine.catalog().table(&self.db, &table).cloned() else {
            return plan_err!("table '{table}' not found");
        };
        Ok(Arc::new(LastCacheTable { engine: self.engine.clone(), db: self.db.clone(), table, schema: schema.arrow_schema().clone() }))
    }
}

#[derive(Debug)]
struct LastCacheTable {
    engine: Arc<Engine>,
    db: String,
    table: String,
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

    async fn scan(&self, _state: &dyn Session, projection: Option<&Vec<usize>>, _filters: &[Expr], _limit: Option<usize>) -> DfResult<Arc<dyn ExecutionPlan>> {
        let batch = self.engine.last_values(&self.db, &self.table).await.map_err(|e| DataFusionError::External(Box::new(e)))?;
        let batches: Vec<_> = batch.into_iter().filter(|b| b.num_rows() > 0).map(|b| crate::buffer::adapt(&b, &self.schema)).collect();
        Ok(MemorySourceConfig::try_new_exec(&[batches], self.schema.clone(), projection.cloned())?)
    }
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
            SqlExpr::CompoundIdentifier(_) | SqlExpr::Subquery(_) | SqlExpr::Exists { .. } | SqlExpr::InSubquery { .. } => only_tags = false,
            _ => {}
        }
        std::ops::ControlFlow::<()>::Continue(())
    });
    only_tags
}

/// The table a "last point per series" query reads, when `query` is one (see the module docs).
fn lastpoint_table(query: &Query, catalog: &Catalog, db: &str) -> Option<String> {
    if query.with.is_some() {
        return None;
    }
    let SetExpr::Select(select) = query.body.as_ref() else { return None };
    let Some(Distinct::On(on)) = &select.distinct else { return None };
    let [from] = select.from.as_slice() else { return None };
    let TableFactor::Table { name, args: None, .. } = &from.relation else { return None };
    if !from.joins.is_empty() || select.having.is_some() || !matches!(&select.group_by, GroupByExpr::Expressions(g, _) if g.is_empty()) {
        return None;
    }
    let [table_name] = name.0.as_slice() else { return None };
    let table_name = table_name.as_ident()?;
    let table_name = if table_name.quote_style.is_some() { table_name.value.clone() } else { table_name.value.to_ascii_lowercase() };
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
    let leads_with_keys = order.iter().zip(&keys).all(|(o, k)| column_name(&o.expr).as_deref() == Some(k.as_str()));
    let then_latest = column_name(&order[keys.len()].expr).as_deref() == Some(TIME_COLUMN) && order[keys.len()].options.asc == Some(false);
    (leads_with_keys && then_latest).then_some(table_name)
}

/// `sql` reading `last_cache('t')` in place of `t`, when it is a "last point per series" query.
pub fn rewrite(sql: &str, catalog: &Catalog, db: &str) -> Option<String> {
    if !sql.to_ascii_lowercase().contains("distinct on") {
        return None;
    }
    let dialect = datafusion::sql::sqlparser::dialect::PostgreSqlDialect {};
    let mut statements = datafusion::sql::sqlparser::parser::Parser::parse_sql(&dialect, sql).ok()?;
    let query = match statements.as_mut_slice() {
        [Statement::Query(query)] => query,
        // EXPLAIN [ANALYZE] shows the plan the query itself gets.
        [Statement::Explain { statement, .. }] => match statement.as_mut() {
            Statement::Query(query) => query,
            _ => return None,
        },
        _ => return None,
    };
    let table = lastpoint_table(query, catalog, db)?;
    let SetExpr::Select(select) = query.body.as_mut() else { return None };
    // The table's own name (or alias) stays the alias, so `t.column` references keep working.
    let alias = match &select.from[0].relation {
        TableFactor::Table { alias: Some(alias), .. } => alias.to_string(),
        _ => datafusion::sql::sqlparser::ast::Ident::with_quote('"', table.clone()).to_string(),
    };
    let function = format!("SELECT * FROM last_cache('{}') AS {alias}", table.replace('\'', "''"));
    let parsed = datafusion::sql::sqlparser::parser::Parser::parse_sql(&dialect, &function).ok()?;
    let [Statement::Query(replacement)] = parsed.as_slice() else { return None };
    let SetExpr::Select(replacement) = replacement.body.as_ref() else { return None };
    select.from[0].relation = replacement.from[0].relation.clone();
    Some(statements[0].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
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
                    Column { name: "usage_user".into(), kind: ColumnKind::Field(FieldType::Integer) },
                ],
            ),
        );
        catalog
    }

    #[test]
    fn lastpoint_reads_the_cache_and_nothing_else_does() {
        let c = catalog();
        let rewritten = rewrite("SELECT DISTINCT ON (hostname) * FROM cpu ORDER BY hostname, time DESC", &c, "db").expect("lastpoint");
        assert_eq!(rewritten, "SELECT DISTINCT ON (hostname) * FROM last_cache('cpu') AS \"cpu\" ORDER BY hostname, time DESC");
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
