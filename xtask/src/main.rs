//! Repository chores that are code rather than shell: `cargo xtask tidy` (the same checks run
//! as tests under `cargo test`, so CI enforces them) and `cargo xtask reliability` (writes
//! docs/RELIABILITY.md from the black-box suite's measurements).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

mod reliability;

fn main() -> ExitCode {
    match std::env::args().nth(1).as_deref() {
        Some("tidy") => {
            let problems = tidy_problems(&workspace_root());
            for problem in &problems {
                eprintln!("{problem}");
            }
            if problems.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Some("reliability") => {
            let skip_tests = std::env::args().any(|a| a == "--skip-tests");
            match reliability::run(&workspace_root(), skip_tests) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("xtask reliability: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        _ => {
            eprintln!("usage: cargo xtask tidy | cargo xtask reliability [--skip-tests]");
            ExitCode::FAILURE
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace root")
        .to_path_buf()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        if name == "target" || name.to_string_lossy().starts_with('.') {
            continue;
        }
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            out.push(path);
        }
    }
}

/// Every Rust file opens with a `//!` comment saying what it is for, and every crate opts into
/// the workspace lints.
fn tidy_problems(root: &Path) -> Vec<String> {
    let mut problems = Vec::new();
    let mut files = Vec::new();
    for dir in ["crates", "xtask", "bench", "fuzz"] {
        rust_files(&root.join(dir), &mut files);
    }
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        if !text.starts_with("//!") {
            problems.push(format!(
                "{}: must open with a `//!` doc comment",
                file.display()
            ));
        }
    }
    let Ok(crates) = std::fs::read_dir(root.join("crates")) else {
        return problems;
    };
    for entry in crates.flatten() {
        let manifest = entry.path().join("Cargo.toml");
        let text = std::fs::read_to_string(&manifest).unwrap_or_default();
        if !text.contains("[lints]\nworkspace = true") {
            problems.push(format!(
                "{}: must have `[lints] workspace = true`",
                manifest.display()
            ));
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        if !text.contains(&format!("name = \"{name}\"")) {
            problems.push(format!(
                "{}: the crate must be named like its folder",
                manifest.display()
            ));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rust_file_documents_itself_and_every_crate_uses_the_workspace_lints() {
        let problems = tidy_problems(&workspace_root());
        assert!(
            problems.is_empty(),
            "tidy problems:\n{}",
            problems.join("\n")
        );
    }
}
