//! `COPY` in both directions, text or CSV format.
//!
//! * `COPY table|(query) TO STDOUT` (psql's `\copy … to`): the query's rows as COPY lines.
//! * `COPY table [(columns)] FROM STDIN` (psql's `\copy … from`, drivers' bulk load): the data is
//!   read whole (up to a byte limit), parsed and checked against the table's types, rendered as
//!   line protocol and stored through `Engine::write_lp` like any other write. Every row is
//!   checked before any is written; an error names the line and column, as PostgreSQL does.
//!
//! The statement pipeline hands `COPY` here ([`from_statement`]); a `COPY` to or from a server
//! file or program is refused, never left to DataFusion (whose `COPY` writes files).

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, RecordBatch, StringArray};
use arrow::csv::QuoteStyle;
use arrow::datatypes::{Field, Schema};
use datafusion::sql::sqlparser::ast::{
    CopyLegacyCsvOption, CopyLegacyOption, CopyOption, CopySource, CopyTarget, Statement,
};
use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
use datafusion::sql::sqlparser::parser::Parser;

use super::sqlstate::SqlState;
use crate::catalog::{ColumnKind, TableSchema};

/// How COPY lines are written or read.
#[derive(Debug, PartialEq)]
pub struct Format {
    pub csv: bool,
    pub header: bool,
    pub delimiter: u8,
    pub null: String,
}

/// A parsed `COPY … TO STDOUT`.
#[derive(Debug, PartialEq)]
pub struct CopyOut {
    /// The query whose rows are copied out (a table becomes `SELECT columns FROM table`).
    pub query: Box<Statement>,
    pub format: Format,
}

/// A parsed `COPY table FROM STDIN`.
#[derive(Debug, PartialEq)]
pub struct CopyIn {
    pub table: String,
    /// The columns the data holds, in order; empty means all of the table's.
    pub columns: Vec<String>,
    pub format: Format,
}

#[derive(Debug, PartialEq)]
pub enum Copy {
    Out(CopyOut),
    In(CopyIn),
}

/// The `COPY … TO STDOUT` or `COPY … FROM STDIN` a parsed `COPY` statement asks for, or why it
/// cannot be done: a server-side file or program is never read or written (psql's `\copy`
/// reads and writes the client's files through STDIN/STDOUT).
pub fn from_statement(statement: Statement) -> Result<Copy, String> {
    let Statement::Copy { source, to, target, options, legacy_options, .. } = statement else {
        return Err("not a COPY statement".into());
    };
    if !matches!((&target, to), (CopyTarget::Stdout, true) | (CopyTarget::Stdin, false)) {
        return Err(format!(
            "COPY {} {target} is not supported: the server reads and writes no files or programs; \
             use COPY … TO STDOUT or COPY … FROM STDIN (psql's \\copy)",
            if to { "TO" } else { "FROM" }
        ));
    }
    let format = parse_format(options, legacy_options)?;
    match (source, to) {
        (CopySource::Query(query), true) => {
            Ok(Copy::Out(CopyOut { query: Box::new(Statement::Query(query)), format }))
        }
        (CopySource::Table { table_name, columns }, true) => {
            let list = if columns.is_empty() {
                "*".to_string()
            } else {
                columns.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(", ")
            };
            let sql = format!("SELECT {list} FROM {table_name}");
            let mut parsed = Parser::parse_sql(&PostgreSqlDialect {}, &sql)
                .map_err(|e| format!("COPY of {table_name}: {e}"))?;
            match parsed.pop() {
                Some(query) if parsed.is_empty() => {
                    Ok(Copy::Out(CopyOut { query: Box::new(query), format }))
                }
                _ => Err(format!("COPY of {table_name}: not one table")),
            }
        }
        (CopySource::Table { table_name, columns }, false) => {
            let table = table_name
                .0
                .last()
                .and_then(|p| p.as_ident())
                .map(|i| i.value.clone())
                .unwrap_or_default();
            Ok(Copy::In(CopyIn {
                table,
                columns: columns.into_iter().map(|c| c.value).collect(),
                format,
            }))
        }
        (CopySource::Query(_), false) => Err("COPY FROM needs a table, not a query".to_string()),
    }
}

