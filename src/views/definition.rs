//! What a materialized view may be, checked at `CREATE MATERIALIZED VIEW` (and again, the same
//! way, when a stored definition is loaded): one table or view, a row-local `WHERE`, a time
//! bucket (`date_bin` or `time_bucket` of a fixed width) and tag columns in the `SELECT` list
//! and the `GROUP BY`, aggregates for everything else. Whatever else the defining query needs
//! (column types, aggregate arguments) DataFusion checks when it plans it.

use std::time::Duration;

use arrow::compute::kernels::cast_utils::{
    parse_interval_month_day_nano, string_to_timestamp_nanos,
};
use datafusion::sql::sqlparser::ast::{
    visit_expressions, CreateTableOptions, CreateView, DataType as SqlDataType, Expr, FunctionArg,
    FunctionArgExpr, FunctionArguments, GroupByExpr, Query, Select, SelectItem, SetExpr, Statement,
    TableFactor, Value,
};

/// How often a view's dirty buckets are recomputed unless `refresh_interval` says otherwise.
pub const REFRESH_INTERVAL_DEFAULT: Duration = Duration::from_secs(1);

/// Why a definition is refused (SQLSTATE 0A000, except where noted by the caller).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

fn refuse<T>(what: impl std::fmt::Display) -> Result<T, Refused> {
    Err(Refused(format!(
        "{what}. A materialized view is SELECT <date_bin or time_bucket of time> AS name, <tag \
         columns>, <aggregates> FROM <one table or view> [WHERE <row-local condition>] GROUP \
         BY the bucket and the tag columns"
    )))
}

/// The time bucket of a view: `output` is its column in the view, `source` the time column it
/// buckets (`time` of a table, or the bucket column of the view it reads).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bucket {
    pub output: String,
    pub source: String,
    pub stride_ns: i64,
    pub origin_ns: i64,
}

impl Bucket {
    /// The start of the bucket holding `time_ns`, as `date_bin` computes it (floor towards the
    /// origin's grid); saturates at the ends of the range.
    pub fn of(&self, time_ns: i64) -> i64 {
        let diff = i128::from(time_ns) - i128::from(self.origin_ns);
        let start = i128::from(self.origin_ns)
            + diff.div_euclid(i128::from(self.stride_ns)) * i128::from(self.stride_ns);
        start.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64
    }

    /// The end (exclusive) of the bucket starting at `start`.
    pub fn end(&self, start: i64) -> i64 {
        start.saturating_add(self.stride_ns)
    }
}

/// A grouping column of a view: `output` in the view, `source` in what it reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub output: String,
    pub source: String,
}

/// A checked view definition.
#[derive(Debug, Clone)]
pub struct Definition {
    pub name: String,
    /// The table (or view) it reads, in the same database.
    pub base: String,
    /// The defining query.
    pub query: Query,
    pub bucket: Bucket,
    pub groups: Vec<Group>,
    pub refresh_interval: Duration,
    /// The statement as written, for `SHOW` and `system.views`.
    pub sql: String,
}

/// `CREATE MATERIALIZED VIEW` as parsed: the definition and `IF NOT EXISTS`.
pub fn from_create(create: &CreateView, sql: String) -> Result<(Definition, bool), Refused> {
    if !create.materialized {
        return refuse("CREATE VIEW is not supported; CREATE MATERIALIZED VIEW is");
    }
    if create.or_replace || create.or_alter || create.temporary || !create.columns.is_empty() {
        return refuse("OR REPLACE, TEMPORARY and column lists are not supported");
    }
    let name = last_ident(&create.name.0)
        .ok_or_else(|| Refused("a view is named by one name (or public.name)".into()))?;
    let mut refresh_interval = REFRESH_INTERVAL_DEFAULT;
    match &create.options {
        CreateTableOptions::None => {}
        CreateTableOptions::With(options) => {
            for option in options {
                let text = option.to_string();
                let (key, value) = text.split_once('=').unwrap_or((&text, ""));
                let value = value.trim().trim_matches('\'');
                match key.trim().to_ascii_lowercase().as_str() {
                    "refresh_interval" => {
                        refresh_interval = humantime::parse_duration(value)
                            .ok()
                            .filter(|d| {
                                *d >= Duration::from_millis(10) && *d <= Duration::from_secs(86_400)
                            })
                            .ok_or_else(|| {
                                Refused(format!(
                                    "refresh_interval '{value}' is not a duration from 10ms to 1d \
                                     (such as '1s' or '5m')"
                                ))
                            })?;
                    }
                    other => {
                        return Err(Refused(format!(
                            "unknown view option \"{other}\"; the one option is refresh_interval"
                        )))
                    }
                }
            }
        }
        _ => return refuse("only WITH (refresh_interval = '…') options are supported"),
    }
    let mut definition = check_query(&create.query)?;
    definition.name = name;
    definition.refresh_interval = refresh_interval;
    definition.sql = sql;
    Ok((definition, create.if_not_exists))
}

