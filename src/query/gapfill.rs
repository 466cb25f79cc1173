//! Gap filling as InfluxDB 3 has it: `date_bin_gapfill(stride, time [, origin])` in a grouped
//! query makes one row per time bucket of the query's time range for every group, whether or
//! not any row fell in it; `locf(agg)` fills a missing value with the group's last one before
//! it, `interpolate(agg)` linearly between its neighbours; other aggregates stay NULL.
//!
//! It is a rewrite into plain SQL that DataFusion plans as usual: the aggregate with `date_bin`,
//! a grid of every bucket (`generate_series` over the range taken from `WHERE`) crossed with
//! every group, a left join, and window functions (`last_value … IGNORE NULLS`) for the fills.
//! The query's own `ORDER BY` and `LIMIT` apply to the filled rows.

use std::ops::ControlFlow;

use datafusion::sql::sqlparser::ast::{
    visit_expressions, BinaryOperator, Expr, FunctionArg, FunctionArgExpr, FunctionArguments,
    GroupByExpr, Query, SelectItem, SetExpr, Statement,
};
use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
use datafusion::sql::sqlparser::parser::Parser;

const TIME_TYPE: &str = "'Timestamp(ns, \"UTC\")'";

/// The most buckets one gap-filled query may make (per group): beyond it the grid alone would
/// take gigabytes (`INTERVAL '1 millisecond'` over a day is 86.4 million).
pub const BUCKETS_MAX: i128 = 1_000_000;

/// The function the rewritten grid calls on its lower bound before `generate_series` runs:
/// `gapfill_grid_start(lower, upper, stride)` is `lower`, or an error when the grid would have
/// more than `BUCKETS_MAX` buckets.
pub fn grid_check() -> datafusion::logical_expr::ScalarUDF {
    use arrow::datatypes::{DataType, IntervalUnit, TimeUnit};
    use datafusion::common::{exec_err, ScalarValue};
    use datafusion::logical_expr::{create_udf, ColumnarValue, Volatility};
    let time = DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into()));
    let check = move |args: &[ColumnarValue]| {
        let scalar = |i: usize| match &args[i] {
            ColumnarValue::Scalar(value) => Ok(value.clone()),
            ColumnarValue::Array(_) => {
                exec_err!("date_bin_gapfill needs a constant time range and interval")
            }
        };
        let (lower, upper, stride) = (scalar(0)?, scalar(1)?, scalar(2)?);
        let (
            ScalarValue::TimestampNanosecond(Some(lo), _),
            ScalarValue::TimestampNanosecond(Some(hi), _),
            ScalarValue::IntervalMonthDayNano(Some(stride)),
        ) = (&lower, &upper, &stride)
        else {
            return Ok(ColumnarValue::Scalar(lower));
        };
        if stride.months != 0 {
            return exec_err!("date_bin_gapfill does not take intervals of months or years");
        }
        let stride_ns =
            i128::from(stride.days) * 86_400_000_000_000 + i128::from(stride.nanoseconds);
        if stride_ns <= 0 {
            return exec_err!("date_bin_gapfill needs a positive interval");
        }
        let buckets = (i128::from(*hi) - i128::from(*lo)) / stride_ns + 1;
        if buckets > BUCKETS_MAX {
            return exec_err!(
                "date_bin_gapfill would make {buckets} buckets, more than {BUCKETS_MAX}: use a \
                 larger interval or a shorter time range"
            );
        }
        Ok(ColumnarValue::Scalar(lower))
    };
    create_udf(
        "gapfill_grid_start",
        vec![time.clone(), time.clone(), DataType::Interval(IntervalUnit::MonthDayNano)],
        time,
        Volatility::Immutable,
        std::sync::Arc::new(check),
    )
}

/// Whether `statement` calls `date_bin_gapfill` anywhere.
fn uses_gapfill(statement: &Statement) -> bool {
    visit_expressions(statement, |e| match function_name(e) {
        Some(name) if name == "date_bin_gapfill" => ControlFlow::Break(()),
        _ => ControlFlow::Continue(()),
    })
    .is_break()
}

