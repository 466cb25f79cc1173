//! Who may do what. Tokens are random secrets with a name and permissions (`admin`, or
//! `read:<db>` / `write:<db>`, `*` for every database), kept hashed in
//! `{data-dir}/auth/tokens.json` (format: `storage-format/tokens.md`). HTTP clients present a
//! token (`Authorization: Bearer|Token`, Basic, or v1's `p=`); Postgres clients log in with the
//! token's name as user and the token as password over SCRAM-SHA-256. The file is written
//! atomically and re-read when it changes, so `sundial token create` works beside a running
//! server. This module does no networking; `http` and `pg` ask it.

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// Iterations of PBKDF2 for the SCRAM salted password (PostgreSQL's default).
pub const SCRAM_ITERATIONS: usize = 4096;
/// What every token's secret starts with, so a leaked one is recognisable.
const TOKEN_PREFIX: &str = "sdl_";
const NAME_BYTES_MAX: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("token store {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("token store {path} is not valid: {reason}")]
    Invalid { path: String, reason: String },
    #[error("a token named \"{0}\" exists")]
    Exists(String),
    #[error("no token named \"{0}\"")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
}

impl Error {
    pub fn kind(&self) -> crate::ErrorKind {
        match self {
            Error::Io { .. } | Error::Invalid { .. } => crate::ErrorKind::Internal,
            Error::Exists(_) => crate::ErrorKind::AlreadyExists,
            Error::NotFound(_) => crate::ErrorKind::NotFound,
            Error::BadRequest(_) => crate::ErrorKind::InvalidInput,
        }
    }
}

/// Reading or changing data in one database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

/// One grant, written `admin`, `read:<db>` or `write:<db>` (`<db>` may be `*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Permission {
    Admin,
    Database { access: Access, database: String },
}

impl Permission {
    pub fn parse(text: &str) -> Result<Permission, Error> {
        if text == "admin" {
            return Ok(Permission::Admin);
        }
        let bad = || {
            Error::BadRequest(format!(
                "permission \"{text}\" is not admin, read:<database> or write:<database>"
            ))
        };
        let (access, database) = text.split_once(':').ok_or_else(bad)?;
        let access = match access {
            "read" => Access::Read,
            "write" => Access::Write,
            _ => return Err(bad()),
        };
        if database.is_empty() {
            return Err(bad());
        }
        Ok(Permission::Database { access, database: database.to_string() })
    }
}

impl std::fmt::Display for Permission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Permission::Admin => f.write_str("admin"),
            Permission::Database { access: Access::Read, database } => write!(f, "read:{database}"),
            Permission::Database { access: Access::Write, database } => {
                write!(f, "write:{database}")
            }
        }
    }
}

/// Who a request is, and what it may do.
#[derive(Debug, Clone)]
pub struct Principal {
    pub name: String,
    pub permissions: Vec<Permission>,
    /// Which secret it logged in with (the token's hash; empty without a token): a token
    /// revoked and created again under the same name is another principal.
    pub token: String,
}

impl Principal {
    /// Everyone, when authentication is off.
    pub fn anyone() -> Principal {
        Principal {
            name: "anyone".into(),
            permissions: vec![Permission::Admin],
            token: String::new(),
        }
    }

    /// No one: what a connection is before it logged in.
    pub fn nobody() -> Principal {
        Principal { name: "nobody".into(), permissions: Vec::new(), token: String::new() }
    }

    /// The first need it lacks, if any.
    pub fn lacks<'a>(&self, needs: &'a [Need]) -> Option<&'a Need> {
        needs.iter().find(|need| !self.allows(need))
    }

    pub fn is_admin(&self) -> bool {
        self.permissions.contains(&Permission::Admin)
    }

    pub fn allows(&self, need: &Need) -> bool {
        match need {
            Need::Database(access, db) => self.may(*access, db),
            Need::Admin => self.is_admin(),
        }
    }

    /// Whether it may read or write `database`; writing does not include reading.
    pub fn may(&self, access: Access, database: &str) -> bool {
        self.permissions.iter().any(|p| match p {
            Permission::Admin => true,
            Permission::Database { access: a, database: d } => {
                *a == access && (d == "*" || d == database)
            }
        })
    }
}