/// A stored definition, checked as at `CREATE`.
pub fn from_sql(sql: &str) -> Result<Definition, Refused> {
    let statements = crate::statement::parse(sql).map_err(|e| Refused(e.to_string()))?;
    match statements.as_slice() {
        [Statement::CreateView(create)] => from_create(create, sql.to_string()).map(|(d, _)| d),
        _ => Err(Refused("not one CREATE MATERIALIZED VIEW statement".into())),
    }
}

/// An identifier as DataFusion resolves it: unquoted ones are lowercased.
fn normalized(ident: &datafusion::sql::sqlparser::ast::Ident) -> String {
    if ident.quote_style.is_some() {
        ident.value.clone()
    } else {
        ident.value.to_lowercase()
    }
}

/// A table or view name of the current database (`cpu`, `"Cpu"`, `public.cpu`).
fn last_ident(parts: &[datafusion::sql::sqlparser::ast::ObjectNamePart]) -> Option<String> {
    let idents: Vec<_> = parts.iter().map(|p| p.as_ident()).collect::<Option<_>>()?;
    match idents.as_slice() {
        [name] => Some(normalized(name)),
        [schema, name] if normalized(schema) == "public" => Some(normalized(name)),
        _ => None,
    }
}

/// The name a plain column reference stands for (`host`, `"host"`, `cpu.host`).
fn column_name(expr: &Expr) -> Option<String> {
    match expr {
        Expr::Identifier(ident) => Some(normalized(ident)),
        Expr::CompoundIdentifier(parts) => parts.last().map(normalized),
        Expr::Nested(inner) => column_name(inner),
        _ => None,
    }
}

fn function_name(expr: &Expr) -> Option<String> {
    match expr {
        Expr::Function(f) => f.name.0.last().and_then(|p| p.as_ident()).map(|i| {
            if i.quote_style.is_some() {
                i.value.clone()
            } else {
                i.value.to_lowercase()
            }
        }),
        _ => None,
    }
}

/// Functions whose answer depends on when or how often they run: never in a view.
const NONDETERMINISTIC: &[&str] = &[
    "now",
    "random",
    "uuid",
    "current_timestamp",
    "current_date",
    "current_time",
    "localtime",
    "localtimestamp",
    "statement_timestamp",
    "clock_timestamp",
    "transaction_timestamp",
    "timeofday",
    "last_cache",
    "date_bin_gapfill",
    "locf",
    "interpolate",
];

