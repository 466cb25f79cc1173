//! Tokens: created once, stored hashed, verified, revoked; permissions read as written.

use super::*;

#[test]
fn tokens_are_stored_hashed_verified_and_revoked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tokens = Tokens::open(dir.path());
    assert!(tokens.is_empty().expect("empty"));
    let read = [Permission::parse("read:db").expect("permission")];
    let secret = tokens.create("grafana", &read).expect("create");
    assert!(secret.starts_with("sdl_") && secret.len() == 68, "{secret}");
    let stored = std::fs::read_to_string(dir.path().join("auth/tokens.json")).expect("file");
    assert!(!stored.contains(&secret), "the secret itself is not stored");
    let principal = tokens.verify(&secret).expect("verify").expect("known");
    assert_eq!(principal.name, "grafana");
    assert!(principal.may(Access::Read, "db"));
    assert!(!principal.may(Access::Write, "db") && !principal.may(Access::Read, "other"));
    assert!(tokens.verify("sdl_wrong").expect("verify").is_none());
    assert!(matches!(tokens.create("grafana", &read), Err(Error::Exists(_))));
    assert!(matches!(tokens.create("bad name", &read), Err(Error::BadRequest(_))));
    assert!(matches!(tokens.create("none", &[]), Err(Error::BadRequest(_))));

    // Another process (the CLI) changes the file: the store sees it.
    let other = Tokens::open(dir.path());
    let admin = other.create("ops", &[Permission::Admin]).expect("create");
    assert!(tokens.verify(&admin).expect("verify").expect("seen").is_admin());
    let scram = tokens.scram("ops").expect("scram").expect("ops");
    let expected = datafusion_postgres::pgwire::api::auth::sasl::scram::gen_salted_password(
        &admin,
        &scram.salt,
        SCRAM_ITERATIONS,
    );
    assert_eq!(scram.salted_password, expected);
    other.revoke("grafana").expect("revoke");
    assert!(tokens.verify(&secret).expect("verify").is_none(), "revoked");
    assert!(matches!(tokens.revoke("grafana"), Err(Error::NotFound(_))));
}

#[test]
fn permissions_read_as_written() {
    for text in ["admin", "read:db", "write:*", "read:my-db/rp"] {
        assert_eq!(Permission::parse(text).expect(text).to_string(), text);
    }
    for bad in ["", "read", "read:", "delete:db", "admin:db"] {
        assert!(Permission::parse(bad).is_err(), "{bad}");
    }
    let all = Principal {
        name: "w".into(),
        permissions: vec![Permission::parse("write:*").unwrap()],
        token: String::new(),
    };
    assert!(all.may(Access::Write, "any") && !all.may(Access::Read, "any") && !all.is_admin());
}

/// The committed fixture (`storage-format/tokens.md`) reads as written: its token, made of
/// `ab` × 32 after the prefix, verifies and its SCRAM values are PBKDF2 of it.
#[test]
fn storage_format_fixture_reads() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(dir.path().join("auth")).expect("auth dir");
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("storage-format/fixtures/tokens-v1.json");
    std::fs::copy(fixture, dir.path().join("auth/tokens.json")).expect("copy fixture");
    let tokens = Tokens::open(dir.path());
    let secret = format!("sdl_{}", "ab".repeat(32));
    let who = tokens.verify(&secret).expect("verify").expect("the fixture's token");
    assert_eq!(who.name, "grafana");
    assert!(who.may(Access::Read, "telegraf") && who.may(Access::Write, "any"));
    assert!(!who.may(Access::Read, "any"));
    let scram = tokens.scram("grafana").expect("scram").expect("grafana");
    let expected = datafusion_postgres::pgwire::api::auth::sasl::scram::gen_salted_password(
        &secret,
        &scram.salt,
        SCRAM_ITERATIONS,
    );
    assert_eq!(scram.salted_password, expected);
}