/// What a command needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Need {
    Database(Access, String),
    Admin,
}

impl std::fmt::Display for Need {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Need::Database(Access::Read, db) => write!(f, "read permission on database \"{db}\""),
            Need::Database(Access::Write, db) => {
                write!(f, "write permission on database \"{db}\"")
            }
            Need::Admin => f.write_str("admin permission"),
        }
    }
}

/// What `command`, run in database `db`, needs: reading for queries, writing for what
/// changes data (creating and dropping tables too; `CREATE DATABASE x` writing on `x`), both
/// for an `INSERT … SELECT` (its answer and errors show what it read), admin for dropping a
/// database.
pub fn need(command: &crate::statement::Command, db: &str) -> Vec<Need> {
    use crate::statement::Command;
    use datafusion::sql::sqlparser::ast::{ObjectType, SetExpr, Statement};
    let on_db = |access| Need::Database(access, db.to_string());
    match command {
        // An alert rule makes the server send requests to addresses the rule names: that is
        // the server's administrator's to allow.
        Command::Alert(_) => vec![Need::Admin],
        // Shortening a database's retention deletes data in every table, as a drop does.
        Command::Retention(statement) => {
            use crate::statement::retention::{Statement as Retention, Target};
            match statement {
                Retention::CreateDatabase { name, .. } => {
                    vec![Need::Database(Access::Write, name.clone())]
                }
                Retention::Alter { target: Target::Database(_), .. } => vec![Need::Admin],
                Retention::Alter { target: Target::Table(_), .. } => vec![on_db(Access::Write)],
            }
        }
        Command::Ddl(statement) => match statement.as_ref() {
            Statement::CreateDatabase { db_name, .. } => {
                let name = db_name.0.last().and_then(|p| p.as_ident()).map(|i| i.value.clone());
                vec![Need::Database(Access::Write, name.unwrap_or_default())]
            }
            Statement::Drop { object_type: ObjectType::Database, .. } => vec![Need::Admin],
            _ => vec![on_db(Access::Write)],
        },
        Command::Query(statement) => {
            let insert = match statement.as_ref() {
                Statement::Insert(insert) => Some(insert),
                Statement::Explain { statement, .. } => match statement.as_ref() {
                    Statement::Insert(insert) => Some(insert),
                    _ => None,
                },
                _ => None,
            };
            let reads = insert.is_none_or(|insert| {
                insert
                    .source
                    .as_ref()
                    .is_some_and(|q| !matches!(q.body.as_ref(), SetExpr::Values(_)))
            });
            let mut needs = Vec::new();
            if crate::statement::changes_data(command) {
                needs.push(on_db(Access::Write));
            }
            if reads || needs.is_empty() {
                needs.push(on_db(Access::Read));
            }
            needs
        }
        other if crate::statement::changes_data(other) => vec![on_db(Access::Write)],
        // Session commands (BEGIN/COMMIT/SAVEPOINT, SET/SHOW/RESET, DISCARD, FETCH of a
        // cursor whose query was checked) touch no data: being admitted is enough.
        Command::Transaction(_)
        | Command::Set(_)
        | Command::Reset { .. }
        | Command::Show { .. }
        | Command::NoOp { .. }
        | Command::Cursor(_) => Vec::new(),
        _ => vec![on_db(Access::Read)],
    }
}

/// A token as stored: never the secret itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Record {
    /// Hex SHA-256 of the secret (tokens are 256 random bits: a plain hash suffices).
    sha256: String,
    /// Hex salt and SCRAM-SHA-256 salted password (PBKDF2) for Postgres logins.
    scram_salt: String,
    scram_salted_password: String,
    permissions: Vec<String>,
    created: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct File {
    format: u32,
    /// By name.
    tokens: BTreeMap<String, Record>,
}