fn check_query(query: &Query) -> Result<Definition, Refused> {
    if query.with.is_some() {
        return refuse("WITH (common table expressions) is not allowed in a view");
    }
    if query.order_by.is_some() || query.limit_clause.is_some() || query.fetch.is_some() {
        return refuse("ORDER BY, LIMIT and OFFSET are not allowed in a view");
    }
    let SetExpr::Select(select) = query.body.as_ref() else {
        return refuse("UNION, VALUES and nested queries are not allowed in a view");
    };
    let select: &Select = select;
    if select.distinct.is_some() {
        return refuse("SELECT DISTINCT is not allowed in a view");
    }
    if select.having.is_some() {
        return refuse("HAVING is not allowed in a view (filter when you query it)");
    }
    if select.qualify.is_some() || !select.named_window.is_empty() {
        return refuse("window functions are not allowed in a view");
    }
    if select.from.len() != 1 || !select.from[0].joins.is_empty() {
        return refuse("joins are not allowed in a view: it reads one table or view");
    }
    let base = match &select.from[0].relation {
        TableFactor::Table { name, args: None, .. } => match last_ident(&name.0) {
            Some(name) => name,
            None => {
                return refuse(format!(
                    "a view reads a table or view of its own database, not {name}"
                ))
            }
        },
        _ => return refuse("a view reads one table or view by name (no subquery or function)"),
    };
    // Nothing but deterministic, row-local expressions anywhere.
    let mut problem = None;
    let _ = visit_expressions(query, |expr| {
        let found = match expr {
            Expr::Subquery(_) | Expr::InSubquery { .. } | Expr::Exists { .. } => {
                Some("subqueries are not allowed in a view".to_string())
            }
            Expr::Function(f) if f.over.is_some() => {
                Some("window functions are not allowed in a view".to_string())
            }
            Expr::Function(_) => {
                function_name(expr).filter(|n| NONDETERMINISTIC.contains(&n.as_str())).map(|n| {
                    format!(
                        "{n}() is not allowed in a view: its answer would depend on when it runs"
                    )
                })
            }
            _ => None,
        };
        match found {
            Some(message) => {
                problem = Some(message);
                std::ops::ControlFlow::Break(())
            }
            None => std::ops::ControlFlow::Continue(()),
        }
    });
    if let Some(message) = problem {
        return refuse(message);
    }

    // The SELECT list: one bucket, plain columns (the groups), and aggregates.
    let mut bucket: Option<(usize, Bucket)> = None;
    let mut plain: Vec<(usize, Group)> = Vec::new();
    for (i, item) in select.projection.iter().enumerate() {
        let (expr, alias) = match item {
            SelectItem::UnnamedExpr(e) => (e, None),
            SelectItem::ExprWithAlias { expr, alias } => (expr, Some(normalized(alias))),
            _ => return refuse("* is not allowed in a view; name its columns"),
        };
        if matches!(function_name(expr).as_deref(), Some("date_bin" | "time_bucket")) {
            if bucket.is_some() {
                return refuse("a view has one time bucket");
            }
            let Some(output) = alias else {
                return refuse("the time bucket needs a name: date_bin(…) AS bucket");
            };
            bucket = Some((i, parse_bucket(expr, output)?));
        } else if let Some(source) = column_name(expr) {
            plain.push((i, Group { output: alias.unwrap_or_else(|| source.clone()), source }));
        }
    }
    let Some((bucket_index, bucket)) = bucket else {
        return refuse("a view needs a time bucket: date_bin(INTERVAL '…', time) AS name");
    };

    // GROUP BY: the bucket and exactly the plain columns, by name, alias, expression or ordinal.
    let GroupByExpr::Expressions(grouped, modifiers) = &select.group_by else {
        return refuse("GROUP BY ALL is not allowed in a view; name the columns");
    };
    if !modifiers.is_empty() {
        return refuse("ROLLUP, CUBE and GROUPING SETS are not allowed in a view");
    }
    let mut grouped_items = Vec::new();
    for expr in grouped {
        let index = match expr {
            Expr::Value(v) => match &v.value {
                Value::Number(n, _) => n
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=select.projection.len()).contains(n))
                    .map(|n| n - 1),
                _ => None,
            },
            _ => select.projection.iter().position(|item| match item {
                SelectItem::UnnamedExpr(e) => e == expr,
                SelectItem::ExprWithAlias { expr: e, alias } => {
                    e == expr || column_name(expr).is_some_and(|n| n == normalized(alias))
                }
                _ => false,
            }),
        };
        match index {
            Some(i) if i == bucket_index || plain.iter().any(|(p, _)| *p == i) => {
                grouped_items.push(i)
            }
            _ => {
                return refuse(format!(
                "GROUP BY {expr}: a view groups by its bucket and tag columns of its SELECT list"
            ))
            }
        }
    }
    if !grouped_items.contains(&bucket_index) {
        return refuse("a view must GROUP BY its time bucket");
    }
    let groups: Vec<Group> =
        plain.into_iter().filter(|(i, _)| grouped_items.contains(i)).map(|(_, g)| g).collect();
    if grouped_items.iter().filter(|&&i| i != bucket_index).count() != groups.len() {
        return refuse("a view's GROUP BY names each column once");
    }
    let mut names: Vec<&str> = groups.iter().map(|g| g.output.as_str()).collect();
    names.push(&bucket.output);
    names.sort_unstable();
    if names.windows(2).any(|w| w[0] == w[1]) {
        return refuse("a view's columns need distinct names");
    }
    Ok(Definition {
        name: String::new(),
        base,
        query: query.clone(),
        bucket,
        groups,
        refresh_interval: REFRESH_INTERVAL_DEFAULT,
        sql: String::new(),
    })
}