/// Rewrites a query that uses `date_bin_gapfill` in place (untouched otherwise); the error says
/// why it cannot be gap filled.
pub fn rewrite(statement: &mut Statement) -> Result<(), String> {
    if !uses_gapfill(statement) {
        return Ok(());
    }
    let Statement::Query(query) = statement else {
        return Err("date_bin_gapfill works in a single SELECT statement".into());
    };
    let sql = rewrite_query(query)?;
    // The rewrite is built as text; it is Sundial's own SQL, so it parses.
    let parsed = Parser::parse_sql(&PostgreSqlDialect {}, &sql)
        .map_err(|e| format!("gap filling produced a query that does not parse: {e}"))?;
    let Ok([Statement::Query(rewritten)]) = <[Statement; 1]>::try_from(parsed) else {
        return Err("gap filling produced something other than one query".to_string());
    };
    *query = rewritten;
    Ok(())
}

enum Fill {
    Null,
    Locf,
    Interpolate,
}

/// What one item of the select list is.
enum Item {
    Bucket { name: String },
    Key { name: String, index: usize },
    Value { name: String, index: usize, fill: Fill },
}

fn function_name(expr: &Expr) -> Option<String> {
    match expr {
        Expr::Function(f) => Some(f.name.to_string().to_ascii_lowercase()),
        _ => None,
    }
}

fn function_args(expr: &Expr) -> Vec<Expr> {
    let Expr::Function(f) = expr else { return Vec::new() };
    let FunctionArguments::List(list) = &f.args else { return Vec::new() };
    list.args
        .iter()
        .filter_map(|a| match a {
            FunctionArg::Unnamed(FunctionArgExpr::Expr(e)) => Some(e.clone()),
            _ => None,
        })
        .collect()
}

fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The name DataFusion would give an item: its alias (lower-cased unless quoted), a column's
/// own name, or the expression's text.
fn output_name(expr: &Expr, alias: Option<&datafusion::sql::sqlparser::ast::Ident>) -> String {
    match (alias, expr) {
        (Some(alias), _) if alias.quote_style.is_some() => alias.value.clone(),
        (Some(alias), _) => alias.value.to_ascii_lowercase(),
        (None, Expr::Identifier(ident)) => ident.value.to_ascii_lowercase(),
        (None, Expr::CompoundIdentifier(parts)) => {
            parts.last().map(|p| p.value.to_ascii_lowercase()).unwrap_or_default()
        }
        (None, other) => other.to_string(),
    }
}

fn same_column(a: &Expr, b: &Expr) -> bool {
    let last = |e: &Expr| match e {
        Expr::Identifier(i) => Some(i.value.to_ascii_lowercase()),
        Expr::CompoundIdentifier(parts) => parts.last().map(|p| p.value.to_ascii_lowercase()),
        _ => None,
    };
    match (last(a), last(b)) {
        (Some(x), Some(y)) => x == y,
        _ => a.to_string() == b.to_string(),
    }
}

