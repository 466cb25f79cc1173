//! `CREATE DATABASE`, `CREATE TABLE`, `DROP TABLE` and `DROP DATABASE`, for either protocol
//! (and `CREATE`/`DROP MATERIALIZED VIEW`, which `views::ddl` runs). A table's tags are its primary
//! key columns (besides `time`), as in GreptimeDB: tags plus time identify a point. Other
//! columns are fields: text, double precision, bigint, bigint unsigned or boolean. `time`
//! (timestamptz) is implicit when not declared.

use datafusion::sql::sqlparser::ast::{
    ColumnOption, CreateTable, Expr as SqlExpr, ObjectName, ObjectType, Statement, TableConstraint,
};

use crate::catalog::{Column, ColumnKind, FieldType, TIME_COLUMN};
use crate::engine::Engine;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Invalid(String),
    #[error("{what} \"{name}\" does not exist")]
    NotFound { what: &'static str, name: String },
    #[error("database \"{0}\" already exists")]
    DatabaseExists(String),
    #[error("cannot drop the currently open database")]
    DropCurrentDatabase,
    #[error("{0}")]
    Unsupported(String),
    #[error("materialized view \"{view}\" reads \"{name}\": drop it first")]
    Dependent { name: String, view: String },
    #[error(transparent)]
    Query(#[from] Box<crate::query::Error>),
    #[error(transparent)]
    Engine(#[from] crate::engine::Error),
}

impl Error {
    pub fn kind(&self) -> crate::ErrorKind {
        match self {
            Error::Invalid(_) => crate::ErrorKind::InvalidInput,
            Error::NotFound { .. } => crate::ErrorKind::NotFound,
            Error::DatabaseExists(_) => crate::ErrorKind::AlreadyExists,
            Error::DropCurrentDatabase | Error::Dependent { .. } => crate::ErrorKind::ObjectInUse,
            Error::Unsupported(_) => crate::ErrorKind::Unsupported,
            Error::Query(e) => e.kind(),
            Error::Engine(e) => e.kind(),
        }
    }
}

/// The unquoted last part of a name (`public.cpu` → `cpu`, `"my db"` → `my db`).
pub(crate) fn last_name(name: &ObjectName) -> String {
    name.0.last().and_then(|p| p.as_ident()).map(|i| i.value.clone()).unwrap_or_default()
}

/// Runs a DDL statement of the pipeline (a `Command::Ddl`); returns the command tag.
pub async fn execute(
    query: &crate::query::QueryEngine,
    db: &str,
    statement: Statement,
) -> Result<&'static str, Error> {
    let engine = query.engine().as_ref();
    match statement {
        Statement::CreateView(create) => crate::views::ddl::create(query, db, create).await,
        Statement::Drop { object_type: ObjectType::MaterializedView, if_exists, names, .. } => {
            crate::views::ddl::drop(query, db, &names, if_exists).await
        }
        Statement::CreateDatabase { db_name, if_not_exists, .. } => {
            let name = last_name(&db_name);
            match engine.create_database(&name).await {
                Ok(false) if !if_not_exists => Err(Error::DatabaseExists(name)),
                Ok(_) => Ok("CREATE DATABASE"),
                Err(e) => Err(e.into()),
            }
        }
        Statement::CreateTable(create) => {
            create_table(engine, db, create).await.map(|()| "CREATE TABLE")
        }
        Statement::Drop { object_type: ObjectType::Table, if_exists, names, .. } => {
            drop_tables(engine, db, &names, if_exists).await
        }
        Statement::Drop { object_type: ObjectType::Database, if_exists, names, .. } => {
            let dropped = drop_databases(engine, db, &names, if_exists).await;
            query.views().sync();
            for name in names.iter().map(last_name) {
                if !engine.catalog().has_database(&name) {
                    if let Err(e) = query.alerts().forget_database(&name).await {
                        tracing::error!(error = %e, db = name, "dropping the alert rules of a dropped database");
                    }
                }
            }
            dropped
        }
        other => Err(Error::Invalid(format!("not a DDL statement: {other}"))),
    }
}

/// Runs a retention statement (`statement::retention`); returns the command tag.
pub async fn retention(
    query: &crate::query::QueryEngine,
    db: &str,
    statement: crate::statement::retention::Statement,
) -> Result<&'static str, Error> {
    use crate::statement::retention::{Statement as Retention, Target};
    let engine = query.engine().as_ref();
    let value = |text: &str| crate::catalog::Retention::parse(text).map_err(Error::Invalid);
    match statement {
        Retention::CreateDatabase { name, if_not_exists, retention } => {
            let retention =
                Some(value(&retention)?).filter(|r| *r != crate::catalog::Retention::Infinite);
            match engine.create_database_with(&name, retention).await {
                Ok(false) if !if_not_exists => Err(Error::DatabaseExists(name)),
                Ok(_) => Ok("CREATE DATABASE"),
                Err(e) => Err(e.into()),
            }
        }
        Retention::Alter { target, retention } => {
            let mut retention = retention.as_deref().map(value).transpose()?;
            if matches!(target, Target::Database(_))
                && retention == Some(crate::catalog::Retention::Infinite)
            {
                // A database's "forever" is no retention at all.
                retention = None;
            }
            let (database, table) = match &target {
                Target::Database(name) => (name.as_str(), None),
                Target::Table(name) => (db, Some(name.as_str())),
            };
            if table.is_some_and(|t| engine.catalog().view(db, t).is_some()) {
                return Err(Error::Unsupported(
                    "a materialized view follows the retention of the table it reads".into(),
                ));
            }
            engine.set_retention(database, table, retention).await?;
            Ok(match target {
                Target::Database(_) => "ALTER DATABASE",
                Target::Table(_) => "ALTER TABLE",
            })
        }
    }
}

