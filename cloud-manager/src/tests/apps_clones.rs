//! Apps and clones: validation, clone state transitions, and reconcile after a restart.
use super::*;
use crate::apps::AppSpec;
use crate::error::CloudError;
use crate::jobs::JobCtx;
use crate::state::{CloneState, InstanceState, Target};
use ferry_common::error::{ErrorKind, Kind};

fn kind<T: std::fmt::Debug>(r: Result<T, CloudError>) -> Kind {
    r.unwrap_err().kind()
}

/// A clone named `name` (empty: APP-N), nothing else asked.
fn named(name: &str) -> crate::clones::CloneSpec {
    crate::clones::CloneSpec {
        name: name.to_string(),
        ..Default::default()
    }
}

fn spec(name: &str, systems: &[(&str, &str)]) -> AppSpec {
    AppSpec {
        name: name.into(),
        systems: systems
            .iter()
            .map(|(s, v)| (s.to_string(), v.parse().unwrap()))
            .collect(),
        ..Default::default()
    }
}

/// Two registered systems and an app of them with an image each.
pub(super) async fn shop(h: &Harness) {
    register(h, "web01", "10.0.0.5/24").await;
    register(h, "db01", "10.0.0.6/24").await;
    let app = spec("shop", &[("web01", "public"), ("db01", "private")]);
    h.cloud.apps.create(app).unwrap();
    image(h, "shop", "web01", 1);
    image(h, "shop", "db01", 1);
}

#[tokio::test]
async fn an_app_names_registered_systems_once_each_with_a_visibility() {
    let h = harness();
    let apps = &h.cloud.apps;
    assert_eq!(
        kind(apps.create(spec("shop", &[("web01", "public")]))),
        Kind::NotFound
    );
    register(&h, "web01", "10.0.0.5/24").await;
    assert_eq!(kind(apps.create(spec("shop", &[]))), Kind::InvalidArgument);
    let twice = spec("shop", &[("web01", "public"), ("web01", "private")]);
    assert_eq!(kind(apps.create(twice)), Kind::InvalidArgument);
    assert_eq!(
        kind(apps.create(spec("a b", &[("web01", "public")]))),
        Kind::InvalidArgument
    );
    let app = apps.create(spec("shop", &[("web01", "public")])).unwrap();
    assert_eq!(app.provider, Target::Local);
    assert_eq!(
        kind(apps.create(spec("shop", &[("web01", "public")]))),
        Kind::AlreadyExists
    );
}

#[tokio::test]
async fn a_provider_left_out_of_the_build_is_refused() {
    let h = harness();
    register(&h, "web01", "10.0.0.5/24").await;
    for target in [Target::Aws, Target::Azure] {
        let mut s = spec("shop", &[("web01", "public")]);
        s.provider = Some(target);
        match h.cloud.apps.create(s) {
            Ok(_) => assert!(crate::built_in(target)),
            Err(e) => {
                assert!(!crate::built_in(target) && e.to_string().contains("not in this build"))
            }
        }
        h.cloud.apps.remove("shop").unwrap();
    }
}

#[tokio::test]
async fn services_get_proxy_ports_in_order_and_udp_keeps_its_port() {
    let h = harness();
    register(&h, "web01", "10.0.0.5/24").await;
    let mut s = spec("shop", &[("web01", "private")]);
    s.services = vec![
        "ldap.corp:389".into(),
        "10.1.0.2:5432".into(),
        "10.1.0.3:53/udp".into(),
    ];
    let app = h.cloud.apps.create(s).unwrap();
    assert_eq!(
        app.services,
        [
            "ldap.corp:389=127.0.0.1:50100",
            "10.1.0.2:5432=127.0.0.1:50101",
            "10.1.0.3:53/udp=127.0.0.1:53",
        ]
    );
    let again = h
        .cloud
        .apps
        .edit_services("shop", &["LDAP.corp:389".into()], &[]);
    assert_eq!(kind(again), Kind::AlreadyExists);
}

#[tokio::test]
async fn an_edit_removes_then_adds_and_a_freed_proxy_port_is_reused() {
    let h = harness();
    register(&h, "web01", "10.0.0.5/24").await;
    let mut s = spec("shop", &[("web01", "private")]);
    s.services = vec!["a.corp:1".into(), "b.corp:2".into()];
    h.cloud.apps.create(s).unwrap();
    let apps = &h.cloud.apps;
    let missing = apps.edit_services("shop", &[], &["c.corp:3".into()]);
    assert_eq!(kind(missing), Kind::NotFound);
    let app = apps
        .edit_services("shop", &["c.corp:3".into()], &["a.corp:1".into()])
        .unwrap();
    assert_eq!(
        app.services,
        ["b.corp:2=127.0.0.1:50101", "c.corp:3=127.0.0.1:50100"]
    );
    assert_eq!(h.cloud.apps.require("shop").unwrap().services, app.services);
}

