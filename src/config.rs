//! Command line and environment: every setting has a flag, an environment variable and a
//! default that says why. Sizes take units (`512MiB`), durations too (`10m`, `1d`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(name = "sundial", version, about = "Embedded columnar time-series database server")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start the server.
    Serve(Box<ServeArgs>),
    /// Create, list and revoke access tokens (works beside a running server).
    Token(TokenArgs),
}

#[derive(Debug, Clone, clap::Args)]
pub struct TokenArgs {
    /// The server's data directory (tokens live in `{data-dir}/auth/tokens.json`).
    #[arg(long, env = "SUNDIAL_DATA_DIR", default_value = "./sundial-data", global = true)]
    pub data_dir: PathBuf,
    #[command(subcommand)]
    pub action: TokenAction,
}

#[derive(Debug, Clone, Subcommand)]
pub enum TokenAction {
    /// Create a token and print it (it is shown only once).
    Create {
        /// The token's name: also the Postgres user name that logs in with it.
        #[arg(long)]
        name: String,
        /// Everything, including other tokens.
        #[arg(long)]
        admin: bool,
        /// Databases it may query (`*`: all); repeat or separate with commas.
        #[arg(long, value_delimiter = ',')]
        read: Vec<String>,
        /// Databases it may write to and create tables in (`*`: all).
        #[arg(long, value_delimiter = ',')]
        write: Vec<String>,
    },
    /// List token names and permissions.
    List,
    /// Revoke a token: it is refused from the next request on.
    Revoke {
        #[arg(long)]
        name: String,
    },
}

/// Whether clients must present a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AuthMode {
    /// Off when both listeners are on loopback addresses; otherwise refuse to start until
    /// `--auth on` or `--auth off` says which.
    Auto,
    /// Every request and connection needs a token (`sundial token create`).
    On,
    /// Anyone who reaches the listeners may do anything.
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WalSync {
    /// Acknowledge a write only after fdatasync: survives power loss.
    Fsync,
    /// Acknowledge after write(2), never sync: survives a process crash, not power loss.
    None,
}

