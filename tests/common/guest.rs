//! The end-to-end test guest (ci/guest): building it, skipping without its prerequisites,
//! reading its console log. Used by tests/e2e_guest.rs and tests/e2e_migration.rs.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The repository (the crate's manifest directory).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Skip the test (return `false`) or, under CI, fail it.
pub fn prerequisites_missing(why: &str) -> bool {
    let ci = std::env::var("CI")
        .map(|v| !v.is_empty() && v != "0" && v != "false")
        .unwrap_or(false);
    if ci {
        panic!("e2e guest prerequisites missing under CI: {why}\nrun ci/setup.sh");
    }
    // Written straight to the stderr handle: libtest captures `eprintln!` of
    // passing tests, and this message must be seen.
    let _ = writeln!(
        std::io::stderr(),
        "\n\
         ****************************************************************\n\
         * e2e_guest SKIPPED: run ci/setup.sh                           *\n\
         ****************************************************************\n\
         reason: {why}\n"
    );
    false
}

/// Whether `program` is an executable file in `PATH`.
pub fn in_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
        .unwrap_or(false)
}

/// Builds the guest (a no-op when it is up to date).  Returns `false` when the
/// test must be skipped.
pub fn ensure_guest() -> bool {
    if !in_path("qemu-system-x86_64") {
        return prerequisites_missing("qemu-system-x86_64 not found in PATH");
    }
    let build = repo_root().join("ci/guest/build.sh");
    let out = Command::new("bash")
        .arg(&build)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", build.display()));
    if !out.status.success() {
        return prerequisites_missing(&format!(
            "{} failed ({}):\n{}{}",
            build.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    true
}

/// The file as text, CRLF as LF (the guest console); empty if it cannot be read.
pub fn read_lossy(path: &Path) -> String {
    let mut buf = Vec::new();
    if let Ok(mut f) = File::open(path) {
        let _ = f.read_to_end(&mut buf);
    }
    String::from_utf8_lossy(&buf).replace('\r', "")
}

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