fn parse_format(
    options: Vec<CopyOption>,
    legacy_options: Vec<CopyLegacyOption>,
) -> Result<Format, String> {
    let mut format = Format { csv: false, header: false, delimiter: b'\t', null: "\\N".into() };
    let mut delimiter = None;
    let mut null = None;
    for option in options {
        match option {
            CopyOption::Format(name) if name.value.eq_ignore_ascii_case("csv") => format.csv = true,
            CopyOption::Format(name) if name.value.eq_ignore_ascii_case("text") => {
                format.csv = false
            }
            CopyOption::Header(h) => format.header = h,
            CopyOption::Delimiter(d) if d.is_ascii() => delimiter = Some(d as u8),
            CopyOption::Null(n) => null = Some(n),
            other => return Err(format!("COPY option {other} is not supported")),
        }
    }
    for option in legacy_options {
        match option {
            CopyLegacyOption::Csv(csv_options) => {
                format.csv = true;
                for o in csv_options {
                    match o {
                        CopyLegacyCsvOption::Header => format.header = true,
                        other => return Err(format!("COPY option {other} is not supported")),
                    }
                }
            }
            CopyLegacyOption::Delimiter(d) if d.is_ascii() => delimiter = Some(d as u8),
            CopyLegacyOption::Null(n) => null = Some(n),
            other => return Err(format!("COPY option {other} is not supported")),
        }
    }
    if format.csv {
        format.delimiter = b',';
        format.null = String::new();
    }
    format.delimiter = delimiter.unwrap_or(format.delimiter);
    format.null = null.unwrap_or(format.null);
    Ok(format)
}

/// A COPY FROM input error, with the 1-based line it is on.
#[derive(Debug, PartialEq)]
pub struct InputError {
    pub sqlstate: SqlState,
    pub message: String,
}

fn input_error(sqlstate: SqlState, message: String) -> InputError {
    InputError { sqlstate, message }
}

/// One value as read: `None` is NULL.
type Row = Vec<Option<String>>;

/// Splits COPY text-format data into rows: tab (or `delimiter`) separated, `\N` (or `null`)
/// for NULL, backslash escapes, `\.` ends the data.
fn text_rows(data: &[u8], format: &Format) -> Result<Vec<(usize, Row)>, InputError> {
    let text = std::str::from_utf8(data).map_err(|e| {
        input_error(
            SqlState::CharacterNotInRepertoire,
            format!("COPY data is not valid UTF-8: {e}"),
        )
    })?;
    let mut rows = Vec::new();
    for (index, line) in text.split('\n').enumerate() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line == "\\." {
            break;
        }
        if line.is_empty() && index + 1 == text.split('\n').count() {
            break;
        }
        let mut row = Vec::new();
        for raw in line.split(format.delimiter as char) {
            row.push(if raw == format.null { None } else { Some(unescape_text(raw)) });
        }
        rows.push((index + 1, row));
    }
    Ok(rows)
}

fn unescape_text(raw: &str) -> String {
    if !raw.contains('\\') {
        return raw.to_string();
    }
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('b') => out.push('\u{8}'),
            Some('f') => out.push('\u{c}'),
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some('t') => out.push('\t'),
            Some('v') => out.push('\u{b}'),
            Some(d @ '0'..='7') => {
                let mut value = d.to_digit(8).unwrap_or(0);
                for _ in 0..2 {
                    match chars.peek().and_then(|c| c.to_digit(8)) {
                        Some(v) => {
                            value = value * 8 + v;
                            chars.next();
                        }
                        None => break,
                    }
                }
                out.extend(char::from_u32(value));
            }
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    out
}

/// Splits CSV data into rows: `"` quotes (doubled inside), quoted fields may span lines, an
/// unquoted `null` string is NULL, `\.` alone on a line ends the data.
fn csv_rows(data: &[u8], format: &Format) -> Result<Vec<(usize, Row)>, InputError> {
    let text = std::str::from_utf8(data).map_err(|e| {
        input_error(
            SqlState::CharacterNotInRepertoire,
            format!("COPY data is not valid UTF-8: {e}"),
        )
    })?;
    let delimiter = format.delimiter as char;
    let mut rows = Vec::new();
    let mut line = 1;
    let mut chars = text.chars().peekable();
    while chars.peek().is_some() {
        let start_line = line;
        let mut row: Row = Vec::new();
        let mut field = String::new();
        let mut quoted = false;
        loop {
            let Some(c) = chars.next() else {
                row.push(csv_value(field, quoted, format));
                break;
            };
            match c {
                '"' => {
                    quoted = true;
                    loop {
                        match chars.next() {
                            Some('"') if chars.peek() == Some(&'"') => {
                                chars.next();
                                field.push('"');
                            }
                            Some('"') => break,
                            Some(c) => {
                                if c == '\n' {
                                    line += 1;
                                }
                                field.push(c);
                            }
                            None => {
                                return Err(input_error(
                                    SqlState::BadCopyFileFormat,
                                    format!("line {start_line}: unterminated CSV quoted field"),
                                ))
                            }
                        }
                    }
                }
                c if c == delimiter => {
                    row.push(csv_value(std::mem::take(&mut field), quoted, format));
                    quoted = false;
                }
                '\r' if chars.peek() == Some(&'\n') => {}
                '\n' => {
                    line += 1;
                    row.push(csv_value(field, quoted, format));
                    break;
                }
                c => field.push(c),
            }
        }
        if row.len() == 1 && row[0].as_deref() == Some("\\.") {
            break;
        }
        rows.push((start_line, row));
    }
    if format.header && !rows.is_empty() {
        rows.remove(0);
    }
    Ok(rows)
}

