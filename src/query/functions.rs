//! SQL functions Sundial adds to DataFusion's, in every database session: `version()` and
//! `current_setting()` as PostgreSQL clients expect them (SQLAlchemy parses `version()`,
//! Grafana reads `server_version_num`), and TimescaleDB's `time_bucket(interval, time
//! [, origin])`, which is `date_bin` with buckets aligned to 2000-01-03 (a Monday), with its
//! `first(value, time)` and `last(value, time)` aggregates.

use std::sync::Arc;

use arrow::array::{Array, StringArray};
use arrow::datatypes::{DataType, Field};
use datafusion::common::{exec_err, Result, ScalarValue};
use datafusion::logical_expr::{
    create_udf, ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use datafusion::prelude::SessionContext;

/// The PostgreSQL version we speak for: new enough for current clients.
pub const PG_VERSION: &str = "16.6";
pub const PG_VERSION_NUM: &str = "160006";

pub fn register(ctx: &SessionContext) {
    let version = format!(
        "PostgreSQL {PG_VERSION} on {}-linux, compiled by Sundial {} (Apache DataFusion {})",
        std::env::consts::ARCH,
        env!("CARGO_PKG_VERSION"),
        datafusion::DATAFUSION_VERSION
    );
    ctx.register_udf(create_udf(
        "version",
        vec![],
        DataType::Utf8,
        Volatility::Immutable,
        Arc::new(move |_| Ok(ColumnarValue::Scalar(ScalarValue::Utf8(Some(version.clone()))))),
    ));
    ctx.register_udf(create_udf(
        "current_setting",
        vec![DataType::Utf8],
        DataType::Utf8,
        Volatility::Stable,
        Arc::new(current_setting),
    ));
    ctx.register_udf(ScalarUDF::new_from_impl(TimeBucket::new()));
    ctx.register_udf(super::gapfill::grid_check());
    ctx.register_udf(ScalarUDF::new_from_impl(DateTrunc {
        inner: datafusion::functions::datetime::date_trunc(),
    }));
    ctx.register_udaf(datafusion::logical_expr::AggregateUDF::new_from_impl(FirstLast::new(
        "first", false,
    )));
    ctx.register_udaf(datafusion::logical_expr::AggregateUDF::new_from_impl(FirstLast::new(
        "last", true,
    )));
    ctx.register_udf(create_udf(
        "to_regtype",
        vec![DataType::Utf8],
        DataType::Int32,
        Volatility::Stable,
        Arc::new(to_regtype),
    ));
}

/// The OID of a type name, NULL for types that do not exist here (psycopg and SQLAlchemy ask
/// for `hstore` and friends to see whether those extensions are installed).
fn type_oid(name: &str) -> Option<i32> {
    let name = name.trim().trim_start_matches("pg_catalog.").to_ascii_lowercase();
    Some(match name.as_str() {
        "bool" | "boolean" => 16,
        "bytea" => 17,
        "name" => 19,
        "int8" | "bigint" => 20,
        "int2" | "smallint" => 21,
        "int4" | "integer" | "int" => 23,
        "regproc" => 24,
        "text" => 25,
        "oid" => 26,
        "json" => 114,
        "float4" | "real" => 700,
        "float8" | "double precision" => 701,
        "varchar" | "character varying" => 1043,
        "date" => 1082,
        "time" | "time without time zone" => 1083,
        "timestamp" | "timestamp without time zone" => 1114,
        "timestamptz" | "timestamp with time zone" => 1184,
        "interval" => 1186,
        "numeric" | "decimal" => 1700,
        "regclass" => 2205,
        "regtype" => 2206,
        "uuid" => 2950,
        "jsonb" => 3802,
        _ => return None,
    })
}

fn to_regtype(args: &[ColumnarValue]) -> Result<ColumnarValue> {
    match &args[0] {
        ColumnarValue::Scalar(ScalarValue::Utf8(name)) => {
            Ok(ColumnarValue::Scalar(ScalarValue::Int32(name.as_deref().and_then(type_oid))))
        }
        ColumnarValue::Scalar(_) => Ok(ColumnarValue::Scalar(ScalarValue::Int32(None))),
        ColumnarValue::Array(array) => {
            let names = array.as_any().downcast_ref::<StringArray>().ok_or_else(|| {
                datafusion::error::DataFusionError::Execution("to_regtype takes text".into())
            })?;
            let oids: arrow::array::Int32Array =
                names.iter().map(|n| n.and_then(type_oid)).collect();
            Ok(ColumnarValue::Array(Arc::new(oids)))
        }
    }
}

/// Settings clients read; each is fixed for now (sessions' SET values live in pgwire's client
/// metadata, which scalar functions cannot see).
fn setting(name: &str) -> Option<&'static str> {
    Some(match name.to_ascii_lowercase().as_str() {
        "server_version" => PG_VERSION,
        "server_version_num" => PG_VERSION_NUM,
        "server_encoding" | "client_encoding" => "UTF8",
        "timezone" => "UTC",
        "datestyle" => "ISO, MDY",
        "intervalstyle" => "postgres",
        "search_path" => "public",
        "standard_conforming_strings" | "integer_datetimes" => "on",
        "is_superuser" => "on",
        "transaction_isolation" | "default_transaction_isolation" => "read committed",
        "max_identifier_length" => "63",
        "statement_timeout" => "0",
        "application_name" => "",
        _ => return None,
    })
}

