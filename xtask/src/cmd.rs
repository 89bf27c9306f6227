//! Running external commands: every command that changes something is echoed
//! (to stderr, like cargo's own output) before it runs, and a non-zero exit
//! becomes an error that names the command and its status.

use std::env;
use std::ffi::{OsStr, OsString};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use anyhow::{Context as _, Result, bail};

/// A `Command` for `program` whose `PATH` also contains cargo's bin
/// directory, where `cargo install` puts bpf-linker. On a bare machine that
/// directory may not be on `PATH`, and aya-build needs to find bpf-linker.
pub fn new(program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new(program);
    if let Some(path) = path_with_cargo_bin() {
        cmd.env("PATH", path);
    }
    cmd
}

/// Cargo's bin directory: `$CARGO_HOME/bin`, by default `$HOME/.cargo/bin`.
pub fn cargo_bin_dir() -> Option<PathBuf> {
    let home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))?;
    Some(home.join("bin"))
}

/// `$PATH` with cargo's bin directory appended, or `None` when it is already
/// there (or cannot be found).
fn path_with_cargo_bin() -> Option<OsString> {
    let bin = cargo_bin_dir()?;
    let path = env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = env::split_paths(&path).collect();
    if dirs.contains(&bin) {
        return None;
    }
    dirs.push(bin);
    env::join_paths(dirs).ok()
}

/// Runs `cmd` with inherited stdio after printing it; fails unless it exits 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    let shown = display(cmd);
    eprintln!("$ {shown}");
    let status = cmd.status().with_context(|| format!("failed to start `{shown}`"))?;
    if !status.success() {
        bail!("`{shown}` failed ({status})");
    }
    Ok(())
}

/// Tests counted from cargo test's `test result:` lines.
#[derive(Debug, Default, Clone, Copy)]
pub struct TestCount {
    pub passed: u64,
    pub failed: u64,
}

/// Like [`run`] for `cargo test`: passes its stdout through and adds up the
/// `test result: … N passed; M failed` lines it prints.
pub fn run_tests(cmd: &mut Command, count: &mut TestCount) -> Result<()> {
    use std::io::{BufRead as _, BufReader};
    let shown = display(cmd);
    eprintln!("$ {shown}");
    let mut child =
        cmd.stdout(Stdio::piped()).spawn().with_context(|| format!("failed to start `{shown}`"))?;
    let stdout = child.stdout.take().context("no stdout")?;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some((passed, failed)) = parse_test_result(&line) {
            count.passed += passed;
            count.failed += failed;
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("`{shown}` failed ({status})");
    }
    Ok(())
}

/// `(passed, failed)` from a `test result: ok. 8 passed; 0 failed; …` line.
fn parse_test_result(line: &str) -> Option<(u64, u64)> {
    let rest = line.strip_prefix("test result: ")?;
    let number = |word: &str| {
        rest.split(';')
            .find_map(|part| part.trim().strip_suffix(word)?.trim().rsplit(' ').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Some((number("passed"), number("failed")))
}

/// Runs `cmd` quietly (a probe, not an action) and returns its output,
/// whatever its exit status. Fails only when it cannot be started.
pub fn probe(cmd: &mut Command) -> Result<Output> {
    cmd.stdin(Stdio::null()).output().with_context(|| format!("failed to start `{}`", display(cmd)))
}

/// Runs `cmd` quietly and returns its stdout; fails unless it exits 0, with
/// its stderr in the message.
pub fn stdout(cmd: &mut Command) -> Result<String> {
    let out = probe(cmd)?;
    if !out.status.success() {
        bail!("`{}` failed ({}): {}", display(cmd), out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    String::from_utf8(out.stdout).with_context(|| format!("`{}` printed non-UTF-8", display(cmd)))
}

/// The command as a shell-like line: explicitly set variables (except
/// `PATH`), the program and its arguments, quoted where needed.
pub fn display(cmd: &Command) -> String {
    let mut words = Vec::new();
    for (key, value) in cmd.get_envs() {
        if key == "PATH" {
            continue;
        }
        if let Some(value) = value {
            words.push(format!("{}={}", key.to_string_lossy(), quote(&value.to_string_lossy())));
        }
    }
    // `$CARGO` is the toolchain's full path to cargo; `cargo` reads better.
    let program = cmd.get_program();
    if env::var_os("CARGO").is_some_and(|cargo| cargo == program) {
        words.push("cargo".to_owned());
    } else {
        words.push(quote(&program.to_string_lossy()));
    }
    words.extend(cmd.get_args().map(|a| quote(&a.to_string_lossy())));
    words.join(" ")
}

fn quote(word: &str) -> String {
    let plain =
        !word.is_empty() && word.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
    if plain { word.to_owned() } else { format!("'{}'", word.replace('\'', r"'\''")) }
}

/// Whether this process runs with effective uid 0.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Fails with a message saying that root is needed for `what`.
pub fn require_root(what: &str) -> Result<()> {
    if !is_root() {
        bail!("root is needed for {what}: run this command as root");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_tests_from_cargo_test_summaries() {
        let line = "test result: FAILED. 8 passed; 2 failed; 1 ignored; 0 measured; 0 filtered out; finished in 9.87s";
        assert_eq!(parse_test_result(line), Some((8, 2)));
        assert_eq!(parse_test_result("running 3 tests"), None);
    }

    #[test]
    fn display_quotes_what_the_shell_would_split() {
        let mut cmd = Command::new("cargo");
        cmd.args(["test", "--", "a b", "it's"])
            .env("LLVM_PREFIX", "/root/.cache/weir/llvm-prefix")
            .env("PATH", "/bin");
        assert_eq!(display(&cmd), r"LLVM_PREFIX=/root/.cache/weir/llvm-prefix cargo test -- 'a b' 'it'\''s'");
    }
}
