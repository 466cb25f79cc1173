//! `CREATE DATABASE` and `CREATE TABLE`, for either protocol. A table's tags are its primary
//! key columns (besides `time`), as in GreptimeDB: tags plus time identify a point. Other
//! columns are fields: text, double precision, bigint, bigint unsigned or boolean. `time`
//! (timestamptz) is implicit when not declared.

use datafusion::sql::sqlparser::ast::{ColumnOption, CreateTable, Expr as SqlExpr, Statement, TableConstraint};

use crate::catalog::{Column, ColumnKind, FieldType, TIME_COLUMN};
use crate::engine::Engine;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Engine(#[from] crate::engine::Error),
}

impl Error {
    pub fn kind(&self) -> crate::ErrorKind {
        match self {
            Error::Invalid(_) => crate::ErrorKind::InvalidInput,
            Error::Engine(e) => e.kind(),
        }
    }
}

/// Whether `sql` is a statement [`execute`] handles.
pub fn is_ddl(sql: &str) -> bool {
    matches!(super::parse_single(sql, "create"), Some(Statement::CreateDatabase { .. } | Statement::CreateTable(_)))
}

/// Runs `sql` if it is a DDL statement handled here; returns the command tag.
pub async fn execute(engine: &Engine, db: &str, sql: &str) -> Option<Result<&'static str, Error>> {
    match super::parse_single(sql, "create")? {
        Statement::CreateDatabase { db_name, if_not_exists, .. } => {
            let name = db_name.0.last().map(|p| p.to_string().trim_matches('"').to_string()).unwrap_or_default();
            Some(match engine.create_database(&name).await {
                Ok(false) if !if_not_exists => Err(Error::Invalid(format!("database \"{name}\" already exists"))),
                Ok(_) => Ok("CREATE DATABASE"),
                Err(e) => Err(e.into()),
            })
        }
        Statement::CreateTable(create) => Some(create_table(engine, db, create).await.map(|()| "CREATE TABLE")),
        _ => None,
    }
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
    let table = create.name.0.last().map(|p| p.to_string().trim_matches('"').to_string()).unwrap_or_default();
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
        let is_key = keys.contains(&name) || def.options.iter().any(|o| matches!(o.option, ColumnOption::PrimaryKey(_)));
        if name == TIME_COLUMN {
            if !sql_type.to_ascii_lowercase().starts_with("timestamp") {
                return Err(Error::Invalid(format!("column \"time\" must be a timestamp, not {sql_type}")));
            }
            continue;
        }
        let kind = match (is_key, field_type(&sql_type)) {
            (true, Some(FieldType::String)) => ColumnKind::Tag,
            (true, _) => return Err(Error::Invalid(format!("tag column \"{name}\" (a primary key column) must be text, not {sql_type}"))),
            (false, Some(t)) => ColumnKind::Field(t),
            (false, None) => return Err(Error::Invalid(format!("column \"{name}\" has unsupported type {sql_type}"))),
        };
        if columns.iter().any(|c: &Column| c.name == name) {
            return Err(Error::Invalid(format!("column \"{name}\" is declared twice")));
        }
        columns.push(Column { name, kind });
    }
    if !columns.iter().any(|c| matches!(c.kind, ColumnKind::Field(_))) {
        return Err(Error::Invalid(format!("table \"{table}\" needs at least one field (a column outside the primary key)")));
    }
    engine.create_table(db, &table, columns, create.if_not_exists).await?;
    Ok(())
}
