//! PostgreSQL catalog functions that clients call and datafusion-pg-catalog lacks or gets
//! wrong, installed over it in every Postgres session: `quote_ident` (PostgreSQL quotes
//! keywords such as `time`), `json_build_object` (SQLAlchemy's column reflection),
//! `pg_get_serial_sequence` (no sequences here: NULL), `pg_function_is_visible`,
//! `pg_get_function_result`/`_arguments` (psql's `\df`) and `pg_collation_is_visible`.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, StringArray};
use arrow::datatypes::DataType;
use datafusion::common::{Result, ScalarValue};
use datafusion::logical_expr::{
    create_udf, ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use datafusion::prelude::SessionContext;

pub fn register(ctx: &SessionContext) {
    ctx.register_udf(create_udf(
        "quote_ident",
        vec![DataType::Utf8],
        DataType::Utf8,
        Volatility::Immutable,
        Arc::new(quote_ident),
    ));
    ctx.register_udf(ScalarUDF::new_from_impl(JsonBuildObject {
        signature: Signature::variadic_any(Volatility::Immutable),
    }));
    // No sequences; no functions of users' own (so nothing whose signature to show).
    for (name, arity) in [
        ("pg_get_serial_sequence", 2),
        ("pg_get_function_result", 1),
        ("pg_get_function_arguments", 1),
    ] {
        ctx.register_udf(ScalarUDF::new_from_impl(Constant::new(
            name,
            arity,
            ScalarValue::Utf8(None),
        )));
    }
    // One schema, everything in it visible.
    for name in ["pg_function_is_visible", "pg_collation_is_visible", "pg_type_is_visible"] {
        ctx.register_udf(ScalarUDF::new_from_impl(Constant::new(
            name,
            1,
            ScalarValue::Boolean(Some(true)),
        )));
    }
}

/// A function of any arguments with one answer.
#[derive(Debug, PartialEq, Eq, Hash)]
struct Constant {
    name: &'static str,
    signature: Signature,
    value: ScalarValue,
}

impl Constant {
    fn new(name: &'static str, arity: usize, value: ScalarValue) -> Constant {
        Constant { name, signature: Signature::any(arity, Volatility::Stable), value }
    }
}

impl ScalarUDFImpl for Constant {
    fn name(&self) -> &str {
        self.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(self.value.data_type())
    }

    fn invoke_with_args(&self, _args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        Ok(ColumnarValue::Scalar(self.value.clone()))
    }
}

/// Keywords PostgreSQL 16 does not accept as bare column names: reserved, column-name and
/// type/function-name keywords (`quote_ident` quotes them).
const NON_UNRESERVED_KEYWORDS: &[&str] = &[
    "all",
    "analyse",
    "analyze",
    "and",
    "any",
    "array",
    "as",
    "asc",
    "asymmetric",
    "authorization",
    "between",
    "bigint",
    "binary",
    "bit",
    "boolean",
    "both",
    "case",
    "cast",
    "char",
    "character",
    "check",
    "coalesce",
    "collate",
    "collation",
    "column",
    "concurrently",
    "constraint",
    "create",
    "cross",
    "current_catalog",
    "current_date",
    "current_role",
    "current_schema",
    "current_time",
    "current_timestamp",
    "current_user",
    "dec",
    "decimal",
    "default",
    "deferrable",
    "desc",
    "distinct",
    "do",
    "else",
    "end",
    "except",
    "exists",
    "extract",
    "false",
    "fetch",
    "float",
    "for",
    "foreign",
    "freeze",
    "from",
    "full",
    "grant",
    "greatest",
    "group",
    "grouping",
    "having",
    "ilike",
    "in",
    "initially",
    "inner",
    "inout",
    "int",
    "integer",
    "intersect",
    "interval",
    "into",
    "is",
    "isnull",
    "join",
    "json",
    "json_array",
    "json_arrayagg",
    "json_object",
    "json_objectagg",
    "lateral",
    "leading",
    "least",
    "left",
    "like",
    "limit",
    "localtime",
    "localtimestamp",
    "national",
    "natural",
    "nchar",
    "none",
    "normalize",
    "not",
    "notnull",
    "null",
    "nullif",
    "numeric",
    "offset",
    "on",
    "only",
    "or",
    "order",
    "out",
    "outer",
    "overlaps",
    "overlay",
    "placing",
    "position",
    "precision",
    "primary",
    "real",
    "references",
    "returning",
    "right",
    "row",
    "select",
    "session_user",
    "setof",
    "similar",
    "smallint",
    "some",
    "substring",
    "symmetric",
    "system_user",
    "table",
    "tablesample",
    "then",
    "time",
    "timestamp",
    "to",
    "trailing",
    "treat",
    "trim",
    "true",
    "union",
    "unique",
    "user",
    "using",
    "values",
    "varchar",
    "variadic",
    "verbose",
    "when",
    "where",
    "window",
    "with",
    "xmlattributes",
    "xmlconcat",
    "xmlelement",
    "xmlexists",
    "xmlforest",
    "xmlnamespaces",
    "xmlparse",
    "xmlpi",
    "xmlroot",
    "xmlserialize",
    "xmltable",
];

/// PostgreSQL's `quote_ident`: quoted unless a plain lower-case identifier that is not a
/// keyword needing quotes.
pub fn quote_ident_text(name: &str) -> String {
    let plain = name.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !NON_UNRESERVED_KEYWORDS.contains(&name);
    if plain {
        name.to_string()
    } else {
        format!("\"{}\"", name.replace('"', "\"\""))
    }
}

fn quote_ident(args: &[ColumnarValue]) -> Result<ColumnarValue> {
    match &args[0] {
        ColumnarValue::Scalar(ScalarValue::Utf8(name)) => {
            Ok(ColumnarValue::Scalar(ScalarValue::Utf8(name.as_deref().map(quote_ident_text))))
        }
        ColumnarValue::Scalar(_) => Ok(ColumnarValue::Scalar(ScalarValue::Utf8(None))),
        ColumnarValue::Array(array) => {
            let names = arrow::compute::cast(array, &DataType::Utf8)?;
            let names = names.as_any().downcast_ref::<StringArray>().expect("cast to Utf8");
            let quoted: StringArray = names.iter().map(|n| n.map(quote_ident_text)).collect();
            Ok(ColumnarValue::Array(Arc::new(quoted)))
        }
    }
}

/// `json_build_object(key, value, …)` as JSON text.
#[derive(Debug, PartialEq, Eq, Hash)]
struct JsonBuildObject {
    signature: Signature,
}

fn json_of(value: ScalarValue) -> serde_json::Value {
    use serde_json::Value;
    if value.is_null() {
        return Value::Null;
    }
    match value {
        ScalarValue::Boolean(Some(b)) => Value::Bool(b),
        ScalarValue::Int8(Some(v)) => v.into(),
        ScalarValue::Int16(Some(v)) => v.into(),
        ScalarValue::Int32(Some(v)) => v.into(),
        ScalarValue::Int64(Some(v)) => v.into(),
        ScalarValue::UInt8(Some(v)) => v.into(),
        ScalarValue::UInt16(Some(v)) => v.into(),
        ScalarValue::UInt32(Some(v)) => v.into(),
        ScalarValue::UInt64(Some(v)) => v.into(),
        ScalarValue::Float32(Some(v)) => {
            serde_json::Number::from_f64(v.into()).map_or(Value::Null, Value::Number)
        }
        ScalarValue::Float64(Some(v)) => {
            serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number)
        }
        ScalarValue::Utf8(Some(s))
        | ScalarValue::LargeUtf8(Some(s))
        | ScalarValue::Utf8View(Some(s)) => Value::String(s),
        ScalarValue::Dictionary(_, inner) => json_of(*inner),
        other => Value::String(other.to_string()),
    }
}

