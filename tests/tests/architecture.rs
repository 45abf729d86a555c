//! The dependency rules of ARCHITECTURE.md, read from `cargo metadata` and `cargo tree`:
//! nothing depends on the cloud manager, daemons do not depend on each other, and a cloud
//! SDK appears only in its provider crate (and not at all without its feature).
use anyhow::{Context, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["--offline", "--locked"]);
    c
}

fn output(c: &mut Command) -> Result<String> {
    let out = c.output().with_context(|| format!("{c:?}"))?;
    anyhow::ensure!(
        out.status.success(),
        "{c:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// Each workspace crate and the names of its normal and build dependencies.
fn workspace_deps() -> Result<BTreeMap<String, BTreeSet<String>>> {
    let text = output(cargo().args(["metadata", "--format-version", "1", "--no-deps"]))?;
    let meta: serde_json::Value = serde_json::from_str(&text)?;
    let mut out = BTreeMap::new();
    for p in meta["packages"].as_array().context("packages")? {
        let deps = p["dependencies"]
            .as_array()
            .context("dependencies")?
            .iter()
            .filter(|d| d["kind"].as_str() != Some("dev"))
            .filter_map(|d| d["name"].as_str().map(str::to_string))
            .collect();
        out.insert(p["name"].as_str().context("name")?.to_string(), deps);
    }
    Ok(out)
}

fn is_sdk(dep: &str) -> bool {
    dep.starts_with("aws-") || dep.starts_with("azure_")
}

#[test]
fn crates_keep_the_dependency_rules() -> Result<()> {
    let deps = workspace_deps()?;
    for want in [
        "ferry-cloud-manager",
        "ferry-cli",
        "ferry-customize",
        "ferry-image",
        "ferry-provider",
        "ferry-provider-aws",
        "ferry-provider-azure",
        "ferry-sysconf",
        "ferry-tunnel-config",
    ] {
        anyhow::ensure!(deps.contains_key(want), "crate {want} is missing: {deps:?}");
    }
    let daemons = [
        "ferry-agent",
        "ferry-site-manager",
        "ferry-cloud-manager",
        "ferry-tunnel",
    ];
    let mut broken = Vec::new();
    for (krate, ds) in &deps {
        if ds.contains("ferry-cloud-manager") {
            broken.push(format!("{krate} depends on the cloud manager"));
        }
        if daemons.contains(&krate.as_str()) {
            for d in ds.iter().filter(|d| daemons.contains(&d.as_str())) {
                broken.push(format!("daemon {krate} depends on daemon {d}"));
            }
        }
        let sdks: Vec<&String> = ds.iter().filter(|d| is_sdk(d)).collect();
        let allowed = match krate.as_str() {
            "ferry-provider-aws" => "aws-",
            "ferry-provider-azure" => "azure_",
            _ => "-none-",
        };
        for s in sdks.iter().filter(|s| !s.starts_with(allowed)) {
            broken.push(format!("{krate} depends on the cloud SDK crate {s}"));
        }
    }
    anyhow::ensure!(
        broken.is_empty(),
        "dependency rules broken:\n{}",
        broken.join("\n")
    );
    Ok(())
}

/// Everything `ferry-cloud-manager` links, transitively, with the given feature flags.
fn linked(features: &[&str]) -> Result<BTreeSet<String>> {
    let text = output(
        cargo()
            .args([
                "tree",
                "-p",
                "ferry-cloud-manager",
                "-e",
                "normal",
                "--prefix",
                "none",
            ])
            .args(["--format", "{p}"])
            .args(features),
    )?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect())
}

#[test]
fn the_cloud_manager_builds_without_the_cloud_sdks() -> Result<()> {
    let full = linked(&[])?;
    anyhow::ensure!(
        full.contains("aws-sdk-ec2") && full.contains("azure_core"),
        "the default build lost a provider: {full:?}"
    );
    anyhow::ensure!(
        !full.contains("russh-sftp"),
        "the cloud manager links the tunnel daemon"
    );
    let bare = linked(&["--no-default-features"])?;
    let sdks: Vec<&String> = bare.iter().filter(|d| is_sdk(d)).collect();
    anyhow::ensure!(
        sdks.is_empty(),
        "--no-default-features still links {sdks:?}"
    );
    let aws = linked(&["--no-default-features", "--features", "aws"])?;
    anyhow::ensure!(
        aws.contains("aws-sdk-ec2") && !aws.iter().any(|d| d.starts_with("azure_")),
        "--features aws: {aws:?}"
    );
    Ok(())
}

/// The IAM actions the aws provider calls: every `ec2.`, `elb.` and `ebs.` client call
/// in its source, by its API name.
fn aws_calls() -> Result<BTreeSet<String>> {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../cloud-manager/provider-aws/src");
    let services = [
        ("ec2", "ec2"),
        ("elb", "elasticloadbalancing"),
        ("ebs", "ebs"),
    ];
    let mut out = BTreeSet::new();
    for f in std::fs::read_dir(&dir)? {
        let text = std::fs::read_to_string(f?.path())?;
        let b = text.as_bytes();
        for (client, service) in services {
            let mut from = 0;
            while let Some(at) = text[from..].find(client).map(|i| i + from) {
                from = at + client.len();
                let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
                if at > 0 && word(b[at - 1]) || b.get(from).copied().is_some_and(word) {
                    continue;
                }
                let rest = text[from..].trim_start();
                let Some(rest) = rest.strip_prefix('.') else {
                    continue;
                };
                let rest = rest.trim_start();
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if name.is_empty() || !rest[name.len()..].trim_start().starts_with('(') {
                    continue;
                }
                let pascal: String = name
                    .split('_')
                    .map(|w| {
                        let mut c = w.chars();
                        c.next()
                            .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                            .unwrap_or_default()
                    })
                    .collect();
                out.insert(format!("{service}:{pascal}"));
            }
        }
    }
    Ok(out)
}

/// Actions a call needs beside its own: the tags a creation carries.
const IMPLIED: &[&str] = &["ec2:CreateTags", "elasticloadbalancing:AddTags"];

#[test]
fn the_aws_policy_grants_exactly_what_ferry_calls_and_confines_changes_by_tag() -> Result<()> {
    let calls = aws_calls()?;
    anyhow::ensure!(
        calls.contains("ec2:RunInstances") && calls.contains("ebs:PutSnapshotBlock"),
        "the scan found too little: {calls:?}"
    );
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/aws/iam-policy.json");
    let policy: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path)?)?;
    let statements = policy["Statement"].as_array().context("statements")?;
    let mut granted = BTreeSet::new();
    let mut unscoped = Vec::new();
    for st in statements {
        let actions = st["Action"].as_array().context("actions")?;
        let cond = st["Condition"].to_string();
        let tagged = cond.contains("\"aws:RequestTag/ferry:managed\":\"true\"")
            || cond.contains("\"aws:ResourceTag/ferry:managed\":\"true\"");
        for a in actions {
            let a = a.as_str().context("action")?.to_string();
            let read = a
                .split(':')
                .nth(1)
                .is_some_and(|v| v.starts_with("Describe"));
            // The VPC's main route table is made by AWS, untagged; Ferry only adds the
            // default route of a VPC it made.
            let route = a == "ec2:CreateRoute" && st["Resource"] == "arn:aws:ec2:*:*:route-table/*";
            if !(read || route || tagged) {
                unscoped.push(a.clone());
            }
            granted.insert(a);
        }
    }
    let missing: Vec<&String> = calls.difference(&granted).collect();
    let unused: Vec<&String> = granted
        .difference(&calls)
        .filter(|a| !IMPLIED.contains(&a.as_str()))
        .collect();
    anyhow::ensure!(missing.is_empty(), "the policy lacks {missing:?}");
    anyhow::ensure!(unused.is_empty(), "the policy grants unused {unused:?}");
    anyhow::ensure!(
        unscoped.is_empty(),
        "these may act on resources Ferry did not make: {unscoped:?}"
    );
    Ok(())
}
