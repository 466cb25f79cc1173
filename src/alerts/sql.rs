//! `CREATE ALERT`, `DROP ALERT` and `ALTER ALERT … PAUSE | RESUME`, parsed with sqlparser's
//! tokenizer and parser (the rule's query is parsed as any other query); sqlparser has no such
//! statements. What the pieces mean is checked in `ddl`.

use datafusion::sql::sqlparser::ast::{Ident, Query};
use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
use datafusion::sql::sqlparser::parser::{Parser, ParserError};
use datafusion::sql::sqlparser::tokenizer::Token;

/// One alert statement.
#[derive(Debug, Clone)]
pub enum Statement {
    Create(Box<Create>),
    Drop { names: Vec<String>, if_exists: bool },
    Alter { name: String, paused: bool },
}

/// `CREATE ALERT`, as written (durations and policies still text).
#[derive(Debug, Clone)]
pub struct Create {
    pub if_not_exists: bool,
    pub name: String,
    pub query: Box<Query>,
    pub every: String,
    pub for_: Option<String>,
    pub keep_firing_for: Option<String>,
    pub labels: Vec<(String, String)>,
    pub annotations: Vec<(String, String)>,
    pub no_data: Option<String>,
    pub on_error: Option<String>,
    pub targets: Vec<RawTarget>,
}

/// One `NOTIFY` target: its kind (`WEBHOOK`, `ALERTMANAGER`, `EMAIL`, or whatever was
/// written), its address and its `WITH (…)` options.
#[derive(Debug, Clone)]
pub struct RawTarget {
    pub kind: String,
    pub address: String,
    pub options: Vec<(String, String)>,
}

/// Whether the next token is the word `word` (unquoted, any case); consumes it if so.
pub(crate) fn word(p: &mut Parser<'_>, word: &str) -> bool {
    let is = matches!(&p.peek_token().token, Token::Word(w)
        if w.quote_style.is_none() && w.value.eq_ignore_ascii_case(word));
    if is {
        p.next_token();
    }
    is
}

pub(crate) fn expect_word(p: &mut Parser<'_>, w: &str) -> Result<(), ParserError> {
    if word(p, w) {
        Ok(())
    } else {
        p.expected(w, p.peek_token())
    }
}

/// A name as DataFusion resolves it: unquoted names are lowercased.
fn name_of(ident: Ident) -> String {
    if ident.quote_style.is_some() {
        ident.value
    } else {
        ident.value.to_lowercase()
    }
}

/// A duration: `'30s'` or `INTERVAL '30 seconds'`.
fn duration(p: &mut Parser<'_>) -> Result<String, ParserError> {
    word(p, "INTERVAL");
    p.parse_literal_string()
}

/// `(k = 'v', …)`; keys are label names (unquoted words or quoted identifiers).
fn pairs(p: &mut Parser<'_>) -> Result<Vec<(String, String)>, ParserError> {
    p.expect_token(&Token::LParen)?;
    if p.consume_token(&Token::RParen) {
        return Ok(Vec::new());
    }
    let pairs = p.parse_comma_separated(|p| {
        let key = p.parse_identifier()?.value;
        p.expect_token(&Token::Eq)?;
        let value = option_value(p)?;
        Ok((key, value))
    })?;
    p.expect_token(&Token::RParen)?;
    Ok(pairs)
}

/// An option's value: a string, a number, or a word (`true`, `false`).
fn option_value(p: &mut Parser<'_>) -> Result<String, ParserError> {
    let token = p.next_token();
    match token.token {
        Token::SingleQuotedString(s) => Ok(s),
        Token::Number(n, _) => Ok(n),
        Token::Word(w) => Ok(w.value),
        _ => p.expected("a string, a number, true or false", token),
    }
}

fn target(p: &mut Parser<'_>) -> Result<RawTarget, ParserError> {
    let token = p.next_token();
    let kind = match token.token {
        Token::Word(w) => w.value.to_ascii_uppercase(),
        _ => return p.expected("WEBHOOK, ALERTMANAGER or EMAIL", token),
    };
    let address = p.parse_literal_string()?;
    let options = if word(p, "WITH") { pairs(p)? } else { Vec::new() };
    Ok(RawTarget { kind, address, options })
}

