//! House rules checked in CI: every Rust source file opens with a `//!` paragraph.

#[test]
fn every_source_file_has_a_module_header() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut missing = Vec::new();
    let mut stack = vec![root.join("src"), root.join("tests"), root.join("benches")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read dir").flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).expect("read file");
                if !text.trim_start().starts_with("//!") {
                    missing
                        .push(path.strip_prefix(root).expect("under root").display().to_string());
                }
            }
        }
    }
    assert!(missing.is_empty(), "files without a //! header: {missing:?}");
}