#[tokio::test]
async fn a_load_balancer_fronts_public_systems_on_port_80_unless_told() {
    let h = harness();
    register(&h, "web01", "10.0.0.5/24").await;
    let apps = &h.cloud.apps;
    let mut s = spec("a", &[("web01", "private")]);
    s.load_balancer = true;
    assert_eq!(kind(apps.create(s)), Kind::InvalidArgument);
    let mut s = spec("b", &[("web01", "public")]);
    s.load_balancer_ports = vec![443];
    assert_eq!(kind(apps.create(s)), Kind::InvalidArgument);
    let mut s = spec("c", &[("web01", "public")]);
    (s.load_balancer, s.load_balancer_ports) = (true, vec![443, 443]);
    assert_eq!(kind(apps.create(s)), Kind::InvalidArgument);
    let mut s = spec("d", &[("web01", "public")]);
    s.load_balancer = true;
    assert_eq!(apps.create(s).unwrap().load_balancer_ports, [80]);
}

#[tokio::test]
async fn a_clone_needs_an_image_of_every_system() {
    let h = harness();
    register(&h, "web01", "10.0.0.5/24").await;
    h.cloud
        .apps
        .create(spec("shop", &[("web01", "public")]))
        .unwrap();
    let r = h
        .cloud
        .create_clone("shop", &named(""), &JobCtx::detached())
        .await;
    assert_eq!(kind(r), Kind::FailedPrecondition);
    assert_eq!(
        kind(
            h.cloud
                .create_clone("nope", &named(""), &JobCtx::detached())
                .await
        ),
        Kind::NotFound
    );
    assert!(h.cloud.clones.list().unwrap().is_empty());
}

#[tokio::test]
async fn clones_are_named_after_their_app_and_run_from_the_newest_images() {
    let h = harness();
    shop(&h).await;
    let newer = image(&h, "shop", "web01", 7);
    let first = h
        .cloud
        .create_clone("shop", &named(""), &JobCtx::detached())
        .await
        .unwrap()
        .record;
    assert_eq!(
        (first.name.as_str(), first.state),
        ("shop-1", CloneState::Running)
    );
    let web = first
        .instances
        .iter()
        .find(|i| i.system == "web01")
        .unwrap();
    assert_eq!(
        (web.image.as_str(), web.private_ip.as_str()),
        (newer.id.as_str(), "10.0.0.5")
    );
    assert_eq!(web.source_cpus, 2);
    assert_eq!(first.subnets.len(), 1);
    let second = h
        .cloud
        .create_clone("shop", &named(""), &JobCtx::detached())
        .await
        .unwrap()
        .record;
    assert_eq!(second.name, "shop-2");
    assert_eq!(h.provider.script().created, ["shop-1", "shop-2"]);
}

#[tokio::test]
async fn a_clone_name_is_checked_before_anything_is_made() {
    let h = harness();
    shop(&h).await;
    let long = "x".repeat(41);
    assert_eq!(
        kind(
            h.cloud
                .create_clone("shop", &named(&long), &JobCtx::detached())
                .await
        ),
        Kind::InvalidArgument
    );
    assert_eq!(
        kind(
            h.cloud
                .create_clone("shop", &named("../x"), &JobCtx::detached())
                .await
        ),
        Kind::InvalidArgument
    );
    h.cloud
        .create_clone("shop", &named("qa"), &JobCtx::detached())
        .await
        .unwrap();
    assert_eq!(
        kind(
            h.cloud
                .create_clone("shop", &named("qa"), &JobCtx::detached())
                .await
        ),
        Kind::AlreadyExists
    );
    assert_eq!(h.provider.script().created, ["qa"]);
}

#[tokio::test]
async fn two_systems_with_one_address_cannot_be_cloned() {
    let h = harness();
    register(&h, "web01", "10.0.0.5/24").await;
    register(&h, "web02", "10.0.0.6/24").await;
    let app = spec("pair", &[("web01", "public"), ("web02", "public")]);
    h.cloud.apps.create(app).unwrap();
    // web02 moved to web01's address after the app was defined.
    register(&h, "web02", "10.0.0.5/24").await;
    image(&h, "pair", "web01", 1);
    image(&h, "pair", "web02", 1);
    assert_eq!(
        kind(
            h.cloud
                .create_clone("pair", &named(""), &JobCtx::detached())
                .await
        ),
        Kind::InvalidArgument
    );
    assert!(h.provider.script().created.is_empty());
}