/// The time range `[lower, upper]` of the query, from `time >= / > / < / <= / BETWEEN` terms
/// of the top-level conjunction of `WHERE`. The upper bound is made inclusive.
fn time_range(selection: Option<&Expr>, time: &Expr) -> Result<(String, String), String> {
    let mut terms = Vec::new();
    fn conjuncts<'a>(e: &'a Expr, out: &mut Vec<&'a Expr>) {
        match e {
            Expr::BinaryOp { left, op: BinaryOperator::And, right } => {
                conjuncts(left, out);
                conjuncts(right, out);
            }
            Expr::Nested(inner) => conjuncts(inner, out),
            other => out.push(other),
        }
    }
    if let Some(selection) = selection {
        conjuncts(selection, &mut terms);
    }
    let cast = |e: &Expr| format!("arrow_cast({e}, {TIME_TYPE})");
    let (mut lower, mut upper) = (None, None);
    for term in terms {
        match term {
            Expr::Between { expr, negated: false, low, high } if same_column(expr, time) => {
                lower = Some(cast(low));
                upper = Some(cast(high));
            }
            Expr::BinaryOp { left, op, right } => {
                let (op, bound) = if same_column(left, time) {
                    (op.clone(), right)
                } else if same_column(right, time) {
                    let flipped = match op {
                        BinaryOperator::Lt => BinaryOperator::Gt,
                        BinaryOperator::LtEq => BinaryOperator::GtEq,
                        BinaryOperator::Gt => BinaryOperator::Lt,
                        BinaryOperator::GtEq => BinaryOperator::LtEq,
                        other => other.clone(),
                    };
                    (flipped, left)
                } else {
                    continue;
                };
                match op {
                    BinaryOperator::Gt | BinaryOperator::GtEq => lower = Some(cast(bound)),
                    BinaryOperator::LtEq => upper = Some(cast(bound)),
                    BinaryOperator::Lt => {
                        upper = Some(format!("{} - INTERVAL '1 nanosecond'", cast(bound)))
                    }
                    _ => {}
                }
            }
            _ => {}
        }
    }
    match (lower, upper) {
        (Some(lower), Some(upper)) => Ok((lower, upper)),
        _ => {
            Err(format!("date_bin_gapfill needs a time range in WHERE: {time} >= … AND {time} < …"))
        }
    }
}