/// `DROP TABLE a, b`: all named tables must exist (unless `IF EXISTS`) before any is dropped.
async fn drop_tables(
    engine: &Engine,
    db: &str,
    names: &[ObjectName],
    if_exists: bool,
) -> Result<&'static str, Error> {
    let tables: Vec<String> = names.iter().map(last_name).collect();
    if !if_exists {
        if let Some(missing) = tables.iter().find(|t| engine.catalog().table(db, t).is_none()) {
            return Err(Error::NotFound { what: "table", name: missing.clone() });
        }
    }
    for table in &tables {
        engine.drop_table(db, table).await?;
    }
    Ok("DROP TABLE")
}

/// `DROP DATABASE`; like PostgreSQL, not the one the session is connected to.
async fn drop_databases(
    engine: &Engine,
    current: &str,
    names: &[ObjectName],
    if_exists: bool,
) -> Result<&'static str, Error> {
    for name in names.iter().map(last_name) {
        if name == current {
            return Err(Error::DropCurrentDatabase);
        }
        if !engine.drop_database(&name).await? && !if_exists {
            return Err(Error::NotFound { what: "database", name });
        }
    }
    Ok("DROP DATABASE")
}

fn field_type(sql_type: &str) -> Option<FieldType> {
    let t = sql_type.to_ascii_lowercase();
    Some(match t.as_str() {
        "text" | "string" | "varchar" | "char" | "character varying" => FieldType::String,
        "double" | "double precision" | "float" | "float8" | "real" | "float4" => FieldType::Float,
        "bigint" | "int8" | "integer" | "int" | "int4" | "smallint" | "int2" => FieldType::Integer,
        "bigint unsigned" | "ubigint" | "uint8" => FieldType::UInteger,
        "boolean" | "bool" => FieldType::Boolean,
        _ if t.starts_with("varchar") || t.starts_with("character varying") => FieldType::String,
        _ => return None,
    })
}

async fn create_table(engine: &Engine, db: &str, create: CreateTable) -> Result<(), Error> {
    let table = last_name(&create.name);
    let ident = |e: &SqlExpr| match e {
        SqlExpr::Identifier(i) => Some(i.value.clone()),
        _ => None,
    };
    let mut keys: Vec<String> = Vec::new();
    for constraint in &create.constraints {
        if let TableConstraint::PrimaryKey(pk) = constraint {
            keys.extend(pk.columns.iter().filter_map(|c| ident(&c.column.expr)));
        }
    }
    let mut columns = Vec::new();
    for def in &create.columns {
        let name = def.name.value.clone();
        let sql_type = def.data_type.to_string();
        let is_key = keys.contains(&name)
            || def.options.iter().any(|o| matches!(o.option, ColumnOption::PrimaryKey(_)));
        if name == TIME_COLUMN {
            if !sql_type.to_ascii_lowercase().starts_with("timestamp") {
                return Err(Error::Invalid(format!(
                    "column \"time\" must be a timestamp, not {sql_type}"
                )));
            }
            continue;
        }
        let kind = match (is_key, field_type(&sql_type)) {
            (true, Some(FieldType::String)) => ColumnKind::Tag,
            (true, _) => {
                return Err(Error::Invalid(format!(
                    "tag column \"{name}\" (a primary key column) must be text, not {sql_type}"
                )))
            }
            (false, Some(t)) => ColumnKind::Field(t),
            (false, None) => {
                return Err(Error::Invalid(format!(
                    "column \"{name}\" has unsupported type {sql_type}"
                )))
            }
        };
        // The rules line protocol names follow: `_seq` (the hidden write order) is reserved.
        crate::catalog::check_name("column", &name).map_err(|e| Error::Invalid(e.to_string()))?;
        if name.is_empty() {
            return Err(Error::Invalid("a column name is empty".into()));
        }
        if columns.iter().any(|c: &Column| c.name == name) {
            return Err(Error::Invalid(format!("column \"{name}\" is declared twice")));
        }
        columns.push(Column { name, kind });
    }
    if !columns.iter().any(|c| matches!(c.kind, ColumnKind::Field(_))) {
        return Err(Error::Invalid(format!(
            "table \"{table}\" needs at least one field (a column outside the primary key)"
        )));
    }
    engine.create_table(db, &table, columns, create.if_not_exists).await?;
    Ok(())
}
