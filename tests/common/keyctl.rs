//! The `keyctl` example binary, run as an operator would (cargo builds examples before it
//! runs tests).

use std::io::Write;
use std::process::{Command, Stdio};

/// What keyctl printed and how it exited.
pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    /// The value of a `NAME=value` line of its output.
    pub fn value(&self, name: &str) -> String {
        self.stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("no {name}= in {:?}", self.stdout))
            .to_owned()
    }
}

/// keyctl with exactly these arguments (and `stdin`, if any), never reading
/// `KEYGATE_DATABASE_URL` and run in the temporary directory, so that the default
/// `sqlite://keygate.db` never lands in the repository.
pub fn keyctl_raw(args: &[&str], stdin: Option<&str>) -> Out {
    let exe = std::env::current_exe().expect("test path");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let bin = dir
        .join("examples")
        .join(format!("keyctl{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "{} not built: run cargo test --features sqlite,postgres",
        bin.display()
    );
    let mut child = Command::new(bin)
        .args(args)
        .env_remove("KEYGATE_DATABASE_URL")
        .env("RUST_BACKTRACE", "1")
        .current_dir(std::env::temp_dir())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run keyctl");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write");
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().expect("keyctl output");
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}