impl ScalarUDFImpl for JsonBuildObject {
    fn name(&self) -> &str {
        "json_build_object"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(DataType::Utf8)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        if !args.args.len().is_multiple_of(2) {
            return datafusion::common::exec_err!("json_build_object takes key, value pairs");
        }
        let rows = args.number_rows;
        let arrays: Vec<ArrayRef> =
            args.args.iter().map(|a| a.to_array(rows)).collect::<Result<_>>()?;
        let mut out = Vec::with_capacity(rows);
        for row in 0..rows {
            // PostgreSQL's layout: keys in argument order, `"k" : v` separated by `, `.
            let mut members = Vec::with_capacity(arrays.len() / 2);
            for pair in arrays.chunks(2) {
                let key = match json_of(ScalarValue::try_from_array(&pair[0], row)?) {
                    serde_json::Value::String(s) => s,
                    serde_json::Value::Null => {
                        return datafusion::common::exec_err!(
                            "json_build_object keys cannot be NULL"
                        )
                    }
                    other => other.to_string(),
                };
                let value = json_of(ScalarValue::try_from_array(&pair[1], row)?);
                members.push(format!("{} : {value}", serde_json::Value::String(key)));
            }
            out.push(format!("{{{}}}", members.join(", ")));
        }
        Ok(ColumnarValue::Array(Arc::new(StringArray::from(out))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quote_ident_quotes_what_postgres_quotes() {
        assert_eq!(quote_ident_text("host"), "host");
        assert_eq!(quote_ident_text("usage_user"), "usage_user");
        assert_eq!(quote_ident_text("time"), "\"time\"");
        assert_eq!(quote_ident_text("Host"), "\"Host\"");
        assert_eq!(quote_ident_text("two words"), "\"two words\"");
        assert_eq!(quote_ident_text("say\"hi"), "\"say\"\"hi\"");
        assert_eq!(quote_ident_text("1st"), "\"1st\"");
    }
}
