//! Retention statements, which sqlparser does not parse (or parses as something else):
//!
//! - `CREATE DATABASE [IF NOT EXISTS] name WITH (retention = '30d')`
//! - `ALTER DATABASE name SET retention = '7d'` (or `SET (retention = '7d')`), `… RESET retention`
//! - `ALTER TABLE name SET retention = '7d'`, `ALTER TABLE name RESET retention`
//!
//! A retention is written `'30d'`, `'12h'`, `INTERVAL '90 days'`, or `'none'` (forever);
//! `retention_period` is accepted for `retention`, as InfluxDB 3 names it. The value is checked
//! when the statement runs (`query::ddl`), so a bad one gets that error, not a syntax error.

use datafusion::sql::sqlparser::ast::Ident;
use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
use datafusion::sql::sqlparser::parser::{Parser, ParserError};
use datafusion::sql::sqlparser::tokenizer::Token;

use crate::alerts::sql::{expect_word, word};

/// One retention statement; `retention` is the value as written (`None`: `RESET`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Statement {
    CreateDatabase { name: String, if_not_exists: bool, retention: String },
    Alter { target: Target, retention: Option<String> },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Database(String),
    Table(String),
}

/// The retention statement `sql` is; `None` when it is none of them (it does not begin with
/// `ALTER DATABASE`, `ALTER TABLE … SET|RESET retention` or `CREATE DATABASE … WITH`).
pub fn parse(sql: &str) -> Option<Result<Statement, ParserError>> {
    let dialect = PostgreSqlDialect {};
    let mut p = Parser::new(&dialect).try_with_sql(sql).ok()?;
    if word(&mut p, "CREATE") {
        if !word(&mut p, "DATABASE") {
            return None;
        }
        let if_not_exists = word(&mut p, "IF");
        if if_not_exists && (!word(&mut p, "NOT") || !word(&mut p, "EXISTS")) {
            return None;
        }
        let name = name(&mut p).ok()?;
        // Without WITH, it is sqlparser's CREATE DATABASE.
        if !word(&mut p, "WITH") {
            return None;
        }
        return Some(create_options(&mut p).and_then(|retention| {
            end(&mut p)?;
            Ok(Statement::CreateDatabase { name, if_not_exists, retention })
        }));
    }
    if !word(&mut p, "ALTER") {
        return None;
    }
    let database = if word(&mut p, "DATABASE") {
        true
    } else if word(&mut p, "TABLE") {
        // Only the retention forms: other ALTER TABLEs keep sqlparser's parse (and refusal).
        let mut look = Parser::new(&dialect).try_with_sql(sql).ok()?;
        look.next_token();
        look.next_token();
        look.parse_object_name(false).ok()?;
        if !word(&mut look, "SET") && !word(&mut look, "RESET") {
            return None;
        }
        let _ = look.consume_token(&Token::LParen);
        if !word(&mut look, "RETENTION") && !word(&mut look, "RETENTION_PERIOD") {
            return None;
        }
        false
    } else {
        return None;
    };
    Some(alter(&mut p, database))
}

fn alter(p: &mut Parser<'_>, database: bool) -> Result<Statement, ParserError> {
    let name = name(p)?;
    let target = if database { Target::Database(name) } else { Target::Table(name) };
    let retention = if word(p, "SET") {
        let parenthesized = p.consume_token(&Token::LParen);
        option_name(p)?;
        if !p.consume_token(&Token::Eq) {
            word(p, "TO");
        }
        let value = value(p)?;
        if parenthesized {
            p.expect_token(&Token::RParen)?;
        }
        Some(value)
    } else if word(p, "RESET") {
        let parenthesized = p.consume_token(&Token::LParen);
        option_name(p)?;
        if parenthesized {
            p.expect_token(&Token::RParen)?;
        }
        None
    } else {
        return p.expected("SET retention = '…' or RESET retention", p.peek_token());
    };
    end(p)?;
    Ok(Statement::Alter { target, retention })
}

/// `(retention = '30d')` after `WITH`.
fn create_options(p: &mut Parser<'_>) -> Result<String, ParserError> {
    let parenthesized = p.consume_token(&Token::LParen);
    option_name(p)?;
    p.expect_token(&Token::Eq)?;
    let value = value(p)?;
    if parenthesized {
        p.expect_token(&Token::RParen)?;
    }
    Ok(value)
}