fn current_setting(args: &[ColumnarValue]) -> Result<ColumnarValue> {
    let lookup = |name: &str| match setting(name) {
        Some(value) => Ok(value.to_string()),
        None => exec_err!("unrecognized configuration parameter \"{name}\""),
    };
    match &args[0] {
        ColumnarValue::Scalar(ScalarValue::Utf8(Some(name))) => {
            Ok(ColumnarValue::Scalar(ScalarValue::Utf8(Some(lookup(name)?))))
        }
        ColumnarValue::Scalar(_) => Ok(ColumnarValue::Scalar(ScalarValue::Utf8(None))),
        ColumnarValue::Array(array) => {
            let names = array.as_any().downcast_ref::<StringArray>().ok_or_else(|| {
                datafusion::error::DataFusionError::Execution("current_setting takes text".into())
            })?;
            let values = (0..names.len())
                .map(|i| if names.is_null(i) { Ok(None) } else { lookup(names.value(i)).map(Some) })
                .collect::<Result<StringArray>>()?;
            Ok(ColumnarValue::Array(Arc::new(values)))
        }
    }
}

/// `date_trunc` with a fast path: to a second, minute, hour or day of a UTC nanosecond
/// timestamp it is integer arithmetic (DataFusion's own goes through calendar conversions per
/// row, ten times slower); everything else is DataFusion's `date_trunc`, unchanged.
#[derive(Debug, PartialEq, Eq, Hash)]
struct DateTrunc {
    inner: Arc<ScalarUDF>,
}

/// The width of a `date_trunc` unit that is a fixed number of nanoseconds in UTC.
fn fixed_unit_ns(unit: &str) -> Option<i64> {
    Some(match unit.to_ascii_lowercase().as_str() {
        "microsecond" => 1_000,
        "millisecond" => 1_000_000,
        "second" => 1_000_000_000,
        "minute" => 60_000_000_000,
        "hour" => 3_600_000_000_000,
        "day" => 86_400_000_000_000,
        _ => return None,
    })
}

impl ScalarUDFImpl for DateTrunc {
    fn name(&self) -> &str {
        "date_trunc"
    }

    fn aliases(&self) -> &[String] {
        self.inner.aliases()
    }

    fn signature(&self) -> &Signature {
        self.inner.signature()
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        self.inner.return_type(arg_types)
    }

    fn return_field_from_args(
        &self,
        args: datafusion::logical_expr::ReturnFieldArgs,
    ) -> Result<arrow::datatypes::FieldRef> {
        self.inner.return_field_from_args(args)
    }

    fn output_ordering(
        &self,
        input: &[datafusion::logical_expr::sort_properties::ExprProperties],
    ) -> Result<datafusion::logical_expr::sort_properties::SortProperties> {
        self.inner.output_ordering(input)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        use arrow::datatypes::TimeUnit;
        let unit_ns = match &args.args[0] {
            ColumnarValue::Scalar(
                ScalarValue::Utf8(Some(unit))
                | ScalarValue::Utf8View(Some(unit))
                | ScalarValue::LargeUtf8(Some(unit)),
            ) => fixed_unit_ns(unit),
            _ => None,
        };
        let utc = match args.args[1].data_type() {
            DataType::Timestamp(TimeUnit::Nanosecond, None) => true,
            DataType::Timestamp(TimeUnit::Nanosecond, Some(tz)) => {
                matches!(tz.as_ref(), "UTC" | "+00:00" | "Z" | "Etc/UTC")
            }
            _ => false,
        };
        let (Some(unit_ns), true) = (unit_ns, utc) else {
            return self.inner.invoke_with_args(args);
        };
        let floor = |t: i64| t - t.rem_euclid(unit_ns);
        match &args.args[1] {
            ColumnarValue::Array(array) => {
                let times = array
                    .as_any()
                    .downcast_ref::<arrow::array::TimestampNanosecondArray>()
                    .expect("checked type");
                let truncated: arrow::array::TimestampNanosecondArray =
                    arrow::compute::kernels::arity::unary(times, floor);
                Ok(ColumnarValue::Array(Arc::new(
                    truncated.with_timezone_opt(times.timezone().map(Arc::<str>::from)),
                )))
            }
            ColumnarValue::Scalar(ScalarValue::TimestampNanosecond(t, tz)) => Ok(
                ColumnarValue::Scalar(ScalarValue::TimestampNanosecond(t.map(floor), tz.clone())),
            ),
            ColumnarValue::Scalar(_) => self.inner.invoke_with_args(args),
        }
    }
}