fn csv_value(field: String, quoted: bool, format: &Format) -> Option<String> {
    if !quoted && field == format.null {
        None
    } else {
        Some(field)
    }
}

/// Parses COPY data for `table` into one batch of the table's types, in the column order of
/// `columns` (all of the table's when empty). Every row is checked here.
pub fn to_batch(
    copy: &CopyIn,
    table: &TableSchema,
    data: &[u8],
) -> Result<RecordBatch, InputError> {
    let names: Vec<String> = if copy.columns.is_empty() {
        table.arrow_schema().fields().iter().map(|f| f.name().clone()).collect()
    } else {
        copy.columns.clone()
    };
    let mut fields = Vec::with_capacity(names.len());
    for (i, name) in names.iter().enumerate() {
        let Ok(field) = table.arrow_schema().field_with_name(name) else {
            return Err(input_error(
                SqlState::UndefinedColumn,
                format!("column \"{name}\" of relation \"{}\" does not exist", table.name),
            ));
        };
        if names[..i].contains(name) {
            return Err(input_error(
                SqlState::DuplicateColumn,
                format!("column \"{name}\" specified more than once"),
            ));
        }
        let data_type = match table.column(name).map(|c| c.kind) {
            Some(ColumnKind::Tag) => arrow::datatypes::DataType::Utf8,
            _ => field.data_type().clone(),
        };
        fields.push(Field::new(name, data_type, true));
    }
    let rows = if copy.format.csv {
        csv_rows(data, &copy.format)?
    } else {
        text_rows(data, &copy.format)?
    };
    let mut columns: Vec<Vec<Option<String>>> = vec![Vec::with_capacity(rows.len()); names.len()];
    for (line, row) in &rows {
        if row.len() < names.len() {
            return Err(input_error(
                SqlState::BadCopyFileFormat,
                format!("line {line}: missing data for column \"{}\"", names[row.len()]),
            ));
        }
        if row.len() > names.len() {
            return Err(input_error(
                SqlState::BadCopyFileFormat,
                format!("line {line}: extra data after last expected column"),
            ));
        }
        for (column, value) in columns.iter_mut().zip(row) {
            column.push(value.clone());
        }
    }
    let options = arrow::compute::CastOptions { safe: false, ..Default::default() };
    let mut arrays: Vec<ArrayRef> = Vec::with_capacity(names.len());
    for (i, field) in fields.iter().enumerate() {
        let strings = StringArray::from(columns[i].clone());
        let cast = arrow::compute::cast_with_options(&strings, field.data_type(), &options)
            .map_err(|_| {
                // Find the row that failed, for the message.
                let bad = (0..strings.len()).find(|&r| {
                    arrow::compute::cast_with_options(
                        &strings.slice(r, 1),
                        field.data_type(),
                        &options,
                    )
                    .is_err()
                });
                let (line, value) = bad
                    .map(|r| (rows[r].0, columns[i][r].clone().unwrap_or_default()))
                    .unwrap_or((0, String::new()));
                input_error(
                    SqlState::InvalidTextRepresentation,
                    format!(
                        "line {line}, column {}: invalid input syntax for type {}: \"{value}\"",
                        field.name(),
                        pg_type_name(field.data_type())
                    ),
                )
            })?;
        arrays.push(cast);
    }
    let schema = Arc::new(Schema::new(fields));
    RecordBatch::try_new(schema, arrays)
        .map_err(|e| input_error(SqlState::InternalError, e.to_string()))
}

