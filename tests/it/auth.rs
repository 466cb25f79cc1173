//! Authentication and TLS with real clients: tokens over HTTP (Bearer, Token, Basic, v1 `p=`),
//! scopes, the token API and CLI, SCRAM-SHA-256 over Postgres (tokio-postgres, psql), TLS on
//! both listeners (curl, psql `verify-full`, psycopg `sslmode=require`), and the refusal to
//! listen on the network without authentication.

use std::process::Command;

use serde_json::json;
use tokio_postgres::error::SqlState;

use crate::harness::{client, Server};

fn sundial(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_sundial")).args(args).output().expect("run sundial")
}

/// `sundial token create` beside the running server; returns the token.
fn create_token(data: &std::path::Path, name: &str, permissions: &[&str]) -> String {
    let mut args =
        vec!["token", "--data-dir", data.to_str().expect("utf-8"), "create", "--name", name];
    args.extend_from_slice(permissions);
    let out = sundial(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8").trim().to_string()
}

async fn status(request: reqwest::RequestBuilder) -> (u16, String) {
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    (status, response.text().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_tokens_scopes_and_revocation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let server = Server::start(&data, &["--auth", "on"]);
    let admin = create_token(&data, "admin", &["--admin"]);
    let write_url = server.url("/api/v3/write_lp?db=db");

    let (code, body) = status(client().post(&write_url).body("m v=1 1")).await;
    assert_eq!(code, 401, "{body}");
    let response = client().post(&write_url).body("m v=1 1").send().await.expect("request");
    assert!(response.headers().contains_key("www-authenticate"));
    assert_eq!(
        status(client().post(&write_url).bearer_auth("sdl_nope").body("m v=1 1")).await.0,
        401
    );
    assert_eq!(status(client().post(&write_url).bearer_auth(&admin).body("m v=1 1")).await.0, 204);
    // Health and ping stay open (load balancers, Telegraf's probe).
    assert_eq!(status(client().get(server.url("/health"))).await.0, 200);
    assert_eq!(status(client().get(server.url("/ping"))).await.0, 204);

    // The token API (admin only): a writer for Telegraf, a reader for Grafana.
    let (code, body) = status(
        client()
            .post(server.url("/api/v3/tokens"))
            .bearer_auth(&admin)
            .json(&json!({ "name": "telegraf", "permissions": ["write:db"] })),
    )
    .await;
    assert_eq!(code, 201, "{body}");
    let telegraf = serde_json::from_str::<serde_json::Value>(&body).expect("json")["token"]
        .as_str()
        .expect("token")
        .to_string();
    let grafana = create_token(&data, "grafana", &["--read", "db"]);

    // Every way clients send a token.
    let v1 = format!("/write?db=db&u=telegraf&p={telegraf}");
    assert_eq!(status(client().post(server.url(&v1)).body("m v=2 2")).await.0, 204);
    let basic = client().post(server.url("/write?db=db")).basic_auth("telegraf", Some(&telegraf));
    assert_eq!(status(basic.body("m v=3 3")).await.0, 204);
    let v2 = client()
        .post(server.url("/api/v2/write?bucket=db"))
        .header("Authorization", format!("Token {telegraf}"));
    assert_eq!(status(v2.body("m v=4 4")).await.0, 204);

    // Scopes: the writer writes only to its database and reads nothing; the reader reads.
    let other = client().post(server.url("/api/v3/write_lp?db=other")).bearer_auth(&telegraf);
    let (code, body) = status(other.body("m v=1 1")).await;
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("write permission on database") && body.contains("other"), "{body}");
    let query = |token: &str, sql: &str| {
        client()
            .post(server.url("/api/v3/query_sql"))
            .bearer_auth(token)
            .json(&json!({ "db": "db", "q": sql }))
    };
    assert_eq!(status(query(&telegraf, "SELECT count(*) FROM m")).await.0, 403);
    // Writing does not include reading: an INSERT of values is fine, one from a SELECT is not.
    assert_eq!(status(query(&telegraf, "INSERT INTO m (v) VALUES (5)")).await.0, 200);
    assert_eq!(status(query(&telegraf, "INSERT INTO m (v) SELECT v FROM m")).await.0, 403);
    let (code, body) = status(query(&grafana, "SELECT count(*) AS n FROM m")).await;
    assert_eq!((code, body.as_str()), (200, r#"[{"n":5}]"#));
    for sql in [
        "INSERT INTO m (v) VALUES (5)",
        "DROP TABLE m",
        "CREATE TABLE t (host TEXT, v DOUBLE PRECISION, PRIMARY KEY (host))",
        "CREATE DATABASE elsewhere",
    ] {
        assert_eq!(status(query(&grafana, sql)).await.0, 403, "{sql}");
    }
    assert_eq!(
        status(client().post(&write_url).bearer_auth(&grafana).body("m v=1 1")).await.0,
        403
    );
    let drop = client().post(server.url("/query?q=DROP%20DATABASE%20db")).bearer_auth(&telegraf);
    assert_eq!(status(drop).await.0, 403, "dropping a database takes admin");
    let show = client().get(server.url("/query?q=SHOW%20DATABASES")).bearer_auth(&grafana);
    let (code, body) = status(show).await;
    assert_eq!(code, 200);
    assert!(body.contains("\"db\"") && !body.contains("other"), "{body}");

    // Listing shows names, never secrets; only to an admin.
    assert_eq!(
        status(client().get(server.url("/api/v3/tokens")).bearer_auth(&grafana)).await.0,
        403
    );
    let (code, body) = status(client().get(server.url("/api/v3/tokens")).bearer_auth(&admin)).await;
    assert_eq!(code, 200);
    assert!(body.contains("telegraf") && !body.contains(&telegraf), "{body}");
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(data.join("auth/tokens.json")).expect("token file");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600, "only the server's user reads it");
    let stored = std::fs::read_to_string(data.join("auth/tokens.json")).expect("token file");
    for secret in [&admin, &telegraf, &grafana] {
        assert!(!stored.contains(secret.as_str()), "tokens are stored hashed");
    }

    // Revoked: refused from the next request on (HTTP API and CLI alike).
    let revoke = client().delete(server.url("/api/v3/tokens/telegraf")).bearer_auth(&admin);
    assert_eq!(status(revoke).await.0, 204);
    assert_eq!(status(client().post(server.url(&v1)).body("m v=9 9")).await.0, 401);
    let out = sundial(&[
        "token",
        "--data-dir",
        data.to_str().expect("utf-8"),
        "revoke",
        "--name",
        "grafana",
    ]);
    assert!(out.status.success());
    assert_eq!(status(query(&grafana, "SELECT 1")).await.0, 401);

    // Durable: the admin token still works after a restart.
    let mut server = server;
    assert_eq!(server.terminate(), Some(0));
    let server = server.restart();
    let again = client()
        .post(server.url("/api/v3/query_sql"))
        .bearer_auth(&admin)
        .json(&json!({ "db": "db", "q": "SELECT count(*) AS n FROM m" }));
    let (code, body) = status(again).await;
    assert_eq!((code, body.as_str()), (200, r#"[{"n":5}]"#));
    let out = sundial(&["token", "--data-dir", data.to_str().expect("utf-8"), "list"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "admin\tadmin\n");
}

async fn pg_connect(
    server: &Server,
    user: &str,
    password: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (host, port) = server.pg_addr.rsplit_once(':').expect("host:port");
    let config = format!("host={host} port={port} user={user} password={password} dbname=db");
    let (client, connection) = tokio_postgres::connect(&config, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_scram_with_tokens() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let server = Server::start(&data, &["--auth", "on"]);
    let writer = create_token(&data, "writer", &["--write", "db", "--read", "db"]);
    let reader = create_token(&data, "reader", &["--read", "db"]);
    let stranger = create_token(&data, "stranger", &["--read", "elsewhere"]);
    let (code, _) = status(
        client()
            .post(server.url("/api/v3/write_lp?db=db"))
            .bearer_auth(&writer)
            .body("m,host=a v=1 1"),
    )
    .await;
    assert_eq!(code, 204);

    let pg = pg_connect(&server, "reader", &reader).await.expect("reader logs in");
    let rows = pg.query("SELECT host FROM m", &[]).await.expect("query");
    assert_eq!(rows.len(), 1);
    let error =
        pg.simple_query("INSERT INTO m (host, v) VALUES ('b', 2)").await.expect_err("read only");
    assert_eq!(error.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE), "{error:?}");
    let error =
        pg.execute("INSERT INTO m (host, v) VALUES ('b', 2)", &[]).await.expect_err("extended too");
    assert_eq!(error.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE), "{error:?}");
    let error = pg.simple_query("DROP TABLE m").await.expect_err("read only");
    assert_eq!(error.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE));

    let pg = pg_connect(&server, "writer", &writer).await.expect("writer logs in");
    assert_eq!(
        pg.execute("INSERT INTO m (host, v) VALUES ('b', 2)", &[]).await.expect("insert"),
        1
    );

    // A write-only token runs session commands around its INSERTs (psycopg2 sends BEGIN).
    let ingest = create_token(&data, "ingest", &["--write", "db"]);
    let pg = pg_connect(&server, "ingest", &ingest).await.expect("ingest logs in");
    pg.batch_execute("BEGIN; SET application_name = 'x'; SAVEPOINT s; RELEASE SAVEPOINT s")
        .await
        .expect("session commands need no read permission");
    pg.execute("INSERT INTO m (host, v) VALUES ('c', 3)", &[]).await.expect("insert");
    pg.batch_execute("COMMIT").await.expect("commit");

    // A token revoked and created again under the same name does not carry old sessions over.
    let rotated = create_token(&data, "rotated", &["--read", "db"]);
    let old = pg_connect(&server, "rotated", &rotated).await.expect("logs in");
    let data_dir = data.to_str().expect("utf-8");
    assert!(sundial(&["token", "--data-dir", data_dir, "revoke", "--name", "rotated"])
        .status
        .success());
    let _new = create_token(&data, "rotated", &["--read", "db"]);
    let error = old.simple_query("SELECT 1").await.expect_err("old secret");
    assert_eq!(error.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE), "{error:?}");

    // Revoking cuts off sessions already open.
    let open = pg_connect(&server, "reader", &reader).await.expect("reader logs in");
    let revoked = create_token(&data, "brief", &["--read", "db"]);
    let brief = pg_connect(&server, "brief", &revoked).await.expect("brief logs in");
    brief.simple_query("SELECT 1").await.expect("allowed");
    let data_dir = data.to_str().expect("utf-8");
    assert!(sundial(&["token", "--data-dir", data_dir, "revoke", "--name", "brief"])
        .status
        .success());
    let error = brief.simple_query("SELECT 1").await.expect_err("revoked");
    assert_eq!(error.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE), "{error:?}");
    open.simple_query("SELECT 1").await.expect("others go on");

    for (user, password) in
        [("reader", "wrong"), ("reader", writer.as_str()), ("nobody", reader.as_str())]
    {
        let Err(error) = pg_connect(&server, user, password).await else { panic!("refused") };
        assert_eq!(error.code(), Some(&SqlState::INVALID_PASSWORD), "{user}: {error:?}");
    }
    let Err(error) = pg_connect(&server, "stranger", &stranger).await else {
        panic!("no access to db")
    };
    assert_eq!(error.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE), "{error:?}");

    // psql with the token as password.
    let (host, port) = server.pg_addr.rsplit_once(':').expect("host:port");
    let out = Command::new("psql")
        .args([
            "-X",
            "-At",
            "-h",
            host,
            "-p",
            port,
            "-U",
            "reader",
            "-d",
            "db",
            "-c",
            "SELECT count(*) FROM m",
        ])
        .env("PGPASSWORD", &reader)
        .output()
        .expect("psql");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "3",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new("psql")
        .args([
            "-X", "-At", "-w", "-h", host, "-p", port, "-U", "reader", "-d", "db", "-c", "SELECT 1",
        ])
        .output()
        .expect("psql");
    assert!(!out.status.success(), "no password, no login");
}