#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Directory for the WAL (and, by default, the object store).
    #[arg(long, env = "SUNDIAL_DATA_DIR", default_value = "./sundial-data")]
    pub data_dir: PathBuf,

    /// Object store for Parquet files and the manifest: `file:///abs/dir` or
    /// `s3://bucket[/prefix]` (credentials and other settings from the standard `AWS_*`
    /// variables, or the `--s3-*` flags). Default: `{data-dir}/objects`, so one directory
    /// holds everything. The WAL is always in the data directory.
    #[arg(long, env = "SUNDIAL_OBJECT_STORE")]
    pub object_store: Option<String>,

    /// S3 endpoint for S3-compatible stores (MinIO, SeaweedFS, Ceph, R2); else `AWS_ENDPOINT`,
    /// else AWS's own for the region.
    #[arg(long, env = "SUNDIAL_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,

    /// S3 region; else `AWS_REGION` (or `AWS_DEFAULT_REGION`), else us-east-1.
    #[arg(long, env = "SUNDIAL_S3_REGION")]
    pub s3_region: Option<String>,

    /// Allows a plain-http endpoint (a store on loopback); else `AWS_ALLOW_HTTP`.
    #[arg(long, env = "SUNDIAL_S3_ALLOW_HTTP")]
    pub s3_allow_http: Option<bool>,

    /// Virtual-hosted-style requests (`bucket.host`) instead of path style (`host/bucket`);
    /// else `AWS_VIRTUAL_HOSTED_STYLE_REQUEST`.
    #[arg(long, env = "SUNDIAL_S3_VIRTUAL_HOSTED_STYLE")]
    pub s3_virtual_hosted_style: Option<bool>,

    /// Time limit of one request to a remote store; failed requests are retried (up to 4
    /// times within 30 s), then the persist waits and tries again, or the query fails.
    #[arg(long, env = "SUNDIAL_S3_REQUEST_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub s3_request_timeout: Duration,

    /// Objects larger than this go to a remote store as multipart uploads in 16 MiB parts,
    /// each request within the request timeout (5MiB to 5GiB).
    #[arg(long, env = "SUNDIAL_S3_MULTIPART_THRESHOLD", default_value = "32MiB", value_parser = parse_multipart)]
    pub s3_multipart_threshold: u64,

    /// Local disk cache of a remote store's Parquet files. Default: `{data-dir}/cache`.
    #[arg(long, env = "SUNDIAL_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,

    /// Bytes the cache may hold; least recently used files are evicted beyond it.
    #[arg(long, env = "SUNDIAL_CACHE_SIZE", default_value = "10GiB", value_parser = parse_bytes)]
    pub cache_size: u64,

    /// HTTP address. 8086 is the port Telegraf and influx clients try first.
    #[arg(long, env = "SUNDIAL_HTTP_BIND", default_value = "127.0.0.1:8086")]
    pub http_bind: SocketAddr,

    /// Postgres wire protocol address (psql, drivers, BI tools). 5433 leaves 5432 to a real
    /// PostgreSQL on the same machine.
    #[arg(long, env = "SUNDIAL_PG_BIND", default_value = "127.0.0.1:5433")]
    pub pg_bind: SocketAddr,

    /// Buffered rows a partition gathers before they are sorted by series in the background,
    /// so a query for a few series reads only theirs: 256Ki rows is about a Parquet row group.
    #[arg(long, env = "SUNDIAL_BUFFER_SORT_ROWS", default_value_t = crate::buffer::SORT_ROWS_MIN)]
    pub buffer_sort_rows: usize,

    /// Memory for buffered rows. A quarter of it triggers early persistence; past all of it
    /// writes get 503 with Retry-After. Default keeps a 1000-host ingest well under 1 GiB RSS.
    #[arg(long, env = "SUNDIAL_BUFFER_MEMORY_MAX", default_value = "512MiB", value_parser = parse_bytes)]
    pub buffer_memory_max: u64,

    /// Time partition width: one day, so a query for recent data skips older days' files.
    /// Fixed when the data directory is created (a later value is ignored with a warning);
    /// 1 minute to 366 days.
    #[arg(long, env = "SUNDIAL_PARTITION_DURATION", default_value = "1d", value_parser = parse_partition)]
    pub partition_duration: Duration,

    /// Everything buffered is persisted at least this often, which also bounds WAL replay.
    #[arg(long, env = "SUNDIAL_PERSIST_INTERVAL", default_value = "10m", value_parser = humantime::parse_duration)]
    pub persist_interval: Duration,

    /// How often compaction looks for partitions to merge (many small files, or files that
    /// overlap: late or overwritten points); 0s turns it off.
    #[arg(long, env = "SUNDIAL_COMPACTION_INTERVAL", default_value = "1m", value_parser = humantime::parse_duration)]
    pub compaction_interval: Duration,

    /// Size at which compaction cuts its output files; files of half of it or more are only
    /// merged again when their partition has overlapping files.
    #[arg(long, env = "SUNDIAL_COMPACTION_TARGET_SIZE", default_value = "128MiB", value_parser = parse_compaction_target)]
    pub compaction_target_size: u64,

    /// Small files a partition still being written gathers before they are merged (a
    /// partition whose time is over is merged from two).
    #[arg(long, env = "SUNDIAL_COMPACTION_FILES_MIN", default_value_t = 8, value_parser = clap::value_parser!(u64).range(2..=10_000))]
    pub compaction_files_min: u64,

    /// Files one compaction merges at most: each holds a decoded batch in memory meanwhile.
    #[arg(long, env = "SUNDIAL_COMPACTION_INPUTS_MAX", default_value_t = 32, value_parser = clap::value_parser!(u64).range(2..=256))]
    pub compaction_inputs_max: u64,

    /// How long the files a compaction replaced stay in the store (queries that started
    /// before it may still read them) before they are deleted.
    #[arg(long, env = "SUNDIAL_COMPACTION_GRACE", default_value = "10m", value_parser = humantime::parse_duration)]
    pub compaction_grace: Duration,

    /// When a write is acknowledged: after fdatasync (default) or after write(2).
    #[arg(long, env = "SUNDIAL_WAL_SYNC", value_enum, default_value_t = WalSync::Fsync)]
    pub wal_sync: WalSync,

    /// WAL segment size before rotating; segments are deleted once persisted.
    #[arg(long, env = "SUNDIAL_WAL_SEGMENT_SIZE", default_value = "64MiB", value_parser = parse_bytes)]
    pub wal_segment_size: u64,

    /// Largest request body accepted (after gzip decompression too); larger gets 413. At most
    /// 1 GiB: one request is one WAL record, whose length field is 32 bits.
    #[arg(long, env = "SUNDIAL_REQUEST_MAX", default_value = "64MiB", value_parser = parse_request_max)]
    pub request_max: u64,

    /// Memory all running queries may use together; a query needing more fails cleanly.
    #[arg(long, env = "SUNDIAL_QUERY_MEMORY_MAX", default_value = "1GiB", value_parser = parse_bytes)]
    pub query_memory_max: u64,

    /// Authentication: tokens on HTTP, SCRAM-SHA-256 with the token as password on Postgres.
    #[arg(long, env = "SUNDIAL_AUTH", value_enum, default_value_t = AuthMode::Auto)]
    pub auth: AuthMode,

    /// PEM certificate chain: both listeners then speak TLS (HTTPS; Postgres refuses
    /// connections without TLS). Needs `--tls-key`.
    #[arg(long, env = "SUNDIAL_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of `--tls-cert`.
    #[arg(long, env = "SUNDIAL_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// The server's address as notification receivers should reach it: alert notifications'
    /// `externalURL` and `generatorURL` (default: http://{http-bind}).
    #[arg(long, env = "SUNDIAL_EXTERNAL_URL")]
    pub external_url: Option<String>,

    /// SMTP relay (host:port) for `EMAIL` alert targets that do not name one.
    #[arg(long, env = "SUNDIAL_SMTP_SMARTHOST")]
    pub smtp_smarthost: Option<String>,

    /// Sender address for `EMAIL` alert targets that do not name one.
    #[arg(long, env = "SUNDIAL_SMTP_FROM")]
    pub smtp_from: Option<String>,

    /// Host name Sundial greets the SMTP relay with (EHLO).
    #[arg(long, env = "SUNDIAL_SMTP_HELLO")]
    pub smtp_hello: Option<String>,

    /// SMTP AUTH user for `EMAIL` alert targets that do not name one.
    #[arg(long, env = "SUNDIAL_SMTP_AUTH_USERNAME")]
    pub smtp_auth_username: Option<String>,

    /// SMTP AUTH password (better given by the environment than on the command line).
    #[arg(long, env = "SUNDIAL_SMTP_AUTH_PASSWORD", hide_env_values = true)]
    pub smtp_auth_password: Option<String>,

    /// Whether e-mail needs STARTTLS (port 465 always uses TLS).
    #[arg(long, env = "SUNDIAL_SMTP_REQUIRE_TLS", default_value_t = true, action = clap::ArgAction::Set)]
    pub smtp_require_tls: bool,

    /// Log filter (tracing's EnvFilter syntax).
    #[arg(long, env = "SUNDIAL_LOG", default_value = "info")]
    pub log: String,
}

