//! Starts the real `sundial` binary on an ephemeral loopback port and talks to it as a client.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Server {
    pub child: Child,
    pub addr: String,
    /// The Postgres wire protocol address.
    pub pg_addr: String,
    pub data_dir: PathBuf,
    pub args: Vec<String>,
    stderr_path: PathBuf,
}

/// reqwest takes its TLS from rustls with the ring provider the server uses; it must be the
/// process's provider before a client is built.
pub fn tls_provider() {
    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
}

pub fn client() -> reqwest::Client {
    tls_provider();
    reqwest::Client::builder().timeout(Duration::from_secs(60)).build().expect("http client")
}

impl Server {
    /// Starts a server on `data_dir` with extra flags.
    pub fn start(data_dir: &Path, args: &[&str]) -> Server {
        Self::start_with_env(data_dir, args, &[])
    }

    pub fn start_with_env(data_dir: &Path, args: &[&str], envs: &[(&str, &str)]) -> Server {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let envs: Vec<(String, String)> =
            envs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Self::spawn(data_dir.to_path_buf(), args, envs).expect("server starts")
    }

    /// Starts the server; `Err(stderr)` if it exits before listening.
    pub fn spawn(
        data_dir: PathBuf,
        args: Vec<String>,
        envs: Vec<(String, String)>,
    ) -> Result<Server, String> {
        std::fs::create_dir_all(&data_dir).expect("data dir");
        let stderr_path = data_dir.with_extension(format!("stderr.{}", std::process::id()));
        let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
        let mut command = Command::new(env!("CARGO_BIN_EXE_sundial"));
        command
            .arg("serve")
            .arg("--http-bind")
            .arg("127.0.0.1:0")
            .arg("--pg-bind")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(&data_dir)
            .args(&args)
            .env("SUNDIAL_LOG", "info")
            .env_remove("SUNDIAL_CRASH_POINT")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr);
        for (k, v) in &envs {
            command.env(k, v);
        }
        let mut child = command.spawn().expect("spawn sundial");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // The postgres line comes first; the http line means both are listening.
            let mut pg = String::new();
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("sundial postgres listening on ") {
                    pg = addr.to_string();
                }
                if let Some(addr) = line.strip_prefix("sundial http listening on ") {
                    let _ = tx.send((addr.to_string(), pg.clone()));
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok((addr, pg_addr)) => Ok(Server { child, addr, pg_addr, data_dir, args, stderr_path }),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(std::fs::read_to_string(&stderr_path).unwrap_or_default())
            }
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// SIGKILL: no chance to sync or clean up.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait; returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").arg("-TERM").arg(&pid).status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill9();
        None
    }

    /// Waits for the process to exit by itself (a crash point), up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// A new server on the same data directory with the same flags (minus the environment).
    pub fn restart(&self) -> Server {
        let args = self.args.clone();
        Self::spawn(self.data_dir.clone(), args, Vec::new()).expect("server restarts")
    }

    pub async fn write(
        &self,
        path_and_query: &str,
        body: impl Into<reqwest::Body>,
    ) -> (u16, String) {
        let response =
            client().post(self.url(path_and_query)).body(body).send().await.expect("write request");
        let status = response.status().as_u16();
        (status, response.text().await.unwrap_or_default())
    }

    pub async fn query_raw(&self, db: &str, sql: &str, format: &str) -> (u16, String) {
        let url = format!(
            "{}?db={}&format={}&q={}",
            self.url("/api/v3/query_sql"),
            enc(db),
            format,
            enc(sql)
        );
        let response = client().get(url).send().await.expect("query request");
        let status = response.status().as_u16();
        (status, response.text().await.unwrap_or_default())
    }

    /// Runs a statement by POST (as statements that change data must be sent).
    pub async fn execute(&self, db: &str, sql: &str) -> (u16, String) {
        let body = serde_json::json!({ "db": db, "q": sql, "format": "json" });
        let response = client()
            .post(self.url("/api/v3/query_sql"))
            .json(&body)
            .send()
            .await
            .expect("statement request");
        let status = response.status().as_u16();
        (status, response.text().await.unwrap_or_default())
    }

    /// Runs SQL and returns the rows as JSON objects; panics on an error status.
    pub async fn query(&self, db: &str, sql: &str) -> Vec<serde_json::Value> {
        let (status, body) = self.query_raw(db, sql, "json").await;
        assert_eq!(status, 200, "query {sql:?} failed: {body}");
        serde_json::from_str(&body).expect("json rows")
    }

    /// `SELECT count(*)` as a number.
    pub async fn count(&self, db: &str, sql: &str) -> i64 {
        let rows = self.query(db, sql).await;
        rows[0]
            .as_object()
            .and_then(|o| o.values().next())
            .and_then(|v| v.as_i64())
            .expect("one count")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.stderr_path);
    }
}

pub fn enc(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// Polls `check` until it holds or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Parquet files under the server's object store.
pub fn parquet_files(data_dir: &Path) -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "parquet") {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    walk(&data_dir.join("objects"), &mut out);
    out.sort();
    out
}
