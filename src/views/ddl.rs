//! `CREATE MATERIALIZED VIEW` and `DROP MATERIALIZED VIEW`, for either protocol and HTTP.

use datafusion::sql::sqlparser::ast::{CreateView, ObjectName, Statement};

use super::definition::{self, Definition};
use crate::catalog::{ColumnKind, TIME_COLUMN};
use crate::query::ddl::{last_name, Error};
use crate::query::QueryEngine;

/// Whether `definition` fits what it reads now; `Ok` too when its base does not exist yet
/// (it is checked again, by planning, once it does).
async fn check_base(query: &QueryEngine, db: &str, d: &Definition) -> Result<(), Error> {
    let catalog = query.engine().catalog();
    let unsupported = |m: String| Err(Error::Unsupported(m));
    if let Some(table) = catalog.table(db, &d.base) {
        if d.bucket.source != TIME_COLUMN {
            return unsupported(format!(
                "the time bucket of a view over table \"{}\" buckets its time column, not \"{}\"",
                d.base, d.bucket.source
            ));
        }
        for g in &d.groups {
            match table.column(&g.source).map(|c| &c.kind) {
                Some(ColumnKind::Tag) | None => {}
                Some(ColumnKind::Field(_)) => {
                    return unsupported(format!(
                        "a view groups by tag columns; \"{}\" is a field of \"{}\"",
                        g.source, d.base
                    ))
                }
            }
        }
    } else if let Some(spec) = catalog.view(db, &d.base) {
        let base = definition::from_sql(&spec.sql).map_err(|e| Error::Unsupported(e.0))?;
        if d.bucket.source != base.bucket.output {
            return unsupported(format!(
                "a view over view \"{}\" buckets its bucket column \"{}\"",
                d.base, base.bucket.output
            ));
        }
        if d.bucket.stride_ns % base.bucket.stride_ns != 0 {
            return unsupported(format!(
                "a view over view \"{}\" needs a bucket width that is a multiple of its",
                d.base
            ));
        }
        for g in &d.groups {
            if !base.groups.iter().any(|b| b.output == g.source) {
                return unsupported(format!(
                    "a view over view \"{}\" groups by its group columns; \"{}\" is not one",
                    d.base, g.source
                ));
            }
        }
        if !query.views().has_rows_source(db, &base.base) {
            // The view it reads waits for its table: planned once the table appears.
            return Ok(());
        }
    } else {
        return Ok(());
    }
    // Everything else (columns, types, aggregates): DataFusion plans it as a query.
    let ctx = query.context(db).map_err(|e| Error::Query(Box::new(e)))?;
    let statement = Statement::Query(Box::new(d.query.clone()));
    query.plan(&ctx, db, statement).await.map_err(|e| Error::Query(Box::new(e)))?;
    Ok(())
}

pub async fn create(
    query: &QueryEngine,
    db: &str,
    create: CreateView,
) -> Result<&'static str, Error> {
    let statement = Statement::CreateView(create.clone());
    let sql = statement.to_string();
    // The definition is stored as text: it must read back as what was accepted.
    if crate::statement::parse(&sql).ok().and_then(|mut s| s.pop()).as_ref() != Some(&statement) {
        return Err(Error::Unsupported(
            "this definition does not read back the same once stored (a literal with quotes \
             or backslashes?); write it another way"
                .into(),
        ));
    }
    let (definition, if_not_exists) =
        definition::from_create(&create, sql.clone()).map_err(|e| Error::Unsupported(e.0))?;
    let views = query.views();
    let _ddl = views.ddl.lock().await;
    if views.depth(db, &definition.base) >= super::VIEW_DEPTH_MAX {
        return Err(Error::Unsupported(format!(
            "a view may read views at most {} deep",
            super::VIEW_DEPTH_MAX
        )));
    }
    let catalog = query.engine().catalog();
    if catalog.views(db).count() >= super::VIEWS_PER_DATABASE_MAX
        && catalog.view(db, &definition.name).is_none()
    {
        return Err(Error::Unsupported(format!(
            "a database has at most {} materialized views",
            super::VIEWS_PER_DATABASE_MAX
        )));
    }
    if definition.base == definition.name || views.reads(db, &definition.base, &definition.name) {
        return Err(Error::Unsupported(format!(
            "materialized view \"{}\" would read itself",
            definition.name
        )));
    }
    let engine = query.engine();
    if engine.catalog().view(db, &definition.name).is_some() {
        return if if_not_exists {
            Ok("CREATE MATERIALIZED VIEW")
        } else {
            Err(Error::Engine(crate::engine::Error::TableExists(definition.name)))
        };
    }
    check_base(query, db, &definition).await?;
    let created = engine.create_view(db, &definition.name, &sql).await?;
    views.sync();
    if !created && !if_not_exists {
        return Err(Error::Engine(crate::engine::Error::TableExists(definition.name)));
    }
    Ok("CREATE MATERIALIZED VIEW")
}

/// `DROP MATERIALIZED VIEW a, b`: each must exist (unless `IF EXISTS`) and be read by no
/// other view.
pub async fn drop(
    query: &QueryEngine,
    db: &str,
    names: &[ObjectName],
    if_exists: bool,
) -> Result<&'static str, Error> {
    let engine = query.engine();
    let _ddl = query.views().ddl.lock().await;
    // Named as at CREATE (unquoted names lowercased, as DataFusion resolves them).
    let names: Vec<String> = names
        .iter()
        .map(|n| match n.0.last().and_then(|p| p.as_ident()) {
            Some(i) if i.quote_style.is_none() => i.value.to_lowercase(),
            _ => last_name(n),
        })
        .collect();
    let catalog = engine.catalog();
    for name in &names {
        if catalog.view(db, name).is_none() {
            if if_exists {
                continue;
            }
            return Err(Error::NotFound { what: "materialized view", name: name.clone() });
        }
        for other in catalog.views(db) {
            if names.contains(&other.name) {
                continue;
            }
            if definition::from_sql(&other.sql).is_ok_and(|d| &d.base == name) {
                return Err(Error::Dependent { name: name.clone(), view: other.name.clone() });
            }
        }
    }
    for name in &names {
        engine.drop_view(db, name).await?;
    }
    query.views().sync();
    Ok("DROP MATERIALIZED VIEW")
}
