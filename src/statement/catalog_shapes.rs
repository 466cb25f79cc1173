//! Client catalog queries rewritten into shapes DataFusion plans (the last rewrite of the
//! statement pipeline, for every front end).
//!
//! ORMs read column details with correlated scalar subqueries that select one value without
//! aggregating (SQLAlchemy: `(SELECT pg_get_expr(adbin, adrelid) FROM pg_attrdef WHERE adrelid
//! = attrelid AND adnum = attnum)`); DataFusion plans a correlated scalar subquery only when it
//! aggregates. Over `pg_catalog` such a subquery looks one row up by key, so wrapping its value
//! in `max()` gives the same answer.
//!
//! DataFusion cannot run a scalar subquery inside `CASE` at all. Those that SQLAlchemy sends
//! look up column defaults (`pg_attrdef`), identity sequences (`pg_sequence`) and collations by
//! `attcollation`: Sundial has no defaults or sequences, and every column's `attcollation` is 0,
//! which names no collation, so each of these lookups is NULL, and a `CASE` left with only NULL
//! results is NULL.
//!
//! pgjdbc's `getPrimaryKeys` expands `pg_index.indkey` with `information_schema._pg_expandarray`
//! and reads fields with `(row).x`. Sundial declares no indexes on its tables, so the expansion
//! is a row of NULLs (the key matches no column: no rows, which is the answer), and `(row).x`
//! becomes `get_field(row, 'x')`, which DataFusion plans. Only queries that name `pg_catalog`
//! are touched.

use std::ops::ControlFlow;

use std::collections::BTreeMap;

use datafusion::sql::sqlparser::ast::{
    visit_expressions, visit_expressions_mut, visit_relations, AccessExpr, BinaryOperator, Expr,
    GroupByExpr, ObjectName, Query, SelectItem, SetExpr, Statement, TableFactor, Value,
};
use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
use datafusion::sql::sqlparser::parser::Parser;

const AGGREGATES: &[&str] = &[
    "count",
    "max",
    "min",
    "sum",
    "avg",
    "array_agg",
    "string_agg",
    "bool_and",
    "bool_or",
    "json_agg",
];

fn is_aggregate(expr: &Expr) -> bool {
    matches!(expr, Expr::Function(f) if AGGREGATES.contains(&f.name.to_string().to_ascii_lowercase().trim_start_matches("pg_catalog.")))
}

/// Catalog tables that are always empty here.
const EMPTY_TABLES: &[&str] = &["pg_attrdef", "pg_sequence"];

/// Whether `query` is a lookup that finds nothing in Sundial's catalog (see the module docs).
fn finds_nothing(query: &Query) -> bool {
    let SetExpr::Select(select) = query.body.as_ref() else { return false };
    let mut tables = Vec::new();
    for from in &select.from {
        for factor in std::iter::once(&from.relation).chain(from.joins.iter().map(|j| &j.relation))
        {
            if let TableFactor::Table { name, .. } = factor {
                tables.push(
                    name.0.last().map(|p| p.to_string().to_ascii_lowercase()).unwrap_or_default(),
                );
            }
        }
    }
    let by_collation = select.selection.as_ref().is_some_and(names_column_attcollation);
    !tables.is_empty() && tables.iter().all(|t| EMPTY_TABLES.contains(&t.as_str()))
        || tables.iter().any(|t| t == "pg_collation") && by_collation
}