fn rewrite_query(query: &Query) -> Result<String, String> {
    let SetExpr::Select(select) = query.body.as_ref() else {
        return Err("date_bin_gapfill works in a plain SELECT … GROUP BY".into());
    };
    if query.with.is_some() {
        return Err("date_bin_gapfill does not support WITH yet; use a subquery in FROM".into());
    }
    let GroupByExpr::Expressions(group_by, modifiers) = &select.group_by else {
        return Err("date_bin_gapfill needs GROUP BY with expressions".into());
    };
    if group_by.is_empty() || !modifiers.is_empty() {
        return Err("date_bin_gapfill needs GROUP BY with expressions".into());
    }

    // Classify the select list.
    let mut bucket: Option<Vec<Expr>> = None;
    let mut items = Vec::new();
    let mut keys: Vec<Expr> = Vec::new();
    let mut values: Vec<Expr> = Vec::new();
    for (position, item) in select.projection.iter().enumerate() {
        let (expr, alias) = match item {
            SelectItem::UnnamedExpr(e) => (e, None),
            SelectItem::ExprWithAlias { expr, alias } => (expr, Some(alias)),
            _ => return Err("date_bin_gapfill needs every selected column named (no *)".into()),
        };
        let name = output_name(expr, alias);
        let grouped = group_by.iter().any(|g| {
            g.to_string() == expr.to_string()
                || alias.is_some_and(|a| same_column(g, &Expr::Identifier(a.clone())))
                || matches!(g, Expr::Value(v) if v.to_string() == (position + 1).to_string())
        });
        match function_name(expr).as_deref() {
            Some("date_bin_gapfill") => {
                let args = function_args(expr);
                if !(2..=3).contains(&args.len()) {
                    return Err("date_bin_gapfill takes (stride, time [, origin])".into());
                }
                if bucket.replace(args).is_some() {
                    return Err("date_bin_gapfill may appear once".into());
                }
                items.push(Item::Bucket { name });
            }
            Some(fill @ ("locf" | "interpolate")) => {
                let [inner] = function_args(expr)
                    .try_into()
                    .map_err(|_| format!("{fill} takes one aggregate"))?;
                values.push(inner);
                let fill = if fill == "locf" { Fill::Locf } else { Fill::Interpolate };
                items.push(Item::Value { name, index: values.len() - 1, fill });
            }
            _ if grouped => {
                keys.push(expr.clone());
                items.push(Item::Key { name, index: keys.len() - 1 });
            }
            _ => {
                values.push(expr.clone());
                items.push(Item::Value { name, index: values.len() - 1, fill: Fill::Null });
            }
        }
    }
    let Some(bucket_args) = bucket else {
        return Err("date_bin_gapfill must be in the select list".into());
    };
    let date_bin = |time: &str| match &bucket_args[..] {
        [stride, _, origin] => {
            format!("date_bin({stride}, {time}, arrow_cast({origin}, {TIME_TYPE}))")
        }
        [stride, _] => format!("date_bin({stride}, {time})"),
        _ => unreachable!("checked above"),
    };
    let stride = &bucket_args[0];
    let (lower, upper) = time_range(select.selection.as_ref(), &bucket_args[1])?;

    // The aggregate, with date_bin in place of date_bin_gapfill.
    let time_expr = bucket_args[1].to_string();
    let mut inner = vec![format!("{} AS __b", date_bin(&time_expr))];
    inner.extend(keys.iter().enumerate().map(|(i, k)| format!("{k} AS __g{i}")));
    inner.extend(values.iter().enumerate().map(|(i, v)| format!("{v} AS __a{i}")));
    let from: Vec<String> = select.from.iter().map(|f| f.to_string()).collect();
    let mut aggregate = format!("SELECT {} FROM {}", inner.join(", "), from.join(", "));
    if let Some(selection) = &select.selection {
        aggregate.push_str(&format!(" WHERE {selection}"));
    }
    let mut groups = vec![date_bin(&time_expr)];
    groups.extend(keys.iter().map(|k| k.to_string()));
    aggregate.push_str(&format!(" GROUP BY {}", groups.join(", ")));
    if let Some(having) = &select.having {
        aggregate.push_str(&format!(" HAVING {having}"));
    }

    let key_cols: Vec<String> = (0..keys.len()).map(|i| format!("__g{i}")).collect();
    let grid = format!(
        "SELECT unnest(generate_series(gapfill_grid_start({lo}, {hi}, {stride}), {hi}, {stride})) AS __b",
        lo = date_bin(&lower),
        hi = date_bin(&upper)
    );
    let mut filled = String::from("SELECT bk.__b");
    for k in &key_cols {
        filled.push_str(&format!(", gr.{k}"));
    }
    for i in 0..values.len() {
        filled.push_str(&format!(", ag.__a{i}"));
    }
    filled.push_str(" FROM __buckets bk");
    if !key_cols.is_empty() {
        filled.push_str(&format!(
            " CROSS JOIN (SELECT DISTINCT {} FROM __agg) gr",
            key_cols.join(", ")
        ));
    }
    filled.push_str(" LEFT JOIN __agg ag ON ag.__b = bk.__b");
    for k in &key_cols {
        filled.push_str(&format!(" AND ag.{k} IS NOT DISTINCT FROM gr.{k}"));
    }

    let partition = if key_cols.is_empty() {
        String::new()
    } else {
        format!("PARTITION BY {} ", key_cols.join(", "))
    };
    let before =
        format!("OVER ({partition}ORDER BY __b ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)");
    let after =
        format!("OVER ({partition}ORDER BY __b ROWS BETWEEN CURRENT ROW AND UNBOUNDED FOLLOWING)");
    let mut outer = Vec::new();
    for item in &items {
        outer.push(match item {
            Item::Bucket { name } => format!("__b AS {}", quote(name)),
            Item::Key { name, index } => format!("__g{index} AS {}", quote(name)),
            Item::Value { name, index, fill: Fill::Null } => format!("__a{index} AS {}", quote(name)),
            Item::Value { name, index, fill: Fill::Locf } => format!("last_value(__a{index}) IGNORE NULLS {before} AS {}", quote(name)),
            Item::Value { name, index, fill: Fill::Interpolate } => {
                let a = format!("__a{index}");
                let at = "arrow_cast(__b, 'Int64')";
                let prev_v = format!("last_value({a}) IGNORE NULLS {before}");
                let prev_t = format!("last_value(CASE WHEN {a} IS NOT NULL THEN {at} END) IGNORE NULLS {before}");
                let next_v = format!("first_value({a}) IGNORE NULLS {after}");
                let next_t = format!("first_value(CASE WHEN {a} IS NOT NULL THEN {at} END) IGNORE NULLS {after}");
                format!(
                    "CASE WHEN {a} IS NOT NULL THEN CAST({a} AS DOUBLE) \
                     ELSE CAST({prev_v} AS DOUBLE) + (CAST({next_v} AS DOUBLE) - CAST({prev_v} AS DOUBLE)) \
                     * CAST({at} - {prev_t} AS DOUBLE) / CAST({next_t} - {prev_t} AS DOUBLE) END AS {}",
                    quote(name)
                )
            }
        });
    }
    let mut sql = format!(
        "WITH __agg AS ({aggregate}), __buckets AS ({grid}) SELECT {} FROM ({filled}) AS __filled",
        outer.join(", ")
    );
    match &query.order_by {
        Some(order_by) => sql.push_str(&format!(" {order_by}")),
        None => {
            // As InfluxDB: by group, then time.
            let mut order: Vec<String> = items
                .iter()
                .filter_map(|i| match i {
                    Item::Key { name, .. } => Some(quote(name)),
                    _ => None,
                })
                .collect();
            order.extend(items.iter().filter_map(|i| match i {
                Item::Bucket { name } => Some(quote(name)),
                _ => None,
            }));
            sql.push_str(&format!(" ORDER BY {}", order.join(", ")));
        }
    }
    if let Some(limit) = &query.limit_clause {
        sql.push_str(&format!(" {limit}"));
    }
    Ok(sql)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `None` when `sql` does not use `date_bin_gapfill`; otherwise the rewritten SQL as built.
    fn rewrite(sql: &str) -> Option<Result<String, String>> {
        let statements = Parser::parse_sql(&PostgreSqlDialect {}, sql).expect("parses");
        if !uses_gapfill(&statements[0]) {
            return None;
        }
        let [Statement::Query(query)] = statements.as_slice() else {
            return Some(Err("date_bin_gapfill works in a single SELECT statement".into()));
        };
        Some(rewrite_query(query))
    }

    #[test]
    fn leaves_other_queries_alone_and_explains_what_it_needs() {
        assert!(rewrite("SELECT date_bin(INTERVAL '1 minute', time) FROM cpu").is_none());
        let missing_range = rewrite(
            "SELECT date_bin_gapfill(INTERVAL '1 minute', time) AS t, avg(u) FROM cpu GROUP BY 1",
        );
        assert!(missing_range
            .expect("gapfill")
            .expect_err("no range")
            .contains("needs a time range"));
        let star =
            rewrite("SELECT *, date_bin_gapfill(INTERVAL '1 minute', time) FROM cpu GROUP BY 1");
        assert!(star.expect("gapfill").is_err());
    }

    #[test]
    fn rewrites_into_a_grid_joined_with_the_aggregate() {
        let sql = rewrite(
            "SELECT date_bin_gapfill(INTERVAL '1 minute', time) AS minute, host, locf(avg(usage)) AS u \
             FROM cpu WHERE time >= '2024-01-01T00:00:00Z' AND time < '2024-01-01T00:10:00Z' GROUP BY 1, host",
        )
        .expect("gapfill")
        .expect("valid");
        assert!(sql.contains("generate_series"), "{sql}");
        assert!(sql.contains("GROUP BY date_bin(INTERVAL '1 minute', time), host"), "{sql}");
        assert!(sql.contains("last_value(__a0) IGNORE NULLS"), "{sql}");
        assert!(sql.ends_with("ORDER BY \"host\", \"minute\""), "{sql}");
    }
}
