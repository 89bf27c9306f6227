//! The DaemonSet and its companions in deploy/ are valid Kubernetes objects:
//! each document deserializes into its typed k8s-openapi struct, and
//! serializing it back gives the same document — so a misspelt or unknown
//! field (which the typed struct would silently drop) fails the test. No
//! privileges needed.

use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{ConfigMap, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use serde::{Deserialize, de::DeserializeOwned};
use serde_json::Value;

fn round_trip<T: DeserializeOwned + serde::Serialize>(doc: &Value) -> Result<Value> {
    let typed: T = serde_json::from_value(doc.clone())?;
    Ok(serde_json::to_value(typed)?)
}

/// Where `a` and `b` differ, as JSON paths.
fn differences(path: &str, a: &Value, b: &Value, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for key in x.keys().chain(y.keys().filter(|k| !x.contains_key(*k))) {
                let (va, vb) = (x.get(key).unwrap_or(&Value::Null), y.get(key).unwrap_or(&Value::Null));
                differences(&format!("{path}.{key}"), va, vb, out);
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (va, vb)) in x.iter().zip(y).enumerate() {
                differences(&format!("{path}[{i}]"), va, vb, out);
            }
        }
        _ if a != b => out.push(format!("{path}: {a} != {b}")),
        _ => {}
    }
}

#[test]
fn deploy_manifests_are_valid_and_have_no_unknown_fields() -> Result<()> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/weir.yaml");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut kinds = Vec::new();
    for document in serde_yaml::Deserializer::from_str(&text) {
        let doc: Value = Value::deserialize(document)?;
        let kind = doc["kind"].as_str().context("a document without kind")?.to_owned();
        let back = match kind.as_str() {
            "ServiceAccount" => round_trip::<ServiceAccount>(&doc)?,
            "ClusterRole" => round_trip::<ClusterRole>(&doc)?,
            "ClusterRoleBinding" => round_trip::<ClusterRoleBinding>(&doc)?,
            "ConfigMap" => round_trip::<ConfigMap>(&doc)?,
            "DaemonSet" => round_trip::<DaemonSet>(&doc)?,
            other => bail!("unexpected kind {other} in {}", path.display()),
        };
        let mut diff = Vec::new();
        differences(&kind, &doc, &back, &mut diff);
        ensure!(diff.is_empty(), "fields the typed {kind} does not know (misspelt?):\n{}", diff.join("\n"));
        kinds.push(kind);
    }
    ensure!(kinds.contains(&"DaemonSet".to_owned()), "deploy/weir.yaml has no DaemonSet: {kinds:?}");

    // The agent reads only; the RBAC grants nothing else.
    let roles: Vec<Value> =
        serde_yaml::Deserializer::from_str(&text).map(Value::deserialize).collect::<Result<_, _>>()?;
    let role = roles.iter().find(|d| d["kind"] == "ClusterRole").context("no ClusterRole")?;
    let role: ClusterRole = serde_json::from_value(role.clone())?;
    for rule in role.rules.iter().flatten() {
        ensure!(
            rule.verbs.iter().all(|v| ["get", "list", "watch"].contains(&v.as_str())),
            "the agent's role must be read-only: {rule:?}"
        );
    }
    Ok(())
}

/// A misspelt field is caught (the check above can fail).
#[test]
fn a_misspelt_field_is_caught() -> Result<()> {
    let doc: Value = serde_yaml::from_str(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: x, namspace: kube-system}\n",
    )?;
    let back = round_trip::<ServiceAccount>(&doc)?;
    let mut diff = Vec::new();
    differences("ServiceAccount", &doc, &back, &mut diff);
    ensure!(diff.iter().any(|d| d.contains("namspace")), "{diff:?}");
    Ok(())
}