#[tokio::test]
async fn a_failed_creation_leaves_no_record() {
    let h = harness();
    shop(&h).await;
    h.provider.script().fail_create = Some("no room".into());
    assert!(h
        .cloud
        .create_clone("shop", &named(""), &JobCtx::detached())
        .await
        .is_err());
    assert!(h.cloud.clones.list().unwrap().is_empty());
}

#[tokio::test]
async fn suspend_resume_and_terminate_move_a_clone_through_its_states() {
    let h = harness();
    shop(&h).await;
    h.cloud
        .create_clone("shop", &named(""), &JobCtx::detached())
        .await
        .unwrap();
    let clones = &h.cloud.clones;
    let c = clones.suspend("shop-1").await.unwrap().record;
    assert_eq!(c.state, CloneState::Suspended);
    assert!(c
        .instances
        .iter()
        .all(|i| i.state == InstanceState::Suspended));
    assert_eq!(
        clones.resume("shop-1").await.unwrap().record.state,
        CloneState::Running
    );
    let t = clones.terminate("shop-1").await.unwrap().record;
    assert_eq!(t.state, CloneState::Terminated);
    assert_eq!(h.provider.script().terminated, ["shop-1"]);
    assert_eq!(kind(clones.suspend("shop-1").await), Kind::NotFound);
}

#[tokio::test]
async fn after_a_failed_operation_the_record_holds_what_the_provider_has() {
    let h = harness();
    shop(&h).await;
    h.cloud
        .create_clone("shop", &named(""), &JobCtx::detached())
        .await
        .unwrap();
    {
        let mut s = h.provider.script();
        s.fail_suspend = Some("api down".into());
        s.observed = Some(InstanceState::Stopped);
    }
    assert!(h.cloud.clones.suspend("shop-1").await.is_err());
    assert_eq!(
        h.cloud.clones.list().unwrap()[0].record.state,
        CloneState::Degraded
    );
}

#[tokio::test]
async fn a_restart_removes_interrupted_creations_and_observes_the_rest() {
    let h = harness();
    shop(&h).await;
    h.cloud
        .create_clone("shop", &named(""), &JobCtx::detached())
        .await
        .unwrap();
    let cut_short = CloneRecord {
        name: "shop-9".into(),
        app: "shop".into(),
        provider: Target::Local,
        state: CloneState::Creating,
        ..Default::default()
    };
    Records::<CloneRecord>::open(&h.store, "clones", true)
        .unwrap()
        .put(&cut_short)
        .unwrap();
    h.provider.script().observed = Some(InstanceState::Stopped);
    h.cloud.start().await.unwrap();
    let left = h.cloud.clones.list().unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(
        (left[0].record.name.as_str(), left[0].record.state),
        ("shop-1", CloneState::Degraded)
    );
    assert_eq!(h.provider.script().terminated, ["shop-9"]);
}

#[tokio::test]
async fn images_and_apps_in_use_by_a_clone_are_kept() {
    let h = harness();
    shop(&h).await;
    let view = h
        .cloud
        .create_clone("shop", &named(""), &JobCtx::detached())
        .await
        .unwrap();
    let used = view.record.instances[0].image.clone();
    assert_eq!(
        kind(h.cloud.delete_image(&used).await),
        Kind::FailedPrecondition
    );
    assert_eq!(
        kind(h.cloud.delete_app("shop", &JobCtx::detached()).await),
        Kind::FailedPrecondition
    );
    assert_eq!(h.cloud.images.list().unwrap().len(), 2);
    h.cloud.clones.terminate("shop-1").await.unwrap();
    let deleted = h
        .cloud
        .delete_app("shop", &JobCtx::detached())
        .await
        .unwrap();
    assert_eq!(deleted.len(), 2);
    assert!(h.cloud.images.list().unwrap().is_empty());
    assert!(h.cloud.apps.get("shop").unwrap().is_none());
}

#[tokio::test]
async fn tunnel_details_need_a_gateway_and_an_absolute_key_path() {
    let h = harness();
    shop(&h).await;
    h.cloud
        .create_clone("shop", &named(""), &JobCtx::detached())
        .await
        .unwrap();
    let r = h
        .cloud
        .clones
        .tunnel_connect("shop-1", "", "/etc/ferry/key", &[]);
    assert_eq!(kind(r), Kind::FailedPrecondition);
    let r = h.cloud.clones.tunnel_connect("nope", "", "/k", &[]);
    assert_eq!(kind(r), Kind::NotFound);
}

