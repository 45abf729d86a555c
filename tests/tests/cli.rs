//! What every command line promises its user: each option and argument of every Ferry
//! binary says what it is for, `ferry --output json` prints JSON for every kind of
//! answer, and `ferry`'s exit status tells not found, refused, unreachable, usage and
//! failure apart, as `ferry --help` documents.
use anyhow::{ensure, Result};
use ferry_tests::*;
use std::process::Command;

/// The help of `bin path…`.
fn help(bin_name: &str, path: &[String]) -> Result<String> {
    let out = Command::new(bin(bin_name))
        .args(path)
        .arg("--help")
        .output()?;
    ensure!(out.status.success(), "{bin_name} {path:?} --help failed");
    Ok(String::from_utf8(out.stdout)?)
}

/// The entries of a help section ("Commands:", "Arguments:", "Options:"): each entry's
/// first column and the description beside or under it.
fn section(text: &str, title: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut inside = false;
    for line in text.lines() {
        if line == title {
            inside = true;
            continue;
        }
        if !inside {
            continue;
        }
        if line.is_empty() || !line.starts_with(' ') {
            break;
        }
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        // A new entry starts at the section's own indentation (short flags at 2, long
        // ones at 6, arguments and commands at 2); deeper lines continue the last one.
        let starts = indent <= 6
            && (trimmed.starts_with('-') || trimmed.starts_with('<') || trimmed.starts_with('['))
            || (title == "Commands:" && indent == 2);
        if starts || out.is_empty() {
            // Two spaces or more separate the entry from its description.
            let (head, desc) = match trimmed.find("  ") {
                Some(i) => (trimmed[..i].to_string(), trimmed[i..].trim().to_string()),
                None => (trimmed.to_string(), String::new()),
            };
            out.push((head, desc));
        } else if let Some(last) = out.last_mut() {
            last.1.push(' ');
            last.1.push_str(trimmed);
        }
    }
    out
}

/// A description that says nothing beyond what clap adds on its own.
fn says_nothing(desc: &str) -> bool {
    let mut rest = desc.to_string();
    while let (Some(a), Some(b)) = (rest.find('['), rest.find(']')) {
        if b < a {
            break;
        }
        rest.replace_range(a..=b, "");
    }
    rest.trim().is_empty()
}

/// Every option and argument of `bin` and its subcommands that has no help text.
fn undocumented(bin_name: &str) -> Result<Vec<String>> {
    let mut missing = Vec::new();
    let mut todo: Vec<Vec<String>> = vec![Vec::new()];
    let mut seen = 0;
    while let Some(path) = todo.pop() {
        seen += 1;
        let text = help(bin_name, &path)?;
        for (cmd, desc) in section(&text, "Commands:") {
            if cmd == "help" {
                continue;
            }
            if desc.is_empty() {
                missing.push(format!("{bin_name} {} {cmd} (the command)", path.join(" ")));
            }
            let mut next = path.clone();
            next.push(cmd);
            todo.push(next);
        }
        for title in ["Arguments:", "Options:"] {
            for (arg, desc) in section(&text, title) {
                if says_nothing(&desc) {
                    missing.push(format!("{bin_name} {} {arg}", path.join(" ")));
                }
            }
        }
    }
    ensure!(
        seen > 1 || bin_name == "ferry-site",
        "{bin_name}: no subcommands found"
    );
    Ok(missing)
}

#[test]
fn every_option_and_argument_of_every_binary_has_help() -> Result<()> {
    // The walker itself finds what it should.
    let sample = "Options:\n      --config <CONFIG>            \n      --log-format <F>  [default: plain]\n  -n, --name <N>      Its name\n                      (continued)\n";
    let entries = section(sample, "Options:");
    assert_eq!(entries.len(), 3, "{entries:?}");
    assert!(says_nothing(&entries[0].1) && says_nothing(&entries[1].1));
    assert_eq!(entries[2].1, "Its name (continued)");

    let mut missing = Vec::new();
    for b in [
        "ferry",
        "ferry-cloud",
        "ferry-site",
        "ferry-agent",
        "ferry-tunnel",
    ] {
        missing.extend(undocumented(b)?);
    }
    ensure!(
        missing.is_empty(),
        "{} without help text:\n{}",
        missing.len(),
        missing.join("\n")
    );
    Ok(())
}

