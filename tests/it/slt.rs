//! Runs `sql-tests/**/*.slt` against the real server through the Postgres protocol, each file
//! on a fresh database. A statement whose first line is `-- line protocol` (optionally followed
//! by `precision=s`, …) writes the rest of its text over HTTP line protocol instead.
//! After `control substitution on`, `$__DATABASE__` is the file's database.
//! `SUNDIAL_SLT=pattern` runs only files whose path contains the pattern.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use sqllogictest::{AsyncDB, DBOutput, DefaultColumnType};
use tokio_postgres::SimpleQueryMessage;

use crate::harness::{client, Server};

#[derive(Debug, thiserror::Error)]
enum SltError {
    #[error("{code}: {message}")]
    Db { code: String, message: String },
    #[error("{0}")]
    Other(String),
}

struct Sundial {
    pg: tokio_postgres::Client,
    http: String,
    db: String,
}

#[async_trait]
impl AsyncDB for Sundial {
    type Error = SltError;
    type ColumnType = DefaultColumnType;

    async fn run(&mut self, sql: &str) -> Result<DBOutput<Self::ColumnType>, Self::Error> {
        if let Some(rest) = sql.strip_prefix("-- line protocol") {
            let (options, body) = rest.split_once('\n').unwrap_or((rest, ""));
            let precision = options.trim().strip_prefix("precision=").unwrap_or("ns");
            let url = format!("{}/api/v3/write_lp?db={}&precision={precision}", self.http, self.db);
            let response = client()
                .post(url)
                .body(body.to_string())
                .send()
                .await
                .map_err(|e| SltError::Other(e.to_string()))?;
            let status = response.status().as_u16();
            let text = response.text().await.unwrap_or_default();
            return if status == 204 {
                Ok(DBOutput::StatementComplete(body.lines().count() as u64))
            } else {
                Err(SltError::Other(format!("line protocol write answered {status}: {text}")))
            };
        }
        let messages = self.pg.simple_query(sql).await.map_err(|e| match e.as_db_error() {
            Some(db) => SltError::Db {
                code: db.code().code().to_string(),
                message: db.message().to_string(),
            },
            None => SltError::Other(e.to_string()),
        })?;
        let mut rows = Vec::new();
        let mut columns = 0;
        let mut affected = None;
        for message in messages {
            match message {
                SimpleQueryMessage::Row(row) => {
                    columns = row.len();
                    rows.push(
                        (0..row.len())
                            .map(|i| match row.get(i) {
                                None => "NULL".to_string(),
                                Some("") => "(empty)".to_string(),
                                Some(v) => v.to_string(),
                            })
                            .collect(),
                    );
                }
                SimpleQueryMessage::RowDescription(description) => columns = description.len(),
                SimpleQueryMessage::CommandComplete(n) => affected = Some(n),
                _ => {}
            }
        }
        if columns == 0 && rows.is_empty() {
            return Ok(DBOutput::StatementComplete(affected.unwrap_or(0)));
        }
        Ok(DBOutput::Rows { types: vec![DefaultColumnType::Any; columns], rows })
    }

    fn engine_name(&self) -> &str {
        "sundial"
    }

    async fn shutdown(&mut self) {}
}

fn slt_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("sql-tests").flatten() {
        let path = entry.path();
        if path.is_dir() {
            slt_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "slt") {
            out.push(path);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_logic_tests() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("sql-tests");
    let mut files = Vec::new();
    slt_files(&root, &mut files);
    files.sort();
    let only = std::env::var("SUNDIAL_SLT").unwrap_or_default();
    files.retain(|f| f.to_string_lossy().contains(&only));
    assert!(!files.is_empty(), "no .slt files matched");
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&dir.path().join("data"), &[]);
    let mut failures = Vec::new();
    for (i, file) in files.iter().enumerate() {
        let db = format!("slt_{i}");
        let created = client()
            .post(server.url(&format!("/query?q=CREATE%20DATABASE%20{db}")))
            .send()
            .await
            .expect("create database");
        assert_eq!(created.status(), 200);
        let http = format!("http://{}", server.addr);
        let pg_addr = server.pg_addr.clone();
        let mut runner = sqllogictest::Runner::new(move || {
            let (http, db, pg_addr) = (http.clone(), db.clone(), pg_addr.clone());
            async move {
                let pg = crate::pg::connect_addr(&pg_addr, &db)
                    .await
                    .map_err(|e| SltError::Other(e.to_string()))?;
                Ok(Sundial { pg, http, db })
            }
        });
        runner.set_var("__DATABASE__".into(), format!("slt_{i}"));
        if let Err(e) = runner.run_file_async(file).await {
            failures.push(format!("{}: {e}", file.strip_prefix(&root).unwrap_or(file).display()));
        }
    }
    assert!(
        failures.is_empty(),
        "{} .slt file(s) failed:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}