/// A self-signed certificate for localhost and 127.0.0.1, made with the openssl CLI.
fn certificate(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
        ])
        .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    (cert, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_on_both_listeners() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let (cert, key) = certificate(dir.path());
    let (cert_s, key_s) = (cert.to_str().expect("utf-8"), key.to_str().expect("utf-8"));
    let server = Server::start(&data, &["--auth", "on", "--tls-cert", cert_s, "--tls-key", key_s]);
    let token = create_token(&data, "ops", &["--admin"]);
    let port = server.addr.rsplit_once(':').expect("host:port").1.to_string();

    // HTTPS with curl, verifying the certificate; plain HTTP gets nowhere.
    let https = format!("https://localhost:{port}");
    let curl = |args: &[&str]| {
        Command::new("curl")
            .args(["-s", "-S", "--max-time", "10"])
            .args(args)
            .output()
            .expect("curl")
    };
    let auth = format!("Authorization: Bearer {token}");
    let out = curl(&[
        "--cacert",
        cert_s,
        "-H",
        &auth,
        "--data-binary",
        "m v=1 1",
        "-w",
        "%{http_code}",
        &format!("{https}/api/v3/write_lp?db=db"),
    ]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "204",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = curl(&[
        "--cacert",
        cert_s,
        "-H",
        &auth,
        &format!("{https}/api/v3/query_sql?db=db&q=SELECT%20count(*)%20AS%20n%20FROM%20m"),
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), r#"[{"n":1}]"#);
    let out = curl(&["-w", "%{http_code}", &format!("http://127.0.0.1:{port}/health")]);
    assert_ne!(String::from_utf8_lossy(&out.stdout), "200", "no plain http");

    // Postgres: psql verify-full (host name checked), sslmode=disable refused; psycopg.
    let (host, pg_port) = server.pg_addr.rsplit_once(':').expect("host:port");
    assert_eq!(host, "127.0.0.1");
    let psql = |conninfo: String| {
        Command::new("psql")
            .args(["-X", "-At", "-c", "SELECT count(*) FROM m", &conninfo])
            .env("PGPASSWORD", &token)
            .output()
            .expect("psql")
    };
    let out = psql(format!(
        "host=localhost port={pg_port} user=ops dbname=db sslmode=verify-full sslrootcert={cert_s}"
    ));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "1",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = psql(format!("host=localhost port={pg_port} user=ops dbname=db sslmode=disable"));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("only TLS"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let script = format!(
        "import psycopg\nwith psycopg.connect('host=127.0.0.1 port={pg_port} user=ops dbname=db sslmode=require', password='{token}') as c:\n    print(c.execute('SELECT count(*) FROM m').fetchone()[0], c.info.pgconn.ssl_in_use)\n"
    );
    let out = Command::new("python3").arg("-c").arg(script).output().expect("python3");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "1 True",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn no_network_listener_without_an_auth_decision() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let out = Command::new(env!("CARGO_BIN_EXE_sundial"))
        .args(["serve", "--http-bind", "0.0.0.0:0", "--pg-bind", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .output()
        .expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("without authentication") && stderr.contains("--auth on"), "{stderr}");
}

/// Alert rules make the server send requests to addresses they name: only an admin creates,
/// alters or drops them; a reader sees them (without their secrets).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alert_statements_need_an_admin_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let server = Server::start(&data, &["--auth", "on"]);
    let admin = create_token(&data, "admin", &["--admin"]);
    let writer = create_token(&data, "writer", &["--write", "db", "--read", "db"]);
    let reader = create_token(&data, "reader", &["--read", "db"]);
    let write_url = server.url("/api/v3/write_lp?db=db");
    assert_eq!(
        status(client().post(&write_url).bearer_auth(&admin).body("m,h=a v=1 1")).await.0,
        204
    );
    let statement = |token: &str, q: &str| {
        client()
            .post(server.url("/api/v3/query_sql"))
            .bearer_auth(token)
            .json(&json!({ "db": "db", "q": q }))
    };
    let create = "CREATE ALERT a ON (SELECT h, v FROM m) EVERY '1s' NOTIFY (WEBHOOK \
                  'http://169.254.169.254/latest/meta-data')";
    for token in [&writer, &reader] {
        let (code, body) = status(statement(token, create)).await;
        assert_eq!(code, 403, "{body}");
        assert!(body.contains("admin"), "{body}");
    }
    assert_eq!(status(statement(&admin, create)).await.0, 200);
    for q in ["ALTER ALERT a PAUSE", "DROP ALERT a"] {
        assert_eq!(status(statement(&writer, q)).await.0, 403, "{q}");
    }
    let (code, body) = status(
        client()
            .get(server.url(&format!(
                "/api/v3/query_sql?db=db&q={}",
                crate::harness::enc("SELECT name, targets FROM system.alert_rules")
            )))
            .bearer_auth(&reader),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("169.254.169.254") && !body.contains("meta-data"), "{body}");
    // Over Postgres: 42501 for the writer.
    let client = pg_connect(&server, "writer", &writer).await.expect("connect");
    let error = client.batch_execute("DROP ALERT a").await.expect_err("refused");
    assert_eq!(error.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE));
    assert_eq!(status(statement(&admin, "DROP ALERT a")).await.0, 200);
}