fn create(p: &mut Parser<'_>) -> Result<Create, ParserError> {
    let if_not_exists = if word(p, "IF") {
        expect_word(p, "NOT")?;
        expect_word(p, "EXISTS")?;
        true
    } else {
        false
    };
    let name = name_of(p.parse_identifier()?);
    expect_word(p, "ON")?;
    p.expect_token(&Token::LParen)?;
    let query = p.parse_query()?;
    p.expect_token(&Token::RParen)?;
    expect_word(p, "EVERY")?;
    let every = duration(p)?;
    let mut create = Create {
        if_not_exists,
        name,
        query,
        every,
        for_: None,
        keep_firing_for: None,
        labels: Vec::new(),
        annotations: Vec::new(),
        no_data: None,
        on_error: None,
        targets: Vec::new(),
    };
    let mut notify = false;
    loop {
        let once = |seen: bool, clause: &str, p: &Parser<'_>| {
            if seen {
                Err(ParserError::ParserError(format!(
                    "{clause} is given twice at {}",
                    p.peek_token().span.start
                )))
            } else {
                Ok(())
            }
        };
        if word(p, "FOR") {
            once(create.for_.is_some(), "FOR", p)?;
            create.for_ = Some(duration(p)?);
        } else if word(p, "KEEP") {
            expect_word(p, "FIRING")?;
            expect_word(p, "FOR")?;
            once(create.keep_firing_for.is_some(), "KEEP FIRING FOR", p)?;
            create.keep_firing_for = Some(duration(p)?);
        } else if word(p, "LABELS") {
            once(!create.labels.is_empty(), "LABELS", p)?;
            create.labels = pairs(p)?;
        } else if word(p, "ANNOTATIONS") {
            once(!create.annotations.is_empty(), "ANNOTATIONS", p)?;
            create.annotations = pairs(p)?;
        } else if word(p, "NO") {
            expect_word(p, "DATA")?;
            expect_word(p, "AS")?;
            once(create.no_data.is_some(), "NO DATA AS", p)?;
            create.no_data = Some(p.parse_identifier()?.value.to_ascii_lowercase());
        } else if word(p, "ERROR") {
            expect_word(p, "AS")?;
            once(create.on_error.is_some(), "ERROR AS", p)?;
            create.on_error = Some(p.parse_identifier()?.value.to_ascii_lowercase());
        } else if word(p, "NOTIFY") {
            once(notify, "NOTIFY", p)?;
            notify = true;
            p.expect_token(&Token::LParen)?;
            create.targets = p.parse_comma_separated(target)?;
            p.expect_token(&Token::RParen)?;
        } else {
            break;
        }
    }
    if !notify {
        return p.expected(
            "FOR, KEEP FIRING FOR, LABELS, ANNOTATIONS, NO DATA AS, ERROR AS or NOTIFY (…)",
            p.peek_token(),
        );
    }
    Ok(create)
}

fn statement(p: &mut Parser<'_>) -> Result<Statement, ParserError> {
    let statement = if word(p, "CREATE") {
        expect_word(p, "ALERT")?;
        Statement::Create(Box::new(create(p)?))
    } else if word(p, "DROP") {
        expect_word(p, "ALERT")?;
        let if_exists = if word(p, "IF") {
            expect_word(p, "EXISTS")?;
            true
        } else {
            false
        };
        let names = p.parse_comma_separated(|p| p.parse_identifier().map(name_of))?;
        Statement::Drop { names, if_exists }
    } else {
        expect_word(p, "ALTER")?;
        expect_word(p, "ALERT")?;
        let name = name_of(p.parse_identifier()?);
        let paused = if word(p, "PAUSE") {
            true
        } else if word(p, "RESUME") {
            false
        } else {
            return p.expected("PAUSE or RESUME", p.peek_token());
        };
        Statement::Alter { name, paused }
    };
    while p.consume_token(&Token::SemiColon) {}
    if p.peek_token().token != Token::EOF {
        return p.expected("the end of the statement", p.peek_token());
    }
    Ok(statement)
}