/// `date_bin(stride, time [, origin])` or `time_bucket(stride, time [, origin])`, with
/// literal arguments.
fn parse_bucket(expr: &Expr, output: String) -> Result<Bucket, Refused> {
    let Expr::Function(f) = expr else {
        return refuse("the time bucket must be date_bin(…) or time_bucket(…)");
    };
    let name = function_name(expr).unwrap_or_default();
    let FunctionArguments::List(list) = &f.args else {
        return refuse(format!("{name} needs (interval, time [, origin])"));
    };
    let args: Vec<&Expr> = list
        .args
        .iter()
        .filter_map(|a| match a {
            FunctionArg::Unnamed(FunctionArgExpr::Expr(e)) => Some(e),
            _ => None,
        })
        .collect();
    if args.len() != list.args.len() || !(2..=3).contains(&args.len()) {
        return refuse(format!("{name} needs (interval, time [, origin])"));
    }
    let stride_ns = interval_ns(args[0])?;
    let Some(source) = column_name(args[1]) else {
        return refuse(format!("{name}'s second argument must be the time column"));
    };
    let origin_ns = match args.get(2) {
        Some(origin) => timestamp_ns(origin)?,
        None if name == "time_bucket" => crate::query::functions::TIME_BUCKET_ORIGIN_NS,
        None => 0,
    };
    Ok(Bucket { output, source, stride_ns, origin_ns })
}

fn string_literal(expr: &Expr) -> Option<&str> {
    match expr {
        Expr::Value(v) => match &v.value {
            Value::SingleQuotedString(s) => Some(s),
            _ => None,
        },
        Expr::Nested(inner) => string_literal(inner),
        _ => None,
    }
}

fn interval_ns(expr: &Expr) -> Result<i64, Refused> {
    let text = match expr {
        Expr::Interval(interval) => {
            let Some(value) = string_literal(&interval.value) else {
                return refuse("the bucket width must be a literal interval");
            };
            match &interval.leading_field {
                Some(unit) => format!("{value} {unit}"),
                None => value.to_string(),
            }
        }
        other => match string_literal(other) {
            Some(value) => value.to_string(),
            None => return refuse("the bucket width must be a literal interval"),
        },
    };
    let interval = parse_interval_month_day_nano(&text)
        .map_err(|e| Refused(format!("bucket width '{text}': {e}")))?;
    if interval.months != 0 {
        return refuse(format!(
            "bucket width '{text}': widths in months or years are not supported (their length \
             varies); use days"
        ));
    }
    let ns = i128::from(interval.days) * 86_400_000_000_000 + i128::from(interval.nanoseconds);
    match i64::try_from(ns) {
        Ok(ns) if ns > 0 => Ok(ns),
        _ => refuse(format!("bucket width '{text}' must be positive")),
    }
}