/// What a Postgres login checks a password against.
pub struct Scram {
    pub principal: Principal,
    pub salt: Vec<u8>,
    pub salted_password: Vec<u8>,
}

/// The token store of one data directory.
#[derive(Debug)]
pub struct Tokens {
    path: PathBuf,
    /// The file as last read, and what identified its version then.
    loaded: Mutex<(Option<Version>, Arc<File>)>,
}

/// What tells one version of the file from the next: a replaced file is a new inode, and a
/// change within one modification-time tick still changes the inode.
type Version = (SystemTime, u64, u64);

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes))
}

fn random_bytes<const N: usize>() -> [u8; N] {
    use ring::rand::SecureRandom;
    let mut out = [0u8; N];
    ring::rand::SystemRandom::new().fill(&mut out).expect("the system random source works");
    out
}

/// Compares two strings in time that does not depend on where they differ.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Tokens {
    pub fn open(data_dir: &Path) -> Tokens {
        Tokens { path: data_dir.join("auth").join("tokens.json"), loaded: Mutex::default() }
    }

    fn io(&self) -> impl Fn(std::io::Error) -> Error + '_ {
        |source| Error::Io { path: self.path.display().to_string(), source }
    }

    /// The file, read again if it changed since the last read.
    fn current(&self) -> Result<Arc<File>, Error> {
        use std::os::unix::fs::MetadataExt;
        let modified = match std::fs::metadata(&self.path) {
            Ok(meta) => Some((meta.modified().map_err(self.io())?, meta.ino(), meta.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(self.io()(e)),
        };
        let mut loaded = self.loaded.lock().expect("tokens lock");
        if loaded.0 != modified || modified.is_none() {
            let file = match modified {
                None => File::default(),
                Some(_) => {
                    let bytes = std::fs::read(&self.path).map_err(self.io())?;
                    serde_json::from_slice(&bytes).map_err(|e| Error::Invalid {
                        path: self.path.display().to_string(),
                        reason: e.to_string(),
                    })?
                }
            };
            *loaded = (modified, Arc::new(file));
        }
        Ok(loaded.1.clone())
    }

    fn principal(name: &str, record: &Record) -> Principal {
        let permissions =
            record.permissions.iter().filter_map(|p| Permission::parse(p).ok()).collect();
        Principal { name: name.to_string(), permissions, token: record.sha256.clone() }
    }

    /// The holder of `secret`, if it is a token.
    pub fn verify(&self, secret: &str) -> Result<Option<Principal>, Error> {
        let hash = sha256_hex(secret.as_bytes());
        let file = self.current()?;
        Ok(file
            .tokens
            .iter()
            .find(|(_, record)| same(&record.sha256, &hash))
            .map(|(name, record)| Self::principal(name, record)))
    }

    /// The token named `name`, with its SCRAM salt and salted password (Postgres logins).
    pub fn scram(&self, name: &str) -> Result<Option<Scram>, Error> {
        let file = self.current()?;
        let Some(record) = file.tokens.get(name) else { return Ok(None) };
        let decode = |hex_text: &str| {
            hex::decode(hex_text).map_err(|e| Error::Invalid {
                path: self.path.display().to_string(),
                reason: format!("token \"{name}\": {e}"),
            })
        };
        let salt = decode(&record.scram_salt)?;
        let salted = decode(&record.scram_salted_password)?;
        Ok(Some(Scram { principal: Self::principal(name, record), salt, salted_password: salted }))
    }

    /// Whether any token exists.
    pub fn is_empty(&self) -> Result<bool, Error> {
        Ok(self.current()?.tokens.is_empty())
    }

    /// Names and permissions of every token.
    pub fn list(&self) -> Result<Vec<Principal>, Error> {
        let file = self.current()?;
        Ok(file.tokens.iter().map(|(name, record)| Self::principal(name, record)).collect())
    }

    /// Creates a token and returns its secret, which is shown only now.
    pub fn create(&self, name: &str, permissions: &[Permission]) -> Result<String, Error> {
        if name.is_empty()
            || name.len() > NAME_BYTES_MAX
            || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return Err(Error::BadRequest(format!(
                "token name \"{name}\" is not 1 to {NAME_BYTES_MAX} letters, digits, '-', '_' or '.'"
            )));
        }
        if permissions.is_empty() {
            return Err(Error::BadRequest("a token needs at least one permission".into()));
        }
        let secret = format!("{TOKEN_PREFIX}{}", hex::encode(random_bytes::<32>()));
        let salt = random_bytes::<16>();
        let salted = datafusion_postgres::pgwire::api::auth::sasl::scram::gen_salted_password(
            &secret,
            &salt,
            SCRAM_ITERATIONS,
        );
        let record = Record {
            sha256: sha256_hex(secret.as_bytes()),
            scram_salt: hex::encode(salt),
            scram_salted_password: hex::encode(salted),
            permissions: permissions.iter().map(ToString::to_string).collect(),
            created: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        };
        self.change(|file| {
            if file.tokens.contains_key(name) {
                return Err(Error::Exists(name.to_string()));
            }
            file.tokens.insert(name.to_string(), record);
            Ok(())
        })?;
        Ok(secret)
    }

    /// Revokes a token: from now on it is refused.
    pub fn revoke(&self, name: &str) -> Result<(), Error> {
        self.change(|file| match file.tokens.remove(name) {
            Some(_) => Ok(()),
            None => Err(Error::NotFound(name.to_string())),
        })
    }

    /// Read, change, write to a temporary file, sync, rename, sync the directory: a crash
    /// leaves the old file or the new one. An exclusive lock on the directory's lock file
    /// serialises the server and `sundial token` commands.
    fn change(&self, f: impl FnOnce(&mut File) -> Result<(), Error>) -> Result<(), Error> {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let dir = self.path.parent().expect("tokens.json is in a directory");
        std::fs::create_dir_all(dir).map_err(self.io())?;
        // The salted passwords log in over SCRAM: only the server's user may read them.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(self.io())?;
        let lock = std::fs::File::create(dir.join("tokens.lock")).map_err(self.io())?;
        lock.lock().map_err(self.io())?;
        let mut file = match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| Error::Invalid {
                path: self.path.display().to_string(),
                reason: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                File { format: 1, ..File::default() }
            }
            Err(e) => return Err(self.io()(e)),
        };
        file.format = 1;
        f(&mut file)?;
        let tmp = dir.join("tokens.json.tmp");
        let bytes = serde_json::to_vec_pretty(&file).expect("tokens serialise");
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(self.io())?;
        out.set_permissions(std::fs::Permissions::from_mode(0o600)).map_err(self.io())?;
        out.write_all(&bytes).and_then(|()| out.sync_all()).map_err(self.io())?;
        std::fs::rename(&tmp, &self.path).map_err(self.io())?;
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(self.io())?;
        // The next check reads the file again, whatever its modification time says.
        *self.loaded.lock().expect("tokens lock") = (None, Arc::new(File::default()));
        Ok(())
    }
}

/// `sundial token …`: what it prints on success.
pub fn command(args: &crate::config::TokenArgs) -> Result<String, Error> {
    use crate::config::TokenAction;
    let tokens = Tokens::open(&args.data_dir);
    match &args.action {
        TokenAction::Create { name, admin, read, write } => {
            let mut permissions = Vec::new();
            if *admin {
                permissions.push(Permission::Admin);
            }
            for (access, databases) in [("read", read), ("write", write)] {
                for db in databases {
                    permissions.push(Permission::parse(&format!("{access}:{db}"))?);
                }
            }
            let secret = tokens.create(name, &permissions)?;
            Ok(format!("{secret}\n"))
        }
        TokenAction::List => Ok(tokens
            .list()?
            .iter()
            .map(|p| {
                let permissions: Vec<_> = p.permissions.iter().map(ToString::to_string).collect();
                format!("{}\t{}\n", p.name, permissions.join(","))
            })
            .collect()),
        TokenAction::Revoke { name } => {
            tokens.revoke(name)?;
            Ok(format!("revoked {name}\n"))
        }
    }
}