fn option_name(p: &mut Parser<'_>) -> Result<(), ParserError> {
    if word(p, "RETENTION") || word(p, "RETENTION_PERIOD") {
        Ok(())
    } else {
        expect_word(p, "RETENTION")
    }
}

/// `'30d'`, `INTERVAL '30 days'`, or an unquoted `none` / `infinite`.
fn value(p: &mut Parser<'_>) -> Result<String, ParserError> {
    if word(p, "INTERVAL") {
        return p.parse_literal_string();
    }
    let token = p.next_token();
    match token.token {
        Token::SingleQuotedString(s) => Ok(s),
        Token::Word(w) if w.quote_style.is_none() => Ok(w.value),
        _ => p.expected("a retention such as '30d' or 'none'", token),
    }
}

/// A database or table name, as written (the other DDL statements keep names as written too);
/// a table may be qualified by `public` only: another database is not this session's to change.
fn name(p: &mut Parser<'_>) -> Result<String, ParserError> {
    let parts = p.parse_object_name(false)?;
    let idents: Option<Vec<&Ident>> = parts.0.iter().map(|part| part.as_ident()).collect();
    match idents.as_deref() {
        Some([name]) => Ok(name.value.clone()),
        Some([schema, name]) if schema.value.eq_ignore_ascii_case("public") => {
            Ok(name.value.clone())
        }
        _ => Err(ParserError::ParserError(format!(
            "\"{parts}\" names an object of another database or schema: connect to that \
             database and name it alone"
        ))),
    }
}

fn end(p: &mut Parser<'_>) -> Result<(), ParserError> {
    while p.consume_token(&Token::SemiColon) {}
    if p.peek_token().token != Token::EOF {
        return p.expected("the end of the statement", p.peek_token());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(sql: &str) -> Statement {
        match parse(sql) {
            Some(Ok(statement)) => statement,
            other => panic!("{sql}: {other:?}"),
        }
    }

    #[test]
    fn the_retention_forms() {
        assert_eq!(
            ok("CREATE DATABASE metrics WITH (retention = '30d')"),
            Statement::CreateDatabase {
                name: "metrics".into(),
                if_not_exists: false,
                retention: "30d".into()
            }
        );
        assert_eq!(
            ok("create database if not exists \"My DB\" with (retention_period = INTERVAL '7 days');"),
            Statement::CreateDatabase {
                name: "My DB".into(),
                if_not_exists: true,
                retention: "7 days".into()
            }
        );
        assert_eq!(
            ok("ALTER DATABASE metrics SET retention = '7d'"),
            Statement::Alter {
                target: Target::Database("metrics".into()),
                retention: Some("7d".into())
            }
        );
        assert_eq!(
            ok("ALTER DATABASE metrics SET (retention = none)"),
            Statement::Alter {
                target: Target::Database("metrics".into()),
                retention: Some("none".into())
            }
        );
        assert_eq!(
            ok("ALTER TABLE public.cpu RESET retention"),
            Statement::Alter { target: Target::Table("cpu".into()), retention: None }
        );
        assert_eq!(
            ok("ALTER TABLE cpu SET retention TO '12h'"),
            Statement::Alter { target: Target::Table("cpu".into()), retention: Some("12h".into()) }
        );
    }

    #[test]
    fn other_statements_are_not_ours_and_bad_ones_are_errors() {
        for sql in [
            "CREATE DATABASE x",
            "ALTER TABLE cpu ADD COLUMN x INT",
            "SELECT 1",
            "ALTER ALERT a PAUSE",
            "",
        ] {
            assert!(parse(sql).is_none(), "{sql}");
        }
        for sql in [
            "CREATE DATABASE x WITH (retention '30d')",
            "CREATE DATABASE x WITH (owner = 'me')",
            "ALTER DATABASE x SET retention = 30",
            "ALTER DATABASE x SET retention = '1d' extra",
            "ALTER DATABASE x DROP",
            "ALTER TABLE staging.cpu SET retention = '1h'",
            "ALTER DATABASE a.b SET retention = '1h'",
        ] {
            assert!(matches!(parse(sql), Some(Err(_))), "{sql}: {:?}", parse(sql));
        }
    }
}