/// `ferry ARGS` against `cloud`: exit status, stdout, stderr.
fn ferry(cloud: &CloudMgr, args: &[&str]) -> Result<(i32, String, String)> {
    let out = Command::new(bin("ferry"))
        .arg("--credentials")
        .arg(cloud.creds())
        .args(args)
        .output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[test]
fn ferry_exit_status_and_output_follow_the_documented_contract() -> Result<()> {
    let tmp = scratch("cli")?;
    let mut cloud = CloudMgr::start(&tmp.path().join("cloud"))?;

    let (code, out, _) = ferry(&cloud, &["--help"])?;
    assert_eq!(code, 0);
    for line in [
        "3  not found",
        "4  refused",
        "5  unreachable",
        "2  usage",
        "1  failed",
    ] {
        assert!(
            out.contains(line),
            "--help does not document {line:?}:\n{out}"
        );
    }

    // --output json (and -o json) prints JSON for lists, single answers and actions.
    for args in [
        vec!["--output", "json", "systems", "list"],
        vec!["-o", "json", "sync", "status"],
        vec!["version", "-o", "json"],
        vec!["token", "list", "--output", "json"],
        vec!["-o", "json", "sites", "bind", "site7", "web01"],
        vec!["-o", "json", "operators", "revoke", "mallory"],
        vec![
            "-o", "json", "filedb", "add", "--os", "debian", "--target", "local",
        ],
    ] {
        let (code, out, err) = ferry(&cloud, &args)?;
        ensure!(code == 0, "{args:?}: {code} {err}");
        let v: serde_json::Value = serde_json::from_str(&out)
            .map_err(|e| anyhow::anyhow!("{args:?} printed no JSON ({e}): {out}"))?;
        ensure!(!v.is_null(), "{args:?}: {out}");
    }
    let (_, out, _) = ferry(&cloud, &["-o", "json", "sites", "bind", "site8", "db01"])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(v["site"], "site8", "{v}");
    assert_eq!(v["systems"][0], "db01", "{v}");
    // The table stays the default.
    let (_, out, _) = ferry(&cloud, &["sites", "list"])?;
    assert!(out.contains("site:site8  relays db01"), "{out}");

    // Each kind of failure has its own status.
    for (args, want, says) in [
        (vec!["clone", "show", "nope"], 3, "no clone"),
        (vec!["app", "show", "nope"], 3, "no app"),
        (vec!["replica", "path", "nope", "/"], 3, "no system"),
        (vec!["image", "delete", "nope"], 3, "no image"),
        (vec!["token", "revoke", "nope"], 3, "no join token"),
        (
            vec!["sites", "bind", "bad/name", "web01"],
            4,
            "invalid name",
        ),
        (
            vec!["operators", "revoke", "bad/name"],
            4,
            "invalid identity",
        ),
        (
            vec!["filedb", "add", "--os", "debian", "--target", "mars"],
            4,
            "target",
        ),
        (
            vec![
                "filedb",
                "add",
                "--os",
                "debian",
                "--target",
                "local",
                "--versions",
                ">>>5",
            ],
            4,
            "not a release number",
        ),
        (vec!["systems", "remove", "web01"], 2, "--yes"),
        (vec!["no-such-command"], 2, "unrecognized subcommand"),
        (
            vec!["--output", "yaml", "systems", "list"],
            2,
            "invalid value",
        ),
    ] {
        let (code, _, err) = ferry(&cloud, &args)?;
        ensure!(
            code == want && err.contains(says),
            "{args:?}: exit {code} (want {want}), {err}"
        );
    }
    // Credentials that cannot be read are a usage error.
    let out = Command::new(bin("ferry"))
        .args([
            "--credentials",
            "/nonexistent/operator.toml",
            "systems",
            "list",
        ])
        .output()?;
    assert_eq!(out.status.code(), Some(2), "{out:?}");

    // A cloud manager that is not there: unreachable.
    cloud.proc.kill9();
    let (code, _, err) = ferry(&cloud, &["systems", "list"])?;
    ensure!(code == 5, "exit {code} with the manager down: {err}");
    Ok(())
}