fn timestamp_ns(expr: &Expr) -> Result<i64, Refused> {
    let text = match expr {
        Expr::TypedString(typed)
            if matches!(typed.data_type, SqlDataType::Timestamp(..) | SqlDataType::Date) =>
        {
            match &typed.value.value {
                Value::SingleQuotedString(s) => s.clone(),
                _ => return refuse("the bucket origin must be a literal timestamp"),
            }
        }
        other => match string_literal(other) {
            Some(s) => s.to_string(),
            None => return refuse("the bucket origin must be a literal timestamp"),
        },
    };
    string_to_timestamp_nanos(&text).map_err(|e| Refused(format!("bucket origin '{text}': {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(sql: &str) -> Result<Definition, Refused> {
        from_sql(sql)
    }

    #[test]
    fn accepts_buckets_tags_and_aggregates() {
        let d = parse(
            "CREATE MATERIALIZED VIEW v WITH (refresh_interval = '250ms') AS SELECT \
             date_bin(INTERVAL '1 minute', time) AS minute, host, region AS r, avg(u), \
             count(*), last(u, time) FROM cpu WHERE u > 0 GROUP BY 1, host, r",
        )
        .expect("accepted");
        assert_eq!((d.name.as_str(), d.base.as_str()), ("v", "cpu"));
        assert_eq!(d.bucket.stride_ns, 60_000_000_000);
        assert_eq!(d.bucket.origin_ns, 0);
        assert_eq!(d.bucket.source, "time");
        assert_eq!(d.groups.len(), 2);
        assert_eq!(d.groups[1], Group { output: "r".into(), source: "region".into() });
        assert_eq!(d.refresh_interval, Duration::from_millis(250));

        let d = parse(
            "CREATE MATERIALIZED VIEW h AS SELECT time_bucket('1 hour', minute) AS hour, \
             max(\"avg(u)\") FROM v GROUP BY hour",
        )
        .expect("accepted");
        assert_eq!(d.bucket.origin_ns, crate::query::functions::TIME_BUCKET_ORIGIN_NS);
        assert_eq!(d.bucket.source, "minute");
        assert!(d.groups.is_empty());

        let d = parse(
            "CREATE MATERIALIZED VIEW o AS SELECT date_bin(INTERVAL '5 minutes', time, \
             TIMESTAMP '2000-01-01 00:02:00') AS b, sum(u) FROM cpu GROUP BY b",
        )
        .expect("accepted");
        assert_eq!(d.bucket.origin_ns, 946_684_920_000_000_000);
    }

    #[test]
    fn names_resolve_as_datafusion_resolves_them() {
        let d = parse(
            "CREATE MATERIALIZED VIEW V AS SELECT date_bin(INTERVAL '1 minute', Time) AS B, \
             Host, \"Region\" FROM public.Cpu GROUP BY B, Host, \"Region\"",
        )
        .expect("accepted");
        assert_eq!((d.name.as_str(), d.base.as_str()), ("v", "cpu"));
        assert_eq!((d.bucket.output.as_str(), d.bucket.source.as_str()), ("b", "time"));
        assert_eq!(d.groups[0], Group { output: "host".into(), source: "host".into() });
        assert_eq!(d.groups[1], Group { output: "Region".into(), source: "Region".into() });
        let error = parse("CREATE MATERIALIZED VIEW v AS SELECT date_bin(INTERVAL '1 minute', time) AS b, count(*) FROM system.views GROUP BY b").expect_err("other schema");
        assert!(error.to_string().contains("its own database"), "{error}");
    }

    #[test]
    fn refuses_what_a_view_cannot_be() {
        for (sql, says) in [
            ("SELECT host, avg(u) FROM cpu GROUP BY host", "needs a time bucket"),
            ("SELECT date_bin(INTERVAL '1 minute', time) AS b, avg(u) FROM cpu", "GROUP BY its time bucket"),
            ("SELECT date_bin(INTERVAL '1 minute', time) AS b, avg(u) FROM cpu JOIN mem ON true GROUP BY b", "joins"),
            ("SELECT date_bin(INTERVAL '1 minute', time) AS b, avg(u) FROM cpu GROUP BY b ORDER BY b", "ORDER BY"),
            ("SELECT date_bin(INTERVAL '1 minute', time) AS b, avg(u) FROM cpu GROUP BY b LIMIT 1", "LIMIT"),
            ("SELECT date_bin(INTERVAL '1 minute', time) AS b, avg(u) FROM cpu GROUP BY b HAVING avg(u) > 1", "HAVING"),
            ("SELECT date_bin(INTERVAL '1 minute', time) AS b, avg(u) FROM cpu WHERE time > now() GROUP BY b", "now()"),
            ("SELECT date_bin(INTERVAL '1 minute', time) AS b, avg(u) + random() FROM cpu GROUP BY b", "random()"),
            ("SELECT date_bin(INTERVAL '1 minute', time) AS b, avg(u) FROM (SELECT * FROM cpu) GROUP BY b", "one table or view by name"),
            ("SELECT date_bin(INTERVAL '1 minute', time) AS b, avg(u) FROM cpu WHERE u IN (SELECT 1) GROUP BY b", "subqueries"),
            ("SELECT date_bin(INTERVAL '1 minute', time) AS b, sum(u) OVER () FROM cpu GROUP BY b", "window"),
            ("SELECT date_bin(INTERVAL '1 month', time) AS b, avg(u) FROM cpu GROUP BY b", "months"),
            ("SELECT date_bin(INTERVAL '1 minute', time), avg(u) FROM cpu GROUP BY 1", "needs a name"),
            ("SELECT date_bin(INTERVAL '1 minute', time) AS b, host, avg(u) FROM cpu GROUP BY b, region", "GROUP BY region"),
            ("SELECT * FROM cpu", "*"),
        ] {
            let error = parse(&format!("CREATE MATERIALIZED VIEW v AS {sql}"))
                .expect_err(sql)
                .to_string();
            assert!(error.contains(says), "{sql}: {error}");
        }
        let error = parse("CREATE MATERIALIZED VIEW v WITH (refresh = '1s') AS SELECT date_bin(INTERVAL '1 minute', time) AS b, count(*) FROM cpu GROUP BY b").expect_err("option");
        assert!(error.to_string().contains("unknown view option"), "{error}");
    }

    #[test]
    fn buckets_match_date_bin() {
        let b = Bucket { output: "b".into(), source: "time".into(), stride_ns: 60, origin_ns: 7 };
        assert_eq!(b.of(7), 7);
        assert_eq!(b.of(66), 7);
        assert_eq!(b.of(67), 67);
        assert_eq!(b.of(6), -53);
        assert_eq!(b.of(-53), -53);
        assert_eq!(b.of(i64::MIN), b.of(i64::MIN));
        assert_eq!(b.end(i64::MAX - 1), i64::MAX);
    }
}
