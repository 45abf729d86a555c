//! The API as others use it, through PyPI's grpcio and no Ferry proto file (what grpcurl
//! does): health checks without a certificate, services found by reflection, a call
//! built from reflection alone, every component's version, and the refusal of a protocol
//! the managers do not speak, on the real cloud manager, site manager and agent.
use anyhow::{ensure, Context, Result};
use ferry_tests::*;
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const RELEASE: &str = env!("CARGO_PKG_VERSION");

/// Runs the generic client (`.ci/run` makes its venv); a refused call is JSON too.
fn grpc(creds: &Path, args: &[&str]) -> Result<Value> {
    let out = Command::new("/var/cache/ferry-tests/grpc/bin/python")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/grpc_client.py"))
        .args(args)
        .arg("--creds")
        .arg(creds)
        .output()
        .context("the grpcio venv (.ci/run makes it)")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        matches!(out.status.code(), Some(0 | 3)),
        "grpc_client {args:?}: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&stdout).with_context(|| format!("grpc_client {args:?}: {stdout}"))
}

fn hostport(url: &str) -> String {
    url.trim_start_matches("https://")
        .trim_end_matches('/')
        .into()
}

/// (component, name, release, protocol, compatible) of each entry.
fn rows(v: &Value) -> Vec<(String, String, String, u64, bool)> {
    let s = |x: &Value| x.as_str().unwrap_or_default().to_string();
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|c| {
                    (
                        s(&c["component"]),
                        s(&c["name"]),
                        s(&c["release"]),
                        c["protocol"].as_u64().unwrap_or(0),
                        c["compatible"].as_bool().unwrap_or(false),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn others_find_and_call_the_api_and_every_component_says_its_version() -> Result<()> {
    let f = follow("api", "ext4", "5d1e0a77-0000-4000-8000-0000000000a1")?;
    let creds = f.cloud.creds();
    let (cloud, site) = (hostport(&f.cloud.url()), hostport(&f.site.url()));

    // Health: open to a peer without a certificate (load balancers, probes).
    let health = grpc(
        &creds,
        &[
            "health",
            &cloud,
            "--anonymous",
            "",
            "ferry.v1.Control",
            "ferry.v1.Ingest",
        ],
    )?;
    assert_eq!(
        health,
        json!({"": "SERVING", "ferry.v1.Control": "SERVING", "ferry.v1.Ingest": "SERVING"})
    );
    let health = grpc(
        &creds,
        &["health", &site, "--anonymous", "", "ferry.v1.Ingest"],
    )?;
    assert_eq!(health, json!({"": "SERVING", "ferry.v1.Ingest": "SERVING"}));
    let none = grpc(
        &creds,
        &["health", &site, "--anonymous", "ferry.v1.Control"],
    )?;
    assert_eq!(none["code"], "NOT_FOUND", "{none}");

    // Reflection: only for an enrolled peer; it lists every service.
    let anon = grpc(&creds, &["list", &cloud, "--anonymous"])?;
    assert_eq!(anon["code"], "UNAUTHENTICATED", "{anon}");
    let listed = grpc(&creds, &["list", &cloud])?;
    for svc in [
        "ferry.v1.Control",
        "ferry.v1.Enrollment",
        "ferry.v1.Ingest",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    ] {
        assert!(
            listed.as_array().is_some_and(|a| a.contains(&json!(svc))),
            "{svc}: {listed}"
        );
    }
    let listed = grpc(&creds, &["list", &site])?;
    assert!(
        listed
            .as_array()
            .is_some_and(|a| a.contains(&json!("ferry.v1.Ingest"))),
        "{listed}"
    );
    assert!(!listed.to_string().contains("ferry.v1.Control"), "{listed}");

    // Every component's version: the site says it on its next report (every 15 s).
    let mut cli = Value::Null;
    wait_for("the site's version", Duration::from_secs(60), || {
        cli = f.cloud.ferry_json(&["version"]).unwrap_or_default();
        rows(&cli).iter().any(|r| r.0 == "ferry-site" && r.3 != 0)
    })?;
    let expect = |component: &str, name: &str| {
        (
            component.to_string(),
            name.to_string(),
            RELEASE.to_string(),
            1u64,
            true,
        )
    };
    assert_eq!(
        rows(&cli),
        vec![
            expect("ferry", ""),
            expect("ferry-cloud", ""),
            expect("ferry-site", "site1"),
            expect("ferry-agent", "live"),
        ],
        "{cli}"
    );
    let table = sh(Command::new(bin("ferry"))
        .arg("--credentials")
        .arg(&creds)
        .arg("version"))?;
    assert!(
        table.lines().any(|l| l
            .split_whitespace()
            .eq(["ferry-site", "site1", RELEASE, "1"])),
        "{table}"
    );

    // A call made from reflection alone returns what the CLI printed.
    let called = grpc(&creds, &["call", &cloud, "ferry.v1.Control/Versions"])?;
    let mut by_cli = rows(&cli);
    by_cli.remove(0);
    // proto3 JSON leaves out empty names.
    assert_eq!(rows(&called["components"]), by_cli, "{called}");

    // A caller speaking a protocol the managers do not: refused before any handler
    // runs, saying which side to upgrade; on the site as on the cloud manager.
    for (target, method) in [
        (cloud.as_str(), "ferry.v1.Control/Versions"),
        (site.as_str(), "ferry.v1.Ingest/Progress"),
    ] {
        let claiming = |user_agent: &str| {
            grpc(
                &creds,
                &["call", target, method, "{}", "--user-agent", user_agent],
            )
        };
        let newer = claiming("ferry-agent/9.9.9 ferry-protocol/99")?;
        assert_eq!(newer["code"], "FAILED_PRECONDITION", "{newer}");
        let why = newer["details"].as_str().unwrap_or_default();
        assert!(
            why.contains("ferry-agent/9.9.9 speaks protocol 99")
                && why.contains(": upgrade ferry-"),
            "{why}"
        );
        let older = claiming("ferry-agent/0.0.1 ferry-protocol/0")?;
        assert_eq!(older["code"], "FAILED_PRECONDITION", "{older}");
        let why = older["details"].as_str().unwrap_or_default();
        assert!(why.ends_with("upgrade ferry-agent/0.0.1"), "{older}");
    }
    // The replication it was all measured on still holds.
    f.cloud.wait_in_sync("live", &f.src.mnt)?;
    Ok(())
}
