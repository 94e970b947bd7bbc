//! The checked-in man page and shell completions must be what the binary generates now
//! (`vhost-user-blk manpage`, `vhost-user-blk completions SHELL`). Regenerate them with
//! `ci/gen-docs` after changing the command line.

// A test reports a failure by panicking: unwrap and expect are how it does so.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::ChildGuard;

const BIN: &str = env!("CARGO_BIN_EXE_vhost-user-blk");

/// Runs the binary with `args` (bounded, output to a file in `dir`) and returns its stdout.
fn generate(dir: &Path, args: &[&str]) -> Vec<u8> {
    let out = dir.join(args.join("-"));
    let mut child = ChildGuard::new(
        Command::new(BIN)
            .args(args)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).expect("create output file"))
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn vhost-user-blk"),
    );
    // Past the deadline the guard kills and reaps it as the panic unwinds.
    let status = child
        .wait_timeout(Duration::from_secs(30))
        .unwrap_or_else(|| panic!("vhost-user-blk {args:?} did not finish within 30 s"));
    assert!(status.success(), "vhost-user-blk {args:?} failed: {status}");
    std::fs::read(&out).expect("read generated output")
}

#[test]
fn man_page_and_completions_are_up_to_date() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir().expect("tempdir");
    let cases: [(&str, &[&str]); 4] = [
        ("docs/man/vhost-user-blk.1", &["manpage"]),
        (
            "docs/completions/vhost-user-blk.bash",
            &["completions", "bash"],
        ),
        ("docs/completions/_vhost-user-blk", &["completions", "zsh"]),
        (
            "docs/completions/vhost-user-blk.fish",
            &["completions", "fish"],
        ),
    ];
    let mut stale = Vec::new();
    for (file, args) in cases {
        let fresh = generate(tmp.path(), args);
        assert!(!fresh.is_empty(), "vhost-user-blk {args:?} printed nothing");
        match std::fs::read(root.join(file)) {
            Ok(checked_in) if checked_in == fresh => {}
            Ok(_) => stale.push(format!(
                "{file} differs from `vhost-user-blk {}`",
                args.join(" ")
            )),
            Err(e) => stale.push(format!("{file}: {e}")),
        }
    }
    assert!(
        stale.is_empty(),
        "generated docs are stale; run ci/gen-docs and commit the result:\n  {}",
        stale.join("\n  ")
    );
}

/// README's libvirt domain is docs/examples/libvirt-domain.xml (from `<domain` on, indented
/// as a list item), the file `ci/libvirt-check` boots a guest with: what users copy is what
/// was tested.
#[test]
fn readme_libvirt_domain_is_the_tested_example() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let read = |f: &str| std::fs::read_to_string(root.join(f)).expect(f);
    let example = read("docs/examples/libvirt-domain.xml");
    let domain = &example[example.find("<domain").expect("<domain in the example")..];
    let readme = read("README.md");
    let section = &readme[readme.find("### libvirt\n").expect("a libvirt section")..];
    let start = section.find("```xml\n").expect("an xml block") + "```xml\n".len();
    let block = &section[start..];
    let block = &block[..block.find("```").expect("the block's end")];
    let unindented: String = block
        .lines()
        .map(|l| format!("{}\n", l.strip_prefix("   ").unwrap_or(l)))
        .collect();
    assert_eq!(
        unindented.trim_end(),
        domain.trim_end(),
        "README's libvirt domain differs from docs/examples/libvirt-domain.xml"
    );
}