/// TimescaleDB's default origin: 2000-01-03T00:00:00Z, a Monday, so week buckets start on Mondays.
pub const TIME_BUCKET_ORIGIN_NS: i64 = 946_857_600_000_000_000;

#[derive(Debug, PartialEq, Eq, Hash)]
struct TimeBucket {
    signature: Signature,
}

impl TimeBucket {
    fn new() -> TimeBucket {
        // The same argument types and coercions as date_bin.
        TimeBucket { signature: datafusion::functions::datetime::date_bin().signature().clone() }
    }
}

impl ScalarUDFImpl for TimeBucket {
    fn name(&self) -> &str {
        "time_bucket"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        datafusion::functions::datetime::date_bin().return_type(arg_types)
    }

    fn invoke_with_args(&self, mut args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        if args.args.len() == 2 {
            let time_type = args.args[1].data_type();
            let origin = ScalarValue::TimestampNanosecond(Some(TIME_BUCKET_ORIGIN_NS), None)
                .cast_to(&time_type)?;
            args.arg_fields.push(Arc::new(Field::new("origin", time_type, true)));
            args.args.push(ColumnarValue::Scalar(origin));
        }
        datafusion::functions::datetime::date_bin().invoke_with_args(args)
    }
}

/// TimescaleDB's `first(value, time)` and `last(value, time)`: the value at the earliest or
/// latest time in each group (ties keep the first seen; NULL times are skipped).
#[derive(Debug, PartialEq, Eq, Hash)]
struct FirstLast {
    name: &'static str,
    last: bool,
    signature: Signature,
}

impl FirstLast {
    fn new(name: &'static str, last: bool) -> FirstLast {
        FirstLast { name, last, signature: Signature::any(2, Volatility::Immutable) }
    }
}

impl datafusion::logical_expr::AggregateUDFImpl for FirstLast {
    fn name(&self) -> &str {
        self.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        if !matches!(arg_types[1], DataType::Timestamp(..)) {
            return datafusion::common::plan_err!(
                "{}(value, time) needs a timestamp as its second argument",
                self.name
            );
        }
        Ok(arg_types[0].clone())
    }

    fn accumulator(
        &self,
        args: datafusion::logical_expr::function::AccumulatorArgs,
    ) -> Result<Box<dyn datafusion::logical_expr::Accumulator>> {
        let value = ScalarValue::try_from(args.return_field.data_type())?;
        Ok(Box::new(FirstLastAccumulator { last: self.last, time_ns: None, value }))
    }

    fn state_fields(
        &self,
        args: datafusion::logical_expr::function::StateFieldsArgs,
    ) -> Result<Vec<arrow::datatypes::FieldRef>> {
        Ok(vec![
            Arc::new(Field::new(
                format!("{}_value", args.name),
                args.return_field.data_type().clone(),
                true,
            )),
            Arc::new(Field::new(format!("{}_time", args.name), DataType::Int64, true)),
        ])
    }
}

#[derive(Debug)]
struct FirstLastAccumulator {
    last: bool,
    time_ns: Option<i64>,
    value: ScalarValue,
}

impl FirstLastAccumulator {
    fn consider(
        &mut self,
        values: &arrow::array::ArrayRef,
        times: &arrow::array::ArrayRef,
    ) -> Result<()> {
        let times = arrow::compute::cast(
            times,
            &DataType::Timestamp(arrow::datatypes::TimeUnit::Nanosecond, None),
        )?;
        let times = arrow::compute::cast(&times, &DataType::Int64)?;
        let times =
            times.as_any().downcast_ref::<arrow::array::Int64Array>().expect("cast to Int64");
        for row in 0..times.len() {
            if times.is_null(row) {
                continue;
            }
            let t = times.value(row);
            let better = match self.time_ns {
                None => true,
                Some(best) => {
                    if self.last {
                        t > best
                    } else {
                        t < best
                    }
                }
            };
            if better {
                self.time_ns = Some(t);
                self.value = ScalarValue::try_from_array(values, row)?;
            }
        }
        Ok(())
    }
}

impl datafusion::logical_expr::Accumulator for FirstLastAccumulator {
    fn update_batch(&mut self, values: &[arrow::array::ArrayRef]) -> Result<()> {
        self.consider(&values[0], &values[1])
    }

    fn merge_batch(&mut self, states: &[arrow::array::ArrayRef]) -> Result<()> {
        let times = arrow::compute::cast(
            &states[1],
            &DataType::Timestamp(arrow::datatypes::TimeUnit::Nanosecond, None),
        )?;
        self.consider(&states[0], &times)
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        Ok(vec![self.value.clone(), ScalarValue::Int64(self.time_ns)])
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        Ok(self.value.clone())
    }

    fn size(&self) -> usize {
        std::mem::size_of_val(self) + self.value.size() - std::mem::size_of_val(&self.value)
    }
}
