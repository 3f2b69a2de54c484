//! Records the code version (`git describe`) for every run directory.

use std::process::Command;

fn main() {
    let version = Command::new("git")
        .args(["describe", "--always", "--dirty", "--tags"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_string());
    println!(
        "cargo:rustc-env=ESTAFET_CODE_VERSION={} ({version})",
        env!("CARGO_PKG_VERSION")
    );
    // A commit moves the branch HEAD names, not HEAD itself; the index changes with the tree.
    let mut watched = vec![
        ".git/HEAD".to_string(),
        ".git/index".to_string(),
        ".git/packed-refs".to_string(),
    ];
    if let Ok(head) = std::fs::read_to_string(".git/HEAD")
        && let Some(branch) = head.trim().strip_prefix("ref: ")
    {
        watched.push(format!(".git/{branch}"));
    }
    for path in watched {
        if std::path::Path::new(&path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
}
