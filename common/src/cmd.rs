//! Running a host tool (mkfs, qemu-img, sfdisk, ...): its output, or an error carrying the
//! command line and what it said on stderr.
use std::io::Write as _;
use std::process::{Command, Stdio};

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("{command} failed: {source}")]
    Start {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{command} failed: {stderr}")]
    Failed { command: String, stderr: String },
}

/// Runs `cmd` to completion; its stdout on success.
pub fn run(cmd: &mut Command) -> Result<String, CommandError> {
    run_with_stdin(cmd, None)
}

/// Runs `cmd`, writing `input` to its stdin when given (without one, stdin is null as
/// `Command::output` makes it).
pub fn run_with_stdin(cmd: &mut Command, input: Option<&str>) -> Result<String, CommandError> {
    let command = format!("{cmd:?}");
    let start = |source| CommandError::Start {
        command: command.clone(),
        source,
    };
    let out = match input {
        None => cmd.output().map_err(start)?,
        Some(input) => {
            let mut child = cmd
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(start)?;
            if let Some(mut stdin) = child.stdin.take() {
                stdin.write_all(input.as_bytes()).map_err(start)?;
            }
            child.wait_with_output().map_err(start)?
        }
    };
    if !out.status.success() {
        return Err(CommandError::Failed {
            command,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Joins each cgroup whose `cgroup.procs` is named before `--`, then becomes the rest of
/// the command line: the shell writes its own pid, so the program starts inside.
const JOIN_CGROUPS: &str =
    r#"while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; shift; exec "$@""#;

/// `program`, started inside the cgroups whose `cgroup.procs` files are given (as it is
/// when there are none). Without `pre_exec`: this workspace has no unsafe code.
pub fn in_cgroups(procs: &[std::path::PathBuf], program: &str) -> Command {
    if procs.is_empty() {
        return Command::new(program);
    }
    let mut c = Command::new("sh");
    c.args(["-c", JOIN_CGROUPS, "ferry-join-cgroup"])
        .args(procs)
        .args(["--", program]);
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_input_and_failures() {
        assert_eq!(run(Command::new("echo").arg("hi")).unwrap(), "hi\n");
        assert_eq!(
            run_with_stdin(&mut Command::new("cat"), Some("x\n")).unwrap(),
            "x\n"
        );
        let e = run(Command::new("sh").args(["-c", "echo bad >&2; exit 3"])).unwrap_err();
        assert!(
            matches!(&e, CommandError::Failed { stderr, .. } if stderr == "bad"),
            "{e}"
        );
        let e = run(&mut Command::new("/nonexistent/tool")).unwrap_err();
        assert!(
            matches!(&e, CommandError::Start { source, .. } if source.kind() == std::io::ErrorKind::NotFound),
            "{e}"
        );
    }
}