/// Public ports name the app's public systems (or all of them), sources are CIDRs, an
/// app whose public systems nobody may reach says so, and clones carry what it opens.
#[tokio::test]
async fn public_ports_and_their_sources_are_checked_and_reach_the_clone() {
    let h = harness();
    register(&h, "web01", "10.0.0.5/24").await;
    register(&h, "db01", "10.0.0.6/24").await;
    let systems = [("web01", "public"), ("db01", "private")];
    let with = |ports: &[&str], from: &[&str]| AppSpec {
        public_ports: ports.iter().map(|s| s.to_string()).collect(),
        allow_from: from.iter().map(|s| s.to_string()).collect(),
        ..spec("shop", &systems)
    };
    for (ports, from, says) in [
        (
            &["db01:5432"][..],
            &["10.9.0.0/16"][..],
            "not a public system",
        ),
        (&["nobody:80"], &[], "not a public system"),
        (&["0"], &[], "expected [SYSTEM:]PORT[/udp]"),
        (&["80/sctp"], &[], "expected [SYSTEM:]PORT[/udp]"),
        (&["443"], &["not-a-cidr"], "expected an IPv4 CIDR"),
    ] {
        let err = h.cloud.apps.create(with(ports, from)).unwrap_err();
        assert_eq!(err.kind(), Kind::InvalidArgument, "{ports:?} {from:?}");
        assert!(err.to_string().contains(says), "{err}");
    }
    // No sources: nobody outside may reach the public systems, and the app says so.
    let closed = h.cloud.apps.create(with(&["443"], &[])).unwrap();
    assert!(
        closed.warnings()[0].contains("--allow-from"),
        "{:?}",
        closed.warnings()
    );
    h.cloud
        .delete_app("shop", &JobCtx::detached())
        .await
        .unwrap();
    let app = h
        .cloud
        .apps
        .create(with(&["443", "web01:53/udp", "443"], &["203.0.113.7/24"]))
        .unwrap();
    assert!(app.warnings().is_empty());
    assert_eq!(app.allow_from, ["203.0.113.0/24"]);
    image(&h, "shop", "web01", 1);
    image(&h, "shop", "db01", 1);
    let view = h
        .cloud
        .create_clone("shop", &named(""), &JobCtx::detached())
        .await
        .unwrap();
    let rec = &view.record;
    assert_eq!(rec.allow_from, ["203.0.113.0/24"]);
    assert_eq!(rec.ports_for("web01"), [(53, true), (443, false)]);
}

#[tokio::test]
async fn the_fig_4a_groups_are_checked_and_an_app_changes_in_place() {
    let h = harness();
    for (name, ip) in [
        ("web01", "10.0.0.5/24"),
        ("web02", "10.0.0.5/24"),
        ("db01", "10.0.0.6/24"),
        ("ldap01", "10.0.0.7/24"),
    ] {
        register(&h, name, ip).await;
    }
    let apps = &h.cloud.apps;
    let refused = |s: AppSpec, why: &str| {
        let e = apps.create(s).unwrap_err();
        assert_eq!(e.kind(), Kind::InvalidArgument, "{e}");
        assert!(e.to_string().contains(why), "{e}");
    };
    // Clones keep addresses: two systems on one cannot be cloned together.
    refused(
        spec("shop", &[("web01", "public"), ("web02", "private")]),
        "web01 and web02 have the same address 10.0.0.5",
    );
    let mut s = spec("shop", &[("web01", "public"), ("db01", "public")]);
    s.databases = vec!["db01".into()];
    refused(s, "database server db01 must be private");
    let mut s = spec("shop", &[("web01", "public")]);
    s.databases = vec!["db01".into()];
    refused(s, "not one of the app's systems");
    let mut s = spec("shop", &[("web01", "public"), ("db01", "private")]);
    s.databases = vec!["db01".into()];
    s.stays = vec!["ldap01".into()];
    refused(s.clone(), "ldap01 stays in the enterprise");
    let mut both = s.clone();
    both.stays = vec!["db01".into()];
    both.services = vec!["10.0.0.6:5432".into()];
    refused(both, "cannot both stay in the enterprise and be cloned");
    s.services = vec!["10.0.0.7:389".into()];
    let app = apps.create(s).unwrap();
    assert_eq!(
        (app.databases.as_slice(), app.stays.as_slice()),
        (&["db01".to_string()][..], &["ldap01".to_string()][..])
    );

    // A change is checked as a new app is, and keeps the name and creation time.
    let changed = h
        .cloud
        .update_app(spec("shop", &[("web02", "public"), ("db01", "private")]))
        .unwrap();
    assert_eq!(changed.created_unix_ms, app.created_unix_ms);
    assert!(changed.stays.is_empty() && changed.databases.is_empty());
    assert_eq!(apps.require("shop").unwrap().systems.len(), 2);
    let e = h
        .cloud
        .update_app(spec("shop", &[("web01", "public"), ("web02", "private")]))
        .unwrap_err();
    assert!(e.to_string().contains("same address"), "{e}");
    assert_eq!(
        kind(h.cloud.update_app(spec("nope", &[("web01", "public")]))),
        Kind::NotFound
    );
}