/// The alert statement `sql` is, `None` when it is none (it does not begin with `CREATE
/// ALERT`, `DROP ALERT` or `ALTER ALERT`).
pub fn parse(sql: &str) -> Option<Result<Statement, ParserError>> {
    let dialect = PostgreSqlDialect {};
    let mut p = match Parser::new(&dialect).try_with_sql(sql) {
        Ok(p) => p,
        Err(_) => return None,
    };
    let first = p.next_token();
    let second = p.next_token();
    let is_word = |t: &Token, w: &str| matches!(t, Token::Word(x) if x.quote_style.is_none() && x.value.eq_ignore_ascii_case(w));
    let alert = ["CREATE", "DROP", "ALTER"].iter().any(|w| is_word(&first.token, w))
        && is_word(&second.token, "ALERT");
    if !alert {
        return None;
    }
    p.prev_token();
    p.prev_token();
    Some(statement(&mut p))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create(sql: &str) -> Create {
        match parse(sql) {
            Some(Ok(Statement::Create(c))) => *c,
            other => panic!("{sql}: {other:?}"),
        }
    }

    #[test]
    fn create_alert_in_full() {
        let c = create(
            "CREATE ALERT IF NOT EXISTS High_CPU ON (SELECT host, avg(v) AS a FROM cpu GROUP BY \
             host HAVING avg(v) > 90) EVERY '10s' FOR INTERVAL '30 seconds' KEEP FIRING FOR \
             '20s' LABELS (severity = 'page', team = 'db') ANNOTATIONS (summary = '{{host}} at \
             {{a}}') NO DATA AS nodata ERROR AS keep_last NOTIFY (WEBHOOK 'http://h:1/x' WITH \
             (timeout = '2s', send_resolved = false), ALERTMANAGER 'http://am:9093');",
        );
        assert!(c.if_not_exists);
        assert_eq!(c.name, "high_cpu");
        assert!(c.query.to_string().starts_with("SELECT host, avg(v) AS a FROM cpu"));
        assert_eq!(c.every, "10s");
        assert_eq!(c.for_.as_deref(), Some("30 seconds"));
        assert_eq!(c.keep_firing_for.as_deref(), Some("20s"));
        assert_eq!(c.labels, [("severity".into(), "page".into()), ("team".into(), "db".into())]);
        assert_eq!(c.annotations[0].1, "{{host}} at {{a}}");
        assert_eq!(c.no_data.as_deref(), Some("nodata"));
        assert_eq!(c.on_error.as_deref(), Some("keep_last"));
        assert_eq!(c.targets.len(), 2);
        assert_eq!(c.targets[0].kind, "WEBHOOK");
        assert_eq!(c.targets[0].options[1], ("send_resolved".into(), "false".into()));
        assert_eq!(c.targets[1].address, "http://am:9093");
    }

    #[test]
    fn other_statements_and_errors() {
        assert!(parse("SELECT 1").is_none());
        assert!(parse("CREATE TABLE alert (x int)").is_none());
        assert!(matches!(parse("drop alert if exists a, \"B\""),
            Some(Ok(Statement::Drop { names, if_exists: true })) if names == ["a", "B"]));
        assert!(matches!(
            parse("ALTER ALERT a PAUSE"),
            Some(Ok(Statement::Alter { paused: true, .. }))
        ));
        assert!(matches!(
            parse("ALTER ALERT a RESUME;"),
            Some(Ok(Statement::Alter { paused: false, .. }))
        ));
        for bad in [
            "ALTER ALERT a STOP",
            "CREATE ALERT a ON (SELECT 1) EVERY '1s'",
            "CREATE ALERT a ON SELECT 1 EVERY '1s' NOTIFY (WEBHOOK 'http://x')",
            "CREATE ALERT a ON (SELECT 1) EVERY '1s' FOR '1s' FOR '2s' NOTIFY (WEBHOOK 'x')",
            "CREATE ALERT a ON (SELECT 1) EVERY '1s' NOTIFY (WEBHOOK 'x') trailing",
            "CREATE ALERT a ON (SELECT 1) EVERY 5 NOTIFY (WEBHOOK 'x')",
        ] {
            assert!(matches!(parse(bad), Some(Err(_))), "{bad}");
        }
    }
}