fn pg_type_name(data_type: &arrow::datatypes::DataType) -> &'static str {
    use arrow::datatypes::DataType;
    match data_type {
        DataType::Float64 => "double precision",
        DataType::Int64 => "bigint",
        DataType::UInt64 => "numeric",
        DataType::Boolean => "boolean",
        DataType::Timestamp(..) => "timestamp with time zone",
        _ => "text",
    }
}

/// Text format escapes backslashes, tabs and line breaks in values (CSV quotes instead).
fn escape_text_batch(batch: &RecordBatch) -> Result<RecordBatch, arrow::error::ArrowError> {
    let columns = batch
        .columns()
        .iter()
        .map(|column| match column.as_any().downcast_ref::<StringArray>() {
            Some(strings)
                if strings.iter().flatten().any(|v| v.contains(['\\', '\t', '\n', '\r'])) =>
            {
                let escaped: StringArray = strings
                    .iter()
                    .map(|v| {
                        v.map(|v| {
                            v.replace('\\', "\\\\")
                                .replace('\t', "\\t")
                                .replace('\n', "\\n")
                                .replace('\r', "\\r")
                        })
                    })
                    .collect();
                Arc::new(escaped) as ArrayRef
            }
            _ => column.clone(),
        })
        .collect();
    RecordBatch::try_new(batch.schema(), columns)
}

/// A JSON value as a COPY text field: `\\N` for NULL, text escaped as COPY's text format does.
pub fn text_value(value: Option<&serde_json::Value>) -> String {
    let text = match value {
        None | Some(serde_json::Value::Null) => return "\\N".to_string(),
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    };
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    out
}