fn parse_partition(s: &str) -> Result<Duration, String> {
    let width =
        humantime::parse_duration(s).map_err(|e| format!("invalid duration \"{s}\": {e}"))?;
    if width < Duration::from_secs(60) || width > Duration::from_secs(366 * 86_400) {
        return Err(format!("partition duration \"{s}\" is not between 1 minute and 366 days"));
    }
    Ok(width)
}

fn parse_compaction_target(s: &str) -> Result<u64, String> {
    let bytes = parse_bytes(s)?;
    if !(1 << 20..=1 << 30).contains(&bytes) {
        return Err(format!("compaction target size \"{s}\" is not between 1MiB and 1GiB"));
    }
    Ok(bytes)
}

fn parse_multipart(s: &str) -> Result<u64, String> {
    let bytes = parse_bytes(s)?;
    if !(5 << 20..=5 << 30).contains(&bytes) {
        return Err(format!("multipart threshold \"{s}\" is not between 5MiB and 5GiB"));
    }
    Ok(bytes)
}

fn parse_request_max(s: &str) -> Result<u64, String> {
    let bytes = parse_bytes(s)?;
    if bytes == 0 || bytes > 1 << 30 {
        return Err(format!("request size \"{s}\" is not between 1 byte and 1GiB"));
    }
    Ok(bytes)
}

