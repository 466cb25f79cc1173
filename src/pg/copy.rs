//! `COPY table|(query) TO STDOUT` in text or CSV format (psql's `\copy … to`). DataFusion's
//! own parser reads `COPY` as its file-writing statement, so this one is parsed with
//! sqlparser's PostgreSQL dialect and answered here.

use arrow::csv::QuoteStyle;
use datafusion::sql::sqlparser::ast::{CopyLegacyCsvOption, CopyLegacyOption, CopyOption, CopySource, CopyTarget, Statement};

/// A parsed `COPY … TO STDOUT`.
#[derive(Debug, PartialEq)]
pub struct CopyOut {
    pub query: String,
    pub csv: bool,
    pub header: bool,
    pub delimiter: u8,
    pub null: String,
}

/// `None` when `sql` is not a `COPY … TO STDOUT`; `Some(Err)` when it is one we cannot do.
pub fn parse(sql: &str) -> Option<Result<CopyOut, String>> {
    let Statement::Copy { source, to: true, target: CopyTarget::Stdout, options, legacy_options, .. } = crate::query::parse_single(sql, "copy")? else {
        return None;
    };
    let query = match source {
        CopySource::Query(query) => query.to_string(),
        CopySource::Table { table_name, columns } if columns.is_empty() => format!("SELECT * FROM {table_name}"),
        CopySource::Table { table_name, columns } => {
            let columns: Vec<String> = columns.iter().map(|c| c.to_string()).collect();
            format!("SELECT {} FROM {table_name}", columns.join(", "))
        }
    };
    let mut copy = CopyOut { query, csv: false, header: false, delimiter: b'\t', null: "\\N".into() };
    let mut delimiter = None;
    let mut null = None;
    for option in options {
        match option {
            CopyOption::Format(name) if name.value.eq_ignore_ascii_case("csv") => copy.csv = true,
            CopyOption::Format(name) if name.value.eq_ignore_ascii_case("text") => copy.csv = false,
            CopyOption::Header(h) => copy.header = h,
            CopyOption::Delimiter(d) if d.is_ascii() => delimiter = Some(d as u8),
            CopyOption::Null(n) => null = Some(n),
            other => return Some(Err(format!("COPY option {other} is not supported"))),
        }
    }
    for option in legacy_options {
        match option {
            CopyLegacyOption::Csv(csv_options) => {
                copy.csv = true;
                for o in csv_options {
                    match o {
                        CopyLegacyCsvOption::Header => copy.header = true,
                        other => return Some(Err(format!("COPY option {other} is not supported"))),
                    }
                }
            }
            CopyLegacyOption::Delimiter(d) if d.is_ascii() => delimiter = Some(d as u8),
            CopyLegacyOption::Null(n) => null = Some(n),
            other => return Some(Err(format!("COPY option {other} is not supported"))),
        }
    }
    if copy.csv {
        copy.delimiter = b',';
        copy.null = String::new();
    }
    copy.delimiter = delimiter.unwrap_or(copy.delimiter);
    copy.null = null.unwrap_or(copy.null);
    Some(Ok(copy))
}

/// Renders result batches as COPY lines.
pub fn render(copy: &CopyOut, schema: &arrow::datatypes::SchemaRef, batches: &[arrow::array::RecordBatch]) -> Result<Vec<u8>, arrow::error::ArrowError> {
    let (schema, batches) = crate::query::plain(schema, batches)?;
    let mut out = Vec::new();
    if copy.header && batches.iter().all(|b| b.num_rows() == 0) {
        let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        out.extend_from_slice(names.join(&(copy.delimiter as char).to_string()).as_bytes());
        out.push(b'\n');
    }
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

    #[test]
    fn parses_what_psql_sends() {
        let copy = parse("COPY  cpu TO STDOUT csv header").expect("a copy").expect("supported");
        assert_eq!(copy, CopyOut { query: "SELECT * FROM cpu".into(), csv: true, header: true, delimiter: b',', null: String::new() });
        let copy = parse("COPY (SELECT host FROM cpu) TO STDOUT").expect("a copy").expect("supported");
        assert_eq!((copy.query.as_str(), copy.csv, copy.delimiter, copy.null.as_str()), ("SELECT host FROM cpu", false, b'\t', "\\N"));
        let copy = parse("COPY cpu (host, time) TO STDOUT WITH (FORMAT csv, DELIMITER ';')").expect("a copy").expect("supported");
        assert_eq!((copy.query.as_str(), copy.delimiter), ("SELECT host, time FROM cpu", b';'));
        assert!(parse("SELECT 1").is_none());
        assert!(parse("COPY cpu TO '/tmp/x.csv'").is_none());
        assert!(parse("COPY cpu TO STDOUT WITH (FORMAT binary)").expect("a copy").is_err());
    }
}