/// Renders result batches as COPY lines.
pub fn render(
    copy: &Format,
    schema: &arrow::datatypes::SchemaRef,
    batches: &[arrow::array::RecordBatch],
) -> Result<Vec<u8>, arrow::error::ArrowError> {
    let (schema, batches) = crate::query::plain(schema, batches)?;
    let mut out = Vec::new();
    if copy.header && batches.iter().all(|b| b.num_rows() == 0) {
        let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        out.extend_from_slice(names.join(&(copy.delimiter as char).to_string()).as_bytes());
        out.push(b'\n');
    }
    let batches = if copy.csv {
        batches
    } else {
        batches.iter().map(escape_text_batch).collect::<Result<Vec<_>, _>>()?
    };
    let quote = if copy.csv { QuoteStyle::Necessary } else { QuoteStyle::Never };
    let mut writer = arrow::csv::WriterBuilder::new()
        .with_header(copy.header)
        .with_delimiter(copy.delimiter)
        .with_null(copy.null.clone())
        .with_quote_style(quote)
        .build(&mut out);
    for batch in batches.iter().filter(|b| b.num_rows() > 0) {
        writer.write(batch)?;
    }
    drop(writer);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{Column, FieldType};

    /// `None` when `sql` is not a COPY statement; otherwise what [`from_statement`] makes of it.
    fn parse(sql: &str) -> Option<Result<Copy, String>> {
        let mut statements = Parser::parse_sql(&PostgreSqlDialect {}, sql).ok()?;
        let statement = statements.pop()?;
        matches!(statement, Statement::Copy { .. }).then(|| from_statement(statement))
    }

    fn out(sql: &str) -> CopyOut {
        match parse(sql).expect("a copy").expect("supported") {
            Copy::Out(out) => out,
            other => panic!("not a COPY TO: {other:?}"),
        }
    }

    fn copy_in(sql: &str) -> CopyIn {
        match parse(sql).expect("a copy").expect("supported") {
            Copy::In(copy_in) => copy_in,
            other => panic!("not a COPY FROM: {other:?}"),
        }
    }

    #[test]
    fn parses_what_psql_sends() {
        let copy = out("COPY  cpu TO STDOUT csv header");
        assert_eq!(
            (copy.query.to_string(), copy.format),
            (
                "SELECT * FROM cpu".to_string(),
                Format { csv: true, header: true, delimiter: b',', null: String::new() }
            )
        );
        let copy = out("COPY (SELECT host FROM cpu) TO STDOUT");
        assert_eq!(
            (
                copy.query.to_string().as_str(),
                copy.format.csv,
                copy.format.delimiter,
                copy.format.null.as_str()
            ),
            ("SELECT host FROM cpu", false, b'\t', "\\N")
        );
        let copy = out("COPY cpu (host, time) TO STDOUT WITH (FORMAT csv, DELIMITER ';')");
        assert_eq!(
            (copy.query.to_string().as_str(), copy.format.delimiter),
            ("SELECT host, time FROM cpu", b';')
        );
        let copy = copy_in("COPY cpu (host, usage) FROM STDIN WITH (FORMAT csv, HEADER true)");
        assert_eq!(
            (copy.table.as_str(), copy.columns.clone(), copy.format.csv, copy.format.header),
            ("cpu", vec!["host".to_string(), "usage".to_string()], true, true)
        );
        assert!(parse("SELECT 1").is_none());
        // Server files are refused, not left to DataFusion (which would write them).
        assert!(parse("COPY cpu TO '/tmp/x.csv'").expect("a copy").is_err());
        assert!(parse("COPY cpu FROM '/tmp/x.csv'").expect("a copy").is_err());
        assert!(parse("COPY (SELECT 1) TO PROGRAM 'touch /tmp/x'").expect("a copy").is_err());
        assert!(parse("COPY cpu TO STDOUT WITH (FORMAT binary)").expect("a copy").is_err());
    }

    fn cpu() -> TableSchema {
        TableSchema::new(
            "cpu",
            vec![
                Column { name: "host".into(), kind: ColumnKind::Tag },
                Column { name: "usage".into(), kind: ColumnKind::Field(FieldType::Float) },
                Column { name: "note".into(), kind: ColumnKind::Field(FieldType::String) },
                Column { name: "ok".into(), kind: ColumnKind::Field(FieldType::Boolean) },
            ],
        )
    }

    #[test]
    fn text_format_rows_with_escapes_and_nulls() {
        let copy = copy_in("COPY cpu (host, usage, note, ok, time) FROM STDIN");
        let data = b"a\t1.5\tx\\ty\tt\t2024-01-01 00:00:00+00\nb\t\\N\t\\N\tfalse\t2024-01-01T00:00:01Z\n\\.\n";
        let batch = to_batch(&copy, &cpu(), data).expect("valid");
        assert_eq!(batch.num_rows(), 2);
        let notes = batch.column(2).as_any().downcast_ref::<StringArray>().expect("text");
        assert_eq!(notes.value(0), "x\ty");
        assert!(batch.column(1).is_null(1) && batch.column(2).is_null(1));
        let times = arrow::compute::cast(batch.column(4), &arrow::datatypes::DataType::Int64)
            .expect("cast");
        let times = times.as_any().downcast_ref::<arrow::array::Int64Array>().expect("i64");
        assert_eq!(
            (times.value(0), times.value(1)),
            (1_704_067_200_000_000_000, 1_704_067_201_000_000_000)
        );
    }

    #[test]
    fn csv_rows_with_quotes_header_and_multiline_values() {
        let copy = copy_in("COPY cpu (host, note, usage) FROM STDIN (FORMAT csv, HEADER)");
        let data = b"host,note,usage\r\na,\"say \"\"hi\"\", ok\",2\nb,\"two\nlines\",\nc,,3\n";
        let batch = to_batch(&copy, &cpu(), data).expect("valid");
        let notes = batch.column(1).as_any().downcast_ref::<StringArray>().expect("text");
        assert_eq!(notes.value(0), "say \"hi\", ok");
        assert_eq!(notes.value(1), "two\nlines");
        assert!(batch.column(2).is_null(1), "an unquoted empty value is NULL");
        assert!(batch.column(1).is_null(2));
    }

    #[test]
    fn bad_rows_name_their_line_and_column() {
        let copy = copy_in("COPY cpu (host, usage) FROM STDIN");
        let err = to_batch(&copy, &cpu(), b"a\t1\nb\tlots\n").expect_err("not a number");
        assert_eq!(err.sqlstate.code(), "22P02");
        assert!(
            err.message.contains("line 2, column usage") && err.message.contains("\"lots\""),
            "{}",
            err.message
        );
        let err = to_batch(&copy, &cpu(), b"a\t1\nb\n").expect_err("short row");
        assert_eq!(
            (err.sqlstate.code(), err.message.as_str()),
            ("22P04", "line 2: missing data for column \"usage\"")
        );
        let err = to_batch(&copy, &cpu(), b"a\t1\t2\n").expect_err("long row");
        assert_eq!(err.sqlstate.code(), "22P04");
        let err = to_batch(&copy_in("COPY cpu (host, nope) FROM STDIN"), &cpu(), b"a\t1\n")
            .expect_err("no column");
        assert_eq!(err.sqlstate.code(), "42703");
        let err = to_batch(&copy_in("COPY cpu (host, usage) FROM STDIN CSV"), &cpu(), b"a,\"1\n")
            .expect_err("open quote");
        assert_eq!(err.sqlstate.code(), "22P04");
    }
}