/// Whether `expr` reads a column named `attcollation`.
fn names_column_attcollation(expr: &Expr) -> bool {
    let found = visit_expressions(expr, |e| {
        let name = match e {
            Expr::Identifier(i) => Some(&i.value),
            Expr::CompoundIdentifier(parts) => parts.last().map(|i| &i.value),
            _ => None,
        };
        if name.is_some_and(|n| n.eq_ignore_ascii_case("attcollation")) {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    });
    found.is_break()
}

/// Whether `statement` names a relation or function in `pg_catalog` (or pgjdbc's
/// `information_schema._pg_expandarray`): only those are client catalog queries.
fn names_pg_catalog(statement: &Statement) -> bool {
    let is_catalog = |name: &ObjectName| {
        name.0
            .first()
            .and_then(|p| p.as_ident())
            .is_some_and(|i| i.value.eq_ignore_ascii_case("pg_catalog"))
            || name
                .0
                .last()
                .and_then(|p| p.as_ident())
                .is_some_and(|i| i.value.eq_ignore_ascii_case("_pg_expandarray"))
    };
    let relation = visit_relations(statement, |name| {
        if is_catalog(name) {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    });
    relation.is_break()
        || visit_expressions(statement, |e| match e {
            Expr::Function(f) if is_catalog(&f.name) => ControlFlow::Break(()),
            _ => ControlFlow::Continue(()),
        })
        .is_break()
}

fn is_null(expr: &Expr) -> bool {
    matches!(expr, Expr::Value(v) if matches!(v.value, Value::Null))
}

/// The parameters a statement uses (`$n`), each with the expression that first uses it (with
/// its cast, which gives the parameter its type).
fn placeholders(statement: &Statement) -> BTreeMap<String, String> {
    let mut found = BTreeMap::new();
    let _ = visit_expressions(statement, |expr| {
        let placeholder = match expr {
            Expr::Cast { expr: inner, .. } => match inner.as_ref() {
                Expr::Value(v) => match &v.value {
                    Value::Placeholder(p) => Some(p.clone()),
                    _ => None,
                },
                _ => None,
            },
            Expr::Value(v) => match &v.value {
                Value::Placeholder(p) => Some(p.clone()),
                _ => None,
            },
            _ => None,
        };
        if let Some(p) = placeholder {
            // Visiting is post-order: a cast is seen after the bare placeholder inside it.
            let text = expr.to_string();
            let entry = found.entry(p).or_insert_with(|| text.clone());
            if text.len() > entry.len() {
                *entry = text;
            }
        }
        ControlFlow::<()>::Continue(())
    });
    found
}

/// The client binds every parameter it sent Parse: a parameter only the removed expressions
/// used stays in the statement as a condition that is always true.
fn keep_placeholders(
    statement: &mut Statement,
    before: BTreeMap<String, String>,
    dialect: &PostgreSqlDialect,
) {
    let after = placeholders(statement);
    let Statement::Query(query) = statement else { return };
    let SetExpr::Select(select) = query.body.as_mut() else { return };
    for (name, text) in before {
        if after.contains_key(&name) {
            continue;
        }
        let Ok(kept) = Parser::new(dialect)
            .try_with_sql(&format!("({text} IS NULL OR TRUE)"))
            .and_then(|mut p| p.parse_expr())
        else {
            continue;
        };
        select.selection = Some(match select.selection.take() {
            Some(selection) => Expr::BinaryOp {
                left: Box::new(selection),
                op: BinaryOperator::And,
                right: Box::new(kept),
            },
            None => kept,
        });
    }
}

/// Rewrites a client catalog query in place; whether anything changed.
pub fn rewrite(statement: &mut Statement) -> bool {
    if !names_pg_catalog(statement) {
        return false;
    }
    let dialect = PostgreSqlDialect {};
    let mut changed = false;
    {
        let before = placeholders(statement);
        // Post-order: subqueries become NULL before the CASE around them is looked at.
        let _ = visit_expressions_mut(statement, |expr| {
            if let Expr::Subquery(query) = expr {
                if finds_nothing(query) {
                    *expr = Expr::value(Value::Null);
                    changed = true;
                    return ControlFlow::<()>::Continue(());
                }
            }
            if matches!(expr, Expr::Function(f) if f.name.to_string().to_ascii_lowercase().ends_with("_pg_expandarray"))
            {
                if let Ok(row) = Parser::new(&dialect)
                    .try_with_sql(
                        "named_struct('x', CAST(NULL AS SMALLINT), 'n', CAST(NULL AS INTEGER))",
                    )
                    .and_then(|mut p| p.parse_expr())
                {
                    *expr = row;
                    changed = true;
                }
                return ControlFlow::Continue(());
            }
            if let Expr::CompoundFieldAccess { root, access_chain } = expr {
                let fields: Option<Vec<String>> = access_chain
                    .iter()
                    .map(|a| match a {
                        AccessExpr::Dot(Expr::Identifier(field)) => Some(field.value.clone()),
                        _ => None,
                    })
                    .collect();
                if let Some(fields) = fields {
                    let root = match root.as_ref() {
                        Expr::Nested(inner) => inner.to_string(),
                        other => other.to_string(),
                    };
                    let text = fields.iter().fold(root, |inner, field| {
                        format!("get_field({inner}, '{}')", field.replace('\'', "''"))
                    });
                    if let Ok(access) =
                        Parser::new(&dialect).try_with_sql(&text).and_then(|mut p| p.parse_expr())
                    {
                        *expr = access;
                        changed = true;
                    }
                }
                return ControlFlow::Continue(());
            }
            if let Expr::Case { conditions, else_result, .. } = expr {
                if conditions.iter().all(|c| is_null(&c.result))
                    && else_result.as_deref().is_none_or(is_null)
                {
                    *expr = Expr::value(Value::Null);
                    changed = true;
                    return ControlFlow::Continue(());
                }
            }
            let Expr::Subquery(query) = expr else { return ControlFlow::<()>::Continue(()) };
            let SetExpr::Select(select) = query.body.as_mut() else {
                return ControlFlow::Continue(());
            };
            let ungrouped = matches!(&select.group_by, GroupByExpr::Expressions(groups, _) if groups.is_empty());
            if select.projection.len() != 1 || !ungrouped || select.selection.is_none() {
                return ControlFlow::Continue(());
            }
            let (SelectItem::UnnamedExpr(value) | SelectItem::ExprWithAlias { expr: value, .. }) =
                &mut select.projection[0]
            else {
                return ControlFlow::Continue(());
            };
            if is_aggregate(value) {
                return ControlFlow::Continue(());
            }
            let wrapped = Parser::new(&dialect)
                .try_with_sql(&format!("max({value})"))
                .and_then(|mut p| p.parse_expr());
            if let Ok(wrapped) = wrapped {
                *value = wrapped;
                changed = true;
            }
            ControlFlow::Continue(())
        });
        if changed {
            keep_placeholders(statement, before, &dialect);
        }
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rewritten SQL, or `None` when nothing needed rewriting.
    fn catalog_query(sql: &str) -> Option<String> {
        let mut statements = Parser::parse_sql(&PostgreSqlDialect {}, sql).ok()?;
        let changed = statements.iter_mut().fold(false, |changed, s| rewrite(s) | changed);
        changed.then(|| statements.iter().map(|s| s.to_string()).collect::<Vec<_>>().join("; "))
    }

    #[test]
    fn wraps_correlated_lookups_in_catalog_queries_only() {
        let sql = "SELECT a.attname, (SELECT t.typname FROM pg_catalog.pg_type t WHERE t.oid = a.atttypid) AS type FROM pg_catalog.pg_attribute a";
        let rewritten = catalog_query(sql).expect("rewritten");
        assert!(
            rewritten.contains("(SELECT max(t.typname) FROM pg_catalog.pg_type"),
            "{rewritten}"
        );
        assert!(
            catalog_query("SELECT (SELECT v FROM t WHERE t.k = u.k) FROM u").is_none(),
            "user tables are left alone"
        );
        let counted = "SELECT (SELECT count(*) FROM pg_catalog.pg_class c WHERE c.oid = a.attrelid) FROM pg_catalog.pg_attribute a";
        assert!(catalog_query(counted).is_none());
    }

    #[test]
    fn pgjdbc_primary_keys_plan() {
        let sql = "SELECT result.COLUMN_NAME FROM (SELECT a.attname AS COLUMN_NAME, (information_schema._pg_expandarray(i.indkey)).n AS KEY_SEQ, \
                   information_schema._pg_expandarray(i.indkey) AS KEYS, a.attnum AS A_ATTNUM FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_index i ON a.attrelid = i.indrelid) result \
                   WHERE result.A_ATTNUM = (result.KEYS).x";
        let rewritten = catalog_query(sql).expect("rewritten");
        assert!(
            !rewritten.contains("_pg_expandarray")
                && rewritten.contains("get_field(result.KEYS, 'x')"),
            "{rewritten}"
        );
    }

    #[test]
    fn lookups_that_find_nothing_become_null() {
        let sql = "SELECT CASE WHEN a.atthasdef THEN (SELECT pg_get_expr(d.adbin, d.adrelid) FROM pg_catalog.pg_attrdef d WHERE d.adrelid = a.attrelid) ELSE NULL END AS dflt, \
                   CASE WHEN (a.attcollation != 0 AND (SELECT t.typcollation FROM pg_catalog.pg_type t WHERE t.oid = a.atttypid) != a.attcollation) \
                   THEN (SELECT c.collname FROM pg_catalog.pg_collation c JOIN pg_catalog.pg_namespace n ON n.oid = c.collnamespace WHERE c.oid = a.attcollation) ELSE NULL END AS coll \
                   FROM pg_catalog.pg_attribute a";
        let rewritten = catalog_query(sql).expect("rewritten");
        assert_eq!(rewritten, "SELECT NULL AS dflt, NULL AS coll FROM pg_catalog.pg_attribute a");
        // Parameters used only inside what was removed are still there for the client to bind.
        let sql = "SELECT CASE WHEN a.attidentity <> $1::VARCHAR THEN (SELECT json_build_object($2::VARCHAR, s.seqstart) FROM pg_catalog.pg_sequence s WHERE s.seqrelid = a.attrelid) ELSE NULL END FROM pg_catalog.pg_attribute a WHERE a.attnum > $3::SMALLINT";
        let rewritten = catalog_query(sql).expect("rewritten");
        assert!(rewritten.ends_with("WHERE a.attnum > $3::SMALLINT AND ($1::VARCHAR IS NULL OR true) AND ($2::VARCHAR IS NULL OR true)"), "{rewritten}");
    }
}