fn parse_bytes(s: &str) -> Result<u64, String> {
    s.parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|e| format!("invalid size \"{s}\": {e}"))
}

impl ServeArgs {
    pub fn engine_config(&self) -> crate::engine::Config {
        crate::engine::Config {
            data_dir: self.data_dir.clone(),
            object_store_url: self.object_store.clone(),
            store: crate::persist::store::Options {
                endpoint: self.s3_endpoint.clone(),
                region: self.s3_region.clone(),
                allow_http: self.s3_allow_http,
                virtual_hosted_style: self.s3_virtual_hosted_style,
                cache_dir: self.cache_dir.clone(),
                cache_bytes_max: self.cache_size,
                request_timeout: self.s3_request_timeout.max(Duration::from_millis(100)),
                multipart_bytes: self.s3_multipart_threshold,
            },
            buffer_bytes_max: usize::try_from(self.buffer_memory_max).unwrap_or(usize::MAX),
            partition: self.partition_duration,
            persist_interval: self.persist_interval,
            wal_sync: self.wal_sync == WalSync::Fsync,
            wal_segment_bytes_max: self.wal_segment_size,
            wal_record_bytes_max: usize::try_from(self.request_max)
                .unwrap_or(usize::MAX)
                .saturating_add(1 << 16),
            sort_rows_min: self.buffer_sort_rows,
            clock: std::sync::Arc::new(crate::clock::SystemClock),
            compaction: crate::engine::CompactionConfig {
                interval: self.compaction_interval,
                target_bytes: self.compaction_target_size.max(1),
                files_min: usize::try_from(self.compaction_files_min).unwrap_or(usize::MAX),
                inputs_max: usize::try_from(self.compaction_inputs_max).unwrap_or(usize::MAX),
                grace: self.compaction_grace,
            },
        }
    }

    pub fn alerts_config(&self) -> crate::alerts::Config {
        let scheme = if self.tls_cert.is_some() { "https" } else { "http" };
        crate::alerts::Config {
            external_url: self
                .external_url
                .clone()
                .unwrap_or_else(|| format!("{scheme}://{}", self.http_bind)),
            smtp: crate::alerts::Smtp {
                smarthost: self.smtp_smarthost.clone(),
                from: self.smtp_from.clone(),
                hello: self.smtp_hello.clone(),
                auth_username: self.smtp_auth_username.clone(),
                auth_password: self.smtp_auth_password.clone(),
                require_tls: self.smtp_require_tls,
            },
        }
    }

    pub fn query_config(&self) -> crate::query::Config {
        crate::query::Config {
            memory_bytes_max: usize::try_from(self.query_memory_max).unwrap_or(usize::MAX),
            target_partitions: std::thread::available_parallelism().map_or(2, |n| n.get()),
        }
    }
}
