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
